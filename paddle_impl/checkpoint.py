"""Reading `.pdparams` / `.pdopt` files without running code, and strict state_dict loading for Paddle layers
(Paddle's `set_state_dict` only warns on missing keys)."""
from __future__ import annotations

import os
from typing import Any, Dict

import numpy as np

from alignment import safe_pickle

#: the key ``paddle.save`` adds to a state dict (structured name -> parameter name); ``paddle.load`` drops it too
_STRUCTURED_KEY = "StructuredToParameterName@@"


class UnsafeStateFile(ValueError):
    """A state file that names anything but numpy arrays (``alignment.safe_pickle``): refused unread. ``paddle.load``
    is a plain ``pickle.load``, so a file from someone else could run code through it."""


def read_state_file(path) -> Dict[str, Any]:
    """The dict of numpy arrays (and plain values) in a ``paddle.save`` file (``.pdparams`` / ``.pdopt``), read with
    a restricted unpickler. OSError naming the file when it is missing, empty, truncated or not a pickle;
    UnsafeStateFile when it names anything but numpy arrays; ValueError when it holds no dict."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist")
    if os.path.getsize(path) == 0:
        raise OSError(f"{path} is empty (0 bytes): an interrupted copy or download?")
    with open(path, "rb") as f:
        try:
            obj = safe_pickle.load(f)
        except safe_pickle.Refused as e:
            raise UnsafeStateFile(f"{path}: refused: it names {e.global_name}, which a Paddle state dict never "
                                  f"holds (unpickling it could run code); only numpy arrays are read") from None
        except safe_pickle.CORRUPT as e:
            size = os.path.getsize(path)
            raise OSError(f"{path} ({size} bytes) is truncated or not a Paddle state file "
                          f"({type(e).__name__}: {' '.join(str(e).split())[:120]})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
    obj = dict(obj)
    obj.pop(_STRUCTURED_KEY, None)
    return obj


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
