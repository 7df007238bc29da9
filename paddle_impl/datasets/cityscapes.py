"""Cityscapes reader (official layout), and the base class shared with the VOC reader.

Layout (as downloaded: ``leftImg8bit_trainvaltest.zip`` + ``gtFine_trainvaltest.zip``)::

    ROOT/leftImg8bit/{split}/{city}/{city}_{seq}_{frame}_leftImg8bit.png
    ROOT/gtFine/{split}/{city}/{city}_{seq}_{frame}_gtFine_labelIds.png      (mode="coarse": gtCoarse/..._gtCoarse_)

Labels: when ``..._gtFine_labelTrainIds.png`` (written by cityscapesscripts' ``csCreateTrainIdLabelImgs``, used by
PaddleSeg / mmseg) exists next to the ``_labelIds.png`` it is PREFERRED and read as trainIds directly (values must be
0..18 or 255). Otherwise the official **labelIds** PNG is mapped to the 19 trainIds at load time through a 256-entry
lookup table built from ``cityscapesscripts.helpers.labels.labels`` (ids whose trainId is 255 or -1 -> 255; an id
not in the table is an error naming the file and the value). No preprocessing is needed; ``prefer_train_ids=False``
always uses the labelIds.

``list_file`` (PaddleSeg ``train_path`` style) replaces the directory scan: lines ``IMAGE LABEL`` relative to ROOT
(or absolute); a label named ``*labelIds.png`` (but not ``*labelTrainIds.png``) is mapped through the table, any other
label is read as trainIds.

The public ``test`` split has no labels: a ``test`` split without label files is refused with a message saying so.
"""
from __future__ import annotations

import glob
import os
from typing import Callable, List, Optional, Tuple

import numpy as np
import paddle.io

__all__ = ["Cityscapes", "SegDataset", "labelid_to_trainid_lut", "read_rgb", "read_index_png", "check_label_values",
           "check_label_ids", "read_list_file"]

Transform = Callable[[np.ndarray, np.ndarray], Tuple[np.ndarray, np.ndarray]]


# ----------------------------------------------------------------------------------------------------------------------
# shared by the readers

def read_rgb(path: str) -> np.ndarray:
    """HxWx3 uint8 RGB of an image file (cv2 decode, BGR -> RGB); OSError naming the file if it cannot be read or
    is truncated (a JPEG without its end-of-image marker: cv2 would silently return a partly grey image)."""
    import cv2

    try:
        data = np.fromfile(str(path), dtype=np.uint8)
    except OSError as e:
        raise OSError(f"cannot read image {path}: {e}") from e
    img = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if img is None:
        raise OSError(f"cannot read image {path} (missing, empty, truncated or not an image)")
    if data[:2].tobytes() == b"\xff\xd8" and b"\xff\xd9" not in data[-1024:].tobytes():
        raise OSError(f"image {path} is a truncated JPEG (no end-of-image marker; {data.size} bytes)")
    return np.ascontiguousarray(img[:, :, ::-1])


def check_label_values(label: np.ndarray, num_classes: int, ignore_index: int, path: str) -> None:
    """ValueError naming the file and the values when ``label`` holds a value that is neither a class
    (0..num_classes-1) nor ``ignore_index``. Fast path: one ``max`` when every value is a class."""
    if label.size == 0:
        return
    if int(label.min()) >= 0 and int(label.max()) < num_classes:
        return
    vals = np.unique(label)
    bad = [int(v) for v in vals if not (0 <= v < num_classes or v == ignore_index)]
    if bad:
        shown = ", ".join(str(v) for v in bad[:10]) + (" ..." if len(bad) > 10 else "")
        raise ValueError(f"label {path} holds value(s) {shown} that are neither a class (0..{num_classes - 1}) "
                         f"nor the ignore index {ignore_index}")


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


def read_list_file(list_file: str, base: str, what: str = "list file") -> List[Tuple[str, str]]:
    """``[(image, label)]`` from a PaddleSeg-style list: one ``IMAGE LABEL`` pair a line, paths relative to ``base``
    (a leading ``/`` is stripped, as semseg's lists have one) or absolute; blank lines skipped. Errors name the
    file and line."""
    if not os.path.isfile(list_file):
        raise FileNotFoundError(f"{what} {list_file} not found")
    files = []
    with open(list_file) as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2:
                raise ValueError(f"{list_file}:{lineno}: expected 'IMAGE LABEL', got {line.strip()!r}")
            img, lbl = (p if os.path.isfile(p) and os.path.isabs(p) else os.path.join(base, p.lstrip("/"))
                        for p in parts)
            if not os.path.isfile(img):
                raise FileNotFoundError(f"{list_file}:{lineno}: image {img} not found")
            if not os.path.isfile(lbl):
                raise FileNotFoundError(f"{list_file}:{lineno}: image {img} has no label: expected {lbl}")
            files.append((img, lbl))
    if not files:
        raise FileNotFoundError(f"{what} {list_file} names no images")
    return files


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


def _known_label_ids() -> np.ndarray:
    """Sorted labelIds of cityscapesscripts' table that a labelIds PNG can hold (0..33; -1 is never written)."""
    from cityscapesscripts.helpers.labels import labels

    return np.array(sorted({lb.id for lb in labels if 0 <= lb.id <= 255}), dtype=np.int64)


def check_label_ids(ids: np.ndarray, path: str) -> None:
    """ValueError naming the file and the values when a labelIds PNG holds an id outside cityscapesscripts' table
    (such a pixel would otherwise be mapped to 'ignore' without a word)."""
    known = _known_label_ids()
    if ids.size == 0 or (int(ids.min()) >= int(known[0]) and int(ids.max()) <= int(known[-1])
                         and known.size == int(known[-1]) - int(known[0]) + 1):
        return
    vals = np.unique(ids)
    bad = [int(v) for v in vals if v not in set(known.tolist())]
    if bad:
        shown = ", ".join(str(v) for v in bad[:10]) + (" ..." if len(bad) > 10 else "")
        raise ValueError(f"label {path} holds labelId value(s) {shown} that are not in cityscapesscripts' label table "
                         f"(ids {int(known[0])}..{int(known[-1])})")


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
        split: ``train``, ``val``, ``test`` (``train_extra`` with coarse). ``test`` has no public labels and is
            refused when its label files are absent.
        transforms: callable ``(image, label) -> (image, label)`` applied in ``__getitem__``.
        mode: ``"fine"`` or ``"coarse"``.
        list_file: optional PaddleSeg-style list (``IMAGE LABEL`` lines relative to ``root``) replacing the scan.
        prefer_train_ids: use ``*_labelTrainIds.png`` when present (default True).

    ``dataset[i] -> (image HxWx3 uint8 RGB, label HxW int64 trainIds)`` (before transforms).
    """

    num_classes = 19
    ignore_index = 255

    def __init__(self, root, split: str = "train", transforms: Optional[Transform] = None, mode: str = "fine",
                 list_file: Optional[str] = None, prefer_train_ids: bool = True):
        super().__init__(transforms)
        if mode not in _MODES:
            raise ValueError(f"Cityscapes mode must be one of {sorted(_MODES)}, got {mode!r}")
        gt = _MODES[mode]
        self.root = os.fspath(root)
        self.split = split
        self.mode = mode
        self.prefer_train_ids = bool(prefer_train_ids)
        self.class_names = _class_names()
        self.lut = labelid_to_trainid_lut()
        layout = (f"expected the official layout {os.path.join(self.root, 'leftImg8bit', '{split}', '{city}', '')}"
                  f"{{city}}_{{seq}}_{{frame}}_leftImg8bit.png with labels "
                  f"{os.path.join(self.root, gt, '{split}', '{city}', '')}{{city}}_{{seq}}_{{frame}}_{gt}_labelIds.png"
                  f" (or _labelTrainIds.png)")
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"Cityscapes root {self.root} does not exist; {layout}")
        if list_file is not None:
            lf = os.fspath(list_file)
            if not os.path.isabs(lf) and not os.path.isfile(lf):
                lf = os.path.join(self.root, lf)
            self.list_file = lf
            self.files = read_list_file(lf, self.root, "Cityscapes list file")
            return
        self.list_file = None
        no_labels = (f"the Cityscapes {split!r} split has no labels here ({os.path.join(self.root, gt, split)}); "
                     f"the official test labels are not public, so this split cannot be used for training or "
                     f"evaluation (use 'train' / 'val', or run prediction on the images)")
        for top in ("leftImg8bit", gt):
            d = os.path.join(self.root, top, split)
            if not os.path.isdir(d):
                if top == gt and split == "test" and os.path.isdir(os.path.join(self.root, "leftImg8bit", split)):
                    raise FileNotFoundError(no_labels)
                have = sorted(os.listdir(os.path.join(self.root, top))) if os.path.isdir(
                    os.path.join(self.root, top)) else []
                raise FileNotFoundError(f"Cityscapes split directory {d} not found (splits present under "
                                        f"{os.path.join(self.root, top)}: {have or 'none'}); {layout}")
        images = sorted(glob.glob(os.path.join(self.root, "leftImg8bit", split, "*", "*_leftImg8bit.png")))
        if not images:
            raise FileNotFoundError(
                f"no images found by {os.path.join(self.root, 'leftImg8bit', split, '*', '*_leftImg8bit.png')}; "
                f"{layout}")
        files = []
        for img in images:
            city = os.path.basename(os.path.dirname(img))
            stem = os.path.basename(img)[: -len("_leftImg8bit.png")]
            base = os.path.join(self.root, gt, split, city, stem)
            lbl = base + f"_{gt}_labelIds.png"
            train_ids = base + f"_{gt}_labelTrainIds.png"
            if self.prefer_train_ids and os.path.isfile(train_ids):
                lbl = train_ids
            elif not os.path.isfile(lbl):
                if split == "test":
                    raise FileNotFoundError(f"{no_labels}; first image without a label: {img}")
                raise FileNotFoundError(f"image {img} has no label: expected {lbl}")
            files.append((img, lbl))
        self.files = files

    def read_label(self, path: str) -> np.ndarray:
        """HxW int64 trainIds: ``*labelTrainIds.png`` (or any non-labelIds list entry) read directly and checked
        (0..18 / 255), ``*_labelIds.png`` mapped through ``self.lut``."""
        name = os.path.basename(path)
        if name.endswith("labelIds.png") and not name.endswith("labelTrainIds.png"):
            ids = read_index_png(path, "Cityscapes labelIds")
            check_label_ids(ids, path)
            return self.lut[ids].astype(np.int64)
        ids = read_index_png(path, "Cityscapes labelTrainIds")
        check_label_values(ids, self.num_classes, self.ignore_index, path)
        return ids.astype(np.int64)
