"""Step `loss`: the model's real training loss (all terms, their weights, ignore_index) on the same batch.

Computed in the run's training dtype (float64 by default, see `backward`). Train mode (the aux heads only run in
training) with every dropout set to p=0 on both sides, from the same initial state. Outputs are compared first,
then each loss term: if the outputs agree and a term does not, the fault is in the loss itself.
"""
from __future__ import annotations

import paddle_impl.losses as plosses
import torch_ref.losses as tlosses

from ..context import Context, StepResult
from ..specs import get_spec
from .common import as_tuple, record, train_setup


def run(ctx: Context) -> StepResult:
    res = StepResult("loss", dtype=ctx.train_dtype)
    tm, pm, (xt, yt), (xp, yp) = train_setup(ctx)
    out_t = as_tuple(tm(xt))
    out_p = as_tuple(pm(xp))
    terms = list(get_spec(ctx.name).loss_term_names)
    for term, a, b in zip(terms, out_p, out_t):
        record(ctx, res, f"output/{term}", a.detach(), b.detach())
    loss_t = tlosses.compute_loss(ctx.name, out_t, yt, ctx.ignore_index)
    loss_p = plosses.compute_loss(ctx.name, out_p, yp, ctx.ignore_index)
    for term in terms + ["loss"]:
        record(ctx, res, f"loss/{term}", loss_p[term].detach(), loss_t[term].detach())
    out_ok = all(r.passed for r in res.results if r.key.startswith("output/"))
    if out_ok and not res.passed:
        bad = [r.key for r in res.results if not r.passed]
        res.notes.append(f"outputs agree but loss terms differ ({', '.join(bad)}): the loss function diverges")
    res.notes.append(f"computed in {ctx.train_dtype} on both sides")
    return res
