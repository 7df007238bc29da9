"""PASCAL VOC 2012 segmentation reader (official layout).

Layout (``VOCtrainval_11-May-2012.tar``)::

    ROOT/VOCdevkit/VOC2012/JPEGImages/{id}.jpg
    ROOT/VOCdevkit/VOC2012/SegmentationClass/{id}.png         palette PNG: indices 0..20, 255 = border / void
    ROOT/VOCdevkit/VOC2012/ImageSets/Segmentation/{train,val,trainval}.txt

``root`` may be the directory holding ``VOCdevkit``, the ``VOCdevkit`` directory, or ``VOC2012`` itself. Labels are
the palette INDICES read by PIL (the colours are never converted).

``list_file`` replaces the split list: a path (absolute, or relative to the VOC2012 directory) whose lines are either
an image id (``2007_000032``) or two paths relative to the VOC2012 directory, ``image label``, as in semseg's /
PaddleSeg's train_aug lists (``JPEGImages/x.jpg SegmentationClassAug/x.png``).
"""
from __future__ import annotations

import os
from typing import List, Optional, Tuple

import numpy as np

from .cityscapes import SegDataset, Transform, read_index_png

__all__ = ["VOCSegmentation", "VOC_CLASSES"]

VOC_CLASSES: Tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)


def find_voc_dir(root: str) -> str:
    """The ``VOC2012`` directory under ``root`` (root/VOCdevkit/VOC2012, root/VOC2012 or root itself)."""
    candidates = [os.path.join(root, "VOCdevkit", "VOC2012"), os.path.join(root, "VOC2012"), root]
    for c in candidates:
        if os.path.isdir(os.path.join(c, "JPEGImages")):
            return c
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"VOC root {root} does not exist; expected ROOT/VOCdevkit/VOC2012/{{JPEGImages,SegmentationClass,"
            f"ImageSets/Segmentation}}")
    raise FileNotFoundError(
        f"no VOC2012 directory (one holding JPEGImages/) found under {root}; looked at "
        f"{', '.join(candidates)}; expected ROOT/VOCdevkit/VOC2012/{{JPEGImages,SegmentationClass,"
        f"ImageSets/Segmentation}}")


class VOCSegmentation(SegDataset):
    """PASCAL VOC 2012 semantic segmentation, 21 classes (0 = background), ignore 255.

    Args:
        root: dir holding ``VOCdevkit`` (or ``VOCdevkit`` / ``VOC2012`` itself).
        split: name of ``ImageSets/Segmentation/{split}.txt`` (``train``, ``val``, ``trainval``).
        transforms: callable ``(image, label) -> (image, label)`` applied in ``__getitem__``.
        list_file: a list replacing the split's (see module doc), e.g. a train_aug list.
        label_dir: directory of the label PNGs for id-style lists (``SegmentationClass``).

    ``dataset[i] -> (image HxWx3 uint8 RGB, label HxW int64)`` (before transforms).
    """

    num_classes = 21
    ignore_index = 255
    class_names = VOC_CLASSES

    def __init__(self, root, split: str = "train", transforms: Optional[Transform] = None,
                 list_file: Optional[str] = None, label_dir: str = "SegmentationClass"):
        super().__init__(transforms)
        self.root = os.fspath(root)
        self.split = split
        self.voc_dir = voc = find_voc_dir(self.root)
        if list_file is None:
            lists = os.path.join(voc, "ImageSets", "Segmentation")
            list_file = os.path.join(lists, f"{split}.txt")
            if not os.path.isfile(list_file):
                have = sorted(f[:-4] for f in os.listdir(lists) if f.endswith(".txt")) if os.path.isdir(lists) else []
                raise FileNotFoundError(
                    f"VOC split list {list_file} not found (splits present: {have or 'none'}); expected "
                    f"VOC2012/ImageSets/Segmentation/{{train,val,trainval}}.txt")
        else:
            list_file = os.fspath(list_file)
            if not os.path.isabs(list_file) and not os.path.isfile(list_file):
                list_file = os.path.join(voc, list_file)
            if not os.path.isfile(list_file):
                raise FileNotFoundError(f"VOC list file {list_file} not found")
        self.list_file = list_file
        files: List[Tuple[str, str]] = []
        with open(list_file) as f:
            for lineno, line in enumerate(f, 1):
                parts = line.split()
                if not parts:
                    continue
                if len(parts) == 1:
                    img = os.path.join(voc, "JPEGImages", parts[0] + ".jpg")
                    lbl = os.path.join(voc, label_dir, parts[0] + ".png")
                elif len(parts) == 2:
                    img, lbl = (os.path.join(voc, p.lstrip("/")) for p in parts)
                else:
                    raise ValueError(f"{list_file}:{lineno}: expected 'ID' or 'IMAGE LABEL', got {line.strip()!r}")
                if not os.path.isfile(img):
                    raise FileNotFoundError(f"{list_file}:{lineno}: image {img} not found")
                if not os.path.isfile(lbl):
                    raise FileNotFoundError(f"image {img} has no label: expected {lbl}")
                files.append((img, lbl))
        if not files:
            raise FileNotFoundError(f"VOC list {list_file} names no images")
        self.files = files

    def read_label(self, path: str) -> np.ndarray:
        """HxW int64 class indices of a palette (or single-channel) PNG; 255 kept as ignore."""
        return read_index_png(path, "VOC label").astype(np.int64)
