"""Helpers shared by the steps: recording a value on both sides and comparing it."""
from __future__ import annotations

import numpy as np

from ..compare import to_numpy
from ..context import Context, StepResult, artifact_value


def record(ctx: Context, res: StepResult, key: str, paddle_value, torch_value) -> None:
    """Compare `key` (Paddle = actual, torch = expected) on every element and log both sides for the artifacts
    (large arrays as a strided sample unless `ctx.full_artifacts`, see `context.artifact_value`)."""
    a = np.asarray(to_numpy(paddle_value))
    b = np.asarray(to_numpy(torch_value))
    res.results.append(ctx.compare(res.step, key, a, b))
    res.paddle_log[key] = artifact_value(a, ctx.full_artifacts, res.step)
    res.torch_log[key] = artifact_value(b, ctx.full_artifacts, res.step)


def as_tuple(outputs):
    return tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)


def eval_outputs(ctx: Context):
    """Both twins in eval mode (float32, initial state) on the shared batch -> (torch outputs, paddle outputs)."""
    import paddle
    import torch

    tm, pm = ctx.models("float32")
    tm.eval()
    pm.eval()
    xt, _ = ctx.torch_inputs()
    xp, _ = ctx.paddle_inputs()
    with torch.no_grad():
        out_t = as_tuple(tm(xt))
    with paddle.no_grad():
        out_p = as_tuple(pm(xp))
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
