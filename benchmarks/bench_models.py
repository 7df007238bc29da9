"""PSPNet-R50 forward+backward, torch reference vs Paddle twin, same weights, same input, same thread count.

Size 1x3x473x473 (semseg's VOC crop). Eval-mode BatchNorm (a batch of one cannot run training-mode BN in the
1x1 pyramid branch) and dropout off; the backward pass is the real cross-entropy of main + 0.4 aux logits.
Ratio reported: paddle median / torch median (goal <= 1.2).
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from conftest import set_threads

SIZE = tuple(int(v) for v in os.environ.get("SEGTWIN_BENCH_SIZE", "1,3,473,473").split(","))


@pytest.fixture(scope="module")
def twins():
    import paddle
    import torch

    import paddle_impl
    import torch_ref
    from alignment.context import paddle_key
    from paddle_impl.checkpoint import strict_load

    set_threads()
    torch.manual_seed(0)
    tm = torch_ref.build_model("pspnet", num_classes=21).eval()
    pm = paddle_impl.build_model("pspnet", num_classes=21)
    strict_load(pm, {paddle_key(k): v.numpy() for k, v in tm.state_dict().items() if paddle_key(k)})
    pm.eval()
    rng = np.random.default_rng(0)
    x = rng.standard_normal(SIZE).astype(np.float32)
    y = rng.integers(0, 21, (SIZE[0],) + SIZE[2:]).astype(np.int64)
    return tm, pm, x, y


def _torch_step(tm, x, y):
    import torch
    import torch.nn.functional as F

    tm.zero_grad(set_to_none=True)
    out = tm(torch.from_numpy(x))
    loss = F.cross_entropy(out, torch.from_numpy(y), ignore_index=255)
    loss.backward()
    return float(loss.detach())


def _paddle_step(pm, x, y):
    import paddle
    import paddle.nn.functional as F

    pm.clear_gradients()
    out = pm(paddle.to_tensor(x))
    loss = F.cross_entropy(out, paddle.to_tensor(y), ignore_index=255, axis=1)
    loss.backward()
    return float(loss.detach())


@pytest.mark.benchmark(group="pspnet-fwd-bwd")
def test_torch_fwd_bwd(benchmark, twins):
    tm, _, x, y = twins
    benchmark.extra_info["baseline"] = True
    benchmark.extra_info["threads"] = set_threads()
    benchmark.pedantic(_torch_step, args=(tm, x, y), rounds=3, iterations=1, warmup_rounds=1)


@pytest.mark.benchmark(group="pspnet-fwd-bwd")
def test_paddle_fwd_bwd(benchmark, twins):
    _, pm, x, y = twins
    benchmark.extra_info["threads"] = set_threads()
    benchmark.pedantic(_paddle_step, args=(pm, x, y), rounds=3, iterations=1, warmup_rounds=1)


# What dominates the ratio above: the 3x3 convolution itself (PSPNet's cls/dilated-backbone shape).
CONV_X = (1, 512, 60, 60)


@pytest.fixture(scope="module")
def conv_data():
    rng = np.random.default_rng(0)
    return (rng.standard_normal(CONV_X).astype(np.float32),
            (0.01 * rng.standard_normal((512, 512, 3, 3))).astype(np.float32))


def _torch_conv(x, w):
    import torch
    import torch.nn.functional as F

    a = torch.tensor(x, requires_grad=True)
    b = torch.tensor(w, requires_grad=True)
    F.conv2d(a, b, padding=4, dilation=4).sum().backward()


def _paddle_conv(x, w):
    import paddle
    import paddle.nn.functional as F

    a = paddle.to_tensor(x, stop_gradient=False)
    b = paddle.to_tensor(w, stop_gradient=False)
    F.conv2d(a, b, padding=4, dilation=4).sum().backward()


@pytest.mark.benchmark(group="conv3x3-512-dilated4-fwd-bwd")
def test_torch_conv(benchmark, conv_data):
    benchmark.extra_info["baseline"] = True
    benchmark.extra_info["threads"] = set_threads()
    benchmark.pedantic(_torch_conv, args=conv_data, rounds=5, iterations=1, warmup_rounds=1)


@pytest.mark.benchmark(group="conv3x3-512-dilated4-fwd-bwd")
def test_paddle_conv(benchmark, conv_data):
    benchmark.extra_info["threads"] = set_threads()
    benchmark.pedantic(_paddle_conv, args=conv_data, rounds=5, iterations=1, warmup_rounds=1)
