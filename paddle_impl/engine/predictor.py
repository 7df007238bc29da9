"""Prediction on image files: pseudo-colour label PNGs (palette mode "P") and blended overlays.

    from paddle_impl.engine.predictor import predict, palette_for
    predict(model, ["a.png", "dir/"], "out/", "cityscapes", mode="slide", crop=713, flip=True)

Directories are walked recursively and their layout kept (``leftImg8bit/val`` -> ``out/<city>/NAME.png``).
For each image ``NAME.ext``: ``out/NAME.png`` (mode "P": pixel values are the predicted class indices, the palette
gives the colours) and ``out/NAME_overlay.jpg`` (``alpha`` * colour + (1 - alpha) * image).
"""
from __future__ import annotations

import os
from typing import Callable, Iterable, List, Optional, Tuple, Union

import numpy as np
from PIL import Image

__all__ = ["predict", "palette_for", "cityscapes_palette", "voc_palette", "list_images", "list_image_names",
           "read_image",
           "save_label_png", "overlay", "IMAGE_EXTS"]

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def cityscapes_palette() -> np.ndarray:
    """(256, 3) uint8: trainId -> colour of cityscapesscripts' labels (first label of each trainId); rest black."""
    from cityscapesscripts.helpers.labels import labels

    pal = np.zeros((256, 3), dtype=np.uint8)
    seen = set()
    for lb in labels:
        if 0 <= lb.trainId < 255 and lb.trainId not in seen:
            seen.add(lb.trainId)
            pal[lb.trainId] = lb.color
    return pal


def voc_palette() -> np.ndarray:
    from ..datasets import voc_colormap
    return voc_colormap(256)


def palette_for(palette) -> np.ndarray:
    """``"cityscapes"``, ``"voc"`` or an (n <= 256, 3) array-like -> (256, 3) uint8."""
    if isinstance(palette, str):
        key = palette.lower()
        if key == "cityscapes":
            return cityscapes_palette()
        if key in ("voc", "pascal", "pascal_voc"):
            return voc_palette()
        raise ValueError(f"unknown palette {palette!r}: 'cityscapes', 'voc' or an (n, 3) array")
    pal = np.asarray(palette)
    if pal.ndim != 2 or pal.shape[1] != 3 or not 0 < pal.shape[0] <= 256:
        raise ValueError(f"palette must be (n <= 256, 3), got shape {pal.shape}")
    out = np.zeros((256, 3), dtype=np.uint8)
    out[:pal.shape[0]] = pal.astype(np.uint8)
    return out


def list_images(paths: Union[str, os.PathLike, Iterable]) -> List[str]:
    """Files and directories -> a list of image paths (see ``list_image_names``)."""
    return [path for path, _ in list_image_names(paths)]


def list_image_names(paths: Union[str, os.PathLike, Iterable]) -> List[Tuple[str, str]]:
    """``[(image path, output name)]``: a file is named by its stem; a directory is walked recursively (sorted;
    e.g. Cityscapes ``leftImg8bit/val/<city>/``) and each image named by its path relative to that directory,
    without the extension (``frankfurt/frankfurt_000000_000294_leftImg8bit``), so the output keeps the layout."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out = []
    for p in paths:
        p = os.fspath(p)
        if os.path.isdir(p):
            found = []
            for d, subdirs, files in os.walk(p):
                subdirs.sort()
                found += [os.path.join(d, f) for f in sorted(files) if f.lower().endswith(IMAGE_EXTS)]
            if not found:
                raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTS)}) in directory {p} or below it")
            out += [(f, os.path.splitext(os.path.relpath(f, p))[0]) for f in found]
        elif os.path.isfile(p):
            out.append((p, os.path.splitext(os.path.basename(p))[0]))
        else:
            raise FileNotFoundError(f"image {p} does not exist")
    return out


def read_image(path) -> np.ndarray:
    """HxWx3 uint8 RGB; OSError naming the file when it is missing, truncated or not an image."""
    import cv2

    path = os.fspath(path)
    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None:
        raise OSError(f"cannot read image {path} (missing, truncated or not an image)")
    return np.ascontiguousarray(img[:, :, ::-1])


def save_label_png(pred: np.ndarray, path, palette) -> str:
    """HxW class indices (0..255) -> palette PNG."""
    pred = np.asarray(pred)
    if pred.size and (pred.min() < 0 or pred.max() > 255):
        raise ValueError(f"class indices must be in [0, 255] for a palette PNG, got [{pred.min()}, {pred.max()}]")
    im = Image.fromarray(pred.astype(np.uint8), mode="P")
    im.putpalette(palette_for(palette).reshape(-1).tolist())
    path = os.fspath(path)
    im.save(path)
    return path


def overlay(image: np.ndarray, pred: np.ndarray, palette, alpha: float = 0.5) -> np.ndarray:
    """alpha * colour(pred) + (1 - alpha) * image, uint8 HxWx3."""
    colour = palette_for(palette)[np.asarray(pred).astype(np.int64)].astype(np.float32)
    out = alpha * colour + (1 - alpha) * np.asarray(image, np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def predict(model, paths, out_dir, palette, *, alpha: float = 0.5, overlay_ext: str = ".jpg",
            reader: Callable = read_image, predict_fn: Optional[Callable] = None, progress: bool = False,
            **predict_kw) -> List[dict]:
    """Predict every image of ``paths`` (files / directories) and write ``out_dir/NAME.png`` (palette PNG of the
    class indices) and ``out_dir/NAME_overlay{overlay_ext}``. ``predict_kw`` go to
    ``evaluator.predict_logits`` (mode, crop, stride, flip, scales, normalize, size_rule, base_size).
    ``predict_fn(image) -> HxW int`` replaces the model call (e.g. an exported predictor); then ``model`` may be None.
    Returns one dict per image: ``image``, ``label`` (png path), ``overlay`` (path), ``classes`` (present indices).
    """
    from .evaluator import predict_label

    if overlay_ext.lower() not in (".jpg", ".jpeg", ".png"):
        raise ValueError(f"overlay_ext must be .jpg or .png, got {overlay_ext!r}")
    pal = palette_for(palette)
    files = list_image_names(paths)
    os.makedirs(out_dir, exist_ok=True)
    if model is not None and hasattr(model, "eval"):
        model.eval()
    it = files
    if progress:
        try:
            from tqdm import tqdm
            it = tqdm(files, desc="predict", unit="img")
        except ImportError:  # pragma: no cover
            pass
    results = []
    used = set()
    for path, stem in it:
        image = reader(path)
        pred = predict_fn(image) if predict_fn is not None else predict_label(model, image, **predict_kw)
        name, k = stem, 1
        while name in used:  # the same name from two arguments
            name, k = f"{stem}_{k}", k + 1
        used.add(name)
        os.makedirs(os.path.dirname(os.path.join(out_dir, name)), exist_ok=True)
        label_path = save_label_png(pred, os.path.join(out_dir, name + ".png"), pal)
        ov_path = os.path.join(out_dir, name + "_overlay" + overlay_ext)
        Image.fromarray(overlay(image, pred, pal, alpha)).save(ov_path, quality=95) \
            if overlay_ext.lower() != ".png" else Image.fromarray(overlay(image, pred, pal, alpha)).save(ov_path)
        results.append({"image": path, "label": label_path, "overlay": ov_path,
                        "classes": np.unique(pred).astype(int).tolist()})
    return results
