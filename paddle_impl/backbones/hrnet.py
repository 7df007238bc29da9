"""HRNetV2-W48 backbone with Polarized Self-Attention of the Paddle twins (twin: torch_ref/backbones/hrnet.py).

Faithful to DeLightCMU/PSA `semantic-segmentation/network/{hrnetv2,PSA}.py`: NVIDIA/semantic-segmentation's HRNetV2
(itself HRNet-OCR's) with one change, a PSA block (`deattn`) inside every BasicBlock. The configuration is NVIDIA's
`MODEL.OCR_EXTRA` (W48): layer1 = 4 Bottlenecks (64 -> 256 channels), then stages of 1, 4 and 3 HighResolutionModules
with 2, 3 and 4 branches of widths 48, 96, 192, 384, 4 BasicBlocks per branch, SUM fusion, multi-scale output
everywhere. Every norm is a BatchNorm2d (momentum 0.1 in torch's convention, eps 1e-5).

Official key names (the caller mounts this module as `backbone.`):
    conv1.weight, bn1.*, conv2.weight, bn2.*                   stem: two 3x3 stride-2 convs (3 -> 64 -> 64)
    layer1.{0..3}.{conv1,bn1,conv2,bn2,conv3,bn3}.*, layer1.0.downsample.{0.weight,1.*}
    transition1.0.0.weight, transition1.0.1.*                  3x3 256 -> 48, stride 1 (+ BN, ReLU)
    transition1.1.0.0.weight, transition1.1.0.1.*              3x3 256 -> 96, stride 2, one level deeper
    transition{2,3}.{2,3}.0.0.weight, ...                      the new branch only (the others are None: no keys)
    stage{2,3,4}.<module>.branches.<b>.<block>.{conv1,bn1,conv2,bn2}.*
    stage*.….branches.<b>.<block>.deattn.{conv_q_right,conv_v_right,conv_q_left,conv_v_left}.weight
    stage*.….deattn.conv_up.weight                             PSA_p: one 1x1 conv C/2 -> C, no bias
    stage*.….deattn.conv_up.{0,3}.{weight,bias}, .conv_up.1.{weight,bias} (C/8, 1, 1)
                                                               PSA_s: conv (bias), LayerNorm, ReLU, conv (bias)
    stage*.<module>.fuse_layers.<i>.<j>.{0.weight,1.*}         j > i: 1x1 conv C_j -> C_i + BN (then resized)
    stage*.<module>.fuse_layers.<i>.<j>.<k>.{0.weight,1.*}     j < i: i - j stride-2 3x3 conv + BN (+ ReLU)
104 PSA blocks in all (stage2 1 x 2 x 4, stage3 4 x 3 x 4, stage4 3 x 4 x 4); `psa=None` is plain HRNetV2-W48 with
no `deattn` at all.

Oddities reproduced on purpose:
* the released hrnetv2.py hard-codes PSA_s in its BasicBlock; here `psa` picks "s" (sequential), "p" (parallel,
  the paper's best) or None. The attention sits between relu(bn1(conv1(x))) and conv2.
* PSA's method names are swapped relative to what they compute: `spatial_pool` builds the CHANNEL mask (N, C, 1, 1),
  `channel_pool` the SPATIAL mask (N, 1, H, W). The names are kept (they are upstream's).
* PSA_s's `conv_up` has conv biases and a LayerNorm over (C/8, 1, 1), i.e. across the channels of a 1x1 map; its
  spatial branch soft-maxes theta over H*W per channel BEFORE the product with the pooled query, and nothing after;
  PSA_p soft-maxes the (N, 1, H*W) product instead.
* init (upstream `init_weights`, applied after construction): every conv weight ~ N(0, 0.001^2), which overwrites
  PSA's own kaiming init of its four 1x1 convs (still drawn first, in upstream's order: on the torch side the same
  seed gives upstream's numbers); every BN weight 1, bias 0; conv biases (PSA_s only) follow torch's default
  U(-1/sqrt(fan_in), 1/sqrt(fan_in)), the LayerNorm weight 1, bias 0. Upstream skips modules whose name contains
  'cls', 'aux' or 'ocr': none of the backbone's do.
* fuse and final resizes are bilinear with align_corners False (NVIDIA's MODEL.ALIGN_CORNERS default).
* forward returns the (N, 720, H/4, W/4) concatenation only; upstream returns (None, None, feats).
"""
from __future__ import annotations

from typing import Optional, Sequence

from .. import layers as L
from .resnet import Bottleneck

#: NVIDIA's MODEL.OCR_EXTRA (HRNetV2-W48): layer1 (STAGE1) and, per later stage, (NUM_MODULES, NUM_CHANNELS)
STAGE1_BLOCKS = 4
STAGE1_PLANES = 64
STAGES = ((1, (48, 96)), (4, (48, 96, 192)), (3, (48, 96, 192, 384)))
BLOCKS_PER_BRANCH = 4
PSA_VARIANTS = ("s", "p", None)


def conv3x3(in_planes: int, out_planes: int, stride: int = 1):
    return L.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)


class _PSA(L.Module):
    """What PSA_p and PSA_s share: the four 1x1 convs, upstream's attribute order (so construction draws the same
    random numbers), the two mask branches. Subclasses give `conv_up`, the spatial logits and the composition."""

    def __init__(self, inplanes: int, planes: int):
        super().__init__()
        self.inplanes = inplanes
        self.inter_planes = planes // 2
        self.planes = planes
        self.conv_q_right = L.Conv2d(inplanes, 1, 1, bias=False)
        self.conv_v_right = L.Conv2d(inplanes, self.inter_planes, 1, bias=False)
        self.conv_up = self._make_conv_up()
        self.sigmoid = L.Sigmoid()
        self.conv_q_left = L.Conv2d(inplanes, self.inter_planes, 1, bias=False)  # g
        self.avg_pool = L.AdaptiveAvgPool2d(1)
        self.conv_v_left = L.Conv2d(inplanes, self.inter_planes, 1, bias=False)  # theta
        self.reset_parameters()

    def _make_conv_up(self):
        raise NotImplementedError

    def _spatial_logits(self, avg_x, theta_x):
        """(N, 1, C/2) pooled query, (N, C/2, HW) values -> (N, 1, HW) logits of the spatial mask."""
        raise NotImplementedError

    def reset_parameters(self) -> None:
        """Upstream's kaiming init (fan_in, ReLU gain) of the four query/value convs (overwritten by init_weights)."""
        for conv in (self.conv_q_right, self.conv_v_right, self.conv_q_left, self.conv_v_left):
            L.init_kaiming_normal_(conv.weight, "fan_in")

    def spatial_pool(self, x):
        """Despite the name, the CHANNEL attention: x * sigmoid(conv_up(v @ softmax_HW(q)^T)), mask (N, C, 1, 1)."""
        input_x = self.conv_v_right(x)
        batch, channel, height, width = L.sizes(input_x)
        input_x = L.reshape(input_x, (batch, channel, height * width))            # (N, C/2, HW)
        context_mask = L.reshape(self.conv_q_right(x), (batch, 1, height * width))  # (N, 1, HW)
        context_mask = L.softmax(context_mask, 2)
        context = L.matmul(input_x, L.swap_dims_1_2(context_mask))                 # (N, C/2, 1)
        context = self.conv_up(context.unsqueeze(-1))                               # (N, C, 1, 1)
        return x * self.sigmoid(context)

    def channel_pool(self, x):
        """Despite the name, the SPATIAL attention: x * sigmoid(logits over H*W), mask (N, 1, H, W)."""
        g_x = self.conv_q_left(x)
        batch, channel, height, width = L.sizes(g_x)
        avg_x = L.swap_dims_1_2(L.reshape(self.avg_pool(g_x), (batch, channel, 1)))  # (N, 1, C/2)
        theta_x = L.reshape(self.conv_v_left(x), (batch, self.inter_planes, height * width))
        context = L.reshape(self._spatial_logits(avg_x, theta_x), (batch, 1, height, width))
        return x * self.sigmoid(context)


class PSA_p(_PSA):
    """Parallel PSA: spatial_pool(x) + channel_pool(x); conv_up a single 1x1 conv C/2 -> C without bias."""

    def _make_conv_up(self):
        return L.Conv2d(self.inter_planes, self.planes, 1, bias=False)

    def _spatial_logits(self, avg_x, theta_x):
        return L.softmax(L.matmul(avg_x, theta_x), 2)

    def forward(self, x):
        """x: (N, C, H, W) -> (N, C, H, W)."""
        return self.spatial_pool(x) + self.channel_pool(x)


class PSA_s(_PSA):
    """Sequential PSA: channel_pool(spatial_pool(x)); conv_up = conv C/2 -> C/8 (bias), LayerNorm (C/8, 1, 1), ReLU,
    conv C/8 -> C (bias)."""

    def _make_conv_up(self):
        bottleneck = self.inter_planes // 4
        return L.Sequential(L.Conv2d(self.inter_planes, bottleneck, 1), L.LayerNorm((bottleneck, 1, 1)), L.ReLU(),
                            L.Conv2d(bottleneck, self.planes, 1))

    def _spatial_logits(self, avg_x, theta_x):
        return L.matmul(avg_x, L.softmax(theta_x, 2))

    def forward(self, x):
        """x: (N, C, H, W) -> (N, C, H, W)."""
        return self.channel_pool(self.spatial_pool(x))


PSA_BLOCKS = {"s": PSA_s, "p": PSA_p}


def check_psa(psa: Optional[str]) -> Optional[str]:
    if psa not in PSA_VARIANTS:
        raise ValueError(f"psa must be one of {list(PSA_VARIANTS)} ('s' sequential, 'p' parallel, None: plain "
                         f"HRNetV2), got {psa!r}")
    return psa


class BasicBlock(L.Module):
    """HRNet's BasicBlock with PSA: relu(bn2(conv2(deattn(relu(bn1(conv1(x)))))) + x). Stride 1 and no downsample:
    every HRNetV2 branch keeps its width, so upstream's (unused) stride/downsample arguments are left out."""
    expansion = 1

    def __init__(self, inplanes: int, planes: int, psa: Optional[str] = "p", bn_momentum: float = 0.1):
        super().__init__()
        if inplanes != planes:
            raise ValueError(f"BasicBlock without downsample needs inplanes == planes, got {inplanes} and {planes}")
        self.psa = check_psa(psa)
        self.conv1 = conv3x3(inplanes, planes)
        self.bn1 = L.BatchNorm2d(planes, momentum=bn_momentum)
        self.relu = L.ReLU()
        if psa is not None:
            self.deattn = PSA_BLOCKS[psa](planes, planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = L.BatchNorm2d(planes, momentum=bn_momentum)

    def forward(self, x):
        """x: (N, C, H, W) -> (N, C, H, W)."""
        out = self.relu(self.bn1(self.conv1(x)))
        if self.psa is not None:
            out = self.deattn(out)
        out = self.bn2(self.conv2(out))
        return self.relu(out + x)


class HighResolutionModule(L.Module):
    """Parallel branches of BasicBlocks, then SUM fusion into every branch (multi_scale_output True).

    fuse_layers[i][j]: j > i: 1x1 conv C_j -> C_i + BN, bilinearly resized to branch i; j == i: None; j < i: i - j
    stride-2 3x3 conv + BN, ReLU after all but the last, the intermediate ones keeping C_j channels.
    """

    def __init__(self, num_inchannels: Sequence[int], num_channels: Sequence[int], num_blocks: int,
                 psa: Optional[str] = "p", bn_momentum: float = 0.1):
        super().__init__()
        if len(num_inchannels) != len(num_channels) or len(num_channels) < 2:
            raise ValueError(f"need >= 2 branches and one input width per branch, got inputs {list(num_inchannels)} "
                             f"and branches {list(num_channels)}")
        self.num_branches = len(num_channels)
        self.num_inchannels = list(num_channels)
        self.branches = L.ModuleList([
            L.Sequential(*[BasicBlock(cin if b == 0 else c, c, psa, bn_momentum) for b in range(num_blocks)])
            for cin, c in zip(num_inchannels, num_channels)])
        self.fuse_layers = self._make_fuse_layers(bn_momentum)
        self.relu = L.ReLU()

    def _make_fuse_layers(self, bn_momentum: float):
        ch = self.num_inchannels
        fuse_layers = []
        for i in range(self.num_branches):
            fuse_layer = []
            for j in range(self.num_branches):
                if j > i:
                    fuse_layer.append(L.Sequential(L.Conv2d(ch[j], ch[i], 1, bias=False),
                                                   L.BatchNorm2d(ch[i], momentum=bn_momentum)))
                elif j == i:
                    fuse_layer.append(None)
                else:
                    conv3x3s = []
                    for k in range(i - j):
                        if k == i - j - 1:
                            conv3x3s.append(L.Sequential(conv3x3(ch[j], ch[i], stride=2),
                                                         L.BatchNorm2d(ch[i], momentum=bn_momentum)))
                        else:
                            conv3x3s.append(L.Sequential(conv3x3(ch[j], ch[j], stride=2),
                                                         L.BatchNorm2d(ch[j], momentum=bn_momentum), L.ReLU()))
                    fuse_layer.append(L.Sequential(*conv3x3s))
            fuse_layers.append(L.ModuleList(fuse_layer))
        return L.ModuleList(fuse_layers)

    def forward(self, x):
        """x: list of (N, C_b, H_b, W_b), one per branch -> list of the same shapes."""
        x = [branch(xb) for branch, xb in zip(self.branches, x)]  # a new list: the caller's is left alone
        x_fuse = []
        for i, fuse_layer in enumerate(self.fuse_layers):
            y = x[0] if i == 0 else fuse_layer[0](x[0])
            for j in range(1, self.num_branches):
                if j == i:
                    y = y + x[j]
                elif j > i:
                    y = y + L.interpolate(fuse_layer[j](x[j]), L.spatial_size(x[i]), align_corners=False)
                else:
                    y = y + fuse_layer[j](x[j])
            x_fuse.append(self.relu(y))
        return x_fuse


def init_weights(module) -> None:
    """Upstream `init_weights`: every conv weight ~ N(0, 0.001^2) (its bias: torch's default), every BatchNorm
    weight 1, bias 0; anything else (the PSA_s LayerNorm) untouched."""
    for _, m in L.named_modules(module):
        if isinstance(m, L.CONV2D_LAYERS):
            L.init_normal_(m.weight, 0.001)
            L.init_torch_default_bias_(m)
        elif isinstance(m, L.BATCHNORM_LAYERS):
            L.init_constant_(m.weight, 1.0)
            L.init_constant_(m.bias, 0.0)


class HRNetV2(L.Module):
    """HRNetV2-W48 (+ PSA `psa` in every BasicBlock): (N, 3, H, W) -> (N, 720, ceil(H/4), ceil(W/4)), the four
    branches upsampled to branch 0 and concatenated."""

    def __init__(self, psa: Optional[str] = "p", bn_momentum: float = 0.1):
        super().__init__()
        self.psa = check_psa(psa)
        self.conv1 = L.Conv2d(3, 64, 3, stride=2, padding=1, bias=False)
        self.bn1 = L.BatchNorm2d(64, momentum=bn_momentum)
        self.conv2 = L.Conv2d(64, 64, 3, stride=2, padding=1, bias=False)
        self.bn2 = L.BatchNorm2d(64, momentum=bn_momentum)
        self.relu = L.ReLU()
        self.layer1 = self._make_layer(64, STAGE1_PLANES, STAGE1_BLOCKS, bn_momentum)
        pre = [STAGE1_PLANES * Bottleneck.expansion]
        for s, (num_modules, channels) in enumerate(STAGES):
            setattr(self, f"transition{s + 1}", self._make_transition_layer(pre, channels, bn_momentum))
            setattr(self, f"stage{s + 2}", L.Sequential(*[
                HighResolutionModule(channels, channels, BLOCKS_PER_BRANCH, psa, bn_momentum)
                for _ in range(num_modules)]))
            pre = list(channels)
        self.high_level_ch = sum(pre)
        init_weights(self)

    @staticmethod
    def _make_layer(inplanes: int, planes: int, blocks: int, bn_momentum: float):
        """layer1: Bottlenecks, the first with a 1x1 conv + BN shortcut (built first, as upstream does)."""
        downsample = L.Sequential(L.Conv2d(inplanes, planes * Bottleneck.expansion, 1, bias=False),
                                  L.BatchNorm2d(planes * Bottleneck.expansion, momentum=bn_momentum))
        layers = [Bottleneck(inplanes, planes, downsample=downsample, bn_momentum=bn_momentum)]
        for _ in range(1, blocks):
            layers.append(Bottleneck(planes * Bottleneck.expansion, planes, bn_momentum=bn_momentum))
        return L.Sequential(*layers)

    @staticmethod
    def _make_transition_layer(pre: Sequence[int], cur: Sequence[int], bn_momentum: float):
        """Per branch of the next stage: None (same width, passed through), a 3x3 conv + BN + ReLU (width change),
        or, for a new branch, a Sequential of stride-2 3x3 conv + BN + ReLU from the last branch."""
        transition_layers = []
        for i, c in enumerate(cur):
            if i < len(pre):
                if c != pre[i]:
                    transition_layers.append(L.Sequential(conv3x3(pre[i], c), L.BatchNorm2d(c, momentum=bn_momentum),
                                                          L.ReLU()))
                else:
                    transition_layers.append(None)
            else:
                conv3x3s = []
                for j in range(i + 1 - len(pre)):
                    inchannels = pre[-1]
                    outchannels = c if j == i - len(pre) else inchannels
                    conv3x3s.append(L.Sequential(conv3x3(inchannels, outchannels, stride=2),
                                                 L.BatchNorm2d(outchannels, momentum=bn_momentum), L.ReLU()))
                transition_layers.append(L.Sequential(*conv3x3s))
        return L.ModuleList(transition_layers)

    def forward(self, x):
        """x: (N, 3, H, W) -> (N, 720, H4, W4) with H4 = ceil(H / 4). Upstream returns (None, None, this)."""
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        y_list = [self.layer1(x)]
        for transition, stage in ((self.transition1, self.stage2), (self.transition2, self.stage3),
                                  (self.transition3, self.stage4)):
            x_list = []
            for i, t in enumerate(transition):
                if t is None:
                    x_list.append(y_list[i])
                else:
                    x_list.append(t(y_list[i] if i < len(y_list) else y_list[-1]))
            y_list = stage(x_list)
        size = L.spatial_size(y_list[0])
        feats = [y_list[0]] + [L.interpolate(y, size, align_corners=False) for y in y_list[1:]]
        return L.cat(feats, 1)


def psa_from_keys(keys, prefix: str = "") -> Optional[str]:
    """The PSA variant a state_dict's key names imply, among the keys under `prefix` (e.g. 'backbone.'): 's' when a
    `deattn.conv_up.1.weight` (PSA_s's LayerNorm) is present, 'p' when other `deattn` keys are, None without any."""
    deattn = [k for k in keys if k.startswith(prefix) and ".deattn." in k]
    if not deattn:
        return None
    if any(k.endswith(".deattn.conv_up.1.weight") for k in deattn):
        return "s"
    return "p"
