"""Optimizer of the semseg recipe (twin: torch_ref/optim.py): SGD with momentum (v = mu*v + g,
p -= lr*v), coupled L2 weight decay (g + wd*p), and two parameter groups, the head (ppm/cls/aux for PSPNet) learning
`head_lr_mult` (10) times faster than the backbone. The learning-rate SCHEDULE is computed outside (one function for
both frameworks) and applied with `set_lr`.
"""
from __future__ import annotations

import paddle


def param_groups(model, head_prefixes, head_lr_mult: float):
    """[(group_name, [(param_name, param)...], lr_mult)] in the model's parameter order."""
    backbone, head = [], []
    for name, p in model.named_parameters():
        (head if name.startswith(tuple(head_prefixes)) else backbone).append((name, p))
    return [("backbone", backbone, 1.0), ("head", head, float(head_lr_mult))]


def build_optimizer(model, base_lr: float, momentum: float = 0.9, weight_decay: float = 1e-4,
                    head_prefixes=(), head_lr_mult: float = 10.0):
    groups = [{"params": [p for _, p in params], "learning_rate": mult}
              for _, params, mult in param_groups(model, head_prefixes, head_lr_mult) if params]
    opt = paddle.optimizer.Momentum(learning_rate=base_lr, momentum=momentum, parameters=groups,
                                    weight_decay=weight_decay)
    # Momentum is torch's SGD with momentum; a float weight_decay is the same coupled L2 term. A group's
    # learning_rate MULTIPLIES the optimizer's lr and is not reported back, so the multipliers are kept here.
    opt._segtwin_lr_mults = [g["learning_rate"] for g in groups]
    return opt


def set_lr(optimizer, base_lr: float) -> None:
    """Apply the scheduled base lr; every group keeps its multiplier."""
    optimizer.set_lr(base_lr)


def current_lrs(optimizer) -> list:
    """The lr each group will use at the next step."""
    return [float(optimizer.get_lr()) * m for m in optimizer._segtwin_lr_mults]


def step(optimizer) -> None:
    optimizer.step()
    optimizer.clear_grad(set_to_zero=False)


def momentum_buffers(optimizer, model) -> dict:
    """{parameter name: velocity accumulator} after at least one step (torch's `momentum_buffer`)."""
    acc = optimizer._accumulators.get("velocity", {})
    return {name: acc[p.name] for name, p in model.named_parameters() if p.name in acc}


def load_momentum_buffers(optimizer, model, buffers: dict) -> None:
    """Overwrite the velocity accumulators (numpy arrays by parameter name)."""
    acc = optimizer._accumulators.get("velocity", {})
    for name, p in model.named_parameters():
        if name in buffers and p.name in acc:
            acc[p.name].set_value(paddle.to_tensor(buffers[name]).astype(acc[p.name].dtype))
