"""Shared skeleton of hszhao/semseg's PSPNet and PSANet (twin: paddle_impl/models/semseg.py).

Both models are: deep-base ResNet (`layer0` = the 3-conv stem + max-pool, `layer1..4`, OS8 by dilating every block of
layer3 by 2 and of layer4 by 4), a context module on layer4 (PPM or PSA) that doubles the channels to 4096, the
`cls` head (3x3 conv 4096->512, BN, ReLU, Dropout2d, 1x1 conv -> classes) and the `aux` head on layer3 (3x3 conv
1024->256, BN, ReLU, Dropout2d, 1x1 conv). semseg creates `aux` under `if self.training:` in __init__, which is always
true at construction, so it always exists in the checkpoints. Every resize is bilinear with align_corners=True and
inputs must satisfy (H - 1) % 8 == 0 and (W - 1) % 8 == 0.
"""
from __future__ import annotations

from .. import layers as L
from ..backbones.resnet import ResNet, depth_from_keys


def check_input_size(name: str, h: int, w: int, stride: int = 8) -> None:
    """semseg's rule: (H - 1) and (W - 1) divisible by 8 (473, 713, 705, ...)."""
    if (h - 1) % stride or (w - 1) % stride:
        def ok(v):
            return (v - 1) // stride * stride + 1
        raise ValueError(f"{name}: input size {h}x{w} breaks the rule (H-1)%{stride}==0 and (W-1)%{stride}==0 of the "
                         f"official code; use e.g. {ok(h)}x{ok(w)} or {ok(h) + stride}x{ok(w) + stride}")


def head(in_dim: int, mid_dim: int, num_classes: int, dropout: float, bn_momentum: float):
    return L.Sequential(
        L.Conv2d(in_dim, mid_dim, 3, padding=1, bias=False),
        L.BatchNorm2d(mid_dim, momentum=bn_momentum),
        L.ReLU(),
        L.Dropout2d(dropout),
        L.Conv2d(mid_dim, num_classes, 1),
    )


class SemsegNet(L.Module):
    """Backbone + context + cls/aux heads. Subclasses build `self.<context>` between `__init__` and `make_heads`
    and implement `context(x)`."""

    model_name = "semseg"

    def __init__(self, num_classes: int, layers: int, dropout: float, zoom_factor: int, bn_momentum: float):
        super().__init__()
        if zoom_factor not in (1, 2, 4, 8):
            raise ValueError(f"{self.model_name} zoom_factor must be 1, 2, 4 or 8, got {zoom_factor}")
        self.num_classes = num_classes
        self.zoom_factor = zoom_factor
        resnet = ResNet(layers, deep_base=True, strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4),
                        bn_momentum=bn_momentum)
        self.layer0 = L.Sequential(*resnet.stem())
        self.layer1, self.layer2, self.layer3, self.layer4 = resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4

    def make_heads(self, fea_dim: int, num_classes: int, dropout: float, bn_momentum: float) -> None:
        self.cls = head(fea_dim, 512, num_classes, dropout, bn_momentum)
        self.aux = head(1024, 256, num_classes, dropout, bn_momentum)

    @classmethod
    def check_input(cls, h: int, w: int) -> None:
        """Raise ValueError when the official code would reject an input of size h x w."""
        check_input_size(cls.model_name, h, w)

    def context(self, x):  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x):
        """x: (N, 3, H, W) normalised RGB with (H-1)%8 == (W-1)%8 == 0.

        eval:  logits (N, classes, H', W') with H' = (H-1)/8*zoom + 1 (= H for zoom 8)
        train: (logits, aux_logits), both (N, classes, H', W')
        """
        h_in, w_in = L.spatial_size(x)
        self.check_input(h_in, w_in)
        h = (h_in - 1) // 8 * self.zoom_factor + 1
        w = (w_in - 1) // 8 * self.zoom_factor + 1
        x = self.layer0(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x_tmp = self.layer3(x)
        x = self.layer4(x_tmp)
        x = self.context(x)
        x = self.cls(x)
        if self.zoom_factor != 1:
            x = L.interpolate(x, (h, w), align_corners=True)
        if self.training:
            aux = self.aux(x_tmp)
            if self.zoom_factor != 1:
                aux = L.interpolate(aux, (h, w), align_corners=True)
            return x, aux
        return x


def infer_backbone_config(name: str, state_dict) -> dict:
    """Class count (cls.4.weight) and ResNet depth (blocks in layer3) of an official semseg state_dict."""
    if "cls.4.weight" not in state_dict:
        raise KeyError("cls.4.weight")
    num_classes = int(state_dict["cls.4.weight"].shape[0])
    return {"num_classes": num_classes, "layers": depth_from_keys(name, state_dict)}
