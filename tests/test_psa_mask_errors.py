"""PSA mask op: bad input gets a clear error (never a crash), at the Python API of both frameworks and at the
compiled operators called directly."""
from __future__ import annotations

import re

import numpy as np
import pytest

import psa_reference as ref
from psa_reference import side

FRAMEWORKS = ["torch", "paddle"]
IMPLS = ["cpp", "tensor", "auto"]


def _prepare(framework, impl):
    if impl in ("cpp", "auto"):
        ref.require_op(framework)
    return side(framework)


def _x(s, shape=(1, 9, 3, 4), dtype=None):
    return s.tensor(np.zeros(shape, dtype=np.float32), dtype)


# (description, callable(side) -> call, expected exception, message pattern)
BAD_CALLS = [
    ("channels != mask_h*mask_w", lambda s: (_x(s), 0, 4), ValueError, r"9 channels but the mask \(4, 4\)"),
    ("channels != non-square mask", lambda s: (_x(s), 0, (2, 3)), ValueError, r"needs mask_h\*mask_w = 6"),
    ("3-D tensor", lambda s: (_x(s, (9, 3, 4)), 0, 3), ValueError, r"4-D tensor .* 3-D"),
    ("5-D tensor", lambda s: (_x(s, (1, 1, 9, 3, 4)), 0, 3), ValueError, r"4-D tensor .* 5-D"),
    ("int64 dtype", lambda s: (_x(s, dtype="int64"), 0, 3), TypeError, r"floating-point tensor .*int64"),
    ("int32 dtype", lambda s: (_x(s, dtype="int32"), 0, 3), TypeError, r"floating-point tensor .*int32"),
    ("bool dtype", lambda s: (_x(s, dtype="bool"), 0, 3), TypeError, r"floating-point tensor .*bool"),
    ("complex dtype", lambda s: (_x(s, dtype="complex64"), 0, 3), TypeError, r"floating-point tensor .*complex64"),
    ("mask size 0", lambda s: (_x(s, (1, 0, 3, 4)), 0, 0), ValueError, r"mask size must be positive, got \(0, 0\)"),
    ("negative mask", lambda s: (_x(s), 0, (-3, -3)), ValueError, r"mask size must be positive"),
    ("mask (3, 0)", lambda s: (_x(s, (1, 0, 3, 4)), 0, (3, 0)), ValueError, r"mask size must be positive"),
    ("mask as str", lambda s: (_x(s), 0, "3"), TypeError, r"mask_size must be an int or a pair"),
    ("mask as float", lambda s: (_x(s), 0, 3.0), TypeError, r"mask_size must be an int or a pair"),
    ("mask of length 1", lambda s: (_x(s), 0, (3,)), TypeError, r"mask_size must be an int or a pair"),
    ("psa_type 2", lambda s: (_x(s), 2, 3), ValueError, r"psa_type must be 0 / 'collect' or 1 / 'distribute'"),
    ("psa_type 'both'", lambda s: (_x(s), "both", 3), ValueError, r"psa_type must be"),
    ("psa_type True", lambda s: (_x(s), True, 3), ValueError, r"psa_type must be"),
    ("numpy input", lambda s: (np.zeros((1, 9, 3, 4), np.float32), 0, 3), TypeError, r"expected a (torch|paddle)"),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_bad_input_python_api(framework, impl):
    s = _prepare(framework, impl)
    for what, make, exc, pattern in BAD_CALLS:
        args = make(s)
        with pytest.raises(exc, match=pattern):
            s.psa_mask(*args, impl=impl)
    with pytest.raises(ValueError, match=r"impl must be one of"):
        s.psa_mask(_x(s), 0, 3, impl="cuda")
    # still alive and correct after all of that
    x, y_ref, _, _ = ref.reference_case(ref.SWEEP[0], 0)
    np.testing.assert_array_equal(s.forward(x, 0, 3, impl), y_ref)


def _direct_calls(framework):
    """The compiled operators called without the Python checks: (callable, message pattern)."""
    ref.require_op(framework)
    if framework == "torch":
        import torch

        op, bwd = torch.ops.segtwin.psa_mask, torch.ops.segtwin.psa_mask_backward
        t = lambda shape, dt=torch.float32: torch.zeros(shape, dtype=dt)  # noqa: E731
        i64 = torch.int64
    else:
        import paddle

        from paddle_impl.ops.psa_mask import load_op

        op = load_op().psa_mask
        bwd = None
        t = lambda shape, dt="float32": paddle.zeros(shape, dtype=dt)  # noqa: E731
        i64 = "int64"
    calls = [
        (lambda: op(t((9, 3, 4)), 0, 3, 3), r"expected a 4-D tensor"),
        (lambda: op(t((1, 9, 3, 4), i64), 0, 3, 3), r"expected a floating-point tensor"),
        (lambda: op(t((1, 9, 3, 4)), 2, 3, 3), r"psa_type must be 0 \(collect\) or 1 \(distribute\), got 2"),
        (lambda: op(t((1, 9, 3, 4)), 0, 0, 3), r"mask size must be positive, got \(0, 3\)"),
        (lambda: op(t((1, 9, 3, 4)), 0, -3, -3), r"mask size must be positive"),
        (lambda: op(t((1, 9, 3, 4)), 0, 2, 3), r"input has 9 channels but the mask \(2, 3\) needs mask_h\*mask_w = 6"),
    ]
    if bwd is not None:
        calls.append((lambda: bwd(t((1, 11, 3, 4)), 0, 3, 3), r"grad_out must have H\*W = 12 channels"))
    return calls


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_bad_input_compiled_op_direct(framework):
    for call, pattern in _direct_calls(framework):
        with pytest.raises(Exception) as info:  # torch: RuntimeError; Paddle: its C++ exception type (OSError)
            call()
        assert re.search(pattern, str(info.value)), (pattern, str(info.value)[:500])


def test_meta_tensor_goes_through_fake_kernel():
    """A tensor on torch's meta device (shape-only) is not an error for the compiled op: the fake kernel answers."""
    ref.require_op("torch")
    import torch

    from torch_ref.ops import psa_mask

    y = psa_mask(torch.empty(2, 12, 3, 5, device="meta"), 1, (3, 4), impl="cpp")
    assert y.device.type == "meta" and tuple(y.shape) == (2, 15, 3, 5)
    with pytest.raises(ValueError, match="12 channels"):
        psa_mask(torch.empty(2, 12, 3, 5, device="meta"), 1, 3, impl="cpp")


def _cuda_available(framework):
    if framework == "torch":
        import torch

        return torch.cuda.is_available()
    import paddle

    return paddle.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0


@pytest.mark.gpu
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_device_without_kernel_is_a_clear_error(framework):
    """An input on a device the compiled op has no kernel for: impl='cpp' raises saying so, impl='auto' falls back to
    the pure-tensor impl with a warning. Where the build has CUDA kernels, a CUDA input just works."""
    if not _cuda_available(framework):
        pytest.skip(f"no CUDA device visible to {framework}: a CPU-only machine has no second device to mismatch")
    ref.require_op(framework)
    s = side(framework)
    x, y_ref, _, _ = ref.reference_case(ref.SWEEP[0], 0)
    if framework == "torch":
        import torch

        xt = torch.from_numpy(x).cuda()
        has_cuda = torch.ops.segtwin.psa_mask_built_with_cuda()
    else:
        import paddle

        from paddle_impl.ops.psa_mask import load_op

        xt = paddle.to_tensor(x, place=paddle.CUDAPlace(0))
        has_cuda = bool(load_op().build_info.get("with_cuda"))
    if has_cuda:
        np.testing.assert_array_equal(s.numpy(s.psa_mask(xt, 0, 3, impl="cpp")), y_ref)
    else:
        with pytest.raises(RuntimeError, match="no CUDA kernel"):
            s.psa_mask(xt, 0, 3, impl="cpp")
        with pytest.warns(RuntimeWarning, match="pure-tensor"):
            np.testing.assert_array_equal(s.numpy(s.psa_mask(xt, 0, 3, impl="auto")), y_ref)
