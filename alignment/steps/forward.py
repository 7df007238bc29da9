"""Step `forward`: eval mode, the same batch through both twins, logits compared elementwise.

A model with a discontinuous selection in its eval forward (PointRend: each subdivision step refines the top-k most
uncertain cells) is compared stage by stage through its `stages(x, indices)`: the coarse logits strictly; each
subdivision step with the Paddle side given the torch side's cell indices, so the refinement itself is compared
exactly; and, apart, `selection/stepK` = how many cells the Paddle side would have chosen differently on its own
(uncertainties that agree to rounding can swap cells at the k-th place), with its own measured tolerance in
tolerances.yaml -- never a loosened logits tolerance.
"""
from __future__ import annotations

import numpy as np

from ..context import Context, StepResult
from .common import eval_outputs, eval_setup, record


def run(ctx: Context) -> StepResult:
    res = StepResult("forward", dtype="float32")
    if hasattr(ctx.torch_model, "stages"):
        return _staged(ctx, res)
    out_t, out_p = eval_outputs(ctx)
    if len(out_t) != len(out_p):
        res.error = f"torch returned {len(out_t)} outputs in eval mode, Paddle {len(out_p)}"
        return res
    for i, (a, b) in enumerate(zip(out_p, out_t)):
        record(ctx, res, "logits" if i == 0 else f"logits_{i}", a, b)
    return res


def differing_cells(own, given) -> int:
    """Cells chosen in `own` (N, k) but not in `given` (N, k), summed over the images."""
    return int(sum(len(set(a.tolist()) - set(b.tolist())) for a, b in zip(np.asarray(own), np.asarray(given))))


def _staged(ctx: Context, res: StepResult) -> StepResult:
    import paddle
    import torch

    from ..compare import to_numpy

    tm, pm, xt, xp = eval_setup(ctx)
    with torch.no_grad():
        st_t = tm.stages(xt)
    given = [to_numpy(i) for i in st_t["indices"]]
    with paddle.no_grad():
        st_p = pm.stages(xp, [paddle.to_tensor(i) for i in given])
        own = pm.stages(xp)["indices"]
    record(ctx, res, "coarse", st_p["coarse"], st_t["coarse"])
    steps = len(given)
    for k in range(steps):
        record(ctx, res, f"step{k + 1}", st_p[f"step{k + 1}"], st_t[f"step{k + 1}"])
        n_diff = differing_cells(to_numpy(own[k]), given[k])
        record(ctx, res, f"selection/step{k + 1}", np.float64(n_diff), np.float64(0))
        res.notes.append(f"subdivision step {k + 1}: {given[k].shape[1]} cells per image refined; the Paddle side "
                         f"would choose {n_diff} of the {given[k].size} differently on its own (compared with the "
                         f"torch selection given)")
    with torch.no_grad():
        final_t = tm(xt)
    record(ctx, res, "logits", st_p[f"step{steps}"] if steps else st_p["coarse"], final_t)
    return res
