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


# --- huge mask sizes: the products that used to wrap in int64 ------------------------------------------------------

# mask_h * mask_w == 2**64 + 9: in int64 it wraps to 9, the channel count of the input below.
WRAPS_TO_9 = (3689348814741910325, 5)
assert WRAPS_TO_9[0] * WRAPS_TO_9[1] == 2**64 + 9

_HUGE_TORCH_CHILD = r"""
import sys, torch
from torch_ref.ops.psa_mask import load_op
load_op()
op, bwd = torch.ops.segtwin.psa_mask, torch.ops.segtwin.psa_mask_backward
calls = {
    "empty input, 2**32 x 2**32": lambda: op(torch.zeros(1, 0, 2, 2), 0, 2**32, 2**32),
    "C=9, mask wrapping to 9": lambda: op(torch.zeros(1, 9, 3, 3), 0, 3689348814741910325, 5),
    "C=9, mask wrapping to 9, distribute": lambda: op(torch.zeros(1, 9, 3, 3), 1, 3689348814741910325, 5),
    "backward, mask wrapping to 9": lambda: bwd(torch.zeros(1, 9, 3, 3), 0, 3689348814741910325, 5),
    "backward, 2**31 x 1": lambda: bwd(torch.zeros(1, 4, 2, 2), 0, 2**31, 1),
    "forward, 2**31 x 1 on 0 channels": lambda: op(torch.zeros(2, 0, 1, 1), 1, 2**31, 1),
}
for name, call in calls.items():
    try:
        out = call()
    except RuntimeError as e:
        print(name, "->", str(e).splitlines()[0])
    else:
        print(name, "-> NO ERROR, shape", tuple(out.shape))
"""

_HUGE_PADDLE_CHILD = r"""
import paddle
from paddle_impl.ops.psa_mask import load_op
op = load_op().psa_mask
calls = {
    "C=9, mask wrapping to 9": lambda: op(paddle.zeros([1, 9, 3, 3]), 0, 3689348814741910325, 5),
    "empty input, 2**32 x 2**32": lambda: op(paddle.zeros([1, 0, 2, 2]), 0, 2**32, 2**32),
    "2**31 x 1 on 0 channels": lambda: op(paddle.zeros([2, 0, 1, 1]), 1, 2**31, 1),
}
for name, call in calls.items():
    try:
        out = call()
    except Exception as e:
        print(name, "->", type(e).__name__, str(e).strip().splitlines()[0][:200] if str(e).strip() else "")
    else:
        print(name, "-> NO ERROR, shape", tuple(out.shape))
"""


def _run_child(code: str) -> str:
    """Runs `code` in a fresh interpreter with a timeout: a segfault fails the test instead of killing pytest."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240,
                          env=ref.subprocess_env())
    assert proc.returncode == 0, f"child died with exit code {proc.returncode}:\n{proc.stdout}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_torch_op_direct_huge_masks_rejected_in_subprocess():
    ref.require_op("torch")
    lines = _run_child(_HUGE_TORCH_CHILD).strip().splitlines()
    assert len(lines) == 6, lines
    for line in lines:
        assert "NO ERROR" not in line, line
        assert re.search(r"mask size must be at most 2147483647 \(2\*\*31-1\) per side, got \(\d+, \d+\)", line), line


def test_paddle_op_direct_huge_masks_rejected_in_subprocess():
    """Paddle's attributes are C++ ints: a value beyond them is refused when the attribute is converted (a clear
    Python error), before the kernel could see a wrapped size."""
    ref.require_op("paddle")
    lines = _run_child(_HUGE_PADDLE_CHILD).strip().splitlines()
    assert len(lines) == 3, lines
    for line in lines:
        assert "NO ERROR" not in line, line
        assert re.search(r"Integer value \d+ exceeds int32 range", line), line


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_python_api_huge_masks(framework, impl):
    s = _prepare(framework, impl)
    for x, mask in ((_x(s), WRAPS_TO_9), (_x(s, (1, 0, 2, 2)), (2**32, 2**32)), (_x(s, (1, 0, 2, 2)), (2**31, 1))):
        with pytest.raises(ValueError, match=r"mask size must be at most 2147483647 \(2\*\*31-1\) per side"):
            s.psa_mask(x, 0, mask, impl=impl)
    # the largest side allowed passes the size check and fails the channel check by its true product
    with pytest.raises(ValueError, match=r"9 channels but the mask \(2147483647, 1\) needs mask_h\*mask_w = "
                                         r"2147483647"):
        s.psa_mask(_x(s), 0, (2**31 - 1, 1), impl=impl)


def test_paddle_infer_shape_and_kernel_check_channels_by_division():
    """The largest sides Paddle's int attributes can hold: the product (~2**62) is not a channel count of any
    tensor, and the check says so instead of wrapping."""
    ref.require_op("paddle")
    import paddle

    from paddle_impl.ops.psa_mask import load_op

    op = load_op().psa_mask
    with pytest.raises(Exception, match=r"input has 9 channels but the mask \(2147483647, 2147483647\)"):
        op(paddle.zeros([1, 9, 3, 3]), 0, 2**31 - 1, 2**31 - 1)
    with pytest.raises(Exception, match=r"mask size must be positive"):
        op(paddle.zeros([1, 9, 3, 3]), 0, 2**31 - 1, -1)


def test_compiled_cpu_entry_point_validates_geometry(tmp_path):
    """The framework-free CPU entry point applies the same bounds as the glue (a caller that skipped the glue's checks
    gets a message, not a wild write)."""
    import shutil
    import subprocess

    from custom_ops import build

    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ is not on PATH")
    src = tmp_path / "probe.cc"
    src.write_text(r"""
        #include <cstdio>
        #include "psa_mask_cpu.h"
        using namespace segtwin::psa;
        int main() {
          float a[9] = {0}, b[9] = {0};
          const char* e1 = psa_mask_cpu_bytes(a, b, 4, make_geom(1, 3689348814741910325LL, 5, 3, 3), 0, true, 1);
          const char* e2 = psa_mask_cpu_bytes(a, b, 4, make_geom(1, 0, 3, 3, 3), 0, true, 1);
          const char* e3 = psa_mask_cpu_bytes(a, b, 3, make_geom(1, 3, 3, 1, 1), 0, true, 1);
          const char* e4 = psa_mask_cpu_bytes(a, b, 4, make_geom(1, 3, 3, 1, 1), 2, true, 1);
          const char* ok = psa_mask_cpu_bytes(a, b, 4, make_geom(1, 3, 3, 1, 1), 0, true, 1);
          std::printf("%s|%s|%s|%s|%s\n", e1 ? e1 : "null", e2 ? e2 : "null", e3 ? e3 : "null", e4 ? e4 : "null",
                      ok ? ok : "null");
          return 0;
        }
    """)
    exe = tmp_path / "probe"
    comp = subprocess.run([gxx, "-std=c++17", "-O1", "-I", str(build.INCLUDE_DIR), str(src), "-o", str(exe)],
                          capture_output=True, text=True)
    assert comp.returncode == 0, comp.stderr
    out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60).stdout.strip().split("|")
    assert "invalid sizes" in out[0] and "invalid sizes" in out[1], out
    assert "element size" in out[2] and "psa_type" in out[3] and out[4] == "null", out


# --- empty feature maps ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 9, 0, 4), (2, 9, 3, 0)])
def test_paddle_tensor_impl_empty_map_under_to_static(shape):
    """With N unknown (-1) in a static graph, a reshape cannot infer N from zero elements: the tensor impl returns
    the empty (N, 0, H, W) result without one, like every other impl."""
    import paddle

    from paddle_impl.ops import psa_mask

    def f(x):
        return psa_mask(x, 0, 3, impl="tensor")

    static = paddle.jit.to_static(f, input_spec=[paddle.static.InputSpec([None, 9, shape[2], shape[3]], "float32")],
                                  full_graph=True)
    out = static(paddle.zeros(list(shape)))
    assert tuple(out.shape) == (shape[0], 0, shape[2], shape[3])
