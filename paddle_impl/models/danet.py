"""DANet (twin: torch_ref/models/danet.py), faithful to junfu1115/DANet (`encoding/models/sseg/danet.py`,
`encoding/nn/da_att.py`, the dilated ResNet of `encoding/models/backbone/resnet.py`) as used by the released DANet101
(`--backbone resnet101 --multi-grid --multi-dilation 4 8 16 --os 8 --no-deepstem`).

Official key names (the checkpoint is saved from the unwrapped model: no `module.` prefix):
    pretrained.conv1/bn1.*, pretrained.layer1..4.*     torchvision-stem ResNet, OS8: layer3 dilation 1 (first block)
                                                       then 2, layer4 dilations 4, 8, 16 (multi-grid)
    head.conv5a.{0,1}.*, head.conv5c.{0,1}.*           3x3 conv 2048->512 + BN (+ ReLU): PAM / CAM inputs
    head.sa.{query,key}_conv.{weight,bias}             1x1 512->64 with bias;  head.sa.value_conv.*  1x1 512->512
    head.sa.gamma [1], head.sc.gamma [1]               residual scales, zero at initialisation
    head.conv51.{0,1}.*, head.conv52.{0,1}.*           3x3 conv 512->512 + BN (+ ReLU) after PAM / CAM
    head.conv6.1.*, head.conv7.1.*, head.conv8.1.*     Dropout2d(0.1) + 1x1 conv 512->classes: PAM, CAM, sum
Oddities of the official code reproduced on purpose:
* PAM: no 1/sqrt(d) scaling of the energy; softmax over the LAST axis (over the keys); out = V @ attention^T;
* CAM: the softmax is taken of (rowmax(energy) - energy), not of the energy: equal to softmax(-energy), so a channel
  attends most to the channels LEAST similar to it;
* gamma * out + x with gamma initialised to 0: an untrained model ignores both attentions;
* the forward returns (sasc, sa, sc), each upsampled to the input size with align_corners=True; the official returns
  the tuple in eval mode too and its evaluator keeps [0], which is what eval mode returns here.

`pam_impl` (not in the official code) picks how PAM computes its output: "reference" (default) is the official
sequence above, which holds the (N, HW, HW) energy and attention maps; "efficient" computes the same output with
`L.position_attention`, which never builds the whole map at once (the `position_attention` docstring of each
layers.py says what stays in memory in training).
"""
from __future__ import annotations

from typing import Optional, Sequence

from .. import layers as L
from ..backbones.resnet import ResNet, depth_from_keys


def _conv_bn_relu(in_dim: int, out_dim: int, bn_momentum: float):
    return L.Sequential(L.Conv2d(in_dim, out_dim, 3, padding=1, bias=False),
                        L.BatchNorm2d(out_dim, momentum=bn_momentum), L.ReLU())


def _classifier(in_dim: int, num_classes: int, dropout: float):
    return L.Sequential(L.Dropout2d(dropout), L.Conv2d(in_dim, num_classes, 1))


#: the position-attention implementations (`pam_impl`): the official map-building one, and one equal to it that
#: never holds the (N, HW, HW) map
PAM_IMPLS = ("reference", "efficient")


def check_pam_impl(impl) -> str:
    """`impl` when it names a PAM implementation; ValueError otherwise."""
    if impl not in PAM_IMPLS:
        raise ValueError(f"pam_impl must be one of {', '.join(repr(i) for i in PAM_IMPLS)}, got {impl!r}")
    return impl


class PAM(L.Module):
    """Position attention: x (N, C, H, W) -> gamma * (V attention^T) + x, attention (N, HW, HW) over positions.

    impl "reference" builds the attention map as the official code does; "efficient" gets the same product from
    `L.position_attention` without building the whole map at once (same parameters, same output up to rounding)."""

    def __init__(self, in_dim: int, impl: str = "reference"):
        super().__init__()
        self.impl = check_pam_impl(impl)
        self.query_conv = L.Conv2d(in_dim, in_dim // 8, 1)
        self.key_conv = L.Conv2d(in_dim, in_dim // 8, 1)
        self.value_conv = L.Conv2d(in_dim, in_dim, 1)
        self.gamma = L.zeros_parameter(self, (1,))

    def forward(self, x):
        n, c, h, w = L.sizes(x)
        query = L.swap_dims_1_2(L.reshape(self.query_conv(x), (n, -1, h * w)))  # (N, HW, C/8)
        key = L.reshape(self.key_conv(x), (n, -1, h * w))                        # (N, C/8, HW)
        if self.impl == "reference":
            energy = L.bmm(query, key)                                           # (N, HW, HW), no scaling
            attention = L.softmax(energy, -1)
            value = L.reshape(self.value_conv(x), (n, -1, h * w))                # (N, C, HW)
            out = L.reshape(L.bmm(value, L.swap_dims_1_2(attention)), (n, c, h, w))
        else:
            value = L.reshape(self.value_conv(x), (n, -1, h * w))                # (N, C, HW)
            out = L.reshape(L.position_attention(query, key, value), (n, c, h, w))
        return self.gamma * out + x


class CAM(L.Module):
    """Channel attention: x (N, C, H, W) -> gamma * (attention X) + x, attention (N, C, C) over channels."""

    def __init__(self):
        super().__init__()
        self.gamma = L.zeros_parameter(self, (1,))

    def forward(self, x):
        n, c, h, w = L.sizes(x)
        query = L.reshape(x, (n, c, -1))                                         # (N, C, HW)
        key = L.swap_dims_1_2(L.reshape(x, (n, c, -1)))                          # (N, HW, C)
        energy = L.bmm(query, key)                                               # (N, C, C)
        # the official rowmax - energy (not energy): see the module docstring
        energy_new = L.row_max(energy) - energy
        attention = L.softmax(energy_new, -1)
        value = L.reshape(x, (n, c, -1))
        out = L.reshape(L.bmm(attention, value), (n, c, h, w))
        return self.gamma * out + x


class DANetHead(L.Module):
    """layer4 features (N, 2048, h, w) -> (sasc, sa, sc) logits, each (N, classes, h, w)."""

    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.1, bn_momentum: float = 0.1,
                 pam_impl: str = "reference"):
        super().__init__()
        inter = in_channels // 4
        self.conv5a = _conv_bn_relu(in_channels, inter, bn_momentum)
        self.conv5c = _conv_bn_relu(in_channels, inter, bn_momentum)
        self.sa = PAM(inter, impl=pam_impl)
        self.sc = CAM()
        self.conv51 = _conv_bn_relu(inter, inter, bn_momentum)
        self.conv52 = _conv_bn_relu(inter, inter, bn_momentum)
        self.conv6 = _classifier(inter, num_classes, dropout)
        self.conv7 = _classifier(inter, num_classes, dropout)
        self.conv8 = _classifier(inter, num_classes, dropout)

    def forward(self, x):
        sa_conv = self.conv51(self.sa(self.conv5a(x)))
        sa_output = self.conv6(sa_conv)
        sc_conv = self.conv52(self.sc(self.conv5c(x)))
        sc_output = self.conv7(sc_conv)
        sasc_output = self.conv8(sa_conv + sc_conv)
        return sasc_output, sa_output, sc_output


class DANet(L.Module):
    model_name = "DANet"

    def __init__(self, num_classes: int = 19, layers: int = 101, multi_grid: Optional[Sequence[int]] = (4, 8, 16),
                 dropout: float = 0.1, bn_momentum: float = 0.1, pam_impl: str = "reference"):
        super().__init__()
        self.num_classes = num_classes
        self.pam_impl = check_pam_impl(pam_impl)  # before the backbone is built: a bad value fails at once
        self.pretrained = ResNet(layers, deep_base=False, strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4),
                                 multi_grid=tuple(multi_grid) if multi_grid else None, contract_dilation=True,
                                 bn_momentum=bn_momentum)
        self.head = DANetHead(2048, num_classes, dropout, bn_momentum, pam_impl)

    def forward(self, x):
        """x: (N, 3, H, W) normalised RGB, any size.

        eval:  logits (N, classes, H, W) of the summed attentions (sasc)
        train: (sasc, sa, sc), each (N, classes, H, W)
        """
        size = L.spatial_size(x)
        p = self.pretrained
        x = p.maxpool(p.relu(p.bn1(p.conv1(x))))
        x = p.layer4(p.layer3(p.layer2(p.layer1(x))))
        outputs = [L.interpolate(o, size, align_corners=True) for o in self.head(x)]
        if self.training:
            return tuple(outputs)
        return outputs[0]


def build(num_classes: int = 19, layers: int = 101, **cfg) -> DANet:
    return DANet(num_classes=num_classes, layers=layers, **cfg)


def infer_config(state_dict) -> dict:
    """Class count (head.conv8.1.weight) and ResNet depth (blocks in pretrained.layer3) of an official state_dict."""
    if "head.conv8.1.weight" not in state_dict:
        raise KeyError("head.conv8.1.weight")
    num_classes = int(state_dict["head.conv8.1.weight"].shape[0])
    return {"num_classes": num_classes, "layers": depth_from_keys("DANet", state_dict, "pretrained.")}
