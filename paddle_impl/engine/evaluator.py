"""Semantic-segmentation evaluation of a Paddle model over a dataset (semseg ``tool/test.py`` semantics).

    from paddle_impl.engine.evaluator import evaluate, predict_logits, format_table
    result = evaluate(model, dataset, 19, mode="slide", crop=713, flip=True, scales=(0.75, 1.0, 1.25))
    print(format_table(result, dataset.class_names))

Per image (``predict_logits``), for every scale s:
  * the raw HxWx3 image is resized (cv2 bilinear) to round(s*H) x round(s*W) (or, with ``base_size``, so that its
    long side is round(s*base_size), as semseg does), then normalised (``(x - mean) / std``, optional RGB->BGR);
  * ``mode="whole"``: one forward pass on the whole image; ``mode="slide"``: the image is padded (centred) to at least
    ``crop`` with zeros (= the mean pixel after normalisation), windows of ``crop`` every ``stride`` (default
    ``ceil(crop*2/3)``, the last window flush with the border) are run and their probabilities summed and divided by
    the per-pixel window count, then the padding is cropped off;
  * every forward pass: pad (centred, zeros) so the model's ``size_rule`` accepts the size (PSPNet: (H-1)%8 ==
    (W-1)%8 == 0), run the model on ``[x, flip(x)]`` (with ``flip``), resize the logits to the padded input size
    (bilinear, align_corners=True) when the model returns another size, softmax over classes, crop the padding, and
    average the flipped-back probabilities;
  * the probabilities are resized (cv2 bilinear) to the original HxW.
The probabilities of all scales are averaged; the prediction is their argmax. Probabilities are accumulated in float64.

``protocol="danet"`` is junfu1115/DANet's ``MultiEvalModule`` instead (``crop`` an int, ``stride`` default
``int(crop*2/3)``, ``base_size`` default the image's long side). The image is normalised first; for every scale s:
  * long side ``ceil(base_size*s)``, short side ``int(short*long/long0 + 0.5)``; the normalised image is resized with
    bilinear align_corners=True interpolation;
  * long side <= crop: pad at the bottom/right to crop x crop with ``-mean/std`` (a black pixel), one forward pass;
    else pad (same way) only a side shorter than crop, windows of crop x crop at ``k*stride`` (the last ones may
    stick out: padded at the bottom/right the same way), scores averaged by the per-pixel window count;
  * every forward pass scores ``exp(logits(x) + flip(logits(flip(x))))`` (``exp(logits(x))`` without flip): the
    exponential of the RAW summed logits, NOT a softmax, reproduced as DANet does (it changes how scales and windows
    weigh each other);
  * each scale's score is resized back to HxW (bilinear, align_corners=True) and the scales are SUMMED.
Computed in float64 (DANet: float32 on the GPU; the argmax differs only on ties or float32 overflow of exp).

``evaluate`` accumulates one confusion matrix over the dataset (``paddle_impl.metrics``) and returns plain Python
numbers: mIoU, Acc, mAcc, Kappa, mDice, per-class IoU / precision / recall / Dice lists and the confusion matrix.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Callable, Dict, Optional, Sequence, Tuple

import cv2
import numpy as np

from alignment.utils import atomic_write, parse_size

__all__ = ["evaluate", "predict_logits", "predict_label", "format_table", "save_json", "default_size_rule",
           "valid_size", "DEFAULT_NORMALIZE", "PROTOCOLS"]

from ..transforms import SEMSEG_MEAN, SEMSEG_STD, long_side_size

#: (mean, std, to_bgr): semseg's RGB ImageNet statistics on the 0..255 scale
DEFAULT_NORMALIZE = (SEMSEG_MEAN, SEMSEG_STD, False)

_AUTO = object()


# ----------------------------------------------------------------------------------------------------------------------
# sizes

def default_size_rule(model) -> Optional[Callable[[int, int], None]]:
    """The model's input-size check (``type(model).check_input``) when it has one, else None."""
    rule = getattr(type(model), "check_input", None)
    return rule if callable(rule) else None


_VALID_CACHE: Dict[Tuple[int, int, int], Tuple[int, int]] = {}


def valid_size(h: int, w: int, size_rule: Optional[Callable[[int, int], None]], max_pad: int = 64) -> Tuple[int, int]:
    """Smallest (H', W') >= (h, w) that ``size_rule`` accepts (no rule: (h, w)). Raises ValueError if none within
    ``max_pad`` pixels."""
    if size_rule is None:
        return h, w
    key = (id(size_rule), h, w)
    if key in _VALID_CACHE:
        return _VALID_CACHE[key]
    candidates = sorted(((dh, dw) for dh in range(max_pad) for dw in range(max_pad)),
                        key=lambda d: (max(d), d[0] + d[1], d))
    first_error = None
    for dh, dw in candidates:
        try:
            size_rule(h + dh, w + dw)
        except ValueError as e:
            first_error = first_error or e
            continue
        _VALID_CACHE[key] = (h + dh, w + dw)
        return h + dh, w + dw
    raise ValueError(f"no input size within {max_pad} pixels of {h}x{w} satisfies the model's size rule: "
                     f"{first_error}")


# ----------------------------------------------------------------------------------------------------------------------
# one image

def _normalize(image: np.ndarray, normalize) -> np.ndarray:
    mean, std, to_bgr = normalize
    img = image.astype(np.float32)
    if to_bgr:
        img = img[..., ::-1]
    return np.ascontiguousarray((img - np.asarray(mean, np.float32)) / np.asarray(std, np.float32), dtype=np.float32)


def _pad_centered(x: np.ndarray, h: int, w: int) -> Tuple[np.ndarray, int, int]:
    """x (C, h0, w0) -> (C, h, w) zero-padded, centred as semseg (half before, rest after); returns offsets."""
    c, h0, w0 = x.shape
    if (h0, w0) == (h, w):
        return x, 0, 0
    top, left = (h - h0) // 2, (w - w0) // 2
    out = np.zeros((c, h, w), dtype=x.dtype)
    out[:, top:top + h0, left:left + w0] = x
    return out, top, left


def _forward(model, x: np.ndarray, flip: bool, size_rule) -> np.ndarray:
    """x (C, h, w) normalised float32 -> softmax probabilities (K, h, w) float64, flip-averaged."""
    import paddle
    import paddle.nn.functional as F

    _, h, w = x.shape
    ph, pw = valid_size(h, w, size_rule)
    xp, top, left = _pad_centered(x, ph, pw)
    batch = xp[None]
    if flip:
        batch = np.concatenate([batch, batch[:, :, :, ::-1]], 0)
    with paddle.no_grad():
        out = model(paddle.to_tensor(np.ascontiguousarray(batch)))
        if isinstance(out, (tuple, list)):
            out = out[0]
        if tuple(out.shape[2:]) != (ph, pw):
            out = F.interpolate(out, size=[ph, pw], mode="bilinear", align_corners=True)
        prob = F.softmax(out, axis=1).numpy()
    prob = prob[:, :, top:top + h, left:left + w].astype(np.float64)
    if flip:
        return (prob[0] + prob[1][:, :, ::-1]) / 2
    return prob[0]


def _slide(model, x: np.ndarray, crop: Tuple[int, int], stride: Tuple[int, int], flip: bool, size_rule) -> np.ndarray:
    _, h0, w0 = x.shape
    ch, cw = crop
    xp, top, left = _pad_centered(x, max(h0, ch), max(w0, cw))
    _, h, w = xp.shape
    sh, sw = stride
    grid_h = int(math.ceil((h - ch) / sh)) + 1
    grid_w = int(math.ceil((w - cw) / sw)) + 1
    prob = None
    count = np.zeros((h, w), dtype=np.float64)
    for ih in range(grid_h):
        for iw in range(grid_w):
            e_h = min(ih * sh + ch, h)
            s_h = e_h - ch
            e_w = min(iw * sw + cw, w)
            s_w = e_w - cw
            p = _forward(model, xp[:, s_h:e_h, s_w:e_w], flip, size_rule)
            if prob is None:
                prob = np.zeros((p.shape[0], h, w), dtype=np.float64)
            prob[:, s_h:e_h, s_w:e_w] += p
            count[s_h:e_h, s_w:e_w] += 1
    prob /= count[None]
    return prob[:, top:top + h0, left:left + w0]


def _resize_chw(prob: np.ndarray, h: int, w: int) -> np.ndarray:
    """cv2 bilinear resize of (K, h0, w0) float64 probabilities (cv2 takes at most 512 channels at a time)."""
    if prob.shape[1:] == (h, w):
        return prob
    hwc = np.ascontiguousarray(prob.transpose(1, 2, 0))
    parts = []
    for k in range(0, hwc.shape[2], 512):
        r = cv2.resize(np.ascontiguousarray(hwc[:, :, k:k + 512]), (w, h), interpolation=cv2.INTER_LINEAR)
        parts.append(r.reshape(h, w, -1))
    return np.ascontiguousarray(np.concatenate(parts, 2).transpose(2, 0, 1))


# ----------------------------------------------------------------------------------------------------------------------
# DANet protocol (junfu1115/DANet ``encoding/models/sseg/base.py`` ``MultiEvalModule``)

def _resize_ac(x: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bilinear resize of (C, h0, w0) with align_corners=True semantics (output pixel i samples input position
    ``i * (n_in - 1) / (n_out - 1)``), float64; two separable gathers, O(output size)."""
    def axis(n_in: int, n_out: int):
        src = np.arange(n_out, dtype=np.float64) * ((n_in - 1) / (n_out - 1)) if n_out > 1 and n_in > 1 \
            else np.zeros(n_out)
        i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, src - i0

    x = np.asarray(x, dtype=np.float64)
    _, h0, w0 = x.shape
    if (h0, w0) == (h, w):
        return x
    i0, i1, f = axis(h0, h)
    x = x[:, i0] * (1 - f)[None, :, None] + x[:, i1] * f[None, :, None]
    j0, j1, g = axis(w0, w)
    return x[:, :, j0] * (1 - g) + x[:, :, j1] * g


def _pad_br(x: np.ndarray, h: int, w: int, value: np.ndarray) -> np.ndarray:
    """(C, h0, w0) -> (C, max(h0, h), max(w0, w)), padded at the bottom/right with ``value[c]`` per channel."""
    c, h0, w0 = x.shape
    h, w = max(h, h0), max(w, w0)
    if (h, w) == (h0, w0):
        return x
    out = np.empty((c, h, w), dtype=x.dtype)
    out[:] = np.asarray(value, dtype=x.dtype).reshape(c, 1, 1)
    out[:, :h0, :w0] = x
    return out


def _danet_forward(model, x: np.ndarray, flip: bool, size_rule, pad_value) -> np.ndarray:
    """x (C, h, w) normalised float32 -> ``exp(logits(x) [+ flip(logits(flip(x)))])`` (K, h, w) float64. The exp
    of the raw (flip-summed) logits, not a softmax: DANet's score."""
    import paddle
    import paddle.nn.functional as F

    _, h, w = x.shape
    ph, pw = valid_size(h, w, size_rule)
    xp = _pad_br(x, ph, pw, pad_value)
    batch = xp[None]
    if flip:
        batch = np.concatenate([batch, batch[:, :, :, ::-1]], 0)
    with paddle.no_grad():
        out = model(paddle.to_tensor(np.ascontiguousarray(batch, dtype=np.float32)))
        if isinstance(out, (tuple, list)):
            out = out[0]
        if tuple(out.shape[2:]) != (ph, pw):
            out = F.interpolate(out, size=[ph, pw], mode="bilinear", align_corners=True)
        logits = out.numpy().astype(np.float64)
    z = logits[0] + logits[1][:, :, ::-1] if flip else logits[0]
    return np.exp(z[:, :h, :w])


def _danet_scale(model, x: np.ndarray, scale: float, base_size: int, crop: int, stride: Tuple[int, int],
                 flip: bool, size_rule, pad_value) -> np.ndarray:
    """One scale of the DANet protocol on the normalised image x (C, H, W) -> score (K, H, W) float64."""
    _, h, w = x.shape
    long_size = int(math.ceil(base_size * scale))
    height, width = long_side_size(h, w, long_size)
    cur = _resize_ac(x, height, width)  # the normalised image, as DANet resizes its input tensor
    if long_size <= crop:
        score = _danet_forward(model, _pad_br(cur, crop, crop, pad_value), flip, size_rule, pad_value)
        score = score[:, :height, :width]
    else:
        img = _pad_br(cur, crop, crop, pad_value)  # only the side(s) shorter than the crop
        _, ph, pw = img.shape
        sh, sw = stride
        score, count = None, np.zeros((ph, pw), dtype=np.float64)
        for idh in range(int(math.ceil((ph - crop) / sh)) + 1):
            for idw in range(int(math.ceil((pw - crop) / sw)) + 1):
                h0, w0 = idh * sh, idw * sw
                h1, w1 = min(h0 + crop, ph), min(w0 + crop, pw)
                win = _pad_br(img[:, h0:h1, w0:w1], crop, crop, pad_value)
                s = _danet_forward(model, win, flip, size_rule, pad_value)
                if score is None:
                    score = np.zeros((s.shape[0], ph, pw), dtype=np.float64)
                score[:, h0:h1, w0:w1] += s[:, :h1 - h0, :w1 - w0]
                count[h0:h1, w0:w1] += 1
        score = (score / count[None])[:, :height, :width]
    return _resize_ac(score, h, w)


PROTOCOLS = ("semseg", "danet")


def _check_options(mode, crop, stride, scales, protocol="semseg"):
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {list(PROTOCOLS)}, got {protocol!r}")
    if mode not in ("whole", "slide"):
        raise ValueError(f"mode must be 'whole' or 'slide', got {mode!r}")
    scales = tuple(float(s) for s in scales)
    if not scales or any(not (s > 0) for s in scales):
        raise ValueError(f"scales must be positive numbers, got {scales!r}")
    if protocol == "danet":
        if crop is None:
            raise ValueError("protocol='danet' needs crop (an int: the square window)")
        crop = parse_size(crop, "crop")
        if crop[0] != crop[1]:
            raise ValueError(f"protocol='danet' uses square windows: crop must be an int, got {crop!r}")
        stride = (int(crop[0] * 2 / 3),) * 2 if stride is None else parse_size(stride, "stride")
        if max(stride) > crop[0]:
            raise ValueError(f"stride {stride!r} is larger than the crop {crop[0]}: pixels between windows would "
                             f"get no score")
        return crop, stride, scales
    if mode == "slide":
        if crop is None:
            raise ValueError("mode='slide' needs crop (an int or (H, W))")
        crop = parse_size(crop, "crop")
        stride = (int(math.ceil(crop[0] * 2 / 3)), int(math.ceil(crop[1] * 2 / 3))) if stride is None \
            else parse_size(stride, "stride")
    else:  # whole image: windows are not used
        crop = stride = None
    return crop, stride, scales


def predict_logits(model, image: np.ndarray, *, mode: str = "whole", crop=None, stride=None, flip: bool = False,
                   scales: Sequence[float] = (1.0,), normalize=DEFAULT_NORMALIZE, size_rule=_AUTO,
                   base_size: Optional[int] = None, protocol: str = "semseg") -> np.ndarray:
    """Class scores (K, H, W) float64 of one raw HxWx3 image (uint8 or float, the dataset's channel order); their
    argmax is the prediction.

    ``protocol="semseg"`` (default): softmax probabilities averaged over flips, windows and scales, as semseg.
    ``protocol="danet"``: junfu1115/DANet's ``MultiEvalModule``: ``exp`` of the flip-summed raw logits, averaged
    over windows and SUMMED over scales (``mode`` is not used: windows run only where the scaled long side exceeds
    ``crop``; ``stride`` default ``int(crop*2/3)``; ``base_size`` default: the image's long side). See the module
    docstring for both procedures. ``size_rule``: a callable (h, w) raising ValueError for sizes the model rejects;
    default ``type(model).check_input`` when present; None for no rule.
    """
    crop, stride, scales = _check_options(mode, crop, stride, scales, protocol)
    if size_rule is _AUTO:
        size_rule = default_size_rule(model)
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be HxWx3, got shape {image.shape}")
    h, w = image.shape[:2]
    if protocol == "danet":
        x = _normalize(image, normalize).transpose(2, 0, 1)
        mean, std = np.asarray(normalize[0], np.float64), np.asarray(normalize[1], np.float64)
        black = -mean / std  # a 0 pixel after normalisation (DANet pads with -mean/std)
        base = int(base_size) if base_size is not None else max(h, w)
        total = None
        for s in scales:
            p = _danet_scale(model, x, s, base, crop[0], stride, flip, size_rule, black)
            total = p if total is None else total + p
        return total
    total = None
    for s in scales:
        if base_size is not None:
            long_size = int(round(s * base_size))
            nh, nw = (long_size, int(round(long_size / h * w))) if h > w else (int(round(long_size / w * h)), long_size)
        else:
            nh, nw = int(round(h * s)), int(round(w * s))
        nh, nw = max(nh, 1), max(nw, 1)
        img = image.astype(np.float32)
        if (nh, nw) != (h, w):
            img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR)
        x = _normalize(img, normalize).transpose(2, 0, 1)
        if mode == "whole":
            p = _forward(model, x, flip, size_rule)
        else:
            p = _slide(model, x, crop, stride, flip, size_rule)
        p = _resize_chw(p, h, w)
        total = p if total is None else total + p
    return total / len(scales) if len(scales) > 1 else total


def predict_label(model, image: np.ndarray, **kw) -> np.ndarray:
    """argmax of ``predict_logits`` -> HxW int64 class indices."""
    return np.argmax(predict_logits(model, image, **kw), axis=0).astype(np.int64)


# ----------------------------------------------------------------------------------------------------------------------
# dataset

def _label_file(dataset, i: int) -> str:
    files = getattr(dataset, "files", None)
    try:
        return str(files[i][1])
    except Exception:
        return f"sample {i}"


def _image_file(dataset, i: int) -> str:
    files = getattr(dataset, "files", None)
    try:
        return str(files[i][0])
    except Exception:
        return f"sample {i}"


def _progress(it, total, enabled):
    if not enabled:
        return it
    try:
        from tqdm import tqdm
        return tqdm(it, total=total, desc="eval", unit="img", file=sys.stderr)
    except ImportError:  # pragma: no cover
        return it


def evaluate(model, dataset, num_classes: int, *, ignore_index: int = 255, mode: str = "whole", crop=None,
             stride=None, flip: bool = False, scales: Sequence[float] = (1.0,), normalize=DEFAULT_NORMALIZE,
             progress: bool = True, size_rule=_AUTO, base_size: Optional[int] = None,
             limit: Optional[int] = None, class_names: Optional[Sequence[str]] = None,
             on_prediction: Optional[Callable[[int, np.ndarray], None]] = None, protocol: str = "semseg") -> dict:
    """Evaluate ``model`` (a paddle Layer, put in eval mode here) on every sample of ``dataset``.

    ``dataset.load(i)`` (or ``dataset[i]``) must give the raw (image HxWx3, label HxW). ``on_prediction(i, pred)``
    is called with each HxW int64 prediction (e.g. to write it). Returns a JSON-serialisable dict: ``mIoU, Acc,
    mAcc, Kappa, mDice`` (floats), ``IoU, precision, recall, Dice`` (per-class lists), ``confusion_matrix``
    (list of lists, rows = ground truth), ``num_images``, ``num_classes``, ``class_names``, ``settings``, ``seconds``.
    """
    import paddle

    from ..metrics import confusion_matrix, metrics_from_confusion

    crop, stride, scales = _check_options(mode, crop, stride, scales, protocol)
    if size_rule is _AUTO:
        size_rule = default_size_rule(model)
    num_classes = int(num_classes)
    n = len(dataset) if limit is None else min(int(limit), len(dataset))
    if n == 0:
        raise ValueError("evaluate: the dataset is empty")
    model.eval()
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    t0 = time.time()
    for i in _progress(range(n), n, progress):
        try:
            image, label = dataset.load(i) if hasattr(dataset, "load") else dataset[i]
        except (OSError, ValueError) as e:
            msg = str(e)
            where = _image_file(dataset, i)
            if where in msg:
                raise
            try:
                err = type(e)(f"{where}: {msg}")
            except Exception:  # exception types with other constructor arguments
                raise e from None
            raise err from e
        image, label = np.asarray(image), np.asarray(label)
        if label.ndim != 2:
            raise ValueError(f"{_label_file(dataset, i)}: label must be HxW, got shape {label.shape}")
        bad_mask = (label != ignore_index) & ((label < 0) | (label >= num_classes))
        if bad_mask.any():
            bad = np.unique(label[bad_mask])
            raise ValueError(f"{_label_file(dataset, i)}: label value(s) {bad[:10].tolist()} are neither a class "
                             f"in [0, {num_classes}) nor ignore_index={ignore_index}")
        if image.shape[:2] != label.shape:
            raise ValueError(f"{_image_file(dataset, i)}: image {image.shape[:2]} and label {label.shape} differ")
        prob = predict_logits(model, image, mode=mode, crop=crop, stride=stride, flip=flip, scales=scales,
                              normalize=normalize, size_rule=size_rule, base_size=base_size, protocol=protocol)
        pred = np.argmax(prob, axis=0).astype(np.int64)
        if on_prediction is not None:
            on_prediction(i, pred)
        try:
            cm += confusion_matrix(paddle.to_tensor(pred), paddle.to_tensor(label.astype(np.int64)), num_classes,
                                   ignore_index).numpy()
        except ValueError as e:  # pragma: no cover - the check above catches it first
            raise ValueError(f"{_label_file(dataset, i)}: {e}") from e
    m = metrics_from_confusion(paddle.to_tensor(cm))
    result = {k: (float(v) if v.ndim == 0 else v.numpy().tolist()) for k, v in m.items() if k != "confusion_matrix"}
    result["confusion_matrix"] = cm.tolist()
    result["num_images"] = n
    result["num_classes"] = num_classes
    names = class_names if class_names is not None else getattr(dataset, "class_names", None)
    result["class_names"] = list(names) if names is not None else [str(c) for c in range(num_classes)]
    result["settings"] = {"protocol": protocol, "mode": mode if protocol == "semseg" else None,
                          "crop": list(crop) if crop else None, "stride": list(stride) if stride else None,
                          "flip": bool(flip), "scales": list(scales), "base_size": base_size,
                          "ignore_index": ignore_index,
                          "normalize": {"mean": list(map(float, normalize[0])), "std": list(map(float, normalize[1])),
                                        "to_bgr": bool(normalize[2])}}
    result["seconds"] = time.time() - t0
    return result


# ----------------------------------------------------------------------------------------------------------------------
# output

def format_table(result: dict, class_names: Optional[Sequence[str]] = None) -> str:
    """A per-class table (IoU, precision, recall, Dice, in %) followed by the summary line."""
    names = list(class_names) if class_names is not None else result.get("class_names") or \
        [str(c) for c in range(len(result["IoU"]))]
    if len(names) != len(result["IoU"]):
        raise ValueError(f"{len(names)} class names for {len(result['IoU'])} classes")
    cm = np.asarray(result["confusion_matrix"])
    gt = cm.sum(1)
    width = max(12, max(len(n) for n in names))
    lines = [f"{'class':<{width}}  {'IoU':>7}  {'Prec':>7}  {'Recall':>7}  {'Dice':>7}  {'pixels':>10}",
             "-" * (width + 48)]
    for c, name in enumerate(names):
        lines.append(f"{name:<{width}}  {100 * result['IoU'][c]:7.2f}  {100 * result['precision'][c]:7.2f}  "
                     f"{100 * result['recall'][c]:7.2f}  {100 * result['Dice'][c]:7.2f}  {int(gt[c]):>10d}")
    lines.append("-" * (width + 48))
    lines.append(f"mIoU {100 * result['mIoU']:.2f}  Acc {100 * result['Acc']:.2f}  mAcc {100 * result['mAcc']:.2f}  "
                 f"Kappa {result['Kappa']:.4f}  mDice {100 * result['mDice']:.2f}  "
                 f"({result.get('num_images', '?')} images)")
    return "\n".join(lines)


def save_json(result: dict, path) -> str:
    """Write ``result`` as JSON (atomically: tmp + rename); return the path."""
    path = os.fspath(path)
    with atomic_write(path) as f:
        json.dump(result, f, indent=1)
    return path
