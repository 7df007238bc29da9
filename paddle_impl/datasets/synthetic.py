"""Writers of MINI datasets in the official Cityscapes and PASCAL VOC 2012 layouts.

The files are the same kinds, names and encodings as the real datasets, so the same readers (and third-party tools
that glob them, e.g. cityscapesscripts' `csCreateTrainIdLabelImgs`) work on both:

Cityscapes (``write_cityscapes``)::

    ROOT/leftImg8bit/{split}/{city}/{city}_{seq:06d}_{frame:06d}_leftImg8bit.png        RGB 8-bit PNG
    ROOT/gtFine/{split}/{city}/{city}_{seq:06d}_{frame:06d}_gtFine_labelIds.png         8-bit "L": labelIds
    ROOT/gtFine/{split}/{city}/..._gtFine_instanceIds.png                               16-bit: id*1000+k / id
    ROOT/gtFine/{split}/{city}/..._gtFine_color.png                                     RGBA, colours of the table
    ROOT/gtFine/{split}/{city}/..._gtFine_polygons.json                                 {imgHeight, imgWidth, objects}

  Every scene is a list of labelled polygons (as in the real ``*_polygons.json``) rasterised in order exactly as
  cityscapesscripts' ``json2labelImg`` / ``json2instanceImg`` do (PIL ``ImageDraw.polygon``), so running those tools
  on the written JSON reproduces the written PNGs bit for bit. Label ids come from
  ``cityscapesscripts.helpers.labels.labels`` (never hard-coded); void ids whose trainId is 255 (``unlabeled``,
  ``ego vehicle``, ``rectification border``, ``static``, ...) do occur, and ``license plate`` polygons (id -1) are in
  the JSON but, as in the real data, never drawn.

PASCAL VOC 2012 (``write_voc``)::

    ROOT/VOCdevkit/VOC2012/JPEGImages/{id}.jpg
    ROOT/VOCdevkit/VOC2012/SegmentationClass/{id}.png        palette ("P") PNG, standard VOC colour map,
                                                             indices 0..20 and 255 (object borders / void)
    ROOT/VOCdevkit/VOC2012/SegmentationObject/{id}.png       palette PNG of object indices, 255 borders
    ROOT/VOCdevkit/VOC2012/ImageSets/Segmentation/{train,val,trainval}.txt

Images have structure (regions of classes, each painted with its class colour plus per-object jitter, shading and
noise) so a model can learn something from them. Everything is deterministic given ``seed``: every image has its
own generator seeded from ``(seed, dataset, split, index)``, so writing ``n=2`` gives the first two images of
``n=4``.

A writer refuses a non-empty target directory unless ``overwrite=True``. It records what it wrote in
``ROOT/.segtwin_synthetic.json``; an overwrite first deletes the files listed there (and nothing else), then writes.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, List, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageDraw

from alignment.utils import parse_size

__all__ = [
    "CITIES",
    "MANIFEST",
    "VOC_CLASSES",
    "voc_colormap",
    "make_cityscapes_sample",
    "make_voc_sample",
    "write_cityscapes",
    "write_voc",
]

PathLike = Union[str, os.PathLike]

MANIFEST = ".segtwin_synthetic.json"

#: cities used per split (real Cityscapes city names of that split)
CITIES: Dict[str, Tuple[str, ...]] = {
    "train": ("aachen", "bochum"),
    "val": ("frankfurt",),
    "test": ("berlin",),
}

VOC_CLASSES: Tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)

_TAG_CITYSCAPES = 0
_TAG_VOC = 1
_SPLIT_INDEX = {"train": 0, "val": 1, "test": 2}


# ----------------------------------------------------------------------------------------------------------------------
# helpers

def voc_colormap(n: int = 256) -> np.ndarray:
    """The standard PASCAL VOC colour map, ``(n, 3) uint8``: bit-interleaving of the class index.

    Bit ``3*j + c`` of the index (c = 0 red, 1 green, 2 blue) becomes bit ``7 - j`` of that channel.
    """
    cmap = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        rgb = [0, 0, 0]
        c = i
        for j in range(8):
            for ch in range(3):
                rgb[ch] |= ((c >> ch) & 1) << (7 - j)
            c >>= 3
        cmap[i] = rgb
    return cmap


def _cs_labels():
    from cityscapesscripts.helpers.labels import labels  # cheap import (pure table)
    return labels


def _check_size(size) -> Tuple[int, int]:
    h, w = parse_size(size)
    if h < 8 or w < 8:
        raise ValueError(f"size must be at least 8x8 for a synthetic scene, got (H, W) = ({h}, {w})")
    return h, w


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in key])


def _rect(x0: int, y0: int, x1: int, y1: int) -> List[List[int]]:
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]


def _ellipse(cx: float, cy: float, rx: float, ry: float, h: int, w: int, m: int = 16) -> List[List[int]]:
    t = np.arange(m) * (2 * np.pi / m)
    xs = np.clip(np.rint(cx + rx * np.cos(t)), 0, w - 1).astype(int)
    ys = np.clip(np.rint(cy + ry * np.sin(t)), 0, h - 1).astype(int)
    return [[int(x), int(y)] for x, y in zip(xs, ys)]


def _random_shape(rng: np.random.Generator, h: int, w: int, frac=(0.12, 0.4)) -> List[List[int]]:
    bh = max(2, int(h * rng.uniform(*frac)))
    bw = max(2, int(w * rng.uniform(*frac)))
    y0 = int(rng.integers(0, max(1, h - bh)))
    x0 = int(rng.integers(0, max(1, w - bw)))
    if rng.random() < 0.5:
        return _rect(x0, y0, min(w - 1, x0 + bw), min(h - 1, y0 + bh))
    return _ellipse(x0 + bw / 2, y0 + bh / 2, bw / 2, bh / 2, h, w)


def _draw(polys: Sequence[Tuple[Sequence[Sequence[int]], int]], h: int, w: int, mode: str, background) -> np.ndarray:
    """Rasterise ``(polygon, value)`` pairs in order with PIL, as cityscapesscripts does."""
    img = Image.new(mode, (w, h), background)
    drawer = ImageDraw.Draw(img)
    for poly, value in polys:
        drawer.polygon([tuple(p) for p in poly], fill=value)
    return np.array(img)


def _paint(rng: np.random.Generator, colors: np.ndarray, class_map: np.ndarray, object_map: np.ndarray,
           n_objects: int) -> np.ndarray:
    """RGB uint8 image: class colour + per-object jitter + vertical shading + noise."""
    h, w = class_map.shape
    jitter = rng.normal(0.0, 14.0, size=(n_objects + 1, 3))
    img = colors[class_map].astype(np.float32) + jitter[object_map].astype(np.float32)
    shade = np.linspace(1.1, 0.85, h, dtype=np.float32)[:, None, None]
    img = img * shade + rng.normal(0.0, 8.0, size=(h, w, 3)).astype(np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------------------------
# Cityscapes

def make_cityscapes_sample(seed: int, split: str, index: int, size: Tuple[int, int] = (64, 128)) -> dict:
    """One synthetic Cityscapes frame, in memory (exactly what ``write_cityscapes`` writes for it).

    Returns a dict: ``image`` HxWx3 uint8 RGB, ``label_ids`` HxW uint8 (labelIds), ``instance_ids`` HxW int32,
    ``color`` HxWx4 uint8 RGBA, ``polygons`` (the JSON document as a dict).
    """
    labels = _cs_labels()
    name2label = {lb.name: lb for lb in labels}
    h, w = _check_size(size)
    if split not in _SPLIT_INDEX:
        raise ValueError(f"unknown Cityscapes split {split!r}; one of {sorted(_SPLIT_INDEX)}")
    rng = _rng(seed, _TAG_CITYSCAPES, _SPLIT_INDEX[split], index)

    void_frame = {"unlabeled", "ego vehicle", "rectification border", "out of roi", "license plate"}
    pool = [lb.name for lb in labels if 0 <= lb.id <= 255 and lb.name not in void_frame]
    objects: List[Tuple[str, List[List[int]]]] = []

    horizon = int(h * rng.uniform(0.3, 0.5))
    objects.append(("sky", _rect(0, 0, w - 1, horizon)))
    for _ in range(int(rng.integers(1, 4))):
        x0 = int(rng.integers(0, w - 1))
        x1 = min(w - 1, x0 + max(2, int(w * rng.uniform(0.15, 0.45))))
        top = int(rng.integers(0, max(1, horizon)))
        objects.append((str(rng.choice(["building", "wall", "vegetation", "fence"])), _rect(x0, top, x1, horizon)))
    objects.append((str(rng.choice(["sidewalk", "terrain", "ground", "parking"])),
                    _rect(0, horizon + 1, w - 1, h - 1)))
    objects.append(("road", [[0, h - 1], [w - 1, h - 1], [int(w * rng.uniform(0.55, 0.7)), horizon + 1],
                             [int(w * rng.uniform(0.3, 0.45)), horizon + 1]]))
    for _ in range(int(rng.integers(2, 6))):
        name = str(rng.choice(pool))
        if name2label[name].hasInstances and rng.random() < 0.2:
            name += "group"  # a crowd polygon, as in the real annotations (drawn with the plain id)
        objects.append((name, _random_shape(rng, h, w)))
    # a pole (thin structure) and a car with its license plate (id -1: kept in the JSON, never drawn)
    px = int(rng.integers(0, w - 2))
    objects.append(("pole", _rect(px, int(rng.integers(0, max(1, horizon))), px + max(1, w // 64), h - 1)))
    cw, ch = max(4, int(w * rng.uniform(0.15, 0.3))), max(3, int(h * rng.uniform(0.12, 0.25)))
    cx0 = int(rng.integers(0, w - cw))
    cy0 = int(rng.integers(horizon, max(horizon + 1, h - ch - 1)))
    objects.append(("car", _rect(cx0, cy0, cx0 + cw, cy0 + ch)))
    pw, ph = max(1, cw // 4), max(1, ch // 6)
    pcx = cx0 + cw // 2
    objects.append(("license plate", _rect(pcx - pw // 2, cy0 + ch - ph - 1, pcx + pw // 2, cy0 + ch - 1)))
    # frame voids: a rectification border column, an unlabeled patch, the ego-vehicle hood at the bottom
    objects.append(("rectification border", _rect(0, 0, max(0, w // 64), h - 1)))
    ux, uy = int(rng.integers(0, max(1, w - w // 8))), int(rng.integers(0, max(1, h - h // 8)))
    objects.append(("unlabeled", _rect(ux, uy, ux + max(1, w // 10), uy + max(1, h // 10))))
    objects.append(("ego vehicle", _ellipse(w / 2, h - 1, w * 0.45, max(2.0, h * 0.1), h, w, m=24)))

    def base(name: str):
        if name not in name2label and name.endswith("group"):
            return name2label[name[: -len("group")]], True
        return name2label[name], False

    id_polys, inst_polys, obj_polys = [], [], []
    n_inst = {lb.name: 0 for lb in labels if lb.hasInstances}
    for k, (name, poly) in enumerate(objects):
        lb, is_group = base(name)
        if lb.id < 0:  # license plate
            continue
        id_polys.append((poly, lb.id))
        inst = lb.id
        if lb.hasInstances and not is_group:
            inst = lb.id * 1000 + n_inst[lb.name]
            n_inst[lb.name] += 1
        inst_polys.append((poly, inst))
        obj_polys.append((poly, k + 1))
    bg = name2label["unlabeled"]
    label_ids = _draw(id_polys, h, w, "L", bg.id).astype(np.uint8)
    instance_ids = _draw(inst_polys, h, w, "I", bg.id).astype(np.int32)
    object_map = _draw(obj_polys, h, w, "I", 0).astype(np.int64)

    colors = np.zeros((256, 3), dtype=np.uint8)
    for lb in labels:
        if 0 <= lb.id <= 255:
            colors[lb.id] = lb.color
    color = np.concatenate([colors[label_ids], np.full((h, w, 1), 255, np.uint8)], axis=2)
    image = _paint(rng, colors, label_ids, object_map, len(objects))
    doc = {"imgHeight": h, "imgWidth": w,
           "objects": [{"label": name, "polygon": poly} for name, poly in objects]}
    return {"image": image, "label_ids": label_ids, "instance_ids": instance_ids, "color": color, "polygons": doc}


def write_cityscapes(root: PathLike, n: int = 4, size: Tuple[int, int] = (64, 128),
                     splits: Sequence[str] = ("train", "val"), seed: int = 0, overwrite: bool = False) -> dict:
    """Write a mini Cityscapes (gtFine) with ``n`` frames per split under ``root``; return a summary dict.

    Summary keys: ``dataset``, ``root``, ``layout`` (a dict of path patterns), ``size`` (H, W), ``seed``,
    ``splits`` ({split: {"images": n, "cities": [...]}}), ``label_ids`` (sorted labelIds present in the PNGs),
    ``files`` (number of files written), ``removed`` (files of a previous synthetic write removed by overwrite).
    """
    h, w = _check_size(size)
    n = _check_n(n)
    splits = tuple(splits)
    if not splits:
        raise ValueError("splits must name at least one split")
    for split in splits:
        if split not in CITIES:
            raise ValueError(f"unknown Cityscapes split {split!r}; one of {sorted(CITIES)}")
    root = Path(root)
    removed = _prepare_root(root, overwrite)

    written: List[str] = []
    present = set()
    summary_splits = {}
    for split in splits:
        cities = CITIES[split]
        used = []
        for i in range(n):
            city = cities[i % len(cities)]
            stem = f"{city}_{i // len(cities):06d}_{19:06d}"
            s = make_cityscapes_sample(seed, split, i, (h, w))
            img_dir = root / "leftImg8bit" / split / city
            gt_dir = root / "gtFine" / split / city
            img_dir.mkdir(parents=True, exist_ok=True)
            gt_dir.mkdir(parents=True, exist_ok=True)
            outs = {
                img_dir / f"{stem}_leftImg8bit.png": Image.fromarray(s["image"], "RGB"),
                gt_dir / f"{stem}_gtFine_labelIds.png": Image.fromarray(s["label_ids"], "L"),
                gt_dir / f"{stem}_gtFine_instanceIds.png": Image.fromarray(s["instance_ids"].astype(np.uint16)),
                gt_dir / f"{stem}_gtFine_color.png": Image.fromarray(s["color"], "RGBA"),
            }
            for path, im in outs.items():
                im.save(path)
                written.append(path.relative_to(root).as_posix())
            jpath = gt_dir / f"{stem}_gtFine_polygons.json"
            jpath.write_text(json.dumps(s["polygons"], indent=4))
            written.append(jpath.relative_to(root).as_posix())
            present.update(np.unique(s["label_ids"]).tolist())
            if city not in used:
                used.append(city)
        summary_splits[split] = {"images": n, "cities": used}

    summary = {
        "dataset": "cityscapes",
        "root": str(root),
        "layout": {
            "images": "leftImg8bit/{split}/{city}/{city}_{seq:06d}_{frame:06d}_leftImg8bit.png",
            "labels": "gtFine/{split}/{city}/{city}_{seq:06d}_{frame:06d}_gtFine_labelIds.png",
        },
        "size": [h, w],
        "seed": int(seed),
        "splits": summary_splits,
        "label_ids": sorted(int(v) for v in present),
        "files": len(written),
        "removed": removed,
    }
    _write_manifest(root, summary, written)
    return summary


# ----------------------------------------------------------------------------------------------------------------------
# PASCAL VOC 2012

def voc_image_id(k: int) -> str:
    """``k``-th synthetic VOC image id, in the official ``YYYY_NNNNNN`` style (unique for every k >= 0)."""
    return f"{2007 + k % 5}_{32 + 37 * k:06d}"


def make_voc_sample(seed: int, index: int, size: Tuple[int, int] = (64, 96)) -> dict:
    """One synthetic VOC image, in memory: ``image`` HxWx3 uint8 RGB (before JPEG), ``label`` HxW uint8 class
    indices (0..20, 255 on object borders and 'difficult' objects), ``object`` HxW uint8 object indices."""
    h, w = _check_size(size)
    rng = _rng(seed, _TAG_VOC, 0, index)
    k = int(rng.integers(1, 4))
    classes = [int(c) for c in rng.integers(1, len(VOC_CLASSES), size=k)]
    shapes = [_random_shape(rng, h, w, frac=(0.25, 0.6)) for _ in range(k)]
    label = _draw([(p, c) for p, c in zip(shapes, classes)], h, w, "L", 0)
    obj = _draw([(p, i + 1) for i, p in enumerate(shapes)], h, w, "L", 0)
    # void (255): a band on every object border, as in the official annotations, and sometimes a 'difficult' object
    kernel = np.ones((3, 3), np.uint8)
    import cv2  # local: keeps `import paddle_impl.datasets.synthetic` light

    border = cv2.dilate(obj, kernel) != cv2.erode(obj, kernel)
    if rng.random() < 0.3:
        d = _random_shape(rng, h, w, frac=(0.08, 0.15))
        border |= _draw([(d, 1)], h, w, "L", 0).astype(bool)
    label = label.copy()
    obj = obj.copy()
    label[border] = 255
    obj[border] = 255

    cmap = voc_colormap().astype(np.int64)
    colors = cmap.copy()
    colors[0] = rng.integers(60, 200, size=3)  # background: a random muted colour
    colors[255] = (128, 128, 128)
    image = _paint(rng, colors.astype(np.uint8), label, obj.astype(np.int64) % 255, k)
    return {"image": image, "label": label.astype(np.uint8), "object": obj.astype(np.uint8)}


def _palette_png(indices: np.ndarray) -> Image.Image:
    im = Image.fromarray(indices.astype(np.uint8), "P")
    im.putpalette(voc_colormap().reshape(-1).tolist())
    return im


def write_voc(root: PathLike, n: int = 4, size: Tuple[int, int] = (64, 96), seed: int = 0,
              overwrite: bool = False, year: int = 2012) -> dict:
    """Write a mini PASCAL VOC 2012 (``year=2007``: VOC2007 tree) segmentation set with ``n`` images in ``train``
    and ``n`` in ``val``.

    Summary keys: ``dataset``, ``root``, ``voc_dir`` (ROOT/VOCdevkit/VOC2012), ``layout``, ``size``, ``seed``,
    ``splits`` ({"train": {"images": n, "ids": [...]}, "val": ..., "trainval": ...}), ``classes`` (sorted class
    indices present, 255 included), ``files``, ``removed``.
    """
    h, w = _check_size(size)
    n = _check_n(n)
    if int(year) not in (2007, 2012):
        raise ValueError(f"year must be 2007 or 2012, got {year!r}")
    vname = f"VOC{int(year)}"
    root = Path(root)
    removed = _prepare_root(root, overwrite)
    voc = root / "VOCdevkit" / vname
    dirs = {d: voc / d for d in ("JPEGImages", "SegmentationClass", "SegmentationObject")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    lists = voc / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True, exist_ok=True)

    written: List[str] = []
    present = set()
    ids = {"train": [], "val": []}
    for k in range(2 * n):
        split = "train" if k < n else "val"
        image_id = voc_image_id(k)
        s = make_voc_sample(seed, k, (h, w))
        p = dirs["JPEGImages"] / f"{image_id}.jpg"
        Image.fromarray(s["image"], "RGB").save(p, quality=95)
        written.append(p.relative_to(root).as_posix())
        for key, d in (("label", "SegmentationClass"), ("object", "SegmentationObject")):
            p = dirs[d] / f"{image_id}.png"
            _palette_png(s[key]).save(p)
            written.append(p.relative_to(root).as_posix())
        present.update(np.unique(s["label"]).tolist())
        ids[split].append(image_id)
    ids = {s: sorted(v) for s, v in ids.items()}
    ids["trainval"] = sorted(ids["train"] + ids["val"])
    for split, v in ids.items():
        p = lists / f"{split}.txt"
        p.write_text("".join(f"{i}\n" for i in v))
        written.append(p.relative_to(root).as_posix())

    summary = {
        "dataset": "voc",
        "root": str(root),
        "voc_dir": str(voc),
        "layout": {
            "images": f"VOCdevkit/{vname}/JPEGImages/{{id}}.jpg",
            "labels": f"VOCdevkit/{vname}/SegmentationClass/{{id}}.png",
            "lists": f"VOCdevkit/{vname}/ImageSets/Segmentation/{{split}}.txt",
        },
        "year": int(year),
        "size": [h, w],
        "seed": int(seed),
        "splits": {s: {"images": len(v), "ids": v} for s, v in ids.items()},
        "classes": sorted(int(c) for c in present),
        "files": len(written),
        "removed": removed,
    }
    _write_manifest(root, summary, written)
    return summary


# ----------------------------------------------------------------------------------------------------------------------
# target directory handling

def _check_n(n) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive integer (images per split), got {n!r}")
    return int(n)


def _prepare_root(root: Path, overwrite: bool) -> int:
    """Create ``root`` or check it may be written; with ``overwrite`` delete what a previous synthetic write listed
    in its manifest (nothing else). Returns the number of files removed."""
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"target {root} exists and is not a directory")
    if not root.exists():
        root.mkdir(parents=True)
        return 0
    if not any(root.iterdir()):
        return 0
    if not overwrite:
        raise FileExistsError(
            f"refusing to write a synthetic dataset into non-empty directory {root} "
            f"(pass overwrite=True / --overwrite to replace a previous synthetic dataset there)")
    manifest = root / MANIFEST
    if not manifest.is_file():
        return 0
    try:
        listed = json.loads(manifest.read_text()).get("written", [])
    except (OSError, ValueError):
        listed = []
    removed = 0
    root_res = root.resolve()
    dirs = set()
    for rel in listed:
        p = (root / rel).resolve()
        if root_res not in p.parents:  # never follow a manifest outside the root
            continue
        if p.is_file():
            p.unlink()
            removed += 1
            dirs.update(q for q in p.parents if root_res in q.parents)
    for d in sorted(dirs, key=lambda q: len(q.parts), reverse=True):  # prune directories left empty
        try:
            d.rmdir()
        except OSError:
            pass
    manifest.unlink()
    return removed


def _write_manifest(root: Path, summary: dict, written: List[str]) -> None:
    doc = dict(summary)
    doc["written"] = written
    (root / MANIFEST).write_text(json.dumps(doc, indent=1))
