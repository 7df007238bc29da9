"""PSANet (twin: paddle_impl/models/psanet.py), faithful to hszhao/semseg `model/psanet.py`.

semseg key names (`module.` stripped): the backbone and heads of models/semseg.py plus
    psa.reduce.{0,1}.*       1x1 conv 2048->512, BN (ReLU at 2)        collect branch
    psa.attention.{0,1,3}.*  1x1 conv 512->512, BN, (ReLU), 1x1 conv 512->mask_h*mask_w
    psa.reduce_p.*, psa.attention_p.*                                  distribute branch (psa_type 2 only)
    psa.proj.{0,1}.*         1x1 conv 512*(2 if type 2 else 1)->2048, BN (ReLU at 2)
Oddities of the official code reproduced on purpose:
* the PSA mask fills positions outside the window with 0, NOT -inf, and the softmax runs over all h*w entries,
  so out-of-window positions still receive weight exp(0)/Z (only a full-size mask makes every entry real);
* shrinking uses h' = (h-1)//s + 1 with align_corners=True, and the way back (h'-1)*s + 1, which restores h only
  for odd feature sizes (every size the (H-1)%8 rule allows with s = 2 and an odd crop/8 + 1);
* psa_type 2 concatenates [collect, distribute] in that order;
* compact mode (mask = shrunken feature size, no op): type 1 and the distribute branch of type 2 transpose the
  (h*w, h*w) map instead of calling the op.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional

from alignment.specs import ConfigInferenceError

from .. import layers as L
from ..ops.psa_attend import psa_attend
from ..ops.psa_mask import psa_mask
from .semseg import SemsegNet, infer_backbone_config


#: psa_impl values: the PSA mask op's impls ("auto", "cpp", "tensor") with the reference softmax + bmm, or "fused"
#: (ops/psa_attend.py: the whole aggregation in one compiled kernel)
PSA_IMPLS = ("auto", "cpp", "tensor", "fused")


def _branch(in_dim: int, mid_dim: int, bn_momentum: float):
    return L.Sequential(L.Conv2d(in_dim, mid_dim, 1, bias=False), L.BatchNorm2d(mid_dim, momentum=bn_momentum),
                        L.ReLU())


def _attention(mid_dim: int, mask_channels: int, bn_momentum: float):
    return L.Sequential(
        L.Conv2d(mid_dim, mid_dim, 1, bias=False),
        L.BatchNorm2d(mid_dim, momentum=bn_momentum),
        L.ReLU(),
        L.Conv2d(mid_dim, mask_channels, 1, bias=False),
    )


class PSA(L.Module):
    """Point-wise spatial attention: x (N, 2048, h, w) -> cat[x, proj(attended)] (N, 4096, h, w)."""

    def __init__(self, in_channels: int = 2048, mid_channels: int = 512, psa_type: int = 2, compact: bool = False,
                 shrink_factor: int = 2, mask_h: int = 59, mask_w: int = 59,
                 normalization_factor: Optional[float] = 1.0, psa_softmax: bool = True, bn_momentum: float = 0.1,
                 psa_impl: str = "auto"):
        super().__init__()
        if psa_type not in (0, 1, 2):
            raise ValueError(f"PSA psa_type must be 0 (collect), 1 (distribute) or 2 (both), got {psa_type}")
        if psa_impl not in PSA_IMPLS:
            raise ValueError(f"PSA psa_impl must be one of {PSA_IMPLS}, got {psa_impl!r}")
        if compact and psa_impl == "fused":
            warnings.warn("PSA compact mode uses no PSA mask (the map is the logits themselves): psa_impl='fused' "
                          "runs the reference path there", RuntimeWarning, stacklevel=2)
        self.psa_type = psa_type
        self.compact = compact
        self.shrink_factor = shrink_factor
        self.mask_h = mask_h
        self.mask_w = mask_w
        self.psa_softmax = psa_softmax
        self.normalization_factor = mask_h * mask_w if normalization_factor is None else normalization_factor
        self.psa_impl = psa_impl
        self.reduce = _branch(in_channels, mid_channels, bn_momentum)
        self.attention = _attention(mid_channels, mask_h * mask_w, bn_momentum)
        if psa_type == 2:
            self.reduce_p = _branch(in_channels, mid_channels, bn_momentum)
            self.attention_p = _attention(mid_channels, mask_h * mask_w, bn_momentum)
        self.proj = _branch(mid_channels * (2 if psa_type == 2 else 1), in_channels, bn_momentum)

    def _shrink(self, x):
        h, w = L.spatial_size(x)
        if self.shrink_factor != 1:
            h = (h - 1) // self.shrink_factor + 1
            w = (w - 1) // self.shrink_factor + 1
            x = L.interpolate(x, (h, w), align_corners=True)
        return x, h, w

    def _attend(self, x, y, psa_type: int, h: int, w: int):
        """x (N, c, h, w) features, y (N, mask_h*mask_w, h, w) attention logits -> (N, c, h, w)."""
        n, c = int(x.shape[0]), int(x.shape[1])
        if self.compact:
            if y.shape[1] != h * w:
                raise ValueError(f"PSA compact mode needs mask_h*mask_w == h*w of the shrunken map ({h}x{w} = "
                                 f"{h * w}), got {self.mask_h}x{self.mask_w}")
            if psa_type == 1:
                y = L.reshape(L.swap_dims_1_2(L.reshape(y, (n, h * w, h * w))), (n, h * w, h, w))
        elif self.psa_impl == "fused":  # softmax(psa_mask) + bmm in one kernel, no (N, h*w, h*w) map
            return psa_attend(x, y, psa_type, (self.mask_h, self.mask_w), self.psa_softmax, self.normalization_factor)
        else:
            y = psa_mask(y, psa_type, (self.mask_h, self.mask_w), impl=self.psa_impl)
        if self.psa_softmax:
            y = L.softmax(y, 1)
        out = L.bmm(L.reshape(x, (n, c, h * w)), L.reshape(y, (n, h * w, h * w)))
        return L.reshape(out, (n, c, h, w)) * (1.0 / self.normalization_factor)

    def forward(self, x):
        out = x
        if self.psa_type in (0, 1):
            x, h, w = self._shrink(self.reduce(x))
            x = self._attend(x, self.attention(x), self.psa_type, h, w)
        else:
            x_col, h, w = self._shrink(self.reduce(x))
            x_dis, _, _ = self._shrink(self.reduce_p(x))
            x_col = self._attend(x_col, self.attention(x_col), 0, h, w)
            x_dis = self._attend(x_dis, self.attention_p(x_dis), 1, h, w)
            x = L.cat([x_col, x_dis], 1)
        x = self.proj(x)
        if self.shrink_factor != 1:
            h = (h - 1) * self.shrink_factor + 1
            w = (w - 1) * self.shrink_factor + 1
            x = L.interpolate(x, (h, w), align_corners=True)
        return L.cat([out, x], 1)


def full_mask(crop: int, shrink_factor: int = 2) -> int:
    """semseg's default mask: full coverage of the shrunken feature map, 2*((crop-1)//(8*s)+1)-1."""
    return 2 * ((crop - 1) // (8 * shrink_factor) + 1) - 1


def check_mask(mask: int, crop: Optional[int], shrink_factor: int, what: str = "mask") -> None:
    """semseg's rule for a given (non-compact) mask: odd, >= 3 and <= the full-coverage size of the crop."""
    if mask < 1:
        raise ValueError(f"PSANet {what} must be positive, got {mask}")
    if crop is not None:
        limit = full_mask(crop, shrink_factor)
        if mask % 2 == 0 or mask < 3 or mask > limit:
            raise ValueError(f"PSANet {what} {mask} breaks semseg's rule for crop {crop} (shrink {shrink_factor}): "
                             f"it must be odd, >= 3 and <= {limit}")


class PSANet(SemsegNet):
    model_name = "PSANet"

    def __init__(self, num_classes: int = 19, layers: int = 50, psa_type: int = 2, compact: bool = False,
                 shrink_factor: int = 2, mask_h: int = 59, mask_w: int = 59,
                 normalization_factor: Optional[float] = 1.0, psa_softmax: bool = True, dropout: float = 0.1,
                 zoom_factor: int = 8, bn_momentum: float = 0.1, psa_impl: str = "auto"):
        super().__init__(num_classes, layers, dropout, zoom_factor, bn_momentum)
        self.psa = PSA(2048, 512, psa_type, compact, shrink_factor, mask_h, mask_w, normalization_factor,
                       psa_softmax, bn_momentum, psa_impl)
        self.make_heads(4096, num_classes, dropout, bn_momentum)

    def context(self, x):
        """layer4 features (N, 2048, h, w) -> (N, 4096, h, w)."""
        return self.psa(x)


def _mask_hw(mask_size, mask_h: Optional[int], mask_w: Optional[int]) -> Optional[tuple]:
    """(mask_h, mask_w) from `mask_size` (int or (h, w)) and/or semseg's own names `mask_h`, `mask_w`."""
    from_size = None
    if mask_size is not None:
        from_size = (mask_size, mask_size) if isinstance(mask_size, int) else tuple(int(v) for v in mask_size)
        if len(from_size) != 2:
            raise ValueError(f"PSANet mask_size must be an int or (mask_h, mask_w), got {mask_size!r}")
    if mask_h is None and mask_w is None:
        return from_size
    if mask_h is None or mask_w is None:
        raise ValueError(f"PSANet: give both mask_h and mask_w (got mask_h={mask_h}, mask_w={mask_w})")
    if from_size is not None and from_size != (mask_h, mask_w):
        raise ValueError(f"PSANet: mask_size={mask_size!r} contradicts mask_h={mask_h}, mask_w={mask_w}")
    return (int(mask_h), int(mask_w))


def build(num_classes: int = 19, layers: int = 50, psa_type: Optional[int] = 2, mask_size=None,
          crop: Optional[int] = None, compact: bool = False, shrink_factor: int = 2,
          mask_h: Optional[int] = None, mask_w: Optional[int] = None, **cfg) -> PSANet:
    """mask_size: int or (mask_h, mask_w) (semseg's own `mask_h`, `mask_w` are accepted too); default: semseg's
    full coverage of `crop` when given, else 59 (compact: the shrunken feature size of `crop`). Explicit masks are
    checked against semseg's rule when `crop` is given."""
    if psa_type is None:
        raise ConfigInferenceError("PSANet: the checkpoint has a single PSA branch (no psa.reduce_p.*), so psa_type "
                                   "cannot be read off it; pass psa_type=0 (collect) or psa_type=1 (distribute), "
                                   "on the command line --cfg psa_type=0 or --cfg psa_type=1")
    hw = _mask_hw(mask_size, mask_h, mask_w)
    if hw is None:
        if compact:
            if crop is None:
                raise ValueError("PSANet compact mode: pass crop (or mask_size = the shrunken feature size)")
            m = (crop - 1) // (8 * shrink_factor) + 1
        else:
            m = full_mask(crop, shrink_factor) if crop is not None else 59
        mask_h = mask_w = m
    else:
        mask_h, mask_w = hw
        if not compact:
            check_mask(mask_h, crop, shrink_factor, "mask_h")
            check_mask(mask_w, crop, shrink_factor, "mask_w")
    return PSANet(num_classes=num_classes, layers=layers, psa_type=psa_type, compact=compact,
                  shrink_factor=shrink_factor, mask_h=mask_h, mask_w=mask_w, **cfg)


def infer_config(state_dict, given=None) -> dict:
    """Class count, depth, psa_type (2 when the distribute branch exists) and mask size (psa.attention.3.weight has
    mask_h*mask_w output channels: a square mask is read off it, any other needs mask_size given). Values in
    `given` are not inferred."""
    given = given or {}
    cfg = infer_backbone_config("PSANet", state_dict)
    if "psa.attention.3.weight" not in state_dict:
        raise KeyError("psa.attention.3.weight")
    channels = int(state_dict["psa.attention.3.weight"].shape[0])
    if not any(k in given for k in ("mask_size", "mask_h", "mask_w")):
        m = math.isqrt(channels)
        if m * m != channels:
            raise ConfigInferenceError(f"PSANet checkpoint: psa.attention.3.weight has {channels} output channels, "
                                       "not a square mask; pass mask_size=(mask_h, mask_w), on the command line "
                                       "--cfg mask_size=MASK_H,MASK_W")
        cfg["mask_size"] = m
    if "psa_type" not in given:
        if "psa.reduce_p.0.weight" not in state_dict:
            raise ConfigInferenceError("PSANet checkpoint: a single PSA branch (no psa.reduce_p.*), so psa_type "
                                       "cannot be read off it; pass psa_type=0 (collect) or psa_type=1 (distribute), "
                                       "on the command line --cfg psa_type=0 or --cfg psa_type=1")
        cfg["psa_type"] = 2
    return cfg
