"""Helpers shared by the steps: recording a value on both sides and comparing it."""
from __future__ import annotations

import numpy as np

from ..compare import to_numpy
from ..context import Context, StepResult


def record(ctx: Context, res: StepResult, key: str, paddle_value, torch_value) -> None:
    """Log `key` on both sides and compare it (Paddle = actual, torch = expected)."""
    a = np.asarray(to_numpy(paddle_value))
    b = np.asarray(to_numpy(torch_value))
    res.paddle_log[key] = a
    res.torch_log[key] = b
    res.results.append(ctx.compare(res.step, key, a, b))


def as_tuple(outputs):
    return tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)
