"""Cityscapes reader (official layout), and the base class shared with the VOC reader.

Layout (as downloaded: ``leftImg8bit_trainvaltest.zip`` + ``gtFine_trainvaltest.zip``)::

    ROOT/leftImg8bit/{split}/{city}/{city}_{seq}_{frame}_leftImg8bit.png
    ROOT/gtFine/{split}/{city}/{city}_{seq}_{frame}_gtFine_labelIds.png      (mode="coarse": gtCoarse/..._gtCoarse_)

Labels are the official **labelIds** PNGs, mapped to the 19 trainIds at load time through a 256-entry lookup
table built from ``cityscapesscripts.helpers.labels.labels`` (ids whose trainId is 255 or -1 -> 255, ids not in the
table -> 255). No preprocessing (``csCreateTrainIdLabelImgs``) is needed.
"""
from __future__ import annotations

import glob
import os
from typing import Callable, List, Optional, Tuple

import numpy as np
import paddle.io

__all__ = ["Cityscapes", "SegDataset", "labelid_to_trainid_lut", "read_rgb", "read_index_png"]

Transform = Callable[[np.ndarray, np.ndarray], Tuple[np.ndarray, np.ndarray]]


# ----------------------------------------------------------------------------------------------------------------------
# shared by the readers

def read_rgb(path: str) -> np.ndarray:
    """HxWx3 uint8 RGB of an image file (cv2 decode, BGR -> RGB); OSError naming the file if it cannot be read."""
    import cv2

    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise OSError(f"cannot read image {path} (missing, truncated or not an image)")
    return np.ascontiguousarray(img[:, :, ::-1])


def read_index_png(path: str, what: str = "label") -> np.ndarray:
    """HxW uint8 array of the INDICES stored in a single-channel ("L") or palette ("P") PNG; colours are never
    converted (a palette PNG gives its palette indices)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            mode = im.mode
            if mode not in ("L", "P"):
                raise ValueError(
                    f"{what} {path} is a PIL mode {mode!r} image; expected a single-channel ('L') or palette ('P') "
                    f"PNG of class indices (a colour-coded label image cannot be read as indices)")
            arr = np.array(im)
    except (OSError, SyntaxError) as e:
        raise OSError(f"cannot read {what} {path}: {e}") from e
    return arr


class SegDataset(paddle.io.Dataset):
    """Base of the readers: ``files`` = [(image_path, label_path)], ``load(i)`` = raw sample, ``[i]`` = transformed.

    ``__getitem__(i) -> (image, label)``: image HxWx3 uint8 RGB, label HxW int64 (ignore = ``ignore_index``), both
    passed through ``transforms(image, label)`` when given.
    """

    num_classes: int = 0
    ignore_index: int = 255
    class_names: Tuple[str, ...] = ()

    def __init__(self, transforms: Optional[Transform] = None):
        super().__init__()
        self.transforms = transforms
        self.files: List[Tuple[str, str]] = []

    def __len__(self) -> int:
        return len(self.files)

    def read_label(self, path: str) -> np.ndarray:  # pragma: no cover - overridden
        raise NotImplementedError

    def load(self, index: int) -> Tuple[np.ndarray, np.ndarray]:
        """The untransformed sample ``index``: (HxWx3 uint8 RGB, HxW int64)."""
        img_path, lbl_path = self.files[index]
        image = read_rgb(img_path)
        label = self.read_label(lbl_path)
        if image.shape[:2] != label.shape:
            raise ValueError(f"image {img_path} is {image.shape[1]}x{image.shape[0]} (WxH) but its label "
                             f"{lbl_path} is {label.shape[1]}x{label.shape[0]}")
        return image, label

    def __getitem__(self, index: int):
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {type(self).__name__} of {n} samples")
        image, label = self.load(index)
        if self.transforms is not None:
            image, label = self.transforms(image, label)
        return image, label

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(root={getattr(self, 'root', '?')!r}, split={getattr(self, 'split', '?')!r}, "
                f"samples={len(self)})")


# ----------------------------------------------------------------------------------------------------------------------
# Cityscapes

def labelid_to_trainid_lut() -> np.ndarray:
    """256-entry uint8 table labelId -> trainId from cityscapesscripts' ``labels`` (trainId 255 / -1 -> 255)."""
    from cityscapesscripts.helpers.labels import labels

    lut = np.full(256, 255, dtype=np.uint8)
    for lb in labels:
        if 0 <= lb.id <= 255:
            lut[lb.id] = lb.trainId if 0 <= lb.trainId < 255 else 255
    return lut


def _class_names() -> Tuple[str, ...]:
    from cityscapesscripts.helpers.labels import labels

    names = {}
    for lb in labels:  # first label of each trainId, table order (as cityscapesscripts' trainId2label inverse)
        if 0 <= lb.trainId < 255 and lb.trainId not in names:
            names[lb.trainId] = lb.name
    return tuple(names[i] for i in range(len(names)))


_MODES = {"fine": "gtFine", "coarse": "gtCoarse"}


class Cityscapes(SegDataset):
    """Cityscapes semantic segmentation, 19 trainIds, ignore 255.

    Args:
        root: directory holding ``leftImg8bit/`` and ``gtFine/`` (or ``gtCoarse/`` for ``mode="coarse"``).
        split: ``train``, ``val``, ``test`` (``train_extra`` with coarse).
        transforms: callable ``(image, label) -> (image, label)`` applied in ``__getitem__``.
        mode: ``"fine"`` or ``"coarse"``.

    ``dataset[i] -> (image HxWx3 uint8 RGB, label HxW int64 trainIds)`` (before transforms).
    """

    num_classes = 19
    ignore_index = 255

    def __init__(self, root, split: str = "train", transforms: Optional[Transform] = None, mode: str = "fine"):
        super().__init__(transforms)
        if mode not in _MODES:
            raise ValueError(f"Cityscapes mode must be one of {sorted(_MODES)}, got {mode!r}")
        gt = _MODES[mode]
        self.root = os.fspath(root)
        self.split = split
        self.mode = mode
        self.class_names = _class_names()
        self.lut = labelid_to_trainid_lut()
        layout = (f"expected the official layout {os.path.join(self.root, 'leftImg8bit', '{split}', '{city}', '')}"
                  f"{{city}}_{{seq}}_{{frame}}_leftImg8bit.png with labels "
                  f"{os.path.join(self.root, gt, '{split}', '{city}', '')}{{city}}_{{seq}}_{{frame}}_{gt}_labelIds.png")
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"Cityscapes root {self.root} does not exist; {layout}")
        for top in ("leftImg8bit", gt):
            d = os.path.join(self.root, top, split)
            if not os.path.isdir(d):
                have = sorted(os.listdir(os.path.join(self.root, top))) if os.path.isdir(
                    os.path.join(self.root, top)) else []
                raise FileNotFoundError(f"Cityscapes split directory {d} not found (splits present under "
                                        f"{os.path.join(self.root, top)}: {have or 'none'}); {layout}")
        images = sorted(glob.glob(os.path.join(self.root, "leftImg8bit", split, "*", "*_leftImg8bit.png")))
        if not images:
            raise FileNotFoundError(
                f"no images found by {os.path.join(self.root, 'leftImg8bit', split, '*', '*_leftImg8bit.png')}; "
                f"{layout}")
        suffix = f"_{gt}_labelIds.png"
        files = []
        for img in images:
            city = os.path.basename(os.path.dirname(img))
            stem = os.path.basename(img)[: -len("_leftImg8bit.png")]
            lbl = os.path.join(self.root, gt, split, city, stem + suffix)
            if not os.path.isfile(lbl):
                raise FileNotFoundError(f"image {img} has no label: expected {lbl}")
            files.append((img, lbl))
        self.files = files

    def read_label(self, path: str) -> np.ndarray:
        """HxW int64 trainIds of a ``*_labelIds.png`` (labelIds mapped through ``self.lut``)."""
        ids = read_index_png(path, "Cityscapes labelIds")
        return self.lut[ids].astype(np.int64)
