"""Strict state_dict loading for Paddle layers (Paddle's `set_state_dict` only warns on missing keys)."""
from __future__ import annotations

import numpy as np


class StateDictMismatch(ValueError):
    """Missing, unexpected or mis-shaped keys; the message names every one of them."""

    def __init__(self, source: str, missing, unexpected, mis_shaped):
        self.missing, self.unexpected, self.mis_shaped = list(missing), list(unexpected), list(mis_shaped)
        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} missing: {', '.join(self.missing[:20])}"
                         + (" ..." if len(self.missing) > 20 else ""))
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected: {', '.join(self.unexpected[:20])}"
                         + (" ..." if len(self.unexpected) > 20 else ""))
        if self.mis_shaped:
            parts.append(f"{len(self.mis_shaped)} mis-shaped: "
                         + ", ".join(f"{k} {list(a)} (model {list(b)})" for k, a, b in self.mis_shaped[:20]))
        super().__init__(f"{source}: state_dict does not match the model: " + "; ".join(parts))


def _shape(v) -> tuple:
    return tuple(int(s) for s in (v.shape if hasattr(v, "shape") else np.shape(v)))


def check_keys(own, state_dict, source: str = "<state_dict>") -> None:
    """Raise StateDictMismatch unless `state_dict` has exactly the keys of `own` (a dict) with the same shapes."""
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mis_shaped = [(k, _shape(state_dict[k]), _shape(own[k])) for k in own
                  if k in state_dict and _shape(state_dict[k]) != _shape(own[k])]
    if missing or unexpected or mis_shaped:
        raise StateDictMismatch(source, missing, unexpected, mis_shaped)


def check_state_dict(layer, state_dict, source: str = "<state_dict>") -> None:
    """Raise StateDictMismatch unless `state_dict` has exactly the layer's keys with the same shapes."""
    check_keys(layer.state_dict(), state_dict, source)


def strict_load(layer, state_dict, source: str = "<state_dict>") -> None:
    """Load `state_dict` into `layer` after `check_state_dict`; dtypes are cast to the layer's."""
    check_state_dict(layer, state_dict, source)
    missing, unexpected = layer.set_state_dict(state_dict)
    if missing or unexpected:  # cannot happen after the check; kept as a guard against API changes
        raise StateDictMismatch(source, missing, unexpected, [])
