"""Framework vocabulary of the torch reference.

`torch_ref/layers.py` and `paddle_impl/layers.py` export the SAME names with the same signatures, so the model files
of the two trees read alike line by line (the twin rule). On this side every name is PyTorch's own module or function;
nothing here changes numerics.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

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
