"""PSA mask operator of PSANet (semseg / mmcv `PSAMask`) for PyTorch.

    from torch_ref.ops import psa_mask
    y = psa_mask(x, "collect", 59)             # x (N, 59*59, H, W) -> y (N, H*W, H, W)
    y = psa_mask(x, 1, (mask_h, mask_w))       # distribute

Implementations (`impl`):
* "cpp": the compiled operator `torch.ops.segtwin.psa_mask` (C++ CPU loop with OpenMP, CUDA kernel where built),
  JIT-built on first use by `custom_ops.build` and cached; autograd through `psa_mask_backward` (exact adjoint),
  fake kernels for torch.compile / opcheck.
* "tensor": a pure-PyTorch gather through a precomputed index map (autograd by index_select's backward).
* "auto" (default): "cpp" when it can be built or is cached, else "tensor" with a one-time warning saying why.

Twin of paddle_impl/ops/psa_mask.py.
"""
from __future__ import annotations

import functools
import threading
import warnings

import torch

from custom_ops import build as _build
from custom_ops.psa_mask_common import (check_shape, dtype_error, gather_index, normalize_impl, normalize_mask_size,
                                        normalize_psa_type)

__all__ = ["psa_mask", "load_op", "op_available"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_state = {"registered": False, "unavailable": None, "warned": set()}
_lock = threading.Lock()


def _register_python_parts() -> None:
    """Fake kernels and autograd formulas of the two compiled operators (once per process)."""

    @torch.library.register_fake("segtwin::psa_mask")
    def _psa_mask_fake(x, psa_type, mask_h, mask_w):
        torch._check(x.dim() == 4, lambda: f"segtwin::psa_mask: expected a 4-D tensor, got {x.dim()}-D")
        torch._check(x.shape[1] == mask_h * mask_w,
                     lambda: f"segtwin::psa_mask: {x.shape[1]} channels, mask needs {mask_h * mask_w}")
        n, _, h, w = x.shape
        return x.new_empty((n, h * w, h, w))

    @torch.library.register_fake("segtwin::psa_mask_backward")
    def _psa_mask_backward_fake(grad_out, psa_type, mask_h, mask_w):
        torch._check(grad_out.dim() == 4, lambda: "segtwin::psa_mask_backward: expected a 4-D tensor")
        n, _, h, w = grad_out.shape
        torch._check(grad_out.shape[1] == h * w, lambda: "segtwin::psa_mask_backward: grad_out needs H*W channels")
        return grad_out.new_empty((n, mask_h * mask_w, h, w))

    def _setup(ctx, inputs, output):
        _, ctx.psa_type, ctx.mask_h, ctx.mask_w = inputs

    def _forward_grad(ctx, grad):
        return torch.ops.segtwin.psa_mask_backward(grad, ctx.psa_type, ctx.mask_h, ctx.mask_w), None, None, None

    def _backward_grad(ctx, grad):
        # psa_mask_backward is linear with psa_mask as its adjoint: this gives double backward for free.
        return torch.ops.segtwin.psa_mask(grad, ctx.psa_type, ctx.mask_h, ctx.mask_w), None, None, None

    torch.library.register_autograd("segtwin::psa_mask", _forward_grad, setup_context=_setup)
    torch.library.register_autograd("segtwin::psa_mask_backward", _backward_grad, setup_context=_setup)

    # The fused PSA aggregation (torch_ref/ops/psa_attend.py): out = bmm(feat, softmax(psa_mask(logits))).
    @torch.library.register_fake("segtwin::psa_attend")
    def _psa_attend_fake(feat, logits, psa_type, mask_h, mask_w):
        return feat.new_empty(feat.shape)

    @torch.library.register_fake("segtwin::psa_attend_backward")
    def _psa_attend_backward_fake(grad, feat, logits, out, psa_type, mask_h, mask_w):
        return feat.new_empty(feat.shape), logits.new_empty(logits.shape)

    def _attend_setup(ctx, inputs, output):
        feat, logits, ctx.psa_type, ctx.mask_h, ctx.mask_w = inputs
        ctx.save_for_backward(feat, logits, output)

    def _attend_grad(ctx, grad):
        feat, logits, out = ctx.saved_tensors
        gf, gl = torch.ops.segtwin.psa_attend_backward(grad, feat, logits, out, ctx.psa_type, ctx.mask_h, ctx.mask_w)
        return gf, gl, None, None, None

    torch.library.register_autograd("segtwin::psa_attend", _attend_grad, setup_context=_attend_setup)


def load_op():
    """Build (if needed) and load the compiled operators; returns their namespace `torch.ops.segtwin`. Raises
    custom_ops.build.BuildUnavailable with the reason when it cannot be had (remembered: later calls fail fast)."""
    if _state["registered"]:  # lock-free fast path (also keeps torch.compile tracing free of the lock)
        return torch.ops.segtwin
    with _lock:
        if _state["registered"]:
            return torch.ops.segtwin
        if _state["unavailable"] is not None:
            raise _state["unavailable"]
        try:
            _build.load_torch()
        except _build.BuildUnavailable as e:
            _state["unavailable"] = e
            raise
        _register_python_parts()
        _state["registered"] = True
        return torch.ops.segtwin


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


def _device_problem(x: torch.Tensor) -> str | None:
    """Why the compiled operator has no kernel for x's device (None when it has one)."""
    kind = x.device.type
    if kind in ("cpu", "meta"):
        return None
    if kind == "cuda":
        if torch.ops.segtwin.psa_mask_built_with_cuda():
            return None
        return (f"the input is on {x.device} but the compiled psa_mask op has no CUDA kernel (this torch "
                f"{torch.__version__} has CUDA {torch.version.cuda}; nvcc/CUDA_HOME needed at build time)")
    return f"the input is on {x.device}; the compiled psa_mask op has CPU and CUDA kernels only"


def _check_input(x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"psa_mask: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise dtype_error(x.dtype)


@functools.lru_cache(maxsize=16)
def _index_tensor(h: int, w: int, mask_h: int, mask_w: int, psa_type: int, device) -> torch.Tensor:
    return torch.as_tensor(gather_index(h, w, mask_h, mask_w, psa_type).copy(), device=device)


def _psa_mask_tensor(x: torch.Tensor, psa_type: int, mask_h: int, mask_w: int) -> torch.Tensor:
    n, c, h, w = x.shape
    if h * w == 0:
        return x[:, :0]  # (N, 0, H, W): no pixel pair; no reshape, which cannot infer an unknown N from 0 elements
    index = _index_tensor(int(h), int(w), mask_h, mask_w, psa_type, x.device)  # ints also under jit.trace
    flat = x.reshape([n, c * h * w])
    padded = torch.cat([flat, torch.zeros_like(flat[:, :1])], dim=1)
    return torch.index_select(padded, index=index, dim=1).reshape([n, h * w, h, w])


def psa_mask(x: torch.Tensor, psa_type, mask_size, impl: str = "auto") -> torch.Tensor:
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
        load_op()
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
        _warn_once(f"device:{x.device.type}", f"psa_mask: using the pure-tensor implementation: {problem}")
        return _psa_mask_tensor(x, t, mask_h, mask_w)
    return torch.ops.segtwin.psa_mask(x, t, mask_h, mask_w)
