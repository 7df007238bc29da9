"""PASCAL VOC 2012 / 2007 segmentation reader (official layout), with SBD ``train_aug`` and the 20-class variant.

Layout (``VOCtrainval_11-May-2012.tar``; VOC2007: ``VOCtrainval_06-Nov-2007.tar`` + ``VOCtest_06-Nov-2007.tar``, same
tree under ``VOC2007``)::

    ROOT/VOCdevkit/VOC{year}/JPEGImages/{id}.jpg
    ROOT/VOCdevkit/VOC{year}/SegmentationClass/{id}.png         palette PNG: indices 0..20, 255 = border / void
    ROOT/VOCdevkit/VOC{year}/ImageSets/Segmentation/{train,val,trainval[,test]}.txt
    ROOT/VOCdevkit/VOC2012/SegmentationClassAug/{id}.png        (optional, SBD "aug" labels as index PNGs)
    ROOT/VOCdevkit/VOC2012/ImageSets/Segmentation/train_aug.txt (optional)

``root`` may be the directory holding ``VOCdevkit``, the ``VOCdevkit`` directory, or ``VOC{year}`` itself. Labels are
the palette INDICES read by PIL (the colours are never converted); a value that is neither 0..20 nor 255 is an error
naming the file.

``split="train_aug"`` (SBD augmented set, 10582 images): ``ImageSets/Segmentation/train_aug.txt`` when present, else
every PNG of ``SegmentationClassAug/`` whose id is not in ``val.txt`` (the standard construction); labels from
``SegmentationClassAug`` (``label_dir``).

``list_file`` replaces the split list: a path (absolute, or relative to the VOC directory) whose lines are either
an image id (``2007_000032``) or two paths relative to the VOC directory, ``image label``, as in semseg's /
PaddleSeg's train_aug lists (``JPEGImages/x.jpg SegmentationClassAug/x.png``).

``reduce_zero_label=True`` (the seed's VOC2007 20-class variant, mmseg's flag): background 0 -> 255 (ignored),
classes 1..20 -> 0..19, 255 stays 255; ``num_classes`` 20, ``class_names`` without "background".
"""
from __future__ import annotations

import os
from typing import List, Optional, Tuple

import numpy as np

from .cityscapes import SegDataset, Transform, check_label_values, read_index_png

__all__ = ["VOCSegmentation", "VOC_CLASSES"]

VOC_CLASSES: Tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)


def find_voc_dir(root: str, year: int = 2012) -> str:
    """The ``VOC{year}`` directory under ``root`` (root/VOCdevkit/VOC{year}, root/VOC{year} or root itself)."""
    name = f"VOC{int(year)}"
    candidates = [os.path.join(root, "VOCdevkit", name), os.path.join(root, name), root]
    expected = (f"expected ROOT/VOCdevkit/{name}/{{JPEGImages,SegmentationClass,ImageSets/Segmentation}}")
    for c in candidates:
        if os.path.isdir(os.path.join(c, "JPEGImages")):
            return c
    if not os.path.isdir(root):
        raise FileNotFoundError(f"VOC root {root} does not exist; {expected}")
    raise FileNotFoundError(
        f"no {name} directory (one holding JPEGImages/) found under {root}; looked at "
        f"{', '.join(candidates)}; {expected}")


class VOCSegmentation(SegDataset):
    """PASCAL VOC 2012 (or 2007) semantic segmentation, 21 classes (0 = background), ignore 255.

    Args:
        root: dir holding ``VOCdevkit`` (or ``VOCdevkit`` / ``VOC{year}`` itself).
        split: name of ``ImageSets/Segmentation/{split}.txt`` (``train``, ``val``, ``trainval``), or ``train_aug``
            (see module doc).
        transforms: callable ``(image, label) -> (image, label)`` applied in ``__getitem__``.
        list_file: a list replacing the split's (see module doc), e.g. a train_aug list.
        label_dir: directory of the label PNGs for id-style lists (default ``SegmentationClass``,
            ``SegmentationClassAug`` for ``train_aug``).
        year: 2012 (default) or 2007.
        reduce_zero_label: the 20-class variant (0 -> 255, k -> k - 1).

    ``dataset[i] -> (image HxWx3 uint8 RGB, label HxW int64)`` (before transforms).
    """

    num_classes = 21
    ignore_index = 255
    class_names = VOC_CLASSES

    def __init__(self, root, split: str = "train", transforms: Optional[Transform] = None,
                 list_file: Optional[str] = None, label_dir: Optional[str] = None, year: int = 2012,
                 reduce_zero_label: bool = False):
        super().__init__(transforms)
        if int(year) not in (2007, 2012):
            raise ValueError(f"VOC year must be 2007 or 2012, got {year!r}")
        self.root = os.fspath(root)
        self.split = split
        self.year = int(year)
        self.reduce_zero_label = bool(reduce_zero_label)
        if self.reduce_zero_label:
            self.num_classes = 20
            self.class_names = VOC_CLASSES[1:]
        self.voc_dir = voc = find_voc_dir(self.root, self.year)
        if label_dir is None:
            label_dir = "SegmentationClassAug" if split == "train_aug" else "SegmentationClass"
        self.label_dir = label_dir
        lists = os.path.join(voc, "ImageSets", "Segmentation")
        ids: Optional[List[str]] = None
        if list_file is None:
            list_file = os.path.join(lists, f"{split}.txt")
            if split == "train_aug" and not os.path.isfile(list_file):
                ids = self._train_aug_ids(voc, lists, label_dir)
                list_file = None
            elif not os.path.isfile(list_file):
                have = sorted(f[:-4] for f in os.listdir(lists) if f.endswith(".txt")) if os.path.isdir(lists) else []
                raise FileNotFoundError(
                    f"VOC split list {list_file} not found (splits present: {have or 'none'}); expected "
                    f"VOC{self.year}/ImageSets/Segmentation/{{train,val,trainval}}.txt")
        else:
            list_file = os.fspath(list_file)
            if not os.path.isabs(list_file) and not os.path.isfile(list_file):
                list_file = os.path.join(voc, list_file)
            if not os.path.isfile(list_file):
                raise FileNotFoundError(f"VOC list file {list_file} not found")
        self.list_file = list_file
        if ids is not None:
            lines = [(f"<{label_dir} minus val.txt>", k + 1, [i]) for k, i in enumerate(ids)]
        else:
            with open(list_file) as f:
                lines = [(list_file, k, line.split()) for k, line in enumerate(f, 1)]
        files: List[Tuple[str, str]] = []
        for src, lineno, parts in lines:
            if not parts:
                continue
            if len(parts) == 1:
                img = os.path.join(voc, "JPEGImages", parts[0] + ".jpg")
                lbl = os.path.join(voc, label_dir, parts[0] + ".png")
            elif len(parts) == 2:
                img, lbl = (os.path.join(voc, p.lstrip("/")) for p in parts)
            else:
                raise ValueError(f"{src}:{lineno}: expected 'ID' or 'IMAGE LABEL', got {' '.join(parts)!r}")
            if not os.path.isfile(img):
                raise FileNotFoundError(f"{src}:{lineno}: image {img} not found")
            if not os.path.isfile(lbl):
                raise FileNotFoundError(f"{src}:{lineno}: image {img} has no label: expected {lbl}")
            files.append((img, lbl))
        if not files:
            raise FileNotFoundError(f"VOC list {list_file or label_dir} names no images")
        self.files = files

    @staticmethod
    def _train_aug_ids(voc: str, lists: str, label_dir: str) -> List[str]:
        aug = os.path.join(voc, label_dir)
        if not os.path.isdir(aug):
            raise FileNotFoundError(
                f"split 'train_aug' needs {os.path.join(lists, 'train_aug.txt')} or the SBD label directory {aug} "
                f"(SegmentationClassAug: index PNGs of the 12031 SBD + VOC images)")
        val = set()
        val_txt = os.path.join(lists, "val.txt")
        if os.path.isfile(val_txt):
            with open(val_txt) as f:
                val = {line.strip() for line in f if line.strip()}
        return sorted(n[:-4] for n in os.listdir(aug) if n.endswith(".png") and n[:-4] not in val)

    def read_label(self, path: str) -> np.ndarray:
        """HxW int64 class indices of a palette (or single-channel) PNG, checked (0..20 / 255); with
        ``reduce_zero_label`` 0 -> 255 and k -> k - 1."""
        raw = read_index_png(path, "VOC label")
        check_label_values(raw, 21, 255, path)
        if self.reduce_zero_label:
            return _REDUCE_LUT[raw].astype(np.int64)
        return raw.astype(np.int64)


#: raw VOC index -> 20-class index (0 -> 255, 1..20 -> 0..19, everything else -> 255)
_REDUCE_LUT = np.full(256, 255, dtype=np.uint8)
_REDUCE_LUT[1:21] = np.arange(20, dtype=np.uint8)
