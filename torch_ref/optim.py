"""Optimizers of the training recipes (twin: paddle_impl/optim.py).

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

import torch

from . import layers as L

#: the state tensors `optimizer_state` reports, per optimizer type
STATE_NAMES = {"sgd": ("momentum",), "adam": ("exp_avg", "exp_avg_sq", "step", "beta1_pow", "beta2_pow"),
               "adamw": ("exp_avg", "exp_avg_sq", "step", "beta1_pow", "beta2_pow")}


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
    specs = [{"params": [p for _, p in params], "lr": base_lr * mult, "lr_mult": mult, "weight_decay": wd * decay}
             for _, params, mult, decay in groups]
    if kind == "sgd":
        optimizer = torch.optim.SGD(specs, lr=base_lr, momentum=opt["momentum"], weight_decay=wd)
    elif kind == "adam":
        optimizer = torch.optim.Adam(specs, lr=base_lr, betas=(opt["beta1"], opt["beta2"]), eps=opt["epsilon"],
                                     weight_decay=wd)
    elif kind == "adamw":
        optimizer = torch.optim.AdamW(specs, lr=base_lr, betas=(opt["beta1"], opt["beta2"]), eps=opt["epsilon"],
                                      weight_decay=wd)
    else:
        raise ValueError(f"optimizer type {kind!r} has no builder here (sgd, adam, adamw)")
    optimizer._segtwin = {"type": kind, "groups": [g[0] for g in groups], "lr_mults": [g[2] for g in groups],
                          "grad_clip": opt["grad_clip"], "betas": (opt.get("beta1"), opt.get("beta2"))}
    return optimizer


def group_names(optimizer) -> list:
    return list(optimizer._segtwin["groups"])


def set_lr(optimizer, base_lr: float) -> None:
    """Apply the scheduled base lr; every group keeps its multiplier."""
    for g in optimizer.param_groups:
        g["lr"] = base_lr * g["lr_mult"]


def current_lrs(optimizer) -> list:
    """The lr each group will use at the next step."""
    return [float(g["lr"]) for g in optimizer.param_groups]


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
            g.mul_(scale)


def step(optimizer) -> None:
    """Clip the gradients (global norm, when the recipe asks), update, clear the gradients."""
    clip_gradients(optimizer)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def optimizer_state(optimizer, model) -> dict:
    """{state name: {parameter name: tensor}} after at least one step (see the module doc for the names; `beta*_pow`
    is beta ** step, the bias-correction power)."""
    names = {id(p): n for n, p in model.named_parameters()}
    kind = optimizer._segtwin["type"]
    out = {s: {} for s in STATE_NAMES[kind]}
    for g in L.param_groups_of(optimizer):
        for p in g["params"]:
            st = optimizer.state.get(p, {})
            name = names[id(p)]
            if kind == "sgd":
                if st.get("momentum_buffer") is not None:
                    out["momentum"][name] = st["momentum_buffer"]
                continue
            if "step" not in st:
                continue
            out["exp_avg"][name] = st["exp_avg"]
            out["exp_avg_sq"][name] = st["exp_avg_sq"]
            out["step"][name] = st["step"].double().reshape([1])
            out["beta1_pow"][name] = torch.tensor([g["betas"][0] ** float(st["step"])], dtype=torch.float64)
            out["beta2_pow"][name] = torch.tensor([g["betas"][1] ** float(st["step"])], dtype=torch.float64)
    # copies: the live buffers change at the next step, and a recorded state must not
    out = {s: {n: v.detach().clone() for n, v in d.items()} for s, d in out.items()}
    return out


def load_optimizer_state(optimizer, model, state: dict) -> None:
    """Overwrite the optimizer's state tensors with `state` ({state name: {parameter name: numpy array}}, as
    `optimizer_state` reports it)."""
    params = dict(model.named_parameters())
    for sname, values in state.items():
        for name, value in values.items():
            st = optimizer.state[params[name]]
            v = torch.as_tensor(value)
            if sname == "momentum":
                st["momentum_buffer"] = v.to(params[name].dtype).clone()
            elif sname in ("exp_avg", "exp_avg_sq"):
                st[sname] = v.to(params[name].dtype).clone()
            elif sname == "step":
                st["step"] = torch.tensor(float(round(float(v.reshape([-1])[0]))))
