"""Framework vocabulary of the torch reference.

`torch_ref/layers.py` and `paddle_impl/layers.py` export the SAME names with the same signatures, so the model files
of the two trees read alike line by line (the twin rule). On this side every name is PyTorch's own module or function;
nothing here changes numerics.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

#: the framework of this tree (a model spec's `module("torch")`)
FRAMEWORK = "torch"

Module = nn.Module
Sequential = nn.Sequential
ModuleList = nn.ModuleList
ReLU = nn.ReLU
Dropout2d = nn.Dropout2d
MaxPool2d = nn.MaxPool2d
AdaptiveAvgPool2d = nn.AdaptiveAvgPool2d


def Conv2d(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
           dilation: int = 1, bias: bool = True) -> nn.Conv2d:
    """2-D convolution, weight (out, in, k, k) in both frameworks (no transpose when converting)."""
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, dilation=dilation,
                     bias=bias)


def BatchNorm2d(num_features: int, momentum: float = 0.1, eps: float = 1e-5) -> nn.BatchNorm2d:
    """BatchNorm in torch's convention: `momentum` is the weight of the NEW batch statistic."""
    return nn.BatchNorm2d(num_features, eps=eps, momentum=momentum)


def interpolate(x: torch.Tensor, size, align_corners: bool) -> torch.Tensor:
    """Bilinear resize of an NCHW tensor to `size` = (h, w)."""
    return F.interpolate(x, size=tuple(int(s) for s in size), mode="bilinear", align_corners=align_corners)


def cat(tensors, dim: int) -> torch.Tensor:
    return torch.cat(list(tensors), dim)


def spatial_size(x) -> tuple[int, int]:
    """(H, W) of an NCHW tensor as python ints."""
    return int(x.shape[2]), int(x.shape[3])


def init_kaiming_(module: nn.Module) -> None:
    """semseg's ResNet init: conv weights kaiming-normal (fan_out, relu), BN weight 1 and bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1.0)
            nn.init.constant_(m.bias, 0.0)


def reshape(x, shape):
    return x.reshape(list(shape))


def bmm(a, b):
    """Batched matrix product (N, n, k) @ (N, k, m) -> (N, n, m)."""
    return torch.bmm(a, b)


def softmax(x, dim: int):
    return F.softmax(x, dim=dim)


def swap_dims_1_2(x):
    """(N, A, B) -> (N, B, A)."""
    return x.transpose(1, 2)


def sizes(x) -> tuple:
    """Every dimension of a tensor as python ints."""
    return tuple(int(d) for d in x.shape)


def zeros_parameter(module, shape):
    """A trainable parameter of `shape` initialised to zeros (assign it to an attribute of `module`)."""
    return nn.Parameter(torch.zeros(tuple(shape)))


def row_max(x):
    """max over the last axis, keepdim (N, A, B) -> (N, A, 1). torch.max(dim) sends the gradient to ONE index."""
    return torch.max(x, -1, keepdim=True)[0]


def relabel(target, old: int, new: int):
    """Integer label map with every `old` value replaced by `new` (a new tensor)."""
    return target.masked_fill(target == old, new)


#: normalisation layers: their parameters form the `norm_decay_mult` weight-decay group of the optimizer
NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


def named_modules(model):
    """(name, module) of the model and every submodule, the model itself first with name ''."""
    return model.named_modules()


def own_parameters(module):
    """(name, parameter) of the module itself, not of its children."""
    return module.named_parameters(recurse=False)


def param_groups_of(optimizer) -> list:
    """The optimizer's parameter groups: dicts with a 'params' list."""
    return optimizer.param_groups


# ---- loss vocabulary ------------------------------------------------------------------------------------------
no_grad = torch.no_grad
where = torch.where
zeros_like = torch.zeros_like
full_like = torch.full_like
logical_and = torch.logical_and


def pixel_cross_entropy(logits, label, ignore_index: int, weight=None):
    """Per-pixel cross-entropy (N, H, W) over the class axis 1, 0 at ignored pixels; `weight`: per-class weights
    (a list) or None."""
    w = None if weight is None else torch.tensor(weight, dtype=logits.dtype, device=logits.device)
    return F.cross_entropy(logits, label.long(), weight=w, ignore_index=ignore_index, reduction="none")


def as_dtype_of(x, ref):
    """`x` cast to the dtype of `ref`."""
    return x.to(ref.dtype)


def clamp_min(x, low: float):
    return torch.clamp(x, min=low)


def take_class(prob, label):
    """prob (N, C, H, W), label (N, H, W) -> prob[n, label[n, h, w], h, w] of shape (N, H, W)."""
    return torch.gather(prob, 1, label.long().unsqueeze(1)).squeeze(1)


def sorted_values(x):
    """The values of a 1-D tensor in ascending order."""
    return torch.sort(x)[0]


# ---- detectron2 vocabulary (PointRend / Semantic FPN) -----------------------------------------------------------
class FrozenBatchNorm2d(nn.Module):
    """detectron2's FrozenBatchNorm2d: a per-channel affine map fixed by four BUFFERS (`weight`, `bias`,
    `running_mean`, `running_var`; no parameters, no step counter), initialised to the identity (running_var = 1 - eps).

    forward, as detectron2 does it: when the input requires grad (training, or eval outside no_grad)
        scale = weight * rsqrt(running_var + eps);  shift = bias - running_mean * scale;  y = x * scale + shift
    otherwise (inference under no_grad) the fused eval-mode batch_norm with the same four tensors. The two agree to
    rounding (float32: ~1e-7 relative per layer, ~2e-5 after the 104 layers of R-101 on random weights).
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features) - eps)

    def forward(self, x):
        """x: (N, C, H, W) -> (N, C, H, W)."""
        if not x.requires_grad:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, training=False,
                                eps=self.eps)
        scale = self.weight * torch.rsqrt(self.running_var + self.eps)
        shift = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1).to(x.dtype) + shift.reshape(1, -1, 1, 1).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps} (frozen: buffers only)"


def GroupNorm(num_groups: int, num_channels: int, eps: float = 1e-5) -> nn.GroupNorm:
    """GroupNorm with affine `weight` / `bias` (ones / zeros)."""
    return nn.GroupNorm(num_groups, num_channels, eps=eps)


class NormConv2d(nn.Conv2d):
    """detectron2's `layers.Conv2d`: a conv whose own keys are `weight` (+ `bias`), with an optional child `norm` and
    an optional activation function, applied in that order: activation(norm(conv(x)))."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 bias: bool = True, norm=None, activation=None):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias)
        self.norm = norm
        self.activation = activation

    def forward(self, x):
        x = super().forward(x)
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x


def Conv1d(in_channels: int, out_channels: int, kernel_size: int = 1, bias: bool = True) -> nn.Conv1d:
    """1-D convolution, weight (out, in, k) in both frameworks."""
    return nn.Conv1d(in_channels, out_channels, kernel_size, bias=bias)


def Upsample(scale_factor: int, mode: str) -> nn.Upsample:
    """Parameterless resize module by an integer factor: 'bilinear' (align_corners=False) or 'nearest'."""
    return nn.Upsample(scale_factor=scale_factor, mode=mode, align_corners=False if mode == "bilinear" else None)


def scale_interpolate(x, scale_factor: int, mode: str):
    """NCHW resize by an integer factor: 'bilinear' (align_corners=False, half-pixel) or 'nearest' (floor)."""
    return F.interpolate(x, scale_factor=scale_factor, mode=mode, align_corners=False if mode == "bilinear" else None)


def relu(x):
    return F.relu(x)


def max_pool2d(x, kernel_size: int, stride: int, padding: int = 0):
    return F.max_pool2d(x, kernel_size, stride, padding)


def point_sample(input, coords, align_corners: bool = False, mode: str = "bilinear"):
    """detectron2's point_sample for (N, P, 2) coords in [0, 1]^2 (x, y): grid_sample of input (N, C, H, W) at
    2 * coords - 1 with zero padding -> (N, C, P)."""
    grid = (2.0 * coords - 1.0).unsqueeze(2)
    return F.grid_sample(input, grid, mode=mode, padding_mode="zeros", align_corners=align_corners).squeeze(3)


def topk(x, k: int, dim: int):
    """(values, int64 indices) of the k largest entries along `dim`, largest first."""
    values, indices = torch.topk(x, k, dim=dim)
    return values, indices


def take_along(x, index, dim: int):
    """x gathered along `dim` at an int64 `index` of the same rank (index broadcast over the other dims)."""
    return torch.take_along_dim(x, index, dim=dim)


def scatter(x, dim: int, index, src):
    """A copy of x with x[..., index[..., j], ...] = src[..., j, ...] along `dim` (index and src of the same shape)."""
    return x.scatter(dim, index, src)


def expand(x, shape):
    """x broadcast to `shape` (-1 keeps a dimension), no copy."""
    return x.expand(*shape)


def stack(tensors, dim: int):
    return torch.stack(list(tensors), dim=dim)


def rand(shape, like):
    """Uniform [0, 1) samples of `shape` with the dtype (and device) of `like`, from the framework's generator."""
    return torch.rand(tuple(shape), dtype=like.dtype, device=like.device)


def as_int64(x):
    return x.to(torch.int64)


def from_numpy(a):
    """A framework tensor holding a copy of the numpy array `a`."""
    return torch.from_numpy(a.copy())


def init_c2_msra_(module) -> None:
    """fvcore's c2_msra_fill of a conv's OWN weight/bias: kaiming-normal (fan_out, relu) weight, zero bias."""
    nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    if module.bias is not None:
        nn.init.constant_(module.bias, 0.0)


def init_c2_xavier_(module) -> None:
    """fvcore's c2_xavier_fill of a conv's OWN weight/bias: kaiming-uniform (a=1, i.e. bound sqrt(3 / fan_in))
    weight, zero bias."""
    nn.init.kaiming_uniform_(module.weight, a=1)
    if module.bias is not None:
        nn.init.constant_(module.bias, 0.0)


def init_normal_(param, std: float) -> None:
    """param <- N(0, std^2)."""
    nn.init.normal_(param, std=std)


def init_constant_(param, value: float) -> None:
    nn.init.constant_(param, value)


# ---- RMI loss vocabulary (torch_ref/rmi.py) ---------------------------------------------------------------------
def permute(x, dims):
    """x with its axes reordered: output axis i is input axis dims[i]."""
    return x.permute(*dims)


def one_hot(label, num_classes: int, like):
    """int64 labels (...) in [0, num_classes) -> one-hot (..., num_classes) with the dtype (and device) of `like`."""
    return F.one_hot(label, num_classes).to(like.dtype)


def bce_with_logits_sum(logits, target, weight):
    """Sigmoid binary cross-entropy of `logits` against `target`, times `weight` (broadcast), summed."""
    return F.binary_cross_entropy_with_logits(logits, target, weight=weight, reduction="sum")


def avg_pool2d_with_pad(x, kernel_size: int, stride: int, padding: int):
    """Average pooling of NCHW x with zero padding COUNTED in the divisor (always kernel_size ** 2), floor mode:
    torch's default count_include_pad=True."""
    return F.avg_pool2d(x, kernel_size, stride, padding, ceil_mode=False, count_include_pad=True)


def interpolate_nearest(x, size):
    """Nearest resize of an NCHW tensor to `size` = (h, w): source index floor(dst * in / out)."""
    return F.interpolate(x, size=tuple(int(s) for s in size), mode="nearest")


def resize_bilinear_align_corners(x, size):
    """Bilinear resize of an NCHW tensor to `size` = (h, w) with align_corners=True (corner pixels map onto each
    other: source coordinate dst * (in - 1) / (out - 1))."""
    return F.interpolate(x, size=tuple(int(s) for s in size), mode="bilinear", align_corners=True)


def eye(n: int, like):
    """The n x n identity with the dtype (and device) of `like`."""
    return torch.eye(n, dtype=like.dtype, device=like.device)


def inverse(x):
    """Inverse of square matrices (..., n, n)."""
    return torch.linalg.inv(x)


def cholesky(x):
    """Lower Cholesky factor of symmetric positive definite matrices (..., n, n)."""
    return torch.linalg.cholesky(x)


def diagonal(x):
    """Diagonals of matrices (..., n, n) -> (..., n)."""
    return torch.diagonal(x, dim1=-2, dim2=-1)


def as_float64(x):
    return x.to(torch.float64)


# ---- HRNetV2 + Polarized Self-Attention vocabulary (backbones/hrnet.py) -----------------------------------------
Sigmoid = nn.Sigmoid

#: the classes `backbones.hrnet.init_weights` re-initialises: every 2-D conv, every BatchNorm (SyncBN included)
CONV2D_LAYERS = (nn.Conv2d,)
BATCHNORM_LAYERS = (nn.modules.batchnorm._BatchNorm,)


def LayerNorm(normalized_shape, eps: float = 1e-5) -> nn.LayerNorm:
    """LayerNorm over the trailing dims `normalized_shape` (e.g. (C, 1, 1)); weight/bias of THAT shape, ones/zeros."""
    return nn.LayerNorm(list(normalized_shape), eps=eps)


def sigmoid(x):
    return torch.sigmoid(x)


def matmul(a, b):
    """Matrix product with broadcasting over the leading dims ((N, n, k) @ (N, k, m) -> (N, n, m))."""
    return torch.matmul(a, b)


def init_kaiming_normal_(param, mode: str) -> None:
    """param <- kaiming-normal for ReLU (a=0): N(0, 2 / fan), fan = `mode` ('fan_in' or 'fan_out')."""
    nn.init.kaiming_normal_(param, mode=mode, nonlinearity="relu")


def init_torch_default_bias_(conv) -> None:
    """A conv's bias (when it has one) as torch's Conv2d initialises it: U(-1/sqrt(fan_in), 1/sqrt(fan_in)). Here a
    no-op: torch drew it so at construction, and drawing nothing keeps the random stream identical to upstream's."""


def exact_divide(a, b):
    """a / b correctly rounded (IEEE): torch's divide is (its twin in paddle_impl/layers.py needs numpy for it)."""
    return a / b


# ---- DANet's memory-efficient position attention (models/danet.py, pam_impl="efficient") ------------------------
def position_attention(query, key, value):
    """DANet's position attention without the (N, HW, HW) map.

    query (N, HW, d), key (N, d, HW), value (N, C, HW) -> (N, C, HW), where
        out[n, c, p] = sum_j value[n, c, j] * softmax_j(query[n, p, :] . key[n, :, j])
    with no 1/sqrt(d) scaling (scale=1.0) and the softmax over the keys j: the reference path's
    bmm(value, softmax(bmm(query, key), -1)^T), equal to it up to rounding.

    It is torch's scaled_dot_product_attention, shaped so that the CPU dispatcher of torch 2.13 selects the fused
    flash kernel (`_scaled_dot_product_flash_attention_for_cpu`, and `..._for_cpu_backward` for the gradients). That
    kernel walks the map tile by tile with a running softmax (max and sum per query row); forward and backward keep
    O(HW * C) memory, never an (HW x HW) map, in float32 and in float64 alike (the backward recomputes the tiles).

    The fused CPU kernel takes only 4-D (batch, heads, L, E) inputs with stride 1 along E and the SAME E for query,
    key and value; otherwise the dispatcher silently falls back to `_scaled_dot_product_attention_math`, which
    builds the whole map. The direct call -- q = query, k = key^T (N, HW, d), v = value^T (N, HW, C), C = 8d -- is
    such a case in every dtype and mode (measured on the function alone at HW = 8192, C = 64: 583 MiB float32 / 1095
    MiB float64 of peak growth in a no_grad forward, 786 / 1557 MiB with the backward, the reference's order of
    magnitude), and so is the module's own query, a transposed view (stride HW along d). Here query and key are
    copied into (N, 1, HW, C) tensors, zero beyond their d channels: a zero channel adds exact zeros to every dot
    product, so the energies are unchanged and one "head" of width C carries the value. The cost: the energy is
    computed over C channels instead of d (about twice the arithmetic of the reference in all) and two (N, HW, C)
    copies. Splitting the value into C / d heads of width d instead was slower (1.5x the reference's time forward at
    HW = 4096, C = 512, against 1.3x for this, 1 thread): it takes the softmax's exponentials once per head.

    Measured (torch 2.13 CPU, 1 thread): PAM(64) on a (1, 64, 64, 128) input, HW = 8192, one map 256 MiB in float32
    and 512 MiB in float64; peak RSS growth over the call read from /proc/self/status (VmHWM) in a fresh process;
    torch.profiler names the flash kernel in every case below:
        float32  no_grad forward: reference 526 MiB, this 17 MiB;   forward + backward: 1047 MiB vs 44 MiB
        float64  no_grad forward: reference 1046 MiB, this 28 MiB;  forward + backward: 2092 MiB vs 66 MiB
    PAM(512) at (1, 512, 64, 128), float32, no_grad: about the reference's time (1.05 s vs 1.16 s).
    Other devices dispatch by their own kernels' rules (not measured here).
    """
    c, d = int(value.shape[1]), int(query.shape[2])
    q = F.pad(query, (0, c - d)).unsqueeze(1)                                     # (N, 1, HW, C), contiguous
    k = F.pad(key.transpose(1, 2), (0, c - d)).unsqueeze(1)                       # (N, 1, HW, C)
    v = value.transpose(1, 2).contiguous().unsqueeze(1)                           # (N, 1, HW, C)
    return F.scaled_dot_product_attention(q, k, v, scale=1.0).squeeze(1).transpose(1, 2)
