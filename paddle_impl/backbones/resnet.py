"""ResNet backbones of the Paddle twins (twin: torch_ref/backbones/resnet.py).

`deep_base=True` is hszhao/semseg's ResNet (model/resnet.py): a 3-conv stem 3x3 (3->64, stride 2), 3x3 (64->64),
3x3 (64->128), then max-pool, so `layer1` starts from 128 channels. The Bottleneck puts the stride on the 3x3 conv2
("pytorch style"); the shortcut is a 1x1 conv (with the block's stride) + BN.

Dilation (output stride 8) is given at construction: `strides` and `dilations` per stage. semseg builds an
ordinary ResNet and then rewrites every conv2 of layer3 to dilation=padding=2, stride 1 and every conv2 of layer4 to
dilation=padding=4, stride 1 (and the shortcut strides to 1) -- i.e. EVERY block of the stage is dilated, with no
"contraction" of the first block. Constructing with strides (1, 2, 1, 1) and dilations (1, 1, 2, 4) gives exactly
those layers and the same parameter names.

`deep_base=False` is the torchvision stem (7x7 conv, 64 channels) used by DANet; `multi_grid` sets the per-block
dilations of the last stage (DANet: (4, 8, 16), block i gets multi_grid[i % 3]). `contract_dilation=True` is the
dilation rule of DANet's encoding ResNet: the FIRST block of a dilated stage uses half the stage's dilation (layer3:
1 then 2, 2, ...), the others the full one; semseg's models leave it False (every block dilated).
"""
from __future__ import annotations

from typing import Optional, Sequence

from .. import layers as L


class Bottleneck(L.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: Optional[L.Module] = None, bn_momentum: float = 0.1):
        super().__init__()
        self.conv1 = L.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = L.BatchNorm2d(planes, momentum=bn_momentum)
        self.conv2 = L.Conv2d(planes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = L.BatchNorm2d(planes, momentum=bn_momentum)
        self.conv3 = L.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = L.BatchNorm2d(planes * self.expansion, momentum=bn_momentum)
        self.relu = L.ReLU()
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        """x: (N, inplanes, H, W) -> (N, 4*planes, H/stride, W/stride)."""
        residual = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            residual = self.downsample(x)
        out = out + residual
        return self.relu(out)


DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


def depth_from_keys(name: str, keys, prefix: str = "", stage: str = "layer3") -> int:
    """ResNet depth from the number of blocks of `<prefix><stage>.` in state_dict keys: the third stage (`layer3`,
    detectron2's `res4`), the only one whose length tells 50 / 101 / 152. ValueError names the count when it
    matches no known depth."""
    stage = prefix + stage + "."
    n3 = len({k[len(stage):].split(".")[0] for k in keys if k.startswith(stage)})
    depth = next((d for d, b in DEPTHS.items() if b[2] == n3), None)
    if depth is None:
        raise ValueError(f"{name} checkpoint has {n3} blocks in {stage[:-1]}; known ResNet depths: "
                         f"{ {d: b[2] for d, b in DEPTHS.items()} }")
    return depth


class ResNet(L.Module):
    """ResNet trunk without the classifier (the segmentation models never use avgpool/fc)."""

    def __init__(self, depth: int = 50, deep_base: bool = True, strides: Sequence[int] = (1, 2, 1, 1),
                 dilations: Sequence[int] = (1, 1, 2, 4), multi_grid: Optional[Sequence[int]] = None,
                 contract_dilation: bool = False, bn_momentum: float = 0.1):
        super().__init__()
        if depth not in DEPTHS:
            raise ValueError(f"ResNet depth must be one of {sorted(DEPTHS)}, got {depth}")
        blocks = DEPTHS[depth]
        self.deep_base = deep_base
        self.contract_dilation = contract_dilation
        if deep_base:
            self.conv1 = L.Conv2d(3, 64, 3, stride=2, padding=1, bias=False)
            self.bn1 = L.BatchNorm2d(64, momentum=bn_momentum)
            self.conv2 = L.Conv2d(64, 64, 3, padding=1, bias=False)
            self.bn2 = L.BatchNorm2d(64, momentum=bn_momentum)
            self.conv3 = L.Conv2d(64, 128, 3, padding=1, bias=False)
            self.bn3 = L.BatchNorm2d(128, momentum=bn_momentum)
            self.inplanes = 128
        else:
            self.conv1 = L.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
            self.bn1 = L.BatchNorm2d(64, momentum=bn_momentum)
            self.inplanes = 64
        self.relu = L.ReLU()
        self.maxpool = L.MaxPool2d(3, stride=2, padding=1)
        grids = [None, None, None, multi_grid]
        self.layer1 = self._make_layer(64, blocks[0], strides[0], dilations[0], grids[0], bn_momentum)
        self.layer2 = self._make_layer(128, blocks[1], strides[1], dilations[1], grids[1], bn_momentum)
        self.layer3 = self._make_layer(256, blocks[2], strides[2], dilations[2], grids[2], bn_momentum)
        self.layer4 = self._make_layer(512, blocks[3], strides[3], dilations[3], grids[3], bn_momentum)
        L.init_kaiming_(self)

    def _make_layer(self, planes: int, blocks: int, stride: int, dilation: int,
                    multi_grid: Optional[Sequence[int]], bn_momentum: float):
        downsample = None
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            downsample = L.Sequential(
                L.Conv2d(self.inplanes, planes * Bottleneck.expansion, 1, stride=stride, bias=False),
                L.BatchNorm2d(planes * Bottleneck.expansion, momentum=bn_momentum),
            )
        layers = []
        for i in range(blocks):
            if multi_grid:
                d = multi_grid[i % len(multi_grid)]
            elif self.contract_dilation and i == 0 and dilation > 1:
                d = dilation // 2
            else:
                d = dilation
            layers.append(Bottleneck(self.inplanes, planes, stride if i == 0 else 1, d,
                                     downsample if i == 0 else None, bn_momentum))
            self.inplanes = planes * Bottleneck.expansion
        return L.Sequential(*layers)

    def stem(self):
        """The stem as an ordered list of modules (semseg's PSPNet/PSANet wrap it as `layer0`)."""
        if self.deep_base:
            return [self.conv1, self.bn1, self.relu, self.conv2, self.bn2, self.relu, self.conv3, self.bn3,
                    self.relu, self.maxpool]
        return [self.conv1, self.bn1, self.relu, self.maxpool]
