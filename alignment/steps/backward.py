"""Step `backward`: N training iterations of the RECIPE on both sides, compared after every iteration.

The recipe is the one `segtwin train` runs: the config given with `--config`, else the model's official recipe config
(spec `recipe`). The Paddle side builds its optimizer, lr schedule and loss with the very `Config` methods the
trainer calls; the torch side with their twins in torch_ref (`optim.py`, `schedule.py`, `losses.py`) from the same
config sections.

Compared before the first iteration: the membership of every parameter group (`groups/<group>`: 1 where a parameter
of the torch model's order belongs to the group). Per iteration i: the lr of every group (`iter<i>/lr/<group>`),
every loss term, the gradient of EVERY parameter, every parameter after the optimizer step, every optimizer state
tensor (`momentum`; Adam's `exp_avg`, `exp_avg_sq`, `step`, `beta1_pow`, `beta2_pow`) and every BN running
statistic. After the last iteration the eval-mode logits are compared too (that is where a wrong BN running-variance
update shows: ~1e-2). Train mode with dropout p=0.

Lockstep (default, `ctx.lockstep`): after the comparisons of iteration i the Paddle side is reset to torch's state
(parameters, BN buffers, optimizer state), so iteration i+1 starts from identical states -- PaDiff's "single step"
idea applied to optimisation. Without it, float64 rounding differences compound from iteration to iteration on random
weights (measured loss rel. diff 3e-14 -> 1.4e-10 -> 2.5e-9 at head lr 0.1), which is the training dynamics'
sensitivity, not a port error. `--free-run` turns lockstep off.

Dtype: float64 on both sides by default (`train_dtype`). Measured on PSPNet-R50 with random weights at 2x3x65x65:
torch float32 gradients themselves differ from torch float64 by up to 2.4e-2 (relative to the tensor's max) at
layer0, so a float32 comparison cannot tell a port bug from rounding; in float64 the twins agree to ~1e-8 relative.
Known float64 floor: Paddle passes Momentum's/AdamW's weight-decay coefficient to its kernels as a float32 attribute
(0.1 -> 0.10000000149), a parameter difference of lr * wd * 1.5e-8 * |p| per step.
"""
from __future__ import annotations

import numpy as np

import paddle_impl.optim as poptim
import torch_ref.optim as toptim

from weights_convert.keymap import get_keymap

from ..context import Context, StepResult
from .common import as_tuple, record, sampled_forward, train_outputs, train_setup


def _to_numpy(v):
    return v.detach().cpu().numpy() if hasattr(v, "detach") and hasattr(v, "cpu") else np.asarray(v.numpy())


def _sync(tm, pm, popt, t_state, to_paddle) -> None:
    """Lockstep: start the next iteration of the Paddle side from torch's exact state (parameters, BN buffers,
    optimizer state), so each iteration tests one step's math and rounding does not compound."""
    import paddle

    p_params = dict(pm.named_parameters())
    p_buffers = dict(pm.named_buffers())
    for name, p in tm.named_parameters():
        p_params[name].set_value(paddle.to_tensor(p.detach().numpy()))
    for name, b in tm.named_buffers():
        pk = to_paddle(name)
        if pk is not None:
            p_buffers[pk].set_value(paddle.to_tensor(b.numpy()))
    poptim.load_optimizer_state(popt, pm, {s: {n: _to_numpy(v) for n, v in vals.items()}
                                           for s, vals in t_state.items()})


def check_groups(ctx: Context, res: StepResult, tm, pm, topt, popt) -> bool:
    """Compare the parameter groups of the two optimizers (names, then members). False when the names differ."""
    t_names, p_names = toptim.group_names(topt), poptim.group_names(popt)
    if t_names != p_names:
        res.error = f"parameter groups differ: Paddle {p_names}, torch {t_names}"
        return False
    order = [n for n, _ in tm.named_parameters()]
    t_members = _members(tm, topt, toptim)
    p_members = _members(pm, popt, poptim)
    for g, name in enumerate(t_names):
        a = np.array([n in p_members[g] for n in order], dtype=np.float64)
        b = np.array([n in t_members[g] for n in order], dtype=np.float64)
        record(ctx, res, f"groups/{name}", a, b)
        moved = [n for n in order if (n in p_members[g]) != (n in t_members[g])]
        if moved:
            res.notes.append(f"parameter group {name!r}: {len(moved)} parameter(s) differ in membership, e.g. "
                             + ", ".join(moved[:4]) + (" (Paddle has them, torch not)" if moved[0] in p_members[g]
                                                       else " (torch has them, Paddle not)"))
    return True


def _members(model, opt, mod) -> list:
    """[set of parameter names] per group of `opt` (names from `model`)."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    return [{by_id[id(p)] for p in g["params"]} for g in mod.L.param_groups_of(opt)]


def _rel(a, b) -> float:
    """|a - b| / |b| of two scalars or, for dicts of arrays, the global L2 relative difference."""
    if isinstance(b, dict):
        num = sum(float(np.sum((np.asarray(a[k], np.float64) - np.asarray(b[k], np.float64)) ** 2)) for k in b)
        den = sum(float(np.sum(np.asarray(b[k], np.float64) ** 2)) for k in b)
        return (num / den) ** 0.5 if den else num ** 0.5
    return abs(float(a) - float(b)) / abs(float(b)) if float(b) else abs(float(a))


def growth_factor(series) -> float:
    """Per-iteration growth factor of a divergence curve during its GROWTH phase: exp of the least-squares slope of
    log(d) over the iterations up to the first one where d reaches half its maximum (a divergence saturates once the
    two runs have separated, and a fit over the plateau would report ~1); 1.0 with fewer than 2 points."""
    series = list(series)
    peak = max(series) if series else 0.0
    end = next((i for i, d in enumerate(series) if d >= 0.5 * peak), len(series) - 1)
    pts = [(i, np.log(d)) for i, d in enumerate(series[:end + 1]) if d > 0]
    if len(pts) < 2:
        return 1.0
    x, y = np.array(pts).T
    return float(np.exp(np.polyfit(x, y, 1)[0]))


def free_run(ctx: Context, res: StepResult) -> StepResult:
    """`--free-run`: N free iterations on both sides and, as the reference for what float rounding alone does,
    torch in float32 against torch in float64 (same recipe, batch and initial weights). Per iteration: the relative
    difference of every loss term and the global relative difference of the parameters, for the twins (Paddle vs
    torch, both in the training dtype) and for the reference. Iteration 0 starts from identical states, so its
    keys are compared under the policy as in lockstep mode; after that the states legitimately drift, and the step
    compares the twins' final parameter divergence with the reference's (`free_run/param_divergence`, atol = the
    reference's): rounding-like growth stays below float32's own."""
    tm, pm, (xt, yt), (xp, yp) = train_setup(ctx)
    t32, _ = ctx.models("float32")
    from ..context import disable_dropout
    disable_dropout(t32)
    t32.train()
    x32 = ctx.torch_inputs("float32")[0]
    rc = ctx.recipe
    sides = {"torch": (tm, rc.torch_optimizer(tm), xt), "torch32": (t32, rc.torch_optimizer(t32), x32)}
    popt = rc.paddle_optimizer(pm)
    tsched, psched = rc.torch_schedule(), rc.paddle_schedule()
    tloss, ploss = rc.torch_loss(), rc.paddle_loss()
    p_params = dict(pm.named_parameters())
    series = {"iteration": [], "loss": {"torch": [], "paddle": [], "torch32": []}, "twin": {"param": []},
              "reference": {"param": []}}
    for it in range(ctx.iters):
        lr = tsched.lr_at(it)
        poptim.set_lr(popt, psched.lr_at(it))
        losses = {}
        chosen = None
        for side, (model, opt, x) in sides.items():
            toptim.set_lr(opt, lr)
            outputs, chosen = sampled_forward(ctx, model, x, it, "torch", chosen)
            out = tloss(outputs, yt)
            losses[side] = {k: float(v.detach()) for k, v in out.items()}
            out["loss"].backward()
            toptim.step(opt)
        loss_p = ploss(sampled_forward(ctx, pm, xp, it, "paddle", chosen)[0], yp)
        losses["paddle"] = {k: float(v.detach()) for k, v in loss_p.items()}
        series["iteration"].append(it)
        for side in ("torch", "paddle", "torch32"):
            series["loss"][side].append(losses[side]["loss"])
        for term in losses["torch"]:
            series["twin"].setdefault(f"loss/{term}", []).append(_rel(losses["paddle"][term], losses["torch"][term]))
            series["reference"].setdefault(f"loss/{term}", []).append(
                _rel(losses["torch32"][term], losses["torch"][term]))
        if it == 0:
            for term in losses["torch"]:
                record(ctx, res, f"iter0/loss/{term}", np.float64(losses["paddle"][term]),
                       np.float64(losses["torch"][term]))
        loss_p["loss"].backward()
        poptim.step(popt)
        t_params = {n: p.detach().numpy().copy() for n, p in tm.named_parameters()}
        series["twin"]["param"].append(_rel({n: p_params[n].numpy() for n in t_params}, t_params))
        series["reference"]["param"].append(
            _rel({n: p.detach().double().numpy() for n, p in t32.named_parameters()}, t_params))
        if it == 0:
            for name, value in t_params.items():
                record(ctx, res, f"iter0/param/{name}", p_params[name].numpy(), value)
    twin_g, ref_g = growth_factor(series["twin"]["param"]), growth_factor(series["reference"]["param"])
    series["growth"] = {"twin": twin_g, "reference": ref_g}
    final_twin, final_ref = series["twin"]["param"][-1], series["reference"]["param"][-1]
    res.results.append(_divergence_result(final_twin, final_ref))
    res.series = series
    verdict = "stays below" if final_twin <= final_ref else "EXCEEDS"
    res.notes.append(f"free run, {ctx.iters} iterations: parameter divergence Paddle vs torch ({ctx.train_dtype}) "
                     f"{series['twin']['param'][0]:.3g} -> {final_twin:.3g} (x{twin_g:.3g} per iteration); "
                     f"reference torch float32 vs float64 {series['reference']['param'][0]:.3g} -> {final_ref:.3g} "
                     f"(x{ref_g:.3g} per iteration): the twins' divergence {verdict} torch's own float32 rounding")
    return res


def reference_floor(tm, xt, out_t) -> float:
    """How far the torch reference's eval output at its CURRENT state moves against itself: the same weights and
    input evaluated by a channels_last copy (other convolution kernels, other accumulation order), and by the model
    and that copy at another thread count (1, or 2 when running on 1); the largest of the three differences. One
    perturbation alone is a noisy estimate (measured on PSA(s) OCRNet: channels_last 8.1e5 where the twins differ by
    1.6e6 at the same state, threads 2.0e6). A network state whose eval output the reference cannot reproduce to the
    policy's tolerance cannot be compared to it either; the policy's `floor` factor makes this the tolerance's lower
    bound."""
    import copy

    import torch

    twin = copy.deepcopy(tm).to(memory_format=torch.channels_last)
    x_cl = xt.contiguous(memory_format=torch.channels_last)
    threads = torch.get_num_threads()
    outs = []
    with torch.no_grad():
        outs.append(as_tuple(twin(x_cl))[0])
        try:
            torch.set_num_threads(2 if threads == 1 else 1)
            outs.append(as_tuple(tm(xt))[0])
            outs.append(as_tuple(twin(x_cl))[0])
        finally:
            torch.set_num_threads(threads)
    return max(float((o - out_t).abs().max()) for o in outs)


def _divergence_result(final_twin: float, final_ref: float):
    from ..compare import compare
    return compare(np.float64(final_twin), np.float64(0.0), key="free_run/param_divergence", rtol=0.0,
                   atol=float(final_ref), reason="free run: the twins' final parameter divergence must stay below "
                   "torch float32 vs float64 over the same iterations")


def run(ctx: Context) -> StepResult:
    import paddle
    import torch

    res = StepResult("backward", dtype=ctx.train_dtype)
    if not ctx.lockstep:
        return free_run(ctx, res)
    tm, pm, (xt, yt), (xp, yp) = train_setup(ctx)
    rc = ctx.recipe
    topt, popt = rc.torch_optimizer(tm), rc.paddle_optimizer(pm)
    tsched, psched = rc.torch_schedule(), rc.paddle_schedule()
    tloss, ploss = rc.torch_loss(), rc.paddle_loss()
    if not check_groups(ctx, res, tm, pm, topt, popt):
        return res
    groups = toptim.group_names(topt)
    to_paddle = get_keymap(ctx.name).to_paddle  # the converter's key map (BN renames, the spec's key_renames)
    p_params = dict(pm.named_parameters())
    p_buffers = dict(pm.named_buffers())
    curves = {"torch": [], "paddle": [], "lr": []}
    for it in range(ctx.iters):
        toptim.set_lr(topt, tsched.lr_at(it))
        poptim.set_lr(popt, psched.lr_at(it))
        for g, a, b in zip(groups, poptim.current_lrs(popt), toptim.current_lrs(topt)):
            record(ctx, res, f"iter{it}/lr/{g}", np.float64(a), np.float64(b))
        out_t, out_p = train_outputs(ctx, tm, pm, xt, xp, it)
        loss_t = tloss(out_t, yt)
        loss_p = ploss(out_p, yp)
        for term in loss_t:
            record(ctx, res, f"iter{it}/loss/{term}", loss_p[term].detach(), loss_t[term].detach())
        curves["torch"].append(float(loss_t["loss"].detach()))
        curves["paddle"].append(float(loss_p["loss"].detach()))
        curves["lr"].append(tsched.lr_at(it))
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
            pk = to_paddle(name)
            if pk is not None:
                record(ctx, res, f"iter{it}/buffer/{name}", p_buffers[pk], b)
        t_state = toptim.optimizer_state(topt, tm)
        p_state = poptim.optimizer_state(popt, pm)
        for sname, values in t_state.items():
            for name, value in values.items():
                if name not in p_state.get(sname, {}):
                    res.error = f"iteration {it}: the Paddle optimizer has no {sname} state for {name}"
                    return res
                record(ctx, res, f"iter{it}/{sname}/{name}", p_state[sname][name], value)
        if ctx.lockstep and it < ctx.iters - 1:  # not after the last: eval_logits_after must see its update
            _sync(tm, pm, popt, t_state, to_paddle)
    tm.eval()
    pm.eval()
    with torch.no_grad():
        out_t = as_tuple(tm(xt))[0]
    with paddle.no_grad():
        out_p = as_tuple(pm(xp))[0]
    floor = None
    if ctx.policy.lookup(ctx.name, "backward", "eval_logits_after", ctx.train_dtype).floor is not None:
        floor = reference_floor(tm, xt, out_t)
        res.notes.append(f"eval_logits_after: torch's own eval logits at the final state move by {floor:.3g} "
                         f"between memory formats and thread counts (|logits| up to "
                         f"{float(out_t.abs().max()):.3g}); the policy's floor factor applies to it")
    record(ctx, res, "eval_logits_after", out_p, out_t, floor=floor)
    res.series = curves
    res.notes.append(f"recipe {rc.source}: {rc.resolved['optimizer']['type']}, lr schedule "
                     f"{rc.resolved['lr_scheduler']['type']}, loss "
                     + ", ".join(f"{t['coef']:g} x {t['type']}" for t in rc.resolved["loss"]))
    res.notes.append(f"computed in {ctx.train_dtype} on both sides, {ctx.iters} iterations")
    return res
