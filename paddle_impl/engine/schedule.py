"""Learning-rate schedules as pure functions of the iteration (framework-free).

A schedule is stateless: ``lr_at(it)`` is the base lr used for the optimizer step of iteration ``it`` (0-based, the
``it``-th update). Resume therefore needs only the iteration count; ``state_dict()`` exists so a checkpoint records
what schedule produced it (and a resume with a different schedule is refused).

    poly:    lr = (base - end_lr) * (1 - it / iters) ** power + end_lr          (semseg: end_lr 0, power 0.9)
    step:    lr = base * gamma ** (number of milestones <= it)                 (or every ``step_size`` iters)
    const:   lr = base
    warmup (any of them): for it < warmup_iters, linear from warmup_start_lr to the schedule's lr at warmup_iters

The trainer applies ``lr_at(it)`` each iteration with ``paddle_impl.optim.set_lr`` (every param group keeps its
multiplier, e.g. the head's x10).
"""
from __future__ import annotations

import bisect
from typing import Any, Dict, Optional, Sequence

__all__ = ["LRSchedule", "build_schedule", "SCHEDULE_KEYS"]

#: accepted keys of a config's ``lr_scheduler`` section, per type (``type`` and ``learning_rate`` always)
SCHEDULE_KEYS = {
    "poly": ("power", "end_lr"),
    "step": ("milestones", "step_size", "gamma"),
    "const": (),
}
_COMMON = ("type", "learning_rate", "warmup_iters", "warmup_start_lr")


class LRSchedule:
    """``lr_at(it)`` for ``it`` in ``[0, iters)``; see the module doc for the formulas."""

    def __init__(self, kind: str, learning_rate: float, iters: int, *, power: float = 0.9, end_lr: float = 0.0,
                 milestones: Optional[Sequence[int]] = None, step_size: Optional[int] = None, gamma: float = 0.1,
                 warmup_iters: int = 0, warmup_start_lr: float = 0.0):
        if kind not in SCHEDULE_KEYS:
            raise ValueError(f"unknown lr schedule type {kind!r}; one of {sorted(SCHEDULE_KEYS)}")
        if int(iters) <= 0:
            raise ValueError(f"lr schedule: iters must be positive, got {iters}")
        if float(learning_rate) < 0:
            raise ValueError(f"lr schedule: learning_rate must be >= 0, got {learning_rate}")
        if int(warmup_iters) < 0 or (int(warmup_iters) > 0 and int(warmup_iters) >= int(iters)):
            raise ValueError(f"lr schedule: warmup_iters must be in [0, iters={iters}), got {warmup_iters}")
        if kind == "step":
            if (milestones is None) == (step_size is None):
                raise ValueError("lr schedule 'step' needs exactly one of milestones (list of iterations) or "
                                 "step_size")
            if step_size is not None and int(step_size) <= 0:
                raise ValueError(f"lr schedule 'step': step_size must be positive, got {step_size}")
            if milestones is not None and list(milestones) != sorted(int(m) for m in milestones):
                raise ValueError(f"lr schedule 'step': milestones must be increasing, got {list(milestones)}")
        self.kind = kind
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


def build_schedule(spec: Dict[str, Any], iters: int, learning_rate: Optional[float] = None) -> LRSchedule:
    """From a config ``lr_scheduler`` section ``{type: poly, learning_rate: 0.01, power: 0.9, ...}``.
    ``learning_rate`` (e.g. from the optimizer section) is used when the section has none."""
    spec = dict(spec)
    kind = str(spec.pop("type", "poly")).lower().replace("polynomialdecay", "poly")
    lr = spec.pop("learning_rate", learning_rate)
    if lr is None:
        raise ValueError("lr schedule: no learning_rate (give lr_scheduler.learning_rate)")
    allowed = set(_COMMON) | set(SCHEDULE_KEYS.get(kind, ()))
    bad = sorted(set(spec) - allowed)
    if bad:
        raise ValueError(f"lr schedule {kind!r}: unknown keys {bad}; allowed {sorted(allowed - {'type'})}")
    return LRSchedule(kind, lr, iters, **spec)
