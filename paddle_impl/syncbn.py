"""Synchronised BatchNorm for the Paddle twins, with torch's `nn.SyncBatchNorm` training semantics.

Why not `paddle.nn.SyncBatchNorm`: the twins' `layers.BatchNorm2d` reproduces torch's training rule (torch momentum
convention, running variance updated with the UNBIASED batch variance). Paddle's stock SyncBatchNorm takes Paddle's
momentum convention (weight of the OLD running value, i.e. 1 - torch's) and updates the running variance with the
BIASED batch variance, so swapping it in for multi-card training silently changes what the running statistics, and
therefore eval outputs, converge to. `SyncBatchNorm2d` keeps the twins' rule and only makes the statistics global.

Semantics of `SyncBatchNorm2d` in training mode (C channels, R ranks, per-channel reductions over N, H, W):

    local    s1_r = sum(x_r),  s2_r = sum(x_r * x_r),  n_r = N_r * H * W
    global   S1, S2, N = sum over ranks (one all-reduce of the stacked [3, C] tensor [s1, s2, n])
             mean = S1 / N,    var = max(S2 / N - mean^2, 0)        (biased; used to normalise)
    output   y = (x - mean) / sqrt(var + eps) * weight + bias
    running  _mean     <- (1 - m) * _mean     + m * mean
             _variance <- (1 - m) * _variance + m * var * N / (N - 1)     (unbiased; m in torch's convention)

The all-reduce is a `PyLayer` whose backward all-reduces the incoming gradient too: every rank's loss depends on
every rank's local sums through the global ones, so the gradient of rank r's local sums is the SUM over ranks of
d(loss_r')/d(S1, S2). With that, each rank's input gradient is exactly the matching slice of torch's full-batch
gradient, and the per-rank weight/bias gradients sum (as the data-parallel all-reduce does) to torch's. The count
row carries no gradient that matters (nothing upstream depends on it through a differentiable path).

Numerics: the statistics come from plain sums, accumulated in the input dtype (float32 stays float32, float64 stays
float64; only float16/bfloat16 are promoted to float32, where a sum of squares overflows or loses integers in the
count). One reduction of raw sums is what both torch's and Paddle's CUDA SyncBN pay for with a single collective;
its cost is cancellation in S2 / N - mean^2, an absolute error of about eps_dtype * mean^2 in the variance. In
float64 (the alignment runs) that is ~1e-16 * mean^2, negligible for activations; in float32 it matters only when a
channel's |mean| is hundreds of times its standard deviation. The variance is clamped at 0 so rounding can never
make it negative. The running statistics are updated in their own (buffer) dtype, as torch does.

Eval mode is `layers.BatchNorm2d`'s eval (running statistics, no communication).

The reduction is pluggable: `reducer(t) -> summed t` (it may work in place on its argument, which is a private
copy). Default `all_reduce_sum`: `paddle.distributed.all_reduce` (SUM) when the world size is > 1, identity
otherwise; tests pass a simulated reducer to the constructor or to `convert_sync_batchnorm`.
"""
from __future__ import annotations

from typing import Callable, Optional

import paddle
import paddle.nn as nn
from paddle.autograd import PyLayer

from .layers import BatchNorm2d

Reducer = Callable[[paddle.Tensor], paddle.Tensor]

__all__ = ["SyncBatchNorm2d", "convert_sync_batchnorm", "all_reduce_sum"]

_AXES = [0, 2, 3]
_HALF_DTYPES = (paddle.float16, paddle.bfloat16)


def all_reduce_sum(tensor: paddle.Tensor) -> paddle.Tensor:
    """Sum of `tensor` over all ranks of the default group (in place); the tensor itself when running alone."""
    if paddle.distributed.get_world_size() > 1:
        paddle.distributed.all_reduce(tensor, op=paddle.distributed.ReduceOp.SUM)
    return tensor


class _SumOverRanks(PyLayer):
    """y = sum over ranks of t, differentiable: the backward sums the incoming gradient over ranks as well."""

    @staticmethod
    def forward(ctx, stats, reducer):
        ctx.reducer = reducer
        # The clone keeps the caller's tensor intact (all_reduce works in place) and makes the output a new tensor.
        return reducer(stats.clone())

    @staticmethod
    def backward(ctx, grad):
        return ctx.reducer(grad.clone())


class SyncBatchNorm2d(BatchNorm2d):
    """`layers.BatchNorm2d` whose training statistics are taken over the global batch (see the module docstring).

    Same constructor arguments, parameters and buffers as `BatchNorm2d` (state dicts are interchangeable), plus
    `reducer`: the cross-rank sum to use, None for `all_reduce_sum`.
    """

    def __init__(self, num_features: int, momentum: float = 0.1, eps: float = 1e-5,
                 reducer: Optional[Reducer] = None):
        super().__init__(num_features, momentum=momentum, eps=eps)
        self.reducer = reducer

    def forward(self, x):
        """x: (N, C, H, W) -> (N, C, H, W)."""
        if not self.training:
            return super().forward(x)
        if x.ndim != 4 or x.shape[1] != self.num_features:
            raise ValueError(f"SyncBatchNorm2d({self.num_features}) expects (N, {self.num_features}, H, W) input, "
                             f"got shape {list(x.shape)}")
        reducer = self.reducer if self.reducer is not None else all_reduce_sum
        n_local = x.shape[0] * x.shape[2] * x.shape[3]
        if n_local < 2 and reducer is all_reduce_sum and paddle.distributed.get_world_size() < 2:
            raise ValueError(f"SyncBatchNorm2d in training mode needs more than 1 value per channel, got input "
                             f"shape {list(x.shape)}")
        xc = x.astype(paddle.float32) if x.dtype in _HALF_DTYPES else x
        local = paddle.stack([paddle.sum(xc, axis=_AXES), paddle.sum(xc * xc, axis=_AXES),
                              paddle.full([self.num_features], float(n_local), dtype=xc.dtype)])
        total = _SumOverRanks.apply(local, reducer)
        count = total[2].detach()
        mean = total[0] / count
        var = paddle.clip(total[1] / count - mean * mean, min=0.0)
        # Normalise with the biased global variance; the affine parameters are cast to the compute dtype.
        shape = [1, self.num_features, 1, 1]
        scale = paddle.rsqrt(var + self.eps) * self.weight.astype(xc.dtype)
        out = (xc - mean.reshape(shape)) * scale.reshape(shape) + self.bias.astype(xc.dtype).reshape(shape)
        with paddle.no_grad():
            # Torch's rule: unbiased global variance, momentum = weight of the new statistic. N is counted on the
            # device (no host sync); N == 1 over all ranks gives inf here, as it would be meaningless anyway.
            m = self.momentum
            batch_mean = mean.detach().astype(self._mean.dtype)
            batch_var = (var.detach() * count / (count - 1.0)).astype(self._variance.dtype)
            self._mean.set_value((1.0 - m) * self._mean + m * batch_mean)
            self._variance.set_value((1.0 - m) * self._variance + m * batch_var)
        return out.astype(x.dtype) if out.dtype != x.dtype else out

    def extra_repr(self) -> str:
        return super().extra_repr() + ", synchronised over ranks"


def _to_sync(bn: BatchNorm2d, reducer: Optional[Reducer]) -> SyncBatchNorm2d:
    """A SyncBatchNorm2d holding copies of `bn`'s parameters and buffers (same values, dtypes and trainability)."""
    sync = SyncBatchNorm2d(bn.num_features, momentum=bn.momentum, eps=bn.eps, reducer=reducer)
    if sync.weight.dtype != bn.weight.dtype:
        sync.to(dtype=bn.weight.dtype)  # set_value refuses a dtype change (AssertionError), so cast first
    for name in ("weight", "bias"):
        src, dst = getattr(bn, name), getattr(sync, name)
        dst.set_value(src.detach())
        dst.stop_gradient = src.stop_gradient
    for name in ("_mean", "_variance"):
        # The buffers may have a dtype of their own; a clone keeps it (and the place).
        sync.register_buffer(name, getattr(bn, name).detach().clone())
    sync.training = bn.training
    return sync


def convert_sync_batchnorm(model: nn.Layer, reducer: Optional[Reducer] = None) -> nn.Layer:
    """Replace every `layers.BatchNorm2d` in `model` (recursively) by an equivalent `SyncBatchNorm2d`.

    Values are copied (the new layers own new tensors, so build the optimizer afterwards). Layers that already are
    `SyncBatchNorm2d` are left as they are. Returns `model`, or the replacement when `model` itself is a BatchNorm2d.
    """
    if isinstance(model, BatchNorm2d) and not isinstance(model, SyncBatchNorm2d):
        return _to_sync(model, reducer)
    for name, child in list(model.named_children()):
        if isinstance(child, BatchNorm2d) and not isinstance(child, SyncBatchNorm2d):
            setattr(model, name, _to_sync(child, reducer))
        else:
            convert_sync_batchnorm(child, reducer)
    return model
