"""Step `forward`: eval mode, the same batch through both twins, logits compared elementwise."""
from __future__ import annotations

from ..context import Context, StepResult
from .common import eval_outputs, record


def run(ctx: Context) -> StepResult:
    res = StepResult("forward", dtype="float32")
    out_t, out_p = eval_outputs(ctx)
    if len(out_t) != len(out_p):
        res.error = f"torch returned {len(out_t)} outputs in eval mode, Paddle {len(out_p)}"
        return res
    for i, (a, b) in enumerate(zip(out_p, out_t)):
        record(ctx, res, "logits" if i == 0 else f"logits_{i}", a, b)
    return res
