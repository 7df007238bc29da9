"""Step `schedule`: the lr of every parameter group at EVERY iteration 0 .. iters of the recipe, both sides.

Cheap (no forward pass): both optimizers are built on the float32 models exactly as the backward step builds them,
then for each iteration the scheduled lr is applied with each side's `set_lr` and read back with `current_lrs`.
Compared in float64 (a float32 cast would hide a wrong `end_lr` of 1e-9), so warmup edges, milestones and the last
iterations are covered without running them. Keys: `lr/<group>`, one array of iters + 1 values per group; the worst
index of a failed key is the iteration.
"""
from __future__ import annotations

import numpy as np

import paddle_impl.optim as poptim
import torch_ref.optim as toptim

from ..context import Context, StepResult
from .backward import check_groups
from .common import record


def run(ctx: Context) -> StepResult:
    res = StepResult("schedule", dtype="float64")
    tm, pm = ctx.models("float32")
    rc = ctx.recipe
    topt, popt = rc.torch_optimizer(tm), rc.paddle_optimizer(pm)
    tsched, psched = rc.torch_schedule(), rc.paddle_schedule()
    if not check_groups(ctx, res, tm, pm, topt, popt):
        return res
    n = rc.iters + 1
    t_lr = np.zeros((len(toptim.group_names(topt)), n), dtype=np.float64)
    p_lr = np.zeros_like(t_lr)
    for it in range(n):
        toptim.set_lr(topt, tsched.lr_at(it))
        poptim.set_lr(popt, psched.lr_at(it))
        t_lr[:, it] = toptim.current_lrs(topt)
        p_lr[:, it] = poptim.current_lrs(popt)
    for g, name in enumerate(toptim.group_names(topt)):
        record(ctx, res, f"lr/{name}", p_lr[g], t_lr[g])
    res.series = {"lr_torch": t_lr.tolist(), "lr_paddle": p_lr.tolist(), "groups": toptim.group_names(topt)}
    res.notes.append(f"recipe {rc.source}: {n} iterations (0 .. {rc.iters}) of "
                     f"{rc.resolved['lr_scheduler']['type']} for {len(toptim.group_names(topt))} group(s)")
    return res
