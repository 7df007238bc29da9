"""PSPNet (twin: paddle_impl/models/pspnet.py), faithful to hszhao/semseg `model/pspnet.py`.

Parameter names are semseg's, so its checkpoints (`{'epoch', 'state_dict': {'module.layer0.0.weight', ...},
'optimizer'}`) load with strict=True after unwrapping `state_dict` and stripping `module.`:
    layer0.{0,1,3,4,6,7}.*  deep-base stem (conv, BN) x3        layer1..layer4.*  ResNet stages (OS8)
    ppm.features.{i}.1.weight, ppm.features.{i}.2.*           PPM branch i: pool(0) conv(1) BN(2) ReLU(3)
    cls.{0,1,4}.*  3x3 conv 4096->512, BN, (ReLU, Dropout2d), 1x1 conv 512->classes
    aux.{0,1,4}.*  3x3 conv 1024->256, BN, (ReLU, Dropout2d), 1x1 conv 256->classes
Official oddities reproduced: `aux` always exists (semseg creates it under `if self.training:` in __init__, which is
always true at construction); every resize is bilinear with align_corners=True; inputs must satisfy
(H - 1) % 8 == 0 and (W - 1) % 8 == 0.
"""
from __future__ import annotations

from typing import Sequence

from .. import layers as L
from ..backbones.resnet import ResNet


class PPM(L.Module):
    """Pyramid pooling: x (N, C, h, w) -> cat[x, up(branch_b(x)) for b in bins] (N, C + len(bins)*R, h, w)."""

    def __init__(self, in_dim: int, reduction_dim: int, bins: Sequence[int], bn_momentum: float = 0.1):
        super().__init__()
        self.features = L.ModuleList([
            L.Sequential(
                L.AdaptiveAvgPool2d(b),
                L.Conv2d(in_dim, reduction_dim, 1, bias=False),
                L.BatchNorm2d(reduction_dim, momentum=bn_momentum),
                L.ReLU(),
            ) for b in bins
        ])

    def forward(self, x):
        size = L.spatial_size(x)
        out = [x]
        for f in self.features:
            out.append(L.interpolate(f(x), size, align_corners=True))
        return L.cat(out, 1)


def check_input_size(name: str, h: int, w: int, stride: int = 8) -> None:
    """semseg's rule: (H - 1) and (W - 1) divisible by 8 (473, 713, 705, ...)."""
    if (h - 1) % stride or (w - 1) % stride:
        def ok(v):
            return (v - 1) // stride * stride + 1
        raise ValueError(f"{name}: input size {h}x{w} breaks the rule (H-1)%{stride}==0 and (W-1)%{stride}==0 of the "
                         f"official code; use e.g. {ok(h)}x{ok(w)} or {ok(h) + stride}x{ok(w) + stride}")


class PSPNet(L.Module):
    def __init__(self, num_classes: int = 19, layers: int = 50, bins: Sequence[int] = (1, 2, 3, 6),
                 dropout: float = 0.1, zoom_factor: int = 8, bn_momentum: float = 0.1):
        super().__init__()
        if zoom_factor not in (1, 2, 4, 8):
            raise ValueError(f"PSPNet zoom_factor must be 1, 2, 4 or 8, got {zoom_factor}")
        if 2048 % len(bins):
            raise ValueError(f"PSPNet: 2048 channels must split evenly over the bins {tuple(bins)}")
        self.num_classes = num_classes
        self.zoom_factor = zoom_factor
        resnet = ResNet(layers, deep_base=True, strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4),
                        bn_momentum=bn_momentum)
        self.layer0 = L.Sequential(*resnet.stem())
        self.layer1, self.layer2, self.layer3, self.layer4 = resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4
        fea_dim = 2048
        self.ppm = PPM(fea_dim, fea_dim // len(bins), bins, bn_momentum)
        fea_dim *= 2
        self.cls = L.Sequential(
            L.Conv2d(fea_dim, 512, 3, padding=1, bias=False),
            L.BatchNorm2d(512, momentum=bn_momentum),
            L.ReLU(),
            L.Dropout2d(dropout),
            L.Conv2d(512, num_classes, 1),
        )
        self.aux = L.Sequential(
            L.Conv2d(1024, 256, 3, padding=1, bias=False),
            L.BatchNorm2d(256, momentum=bn_momentum),
            L.ReLU(),
            L.Dropout2d(dropout),
            L.Conv2d(256, num_classes, 1),
        )

    # Parameter groups of the semseg recipe: the head learns 10x faster than the backbone.
    head_prefixes = ("ppm.", "cls.", "aux.")

    @staticmethod
    def check_input(h: int, w: int) -> None:
        """Raise ValueError when the official code would reject an input of size h x w."""
        check_input_size("PSPNet", h, w)

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
        x = self.ppm(x)
        x = self.cls(x)
        if self.zoom_factor != 1:
            x = L.interpolate(x, (h, w), align_corners=True)
        if self.training:
            aux = self.aux(x_tmp)
            if self.zoom_factor != 1:
                aux = L.interpolate(aux, (h, w), align_corners=True)
            return x, aux
        return x


def build(num_classes: int = 19, layers: int = 50, **cfg) -> PSPNet:
    return PSPNet(num_classes=num_classes, layers=layers, **cfg)


def infer_config(state_dict) -> dict:
    """Model config read off an (unwrapped) official state_dict: class count and ResNet depth."""
    from ..backbones.resnet import DEPTHS
    if "cls.4.weight" not in state_dict:
        raise KeyError("cls.4.weight")
    num_classes = int(state_dict["cls.4.weight"].shape[0])
    n3 = len({k.split(".")[1] for k in state_dict if k.startswith("layer3.")})
    depth = next((d for d, b in DEPTHS.items() if b[2] == n3), None)
    if depth is None:
        raise ValueError(f"PSPNet checkpoint has {n3} blocks in layer3; known ResNet depths: "
                         f"{ {d: b[2] for d, b in DEPTHS.items()} }")
    return {"num_classes": num_classes, "layers": depth}
