"""PSPNet-R50 forward+backward, torch reference vs Paddle twin, same weights, same input, same thread count.

Size 1x3x473x473 (semseg's VOC crop). Eval-mode BatchNorm (a batch of one cannot run training-mode BN in the
1x1 pyramid branch) and dropout off; the backward pass is the real cross-entropy of the main logits.
Ratio reported: paddle median / torch median (goal <= 1.2).
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from conftest import model_twins, paddle_step, set_threads, torch_step

SIZE = tuple(int(v) for v in os.environ.get("SEGTWIN_BENCH_SIZE", "1,3,473,473").split(","))


@pytest.fixture(scope="module")
def twins():
    return model_twins("pspnet", SIZE, num_classes=21)


@pytest.mark.benchmark(group="pspnet-fwd-bwd")
def test_torch_fwd_bwd(benchmark, twins):
    tm, _, x, y = twins
    benchmark.extra_info["baseline"] = True
    benchmark.extra_info["threads"] = set_threads()
    benchmark.pedantic(torch_step, args=(tm, x, y), rounds=3, iterations=1, warmup_rounds=1)


@pytest.mark.benchmark(group="pspnet-fwd-bwd")
def test_paddle_fwd_bwd(benchmark, twins):
    _, pm, x, y = twins
    benchmark.extra_info["threads"] = set_threads()
    benchmark.pedantic(paddle_step, args=(pm, x, y), rounds=3, iterations=1, warmup_rounds=1)


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
