"""PSPNet (twin: paddle_impl/models/pspnet.py), faithful to hszhao/semseg `model/pspnet.py`.

Parameter names are semseg's, so its checkpoints (`{'epoch', 'state_dict': {'module.layer0.0.weight', ...},
'optimizer'}`) load with strict=True after unwrapping `state_dict` and stripping `module.`:
    layer0.{0,1,3,4,6,7}.*  deep-base stem (conv, BN) x3        layer1..layer4.*  ResNet stages (OS8)
    ppm.features.{i}.1.weight, ppm.features.{i}.2.*           PPM branch i: pool(0) conv(1) BN(2) ReLU(3)
    cls.{0,1,4}.*  3x3 conv 4096->512, BN, (ReLU, Dropout2d), 1x1 conv 512->classes
    aux.{0,1,4}.*  3x3 conv 1024->256, BN, (ReLU, Dropout2d), 1x1 conv 256->classes
The backbone, heads, input rule and forward are shared with PSANet (models/semseg.py).
"""
from __future__ import annotations

from typing import Sequence

from .. import layers as L
from .semseg import SemsegNet, check_input_size, infer_backbone_config  # noqa: F401  (check_input_size re-exported)


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


class PSPNet(SemsegNet):
    model_name = "PSPNet"

    def __init__(self, num_classes: int = 19, layers: int = 50, bins: Sequence[int] = (1, 2, 3, 6),
                 dropout: float = 0.1, zoom_factor: int = 8, bn_momentum: float = 0.1):
        super().__init__(num_classes, layers, dropout, zoom_factor, bn_momentum)
        if 2048 % len(bins):
            raise ValueError(f"PSPNet: 2048 channels must split evenly over the bins {tuple(bins)}")
        fea_dim = 2048
        self.ppm = PPM(fea_dim, fea_dim // len(bins), bins, bn_momentum)
        self.make_heads(fea_dim * 2, num_classes, dropout, bn_momentum)

    def context(self, x):
        """layer4 features (N, 2048, h, w) -> (N, 4096, h, w)."""
        return self.ppm(x)


def build(num_classes: int = 19, layers: int = 50, **cfg) -> PSPNet:
    return PSPNet(num_classes=num_classes, layers=layers, **cfg)


def infer_config(state_dict) -> dict:
    """Model config read off an (unwrapped) official state_dict: class count and ResNet depth."""
    return infer_backbone_config("PSPNet", state_dict)
