"""PointRend-R101 numbers (same weights, input and thread count on both sides), ratios paddle / torch:

* training step at 1x3x512x1024: train-mode forward (coarse head + 2048 sampled points through the point head), the
  recipe's loss (coarse + point cross-entropy, `build_loss("pointrend")` of each side) and backward;
* inference at 1x3x512x1024 split into its three parts: the ResNet-FPN backbone, the coarse head, and the two
  subdivision steps (8192 cells each), each timed on its own with the previous part's output as input.

`SEGTWIN_BENCH_POINTREND_SIZE=N,C,H,W` changes the input (multiples of 32).
"""
from __future__ import annotations

import os

import pytest

from conftest import model_twins, set_threads

SIZE = tuple(int(v) for v in os.environ.get("SEGTWIN_BENCH_POINTREND_SIZE", "1,3,512,1024").split(","))


@pytest.fixture(scope="module")
def twins():
    return model_twins("pointrend", SIZE, layers=101)


def _torch_train_step(tm, loss, x, y):
    import torch

    tm.train()
    tm.zero_grad(set_to_none=True)
    terms = loss(tm(torch.from_numpy(x)), torch.from_numpy(y))
    terms["loss"].backward()
    return float(terms["loss"].detach())


def _paddle_train_step(pm, loss, x, y):
    import paddle

    pm.train()
    pm.clear_gradients()
    terms = loss(pm(paddle.to_tensor(x)), paddle.to_tensor(y))
    terms["loss"].backward()
    return float(terms["loss"].detach())


@pytest.mark.benchmark(group="pointrend-train-step")
def test_torch_pointrend_train_step(benchmark, twins):
    import torch_ref.losses

    tm, _, x, y = twins
    benchmark.extra_info["baseline"] = True
    benchmark.extra_info["threads"] = set_threads()
    benchmark.pedantic(_torch_train_step, args=(tm, torch_ref.losses.build_loss("pointrend"), x, y), rounds=2,
                       iterations=1, warmup_rounds=1)


@pytest.mark.benchmark(group="pointrend-train-step")
def test_paddle_pointrend_train_step(benchmark, twins):
    import paddle_impl.losses

    _, pm, x, y = twins
    benchmark.extra_info["threads"] = set_threads()
    benchmark.pedantic(_paddle_train_step, args=(pm, paddle_impl.losses.build_loss("pointrend"), x, y), rounds=2,
                       iterations=1, warmup_rounds=1)


PARTS = ("backbone", "coarse_head", "subdivision")


def _parts(model, x, no_grad):
    """{part: (callable, ...)} each part timed on the previous part's output."""
    with no_grad():
        features = model.backbone(x)
        coarse = model.sem_seg_head.coarse_sem_seg_head.layers(features)
    return {"backbone": lambda: model.backbone(x),
            "coarse_head": lambda: model.sem_seg_head.coarse_sem_seg_head.layers(features),
            "subdivision": lambda: model.sem_seg_head.subdivide(features, coarse)}


@pytest.mark.benchmark(group="pointrend-inference")
@pytest.mark.parametrize("fw", ["torch", "paddle"])
@pytest.mark.parametrize("part", PARTS)
def test_pointrend_inference_part(benchmark, twins, fw, part):
    tm, pm, x, _ = twins
    if fw == "torch":
        import torch
        tm.eval()
        fn = _parts(tm, torch.from_numpy(x), torch.no_grad)[part]
        no_grad = torch.no_grad
    else:
        import paddle
        pm.eval()
        fn = _parts(pm, paddle.to_tensor(x), paddle.no_grad)[part]
        no_grad = paddle.no_grad

    def run():
        with no_grad():
            fn()

    benchmark.group = f"pointrend-inference-{part}"
    benchmark.extra_info["threads"] = set_threads()
    if fw == "torch":
        benchmark.extra_info["baseline"] = True
    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
