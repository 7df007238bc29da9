"""Optimizers of the training recipes (twin: torch_ref/optim.py).

    optimizer = build_optimizer(model, resolve_optimizer(cfg["optimizer"], spec), base_lr, spec.head_prefixes)

SGD with momentum (v = mu*v + g, p -= lr*v), Adam and AdamW, built from a RESOLVED optimizer section
(`alignment.recipe.resolve_optimizer`: every hyper-parameter explicit). Weight decay is torch's: coupled L2 (g + wd*p)
for SGD and Adam, decoupled (p -= lr*wd*p) for AdamW. Parameter groups, in the model's parameter order:

* the head (the spec's `head_prefixes`, e.g. PSPNet's ppm/cls/aux) learns `head_lr_mult` times faster than the rest;
* `norm_decay_mult` scales the weight decay of normalisation-layer parameters, `bias_decay_mult` that of the other
  biases (1: decay everything, as the papers' code does).

The learning-rate SCHEDULE lives in `schedule.py` and is applied with `set_lr`; `optimizer_state` reads every state
tensor under one spelling for both frameworks (`momentum`; `exp_avg`, `exp_avg_sq`, `step`, `beta1_pow`,
`beta2_pow`) so the alignment compares them key by key.
"""
from __future__ import annotations

import math

import paddle

from . import layers as L

#: the state tensors `optimizer_state` reports, per optimizer type
STATE_NAMES = {"sgd": ("momentum",), "adam": ("exp_avg", "exp_avg_sq", "step", "beta1_pow", "beta2_pow"),
               "adamw": ("exp_avg", "exp_avg_sq", "step", "beta1_pow", "beta2_pow")}
# Paddle's accumulator names for the state above (Momentum: velocity; Adam/AdamW: moment1/2 and the bias-correction
# powers, which Paddle keeps ONE step ahead: beta ** (step + 1) after `step` updates)
_ACC = {"momentum": "velocity", "exp_avg": "moment1", "exp_avg_sq": "moment2", "beta1_pow": "beta1_pow_acc",
        "beta2_pow": "beta2_pow_acc"}


def norm_parameter_names(model) -> set:
    """Names of the parameters that belong to normalisation layers (BatchNorm, SyncBatchNorm, GroupNorm, ...)."""
    return {f"{mname}.{pname}" if mname else pname for mname, m in L.named_modules(model)
            if isinstance(m, L.NORM_LAYERS) for pname, _ in L.own_parameters(m)}


def param_groups(model, head_prefixes, head_lr_mult: float, norm_decay_mult: float = 1.0,
                 bias_decay_mult: float = 1.0):
    """[(group_name, [(param_name, param)...], lr_mult, decay_mult)] in the order the groups first appear in the
    model's parameters. Names: `backbone` / `head`, with `/decay_x<mult>` when the weight decay is scaled."""
    norms = norm_parameter_names(model)
    groups = {}
    for name, p in model.named_parameters():
        part = "head" if name.startswith(tuple(head_prefixes)) else "backbone"
        if name in norms:
            decay = float(norm_decay_mult)
        elif name.endswith("bias"):
            decay = float(bias_decay_mult)
        else:
            decay = 1.0
        key = part if decay == 1.0 else f"{part}/decay_x{decay:g}"
        mult = float(head_lr_mult) if part == "head" else 1.0
        groups.setdefault(key, (key, [], mult, decay))[1].append((name, p))
    return list(groups.values())


def build_optimizer(model, opt: dict, base_lr: float, head_prefixes=()):
    """The optimizer of a resolved optimizer section `opt` (see the module doc); lr = `base_lr` times each group's
    multiplier until `set_lr` applies the schedule."""
    groups = param_groups(model, head_prefixes, opt["head_lr_mult"], opt["norm_decay_mult"], opt["bias_decay_mult"])
    kind = opt["type"]
    wd = float(opt["weight_decay"])
    specs = [{"params": [p for _, p in params], "learning_rate": mult, "weight_decay": wd * decay}
             for _, params, mult, decay in groups]
    if kind == "sgd":
        optimizer = paddle.optimizer.Momentum(learning_rate=base_lr, momentum=opt["momentum"], parameters=specs,
                                              weight_decay=wd)
    elif kind == "adam":
        optimizer = paddle.optimizer.Adam(learning_rate=base_lr, beta1=opt["beta1"], beta2=opt["beta2"],
                                          epsilon=opt["epsilon"], parameters=specs, weight_decay=wd)
    elif kind == "adamw":
        optimizer = paddle.optimizer.AdamW(learning_rate=base_lr, beta1=opt["beta1"], beta2=opt["beta2"],
                                           epsilon=opt["epsilon"], parameters=specs, weight_decay=wd)
    else:
        raise ValueError(f"optimizer type {kind!r} has no builder here (sgd, adam, adamw)")
    # A Paddle group's learning_rate MULTIPLIES the optimizer's lr and is not reported back: the multipliers are
    # kept here for current_lrs. Paddle's Momentum/Adam weight_decay (a float) is the coupled L2 term, as torch's.
    optimizer._segtwin = {"type": kind, "groups": [g[0] for g in groups], "lr_mults": [g[2] for g in groups],
                          "grad_clip": opt["grad_clip"], "betas": (opt.get("beta1"), opt.get("beta2"))}
    return optimizer


def group_names(optimizer) -> list:
    return list(optimizer._segtwin["groups"])


def set_lr(optimizer, base_lr: float) -> None:
    """Apply the scheduled base lr; every group keeps its multiplier."""
    optimizer.set_lr(base_lr)


def current_lrs(optimizer) -> list:
    """The lr each group will use at the next step."""
    return [float(optimizer.get_lr()) * m for m in optimizer._segtwin["lr_mults"]]


def all_parameters(optimizer) -> list:
    return [p for g in L.param_groups_of(optimizer) for p in g["params"]]


def clip_gradients(optimizer) -> None:
    """Scale every gradient by clip / max(norm, clip), norm = the global L2 norm over ALL parameters (torch's
    clip_grad_norm_ without its 1e-6 added to the norm). Not Paddle's ClipGradByGlobalNorm: given parameter groups,
    Paddle clips each group by that group's own norm (measured: a 0.07 parameter difference after one SGD step)."""
    clip = optimizer._segtwin["grad_clip"]
    if not clip:
        return
    grads = [p.grad for p in all_parameters(optimizer) if p.grad is not None]
    norm = math.sqrt(sum(float((g * g).sum()) for g in grads))
    scale = clip / max(norm, clip)
    if scale < 1.0:
        for g in grads:
            g.set_value(g * scale)


def step(optimizer) -> None:
    """Clip the gradients (global norm, when the recipe asks), update, clear the gradients."""
    clip_gradients(optimizer)
    optimizer.step()
    optimizer.clear_grad(set_to_zero=False)


def optimizer_state(optimizer, model) -> dict:
    """{state name: {parameter name: tensor}} after at least one step (see the module doc for the names; `beta*_pow`
    is beta ** step, the bias-correction power)."""
    names = {p.name: n for n, p in model.named_parameters()}
    kind = optimizer._segtwin["type"]
    out = {s: {} for s in STATE_NAMES[kind]}
    for g in L.param_groups_of(optimizer):
        for p in g["params"]:
            name = names[p.name]
            if kind == "sgd":
                acc = optimizer._accumulators.get(_ACC["momentum"], {})
                if p.name in acc:
                    out["momentum"][name] = acc[p.name]
                continue
            acc = {s: optimizer._accumulators.get(_ACC[s], {}).get(p.name) for s in _ACC if s != "momentum"}
            if acc["exp_avg"] is None:
                continue
            out["exp_avg"][name] = acc["exp_avg"]
            out["exp_avg_sq"][name] = acc["exp_avg_sq"]
            beta1, beta2 = g.get("beta1", optimizer._beta1), g.get("beta2", optimizer._beta2)
            b1pow = float(acc["beta1_pow"].numpy().reshape([-1])[0]) / beta1
            out["step"][name] = paddle.to_tensor([math.log(b1pow) / math.log(beta1)], dtype="float64")
            out["beta1_pow"][name] = paddle.to_tensor([b1pow], dtype="float64")
            b2pow = float(acc["beta2_pow"].numpy().reshape([-1])[0]) / beta2
            out["beta2_pow"][name] = paddle.to_tensor([b2pow], dtype="float64")
    # copies: the live buffers change at the next step, and a recorded state must not
    out = {s: {n: v.detach().clone() for n, v in d.items()} for s, d in out.items()}
    return out


def load_optimizer_state(optimizer, model, state: dict) -> None:
    """Overwrite the optimizer's state tensors with `state` ({state name: {parameter name: numpy array}}, as
    `optimizer_state` reports it)."""
    params = dict(model.named_parameters())
    betas = dict(zip(("beta1_pow", "beta2_pow"), optimizer._segtwin["betas"]))
    for sname, values in state.items():
        if sname == "step":
            continue
        acc = optimizer._accumulators.get(_ACC[sname], {})
        for name, value in values.items():
            target = acc[params[name].name]
            if sname in betas:  # Paddle keeps the power one step ahead
                value = value * betas[sname]
            target.set_value(paddle.to_tensor(value).astype(target.dtype).reshape(target.shape))
