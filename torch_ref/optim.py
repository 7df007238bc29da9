"""Optimizer of the semseg recipe (twin: paddle_impl/optim.py): SGD with momentum (v = mu*v + g,
p -= lr*v), coupled L2 weight decay (g + wd*p), and two parameter groups, the head (ppm/cls/aux for PSPNet) learning
`head_lr_mult` (10) times faster than the backbone. The learning-rate SCHEDULE is computed outside (one function for
both frameworks) and applied with `set_lr`.
"""
from __future__ import annotations

import torch


def param_groups(model, head_prefixes, head_lr_mult: float):
    """[(group_name, [(param_name, param)...], lr_mult)] in the model's parameter order."""
    backbone, head = [], []
    for name, p in model.named_parameters():
        (head if name.startswith(tuple(head_prefixes)) else backbone).append((name, p))
    return [("backbone", backbone, 1.0), ("head", head, float(head_lr_mult))]


def build_optimizer(model, base_lr: float, momentum: float = 0.9, weight_decay: float = 1e-4,
                    head_prefixes=(), head_lr_mult: float = 10.0):
    groups = [{"params": [p for _, p in params], "lr": base_lr * mult, "lr_mult": mult}
              for _, params, mult in param_groups(model, head_prefixes, head_lr_mult) if params]
    return torch.optim.SGD(groups, lr=base_lr, momentum=momentum, weight_decay=weight_decay)


def set_lr(optimizer, base_lr: float) -> None:
    """Apply the scheduled base lr; every group keeps its multiplier."""
    for g in optimizer.param_groups:
        g["lr"] = base_lr * g["lr_mult"]


def current_lrs(optimizer) -> list:
    """The lr each group will use at the next step."""
    return [float(g["lr"]) for g in optimizer.param_groups]


def step(optimizer) -> None:
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def momentum_buffers(optimizer, model) -> dict:
    """{parameter name: momentum buffer} after at least one step (the velocity of SGD with momentum)."""
    out = {}
    for name, p in model.named_parameters():
        st = optimizer.state.get(p, {})
        if "momentum_buffer" in st and st["momentum_buffer"] is not None:
            out[name] = st["momentum_buffer"]
    return out


def load_momentum_buffers(optimizer, model, buffers: dict) -> None:
    """Overwrite the momentum buffers (numpy arrays by parameter name)."""
    for name, p in model.named_parameters():
        if name in buffers:
            optimizer.state[p]["momentum_buffer"] = torch.as_tensor(buffers[name]).to(p.dtype).clone()
