"""Framework vocabulary of the Paddle twin.

Same names and signatures as `torch_ref/layers.py`, so the model files of the two trees read alike line by line.
Two things here are NOT thin aliases, and every Paddle twin gets them from this one place:

* `BatchNorm2d` reproduces torch's TRAINING semantics, which Paddle's own `nn.BatchNorm2D` does not:
  - momentum is given in torch's convention (weight of the new batch statistic; Paddle's is 1 - that), and
  - the running variance is updated with the UNBIASED batch variance (Paddle updates it with the biased one, which
    after 3 training steps moves eval outputs by ~1e-2).
  Parameters/buffers are named `weight`, `bias`, `_mean`, `_variance` (Paddle's names), so a converted torch
  checkpoint loads with the converter's documented BN renames only.
* `Conv2d` maps torch's `bias=False` to Paddle's `bias_attr=False`.
"""
from __future__ import annotations

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

#: the framework of this tree (a model spec's `module("paddle")`)
FRAMEWORK = "paddle"

Module = nn.Layer
Sequential = nn.Sequential
ModuleList = nn.LayerList
ReLU = nn.ReLU
Dropout2d = nn.Dropout2D
MaxPool2d = nn.MaxPool2D
AdaptiveAvgPool2d = nn.AdaptiveAvgPool2D


def Conv2d(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
           dilation: int = 1, bias: bool = True) -> nn.Conv2D:
    """2-D convolution, weight (out, in, k, k) in both frameworks (no transpose when converting)."""
    return nn.Conv2D(in_channels, out_channels, kernel_size, stride=stride, padding=padding, dilation=dilation,
                     bias_attr=None if bias else False)


class BatchNorm2d(nn.Layer):
    """BatchNorm2d with PyTorch's training semantics (see the module docstring).

    `momentum` uses torch's convention (default 0.1). Forward output in training mode comes from Paddle's fused
    kernel using batch statistics (running buffers are passed as copies so the kernel cannot update them); the
    running statistics are then updated here explicitly:
        running_mean <- (1 - momentum) * running_mean + momentum * batch_mean
        running_var  <- (1 - momentum) * running_var  + momentum * batch_var_unbiased   (n / (n - 1) correction)
    """

    def __init__(self, num_features: int, momentum: float = 0.1, eps: float = 1e-5):
        super().__init__()
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"BatchNorm2d momentum must be in [0, 1] (torch convention), got {momentum}")
        self.num_features = num_features
        self.momentum = momentum
        self.eps = eps
        self.weight = self.create_parameter([num_features], default_initializer=nn.initializer.Constant(1.0))
        self.bias = self.create_parameter([num_features], is_bias=True,
                                          default_initializer=nn.initializer.Constant(0.0))
        self.register_buffer("_mean", paddle.zeros([num_features], dtype="float32"))
        self.register_buffer("_variance", paddle.ones([num_features], dtype="float32"))

    def forward(self, x):
        """x: (N, C, H, W) -> (N, C, H, W)."""
        if not self.training:
            variance = self._variance
            if x.dtype == paddle.float64:
                # Paddle's kernel takes epsilon as a float32 attribute (1e-5 -> 9.99999974738e-06); in float64 that
                # is 2.5e-13 too small, a relative error of 1.3e-13 / (var + eps) per layer, which a deep random
                # network amplifies (HRNet-W48: 2e-5 on features of |37|). Adding the difference to the variance
                # makes the kernel compute var + 1e-5 to float64 rounding.
                variance = variance + (self.eps - float(np.float32(self.eps)))
            return F.batch_norm(x, self._mean, variance, self.weight, self.bias, training=False,
                                epsilon=self.eps)
        if x.dtype == paddle.float64:
            # the kernel's float32 epsilon (see above) cannot be compensated with batch statistics: in float64 (the
            # alignment's dtype) the same normalisation is written out, and autograd differentiates it
            mean = paddle.mean(x, axis=[0, 2, 3], keepdim=True)
            var = paddle.mean((x - mean) ** 2, axis=[0, 2, 3], keepdim=True)
            out = (x - mean) / paddle.sqrt(var + self.eps) * self.weight.reshape([1, -1, 1, 1]) \
                + self.bias.reshape([1, -1, 1, 1])
        else:
            # Copies: Paddle's kernel updates the running tensors in place, with the biased variance.
            out = F.batch_norm(x, self._mean.detach().clone(), self._variance.detach().clone(), self.weight,
                               self.bias, training=True, momentum=1.0 - self.momentum, epsilon=self.eps)
        with paddle.no_grad():
            n = x.shape[0] * x.shape[2] * x.shape[3]
            if n < 2:
                raise ValueError(f"BatchNorm2d in training mode needs more than 1 value per channel, got input "
                                 f"shape {list(x.shape)}")
            batch_mean = paddle.mean(x, axis=[0, 2, 3])
            batch_var = paddle.var(x, axis=[0, 2, 3], unbiased=True)
            self._mean.set_value((1.0 - self.momentum) * self._mean + self.momentum * batch_mean)
            self._variance.set_value((1.0 - self.momentum) * self._variance + self.momentum * batch_var)
        return out

    def extra_repr(self) -> str:
        return f"{self.num_features}, momentum={self.momentum} (torch convention), eps={self.eps}"


def interpolate(x, size, align_corners: bool):
    """Bilinear resize of an NCHW tensor to `size` = (h, w). align_mode 0 = half-pixel, torch's False.

    float64 input goes through `_bilinear_float64`: Paddle's kernel computes the source-coordinate ratio in float32
    (2/3 -> 0.6666667), so a resize whose ratio is not exact in float32 lands ~1e-7 relative off torch's double
    computation -- which HRNet's fuse layers hit at sizes that are not multiples of 32 (measured 4.9e-8 of the
    logits at 96x96). In float32 both frameworks use a float32 ratio and the kernel is used."""
    size = [int(s) for s in size]
    if x.dtype == paddle.float64:
        return _bilinear_float64(x, size, align_corners)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners, align_mode=0)


def _source_taps(n_in: int, n_out: int, align_corners: bool):
    """torch's bilinear source indices and weights along one axis, in double precision: (i0, i1, w0, w1)."""
    d = np.arange(n_out, dtype=np.float64)
    if align_corners:
        scale = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
        src = scale * d
    else:
        src = np.maximum((n_in / n_out) * (d + 0.5) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = src - i0
    return i0, i1, 1.0 - w1, w1


def _bilinear_float64(x, size, align_corners: bool):
    """torch's bilinear resize (double-precision coordinates), as gathers and weighted sums: differentiable."""
    _, _, h, w = x.shape
    out = x
    for axis, n_in, n_out in ((2, int(h), size[0]), (3, int(w), size[1])):
        if n_in == n_out:
            continue
        i0, i1, w0, w1 = _source_taps(n_in, n_out, align_corners)
        shape = [1, 1, n_out, 1] if axis == 2 else [1, 1, 1, n_out]
        a = paddle.index_select(out, paddle.to_tensor(i0), axis=axis)
        b = paddle.index_select(out, paddle.to_tensor(i1), axis=axis)
        out = a * paddle.to_tensor(w0.reshape(shape)) + b * paddle.to_tensor(w1.reshape(shape))
    return out


def cat(tensors, dim: int):
    return paddle.concat(list(tensors), axis=dim)


def spatial_size(x) -> tuple[int, int]:
    """(H, W) of an NCHW tensor as python ints."""
    return int(x.shape[2]), int(x.shape[3])


def init_kaiming_(module: nn.Layer) -> None:
    """semseg's ResNet init: conv weights kaiming-normal (fan_out, relu), BN weight 1 and bias 0."""
    for m in module.sublayers(include_self=True):
        if isinstance(m, nn.Conv2D):
            fan_out = m.weight.shape[0] * m.weight.shape[2] * m.weight.shape[3]
            std = (2.0 / fan_out) ** 0.5
            m.weight.set_value(paddle.normal(0.0, std, m.weight.shape).astype(m.weight.dtype))
        elif isinstance(m, BatchNorm2d):
            m.weight.set_value(paddle.ones_like(m.weight))
            m.bias.set_value(paddle.zeros_like(m.bias))


def reshape(x, shape):
    return paddle.reshape(x, list(shape))


def bmm(a, b):
    """Batched matrix product (N, n, k) @ (N, k, m) -> (N, n, m)."""
    return paddle.bmm(a, b)


def softmax(x, dim: int):
    return F.softmax(x, axis=dim)


def swap_dims_1_2(x):
    """(N, A, B) -> (N, B, A)."""
    return paddle.transpose(x, [0, 2, 1])


def sizes(x) -> tuple:
    """Every dimension of a tensor as python ints."""
    return tuple(int(d) for d in x.shape)


def zeros_parameter(module, shape):
    """A trainable parameter of `shape` initialised to zeros (assign it to an attribute of `module`)."""
    return module.create_parameter(list(shape), default_initializer=nn.initializer.Constant(0.0))


def row_max(x):
    """max over the last axis, keepdim (N, A, B) -> (N, A, 1). Paddle's gradient goes to every tied maximum (torch's
    to one index); the two agree whenever the row maximum is unique."""
    return paddle.max(x, axis=-1, keepdim=True)


def relabel(target, old: int, new: int):
    """Integer label map with every `old` value replaced by `new` (a new tensor)."""
    return paddle.where(target == old, paddle.full_like(target, new), target)


#: normalisation layers: their parameters form the `norm_decay_mult` weight-decay group of the optimizer
NORM_LAYERS = (BatchNorm2d, nn.layer.norm._BatchNormBase, nn.GroupNorm, nn.LayerNorm)


def named_modules(model):
    """(name, module) of the model and every submodule, the model itself first with name ''."""
    return model.named_sublayers(include_self=True)


def own_parameters(module):
    """(name, parameter) of the module itself, not of its children."""
    return module.named_parameters(include_sublayers=False)


def param_groups_of(optimizer) -> list:
    """The optimizer's parameter groups: dicts with a 'params' list."""
    return optimizer._param_groups


# ---- loss vocabulary ------------------------------------------------------------------------------------------
no_grad = paddle.no_grad
where = paddle.where
zeros_like = paddle.zeros_like
full_like = paddle.full_like
logical_and = paddle.logical_and


def pixel_cross_entropy(logits, label, ignore_index: int, weight=None):
    """Per-pixel cross-entropy (N, H, W) over the class axis 1, 0 at ignored pixels; `weight`: per-class weights
    (a list) or None. axis=1: Paddle's default class axis is the LAST one (the image width for NCHW logits)."""
    w = None if weight is None else paddle.to_tensor(weight, dtype=logits.dtype)
    loss = F.cross_entropy(logits, label.astype("int64"), weight=w, ignore_index=ignore_index, reduction="none",
                           axis=1)
    return loss.squeeze(1) if loss.ndim == 4 else loss  # Paddle keeps the class axis as size 1


def as_dtype_of(x, ref):
    """`x` cast to the dtype of `ref`."""
    return x.astype(ref.dtype)


def clamp_min(x, low: float):
    return paddle.clip(x, min=low)


def take_class(prob, label):
    """prob (N, C, H, W), label (N, H, W) -> prob[n, label[n, h, w], h, w] of shape (N, H, W)."""
    return paddle.take_along_axis(prob, label.astype("int64").unsqueeze(1), axis=1).squeeze(1)


def sorted_values(x):
    """The values of a 1-D tensor in ascending order."""
    return paddle.sort(x)


# ---- detectron2 vocabulary (PointRend / Semantic FPN) -----------------------------------------------------------
class FrozenBatchNorm2d(nn.Layer):
    """detectron2's FrozenBatchNorm2d: a per-channel affine map fixed by four persistable BUFFERS (`weight`, `bias`,
    `running_mean`, `running_var`, torch's names: no `_mean`/`_variance` here; no parameters, no step counter),
    initialised to the identity (running_var = 1 - eps).

    forward: scale = weight * rsqrt(running_var + eps);  shift = bias - running_mean * scale;  y = x * scale + shift
    ALWAYS. detectron2 (and the torch twin) use this formula when the input requires grad and the fused eval-mode
    batch_norm otherwise; the two are the same map up to rounding, and Paddle's fused CPU batch_norm is the less
    precise one: ~5e-12 relative error in float64 (measured against numpy; the formula: ~1e-16), which grows to
    ~1e-9 relative on the logits of R-101 and would mask real differences in the float64 alignment.
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", paddle.ones([num_features], dtype="float32"), persistable=True)
        self.register_buffer("bias", paddle.zeros([num_features], dtype="float32"), persistable=True)
        self.register_buffer("running_mean", paddle.zeros([num_features], dtype="float32"), persistable=True)
        self.register_buffer("running_var", paddle.ones([num_features], dtype="float32") - eps, persistable=True)

    def forward(self, x):
        """x: (N, C, H, W) -> (N, C, H, W)."""
        scale = self.weight * paddle.rsqrt(self.running_var + self.eps)
        shift = self.bias - self.running_mean * scale
        return x * scale.reshape([1, -1, 1, 1]).astype(x.dtype) + shift.reshape([1, -1, 1, 1]).astype(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps} (frozen: buffers only)"


def GroupNorm(num_groups: int, num_channels: int, eps: float = 1e-5) -> nn.GroupNorm:
    """GroupNorm with affine `weight` / `bias` (ones / zeros)."""
    return nn.GroupNorm(num_groups, num_channels, epsilon=eps)


class NormConv2d(nn.Conv2D):
    """detectron2's `layers.Conv2d`: a conv whose own keys are `weight` (+ `bias`), with an optional child `norm` and
    an optional activation function, applied in that order: activation(norm(conv(x)))."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 bias: bool = True, norm=None, activation=None):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         bias_attr=None if bias else False)
        self.norm = norm
        self.activation = activation

    def forward(self, x):
        x = super().forward(x)
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x


def Conv1d(in_channels: int, out_channels: int, kernel_size: int = 1, bias: bool = True) -> nn.Conv1D:
    """1-D convolution, weight (out, in, k) in both frameworks."""
    return nn.Conv1D(in_channels, out_channels, kernel_size, bias_attr=None if bias else False)


def Upsample(scale_factor: int, mode: str) -> nn.Upsample:
    """Parameterless resize module by an integer factor: 'bilinear' (align_corners=False: align_mode 0, half-pixel)
    or 'nearest'."""
    return nn.Upsample(scale_factor=scale_factor, mode=mode, align_corners=False, align_mode=0)


def scale_interpolate(x, scale_factor: int, mode: str):
    """NCHW resize by an integer factor: 'bilinear' (align_corners=False, half-pixel) or 'nearest' (floor)."""
    return F.interpolate(x, scale_factor=scale_factor, mode=mode, align_corners=False, align_mode=0)


def relu(x):
    return F.relu(x)


def max_pool2d(x, kernel_size: int, stride: int, padding: int = 0):
    return F.max_pool2d(x, kernel_size, stride, padding)


def point_sample(input, coords, align_corners: bool = False, mode: str = "bilinear"):
    """detectron2's point_sample for (N, P, 2) coords in [0, 1]^2 (x, y): grid_sample of input (N, C, H, W) at
    2 * coords - 1 with zero padding -> (N, C, P). align_corners is passed explicitly: Paddle's default is True."""
    grid = (2.0 * coords - 1.0).unsqueeze(2)
    return F.grid_sample(input, grid, mode=mode, padding_mode="zeros", align_corners=align_corners).squeeze(3)


def topk(x, k: int, dim: int):
    """(values, int64 indices) of the k largest entries along `dim`, largest first."""
    values, indices = paddle.topk(x, k, axis=dim)
    return values, indices


def take_along(x, index, dim: int):
    """x gathered along `dim` at an int64 `index` of the same rank (index broadcast over the other dims)."""
    return paddle.take_along_axis(x, index, axis=dim)


def scatter(x, dim: int, index, src):
    """A copy of x with x[..., index[..., j], ...] = src[..., j, ...] along `dim` (index and src of the same shape)."""
    return paddle.put_along_axis(x, index, src, axis=dim)


def expand(x, shape):
    """x broadcast to `shape` (-1 keeps a dimension), no copy."""
    return paddle.expand(x, list(shape))


def stack(tensors, dim: int):
    return paddle.stack(list(tensors), axis=dim)


def rand(shape, like):
    """Uniform [0, 1) samples of `shape` with the dtype of `like`, from the framework's generator."""
    return paddle.rand(list(shape), dtype=like.dtype)


def as_int64(x):
    return x.astype("int64")


def from_numpy(a):
    """A framework tensor holding a copy of the numpy array `a`."""
    return paddle.to_tensor(a.copy())


def _fans(weight) -> tuple:
    """(fan_in, fan_out) of a conv weight (out, in, *kernel), as torch.nn.init computes them."""
    receptive = 1
    for d in weight.shape[2:]:
        receptive *= int(d)
    return int(weight.shape[1]) * receptive, int(weight.shape[0]) * receptive


def init_c2_msra_(module) -> None:
    """fvcore's c2_msra_fill of a conv's OWN weight/bias: kaiming-normal (fan_out, relu) weight, zero bias."""
    _, fan_out = _fans(module.weight)
    std = (2.0 / fan_out) ** 0.5
    module.weight.set_value(paddle.normal(0.0, std, module.weight.shape).astype(module.weight.dtype))
    if module.bias is not None:
        module.bias.set_value(paddle.zeros_like(module.bias))


def init_c2_xavier_(module) -> None:
    """fvcore's c2_xavier_fill of a conv's OWN weight/bias: kaiming-uniform (a=1, i.e. bound sqrt(3 / fan_in))
    weight, zero bias."""
    fan_in, _ = _fans(module.weight)
    bound = (3.0 / fan_in) ** 0.5
    module.weight.set_value(paddle.uniform(module.weight.shape, dtype=module.weight.dtype, min=-bound, max=bound))
    if module.bias is not None:
        module.bias.set_value(paddle.zeros_like(module.bias))


def init_normal_(param, std: float) -> None:
    """param <- N(0, std^2)."""
    param.set_value(paddle.normal(0.0, std, param.shape).astype(param.dtype))


def init_constant_(param, value: float) -> None:
    param.set_value(paddle.full_like(param, value))


# ---- RMI loss vocabulary (paddle_impl/rmi.py) -------------------------------------------------------------------
def permute(x, dims):
    """x with its axes reordered: output axis i is input axis dims[i]."""
    return paddle.transpose(x, list(dims))


def one_hot(label, num_classes: int, like):
    """int64 labels (...) in [0, num_classes) -> one-hot (..., num_classes) with the dtype of `like` (Paddle's
    one_hot gives float32 and no gradient)."""
    return F.one_hot(label, num_classes).astype(like.dtype)


def bce_with_logits_sum(logits, target, weight):
    """Sigmoid binary cross-entropy of `logits` against `target`, times `weight` (broadcast), summed."""
    return F.binary_cross_entropy_with_logits(logits, target, weight=weight, reduction="sum")


def avg_pool2d_with_pad(x, kernel_size: int, stride: int, padding: int):
    """Average pooling of NCHW x with zero padding COUNTED in the divisor (always kernel_size ** 2), floor mode:
    exclusive=False (Paddle's default, exclusive=True, divides by the unpadded count)."""
    return F.avg_pool2d(x, kernel_size, stride, padding, ceil_mode=False, exclusive=False)


def interpolate_nearest(x, size):
    """Nearest resize of an NCHW tensor to `size` = (h, w): source index floor(dst * in / out)."""
    return F.interpolate(x, size=[int(s) for s in size], mode="nearest")


def _align_corners_taps(n_in: int, n_out: int) -> tuple:
    """Per output position of a 1-D align_corners resize: (lower source index, upper source index, upper weight),
    the coordinate dst * (n_in - 1) / (n_out - 1) computed in double precision as torch's CPU kernel does."""
    ratio = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    lower, upper, weight = [], [], []
    for dst in range(n_out):
        src = ratio * dst
        lo = int(src)
        lower.append(lo)
        upper.append(min(lo + 1, n_in - 1))
        weight.append(src - lo)
    return lower, upper, weight


def resize_bilinear_align_corners(x, size):
    """Bilinear resize of an NCHW tensor to `size` = (h, w) with align_corners=True (corner pixels map onto each
    other: source coordinate dst * (in - 1) / (out - 1)). Written out with index_select: Paddle's own bilinear
    kernel computes that ratio in float32 (17/3 -> 5.6666665), ~1e-7 relative off torch even in float64. Columns
    are blended first, then rows, torch's CPU order."""
    h, w = int(x.shape[2]), int(x.shape[3])
    r0, r1, fr = _align_corners_taps(h, int(size[0]))
    c0, c1, fc = _align_corners_taps(w, int(size[1]))
    fc = paddle.to_tensor(fc, dtype=x.dtype).reshape([1, 1, 1, -1])
    fr = paddle.to_tensor(fr, dtype=x.dtype).reshape([1, 1, -1, 1])
    cols = (paddle.index_select(x, paddle.to_tensor(c0, dtype="int64"), axis=3) * (1.0 - fc)
            + paddle.index_select(x, paddle.to_tensor(c1, dtype="int64"), axis=3) * fc)
    return (paddle.index_select(cols, paddle.to_tensor(r0, dtype="int64"), axis=2) * (1.0 - fr)
            + paddle.index_select(cols, paddle.to_tensor(r1, dtype="int64"), axis=2) * fr)


def eye(n: int, like):
    """The n x n identity with the dtype of `like`."""
    return paddle.eye(n, dtype=like.dtype)


def inverse(x):
    """Inverse of square matrices (..., n, n)."""
    return paddle.linalg.inv(x)


def cholesky(x):
    """Lower Cholesky factor of symmetric positive definite matrices (..., n, n)."""
    return paddle.linalg.cholesky(x)


def diagonal(x):
    """Diagonals of matrices (..., n, n) -> (..., n)."""
    return paddle.diagonal(x, axis1=-2, axis2=-1)


def as_float64(x):
    return x.astype("float64")


# ---- HRNetV2 + Polarized Self-Attention vocabulary (backbones/hrnet.py) -----------------------------------------
Sigmoid = nn.Sigmoid

#: the classes `backbones.hrnet.init_weights` re-initialises: every 2-D conv, every BatchNorm (SyncBN included)
CONV2D_LAYERS = (nn.Conv2D,)
BATCHNORM_LAYERS = (BatchNorm2d, nn.layer.norm._BatchNormBase)


class LayerNorm(nn.LayerNorm):
    """torch's nn.LayerNorm over the trailing dims `normalized_shape` (e.g. (C, 1, 1)): weight/bias of THAT shape
    (Paddle's own LayerNorm flattens them to one axis, which would change the checkpoint shapes), ones/zeros.
    Still a `paddle.nn.LayerNorm`, so it stays in NORM_LAYERS."""

    def __init__(self, normalized_shape, eps: float = 1e-5):
        super().__init__(list(normalized_shape), epsilon=eps)
        shape = [int(d) for d in normalized_shape]
        self.weight = self.create_parameter(shape, default_initializer=nn.initializer.Constant(1.0))
        self.bias = self.create_parameter(shape, is_bias=True, default_initializer=nn.initializer.Constant(0.0))

    def forward(self, x):
        if x.dtype == paddle.float64:
            # Paddle's kernel takes epsilon as a float32 attribute (see BatchNorm2d): written out in float64
            axes = list(range(x.ndim - len(self._normalized_shape), x.ndim))
            mean = paddle.mean(x, axis=axes, keepdim=True)
            var = paddle.mean((x - mean) ** 2, axis=axes, keepdim=True)
            return (x - mean) / paddle.sqrt(var + self._epsilon) * self.weight + self.bias
        return F.layer_norm(x, self._normalized_shape, weight=self.weight.flatten(), bias=self.bias.flatten(),
                            epsilon=self._epsilon)


def sigmoid(x):
    return F.sigmoid(x)


def matmul(a, b):
    """Matrix product with broadcasting over the leading dims ((N, n, k) @ (N, k, m) -> (N, n, m))."""
    return paddle.matmul(a, b)


def init_kaiming_normal_(param, mode: str) -> None:
    """param <- kaiming-normal for ReLU (a=0): N(0, 2 / fan), fan = `mode` ('fan_in' or 'fan_out')."""
    fan_in, fan_out = _fans(param)
    fan = {"fan_in": fan_in, "fan_out": fan_out}[mode]
    param.set_value(paddle.normal(0.0, (2.0 / fan) ** 0.5, param.shape).astype(param.dtype))


def init_torch_default_bias_(conv) -> None:
    """A conv's bias (when it has one) as torch's Conv2d initialises it: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (Paddle's
    own default is zeros)."""
    if conv.bias is not None:
        fan_in, _ = _fans(conv.weight)
        bound = 1.0 / fan_in ** 0.5
        conv.bias.set_value(paddle.uniform(conv.bias.shape, dtype=conv.bias.dtype, min=-bound, max=bound))


def exact_divide(a, b):
    """a / b correctly rounded (IEEE), as torch's and numpy's divide. Paddle's CPU divide kernel is not: its vectorised
    path leaves ~0.1% of float64 quotients (float32: ~0.3%) one ulp off, on elements that depend on the buffer's
    alignment (tests/test_metric_step.py measures it). For small tensors compared exactly (the metrics); the result
    is not differentiable."""
    a_np, b_np = np.broadcast_arrays(a.numpy(), b.numpy())
    return paddle.to_tensor(np.divide(a_np, b_np).astype(a_np.dtype), place=a.place)


# ---- DANet's memory-efficient position attention (models/danet.py, pam_impl="efficient") ------------------------
#: the byte budget of one block's (N, rows, HW) energy map in `position_attention`: rows of the query per block =
#: max(1, PAM_BLOCK_BYTES // (N * HW * itemsize)); 64 MiB is 512 rows of a 128x256 map (N=1, float32)
PAM_BLOCK_BYTES = 64 * 2 ** 20


def _attend_rows(query_rows, key, value):
    """One block of `position_attention`: query_rows (N, B, d) -> (N, C, B). Its maps are locals, released on
    return (when autograd does not keep them)."""
    attention = F.softmax(paddle.matmul(query_rows, key), axis=-1)               # (N, B, HW)
    return paddle.matmul(value, attention, transpose_y=True)


def position_attention(query, key, value):
    """DANet's position attention without the whole (N, HW, HW) map at once.

    query (N, HW, d), key (N, d, HW), value (N, C, HW) -> (N, C, HW), where
        out[n, c, p] = sum_j value[n, c, j] * softmax_j(query[n, p, :] . key[n, :, j])
    with no 1/sqrt(d) scaling and the softmax over the keys j: the reference path's
    bmm(value, softmax(bmm(query, key), -1)^T), equal to it up to rounding.

    Paddle's fused attention kernels are GPU-only, so this goes by blocks of query rows: for rows p0..p1 the energy
    (N, B, HW) and its softmax are formed, multiplied into value, and the (N, C, B) pieces concatenated. Each row's
    softmax needs that row only, so the blocks are exact. B = max(1, PAM_BLOCK_BYTES // (N * HW * itemsize)).

    Memory: under no_grad (inference) at most one block's energy and attention are alive, about 2 * PAM_BLOCK_BYTES,
    plus the output and its pieces (2 x N * C * HW). With gradients it is NOT memory-efficient: autograd keeps every
    block's attention for the backward, i.e. the whole (N, HW, HW) map in pieces, as the reference keeps it; what is
    saved is the reference's full-size energy map and the transposed copy of its attention.
    Measured (Paddle 3.3.1 CPU, 1 thread): PAM(64) on a (1, 64, 64, 128) input, HW = 8192, one map 256 MiB in
    float32 and 512 MiB in float64, the default budget (4 blocks in float32, 8 in float64); peak RSS growth over the
    call read from /proc/self/status (VmHWM) in a fresh process:
        float32  no_grad forward: reference 782 MiB, this 142 MiB;   forward + backward: 1055 MiB vs 608 MiB
        float64  no_grad forward: reference 1554 MiB, this 147 MiB;  forward + backward: 2072 MiB vs 1121 MiB
    """
    n, hw = int(query.shape[0]), int(query.shape[1])
    rows = max(1, PAM_BLOCK_BYTES // (n * hw * query.element_size()))
    if rows >= hw:
        return _attend_rows(query, key, value)
    return paddle.concat([_attend_rows(query[:, start:start + rows, :], key, value)
                          for start in range(0, hw, rows)], axis=2)
