"""HRNetV2-W48 + OCR (+ hierarchical multi-scale attention) with Polarized Self-Attention in every HRNet basic block
(twin: torch_ref/models/hrnet_ocr_psa.py), faithful to DeLightCMU/PSA `semantic-segmentation/network/{ocrnet.py,
ocr_utils.py, utils.py, mynn.py}` (NVIDIA/semantic-segmentation's OCR head and MscaleOCR, unchanged by the PSA
authors) on the backbone of `backbones/hrnet.py`. NVIDIA config values used: OCR MID_CHANNELS 512, KEY_CHANNELS 256,
OCR_ASPP False, SEGATTN_BOT_CH 256, MSCALE_INNER_3x3 True, MSCALE_DROPOUT False, MSCALE_OLDARCH False,
MSCALE_LO_SCALE 0.5, ALIGN_CORNERS False, every norm a BatchNorm2d (momentum 0.1, eps 1e-5).

Official key names (NVIDIA saves the DDP-wrapped net: `module.` is stripped on reading):
    backbone.*                                            HRNetV2-W48 (+ `deattn` PSA blocks), see backbones/hrnet.py
    ocr.conv3x3_ocr.0.{weight,bias}, ocr.conv3x3_ocr.1.0.*   3x3 conv 720->512 WITH bias, then BN (+ ReLU)
    ocr.aux_head.0.*, ocr.aux_head.1.0.*, ocr.aux_head.2.*   1x1 720->720 (bias) + BN + ReLU + 1x1 720->C (bias)
    ocr.ocr_distri_head.object_context_block.f_pixel.{0,2}.weight, .f_pixel.{1,3}.0.*   (and f_object alike)
    ocr.ocr_distri_head.object_context_block.f_down.{0.weight,1.0.*}, .f_up.{0.weight,1.0.*}
    ocr.ocr_distri_head.conv_bn_dropout.0.weight, .conv_bn_dropout.1.0.*   1x1 1024->512 + BN + ReLU + Dropout2d(0.05)
    ocr.cls_head.{weight,bias}                            1x1 512->C
    scale_attn.conv0.weight, scale_attn.bn0.*, scale_attn.conv1.weight, scale_attn.bn1.*, scale_attn.conv2.weight
                                                          (mscale only) 3x3 512->256, 3x3 256->256, 1x1 256->1, sigmoid
NVIDIA's `BNReLU(ch)` is Sequential(BN, ReLU): that is why a BN sits at index `.1.0` after its conv.

Model contract
--------------
* Input: (N, 3, H, W) RGB normalised with the ImageNet mean/std (NVIDIA's loader), any size.
* eval `forward(x)` -> NVIDIA's `pred` logits (N, C, H, W): with `mscale` and `scales` None, the two-scale (0.5, 1.0)
  attention combination (what NVIDIA evaluates when no --n_scales is given); with `scales` (e.g. (0.5, 1.0, 2.0),
  NVIDIA's Cityscapes evaluation) the hierarchical n-scale combination processed from the highest scale down; without
  `mscale`, plain OCRNet's upsampled cls output (`scales` must then be None).
* train `forward(x)`: mscale -> (joint_pred, joint_aux, pred_05x upsampled to 1x, pred_10x), the four outputs the
  NVIDIA criterion sees (main, aux with weight 0.4, and the two SUPERVISED_MSCALE terms with weight 0.05);
  plain OCRNet -> (cls_out, aux_out). Every output is at the input resolution.
Oddities reproduced on purpose: the 3x3 `conv3x3_ocr` has a bias although a BN follows; the scale attention reads
the OCR features AFTER conv_bn_dropout (so training dropout reaches it); ResizeX's output size is floor(H * s) (torch's
`recompute_scale_factor=True`), computed here and passed as a size so both frameworks interpolate alike.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

from .. import layers as L
from ..backbones.hrnet import HRNetV2, psa_from_keys

OCR_MID_CHANNELS = 512
OCR_KEY_CHANNELS = 256
SEGATTN_BOT_CH = 256
MSCALE_LO_SCALE = 0.5
OCR_DROPOUT = 0.05


def BNReLU(ch: int):
    """NVIDIA's Norm2d + ReLU pair (keys `<i>.0.*`)."""
    return L.Sequential(L.BatchNorm2d(ch), L.ReLU())


def scale_as(x, y):
    """x resized (bilinear, align_corners False) to y's spatial size."""
    return L.interpolate(x, L.spatial_size(y), align_corners=False)


def resize_by(x, scale: float):
    """NVIDIA's ResizeX: bilinear by a factor, output size floor(size * scale) (recompute_scale_factor=True)."""
    h, w = L.spatial_size(x)
    return L.interpolate(x, (int(math.floor(h * scale)), int(math.floor(w * scale))), align_corners=False)


class SpatialGather_Module(L.Module):
    """Class centres: softmax over positions of each class map of the aux logits, times the features ->
    (N, C_feat, K, 1)."""

    def __init__(self, cls_num: int = 0, scale: int = 1):
        super().__init__()
        self.cls_num = cls_num
        self.scale = scale

    def forward(self, feats, probs):
        n, k, _, _ = L.sizes(probs)
        probs = L.reshape(probs, (n, k, -1))
        feats = L.swap_dims_1_2(L.reshape(feats, (n, L.sizes(feats)[1], -1)))  # (N, HW, C)
        probs = L.softmax(self.scale * probs, 2)
        ocr_context = L.bmm(probs, feats)  # (N, K, C)
        return L.swap_dims_1_2(ocr_context).unsqueeze(3)


class ObjectAttentionBlock(L.Module):
    """Pixel-to-object attention: queries from the pixels, keys/values from the K class centres, similarities
    scaled by key_channels^-0.5 and soft-maxed over the K objects."""

    def __init__(self, in_channels: int, key_channels: int, scale: int = 1):
        super().__init__()
        self.scale = scale
        self.in_channels = in_channels
        self.key_channels = key_channels
        self.pool = L.MaxPool2d(kernel_size=scale)
        self.f_pixel = self._transform(in_channels, key_channels)
        self.f_object = self._transform(in_channels, key_channels)
        self.f_down = L.Sequential(L.Conv2d(in_channels, key_channels, 1, bias=False), BNReLU(key_channels))
        self.f_up = L.Sequential(L.Conv2d(key_channels, in_channels, 1, bias=False), BNReLU(in_channels))

    @staticmethod
    def _transform(in_channels: int, key_channels: int):
        return L.Sequential(L.Conv2d(in_channels, key_channels, 1, bias=False), BNReLU(key_channels),
                            L.Conv2d(key_channels, key_channels, 1, bias=False), BNReLU(key_channels))

    def forward(self, x, proxy):
        n, _, h, w = L.sizes(x)
        if self.scale > 1:
            x = self.pool(x)
        query = L.swap_dims_1_2(L.reshape(self.f_pixel(x), (n, self.key_channels, -1)))  # (N, HW, key)
        key = L.reshape(self.f_object(proxy), (n, self.key_channels, -1))                  # (N, key, K)
        value = L.swap_dims_1_2(L.reshape(self.f_down(proxy), (n, self.key_channels, -1)))  # (N, K, key)
        sim_map = L.bmm(query, key)
        sim_map = (self.key_channels ** -0.5) * sim_map
        sim_map = L.softmax(sim_map, -1)
        context = L.swap_dims_1_2(L.bmm(sim_map, value))  # (N, key, HW)
        context = L.reshape(context, (n, self.key_channels) + L.spatial_size(x))
        context = self.f_up(context)
        if self.scale > 1:
            context = L.interpolate(context, (h, w), align_corners=False)
        return context


class SpatialOCR_Module(L.Module):
    """Object context for every pixel, concatenated with the pixel features, 1x1 conv + BN + ReLU + Dropout2d."""

    def __init__(self, in_channels: int, key_channels: int, out_channels: int, scale: int = 1,
                 dropout: float = 0.1):
        super().__init__()
        self.object_context_block = ObjectAttentionBlock(in_channels, key_channels, scale)
        self.conv_bn_dropout = L.Sequential(L.Conv2d(2 * in_channels, out_channels, 1, bias=False),
                                            BNReLU(out_channels), L.Dropout2d(dropout))

    def forward(self, feats, proxy_feats):
        context = self.object_context_block(feats, proxy_feats)
        return self.conv_bn_dropout(L.cat([context, feats], 1))


class OCR_block(L.Module):
    """NVIDIA's OCR head on the 720-channel HRNet features -> (cls_out, aux_out, ocr_feats), all at stride 4."""

    def __init__(self, high_level_ch: int, num_classes: int):
        super().__init__()
        self.conv3x3_ocr = L.Sequential(L.Conv2d(high_level_ch, OCR_MID_CHANNELS, 3, padding=1, bias=True),
                                        BNReLU(OCR_MID_CHANNELS))
        self.ocr_gather_head = SpatialGather_Module(num_classes)
        self.ocr_distri_head = SpatialOCR_Module(OCR_MID_CHANNELS, OCR_KEY_CHANNELS, OCR_MID_CHANNELS, scale=1,
                                                 dropout=OCR_DROPOUT)
        self.cls_head = L.Conv2d(OCR_MID_CHANNELS, num_classes, 1, bias=True)
        self.aux_head = L.Sequential(L.Conv2d(high_level_ch, high_level_ch, 1, bias=True), BNReLU(high_level_ch),
                                     L.Conv2d(high_level_ch, num_classes, 1, bias=True))

    def forward(self, high_level_features):
        feats = self.conv3x3_ocr(high_level_features)
        aux_out = self.aux_head(high_level_features)
        context = self.ocr_gather_head(feats, aux_out)
        ocr_feats = self.ocr_distri_head(feats, context)
        cls_out = self.cls_head(ocr_feats)
        return cls_out, aux_out, ocr_feats


class AttnHead(L.Module):
    """NVIDIA's `make_attn_head` (an OrderedDict Sequential conv0/bn0/re0/conv1/bn1/re1/conv2/sig): the per-pixel
    attention of a scale, in (0, 1)."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv0 = L.Conv2d(in_ch, SEGATTN_BOT_CH, 3, padding=1, bias=False)
        self.bn0 = L.BatchNorm2d(SEGATTN_BOT_CH)
        self.re0 = L.ReLU()
        self.conv1 = L.Conv2d(SEGATTN_BOT_CH, SEGATTN_BOT_CH, 3, padding=1, bias=False)
        self.bn1 = L.BatchNorm2d(SEGATTN_BOT_CH)
        self.re1 = L.ReLU()
        self.conv2 = L.Conv2d(SEGATTN_BOT_CH, out_ch, 1, bias=False)
        self.sig = L.Sigmoid()

    def forward(self, x):
        x = self.re0(self.bn0(self.conv0(x)))
        x = self.re1(self.bn1(self.conv1(x)))
        return self.sig(self.conv2(x))


class HRNetOCR(L.Module):
    """NVIDIA's MscaleOCR (`mscale=True`) or OCRNet (`mscale=False`) on HRNetV2-W48 with PSA `psa` in {"s", "p",
    None}; see the module doc for the forward contract."""

    def __init__(self, num_classes: int = 19, psa: Optional[str] = "p", mscale: bool = True,
                 scales: Optional[Sequence[float]] = None):
        super().__init__()
        if scales is not None:
            scales = tuple(float(s) for s in scales)
            if not mscale:
                raise ValueError(f"scales {list(scales)} need mscale=True (plain OCRNet has no scale attention)")
            if 1.0 not in scales:
                raise ValueError(f"scales {list(scales)} must contain 1.0, the target scale")
            if min(scales) <= 0:
                raise ValueError(f"scales {list(scales)} must be > 0")
        self.num_classes = num_classes
        self.mscale = bool(mscale)
        self.scales = scales
        self.backbone = HRNetV2(psa=psa)
        self.ocr = OCR_block(self.backbone.high_level_ch, num_classes)
        if self.mscale:
            self.scale_attn = AttnHead(OCR_MID_CHANNELS, 1)

    def _fwd(self, x):
        """One scale: (cls_out, aux_out, attention or None), each upsampled to x's size."""
        x_size = L.spatial_size(x)
        high_level_features = self.backbone(x)
        cls_out, aux_out, ocr_mid_feats = self.ocr(high_level_features)
        attn = self.scale_attn(ocr_mid_feats) if self.mscale else None
        aux_out = L.interpolate(aux_out, x_size, align_corners=False)
        cls_out = L.interpolate(cls_out, x_size, align_corners=False)
        if attn is not None:
            attn = L.interpolate(attn, x_size, align_corners=False)
        return cls_out, aux_out, attn

    def nscale_forward(self, x_1x, scales: Sequence[float]):
        """Hierarchical attention over `scales` (1.0 among them), processed from the highest scale down: a scale
        >= 1 combines its prediction with the (downscaled) running one through its own attention; a scale < 1
        adds attn * its prediction, upscaled, to (1 - attn) * the running one. Returns (pred, aux)."""
        pred = None
        aux = None
        for s in sorted(scales, reverse=True):
            cls_out, aux_out, attn_out = self._fwd(resize_by(x_1x, s))
            if pred is None:
                pred = cls_out
                aux = aux_out
            elif s >= 1.0:
                pred = scale_as(pred, cls_out)
                pred = attn_out * cls_out + (1 - attn_out) * pred
                aux = scale_as(aux, cls_out)
                aux = attn_out * aux_out + (1 - attn_out) * aux
            else:
                cls_out = attn_out * cls_out
                aux_out = attn_out * aux_out
                cls_out = scale_as(cls_out, pred)
                aux_out = scale_as(aux_out, pred)
                attn_out = scale_as(attn_out, pred)
                pred = cls_out + (1 - attn_out) * pred
                aux = aux_out + (1 - attn_out) * aux
        return pred, aux

    def two_scale_forward(self, x_1x):
        """Scales 0.5 and 1.0: joint = up(attn_0.5 * p_0.5) + (1 - up(attn_0.5)) * p_1.0, the aux logits alike.
        Returns (joint_pred, joint_aux, pred_05x, pred_10x) with pred_05x at the 0.5 input's size."""
        x_lo = resize_by(x_1x, MSCALE_LO_SCALE)
        pred_05x, aux_lo, logit_attn = self._fwd(x_lo)
        pred_10x, aux_1x, _ = self._fwd(x_1x)
        p_lo = logit_attn * pred_05x
        aux_lo = logit_attn * aux_lo
        p_lo = scale_as(p_lo, pred_10x)
        aux_lo = scale_as(aux_lo, pred_10x)
        logit_attn = scale_as(logit_attn, pred_10x)
        joint_pred = p_lo + (1 - logit_attn) * pred_10x
        joint_aux = aux_lo + (1 - logit_attn) * aux_1x
        return joint_pred, joint_aux, pred_05x, pred_10x

    def forward(self, x):
        if not self.mscale:
            cls_out, aux_out, _ = self._fwd(x)
            return (cls_out, aux_out) if self.training else cls_out
        if self.training:
            joint_pred, joint_aux, pred_05x, pred_10x = self.two_scale_forward(x)
            return joint_pred, joint_aux, scale_as(pred_05x, pred_10x), pred_10x
        if self.scales is not None:
            return self.nscale_forward(x, self.scales)[0]
        return self.two_scale_forward(x)[0]


def build(num_classes: int = 19, psa: Optional[str] = "p", mscale: bool = True,
          scales: Optional[Sequence[float]] = None) -> HRNetOCR:
    return HRNetOCR(num_classes=num_classes, psa=psa, mscale=mscale, scales=scales)


def infer_config(state_dict, given=None) -> dict:
    """Class count from `ocr.cls_head.weight`, the PSA variant from the backbone's `deattn` keys, `mscale` from the
    presence of `scale_attn.*` (evaluation `scales` cannot be read off weights: they stay the builder's default)."""
    given = dict(given or {})
    keys = list(state_dict.keys())
    out = {"num_classes": int(state_dict["ocr.cls_head.weight"].shape[0])}
    if "psa" not in given:
        out["psa"] = psa_from_keys(keys, "backbone.")
    if "mscale" not in given:
        out["mscale"] = any(k.startswith("scale_attn.") for k in keys)
    return out
