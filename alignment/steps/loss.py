"""Step `loss`: the recipe's training loss (every term, its coefficient, its ignore_index) on the same batch.

The loss is the config's `loss:` section (`segtwin align --config`), else the model's official recipe; the Paddle
side is built by `Config.build_loss` (what `segtwin train` calls), the torch side by `torch_ref.losses.build_loss`.
Computed in the run's training dtype (float64 by default, see `backward`). Train mode (the aux heads only run in
training) with every dropout set to p=0 on both sides, from the same initial state. Outputs are compared first,
then each loss term: if the outputs agree and a term does not, the fault is in the loss itself.
"""
from __future__ import annotations

from ..context import Context, StepResult
from .common import record, train_outputs, train_setup


def run(ctx: Context) -> StepResult:
    res = StepResult("loss", dtype=ctx.train_dtype)
    tm, pm, (xt, yt), (xp, yp) = train_setup(ctx)
    out_t, out_p = train_outputs(ctx, tm, pm, xt, xp)
    terms = [t["name"] for t in ctx.recipe.resolved["loss"]]
    for term, a, b in zip(terms, out_p, out_t):
        record(ctx, res, f"output/{term}", a.detach(), b.detach())
    loss_t = ctx.recipe.torch_loss()(out_t, yt)
    loss_p = ctx.recipe.paddle_loss()(out_p, yp)
    for term in terms + ["loss"]:
        record(ctx, res, f"loss/{term}", loss_p[term].detach(), loss_t[term].detach())
    out_ok = all(r.passed for r in res.results if r.key.startswith("output/"))
    if out_ok and not res.passed:
        bad = [r.key for r in res.results if not r.passed]
        res.notes.append(f"outputs agree but loss terms differ ({', '.join(bad)}): the loss function diverges")
    res.notes.append(f"loss of {ctx.recipe.source}: " + ", ".join(
        f"{t['name']} = {t['coef']:g} x {t['type']}" for t in ctx.recipe.resolved["loss"]))
    res.notes.append(f"computed in {ctx.train_dtype} on both sides")
    return res
