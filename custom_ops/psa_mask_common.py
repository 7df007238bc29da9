"""Framework-neutral pieces of the PSA mask op shared by `torch_ref.ops.psa_mask` and `paddle_impl.ops.psa_mask`:
argument normalisation, the messages of the input checks, and the gather index map of the pure-tensor impl.

Semantics (semseg / mmcv PSAMask, see custom_ops/include/psa_mask_kernel.h): input (N, mask_h*mask_w, H, W) ->
output (N, H*W, H, W); psa_type 0 = collect, 1 = distribute (= collect transposed over the two H*W axes).
"""
from __future__ import annotations

import functools
import numbers

import numpy as np

PSA_TYPES = {"collect": 0, "distribute": 1}
IMPLS = ("auto", "cpp", "tensor")
#: the largest mask side any entry point accepts (the compiled ops' bound, kMaxMaskSide in psa_mask_kernel.h)
MAX_MASK_SIDE = 2**31 - 1
FLOAT_DTYPE_NAMES = ("float16", "bfloat16", "float32", "float64")


def normalize_psa_type(psa_type) -> int:
    """0 / 1 / "collect" / "distribute" -> 0 or 1."""
    if isinstance(psa_type, str):
        key = psa_type.strip().lower()
        if key in PSA_TYPES:
            return PSA_TYPES[key]
    elif isinstance(psa_type, numbers.Integral) and not isinstance(psa_type, bool) and int(psa_type) in (0, 1):
        return int(psa_type)
    raise ValueError(f"psa_mask: psa_type must be 0 / 'collect' or 1 / 'distribute', got {psa_type!r}")


def normalize_mask_size(mask_size) -> tuple[int, int]:
    """An int m -> (m, m); a pair (mask_h, mask_w) -> itself. Both must be integers in [1, MAX_MASK_SIDE]."""
    if isinstance(mask_size, numbers.Integral) and not isinstance(mask_size, bool):
        pair = (int(mask_size), int(mask_size))
    else:
        try:
            items = tuple(mask_size)
        except TypeError:
            items = None
        if (items is None or len(items) != 2
                or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in items)):
            raise TypeError(f"psa_mask: mask_size must be an int or a pair of ints (mask_h, mask_w), got "
                            f"{mask_size!r}")
        pair = (int(items[0]), int(items[1]))
    if pair[0] <= 0 or pair[1] <= 0:
        raise ValueError(f"psa_mask: mask size must be positive, got {pair}")
    if pair[0] > MAX_MASK_SIDE or pair[1] > MAX_MASK_SIDE:
        raise ValueError(f"psa_mask: mask size must be at most {MAX_MASK_SIDE} (2**31-1) per side, got {pair}")
    return pair


def normalize_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"psa_mask: impl must be one of {IMPLS}, got {impl!r}")
    return impl


def check_shape(shape, mask_h: int, mask_w: int) -> None:
    """Raises ValueError unless `shape` is (N, mask_h*mask_w, H, W). Unknown sizes (None or -1, static graphs)
    are not checked."""
    shape = list(shape)
    if len(shape) != 4:
        raise ValueError(f"psa_mask: expected a 4-D tensor (N, mask_h*mask_w, H, W), got a {len(shape)}-D tensor "
                         f"of shape {tuple(shape)}")
    c = shape[1]
    if c is not None and int(c) >= 0 and int(c) != mask_h * mask_w:
        raise ValueError(f"psa_mask: input has {int(c)} channels but the mask ({mask_h}, {mask_w}) needs "
                         f"mask_h*mask_w = {mask_h * mask_w} (input shape {tuple(shape)})")


def dtype_error(dtype) -> TypeError:
    return TypeError(f"psa_mask: expected a floating-point tensor ({', '.join(FLOAT_DTYPE_NAMES)}), got {dtype}")


@functools.lru_cache(maxsize=16)
def gather_index(h: int, w: int, mask_h: int, mask_w: int, psa_type: int) -> np.ndarray:
    """Index map of the pure-tensor impl, shape (H*W * H*W,), read-only.

    With x viewed as (N, C*H*W) and a zero column appended at position C*H*W, the op output viewed as
    (N, H*W * H*W) is ``x_padded[:, index]``. For collect, output element (q, p) (channel q = the other pixel,
    spatial p = the centre) takes channel (qh - ph + half_h) * mask_w + (qw - pw + half_w) of x at p when that
    window cell exists, else the zero column; distribute is the same map transposed over (q, p).
    int32 when it can hold C*H*W, else int64.
    """
    hw = h * w
    c = mask_h * mask_w
    half_h, half_w = (mask_h - 1) // 2, (mask_w - 1) // 2
    pix = np.arange(hw, dtype=np.int64)
    ph, pw = pix // w, pix % w
    i = ph[:, None] - ph[None, :] + half_h  # rows: q, columns: p
    j = pw[:, None] - pw[None, :] + half_w
    valid = (i >= 0) & (i < mask_h) & (j >= 0) & (j < mask_w)
    index = np.where(valid, (i * mask_w + j) * hw + pix[None, :], c * hw)
    if psa_type == 1:
        index = index.T
    dtype = np.int32 if c * hw < np.iinfo(np.int32).max else np.int64
    out = np.ascontiguousarray(index.reshape(-1), dtype=dtype)
    out.setflags(write=False)
    return out
