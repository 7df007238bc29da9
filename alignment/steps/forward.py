"""Step `forward`: eval mode, the same batch through both twins, logits compared elementwise."""
from __future__ import annotations

from ..context import Context, StepResult
from .common import as_tuple, record


def run(ctx: Context) -> StepResult:
    import paddle
    import torch

    res = StepResult("forward")
    ctx.reset()
    ctx.torch_model.eval()
    ctx.paddle_model.eval()
    xt, _ = ctx.torch_inputs()
    xp, _ = ctx.paddle_inputs()
    with torch.no_grad():
        out_t = as_tuple(ctx.torch_model(xt))
    with paddle.no_grad():
        out_p = as_tuple(ctx.paddle_model(xp))
    if len(out_t) != len(out_p):
        res.error = f"torch returned {len(out_t)} outputs in eval mode, Paddle {len(out_p)}"
        return res
    for i, (a, b) in enumerate(zip(out_p, out_t)):
        record(ctx, res, "logits" if i == 0 else f"logits_{i}", a, b)
    return res
