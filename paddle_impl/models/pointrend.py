"""SemanticFPN + PointRend (twin: torch_ref/models/pointrend.py), faithful to facebookresearch/detectron2
`projects/PointRend/point_rend/{semantic_seg.py, point_head.py, point_features.py}` with the coarse head
`detectron2/modeling/meta_arch/semantic_seg.py` (SemSegFPNHead) and the backbone of `backbones/d2_resnet.py`, as
configured by `pointrend_semantic_R_101_FPN_1x_cityscapes.yaml` (19 classes, TRAIN_NUM_POINTS 2048, OVERSAMPLE_RATIO 3,
IMPORTANCE_SAMPLE_RATIO 0.75, SUBDIVISION_STEPS 2, SUBDIVISION_NUM_POINTS 8192, FC_DIM 256, NUM_FC 3,
COARSE_PRED_EACH_LAYER False, SEM_SEG_HEAD: CONVS_DIM 128, COMMON_STRIDE 4, NORM "GN", IGNORE_VALUE 255).

Model contract
--------------
`PointRendSemSeg` has detectron2's SemanticSegmentor attribute tree, so the state_dict keys are exactly those of an
official checkpoint (`model_final_*.pkl` -> `{'model': {name: array}}`):

    backbone.bottom_up.stem.conv1.weight, backbone.bottom_up.res4.22.conv3.norm.running_var, ...   (FrozenBN buffers)
    backbone.fpn_lateral{2..5}.{weight,bias}, backbone.fpn_output{2..5}.{weight,bias}
    sem_seg_head.coarse_sem_seg_head.p{2..5}.{j}.weight, .p{k}.{j}.norm.{weight,bias}   (3x3 conv, GroupNorm(32))
        p2: 0 | p3: 0 (+ upsample 1) | p4: 0, 2 | p5: 0, 2, 4   (odd indices are parameterless x2 bilinear upsamples)
    sem_seg_head.coarse_sem_seg_head.predictor.{weight,bias}   (1x1, 128 -> C)
    sem_seg_head.point_head.fc{1,2,3}.{weight,bias}   (Conv1d k=1; fc1 (256, 256 + C, 1))
    sem_seg_head.point_head.predictor.{weight,bias}   (Conv1d k=1, 256 -> C)
detectron2's `pixel_mean` / `pixel_std` are non-persistent buffers (not in the state dict); normalisation is done
by `preprocess` here instead.

* Input: (N, 3, H, W) BGR with the pixel mean (103.53, 116.28, 123.675) subtracted (std 1), H and W multiples of 32
  (`check_input(h, w)` raises ValueError otherwise; detectron2 pads to that size, `preprocess` does the same).
* eval `forward(x)` -> final logits (N, C, H, W): the coarse stride-4 logits refined by `subdivision_steps` (2)
  PointRend subdivision steps (each: x2 bilinear, the `subdivision_num_points` most uncertain cells re-predicted by
  the point head from p2 features + the ORIGINAL coarse logits sampled at the cell centres).
* `stages(x, indices=None)` -> {"coarse": (N, C, H/4, W/4), "step1": (N, C, H/2, W/2), "step2": (N, C, H, W),
  "indices": [idx_step1 (N, k1), idx_step2 (N, k2)]}; `indices` (a list, one entry per step, None = select) makes a
  step use given flattened cell indices instead of its own top-k, so a harness can give both frameworks the same cells.
* train `forward(x, rand=None, chosen=None)` -> (coarse logits x4 bilinear (N, C, H, W), point_logits (N, C, P),
  point_coords (N, P, 2)) with P = train_num_points; `rand(shape) -> tensor` replaces the uniform generator and
  `chosen` (N, int(0.75 * P)) the top-k selection of `get_uncertain_point_coords_with_randomness`. The losses are
  cross-entropy (ignore 255) of the first output against the label and of point_logits against
  `point_targets(label, point_coords)`.

Deviation (documented, not numerical): detectron2 builds the grid coordinates of a subdivision step in float32 and
draws training points in the default dtype; here both take the logits' dtype so that the whole model runs in float64
for the alignment (in float32 the arithmetic is detectron2's: w_step / 2 + (idx % W) * w_step).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

from .. import layers as L
from ..backbones.d2_resnet import build_resnet_fpn, depth_from_res4

PIXEL_MEAN = (103.53, 116.28, 123.675)  # BGR, detectron2 MODEL.PIXEL_MEAN
PIXEL_STD = (1.0, 1.0, 1.0)
SIZE_DIVISIBILITY = 32  # the FPN's coarsest input stride (res5)
FEATURE_STRIDES = (("p2", 4), ("p3", 8), ("p4", 16), ("p5", 32))


def calculate_uncertainty(sem_seg_logits):
    """(N, C, ...) logits -> (N, 1, ...): second-largest minus largest logit (0 = most uncertain)."""
    top2_scores = L.topk(sem_seg_logits, 2, 1)[0]
    return (top2_scores[:, 1] - top2_scores[:, 0]).unsqueeze(1)


def get_uncertain_point_coords_with_randomness(coarse_logits, num_points: int, oversample_ratio: int = 3,
                                               importance_sample_ratio: float = 0.75, rand=None, chosen=None):
    """Training points: num_points * oversample_ratio uniform points in [0, 1)^2 per image, the
    int(importance_sample_ratio * num_points) most uncertain of them (uncertainty of the point-sampled coarse logits),
    then fresh uniform points up to num_points.

    rand(shape) -> tensor: the uniform generator (default: the framework's, in the logits' dtype), called twice: for
    the (N, num_points * oversample_ratio, 2) candidates, then for the (N, num_random, 2) extra points.
    chosen: (N, k) int64 indices into the candidates used instead of the top-k (the selection of another run).
    Returns (point_coords (N, num_points, 2), chosen indices (N, k)).
    """
    if oversample_ratio < 1:
        raise ValueError(f"oversample_ratio must be >= 1, got {oversample_ratio}")
    if not 0 <= importance_sample_ratio <= 1:
        raise ValueError(f"importance_sample_ratio must be in [0, 1], got {importance_sample_ratio}")
    if rand is None:
        def rand(shape):
            return L.rand(shape, coarse_logits)
    num_boxes = L.sizes(coarse_logits)[0]
    num_sampled = int(num_points * oversample_ratio)
    point_coords = rand((num_boxes, num_sampled, 2))
    point_logits = L.point_sample(coarse_logits, point_coords, align_corners=False)
    point_uncertainties = calculate_uncertainty(point_logits)
    num_uncertain_points = int(importance_sample_ratio * num_points)
    num_random_points = num_points - num_uncertain_points
    if chosen is None:
        chosen = L.topk(point_uncertainties[:, 0, :], num_uncertain_points, 1)[1]
    index = L.expand(chosen.unsqueeze(2), (num_boxes, num_uncertain_points, 2))
    point_coords = L.take_along(point_coords, index, 1)
    if num_random_points > 0:
        point_coords = L.cat([point_coords, rand((num_boxes, num_random_points, 2))], 1)
    return point_coords, chosen


def get_uncertain_point_coords_on_grid(uncertainty_map, num_points: int, point_indices=None):
    """The min(H*W, num_points) most uncertain cells of an (R, 1, H, W) map: (point_indices (R, P) flattened
    row-major, point_coords (R, P, 2) = the cell centres (x, y) in [0, 1]^2). `point_indices` given: used as is."""
    r, _, h, w = L.sizes(uncertainty_map)
    h_step = 1.0 / float(h)
    w_step = 1.0 / float(w)
    num_points = min(h * w, num_points)
    if point_indices is None:
        point_indices = L.topk(L.reshape(uncertainty_map, (r, h * w)), num_points, 1)[1]
    xs = w_step / 2.0 + L.as_dtype_of(point_indices % w, uncertainty_map) * w_step
    ys = h_step / 2.0 + L.as_dtype_of(point_indices // w, uncertainty_map) * h_step
    return point_indices, L.stack([xs, ys], 2)


def loss_pairs(outputs, label) -> list:
    """(logits, target) of each loss term of the training outputs: ("coarse", x4-upsampled coarse logits vs the label)
    and ("point", the point logits vs the label sampled at the points), both as (N, C, H', W') / (N, H', W') so every
    pixel loss applies (detectron2: cross-entropy with ignore 255 on each)."""
    coarse, point_logits, point_coords = outputs
    return [(coarse, label), (point_logits.unsqueeze(3), point_targets(label, point_coords).unsqueeze(2))]


def point_targets(label, point_coords):
    """Labels at the points: nearest point-sample of the (N, H, W) integer label -> int64 (N, P); 255 stays 255."""
    sampled = L.point_sample(L.as_dtype_of(label.unsqueeze(1), point_coords), point_coords, align_corners=False,
                             mode="nearest")
    return L.as_int64(sampled.squeeze(1))


def preprocess(images: Sequence, size_divisibility: int = SIZE_DIVISIBILITY):
    """detectron2's input pipeline for (H, W, 3) uint8 BGR images: (x - PIXEL_MEAN) / PIXEL_STD in float32, zero
    padding at the bottom/right up to the batch's largest size rounded up to a multiple of `size_divisibility`.
    Returns (batch (N, 3, Hp, Wp) float32 tensor, [(h, w) of each image])."""
    sizes = [(int(np.shape(im)[0]), int(np.shape(im)[1])) for im in images]
    if not sizes:
        raise ValueError("preprocess: no images")
    max_h = max(s[0] for s in sizes)
    max_w = max(s[1] for s in sizes)
    max_h = (max_h + size_divisibility - 1) // size_divisibility * size_divisibility
    max_w = (max_w + size_divisibility - 1) // size_divisibility * size_divisibility
    mean = np.asarray(PIXEL_MEAN, np.float32).reshape(3, 1, 1)
    std = np.asarray(PIXEL_STD, np.float32).reshape(3, 1, 1)
    batch = np.zeros((len(images), 3, max_h, max_w), np.float32)
    for i, image in enumerate(images):
        chw = np.asarray(image).transpose(2, 0, 1).astype(np.float32)
        batch[i, :, :sizes[i][0], :sizes[i][1]] = (chw - mean) / std
    return L.from_numpy(batch), sizes


class SemSegFPNHead(L.Module):
    """Semantic FPN head: per level a chain of [3x3 conv (no bias) + GroupNorm(32) + ReLU, x2 bilinear upsample when
    the level is coarser than `common_stride`] repeated max(1, log2(stride / common_stride)) times, the levels summed,
    a 1x1 `predictor` -> coarse logits at stride `common_stride`."""

    def __init__(self, num_classes: int, in_channels: int = 256, conv_dims: int = 128, common_stride: int = 4):
        super().__init__()
        self.in_features = tuple(name for name, _ in FEATURE_STRIDES)
        self.common_stride = common_stride
        for name, stride in FEATURE_STRIDES:
            head_ops = []
            head_length = max(1, int(math.log2(stride) - math.log2(common_stride)))
            for k in range(head_length):
                conv = L.NormConv2d(in_channels if k == 0 else conv_dims, conv_dims, 3, stride=1, padding=1,
                                    bias=False, norm=L.GroupNorm(32, conv_dims), activation=L.relu)
                L.init_c2_msra_(conv)
                head_ops.append(conv)
                if stride != common_stride:
                    head_ops.append(L.Upsample(2, "bilinear"))
            setattr(self, name, L.Sequential(*head_ops))
        self.predictor = L.Conv2d(conv_dims, num_classes, 1, stride=1, padding=0)
        L.init_c2_msra_(self.predictor)

    def layers(self, features):
        """{p2..p5} -> coarse logits (N, C, H/4, W/4)."""
        x = None
        for f in self.in_features:
            y = getattr(self, f)(features[f])
            x = y if x is None else x + y
        return self.predictor(x)


class StandardPointHead(L.Module):
    """Point MLP as k=1 Conv1d layers: input = cat(fine features, coarse logits) at the points; `fc1..fcN` + ReLU
    (with the coarse logits concatenated again after each when `coarse_pred_each_layer`), `predictor` -> C logits."""

    def __init__(self, input_channels: int, num_classes: int, fc_dim: int = 256, num_fc: int = 3,
                 coarse_pred_each_layer: bool = False):
        super().__init__()
        self.num_fc = num_fc
        self.coarse_pred_each_layer = coarse_pred_each_layer
        fc_dim_in = input_channels + num_classes
        for k in range(num_fc):
            fc = L.Conv1d(fc_dim_in, fc_dim, 1, bias=True)
            setattr(self, f"fc{k + 1}", fc)
            fc_dim_in = fc_dim
            fc_dim_in += num_classes if coarse_pred_each_layer else 0
        self.predictor = L.Conv1d(fc_dim_in, num_classes, 1, bias=True)
        for k in range(num_fc):
            L.init_c2_msra_(getattr(self, f"fc{k + 1}"))
        L.init_normal_(self.predictor.weight, 0.001)
        L.init_constant_(self.predictor.bias, 0.0)

    def forward(self, fine_grained_features, coarse_features):
        """(N, input_channels, P), (N, C, P) -> point logits (N, C, P)."""
        x = L.cat([fine_grained_features, coarse_features], 1)
        for k in range(self.num_fc):
            x = L.relu(getattr(self, f"fc{k + 1}")(x))
            if self.coarse_pred_each_layer:
                x = L.cat([x, coarse_features], 1)
        return self.predictor(x)


class PointRendSemSegHead(L.Module):
    """`coarse_sem_seg_head` (SemSegFPNHead) + `point_head` (StandardPointHead on p2)."""

    def __init__(self, num_classes: int, fc_dim: int = 256, num_fc: int = 3, coarse_pred_each_layer: bool = False,
                 train_num_points: int = 2048, oversample_ratio: int = 3, importance_sample_ratio: float = 0.75,
                 subdivision_steps: int = 2, subdivision_num_points: int = 8192, conv_dims: int = 128,
                 in_channels: int = 256):
        super().__init__()
        self.ignore_value = 255
        self.coarse_sem_seg_head = SemSegFPNHead(num_classes, in_channels, conv_dims, 4)
        self.in_features = ("p2",)
        self.train_num_points = train_num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.subdivision_steps = subdivision_steps
        self.subdivision_num_points = subdivision_num_points
        self.point_head = StandardPointHead(in_channels, num_classes, fc_dim, num_fc, coarse_pred_each_layer)

    def train_points(self, features, coarse_sem_seg_logits, rand=None, chosen=None):
        """Training branch after the coarse head: (point_logits (N, C, P), point_coords (N, P, 2), chosen)."""
        with L.no_grad():
            point_coords, chosen = get_uncertain_point_coords_with_randomness(
                coarse_sem_seg_logits, self.train_num_points, self.oversample_ratio, self.importance_sample_ratio,
                rand, chosen)
        coarse_features = L.point_sample(coarse_sem_seg_logits, point_coords, align_corners=False)
        fine_grained_features = L.cat([L.point_sample(features[f], point_coords, align_corners=False)
                                       for f in self.in_features], 1)
        point_logits = self.point_head(fine_grained_features, coarse_features)
        return point_logits, point_coords, chosen

    def subdivide(self, features, coarse_sem_seg_logits, indices: Optional[Sequence] = None) -> dict:
        """Inference branch: {"step1": ..., "step<subdivision_steps>": ..., "indices": [per step (N, k)]}; the logits
        double in resolution at each step. `indices[s]` (when given and not None) replaces step s+1's selection."""
        out = {"indices": []}
        sem_seg_logits = coarse_sem_seg_logits
        for step in range(self.subdivision_steps):
            sem_seg_logits = L.scale_interpolate(sem_seg_logits, 2, "bilinear")
            uncertainty_map = calculate_uncertainty(sem_seg_logits)
            given = None if indices is None else indices[step]
            point_indices, point_coords = get_uncertain_point_coords_on_grid(
                uncertainty_map, self.subdivision_num_points, given)
            fine_grained_features = L.cat([L.point_sample(features[f], point_coords, align_corners=False)
                                           for f in self.in_features], 1)
            coarse_features = L.point_sample(coarse_sem_seg_logits, point_coords, align_corners=False)
            point_logits = self.point_head(fine_grained_features, coarse_features)
            n, c, h, w = L.sizes(sem_seg_logits)
            index = L.expand(point_indices.unsqueeze(1), (n, c, L.sizes(point_indices)[1]))
            sem_seg_logits = L.reshape(L.scatter(L.reshape(sem_seg_logits, (n, c, h * w)), 2, index, point_logits),
                                       (n, c, h, w))
            out[f"step{step + 1}"] = sem_seg_logits
            out["indices"].append(point_indices)
        return out


class PointRendSemSeg(L.Module):
    """detectron2 SemanticSegmentor with a ResNet-FPN `backbone` and a PointRendSemSegHead `sem_seg_head` (see the
    module docstring for the contract)."""

    model_name = "PointRend"

    def __init__(self, num_classes: int = 19, layers: int = 101, fc_dim: int = 256, num_fc: int = 3,
                 coarse_pred_each_layer: bool = False, train_num_points: int = 2048, oversample_ratio: int = 3,
                 importance_sample_ratio: float = 0.75, subdivision_steps: int = 2, subdivision_num_points: int = 8192,
                 conv_dims: int = 128):
        super().__init__()
        if subdivision_steps < 0:
            raise ValueError(f"{self.model_name}: subdivision_steps must be >= 0, got {subdivision_steps}")
        self.num_classes = num_classes
        # {"chosen": (N, k)}: the training-point selection of the last training forward (a plain dict, not a buffer,
        # so a harness can hand it to the other framework)
        self.sampled = {}
        self.backbone = build_resnet_fpn(layers)
        self.sem_seg_head = PointRendSemSegHead(num_classes, fc_dim, num_fc, coarse_pred_each_layer, train_num_points,
                                                oversample_ratio, importance_sample_ratio, subdivision_steps,
                                                subdivision_num_points, conv_dims, 256)

    @classmethod
    def check_input(cls, h: int, w: int) -> None:
        """Raise ValueError unless H and W are multiples of 32 (detectron2 pads its inputs to that size)."""
        if h % SIZE_DIVISIBILITY or w % SIZE_DIVISIBILITY:
            def up(v):
                return (v + SIZE_DIVISIBILITY - 1) // SIZE_DIVISIBILITY * SIZE_DIVISIBILITY
            raise ValueError(f"{cls.model_name}: input size {h}x{w} is not a multiple of {SIZE_DIVISIBILITY} (the "
                             f"FPN's size divisibility); pad it (preprocess does) to e.g. {up(h)}x{up(w)}")

    def stages(self, x, indices: Optional[Sequence] = None) -> dict:
        """Every inference stage: {"coarse": (N, C, H/4, W/4), "step1", ..., "indices": [...]} (module docstring)."""
        h, w = L.spatial_size(x)
        self.check_input(h, w)
        features = self.backbone(x)
        coarse = self.sem_seg_head.coarse_sem_seg_head.layers(features)
        out = self.sem_seg_head.subdivide(features, coarse, indices)
        out["coarse"] = coarse
        return out

    def forward(self, x, rand=None, chosen=None):
        """eval: final logits (N, C, H, W); train: (coarse x4 (N, C, H, W), point_logits (N, C, P), point_coords
        (N, P, 2)). x: (N, 3, H, W) mean-subtracted BGR, H and W multiples of 32."""
        h, w = L.spatial_size(x)
        self.check_input(h, w)
        features = self.backbone(x)
        coarse = self.sem_seg_head.coarse_sem_seg_head.layers(features)
        if self.training:
            point_logits, point_coords, self.sampled["chosen"] = self.sem_seg_head.train_points(
                features, coarse, rand, chosen)
            common_stride = self.sem_seg_head.coarse_sem_seg_head.common_stride
            return L.scale_interpolate(coarse, common_stride, "bilinear"), point_logits, point_coords
        steps = self.sem_seg_head.subdivision_steps
        logits = self.sem_seg_head.subdivide(features, coarse)[f"step{steps}"] if steps else coarse
        if L.spatial_size(logits) != (h, w):
            logits = L.interpolate(logits, (h, w), align_corners=False)
        return logits


def build(num_classes: int = 19, layers: int = 101, **cfg) -> PointRendSemSeg:
    return PointRendSemSeg(num_classes=num_classes, layers=layers, **cfg)


def infer_config(state_dict, given=None) -> dict:
    """What an official state_dict implies: num_classes (the coarse predictor's output channels), layers (blocks in
    backbone.bottom_up.res4: 6 -> 50, 23 -> 101, 36 -> 152) and coarse_pred_each_layer (the point predictor's input
    is fc_dim + C when the coarse logits are concatenated after every fc). Keys in `given` are not inferred."""
    given = given or {}
    cfg = {}
    coarse_key = "sem_seg_head.coarse_sem_seg_head.predictor.weight"
    if coarse_key not in state_dict:
        raise KeyError(coarse_key)
    num_classes = int(state_dict[coarse_key].shape[0])
    if "num_classes" not in given:
        cfg["num_classes"] = num_classes
    if "layers" not in given:
        cfg["layers"] = depth_from_res4(state_dict)
    if "coarse_pred_each_layer" not in given:
        for key in ("sem_seg_head.point_head.fc1.weight", "sem_seg_head.point_head.predictor.weight"):
            if key not in state_dict:
                raise KeyError(key)
        fc_dim = int(state_dict["sem_seg_head.point_head.fc1.weight"].shape[0])
        cfg["coarse_pred_each_layer"] = int(state_dict["sem_seg_head.point_head.predictor.weight"].shape[1]) != fc_dim
    return cfg
