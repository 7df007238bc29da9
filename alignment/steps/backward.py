"""Step `backward`: N training iterations of the paper's recipe on both sides, compared after every iteration.

Per iteration i: loss terms, the lr of every parameter group, the gradient of EVERY parameter, every parameter after
the optimizer step, every momentum buffer, and every BN running statistic. After the last iteration the eval-mode
logits are compared too (that is where a wrong BN running-variance update shows: ~1e-2). Train mode, dropout p=0,
SGD momentum 0.9, weight decay 1e-4, poly lr (power 0.9) per iteration, head lr x10 (semseg).

Lockstep (default, `ctx.lockstep`): after the comparisons of iteration i the Paddle side is reset to torch's state
(parameters, BN buffers, momentum buffers), so iteration i+1 starts from identical states -- PaDiff's "single step"
idea applied to optimisation. Without it, float64 rounding differences after iteration 0 compound quickly from
iteration to iteration on random weights at the recipe's lr (head lr 0.1; measured loss rel. diff 3e-14 -> 1.4e-10
-> 2.5e-9), which is the training dynamics' sensitivity, not a port error. `--free-run` turns lockstep off.

Dtype: float64 on both sides by default (`train_dtype`). Measured on PSPNet-R50 with random weights at 2x3x65x65:
torch float32 gradients themselves differ from torch float64 by up to 2.4e-2 (relative to the tensor's max) at
layer0 -- the training-mode BN of the 1x1 pyramid branch sees only N values per channel and amplifies rounding -- so a
float32 comparison cannot tell a port bug from rounding. In float64 the same comparison agrees to ~1e-8 relative,
and the bugs segtwin must catch (BN momentum, biased running variance, wrong loss axis) show at 1e-3 or more.
"""
from __future__ import annotations

import paddle_impl.losses as plosses
import paddle_impl.optim as poptim
import torch_ref.losses as tlosses
import torch_ref.optim as toptim

from weights_convert.keymap import torch_to_paddle_key

from ..context import BASE_LR, MOMENTUM, WEIGHT_DECAY, Context, StepResult, poly_lr
from .common import as_tuple, record, train_setup


def _sync(tm, pm, topt, popt, t_mom) -> None:
    """Lockstep: start the next iteration of the Paddle side from torch's exact state (parameters, BN buffers,
    momentum), so each iteration tests one step's math and rounding does not compound."""
    import paddle

    p_params = dict(pm.named_parameters())
    p_buffers = dict(pm.named_buffers())
    for name, p in tm.named_parameters():
        p_params[name].set_value(paddle.to_tensor(p.detach().numpy()))
    for name, b in tm.named_buffers():
        pk = torch_to_paddle_key(name)
        if pk is not None:
            p_buffers[pk].set_value(paddle.to_tensor(b.numpy()))
    poptim.load_momentum_buffers(popt, pm, {k: v.numpy() for k, v in t_mom.items()})


def run(ctx: Context) -> StepResult:
    import paddle
    import torch

    res = StepResult("backward", dtype=ctx.train_dtype)
    tm, pm, (xt, yt), (xp, yp) = train_setup(ctx)
    topt = toptim.build_optimizer(tm, BASE_LR, MOMENTUM, WEIGHT_DECAY, ctx.head_prefixes, ctx.head_lr_mult)
    popt = poptim.build_optimizer(pm, BASE_LR, MOMENTUM, WEIGHT_DECAY, ctx.head_prefixes, ctx.head_lr_mult)
    p_params = dict(pm.named_parameters())
    p_buffers = dict(pm.named_buffers())
    curves = {"torch": [], "paddle": [], "lr": []}
    for it in range(ctx.iters):
        lr = poly_lr(BASE_LR, it, ctx.iters)
        toptim.set_lr(topt, lr)
        poptim.set_lr(popt, lr)
        for g, (a, b) in enumerate(zip(poptim.current_lrs(popt), toptim.current_lrs(topt))):
            record(ctx, res, f"iter{it}/lr/group{g}", float(a), float(b))
        loss_t = tlosses.compute_loss(ctx.name, as_tuple(tm(xt)), yt, ctx.ignore_index)
        loss_p = plosses.compute_loss(ctx.name, as_tuple(pm(xp)), yp, ctx.ignore_index)
        for term in loss_t:
            record(ctx, res, f"iter{it}/loss/{term}", loss_p[term].detach(), loss_t[term].detach())
        curves["torch"].append(float(loss_t["loss"].detach()))
        curves["paddle"].append(float(loss_p["loss"].detach()))
        curves["lr"].append(lr)
        loss_t["loss"].backward()
        loss_p["loss"].backward()
        for name, p in tm.named_parameters():
            pp = p_params[name]
            if p.grad is None or pp.grad is None:
                side = "torch" if p.grad is None else "paddle"
                res.error = f"iteration {it}: parameter {name} received no gradient on the {side} side"
                return res
            record(ctx, res, f"iter{it}/grad/{name}", pp.grad, p.grad)
        toptim.step(topt)
        poptim.step(popt)
        for name, p in tm.named_parameters():
            record(ctx, res, f"iter{it}/param/{name}", p_params[name].detach(), p.detach())
        for name, b in tm.named_buffers():
            pk = torch_to_paddle_key(name)
            if pk is not None:
                record(ctx, res, f"iter{it}/buffer/{name}", p_buffers[pk], b)
        t_mom = toptim.momentum_buffers(topt, tm)
        p_mom = poptim.momentum_buffers(popt, pm)
        for name in t_mom:
            if name not in p_mom:
                res.error = f"iteration {it}: Paddle optimizer has no velocity for {name}"
                return res
            record(ctx, res, f"iter{it}/momentum/{name}", p_mom[name], t_mom[name])
        if ctx.lockstep and it < ctx.iters - 1:  # not after the last: eval_logits_after must see its update
            _sync(tm, pm, topt, popt, t_mom)
    tm.eval()
    pm.eval()
    with torch.no_grad():
        out_t = as_tuple(tm(xt))[0]
    with paddle.no_grad():
        out_p = as_tuple(pm(xp))[0]
    record(ctx, res, "eval_logits_after", out_p, out_t)
    res.series = curves
    res.notes.append(f"computed in {ctx.train_dtype} on both sides, {ctx.iters} iterations")
    return res
