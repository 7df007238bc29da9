"""Streaming `.pdparams` writer.

A `.pdparams` file as `paddle.save` writes it for a dict of numpy arrays is a protocol-4 pickle of
`{name: numpy.ndarray}`; `paddle.load` reads it back as a state dict. This writer produces the same stream
without holding all arrays at once: the dict handed to the pickler holds placeholders, and each array is made
(and its source released) only when the pickler reaches it. The pickler runs with its memo off ("fast" mode), so
nothing it has written stays referenced; peak memory is one array (plus its serialised bytes), not the whole model.
"""
from __future__ import annotations

import pickle
from typing import Callable, Iterable, Optional

import numpy as np

__all__ = ["write_pdparams"]

PROTOCOL = 4  # what paddle.save uses by default


class _Deferred:
    __slots__ = ("key", "make")

    def __init__(self, key: str, make: Callable[[], np.ndarray]):
        self.key = key
        self.make = make


class _StreamingPickler(pickle.Pickler):
    def __init__(self, f, on_item: Optional[Callable[[str], None]] = None):
        super().__init__(f, protocol=PROTOCOL)
        self.fast = True  # no memo: written arrays are not kept alive (the dict holds no shared objects)
        self._on_item = on_item

    def reducer_override(self, obj):
        if type(obj) is not _Deferred:
            return NotImplemented
        make, obj.make = obj.make, None
        arr = make()
        if not isinstance(arr, np.ndarray) or arr.dtype.hasobject:
            raise TypeError(f"{obj.key}: the writer needs a numeric numpy array, got {type(arr).__name__}")
        reduced = np.ascontiguousarray(arr).__reduce_ex__(PROTOCOL)
        del arr
        if self._on_item is not None:
            self._on_item(obj.key)
        return reduced


def write_pdparams(f, entries: Iterable, on_item: Optional[Callable[[str], None]] = None) -> None:
    """Write `{key: array}` to the binary file object `f` as paddle.save does, one array at a time.

    entries: (key, make) pairs, `make()` returning the numpy array for `key` (called once, in order, while writing).
    on_item(key) is called after each array has been serialised (progress bars).
    """
    placeholder = {}
    for key, make in entries:
        if key in placeholder:
            raise ValueError(f"duplicate key {key!r} in .pdparams entries")
        placeholder[key] = _Deferred(key, make)
    _StreamingPickler(f, on_item).dump(placeholder)
