"""Datasets: readers of the official Cityscapes / PASCAL VOC 2012 layouts and writers of mini synthetic ones.

    from paddle_impl.datasets import Cityscapes, VOCSegmentation, DATASETS, write_cityscapes, write_voc

The readers (which import paddle) load lazily on first access, so the synthetic writers and their CLI
(``python -m paddle_impl.datasets``) need numpy, PIL and cv2 only.
"""
from __future__ import annotations

import importlib
from typing import Any

from .synthetic import make_cityscapes_sample, make_voc_sample, voc_colormap, write_cityscapes, write_voc

__all__ = [
    "Cityscapes", "VOCSegmentation", "SegDataset", "DATASETS", "labelid_to_trainid_lut",
    "write_cityscapes", "write_voc", "make_cityscapes_sample", "make_voc_sample", "voc_colormap",
]

_LAZY = {
    "Cityscapes": ".cityscapes",
    "SegDataset": ".cityscapes",
    "labelid_to_trainid_lut": ".cityscapes",
    "VOCSegmentation": ".voc",
}


def __getattr__(name: str) -> Any:
    if name == "DATASETS":
        value = {"cityscapes": __getattr__("Cityscapes"), "voc": __getattr__("VOCSegmentation")}
    elif name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
