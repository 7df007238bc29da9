"""Fused PSA aggregation of PSANet for PaddlePaddle: the attention of one PSA branch without the (N, H*W, H*W) map.

    from paddle_impl.ops.psa_attend import psa_attend
    out = psa_attend(feat, attn_logits, "collect", 59)     # feat (N, C, H, W), attn_logits (N, 59*59, H, W)

equals the reference path (semseg's PSA, kept as `psa_attend_reference`)

    bmm(feat.view(N, C, HW), softmax(psa_mask(attn_logits), dim=1).view(N, HW, HW)).view(N, C, H, W) / nf

with semseg's semantics: pairs outside the window enter the softmax as logit 0 (not -inf). impl="fused" runs the
compiled kernels (CPU: custom_ops/include/psa_attend_cpu.h; CUDA, in builds with the CUDA kernels:
custom_ops/cuda/psa_attend.cu; memory O(N*C*HW + N*mask*HW), no HW x HW buffer); impl="reference" the path above.
The fused kernels implement the softmax form on float32/float64 tensors on the CPU or, when the build has the CUDA
kernels, on one CUDA device; softmax=False, another device or dtype, or an unavailable build take the reference path
with a one-time warning that says why. Twin of torch_ref/ops/psa_attend.py.
"""
from __future__ import annotations

import warnings

import paddle
from paddle.jit.marker import unified

from custom_ops import build as _build
from custom_ops.psa_mask_common import normalize_mask_size, normalize_psa_type

from .psa_mask import _device_problem, load_op, psa_mask

__all__ = ["psa_attend", "psa_attend_reference", "ATTEND_IMPLS"]

ATTEND_IMPLS = ("fused", "reference")
_warned: set = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def psa_attend_reference(feat, attn_logits, psa_type, mask_size, softmax: bool = True,
                         normalization_factor: float = 1.0, mask_impl: str = "auto"):
    """The reference path: psa_mask, softmax over the H*W source axis, bmm (an (N, HW, HW) map in memory)."""
    n, c, h, w = [int(v) for v in feat.shape]
    y = psa_mask(attn_logits, psa_type, mask_size, impl=mask_impl)
    if softmax:
        y = paddle.nn.functional.softmax(y, axis=1)
    out = paddle.bmm(feat.reshape([n, c, h * w]), y.reshape([n, h * w, h * w]))
    return out.reshape([n, c, h, w]) * (1.0 / normalization_factor)


def _fused_problem(feat, attn_logits, softmax: bool):
    """Why the fused kernels cannot take this call (None when they can). Whether the build has kernels for a
    non-CPU device is asked once the op is loaded (psa_mask's _device_problem)."""
    if not softmax:
        return "softmax=False: the fused kernels implement the softmax form only"
    # A static program (paddle.jit.to_static / jit.save) has no place yet: the op goes into the graph and its kernel
    # checks the place when the program runs, as psa_mask does.
    if paddle.in_dynamic_mode() and (str(feat.device) != "cpu" or str(attn_logits.device) != "cpu"):
        if str(feat.device) != str(attn_logits.device):
            return (f"the fused kernels take feat and attn_logits on one device, got {feat.device} and "
                    f"{attn_logits.device}")
    if feat.dtype not in (paddle.float32, paddle.float64) or attn_logits.dtype != feat.dtype:
        return f"the fused kernels take float32 or float64 (one dtype), got {feat.dtype} and {attn_logits.dtype}"
    return None


@unified  # plain Python control flow on shapes and options: to_static must not rewrite it (nor load_op's)
def psa_attend(feat, attn_logits, psa_type, mask_size, softmax: bool = True, normalization_factor: float = 1.0,
               impl: str = "fused"):
    """feat (N, C, H, W), attn_logits (N, mask_h*mask_w, H, W) -> (N, C, H, W); see the module doc."""
    if impl not in ATTEND_IMPLS:
        raise ValueError(f"psa_attend: impl must be one of {ATTEND_IMPLS}, got {impl!r}")
    t = normalize_psa_type(psa_type)
    mask_h, mask_w = normalize_mask_size(mask_size)
    if len(feat.shape) != 4 or len(attn_logits.shape) != 4:
        raise ValueError(f"psa_attend: expected 4-D feat and attn_logits, got shapes {tuple(feat.shape)} and "
                         f"{tuple(attn_logits.shape)}")
    if (int(feat.shape[0]), int(feat.shape[2]), int(feat.shape[3])) != (
            int(attn_logits.shape[0]), int(attn_logits.shape[2]), int(attn_logits.shape[3])):
        raise ValueError(f"psa_attend: feat {tuple(feat.shape)} and attn_logits {tuple(attn_logits.shape)} must share "
                         f"N, H and W")
    if int(attn_logits.shape[1]) != mask_h * mask_w:
        raise ValueError(f"psa_attend: attn_logits have {int(attn_logits.shape[1])} channels but the mask "
                         f"({mask_h}, {mask_w}) needs mask_h*mask_w = {mask_h * mask_w}")
    if not normalization_factor:
        raise ValueError(f"psa_attend: normalization_factor must be non-zero, got {normalization_factor!r}")
    if impl == "reference":
        return psa_attend_reference(feat, attn_logits, t, (mask_h, mask_w), softmax, normalization_factor)
    problem = _fused_problem(feat, attn_logits, softmax)
    if problem is None:
        try:
            module = load_op()
        except _build.BuildUnavailable as e:
            problem = f"the compiled op is unavailable: {e.reason}"
    if problem is None:
        problem = _device_problem(feat)  # a CUDA tensor needs a build with the CUDA kernels
    if problem is not None:
        _warn_once(problem.split(":")[0], f"psa_attend: using the reference path because {problem}")
        return psa_attend_reference(feat, attn_logits, t, (mask_h, mask_w), softmax, normalization_factor)
    out = module.psa_attend(feat, attn_logits, t, mask_h, mask_w)
    return out * (1.0 / normalization_factor)
