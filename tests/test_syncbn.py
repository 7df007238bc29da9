"""`paddle_impl.syncbn`: SyncBatchNorm2d against torch's BatchNorm on the full batch, on one process.

Multi-rank runs are simulated without processes (see `_run_ranks`): the all-reduce of each rank is replaced by a
reducer that adds the other ranks' contributions, recorded beforehand in earlier rounds of the same step.
"""
from __future__ import annotations

import numpy as np
import paddle
import pytest

from paddle_impl.layers import BatchNorm2d, Conv2d
from paddle_impl.syncbn import SyncBatchNorm2d, convert_sync_batchnorm

C = 3
MOMENTUM = 0.1
TOL = dict(rtol=1e-10, atol=1e-12)


def _state(seed: int) -> dict:
    """Non-trivial float64 weight, bias and running statistics for C channels."""
    rng = np.random.default_rng(seed)
    return {"weight": rng.uniform(0.5, 1.5, C), "bias": rng.normal(0.0, 0.5, C),
            "mean": rng.normal(0.0, 0.5, C), "var": rng.uniform(0.5, 1.5, C)}


def _paddle_bn(state: dict, reducer=None) -> SyncBatchNorm2d:
    bn = SyncBatchNorm2d(C, momentum=MOMENTUM, reducer=reducer)
    bn.to(dtype="float64")
    bn.weight.set_value(paddle.to_tensor(state["weight"]))
    bn.bias.set_value(paddle.to_tensor(state["bias"]))
    bn._mean.set_value(paddle.to_tensor(state["mean"]))
    bn._variance.set_value(paddle.to_tensor(state["var"]))
    bn.train()
    return bn


def _torch_bn(state: dict):
    import torch

    bn = torch.nn.BatchNorm2d(C, momentum=MOMENTUM).double().train()
    with torch.no_grad():
        bn.weight.copy_(torch.from_numpy(state["weight"]))
        bn.bias.copy_(torch.from_numpy(state["bias"]))
        bn.running_mean.copy_(torch.from_numpy(state["mean"]))
        bn.running_var.copy_(torch.from_numpy(state["var"]))
    return bn


def _torch_step(bn, x: np.ndarray, g: np.ndarray) -> dict:
    """One training forward/backward of torch's BatchNorm2d with upstream gradient g (loss = sum(out * g))."""
    import torch

    xt = torch.from_numpy(x).requires_grad_(True)
    bn.weight.grad = bn.bias.grad = None
    out = bn(xt)
    (out * torch.from_numpy(g)).sum().backward()
    return {"out": out.detach().numpy(), "x": xt.grad.numpy(), "weight": bn.weight.grad.numpy(),
            "bias": bn.bias.grad.numpy(), "mean": bn.running_mean.numpy().copy(),
            "var": bn.running_var.numpy().copy()}


def _paddle_step(bn: SyncBatchNorm2d, x: np.ndarray, g: np.ndarray) -> dict:
    xp = paddle.to_tensor(x, stop_gradient=False)
    bn.clear_gradients()
    out = bn(xp)
    (out * paddle.to_tensor(g)).sum().backward()
    return {"out": out.numpy(), "x": xp.grad.numpy(), "weight": bn.weight.grad.numpy(),
            "bias": bn.bias.grad.numpy(), "mean": bn._mean.numpy(), "var": bn._variance.numpy()}


def _batch(seed: int, shape=(4, C, 5, 6)):
    """Input (scaled and shifted per image, so that sub-batch statistics differ from the full batch) and gradient."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, 3.0, shape) + np.arange(shape[0]).reshape(-1, 1, 1, 1) * 1.5
    return x, rng.normal(0.0, 1.0, shape)


def _compare_single_process():
    state = _state(0)
    tb, pb = _torch_bn(state), _paddle_bn(state)
    for step in range(2):
        x, g = _batch(10 + step)
        want, got = _torch_step(tb, x, g), _paddle_step(pb, x, g)
        for key in want:
            np.testing.assert_allclose(got[key], want[key], err_msg=f"step {step}: {key}", **TOL)
    assert pb._mean.dtype == paddle.float64 and pb._variance.dtype == paddle.float64


def test_world_size_1_matches_torch_batchnorm():
    _compare_single_process()


def test_eval_mode_uses_running_stats():
    state = _state(1)
    tb, pb = _torch_bn(state).eval(), _paddle_bn(state)
    pb.eval()
    x, _ = _batch(2)
    import torch

    np.testing.assert_allclose(pb(paddle.to_tensor(x)).numpy(), tb(torch.from_numpy(x)).detach().numpy(), **TOL)
    np.testing.assert_array_equal(pb._mean.numpy(), state["mean"])  # eval never touches the running stats


# --- simulated ranks ---------------------------------------------------------------------------------------------

class _SimulatedAllReduce:
    """The all-reduce of ONE simulated rank. Its k-th call (0: forward stats, 1: backward gradient) records the
    argument (this rank's contribution) and returns it plus `extras[k]` (the sum of the other ranks' k-th
    contributions, recorded in an earlier round), or unchanged where `extras[k]` is None."""

    def __init__(self, extras=()):
        self.extras = list(extras)
        self.seen = []

    def __call__(self, t):
        k = len(self.seen)
        self.seen.append(t.detach().clone())
        extra = self.extras[k] if k < len(self.extras) else None
        return t if extra is None else t + extra


def _others(contribs, r):
    return sum(c for q, c in enumerate(contribs) if q != r)


def _run_ranks(state, xs, gs, backward_reduce=True):
    """One training step of R simulated ranks, each on its own copy of the layer, returning each rank's results.

    Round 1 records each rank's local stats; round 2 runs forward with the global stats and records the gradient
    each rank's loss sends to the global sums; round 3 (the real step) adds the other ranks' contributions in both
    forward and (if `backward_reduce`) backward: exactly what a lockstep all-reduce would return."""
    R = len(xs)
    local = []
    for r in range(R):
        red = _SimulatedAllReduce()
        with paddle.no_grad():
            _paddle_bn(state, red)(paddle.to_tensor(xs[r]))
        local.append(red.seen[0])
    grads = []
    for r in range(R):
        red = _SimulatedAllReduce([_others(local, r)])
        _paddle_step(_paddle_bn(state, red), xs[r], gs[r])
        grads.append(red.seen[1])
    results = []
    for r in range(R):
        red = _SimulatedAllReduce([_others(local, r), _others(grads, r) if backward_reduce else None])
        results.append(_paddle_step(_paddle_bn(state, red), xs[r], gs[r]))
    return results


def test_simulated_two_ranks_match_torch_full_batch():
    state = _state(3)
    x, g = _batch(4)
    want = _torch_step(_torch_bn(state), x, g)
    ranks = _run_ranks(state, [x[:2], x[2:]], [g[:2], g[2:]])
    for r, res in enumerate(ranks):
        sl = slice(2 * r, 2 * r + 2)
        np.testing.assert_allclose(res["out"], want["out"][sl], err_msg=f"rank {r} output", **TOL)
        np.testing.assert_allclose(res["x"], want["x"][sl], err_msg=f"rank {r} input grad", **TOL)
        # Every rank ends the step with the same (global) running statistics: torch's full-batch update.
        np.testing.assert_allclose(res["mean"], want["mean"], err_msg=f"rank {r} running mean", **TOL)
        np.testing.assert_allclose(res["var"], want["var"], err_msg=f"rank {r} running var", **TOL)
    # Data parallelism sums the parameter gradients over ranks.
    for key in ("weight", "bias"):
        np.testing.assert_allclose(sum(res[key] for res in ranks), want[key], err_msg=key, **TOL)

    # The test can fail: Paddle's stock rule (biased global variance) gives a clearly different running variance,
    # and so does normalising one rank with its own statistics only.
    biased = (1 - MOMENTUM) * state["var"] + MOMENTUM * x.var(axis=(0, 2, 3))
    assert np.min(np.abs(biased - want["var"]) / want["var"]) > 1e-3
    local_only = (x[:2] - x[:2].mean(axis=(0, 2, 3), keepdims=True)) / np.sqrt(
        x[:2].var(axis=(0, 2, 3), keepdims=True) + 1e-5)
    local_only = local_only * state["weight"].reshape(1, C, 1, 1) + state["bias"].reshape(1, C, 1, 1)
    assert np.max(np.abs(local_only - want["out"][:2])) > 1e-2


def test_input_gradient_needs_the_backward_all_reduce():
    state = _state(5)
    x, g = _batch(6)
    want = _torch_step(_torch_bn(state), x, g)
    ranks = _run_ranks(state, [x[:2], x[2:]], [g[:2], g[2:]], backward_reduce=False)
    for r, res in enumerate(ranks):
        sl = slice(2 * r, 2 * r + 2)
        np.testing.assert_allclose(res["out"], want["out"][sl], **TOL)  # the forward is unaffected
        assert np.max(np.abs(res["x"] - want["x"][sl])) > 1e-3 * np.max(np.abs(want["x"])), r
    # The parameter gradients do not go through the statistics, so they still sum to torch's.
    for key in ("weight", "bias"):
        np.testing.assert_allclose(sum(res[key] for res in ranks), want[key], **TOL)


# --- conversion --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_convert_sync_batchnorm(dtype):
    paddle.seed(0)
    model = paddle.nn.Sequential(
        Conv2d(2, C, 3, padding=1), BatchNorm2d(C), paddle.nn.ReLU(),
        paddle.nn.Sequential(Conv2d(C, 4, 1), BatchNorm2d(4, momentum=0.3, eps=1e-3)),
    )
    model.to(dtype=dtype)
    rng = np.random.default_rng(7)
    for name, t in model.state_dict().items():
        if "weight" in name or "bias" in name or "_mean" in name or "_variance" in name:
            t.set_value(paddle.to_tensor(rng.uniform(0.5, 1.5, t.shape).astype(dtype)))
    model.eval()
    x = paddle.to_tensor(rng.normal(size=(2, 2, 4, 5)).astype(dtype))
    before = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    out_before = model(x).numpy()
    old = [m for m in model.sublayers() if isinstance(m, BatchNorm2d)]

    assert convert_sync_batchnorm(model) is model
    new = [m for m in model.sublayers() if isinstance(m, BatchNorm2d)]
    assert len(new) == 2 and all(type(m) is SyncBatchNorm2d for m in new)
    assert [(m.num_features, m.momentum, m.eps) for m in new] == [(m.num_features, m.momentum, m.eps) for m in old]
    after = model.state_dict()
    assert list(after) == list(before)
    for k, v in after.items():
        assert v.dtype == paddle.to_tensor(before[k]).dtype, k
        np.testing.assert_array_equal(v.numpy(), before[k], err_msg=k)
    np.testing.assert_array_equal(model(x).numpy(), out_before)
    assert all(not m.training for m in new)

    # Copies, not shared tensors; a second conversion leaves the synchronised layers alone.
    assert new[0].weight is not old[0].weight
    convert_sync_batchnorm(model)
    assert [m for m in model.sublayers() if isinstance(m, BatchNorm2d)] == new
    assert type(convert_sync_batchnorm(BatchNorm2d(C))) is SyncBatchNorm2d


# --- GPU ---------------------------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_world_size_1_matches_torch_batchnorm_on_gpu():
    if not (paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0):
        pytest.skip(f"no CUDA device visible to Paddle {paddle.__version__} "
                    f"(compiled with CUDA: {paddle.device.is_compiled_with_cuda()})")
    previous = paddle.device.get_device()
    paddle.device.set_device("gpu:0")
    try:
        _compare_single_process()  # torch stays on the CPU as the reference
    finally:
        paddle.device.set_device(previous)
