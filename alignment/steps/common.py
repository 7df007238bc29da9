"""Helpers shared by the steps: recording a value on both sides and comparing it."""
from __future__ import annotations

import numpy as np

from ..compare import to_numpy
from ..context import Context, StepResult, artifact_value


def record(ctx: Context, res: StepResult, key: str, paddle_value, torch_value, floor=None) -> None:
    """Compare `key` (Paddle = actual, torch = expected) on every element and log both sides for the artifacts
    (large arrays as a strided sample unless `ctx.full_artifacts`, see `context.artifact_value`). `floor`: torch's
    own measured variation on this quantity (see `alignment.policy`, override field `floor`)."""
    a = np.asarray(to_numpy(paddle_value))
    b = np.asarray(to_numpy(torch_value))
    res.results.append(ctx.compare(res.step, key, a, b, floor=floor))
    res.paddle_log[key] = artifact_value(a, ctx.full_artifacts, res.step)
    res.torch_log[key] = artifact_value(b, ctx.full_artifacts, res.step)


def as_tuple(outputs):
    return tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)


def eval_setup(ctx: Context):
    """Both twins in eval mode, float32, initial state, with the shared batch -> (tm, pm, xt, xp)."""
    tm, pm = ctx.models("float32")
    tm.eval()
    pm.eval()
    return tm, pm, ctx.torch_inputs()[0], ctx.paddle_inputs()[0]


def eval_outputs(ctx: Context):
    """Both twins in eval mode (float32, initial state) on the shared batch -> (torch outputs, paddle outputs)."""
    import paddle
    import torch

    tm, pm, xt, xp = eval_setup(ctx)
    with torch.no_grad():
        out_t = as_tuple(tm(xt))
    with paddle.no_grad():
        out_p = as_tuple(pm(xp))
    return out_t, out_p


def _shared_uniform(seed: int, it: int, dtype: str, framework: str):
    """`rand(shape)` for a model's training point sampler: uniform [0, 1) numbers from numpy, seeded by (seed, it),
    as a tensor of `framework` in `dtype`. Two of these with the same arguments give both twins the same numbers."""
    rng = np.random.default_rng([int(seed), int(it), 20261205])

    def rand(shape):
        values = rng.random(tuple(int(s) for s in shape)).astype(dtype)
        if framework == "torch":
            import torch
            return torch.from_numpy(values)
        import paddle
        return paddle.to_tensor(values)
    return rand


def sampled_forward(ctx: Context, model, x, it: int, framework: str, chosen=None):
    """(training outputs as a tuple, the model's point selection as numpy or None) of one twin; for a point-sampling
    model with the shared uniform numbers of iteration `it` and, when given, another run's selection `chosen`."""
    from ..specs import get_spec

    if not get_spec(ctx.name).point_sampling:
        return as_tuple(model(x)), None
    dtype = str(x.dtype).replace("torch.", "").replace("paddle.", "")
    kwargs = {"rand": _shared_uniform(ctx.seed, it, dtype, framework)}
    if chosen is not None:
        if framework == "torch":
            import torch
            kwargs["chosen"] = torch.from_numpy(chosen)
        else:
            import paddle
            kwargs["chosen"] = paddle.to_tensor(chosen)
    out = as_tuple(model(x, **kwargs))
    return out, np.asarray(to_numpy(model.sampled["chosen"]))


def train_outputs(ctx: Context, tm, pm, xt, xp, it: int = 0):
    """Training-mode outputs of both twins -> (torch outputs, paddle outputs), as tuples.

    A model whose training forward samples points (spec `point_sampling`: PointRend) gets the SAME uniform numbers
    on both sides (numpy, seeded by the run's seed and `it`), and the Paddle side the torch side's top-k selection of
    them (`chosen`): the uncertainties the top-k ranks agree only to rounding, so each framework choosing for itself
    could swap points at the k-th place and the comparison would be of two samples, not of two implementations."""
    out_t, chosen = sampled_forward(ctx, tm, xt, it, "torch")
    out_p, _ = sampled_forward(ctx, pm, xp, it, "paddle", chosen)
    return out_t, out_p


def train_setup(ctx: Context):
    """Both twins in train mode, dropout p=0, initial state, in the run's training dtype, with the batch.
    Returns (tm, pm, (xt, yt), (xp, yp))."""
    from ..context import disable_dropout

    tm, pm = ctx.models(ctx.train_dtype)
    disable_dropout(tm)
    disable_dropout(pm)
    tm.train()
    pm.train()
    return tm, pm, ctx.torch_inputs(ctx.train_dtype), ctx.paddle_inputs(ctx.train_dtype)
