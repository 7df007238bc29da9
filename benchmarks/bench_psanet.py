"""PSANet-R50 numbers: forward+backward torch vs Paddle at 1x3x465x465 (semseg's VOC crop), and the share of the
PSA mask op in a forward+backward at the seed's shape (crop 513x1025 -> feature 65x129 -> shrunken 33x65, mask 59).

Eval-mode BN (a batch of one), dropout off, the real cross-entropy on the main logits. Ratios: paddle / torch, and
op / whole model (the op is timed alone on the exact tensors the model feeds it: both branches, forward+backward).
"""
from __future__ import annotations

import os

import pytest

from conftest import model_twins, paddle_step, set_threads, torch_step

SIZE = tuple(int(v) for v in os.environ.get("SEGTWIN_BENCH_PSANET_SIZE", "1,3,465,465").split(","))
SEED_SHAPE = (1, 59 * 59, 33, 65)


@pytest.fixture(scope="module")
def twins():
    return model_twins("psanet", SIZE, crop=SIZE[2])


@pytest.mark.benchmark(group="psanet-fwd-bwd")
def test_torch_psanet(benchmark, twins):
    tm, _, x, y = twins
    benchmark.extra_info["baseline"] = True
    benchmark.extra_info["threads"] = set_threads()
    benchmark.pedantic(torch_step, args=(tm, x, y), rounds=2, iterations=1, warmup_rounds=1)


@pytest.mark.benchmark(group="psanet-fwd-bwd")
def test_paddle_psanet(benchmark, twins):
    _, pm, x, y = twins
    benchmark.extra_info["threads"] = set_threads()
    benchmark.pedantic(paddle_step, args=(pm, x, y), rounds=2, iterations=1, warmup_rounds=1)


@pytest.mark.benchmark(group="psanet-op-share-seed-shape")
def test_torch_psanet_seed_shape(benchmark):
    import torch

    import torch_ref
    set_threads()
    torch.manual_seed(0)
    m = torch_ref.build_model("psanet", num_classes=19, mask_size=59).eval()
    x = torch.randn(1, 3, 513, 1025)
    y = torch.randint(0, 19, (1, 513, 1025))
    benchmark.extra_info["baseline"] = True
    benchmark.pedantic(torch_step, args=(m, x.numpy(), y.numpy()), rounds=1, iterations=1, warmup_rounds=0)


@pytest.mark.benchmark(group="psanet-op-share-seed-shape")
def test_torch_psa_op_alone_seed_shape(benchmark):
    """Both branches' op calls (collect + distribute), forward + backward, at the seed's shape."""
    import torch

    from torch_ref.ops import psa_mask
    set_threads()
    a = torch.randn(*SEED_SHAPE, requires_grad=True)

    def run():
        (psa_mask(a, 0, 59).sum() + psa_mask(a, 1, 59).sum()).backward()
    benchmark.extra_info["hw_x_hw_map_MiB"] = round(SEED_SHAPE[2] * SEED_SHAPE[3] * SEED_SHAPE[2] * SEED_SHAPE[3]
                                                    * 4 / 2 ** 20, 1)
    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
