"""PSA mask operator of PSANet (semseg / mmcv `PSAMask`) for PaddlePaddle.

    from paddle_impl.ops import psa_mask
    y = psa_mask(x, "collect", 59)             # x (N, 59*59, H, W) -> y (N, H*W, H, W)
    y = psa_mask(x, 1, (mask_h, mask_w))       # distribute

Implementations (`impl`):
* "cpp": the compiled custom operator `psa_mask` (PD_BUILD_OP + PD_BUILD_GRAD_OP; C++ CPU loop with OpenMP, CUDA
  kernel where built), JIT-built on first use by `custom_ops.build` and cached. Works in dynamic mode, under
  `paddle.jit.to_static` / `paddle.jit.save`, and in `paddle.inference` once `load_op()` ran in that process.
* "tensor": a pure-Paddle gather through a precomputed index map (autograd by index_select's backward).
* "auto" (default): "cpp" when it can be built or is cached, else "tensor" with a one-time warning saying why.

Twin of torch_ref/ops/psa_mask.py.
"""
from __future__ import annotations

import functools
import threading
import warnings

import paddle
from paddle.jit.marker import unified

from custom_ops import build as _build
from custom_ops.psa_mask_common import (check_shape, dtype_error, gather_index, normalize_impl, normalize_mask_size,
                                        normalize_psa_type)

__all__ = ["psa_mask", "load_op", "op_available"]

_FLOAT_DTYPES = (paddle.float16, paddle.bfloat16, paddle.float32, paddle.float64)
_state = {"module": None, "unavailable": None, "warned": set()}
_lock = threading.Lock()


def load_op():
    """Build (if needed) and register the compiled operator; returns its Python entry point module. Raises
    custom_ops.build.BuildUnavailable with the reason when it cannot be had (remembered: later calls fail fast).
    A process that runs an exported model containing the op must call this first."""
    if _state["module"] is not None:  # lock-free fast path
        return _state["module"]
    with _lock:
        if _state["module"] is not None:
            return _state["module"]
        if _state["unavailable"] is not None:
            raise _state["unavailable"]
        try:
            _state["module"] = _build.load_paddle()
        except _build.BuildUnavailable as e:
            _state["unavailable"] = e
            raise
        return _state["module"]


def op_available() -> bool:
    """Whether the compiled operator is usable in this process (builds it on first call if needed)."""
    try:
        load_op()
        return True
    except _build.BuildUnavailable:
        return False


def _warn_once(key: str, message: str) -> None:
    if key not in _state["warned"]:
        _state["warned"].add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _device_problem(x: paddle.Tensor) -> str | None:
    """Why the compiled operator has no kernel for x's place (None when it has one)."""
    if not paddle.in_dynamic_mode():
        return None  # the place is decided when the program runs; the kernel checks it then
    place = x.place
    if place.is_cpu_place():
        return None
    if place.is_gpu_place():
        if _state["module"].build_info.get("with_cuda"):
            return None
        return (f"the input is on {place} but the compiled psa_mask op has no CUDA kernel (Paddle "
                f"{paddle.__version__}, compiled with CUDA: {paddle.is_compiled_with_cuda()}; nvcc needed at build "
                f"time)")
    return f"the input is on {place}; the compiled psa_mask op has CPU and CUDA kernels only"


def _check_input(x) -> None:
    if paddle.in_dynamic_mode() and not isinstance(x, paddle.Tensor):
        raise TypeError(f"psa_mask: expected a paddle.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise dtype_error(x.dtype)


@functools.lru_cache(maxsize=16)
def _index_tensor(h: int, w: int, mask_h: int, mask_w: int, psa_type: int, device) -> paddle.Tensor:
    return paddle.as_tensor(gather_index(h, w, mask_h, mask_w, psa_type).copy(), device=device)


def _psa_mask_tensor(x: paddle.Tensor, psa_type: int, mask_h: int, mask_w: int) -> paddle.Tensor:
    n, c, h, w = x.shape
    if h < 0 or w < 0:
        raise ValueError(f"psa_mask(impl='tensor'): H and W must be known, got shape {x.shape}")
    if h * w == 0:
        return x[:, :0]  # (N, 0, H, W): no pixel pair; no reshape, which cannot infer an unknown N from 0 elements
    if x.dtype in (paddle.float16, paddle.bfloat16) and paddle.in_dynamic_mode() and x.place.is_cpu_place():
        # Paddle's CPU kernels lack float16 index_select and bfloat16 concat_grad; a round trip through float32 is
        # exact for copied values.
        return _psa_mask_tensor(x.astype(paddle.float32), psa_type, mask_h, mask_w).astype(x.dtype)
    if paddle.in_dynamic_mode():
        index = _index_tensor(int(h), int(w), mask_h, mask_w, psa_type, x.place)  # ints also under jit.trace
    else:
        index = paddle.to_tensor(gather_index(h, w, mask_h, mask_w, psa_type).copy())
    flat = x.reshape([n, c * h * w])
    padded = paddle.concat([flat, paddle.zeros_like(flat[:, :1])], axis=1)
    return paddle.index_select(padded, index=index, axis=1).reshape([n, h * w, h, w])


@unified
def psa_mask(x: paddle.Tensor, psa_type, mask_size, impl: str = "auto") -> paddle.Tensor:
    """PSA mask: x (N, mask_h*mask_w, H, W) -> (N, H*W, H, W).

    psa_type: 0 / "collect" or 1 / "distribute". mask_size: int or (mask_h, mask_w) with mask_h*mask_w == C
    (odd or even). Positions outside the mask window are 0. Differentiable (exact adjoint). float16, bfloat16,
    float32, float64; non-contiguous input is accepted. impl: "auto" | "cpp" | "tensor" (see the module doc).
    """
    impl = normalize_impl(impl)
    t = normalize_psa_type(psa_type)
    mask_h, mask_w = normalize_mask_size(mask_size)
    _check_input(x)
    check_shape(x.shape, mask_h, mask_w)
    if impl == "tensor":
        return _psa_mask_tensor(x, t, mask_h, mask_w)
    try:
        module = load_op()
    except _build.BuildUnavailable as e:
        if impl == "cpp":
            raise RuntimeError(f"psa_mask(impl='cpp'): the compiled op is unavailable: {e.reason}") from e
        _warn_once("build", f"psa_mask: using the pure-tensor implementation because the compiled op is "
                            f"unavailable: {e.reason}")
        return _psa_mask_tensor(x, t, mask_h, mask_w)
    problem = _device_problem(x)
    if problem is not None:
        if impl == "cpp":
            raise RuntimeError(f"psa_mask(impl='cpp'): {problem}")
        _warn_once(f"device:{x.place}", f"psa_mask: using the pure-tensor implementation: {problem}")
        return _psa_mask_tensor(x, t, mask_h, mask_w)
    return module.psa_mask(x, t, mask_h, mask_w)
