"""A pickle reader that builds numpy arrays and plain containers and nothing else (framework-free).

Plain ``pickle.load`` imports and calls whatever a file names, so a weights file from someone else can run code.
``paddle.save`` state dicts (``.pdparams`` / ``.pdopt``) and detectron2 / Caffe2 model-zoo ``.pkl`` files only ever
name numpy's array reconstruction; this reader resolves exactly those names and refuses every other one BEFORE
looking it up (``Refused`` carries the name). Used by ``torch_ref.official`` (official ``.pkl`` checkpoints) and
``paddle_impl.checkpoint`` (Paddle state files).
"""
from __future__ import annotations

import collections
import pickle
from typing import IO, Any


class Refused(pickle.UnpicklingError):
    """The pickle names something outside the numpy-array allow-list; ``global_name`` says what."""

    def __init__(self, name: str):
        self.global_name = name
        super().__init__(name)


def _numpy_multiarray(attr: str):
    def get():
        try:
            from numpy._core import multiarray  # numpy >= 2
        except ImportError:  # pragma: no cover - numpy 1.x
            from numpy.core import multiarray
        return getattr(multiarray, attr)
    return get


def _numpy_attr(attr: str):
    def get():
        import numpy
        return getattr(numpy, attr)
    return get


#: (module, name) -> resolver. Nothing else is ever imported or called while unpickling.
ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_multiarray("_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): _numpy_multiarray("_reconstruct"),
    ("numpy.core.multiarray", "scalar"): _numpy_multiarray("scalar"),
    ("numpy._core.multiarray", "scalar"): _numpy_multiarray("scalar"),
    ("numpy", "ndarray"): _numpy_attr("ndarray"),
    ("numpy", "dtype"): _numpy_attr("dtype"),
    ("collections", "OrderedDict"): lambda: collections.OrderedDict,
}

#: what a failed read of a corrupt or truncated pickle raises (besides Refused)
CORRUPT = (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
           UnicodeDecodeError, OverflowError, MemoryError)


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that builds numpy arrays and plain containers, and refuses every other global by name."""

    def find_class(self, module, name):  # noqa: D401 - pickle API
        resolve = ALLOWED.get((module, name))
        if resolve is None:
            raise Refused(f"{module}.{name}")
        return resolve()

    def persistent_load(self, pid):
        raise Refused(f"persistent id {str(pid)[:60]!r}")


def load(f: IO[bytes], encoding: str = "ASCII") -> Any:
    """The object in the open binary file ``f``; Refused for anything but numpy arrays and plain containers,
    one of ``CORRUPT`` for a damaged file. ``encoding="latin1"`` reads Python 2 pickles (Caffe2 model zoo)."""
    return NumpyOnlyUnpickler(f, encoding=encoding).load()
