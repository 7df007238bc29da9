"""detectron2's ResNet ("MSRA" flavour) and FPN of the Paddle twins (twin: torch_ref/backbones/d2_resnet.py).

Faithful to facebookresearch/detectron2 `detectron2/modeling/backbone/{resnet.py, fpn.py}` as configured by
`Base-RCNN-FPN.yaml` + `Base-PointRend-Semantic-FPN.yaml` (RESNETS.NORM "FrozenBN", STRIDE_IN_1X1 True, NUM_GROUPS 1,
WIDTH_PER_GROUP 64, RES5_DILATION 1, no deformable convs, BACKBONE.FREEZE_AT 0, FPN.NORM "", FUSE_TYPE "sum",
top block LastLevelMaxPool). Parameter and buffer names are detectron2's:

    bottom_up.stem.conv1.weight, bottom_up.stem.conv1.norm.{weight,bias,running_mean,running_var}
    bottom_up.res{2..5}.{i}.conv{1,2,3}.weight (+ .norm.*), bottom_up.res{2..5}.0.shortcut.weight (+ .norm.*)
    fpn_lateral{2..5}.{weight,bias}  (1x1, C_k -> 256)       fpn_output{2..5}.{weight,bias}  (3x3, 256 -> 256)

* Every conv is detectron2's `Conv2d` wrapper (L.NormConv2d): the conv owns `weight`, the FrozenBatchNorm2d is its
  child `norm`; the ReLUs are applied by the block's forward, not by the conv.
* Stem: 7x7/2 conv (pad 3, no bias) + FrozenBN, ReLU, max-pool 3x3/2 pad 1 (stride 4).
* BottleneckBlock: 1x1 (stride s when STRIDE_IN_1X1) -> 3x3 (pad 1, stride 1) -> 1x1, each + FrozenBN, ReLU after
  the first two; the shortcut is a 1x1 conv (stride s) + FrozenBN only when in != out channels (the first block of a
  stage), else the identity; out = ReLU(branch + shortcut). The first block of res3..res5 has stride 2.
* Init: fvcore c2_msra_fill on every ResNet conv, c2_xavier_fill on the FPN convs (biases 0).
* FPN forward (top-down): prev = lateral5(res5); p5 = output5(prev); for k = 4, 3, 2:
  prev = lateral_k(res_k) + nearest-x2(prev); p_k = output_k(prev). p6 = max_pool2d(p5, kernel 1, stride 2).
"""
from __future__ import annotations

from .. import layers as L
from .resnet import DEPTHS, depth_from_keys

STAGES = ("res2", "res3", "res4", "res5")


def depth_from_res4(keys, prefix: str = "backbone.bottom_up.") -> int:
    """ResNet depth from the number of blocks of `<prefix>res4.` (6 -> 50, 23 -> 101, 36 -> 152)."""
    return depth_from_keys("detectron2 ResNet", keys, prefix, "res4")


class BasicStem(L.Module):
    """7x7/2 conv + FrozenBN, ReLU, 3x3/2 max-pool: (N, 3, H, W) -> (N, 64, H/4, W/4)."""

    def __init__(self, in_channels: int = 3, out_channels: int = 64):
        super().__init__()
        self.conv1 = L.NormConv2d(in_channels, out_channels, 7, stride=2, padding=3, bias=False,
                                  norm=L.FrozenBatchNorm2d(out_channels))
        L.init_c2_msra_(self.conv1)

    def forward(self, x):
        x = self.conv1(x)
        x = L.relu(x)
        return L.max_pool2d(x, 3, 2, 1)


class BottleneckBlock(L.Module):
    def __init__(self, in_channels: int, out_channels: int, bottleneck_channels: int, stride: int = 1,
                 stride_in_1x1: bool = True):
        super().__init__()
        if in_channels != out_channels:
            self.shortcut = L.NormConv2d(in_channels, out_channels, 1, stride=stride, bias=False,
                                         norm=L.FrozenBatchNorm2d(out_channels))
        else:
            self.shortcut = None
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = L.NormConv2d(in_channels, bottleneck_channels, 1, stride=stride_1x1, bias=False,
                                  norm=L.FrozenBatchNorm2d(bottleneck_channels))
        self.conv2 = L.NormConv2d(bottleneck_channels, bottleneck_channels, 3, stride=stride_3x3, padding=1,
                                  bias=False, norm=L.FrozenBatchNorm2d(bottleneck_channels))
        self.conv3 = L.NormConv2d(bottleneck_channels, out_channels, 1, bias=False,
                                  norm=L.FrozenBatchNorm2d(out_channels))
        for layer in (self.conv1, self.conv2, self.conv3, self.shortcut):
            if layer is not None:
                L.init_c2_msra_(layer)

    def forward(self, x):
        """x: (N, in, H, W) -> (N, out, H/stride, W/stride)."""
        out = self.conv1(x)
        out = L.relu(out)
        out = self.conv2(out)
        out = L.relu(out)
        out = self.conv3(out)
        if self.shortcut is not None:
            shortcut = self.shortcut(x)
        else:
            shortcut = x
        out = out + shortcut
        return L.relu(out)


class ResNet(L.Module):
    """`stem` + stages `res2..res5` (Sequentials of BottleneckBlocks); forward returns {res2: stride 4 (256 ch),
    res3: 8 (512), res4: 16 (1024), res5: 32 (2048)}."""

    def __init__(self, depth: int = 101, stride_in_1x1: bool = True):
        super().__init__()
        if depth not in DEPTHS:
            raise ValueError(f"detectron2 ResNet depth must be one of {sorted(DEPTHS)}, got {depth}")
        self.stem = BasicStem(3, 64)
        in_channels, out_channels = 64, 256
        for idx, (name, num_blocks) in enumerate(zip(STAGES, DEPTHS[depth])):
            first_stride = 1 if idx == 0 else 2
            blocks = []
            for i in range(num_blocks):
                blocks.append(BottleneckBlock(in_channels, out_channels, out_channels // 4,
                                              first_stride if i == 0 else 1, stride_in_1x1))
                in_channels = out_channels
            setattr(self, name, L.Sequential(*blocks))
            out_channels = out_channels * 2

    def forward(self, x):
        outputs = {}
        x = self.stem(x)
        for name in STAGES:
            x = getattr(self, name)(x)
            outputs[name] = x
        return outputs


class FPN(L.Module):
    """FPN on a bottom-up ResNet: {res2..res5} -> {p2..p5 (256 ch, strides 4..32), p6 (stride 64)}."""

    def __init__(self, bottom_up: ResNet, in_channels=(256, 512, 1024, 2048), out_channels: int = 256):
        super().__init__()
        for idx, channels in enumerate(in_channels):
            stage = idx + 2
            lateral_conv = L.Conv2d(channels, out_channels, 1, bias=True)
            output_conv = L.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=True)
            L.init_c2_xavier_(lateral_conv)
            L.init_c2_xavier_(output_conv)
            setattr(self, f"fpn_lateral{stage}", lateral_conv)
            setattr(self, f"fpn_output{stage}", output_conv)
        self.bottom_up = bottom_up

    def forward(self, x):
        """x: (N, 3, H, W), H and W multiples of 32 -> {"p2": (N, 256, H/4, W/4), ..., "p6": (N, 256, H/64, W/64)}."""
        bottom_up_features = self.bottom_up(x)
        results = {}
        prev_features = self.fpn_lateral5(bottom_up_features["res5"])
        results["p5"] = self.fpn_output5(prev_features)
        for stage in (4, 3, 2):
            top_down_features = L.scale_interpolate(prev_features, 2, "nearest")
            lateral_features = getattr(self, f"fpn_lateral{stage}")(bottom_up_features[f"res{stage}"])
            prev_features = lateral_features + top_down_features
            results[f"p{stage}"] = getattr(self, f"fpn_output{stage}")(prev_features)
        results["p6"] = L.max_pool2d(results["p5"], 1, 2)
        return {name: results[name] for name in ("p2", "p3", "p4", "p5", "p6")}


def build_resnet_fpn(depth: int = 101) -> FPN:
    """detectron2's build_resnet_fpn_backbone for the PointRend semantic config: ResNet-depth + FPN(256)."""
    return FPN(ResNet(depth), (256, 512, 1024, 2048), 256)
