"""Learning-rate schedules as pure functions of the iteration (twin: torch_ref/schedule.py).

A schedule is stateless: ``lr_at(it)`` is the base lr of the optimizer step of iteration ``it`` (0-based, the
``it``-th update). Resume therefore needs only the iteration count; ``state_dict()`` records which schedule produced
a checkpoint. The values come resolved from ``alignment.recipe.resolve_schedule`` (every default explicit):

    poly:    lr = (base - end_lr) * (1 - it / iters) ** power + end_lr          (semseg: end_lr 0, power 0.9)
    step:    lr = base * gamma ** (number of milestones <= it)                 (or every ``step_size`` iters)
    const:   lr = base
    warmup (any of them): for it < warmup_iters, linear from warmup_start_lr to the schedule's lr at warmup_iters

Each group of the optimizer gets ``lr_at(it)`` times its multiplier (``optim.set_lr``). The twins are separate
implementations on purpose: `segtwin align` compares them at every iteration of a config (the ``schedule`` step), so
an edit to one side's formula shows.
"""
from __future__ import annotations

import bisect
from typing import Any, Dict, Mapping, Optional

from alignment.recipe import resolve_schedule

__all__ = ["LRSchedule", "build_schedule"]


class LRSchedule:
    """``lr_at(it)`` for ``it`` in ``[0, iters]``; see the module doc for the formulas."""

    def __init__(self, type: str, learning_rate: float, iters: int, power: float = 0.9, end_lr: float = 0.0,
                 milestones=None, step_size: Optional[int] = None, gamma: float = 0.1, warmup_iters: int = 0,
                 warmup_start_lr: float = 0.0):
        if int(iters) <= 0:
            raise ValueError(f"lr schedule: iters must be positive, got {iters}")
        if int(warmup_iters) > 0 and int(warmup_iters) >= int(iters):
            raise ValueError(f"lr schedule: warmup_iters must be in [0, iters={iters}), got {warmup_iters}")
        self.kind = type
        self.base_lr = float(learning_rate)
        self.iters = int(iters)
        self.power = float(power)
        self.end_lr = float(end_lr)
        self.milestones = None if milestones is None else [int(m) for m in milestones]
        self.step_size = None if step_size is None else int(step_size)
        self.gamma = float(gamma)
        self.warmup_iters = int(warmup_iters)
        self.warmup_start_lr = float(warmup_start_lr)

    def _main(self, it: int) -> float:
        if self.kind == "poly":
            frac = min(max(it / self.iters, 0.0), 1.0)
            return (self.base_lr - self.end_lr) * (1.0 - frac) ** self.power + self.end_lr
        if self.kind == "step":
            n = (bisect.bisect_right(self.milestones, it) if self.milestones is not None
                 else it // self.step_size)
            return self.base_lr * self.gamma ** n
        return self.base_lr

    def lr_at(self, it: int) -> float:
        it = int(it)
        if it < self.warmup_iters:
            target = self._main(self.warmup_iters)
            return self.warmup_start_lr + (target - self.warmup_start_lr) * it / self.warmup_iters
        return self._main(it)

    def state_dict(self) -> Dict[str, Any]:
        return {"kind": self.kind, "learning_rate": self.base_lr, "iters": self.iters, "power": self.power,
                "end_lr": self.end_lr, "milestones": self.milestones, "step_size": self.step_size,
                "gamma": self.gamma, "warmup_iters": self.warmup_iters, "warmup_start_lr": self.warmup_start_lr}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.state_dict().items() if v is not None)
        return f"LRSchedule({args})"


def build_schedule(section: Mapping[str, Any], iters: int, learning_rate: Optional[float] = None) -> LRSchedule:
    """From a config ``lr_scheduler`` section ``{type: poly, learning_rate: 0.01, power: 0.9, ...}`` (resolved
    here; a bad value raises ``alignment.recipe.RecipeError`` naming the key)."""
    return LRSchedule(iters=iters, **resolve_schedule(section, learning_rate))
