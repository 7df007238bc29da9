"""Training losses (Paddle), configured PaddleSeg-style.

    loss:
      types:
        - type: CrossEntropyLoss          # or OhemCrossEntropyLoss
          avg: valid                      # "valid" (torch / semseg / PaddleSeg) or "all" (mmseg avg_non_ignore=False)
      coef: [1, 0.4]                      # main, aux   (one type with N coefs = the same loss N times, as PaddleSeg)

``build_loss(cfg["loss"])`` gives a ``MultiLoss``; ``MultiLoss(outputs, label)`` returns ``{"main": .., "aux": ..,
"loss": total}`` (terms UNweighted, ``loss`` = sum of coef * term). Logits are NCHW, labels NHW int64 with
``ignore_index`` (255) for void pixels; the class axis is 1 (Paddle's default axis is -1 = the image width).
"""
from __future__ import annotations

import difflib
from typing import Any, Dict, List, Optional, Sequence

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

__all__ = ["CrossEntropyLoss", "OhemCrossEntropyLoss", "MultiLoss", "LOSSES", "build_loss", "default_term_names"]


def _check(logits, label) -> None:
    if logits.ndim != 4 or label.ndim != 3:
        raise ValueError(f"expected logits N x C x H x W and label N x H x W, got {list(logits.shape)} and "
                         f"{list(label.shape)}")
    if [logits.shape[0]] + list(logits.shape[2:]) != list(label.shape):
        raise ValueError(f"logits {list(logits.shape)} and label {list(label.shape)} differ in N, H or W "
                         f"(upsample the logits to the label size first)")


def _pixel_ce(logits, label, ignore_index: int, weight=None):
    """Per-pixel CE (N, H, W) over axis 1; 0 at ignored pixels."""
    loss = F.cross_entropy(logits, label.astype("int64"), weight=weight, ignore_index=ignore_index,
                           reduction="none", axis=1)
    if loss.ndim == 4:  # Paddle keeps the class axis as size 1
        loss = loss.squeeze(1)
    return loss


class CrossEntropyLoss(nn.Layer):
    """Pixel cross-entropy over the class axis (1).

    ``avg="valid"``: sum over non-ignored pixels / their number (torch's / semseg's / PaddleSeg's mean; equals
    ``paddle_impl.losses.cross_entropy``; 0 when every pixel is ignored instead of NaN).
    ``avg="all"``: sum over non-ignored pixels / ALL pixels (mmseg's default ``avg_non_ignore=False``).
    ``weight``: optional per-class weights (C floats; with "valid" the denominator stays the pixel count, as
    PaddleSeg, not torch's sum of weights).
    """

    def __init__(self, ignore_index: int = 255, avg: str = "valid", weight: Optional[Sequence[float]] = None):
        super().__init__()
        if avg not in ("valid", "all"):
            raise ValueError(f"avg must be 'valid' or 'all', got {avg!r}")
        self.ignore_index = int(ignore_index)
        self.avg = avg
        self.weight = None if weight is None else paddle.to_tensor(list(weight), dtype="float32")

    def forward(self, logits, label):
        _check(logits, label)
        loss = _pixel_ce(logits, label, self.ignore_index, self.weight)
        if self.avg == "all":
            return loss.mean()
        valid = (label != self.ignore_index).astype(loss.dtype).sum()
        return loss.sum() / paddle.clip(valid, min=1.0)

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}, avg={self.avg!r}"


class OhemCrossEntropyLoss(nn.Layer):
    """PaddleSeg ``OhemCrossEntropyLoss`` (online hard example mining).

    p = softmax probability of the true class per valid pixel. When ``min_kept < #valid``: threshold =
    max(``thresh``, k-th smallest p with k = ``min_kept``) and only pixels with ``p < threshold`` (strict, as
    PaddleSeg) are kept; otherwise every valid pixel is kept. Loss = sum of CE over kept pixels / #kept (0 if
    none). The selection is not differentiated through. Note PaddleSeg's strict ``<``: when the k-th probability
    exceeds ``thresh`` the k-th pixel itself (and ties) is dropped, so ``min_kept - 1`` pixels are kept.
    """

    def __init__(self, thresh: float = 0.7, min_kept: int = 10000, ignore_index: int = 255):
        super().__init__()
        self.thresh = float(thresh)
        self.min_kept = int(min_kept)
        self.ignore_index = int(ignore_index)

    def kept_mask(self, logits, label):
        """(N, H, W) float mask of the pixels the loss averages over."""
        with paddle.no_grad():
            valid = label != self.ignore_index
            lbl = paddle.where(valid, label, paddle.zeros_like(label)).astype("int64")
            prob = F.softmax(logits.detach(), axis=1)
            p = paddle.take_along_axis(prob, lbl.unsqueeze(1), axis=1).squeeze(1)
            p = paddle.where(valid, p, paddle.full_like(p, 2.0))  # ignored pixels sort last
            num_valid = int(valid.astype("int64").sum())
            mask = valid
            if 0 < self.min_kept < num_valid:
                flat = paddle.sort(p.flatten())
                kth = float(flat[min(flat.shape[0], self.min_kept) - 1])
                threshold = kth if kth > self.thresh else self.thresh
                mask = paddle.logical_and(valid, p < threshold)
            return mask.astype(logits.dtype)

    def forward(self, logits, label):
        _check(logits, label)
        mask = self.kept_mask(logits, label)
        loss = _pixel_ce(logits, label, self.ignore_index)
        return (loss * mask).sum() / paddle.clip(mask.sum(), min=1.0)

    def extra_repr(self) -> str:
        return f"thresh={self.thresh}, min_kept={self.min_kept}, ignore_index={self.ignore_index}"


def default_term_names(n: int) -> List[str]:
    """``main``, ``aux`` for two outputs; ``main``, ``aux1``, ``aux2``... for more (DANet: sum, PAM, CAM)."""
    if n == 1:
        return ["main"]
    if n == 2:
        return ["main", "aux"]
    return ["main"] + [f"aux{i}" for i in range(1, n)]


class MultiLoss(nn.Layer):
    """One loss per model output, weighted: ``forward(outputs, label) -> {name: term, ..., "loss": total}``.

    ``outputs``: a tensor (one loss) or a tuple/list in the model's training-mode order (main first). Terms are
    reported unweighted; ``loss = sum(coef_i * term_i)``.
    """

    def __init__(self, losses: Sequence[nn.Layer], coefs: Optional[Sequence[float]] = None,
                 names: Optional[Sequence[str]] = None):
        super().__init__()
        losses = list(losses)
        if not losses:
            raise ValueError("MultiLoss needs at least one loss")
        coefs = [1.0] * len(losses) if coefs is None else [float(c) for c in coefs]
        if len(coefs) != len(losses):
            raise ValueError(f"{len(losses)} losses but {len(coefs)} coefficients")
        names = default_term_names(len(losses)) if names is None else [str(n) for n in names]
        if len(names) != len(losses) or len(set(names)) != len(names) or "loss" in names:
            raise ValueError(f"names must be {len(losses)} distinct names other than 'loss', got {names}")
        self.losses = nn.LayerList(losses)
        self.coefs = coefs
        self.names = names

    def forward(self, outputs, label) -> Dict[str, Any]:
        if not isinstance(outputs, (tuple, list)):
            outputs = (outputs,)
        if len(outputs) != len(self.losses):
            raise ValueError(f"the model returned {len(outputs)} outputs but the loss has {len(self.losses)} terms "
                             f"({', '.join(self.names)}); give one type / coef per output")
        result: Dict[str, Any] = {}
        total = None
        for name, fn, coef, out in zip(self.names, self.losses, self.coefs, outputs):
            term = fn(out, label)
            result[name] = term
            total = coef * term if total is None else total + coef * term
        result["loss"] = total
        return result

    def extra_repr(self) -> str:
        return f"names={self.names}, coefs={self.coefs}"


LOSSES: Dict[str, type] = {"CrossEntropyLoss": CrossEntropyLoss, "OhemCrossEntropyLoss": OhemCrossEntropyLoss}


def _build_one(spec, ignore_index: Optional[int]) -> nn.Layer:
    if isinstance(spec, str):
        spec = {"type": spec}
    if not isinstance(spec, dict) or "type" not in spec:
        raise ValueError(f"a loss entry must be a mapping with a 'type' key, got {spec!r}")
    spec = dict(spec)
    name = spec.pop("type")
    if name not in LOSSES:
        close = difflib.get_close_matches(str(name), list(LOSSES), n=2, cutoff=0.4)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"unknown loss type {name!r}{hint} (known: {', '.join(sorted(LOSSES))})")
    if ignore_index is not None:
        spec.setdefault("ignore_index", ignore_index)
    try:
        return LOSSES[name](**spec)
    except TypeError as e:
        raise ValueError(f"bad arguments for loss {name}: {e}") from None


def build_loss(spec: Dict[str, Any], ignore_index: Optional[int] = None) -> MultiLoss:
    """``MultiLoss`` from PaddleSeg's ``{types: [{type: ..., ...}, ...], coef: [...]}`` (optional ``names``).

    As PaddleSeg: one type with several coefs is repeated for every coef; otherwise the lengths must match.
    ``ignore_index`` (e.g. the dataset's) is the default for every loss that does not set its own."""
    if not isinstance(spec, dict) or "types" not in spec:
        raise ValueError(f"loss config must be a mapping with 'types' (and 'coef'), got {spec!r}")
    types = list(spec["types"])
    coefs = [float(c) for c in spec.get("coef", [1.0] * len(types))]
    if len(types) != len(coefs):
        if len(types) == 1:
            types = types * len(coefs)
        else:
            raise ValueError(f"loss has {len(types)} types but {len(coefs)} coefs; they must match (or give one "
                             f"type for all coefs)")
    unknown = set(spec) - {"types", "coef", "names"}
    if unknown:
        raise ValueError(f"unknown loss config keys {sorted(unknown)}; expected types, coef, names")
    return MultiLoss([_build_one(t, ignore_index) for t in types], coefs, spec.get("names"))
