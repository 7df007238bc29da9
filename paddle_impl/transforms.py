"""Train / eval transforms for semantic segmentation (numpy + cv2, framework-neutral).

Every transform is a callable ``(image, label) -> (image, label)``: ``image`` HxWxC (uint8 or float32, any
channel order; ``ToCHW`` makes it CxHxW), ``label`` HxW integer (int64 from the readers). Geometric transforms move
image and label together; the label is always resampled with nearest neighbour and padded with ``ignore_index``
(255), the image is padded with ``pad_value`` (the mean pixel, so it normalises to 0).

Sizes are ``(H, W)`` everywhere (an int means square); cv2's ``(W, H)`` order stays inside this module.

The augmentations follow hszhao/semseg ``util/transform.py`` (its training recipe: docs/references.md, section 2)::

    RandomScale([0.5, 2.0]) -> RandomRotate([-10, 10], p=0.5, pad mean) -> RandomGaussianBlur(p=0.5, k=5)
    -> RandomHorizontalFlip(0.5) -> RandomCrop(crop, pad mean / 255) -> Normalize(mean*255, std*255)

(``semseg_train_transforms`` builds exactly this list; semseg works on float32 images, hence ``ToFloat32`` first.)
PaddleSeg's transforms (``ResizeStepScaling``, ``RandomPaddingCrop``, ``RandomDistort``) and DANet's
(``RandomResizeLong``: junfu1115/DANet's long-side rescale; ``RandomColorJitter``: torchvision ColorJitter with a
probability) are here too.
Padding/rotation must come BEFORE ``Normalize`` (their pad value is a pixel value).

Randomness: each random transform owns a ``numpy.random.Generator`` (``rng=`` a Generator, an int seed, or None for
fresh OS entropy); nothing uses numpy's or Python's global random state. ``Compose(..., seed=S)`` (or
``.reseed(S)``) gives every random child its own independent stream spawned from ``S``; ``state_dict()`` /
``set_state_dict()`` save and restore all streams (for exact resume). In DataLoader worker processes pass
``worker_init_fn=reseed_worker`` so workers do not replay the same augmentations.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np

from alignment.utils import parse_size

__all__ = [
    "SEMSEG_MEAN", "SEMSEG_STD", "IMAGENET_MEAN", "IMAGENET_STD", "DETECTRON2_MEAN_BGR", "DETECTRON2_STD_BGR",
    "Compose", "ToFloat32", "Normalize", "ToCHW", "Resize", "ResizeLong", "PadToSize", "CenterCrop",
    "RandomScale", "RandomCrop", "RandomHorizontalFlip", "RandomRotate", "RandomGaussianBlur",
    "TRANSFORMS", "build_transforms", "semseg_train_transforms", "semseg_val_transforms",
    "eval_batch", "reseed_worker",
    "ResizeStepScaling", "RandomPaddingCrop", "RandomDistort", "NORMALIZE_PRESETS", "TRANSFORM_ALIASES",
    "WorkerSeeder", "seed_transforms", "RandomResizeLong", "RandomColorJitter", "long_side_size",
    "ResizeShortestEdge", "RandomCropCategoryArea", "ColorAugSSD",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: semseg convention (RGB, 0..255 pixel scale)
SEMSEG_MEAN = tuple(m * 255 for m in IMAGENET_MEAN)
SEMSEG_STD = tuple(s * 255 for s in IMAGENET_STD)
#: detectron2 MSRA/caffe convention (BGR, std 1)
DETECTRON2_MEAN_BGR = (103.53, 116.28, 123.675)
DETECTRON2_STD_BGR = (1.0, 1.0, 1.0)

#: input conventions of each upstream (docs/references.md, section 1); mean/std in OUTPUT channel order
NORMALIZE_PRESETS: Dict[str, Dict[str, Any]] = {
    "semseg": {"mean": SEMSEG_MEAN, "std": SEMSEG_STD, "scale": 1.0, "to_bgr": False},
    "danet": {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "scale": 1.0 / 255, "to_bgr": False},
    "nvidia": {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "scale": 1.0 / 255, "to_bgr": False},
    "mmseg": {"mean": (123.675, 116.28, 103.53), "std": (58.395, 57.12, 57.375), "scale": 1.0, "to_bgr": False},
    "detectron2": {"mean": DETECTRON2_MEAN_BGR, "std": DETECTRON2_STD_BGR, "scale": 1.0, "to_bgr": True},
    "paddleseg": {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "scale": 1.0 / 255, "to_bgr": False},
}

Size = Union[int, Sequence[int]]
RngLike = Union[None, int, np.random.Generator, np.random.SeedSequence]

_INTERP = {
    "nearest": cv2.INTER_NEAREST,
    "linear": cv2.INTER_LINEAR,
    "bilinear": cv2.INTER_LINEAR,
    "cubic": cv2.INTER_CUBIC,
    "bicubic": cv2.INTER_CUBIC,
    "area": cv2.INTER_AREA,
    "lanczos": cv2.INTER_LANCZOS4,
}


# ----------------------------------------------------------------------------------------------------------------------
# helpers

def _interp(interp) -> int:
    if isinstance(interp, str):
        try:
            return _INTERP[interp.lower()]
        except KeyError:
            raise ValueError(f"unknown interpolation {interp!r}; one of {sorted(_INTERP)}") from None
    return int(interp)


def _as_rng(rng: RngLike) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


def _check_pair(image: np.ndarray, label: np.ndarray) -> None:
    if image.ndim not in (2, 3) or label.ndim != 2 or image.shape[:2] != label.shape:
        raise ValueError(f"expected image HxW[xC] and label HxW of the same H, W; got image {image.shape}, "
                         f"label {label.shape} (apply ToCHW last)")


def _fill(image: np.ndarray, pad_value) -> Tuple[float, ...]:
    """The pad value as cv2 wants it for this image's channels/dtype (rounded and clipped for uint8)."""
    c = 1 if image.ndim == 2 else image.shape[2]
    v = np.asarray(pad_value, dtype=np.float64).reshape(-1)
    if v.size == 1:
        v = np.full(c, v[0])
    elif v.size != c:
        raise ValueError(f"pad_value has {v.size} values for an image of {c} channels")
    if c > 4:
        raise ValueError(f"padding supports at most 4 channels, image has {c}")
    if image.dtype == np.uint8:
        v = np.clip(np.rint(v), 0, 255)
    return tuple(float(x) for x in v) + (0.0,) * (4 - c)


def _label_cv(label: np.ndarray, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Apply a cv2 nearest-neighbour op to an integer label of any dtype without changing a value (cv2 has no
    int64): via uint8 when the values fit, else int32."""
    if label.dtype == np.uint8:
        return fn(label)
    lo, hi = (int(label.min()), int(label.max())) if label.size else (0, 0)
    if 0 <= lo and hi <= 255:
        return fn(label.astype(np.uint8)).astype(label.dtype)
    if np.iinfo(np.int32).min <= lo and hi <= np.iinfo(np.int32).max:
        return fn(label.astype(np.int32)).astype(label.dtype)
    raise ValueError("label values do not fit in int32")


def _resize(image: np.ndarray, label: np.ndarray, h: int, w: int, interp: int):
    img = cv2.resize(image, (w, h), interpolation=interp)
    if image.ndim == 3 and img.ndim == 2:  # cv2 drops a trailing channel of 1
        img = img[:, :, None]
    lbl = _label_cv(label, lambda x: cv2.resize(x, (w, h), interpolation=cv2.INTER_NEAREST))
    return img, lbl


def _pad(image: np.ndarray, label: np.ndarray, h: int, w: int, pad_value, ignore_index: int, center: bool = True):
    """Pad to at least (h, w): centred (semseg: half = pad // 2 on top/left) or at bottom/right."""
    ih, iw = label.shape
    ph, pw = max(h - ih, 0), max(w - iw, 0)
    if ph == 0 and pw == 0:
        return image, label
    top, left = (ph // 2, pw // 2) if center else (0, 0)
    bottom, right = ph - top, pw - left
    img = cv2.copyMakeBorder(image, top, bottom, left, right, cv2.BORDER_CONSTANT, value=_fill(image, pad_value))
    if image.ndim == 3 and img.ndim == 2:
        img = img[:, :, None]
    lbl = np.pad(label, ((top, bottom), (left, right)), mode="constant", constant_values=ignore_index)
    return img, lbl


def long_side_size(h: int, w: int, long_size: int) -> Tuple[int, int]:
    """(H', W') with the LONG side ``long_size`` and the short side ``int(short * long_size / long + 0.5)`` (the
    aspect kept, rounded half up as junfu1115/DANet does; a square image: both sides ``long_size``)."""
    if h > w:
        return int(long_size), max(1, int(w * long_size / h + 0.5))
    return max(1, int(h * long_size / w + 0.5)), int(long_size)


# ----------------------------------------------------------------------------------------------------------------------
# base classes

class Transform:
    """Deterministic transform: ``__call__(image, label) -> (image, label)``."""

    random = False

    def __call__(self, image: np.ndarray, label: np.ndarray):  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if k != "rng")
        return f"{type(self).__name__}({args})"


class RandomTransform(Transform):
    """A transform drawing from its own ``numpy.random.Generator`` (``rng``: Generator, int seed or None)."""

    random = True

    def __init__(self, rng: RngLike = None):
        self.rng = _as_rng(rng)

    def reseed(self, seed: RngLike) -> None:
        self.rng = _as_rng(seed)


class Compose(Transform):
    """Apply ``transforms`` in order. ``seed`` (optional) reseeds every random child from one seed: child k gets
    stream k of ``SeedSequence(seed).spawn(...)``, so the result depends on the seed and the list only."""

    def __init__(self, transforms: Iterable[Callable], seed: RngLike = None):
        self.transforms = list(transforms)
        for t in self.transforms:
            if not callable(t):
                raise TypeError(f"Compose expects callables (image, label) -> (image, label), got {t!r}")
        if seed is not None:
            self.reseed(seed)

    def __call__(self, image, label):
        for t in self.transforms:
            image, label = t(image, label)
        return image, label

    def _random_children(self) -> List[Any]:
        return [t for t in self.transforms if hasattr(t, "reseed")]

    def reseed(self, seed: RngLike) -> None:
        """Give every random child an independent stream derived from ``seed`` (int, SeedSequence or Generator)."""
        if isinstance(seed, np.random.Generator):
            seed = np.random.SeedSequence(int(seed.integers(0, 2 ** 63)))
        ss = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
        children = self._random_children()
        for t, s in zip(children, ss.spawn(len(children))):
            t.reseed(s)

    def state_dict(self) -> List[Any]:
        """Bit-generator states of the random children (JSON/pickle-able), in order."""
        out = []
        for t in self.transforms:
            if isinstance(t, Compose):
                out.append(t.state_dict())
            elif isinstance(getattr(t, "rng", None), np.random.Generator):
                out.append(t.rng.bit_generator.state)
            else:
                out.append(None)
        return out

    def set_state_dict(self, state: List[Any]) -> None:
        if len(state) != len(self.transforms):
            raise ValueError(f"state has {len(state)} entries for {len(self.transforms)} transforms")
        for t, s in zip(self.transforms, state):
            if s is None:
                continue
            if isinstance(t, Compose):
                t.set_state_dict(s)
            else:
                t.rng.bit_generator.state = s

    def __repr__(self) -> str:
        inner = ",\n    ".join(repr(t) for t in self.transforms)
        return f"Compose([\n    {inner}\n])"


# ----------------------------------------------------------------------------------------------------------------------
# deterministic transforms

class ToFloat32(Transform):
    """image -> float32 (semseg works on float32 pixels 0..255); label -> int64."""

    def __call__(self, image, label):
        return image.astype(np.float32, copy=False), label.astype(np.int64, copy=False)


class Normalize(Transform):
    """``(image - mean) / std`` in float32, per channel, image stays HxWxC.

    Defaults: semseg's RGB mean/std on the 0..255 scale (same values as "[0, 1] then ImageNet mean/std" used by
    DANet / NVIDIA). Channel order: our readers give RGB. ``to_rgb=True`` reverses the channels first (an image read
    BGR by cv2 -> RGB, mmseg's flag); ``to_bgr=True`` reverses them too (RGB -> BGR, for detectron2 models, with
    ``DETECTRON2_MEAN_BGR`` / ``DETECTRON2_STD_BGR``); None/False keeps the order. mean/std are given in the OUTPUT
    channel order. ``scale`` multiplies the pixels first (``1/255``: "[0, 1] then mean/std").

    ``preset`` names a reference's convention (``NORMALIZE_PRESETS``; explicit arguments override it):
    ``semseg`` (RGB, ImageNet mean/std x255), ``danet`` / ``nvidia`` (RGB, /255 then ImageNet mean/std), ``mmseg``
    (RGB, 123.675/116.28/103.53, 58.395/57.12/57.375), ``detectron2`` (BGR, MSRA means 103.53/116.28/123.675,
    std 1), ``paddleseg`` (RGB, /255 then mean 0.5 std 0.5: PaddleSeg's ``Normalize`` default).
    """

    def __init__(self, mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                 to_rgb: Optional[bool] = None, to_bgr: Optional[bool] = None, scale: Optional[float] = None,
                 preset: Optional[str] = None):
        if preset is not None:
            if preset not in NORMALIZE_PRESETS:
                raise ValueError(f"unknown Normalize preset {preset!r}; one of {sorted(NORMALIZE_PRESETS)}")
            p = NORMALIZE_PRESETS[preset]
            mean = p["mean"] if mean is None else mean
            std = p["std"] if std is None else std
            scale = p["scale"] if scale is None else scale
            to_bgr = p["to_bgr"] if to_bgr is None else to_bgr
        self.preset = preset
        mean = SEMSEG_MEAN if mean is None else mean
        std = SEMSEG_STD if std is None else std
        self.scale = 1.0 if scale is None else float(scale)
        if to_rgb and to_bgr:
            raise ValueError("to_rgb and to_bgr both reverse the channels; give one")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        if len(self.mean) != len(self.std):
            raise ValueError(f"mean {self.mean} and std {self.std} differ in length")
        if any(s == 0 for s in self.std):
            raise ValueError(f"std must be non-zero, got {self.std}")
        self.to_rgb = bool(to_rgb)
        self.to_bgr = bool(to_bgr)

    def __call__(self, image, label):
        img = image.astype(np.float32)
        if self.scale != 1.0:
            img = img * np.float32(self.scale)
        if self.to_rgb or self.to_bgr:
            img = img[..., ::-1]
        mean = np.asarray(self.mean, np.float32)
        std = np.asarray(self.std, np.float32)
        return np.ascontiguousarray((img - mean) / std, dtype=np.float32), label


class ToCHW(Transform):
    """image HxWxC -> CxHxW (contiguous); label -> contiguous int64 HxW. Apply last."""

    def __call__(self, image, label):
        if image.ndim == 2:
            image = image[:, :, None]
        return (np.ascontiguousarray(image.transpose(2, 0, 1)),
                np.ascontiguousarray(label, dtype=np.int64))


class Resize(Transform):
    """Resize to ``size`` (H, W) exactly; image with ``interp``, label nearest (semseg's test-time Resize)."""

    def __init__(self, size: Optional[Size] = None, interp: Union[str, int] = "linear",
                 target_size: Optional[Size] = None):
        if (size is None) == (target_size is None):
            raise ValueError("Resize needs exactly one of size (H, W) or target_size (PaddleSeg's (W, H))")
        if target_size is not None:  # PaddleSeg: target_size is (width, height)
            tw, th = parse_size(target_size, "target_size")
            size = (th, tw)
        self.size = parse_size(size)
        self.interp = interp
        self._interp = _interp(interp)

    def __call__(self, image, label):
        _check_pair(image, label)
        return _resize(image, label, *self.size, self._interp)


class ResizeLong(Transform):
    """Resize keeping the aspect ratio so that the LONG side is ``long_size`` (semseg test: base_size)."""

    def __init__(self, long_size: int, interp: Union[str, int] = "linear"):
        if int(long_size) <= 0:
            raise ValueError(f"long_size must be positive, got {long_size}")
        self.long_size = int(long_size)
        self.interp = interp
        self._interp = _interp(interp)

    def __call__(self, image, label):
        _check_pair(image, label)
        h, w = label.shape
        if h >= w:
            nh, nw = self.long_size, max(1, int(round(w * self.long_size / h)))
        else:
            nh, nw = max(1, int(round(h * self.long_size / w))), self.long_size
        return _resize(image, label, nh, nw, self._interp)


class PadToSize(Transform):
    """Pad to at least ``size`` (H, W), centred (semseg) or at the bottom/right (``center=False``); image with
    ``pad_value`` (default: the semseg mean pixel), label with ``ignore_index``. Never crops."""

    def __init__(self, size: Size, pad_value=SEMSEG_MEAN, ignore_index: int = 255, center: bool = True):
        self.size = parse_size(size)
        self.pad_value = pad_value
        self.ignore_index = int(ignore_index)
        self.center = bool(center)

    def __call__(self, image, label):
        _check_pair(image, label)
        return _pad(image, label, *self.size, self.pad_value, self.ignore_index, self.center)


class CenterCrop(Transform):
    """semseg ``Crop(crop_type='center')``: pad (centred, mean / ``ignore_index``) to at least ``size``, then take
    the centre ``size`` window (offset ``(H - h) // 2``)."""

    def __init__(self, size: Size, pad_value=SEMSEG_MEAN, ignore_index: int = 255):
        self.size = parse_size(size)
        self.pad_value = pad_value
        self.ignore_index = int(ignore_index)

    def __call__(self, image, label):
        _check_pair(image, label)
        h, w = self.size
        image, label = _pad(image, label, h, w, self.pad_value, self.ignore_index)
        y0, x0 = (label.shape[0] - h) // 2, (label.shape[1] - w) // 2
        return image[y0:y0 + h, x0:x0 + w], label[y0:y0 + h, x0:x0 + w]


# ----------------------------------------------------------------------------------------------------------------------
# random transforms

class RandomScale(RandomTransform):
    """semseg ``RandScale``: scale by ``s ~ U(scale_range)`` (image linear, label nearest); with ``aspect_ratio``
    (lo, hi) also ``r ~ U(aspect_ratio)``, x scale ``s*sqrt(r)``, y scale ``s/sqrt(r)``."""

    def __init__(self, scale_range: Sequence[float] = (0.5, 2.0), aspect_ratio: Optional[Sequence[float]] = None,
                 interp: Union[str, int] = "linear", rng: RngLike = None):
        super().__init__(rng)
        lo, hi = (float(v) for v in scale_range)
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range must be 0 < lo <= hi, got {scale_range}")
        self.scale_range = (lo, hi)
        if aspect_ratio is not None:
            a, b = (float(v) for v in aspect_ratio)
            if not 0 < a <= b:
                raise ValueError(f"aspect_ratio must be 0 < lo <= hi, got {aspect_ratio}")
            aspect_ratio = (a, b)
        self.aspect_ratio = aspect_ratio
        self.interp = interp
        self._interp = _interp(interp)

    def __call__(self, image, label):
        _check_pair(image, label)
        lo, hi = self.scale_range
        s = lo + (hi - lo) * self.rng.random()
        sx = sy = s
        if self.aspect_ratio is not None:
            a, b = self.aspect_ratio
            r = np.sqrt(a + (b - a) * self.rng.random())
            sx, sy = s * r, s / r
        # as semseg: cv2.resize(None, fx, fy) (cv2 rounds the output size and maps with 1/fx, 1/fy)
        img = cv2.resize(image, None, fx=sx, fy=sy, interpolation=self._interp)
        if image.ndim == 3 and img.ndim == 2:
            img = img[:, :, None]
        lbl = _label_cv(label, lambda x: cv2.resize(x, None, fx=sx, fy=sy, interpolation=cv2.INTER_NEAREST))
        return img, lbl


class RandomCrop(RandomTransform):
    """semseg ``Crop(crop_type='rand')``: pad (centred; image ``pad_value``, label ``ignore_index``) to at least
    ``size``, then a uniformly random ``size`` window (offsets in ``[0, H - h]`` inclusive)."""

    def __init__(self, size: Size, pad_value=SEMSEG_MEAN, ignore_index: int = 255, rng: RngLike = None):
        super().__init__(rng)
        self.size = parse_size(size)
        self.pad_value = pad_value
        self.ignore_index = int(ignore_index)

    def __call__(self, image, label):
        _check_pair(image, label)
        h, w = self.size
        image, label = _pad(image, label, h, w, self.pad_value, self.ignore_index)
        y0 = int(self.rng.integers(0, label.shape[0] - h + 1))
        x0 = int(self.rng.integers(0, label.shape[1] - w + 1))
        return image[y0:y0 + h, x0:x0 + w], label[y0:y0 + h, x0:x0 + w]


class RandomHorizontalFlip(RandomTransform):
    """Mirror left-right with probability ``p``."""

    def __init__(self, p: float = 0.5, rng: RngLike = None, prob: Optional[float] = None):
        super().__init__(rng)
        self.p = float(p if prob is None else prob)  # prob: PaddleSeg's name

    def __call__(self, image, label):
        _check_pair(image, label)
        if self.rng.random() < self.p:
            return np.ascontiguousarray(image[:, ::-1]), np.ascontiguousarray(label[:, ::-1])
        return image, label


class RandomRotate(RandomTransform):
    """semseg ``RandRotate``: with probability ``p`` rotate by ``angle ~ U(degrees)`` about the image centre
    (``cv2.getRotationMatrix2D((w/2, h/2), angle, 1)``, same size); image linear + ``pad_value``, label nearest +
    ``ignore_index``. ``degrees`` is (lo, hi) or a number d meaning (-d, d)."""

    def __init__(self, degrees: Union[float, Sequence[float]] = (-10.0, 10.0), p: float = 0.5, pad_value=SEMSEG_MEAN,
                 ignore_index: int = 255, rng: RngLike = None):
        super().__init__(rng)
        if np.ndim(degrees) == 0:
            degrees = (-abs(float(degrees)), abs(float(degrees)))
        lo, hi = (float(v) for v in degrees)
        if lo > hi:
            raise ValueError(f"degrees must be (lo, hi) with lo <= hi, got {degrees}")
        self.degrees = (lo, hi)
        self.p = float(p)
        self.pad_value = pad_value
        self.ignore_index = int(ignore_index)

    def __call__(self, image, label):
        _check_pair(image, label)
        if self.rng.random() >= self.p:
            return image, label
        lo, hi = self.degrees
        angle = lo + (hi - lo) * self.rng.random()
        h, w = label.shape
        m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1)
        img = cv2.warpAffine(image, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                             borderValue=_fill(image, self.pad_value))
        if image.ndim == 3 and img.ndim == 2:
            img = img[:, :, None]
        lbl = _label_cv(label, lambda x: cv2.warpAffine(x, m, (w, h), flags=cv2.INTER_NEAREST,
                                                        borderMode=cv2.BORDER_CONSTANT,
                                                        borderValue=float(self.ignore_index)))
        return img, lbl


class RandomGaussianBlur(RandomTransform):
    """semseg ``RandomGaussianBlur``: with probability ``p`` blur the image with a ``k x k`` Gaussian (sigma from
    k, cv2's rule); label untouched."""

    def __init__(self, p: float = 0.5, k: int = 5, rng: RngLike = None):
        super().__init__(rng)
        if int(k) <= 0 or int(k) % 2 == 0:
            raise ValueError(f"k must be a positive odd kernel size, got {k}")
        self.p = float(p)
        self.k = int(k)

    def __call__(self, image, label):
        _check_pair(image, label)
        if self.rng.random() < self.p:
            img = cv2.GaussianBlur(image, (self.k, self.k), 0)
            if image.ndim == 3 and img.ndim == 2:
                img = img[:, :, None]
            return img, label
        return image, label


# ----------------------------------------------------------------------------------------------------------------------
# PaddleSeg-style random transforms (paddleseg/transforms/transforms.py semantics; sizes there are (W, H))

class ResizeStepScaling(RandomTransform):
    """PaddleSeg ``ResizeStepScaling``: scale by a factor drawn uniformly from the grid
    ``linspace(min, max, int((max - min) / step + 1))`` (``step == 0``: ``U(min, max)``; ``min == max``: fixed);
    new size ``(round(f*H), round(f*W))``, image with ``interp`` (linear), label nearest."""

    def __init__(self, min_scale_factor: float = 0.75, max_scale_factor: float = 1.25, scale_step_size: float = 0.25,
                 interp: Union[str, int] = "linear", rng: RngLike = None):
        super().__init__(rng)
        lo, hi, step = float(min_scale_factor), float(max_scale_factor), float(scale_step_size)
        if not 0 < lo <= hi:
            raise ValueError(f"need 0 < min_scale_factor <= max_scale_factor, got {lo}, {hi}")
        if step < 0:
            raise ValueError(f"scale_step_size must be >= 0, got {step}")
        self.min_scale_factor, self.max_scale_factor, self.scale_step_size = lo, hi, step
        self.interp = interp
        self._interp = _interp(interp)

    def factors(self) -> Optional[List[float]]:
        """The grid of factors (None when continuous)."""
        lo, hi, step = self.min_scale_factor, self.max_scale_factor, self.scale_step_size
        if lo == hi:
            return [lo]
        if step == 0:
            return None
        return np.linspace(lo, hi, int((hi - lo) / step + 1)).tolist()

    def __call__(self, image, label):
        _check_pair(image, label)
        grid = self.factors()
        if grid is None:
            f = float(self.rng.uniform(self.min_scale_factor, self.max_scale_factor))
        else:
            f = float(grid[int(self.rng.integers(0, len(grid)))])
        h, w = label.shape
        nh, nw = max(1, int(round(f * h))), max(1, int(round(f * w)))
        return _resize(image, label, nh, nw, self._interp)


class RandomPaddingCrop(RandomTransform):
    """PaddleSeg ``RandomPaddingCrop``: pad at the BOTTOM/RIGHT to at least the crop (image ``im_padding_value``,
    label ``label_padding_value``), then a uniformly random crop. ``crop_size`` is **(W, H)** as in PaddleSeg
    (Cityscapes ``[1024, 512]`` = 512 rows x 1024 columns); an int means square.

    ``category_max_ratio < 1`` retries the crop up to ``loop_times`` times while one class (other than
    ``ignore_index``) covers more than that fraction of it (PaddleSeg / mmseg ``cat_max_ratio``)."""

    def __init__(self, crop_size: Size = (512, 512), im_padding_value=(127.5, 127.5, 127.5),
                 label_padding_value: int = 255, category_max_ratio: float = 1.0, ignore_index: int = 255,
                 loop_times: int = 10, rng: RngLike = None):
        super().__init__(rng)
        cw, ch = parse_size(crop_size, "crop_size")
        self.crop_size = (cw, ch)
        self.im_padding_value = im_padding_value
        self.label_padding_value = int(label_padding_value)
        if not 0 < float(category_max_ratio) <= 1:
            raise ValueError(f"category_max_ratio must be in (0, 1], got {category_max_ratio}")
        self.category_max_ratio = float(category_max_ratio)
        self.ignore_index = int(ignore_index)
        self.loop_times = int(loop_times)

    def __call__(self, image, label):
        _check_pair(image, label)
        cw, ch = self.crop_size
        image, label = _pad(image, label, ch, cw, self.im_padding_value, self.label_padding_value, center=False)
        h, w = label.shape
        if (h, w) == (ch, cw):
            return image, label
        tries = self.loop_times if self.category_max_ratio < 1.0 else 1
        for _ in range(max(tries, 1)):
            y0 = int(self.rng.integers(0, h - ch + 1))
            x0 = int(self.rng.integers(0, w - cw + 1))
            crop = label[y0:y0 + ch, x0:x0 + cw]
            if tries <= 1:
                break
            vals, counts = np.unique(crop[crop != self.ignore_index], return_counts=True)
            if len(counts) > 1 and counts.max() / counts.sum() < self.category_max_ratio:
                break
        return image[y0:y0 + ch, x0:x0 + cw], crop


class RandomDistort(RandomTransform):
    """PaddleSeg ``RandomDistort``: the five photometric ops (brightness, contrast, saturation, hue, sharpness) in a
    random order, each applied with its probability: PIL ``ImageEnhance`` factor ``U(1 - range, 1 + range)`` for
    brightness / contrast / saturation (``Color``) / sharpness, hue = HSV H channel shifted by ``U(-hue_range,
    hue_range)`` (uint8 wrap). Defaults are PaddleSeg's (ranges 0.5, probs 0.5, hue 18 p 0.5, sharpness p 0); its
    Cityscapes configs set the three ranges to 0.4. Image only (label untouched); works on uint8 RGB (float input
    is rounded and clipped to uint8 and returned as float32)."""

    def __init__(self, brightness_range: float = 0.5, brightness_prob: float = 0.5, contrast_range: float = 0.5,
                 contrast_prob: float = 0.5, saturation_range: float = 0.5, saturation_prob: float = 0.5,
                 hue_range: float = 18, hue_prob: float = 0.5, sharpness_range: float = 0.5,
                 sharpness_prob: float = 0.0, rng: RngLike = None):
        super().__init__(rng)
        self.brightness_range, self.brightness_prob = float(brightness_range), float(brightness_prob)
        self.contrast_range, self.contrast_prob = float(contrast_range), float(contrast_prob)
        self.saturation_range, self.saturation_prob = float(saturation_range), float(saturation_prob)
        self.hue_range, self.hue_prob = float(hue_range), float(hue_prob)
        self.sharpness_range, self.sharpness_prob = float(sharpness_range), float(sharpness_prob)

    def __call__(self, image, label):
        _check_pair(image, label)
        from PIL import Image, ImageEnhance

        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"RandomDistort needs an HxWx3 image, got {image.shape}")
        as_float = image.dtype != np.uint8
        im = Image.fromarray(np.clip(np.rint(image), 0, 255).astype(np.uint8) if as_float else image, "RGB")
        ops = ["brightness", "contrast", "saturation", "hue", "sharpness"]
        enh = {"brightness": ImageEnhance.Brightness, "contrast": ImageEnhance.Contrast,
               "saturation": ImageEnhance.Color, "sharpness": ImageEnhance.Sharpness}
        for k in self.rng.permutation(len(ops)):
            op = ops[int(k)]
            rng_ = getattr(self, f"{op}_range")
            if self.rng.random() >= getattr(self, f"{op}_prob"):
                continue
            if op == "hue":
                delta = int(self.rng.uniform(-rng_, rng_))
                hsv = np.array(im.convert("HSV"))
                hsv[:, :, 0] = (hsv[:, :, 0].astype(np.int32) + delta) % 256
                im = Image.fromarray(hsv, "HSV").convert("RGB")
            else:
                im = enh[op](im).enhance(float(self.rng.uniform(1 - rng_, 1 + rng_)))
        out = np.asarray(im)
        return (out.astype(np.float32) if as_float else np.ascontiguousarray(out)), label



# ----------------------------------------------------------------------------------------------------------------------
# DANet-style random transforms (junfu1115/DANet ``encoding/datasets/base.py`` ``_sync_transform`` semantics)

class RandomResizeLong(RandomTransform):
    """DANet's training rescale: the LONG side becomes ``L``, drawn uniformly from the integers
    ``int(lo * base_size) .. int(hi * base_size)`` (both ends included, as Python's ``random.randint``); the short
    side becomes ``int(short * L / long + 0.5)`` (``long_side_size``). Image with ``interp`` (linear), label nearest.

    ``scale_range`` defaults to (0.75, 2.0) (the 2018 README recipe's range; the 2020 code uses 0.5). DANet resizes
    with PIL (bilinear with an antialiasing support when shrinking); cv2's linear here does not antialias."""

    def __init__(self, base_size: int, scale_range: Sequence[float] = (0.75, 2.0), interp: Union[str, int] = "linear",
                 rng: RngLike = None):
        super().__init__(rng)
        if isinstance(base_size, bool) or not isinstance(base_size, (int, np.integer)) or base_size <= 0:
            raise ValueError(f"base_size must be a positive int, got {base_size!r}")
        try:
            lo, hi = (float(v) for v in scale_range)
        except (TypeError, ValueError):
            raise ValueError(f"scale_range must be (lo, hi), got {scale_range!r}") from None
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range must be 0 < lo <= hi, got {scale_range!r}")
        self.base_size = int(base_size)
        self.scale_range = (lo, hi)
        if int(lo * self.base_size) < 1:
            raise ValueError(f"scale_range lo {lo} x base_size {self.base_size} is below one pixel")
        self.interp = interp
        self._interp = _interp(interp)

    @property
    def long_range(self) -> Tuple[int, int]:
        """(smallest, largest) long side, both included."""
        lo, hi = self.scale_range
        return int(lo * self.base_size), int(hi * self.base_size)

    def __call__(self, image, label):
        _check_pair(image, label)
        lo, hi = self.long_range
        long_size = int(self.rng.integers(lo, hi + 1))
        nh, nw = long_side_size(*label.shape, long_size)
        if (nh, nw) == label.shape:
            return image, label
        return _resize(image, label, nh, nw, self._interp)


_GRAY = np.asarray((0.2989, 0.587, 0.114), np.float32)  # torchvision's rgb_to_grayscale weights


def _jitter_range(value, name: str, center: Optional[float], bound: Tuple[float, float]):
    """torchvision ``ColorJitter`` argument rule: a number v means ``[center - v, center + v]`` (clipped at the
    bound's low end; hue: ``[-v, v]``), a pair is taken as is; the identity range gives None (op disabled)."""
    if np.ndim(value) == 0:
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a number or (lo, hi), got {value!r}") from None
        if v < 0:
            raise ValueError(f"{name} must be non-negative, got {value!r}")
        lo, hi = (center - v, center + v) if center is not None else (-v, v)
        lo = max(lo, bound[0])
    else:
        try:
            lo, hi = (float(x) for x in value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a number or (lo, hi), got {value!r}") from None
    if not bound[0] <= lo <= hi <= bound[1]:
        raise ValueError(f"{name} range must satisfy {bound[0]} <= lo <= hi <= {bound[1]}, got ({lo}, {hi})")
    identity = 0.0 if center is None else center
    return None if lo == hi == identity else (lo, hi)


class RandomColorJitter(RandomTransform):
    """With probability ``p``, torchvision ``ColorJitter(brightness, contrast, saturation, hue)`` on an RGB image
    (0..255 pixels, uint8 or float); the label is untouched.

    Factors as in torchvision: a number b means a factor ``U(max(0, 1 - b), 1 + b)`` (hue h: a shift
    ``U(-h, h)`` of a turn, ``h <= 0.5``), a pair ``(lo, hi)`` is the range itself; ``0`` (or ``(1, 1)``, hue
    ``(0, 0)``) disables the op. The enabled ops run in a random order (a permutation of brightness, contrast,
    saturation, hue, as torchvision), each clipped to [0, 255]:

    * brightness f: ``f * x``;  contrast f: ``f * x + (1 - f) * mean(gray(x))`` (one mean over the image);
    * saturation f: ``f * x + (1 - f) * gray(x)`` per pixel;  ``gray = 0.2989 R + 0.587 G + 0.114 B``;
    * hue h: HSV hue rotated by ``h`` turns (cv2 float HSV), saturation and value kept.

    Computed in float32; uint8 input is rounded back to uint8 once at the end (torchvision truncates after every op
    on uint8 tensors), float input stays float32. Draws: one ``random()`` for the gate (nothing else when it
    fails), then the permutation, then the enabled factors in the order brightness, contrast, saturation, hue.

    Defaults 0.4 / 0.4 / 0.4 / 0.1: torchvision's common strong setting (PaddleSeg's Cityscapes configs use 0.4
    ranges for the first three); p 0.3 as the DANet-R101 recipe."""

    OPS = ("brightness", "contrast", "saturation", "hue")

    def __init__(self, p: float = 0.3, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, rng: RngLike = None):
        super().__init__(rng)
        if not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p!r}")
        self.p = float(p)
        inf = float("inf")
        self.brightness = _jitter_range(brightness, "brightness", 1.0, (0.0, inf))
        self.contrast = _jitter_range(contrast, "contrast", 1.0, (0.0, inf))
        self.saturation = _jitter_range(saturation, "saturation", 1.0, (0.0, inf))
        self.hue = _jitter_range(hue, "hue", None, (-0.5, 0.5))

    @staticmethod
    def _gray(x: np.ndarray) -> np.ndarray:
        return x @ _GRAY

    def _apply(self, op: str, x: np.ndarray, f: float) -> np.ndarray:
        f32 = np.float32(f)
        if op == "brightness":
            out = x * f32
        elif op == "contrast":
            out = x * f32 + (np.float32(1) - f32) * np.float32(self._gray(x).mean(dtype=np.float64))
        elif op == "saturation":
            out = x * f32 + (np.float32(1) - f32) * self._gray(x)[:, :, None]
        else:
            hsv = cv2.cvtColor(x / np.float32(255), cv2.COLOR_RGB2HSV)  # float: H in degrees [0, 360)
            hsv[:, :, 0] = np.mod(hsv[:, :, 0] + f32 * np.float32(360), np.float32(360))
            out = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB) * np.float32(255)
        return np.clip(out, 0, 255, out=out)

    def __call__(self, image, label):
        _check_pair(image, label)
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"RandomColorJitter needs an HxWx3 RGB image, got {image.shape}")
        if self.rng.random() >= self.p:
            return image, label
        order = self.rng.permutation(len(self.OPS))
        factors = {op: float(self.rng.uniform(*getattr(self, op))) for op in self.OPS if getattr(self, op)}
        x = image.astype(np.float32)
        for k in order:
            op = self.OPS[int(k)]
            if op in factors:
                x = self._apply(op, x, factors[op])
        if image.dtype == np.uint8:
            return np.clip(np.rint(x), 0, 255).astype(np.uint8), label
        return np.ascontiguousarray(x, dtype=np.float32), label


# ----------------------------------------------------------------------------------------------------------------------
# detectron2-style transforms: the training recipe of PointRend's Cityscapes config
# (pointrend_semantic_R_101_FPN_1x_cityscapes.yaml):
#
#     ResizeShortestEdge(short side in {512, 768, ..., 2048}, max_size 4096, "choice")
#     -> RandomCrop_CategoryAreaConstraint("absolute", (512, 1024), 0.75, ignore 255) -> ColorAugSSD -> RandomFlip
#
# Semantics of detectron2 ``data/transforms/augmentation_impl.py`` / ``transform.py`` and
# ``projects/PointRend/point_rend/color_augmentation.py``; draws come from the transform's own Generator (detectron2
# uses numpy's / Python's global state, so the streams differ, the distributions do not).

def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _need_uint8(name: str, image: np.ndarray) -> None:
    if image.dtype != np.uint8:
        raise ValueError(f"{name} works on uint8 images (pixels 0..255, as detectron2 does), got dtype {image.dtype}; "
                         f"put it before ToFloat32 / Normalize in the pipeline")


_PIL_FILTERS = ("nearest", "bilinear", "linear", "bicubic", "cubic", "lanczos", "box", "hamming")


def _pil_filter(name: str) -> int:
    from PIL import Image

    r = getattr(Image, "Resampling", Image)  # Pillow >= 9.1 keeps the constants in Image.Resampling
    return {"nearest": r.NEAREST, "bilinear": r.BILINEAR, "linear": r.BILINEAR, "bicubic": r.BICUBIC,
            "cubic": r.BICUBIC, "lanczos": r.LANCZOS, "box": r.BOX, "hamming": r.HAMMING}[name]


def _pil_resize_image(image: np.ndarray, h: int, w: int, resample: int) -> np.ndarray:
    """uint8 HxW[xC] resized with PIL ``Image.resize((w, h), resample)`` (a writable array back)."""
    from PIL import Image

    one = image.ndim == 3 and image.shape[2] == 1
    src = np.ascontiguousarray(image[:, :, 0] if one else image)
    out = np.array(Image.fromarray(src).resize((w, h), resample))
    return out[:, :, None] if one else out


def _pil_resize_label(label: np.ndarray, h: int, w: int) -> np.ndarray:
    """Integer label resized with PIL NEAREST (detectron2 resizes its uint8 "L" label this way), values and dtype
    kept: via uint8 ("L") when the values fit, else int32 ("I")."""
    from PIL import Image

    lo, hi = (int(label.min()), int(label.max())) if label.size else (0, 0)
    if 0 <= lo and hi <= 255:
        src = label.astype(np.uint8, copy=False)
    elif np.iinfo(np.int32).min <= lo and hi <= np.iinfo(np.int32).max:
        src = label.astype(np.int32, copy=False)
    else:
        raise ValueError("label values do not fit in int32")
    out = np.asarray(Image.fromarray(np.ascontiguousarray(src)).resize((w, h), _pil_filter("nearest")))
    return out.astype(label.dtype)


def _category_counts(crop: np.ndarray, ignore_index: Optional[int]) -> np.ndarray:
    """Pixel counts of the label values present in ``crop``, the ``ignore_index`` value left out (order
    irrelevant). ``np.bincount`` for small non-negative labels (fast), ``np.unique`` otherwise."""
    flat = crop.ravel()
    if flat.size == 0:
        return np.zeros(0, np.int64)
    if np.issubdtype(flat.dtype, np.integer) and flat.min() >= 0 and flat.max() < 65536:
        counts = np.bincount(flat.astype(np.intp, copy=False))
        if ignore_index is not None and 0 <= ignore_index < counts.size:
            counts[ignore_index] = 0
        return counts[counts > 0]
    values, counts = np.unique(flat, return_counts=True)
    return counts if ignore_index is None else counts[values != ignore_index]


class ResizeShortestEdge(RandomTransform):
    """detectron2 ``ResizeShortestEdge``: resize keeping the aspect ratio so that the SHORT side becomes ``size``,
    unless the long side would then exceed ``max_size``, in which case both sides are scaled down so that the long
    side is ``max_size``.

    * ``size``: ``sample_style="choice"``: one of the values of ``short_edge_length`` (uniformly); ``"range"``: a
      uniform integer in ``[short_edge_length[0], short_edge_length[1]]`` (both included). An int
      ``short_edge_length`` means that single size. ``size == 0`` leaves the sample unchanged (detectron2's no-op).
    * new size (``output_shape``): ``s = size / min(h, w)``; ``(size, s*w)`` if ``h < w`` else ``(s*h, size)``; if
      the larger of the two exceeds ``max_size`` both are multiplied by ``max_size / larger``; each side is then
      rounded half up, ``int(x + 0.5)`` (and kept >= 1). ``max_size=None``: no cap (detectron2's default
      ``sys.maxsize``).
    * the image (uint8 only) is resized with PIL ``Image.resize`` using ``interp`` (``"bilinear"``: PIL's filter,
      whose support widens when shrinking, i.e. antialiased, unlike cv2's linear), the label with PIL NEAREST.
      A non-uint8 image raises ValueError (place this transform before ``ToFloat32``).

    Defaults are the PointRend Cityscapes recipe (short side 512..2048 step 256, ``max_size`` 4096, "choice");
    detectron2's class defaults are ``sample_style="range"`` and no cap. One draw per call (``integers``)."""

    def __init__(self, short_edge_length: Union[int, Sequence[int]] = (512, 768, 1024, 1280, 1536, 1792, 2048),
                 max_size: Optional[int] = 4096, sample_style: str = "choice", interp: str = "bilinear",
                 rng: RngLike = None):
        super().__init__(rng)
        if sample_style not in ("choice", "range"):
            raise ValueError(f"sample_style must be 'choice' or 'range', got {sample_style!r}")
        if _is_int(short_edge_length):
            lengths: Tuple[int, ...] = (int(short_edge_length), int(short_edge_length))
        else:
            if isinstance(short_edge_length, (str, bytes)) or not isinstance(short_edge_length, Iterable):
                raise ValueError(f"short_edge_length must be an int or a list of ints, got {short_edge_length!r}")
            lengths = tuple(short_edge_length)
            if not lengths or not all(_is_int(v) for v in lengths):
                raise ValueError(f"short_edge_length must be an int or a non-empty list of ints, "
                                 f"got {short_edge_length!r}")
            lengths = tuple(int(v) for v in lengths)
        if min(lengths) < 0:
            raise ValueError(f"short_edge_length values must be >= 0 (0: no resize), got {short_edge_length!r}")
        if sample_style == "range":
            if len(lengths) != 2:
                raise ValueError(f"short_edge_length must be [min, max] (two ints) with sample_style='range', "
                                 f"got {short_edge_length!r}")
            if lengths[0] > lengths[1]:
                raise ValueError(f"short_edge_length [min, max] needs min <= max, got {short_edge_length!r}")
        if max_size is not None and (not _is_int(max_size) or max_size <= 0):
            raise ValueError(f"max_size must be a positive int or None (no cap), got {max_size!r}")
        if not isinstance(interp, str) or interp.lower() not in _PIL_FILTERS:
            raise ValueError(f"interp must be one of {list(_PIL_FILTERS)} (PIL filters), got {interp!r}")
        self.short_edge_length = lengths
        self.max_size = None if max_size is None else int(max_size)
        self.sample_style = sample_style
        self.interp = interp.lower()

    def sample_size(self) -> int:
        """Draw the short side (one ``integers`` draw from ``self.rng``)."""
        if self.sample_style == "range":
            lo, hi = self.short_edge_length
            return int(self.rng.integers(lo, hi + 1))
        return self.short_edge_length[int(self.rng.integers(0, len(self.short_edge_length)))]

    def output_shape(self, h: int, w: int, size: int) -> Tuple[int, int]:
        """(new H, new W) for an ``h x w`` input and short side ``size`` (detectron2's arithmetic)."""
        scale = size * 1.0 / min(h, w)
        if h < w:
            newh, neww = float(size), scale * w
        else:
            newh, neww = scale * h, float(size)
        if self.max_size is not None and max(newh, neww) > self.max_size:
            cap = self.max_size * 1.0 / max(newh, neww)
            newh, neww = newh * cap, neww * cap
        return max(1, int(newh + 0.5)), max(1, int(neww + 0.5))

    def __call__(self, image, label):
        _check_pair(image, label)
        _need_uint8("ResizeShortestEdge", image)
        size = self.sample_size()
        if size == 0:
            return image, label
        h, w = label.shape
        nh, nw = self.output_shape(h, w, size)
        if (nh, nw) == (h, w):  # PIL returns a copy in this case too
            return image, label
        return _pil_resize_image(image, nh, nw, _pil_filter(self.interp)), _pil_resize_label(label, nh, nw)

    def __repr__(self) -> str:
        return (f"ResizeShortestEdge(short_edge_length={list(self.short_edge_length)}, max_size={self.max_size}, "
                f"sample_style={self.sample_style!r}, interp={self.interp!r})")


class RandomCropCategoryArea(RandomTransform):
    """detectron2 ``RandomCrop_CategoryAreaConstraint`` with ``crop_type="absolute"``: a random ``crop_size``
    **(H, W)** window (detectron2's order; PaddleSeg's ``RandomPaddingCrop`` takes (W, H)), the same for image and
    label. A side larger than the image is clipped to the image (``min(crop, image)``): no padding, so the output can
    be smaller than ``crop_size``.

    Offsets: ``y0 = integers(0, H - ch + 1)`` then ``x0 = integers(0, W - cw + 1)``. With
    ``single_category_max_area >= 1`` one such draw is used. Otherwise up to 10 draws: in each window the label
    values are counted, the ``ignore_index`` value left out (``None``: everything counted); the window is accepted
    when it holds more than one category and the largest count is ``< single_category_max_area * total``. When none
    of the 10 is accepted the 10th window is used. Any image dtype (only slicing); returns views of the input.
    Defaults: the PointRend Cityscapes recipe ((512, 1024), 0.75, 255)."""

    TRIES = 10

    def __init__(self, crop_size: Size = (512, 1024), single_category_max_area: float = 0.75,
                 ignore_index: Optional[int] = 255, rng: RngLike = None):
        super().__init__(rng)
        self.crop_size = parse_size(crop_size, "crop_size")
        if not _is_number(single_category_max_area) or not float(single_category_max_area) > 0:
            raise ValueError(f"single_category_max_area must be a number > 0 (>= 1 disables the constraint), "
                             f"got {single_category_max_area!r}")
        if ignore_index is not None and not _is_int(ignore_index):
            raise ValueError(f"ignore_index must be an int or None, got {ignore_index!r}")
        self.single_category_max_area = float(single_category_max_area)
        self.ignore_index = None if ignore_index is None else int(ignore_index)

    def accepts(self, crop: np.ndarray) -> bool:
        """The area rule on one label window."""
        counts = _category_counts(crop, self.ignore_index)
        return len(counts) > 1 and counts.max() < counts.sum() * self.single_category_max_area

    def __call__(self, image, label):
        _check_pair(image, label)
        h, w = label.shape
        ch, cw = min(self.crop_size[0], h), min(self.crop_size[1], w)
        tries = 1 if self.single_category_max_area >= 1.0 else self.TRIES
        for _ in range(tries):
            y0 = int(self.rng.integers(0, h - ch + 1))
            x0 = int(self.rng.integers(0, w - cw + 1))
            if tries > 1 and self.accepts(label[y0:y0 + ch, x0:x0 + cw]):
                break
        return image[y0:y0 + ch, x0:x0 + cw], label[y0:y0 + ch, x0:x0 + cw]

    def __repr__(self) -> str:
        return (f"RandomCropCategoryArea(crop_size={self.crop_size}, "
                f"single_category_max_area={self.single_category_max_area}, ignore_index={self.ignore_index})")


class ColorAugSSD(RandomTransform):
    """PointRend's ``ColorAugSSDTransform`` (the SSD photometric distortion) on an HxWx3 uint8 RGB image; the label
    is untouched. In order:

    1. brightness, p 1/2: ``x + U(-brightness_delta, brightness_delta)``;
    2. p 1/2 the order contrast, saturation, hue; otherwise saturation, hue, contrast; each of the three p 1/2:
       contrast ``x * U(contrast_low, contrast_high)``; saturation: HSV (cv2, 8-bit: H 0..179) S channel
       ``* U(saturation_low, saturation_high)``; hue: H ``(H + k) mod 180`` with ``k`` a uniform integer in
       ``[-hue_delta, hue_delta]`` (both included).

    Every arithmetic step goes through ``convert``: float32 ``x * alpha + beta``, clipped to [0, 255] and cast to
    uint8 at once (truncation, as detectron2's ``astype``), so clipping happens after each step. detectron2 feeds
    BGR and converts BGR<->HSV; our RGB image with RGB<->HSV gives the same HSV values and the same result.
    A non-uint8 image raises ValueError (place this before ``ToFloat32``).

    Draws from ``self.rng``, in this order (the number varies): brightness coin ``integers(0, 2)`` (1 = apply)
    [then ``uniform(-delta, delta)``]; order coin (1 = contrast first); then for each of the three ops in the order
    applied, its coin [then its value: ``uniform(low, high)`` for contrast / saturation, ``integers(-hue_delta,
    hue_delta + 1)`` for hue]."""

    def __init__(self, brightness_delta: float = 32, contrast_low: float = 0.5, contrast_high: float = 1.5,
                 saturation_low: float = 0.5, saturation_high: float = 1.5, hue_delta: int = 18,
                 rng: RngLike = None):
        super().__init__(rng)
        if not _is_number(brightness_delta) or not float(brightness_delta) >= 0:
            raise ValueError(f"brightness_delta must be a number >= 0, got {brightness_delta!r}")
        for name, lo, hi in (("contrast", contrast_low, contrast_high), ("saturation", saturation_low,
                                                                         saturation_high)):
            if not (_is_number(lo) and _is_number(hi)) or not 0 <= float(lo) <= float(hi):
                raise ValueError(f"{name}_low / {name}_high must be numbers with 0 <= low <= high, "
                                 f"got {name}_low={lo!r}, {name}_high={hi!r}")
        if not _is_int(hue_delta) or hue_delta < 0:
            raise ValueError(f"hue_delta must be an int >= 0 (hue steps of 2 degrees, cv2 8-bit HSV), "
                             f"got {hue_delta!r}")
        self.brightness_delta = float(brightness_delta)
        self.contrast_low, self.contrast_high = float(contrast_low), float(contrast_high)
        self.saturation_low, self.saturation_high = float(saturation_low), float(saturation_high)
        self.hue_delta = int(hue_delta)

    # the deterministic sub-operations -----------------------------------------------------------------------------

    @staticmethod
    def convert(x: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
        """``x * alpha + beta`` in float32, clipped to [0, 255], cast (truncated) to uint8."""
        out = x.astype(np.float32) * np.float32(alpha) + np.float32(beta)
        return np.clip(out, 0, 255, out=out).astype(np.uint8)

    @staticmethod
    def scale_saturation(image: np.ndarray, alpha: float) -> np.ndarray:
        hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
        hsv[:, :, 1] = ColorAugSSD.convert(hsv[:, :, 1], alpha=alpha)
        return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)

    @staticmethod
    def shift_hue(image: np.ndarray, shift: int) -> np.ndarray:
        hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
        hsv[:, :, 0] = (hsv[:, :, 0].astype(np.int64) + int(shift)) % 180
        return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)

    # the random steps ---------------------------------------------------------------------------------------------

    def _coin(self) -> bool:
        return bool(self.rng.integers(0, 2))

    def _brightness(self, x):
        if self._coin():
            return self.convert(x, beta=float(self.rng.uniform(-self.brightness_delta, self.brightness_delta)))
        return x

    def _contrast(self, x):
        if self._coin():
            return self.convert(x, alpha=float(self.rng.uniform(self.contrast_low, self.contrast_high)))
        return x

    def _saturation(self, x):
        if self._coin():
            return self.scale_saturation(x, float(self.rng.uniform(self.saturation_low, self.saturation_high)))
        return x

    def _hue(self, x):
        if self._coin():
            return self.shift_hue(x, int(self.rng.integers(-self.hue_delta, self.hue_delta + 1)))
        return x

    def __call__(self, image, label):
        _check_pair(image, label)
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"ColorAugSSD needs an HxWx3 RGB image, got shape {image.shape}")
        _need_uint8("ColorAugSSD", image)
        x = self._brightness(image)
        steps = ((self._contrast, self._saturation, self._hue) if self._coin()
                 else (self._saturation, self._hue, self._contrast))
        for step in steps:
            x = step(x)
        return x, label

    def __repr__(self) -> str:
        return (f"ColorAugSSD(brightness_delta={self.brightness_delta:g}, contrast_low={self.contrast_low:g}, "
                f"contrast_high={self.contrast_high:g}, saturation_low={self.saturation_low:g}, "
                f"saturation_high={self.saturation_high:g}, hue_delta={self.hue_delta})")


# ----------------------------------------------------------------------------------------------------------------------
# registry / presets

TRANSFORMS: Dict[str, type] = {
    cls.__name__: cls for cls in (
        Compose, ToFloat32, Normalize, ToCHW, Resize, ResizeLong, PadToSize, CenterCrop, RandomScale, RandomCrop,
        RandomHorizontalFlip, RandomRotate, RandomGaussianBlur, ResizeStepScaling, RandomPaddingCrop, RandomDistort,
        RandomResizeLong, RandomColorJitter)
}

#: other names accepted by ``build_transforms`` (semseg's and PaddleSeg's spellings)
TRANSFORM_ALIASES: Dict[str, str] = {
    "RandScale": "RandomScale", "RandRotate": "RandomRotate", "ResizeByLong": "ResizeLong",
    "Padding": "PadToSize", "ToTensor": "ToCHW", "HorizontalFlip": "RandomHorizontalFlip",
}

# detectron2's transforms (PointRend Cityscapes recipe), with detectron2's own class names as aliases
TRANSFORMS.update({cls.__name__: cls for cls in (ResizeShortestEdge, RandomCropCategoryArea, ColorAugSSD)})
TRANSFORM_ALIASES.update({"RandomCrop_CategoryAreaConstraint": "RandomCropCategoryArea",
                          "ColorAugSSDTransform": "ColorAugSSD"})


def _transform_class(name) -> type:
    name = TRANSFORM_ALIASES.get(name, name)
    if name in TRANSFORMS and name != "Compose":
        return TRANSFORMS[name]
    import difflib

    known = sorted((set(TRANSFORMS) | set(TRANSFORM_ALIASES)) - {"Compose"})
    close = difflib.get_close_matches(str(name), known, n=3, cutoff=0.5)
    if not close:  # case-insensitive / substring fallback ("randompaddingcrop", "PaddingCrop")
        low = str(name).lower()
        close = [k for k in known if k.lower() == low or (low and low in k.lower())][:3]
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(f"unknown transform type {name!r}{hint} (known: {', '.join(known)})")


def build_transforms(specs: Sequence[Dict[str, Any]], seed: RngLike = None) -> Compose:
    """``Compose`` from config entries (PaddleSeg-like YAML lists)::

        - type: ResizeStepScaling
          min_scale_factor: 0.5
          max_scale_factor: 2.0
          scale_step_size: 0.25
        - type: RandomPaddingCrop
          crop_size: [1024, 512]        # (W, H), PaddleSeg's order
        - type: Normalize
          preset: semseg

    An unknown ``type`` raises ValueError suggesting the closest names; bad arguments name the transform."""
    if isinstance(specs, dict):
        raise TypeError("build_transforms expects a LIST of {type: ..., ...} entries, got a dict")
    out = []
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict) or "type" not in spec:
            raise ValueError(f"transform entry {i} must be a mapping with a 'type' key, got {spec!r}")
        spec = dict(spec)
        name = spec.pop("type")
        cls = _transform_class(name)
        try:
            out.append(cls(**spec))
        except TypeError as e:
            raise ValueError(f"bad arguments for transform {name}: {e}") from None
    return Compose(out, seed=seed)


def semseg_train_transforms(crop_size: Size, scale_range=(0.5, 2.0), rotate=(-10.0, 10.0),
                            mean=SEMSEG_MEAN, std=SEMSEG_STD, ignore_index: int = 255, seed: RngLike = None) -> Compose:
    """semseg's train pipeline (docs/references.md, section 2), ending with a CxHxW float32 image."""
    return Compose([
        ToFloat32(),
        RandomScale(scale_range),
        RandomRotate(rotate, p=0.5, pad_value=mean, ignore_index=ignore_index),
        RandomGaussianBlur(p=0.5, k=5),
        RandomHorizontalFlip(0.5),
        RandomCrop(crop_size, pad_value=mean, ignore_index=ignore_index),
        Normalize(mean, std),
        ToCHW(),
    ], seed=seed)


def semseg_val_transforms(crop_size: Size, mean=SEMSEG_MEAN, std=SEMSEG_STD, ignore_index: int = 255) -> Compose:
    """semseg's val-during-training pipeline: centre crop (pad mean / ignore), normalise, CHW."""
    return Compose([ToFloat32(), CenterCrop(crop_size, pad_value=mean, ignore_index=ignore_index),
                    Normalize(mean, std), ToCHW()])


# ----------------------------------------------------------------------------------------------------------------------
# fixed evaluation batch (alignment driver --data)

def eval_batch(dataset, n: int, size: Size, mean: Sequence[float] = SEMSEG_MEAN, std: Sequence[float] = SEMSEG_STD,
               *, mode: str = "cover", to_bgr: bool = False, ignore_index: Optional[int] = None,
               interp: Union[str, int] = "linear") -> Tuple[np.ndarray, np.ndarray]:
    """The first ``n`` samples of ``dataset`` as one deterministic batch of size ``size`` (H, W).

    Samples are read untransformed (``dataset.load(i)`` when it exists, else ``dataset[i]``, which must give HxWx3
    and HxW). ``mode``:
      * ``"cover"`` (default): resize keeping the aspect ratio so the image covers ``size``, centre crop (no padding);
      * ``"fit"``: resize keeping the aspect ratio to fit inside ``size``, pad centred (mean pixel / ignore);
      * ``"crop"``: no resize; pad if smaller, centre crop (semseg's val crop).
    Then ``Normalize(mean, std, to_bgr=to_bgr)``.

    Returns ``(images float32 N x 3 x H x W, labels int64 N x H x W)``, C-contiguous.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if n > len(dataset):
        raise ValueError(f"eval_batch asked for {n} samples but the dataset has {len(dataset)}")
    if mode not in ("cover", "fit", "crop"):
        raise ValueError(f"mode must be 'cover', 'fit' or 'crop', got {mode!r}")
    h, w = parse_size(size)
    ign = int(getattr(dataset, "ignore_index", 255) if ignore_index is None else ignore_index)
    pad_value = mean[::-1] if to_bgr else mean  # mean is given in output order; the image here is still RGB
    resample = _interp(interp)
    norm = Normalize(mean, std, to_bgr=to_bgr)
    images, labels = [], []
    for i in range(int(n)):
        image, label = dataset.load(i) if hasattr(dataset, "load") else dataset[i]
        image, label = np.asarray(image), np.asarray(label)
        _check_pair(image, label)
        image = image.astype(np.float32)
        ih, iw = label.shape
        if mode != "crop":
            scale = max(h / ih, w / iw) if mode == "cover" else min(h / ih, w / iw)
            nh, nw = int(round(ih * scale)), int(round(iw * scale))
            if mode == "cover":
                nh, nw = max(nh, h), max(nw, w)
            else:
                nh, nw = max(1, min(nh, h)), max(1, min(nw, w))
            if (nh, nw) != (ih, iw):
                image, label = _resize(image, label, nh, nw, resample)
        image, label = _pad(image, label, h, w, pad_value, ign)
        y0, x0 = (label.shape[0] - h) // 2, (label.shape[1] - w) // 2
        image, label = image[y0:y0 + h, x0:x0 + w], label[y0:y0 + h, x0:x0 + w]
        image, label = norm(image, label)
        images.append(image.transpose(2, 0, 1))
        labels.append(label.astype(np.int64))
    return np.ascontiguousarray(np.stack(images), dtype=np.float32), np.ascontiguousarray(np.stack(labels))


# ----------------------------------------------------------------------------------------------------------------------
# DataLoader workers

def reseed_worker(worker_id: int) -> None:
    """``worker_init_fn`` for ``paddle.io.DataLoader``: reseed the worker's copy of ``dataset.transforms`` from
    ``(loader base seed, worker id)`` so workers draw different augmentations (deterministic when the base seed
    is, i.e. when numpy's global seed was set before creating the loader iterator)."""
    import paddle.io

    info = paddle.io.get_worker_info()
    if info is None:
        return
    tf = getattr(info.dataset, "transforms", None)
    if tf is not None and hasattr(tf, "reseed"):
        tf.reseed(np.random.SeedSequence([int(info.seed) & (2 ** 63 - 1), int(worker_id)]))


def seed_transforms(transforms, base_seed: int, worker_id: int = 0, epoch: int = 0) -> None:
    """Reseed ``transforms`` (anything with ``reseed``) from ``SeedSequence([base_seed, worker_id, epoch])``:
    the stream depends on these three numbers only (different per worker and per epoch, reproducible)."""
    if transforms is not None and hasattr(transforms, "reseed"):
        transforms.reseed(np.random.SeedSequence([int(base_seed) & (2 ** 63 - 1), int(worker_id), int(epoch)]))


class WorkerSeeder:
    """Picklable ``worker_init_fn`` reseeding each worker's ``dataset.transforms`` from ``(seed, worker id,
    epoch)``, independent of numpy's global state. Call ``set_epoch(e)`` before iterating epoch ``e`` (workers are
    started per epoch unless ``persistent_workers``). With ``num_workers=0`` call ``seeder.main(dataset)`` at the
    start of each epoch instead (worker id 0)."""

    def __init__(self, seed: int, epoch: int = 0):
        self.seed = int(seed)
        self.epoch = int(epoch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __call__(self, worker_id: int) -> None:
        import paddle.io

        info = paddle.io.get_worker_info()
        dataset = info.dataset if info is not None else None
        seed_transforms(getattr(dataset, "transforms", None), self.seed, worker_id, self.epoch)

    def main(self, dataset) -> None:
        seed_transforms(getattr(dataset, "transforms", None), self.seed, 0, self.epoch)

    def __repr__(self) -> str:
        return f"WorkerSeeder(seed={self.seed}, epoch={self.epoch})"
