"""Losses of the reference models (twin: torch_ref/losses.py).

    loss = build_loss("pspnet", cfg["loss"], ignore_index=255)     # or build_loss("pspnet") for the official one
    terms = loss(model_outputs, target)                           # {"main": .., "aux": .., "loss": weighted sum}

Pixel losses over the CLASS axis (dim 1 of NCHW logits); labels equal to `ignore_index` are excluded:

* `CrossEntropyLoss(avg="valid")`: the mean over the non-ignored pixels (torch's default reduction, used by semseg,
  DANet and PaddleSeg; 0 when every pixel is ignored). `avg="all"`: their sum over ALL pixels (mmseg's
  avg_non_ignore=False). `weight`: per-class weights; the denominator stays the pixel count (PaddleSeg's rule).
* `OhemCrossEntropyLoss(thresh, min_kept)`: online hard example mining with PaddleSeg's rule. p = softmax probability
  of the true class of each valid pixel; when min_kept < #valid, threshold = max(thresh, the min_kept-th smallest p)
  and only pixels with p < threshold (strict) are kept; else all valid pixels. Mean CE over the kept pixels. The
  selection is not differentiated through.
* `RMILoss(do_rmi=True, rmi_radius=3, rmi_pool_size=4, ...)`: NVIDIA's criterion of HRNet-OCR (`rmi.py`): 0.5 x
  sigmoid-BCE over the one-hot labels (summed, divided by valid pixels + 1) + 0.5 x the region mutual information
  lower bound (float64 log-determinants); `do_rmi=False` is the BCE half alone, unweighted.

`build_loss` reads the loss section through `alignment.recipe.resolve_loss` (one entry per loss term of the model's
spec); the terms are reported unweighted so the alignment can compare every one of them. When the model's official
criterion ignores its own label (spec `ignore_label`, DANet's -1), the target is relabelled for the terms that do not
set their own `ignore_index`.
"""
from __future__ import annotations

from alignment.recipe import resolve_loss
from alignment.specs import get_spec

from . import layers as L
from . import rmi


def _check(logits, label) -> None:
    if len(L.sizes(logits)) != 4 or len(L.sizes(label)) != 3:
        raise ValueError(f"expected logits N x C x H x W and label N x H x W, got {list(L.sizes(logits))} and "
                         f"{list(L.sizes(label))}")
    n, _, h, w = L.sizes(logits)
    if (n, h, w) != L.sizes(label):
        raise ValueError(f"logits {list(L.sizes(logits))} and label {list(L.sizes(label))} differ in N, H or W "
                         f"(upsample the logits to the label size first)")


class CrossEntropyLoss(L.Module):
    """Pixel cross-entropy, averaged over the valid pixels or over all of them (see the module doc)."""

    def __init__(self, ignore_index: int = 255, avg: str = "valid", weight=None):
        super().__init__()
        if avg not in ("valid", "all"):
            raise ValueError(f"avg must be 'valid' or 'all', got {avg!r}")
        self.ignore_index = int(ignore_index)
        self.avg = avg
        self.weight = None if weight is None else [float(w) for w in weight]

    def forward(self, logits, label):
        _check(logits, label)
        loss = L.pixel_cross_entropy(logits, label, self.ignore_index, self.weight)
        if self.avg == "all":
            return loss.mean()
        valid = L.as_dtype_of(label != self.ignore_index, loss).sum()
        return loss.sum() / L.clamp_min(valid, 1.0)


class OhemCrossEntropyLoss(L.Module):
    """PaddleSeg's online hard example mining cross-entropy (see the module doc). With its strict `<`, when the
    min_kept-th probability exceeds `thresh` that pixel itself (and its ties) is dropped: min_kept - 1 are kept."""

    def __init__(self, thresh: float = 0.7, min_kept: int = 10000, ignore_index: int = 255):
        super().__init__()
        self.thresh = float(thresh)
        self.min_kept = int(min_kept)
        self.ignore_index = int(ignore_index)

    def kept_mask(self, logits, label):
        """(N, H, W) mask (logits' dtype) of the pixels the loss averages over."""
        with L.no_grad():
            valid = label != self.ignore_index
            safe = L.where(valid, label, L.zeros_like(label))
            p = L.take_class(L.softmax(logits.detach(), 1), safe)
            p = L.where(valid, p, L.full_like(p, 2.0))  # ignored pixels sort last
            num_valid = int(L.as_dtype_of(valid, p).sum())
            mask = valid
            if 0 < self.min_kept < num_valid:
                flat = L.sorted_values(p.flatten())
                kth = float(flat[self.min_kept - 1])
                threshold = kth if kth > self.thresh else self.thresh
                mask = L.logical_and(valid, p < threshold)
            return L.as_dtype_of(mask, logits)

    def forward(self, logits, label):
        _check(logits, label)
        mask = self.kept_mask(logits, label)
        loss = L.pixel_cross_entropy(logits, label, self.ignore_index, None)
        return (loss * mask).sum() / L.clamp_min(mask.sum(), 1.0)


class RMILoss(L.Module):
    """NVIDIA's criterion (`rmi.RMILoss`) as a pixel loss of this module: the class count is the logits' own, pixels
    with a label >= it (the ignore label among them) are left out; `do_rmi` False is NVIDIA's
    `criterion(..., do_rmi=False)`, the sigmoid-BCE half alone."""

    def __init__(self, do_rmi: bool = True, ignore_index: int = 255, **rmi_args):
        super().__init__()
        self.do_rmi = bool(do_rmi)
        self.ignore_index = int(ignore_index)
        self.rmi_args = dict(rmi_args)

    def forward(self, logits, label):
        _check(logits, label)
        criterion = rmi.RMILoss(L.sizes(logits)[1], ignore_index=self.ignore_index, **self.rmi_args)
        return criterion(logits, label, do_rmi=self.do_rmi)


LOSSES = {"CrossEntropyLoss": CrossEntropyLoss, "OhemCrossEntropyLoss": OhemCrossEntropyLoss, "RMILoss": RMILoss}


class MultiLoss(L.Module):
    """One loss per model output: `forward(outputs, label) -> {term: value, ..., "loss": sum of coef * term}`.

    `relabel` (old, new): the target with `old` replaced by `new` is given to the terms in `relabelled`.
    `pairs(outputs, label) -> [(logits, target), ...]`: the model's own pairing of its training outputs with targets
    (its module's `loss_pairs`, e.g. PointRend's point logits against the label sampled at the points); default:
    every output against the label."""

    def __init__(self, losses, coefs, names, relabel=None, relabelled=(), pairs=None):
        super().__init__()
        self.losses = L.ModuleList(list(losses))
        self.coefs = [float(c) for c in coefs]
        self.names = list(names)
        self.relabel = relabel
        self.relabelled = set(relabelled)
        self.pairs = pairs

    def forward(self, outputs, label) -> dict:
        if not isinstance(outputs, (tuple, list)):
            outputs = (outputs,)
        own = None if self.relabel is None else L.relabel(label, *self.relabel)
        if self.pairs is not None:
            pairs = self.pairs(outputs, label)
        else:
            pairs = [(out, own if name in self.relabelled else label) for name, out in zip(self.names, outputs)]
        if len(pairs) != len(self.names) or (self.pairs is None and len(outputs) != len(self.names)):
            raise ValueError(f"the model returned {len(outputs)} outputs, its loss expects {len(self.names)} "
                             f"({', '.join(self.names)})")
        result = {}
        total = 0.0
        for name, fn, coef, (logits, target) in zip(self.names, self.losses, self.coefs, pairs):
            result[name] = fn(logits, target)
            total = total + coef * result[name]
        result["loss"] = total
        return result


def build_loss(name: str, section=None, ignore_index: int = 255, model_cfg=None) -> MultiLoss:
    """The loss of model `name` from a config's `loss` section (None: the model's official criterion);
    `ignore_index`: the dataset's void label; `model_cfg`: the model's config (its loss terms may depend on it)."""
    spec = get_spec(name)
    terms = resolve_loss(section, spec, model_cfg)
    own = spec.ignore_label
    losses, relabelled = [], []
    for t in terms:
        kwargs = {k: v for k, v in t.items() if k not in ("name", "coef", "type")}
        if kwargs["ignore_index"] is None:
            kwargs["ignore_index"] = ignore_index if own is None else own
            if own is not None:
                relabelled.append(t["name"])
        losses.append(LOSSES[t["type"]](**kwargs))
    relabel = None if own is None else (ignore_index, own)
    pairs = getattr(spec.module(L.FRAMEWORK), "loss_pairs", None)
    return MultiLoss(losses, [t["coef"] for t in terms], [t["name"] for t in terms], relabel, relabelled, pairs)


def compute_loss(name: str, outputs, target, ignore_index: int = 255) -> dict:
    """The official criterion of model `name` on its training-mode outputs -> {"loss", <term>...}."""
    return build_loss(name, None, ignore_index)(outputs, target)
