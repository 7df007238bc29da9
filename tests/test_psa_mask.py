"""PSA mask op: conformance (mmcv vectors), numpy float64 reference sweep, dtypes, layouts, torch <-> Paddle parity.

Every implementation (compiled "cpp", pure-tensor "tensor", and "auto") of both frameworks is held to EXACT
equality (the op only copies values), forward and backward.
"""
from __future__ import annotations

import re
import warnings

import numpy as np
import pytest

import psa_reference as ref
from psa_reference import SWEEP, reference_case, side, sweep_id

FRAMEWORKS = ["torch", "paddle"]
IMPLS = ["cpp", "tensor", "auto"]
TYPES = [0, 1]


def _prepare(framework: str, impl: str):
    if impl in ("cpp", "auto"):
        ref.require_op(framework)
    return side(framework)


# --- the conformance vectors and the references themselves ------------------------------------------------------

def test_mmcv_vectors_are_intact():
    v = ref.load_mmcv_vectors()  # checks the sha1 prefixes
    assert v["input"].shape == (4, 16, 8, 8)
    for k in ("collect", "distribute"):
        assert v[k].shape == (4, 64, 8, 8)
        # mask 4x4 (half 1) on 8x8: (3 + 4*5 + 3 + 2)^2 = 784 valid (pixel, cell) pairs per image
        assert np.count_nonzero(v[k]) == 4 * 784


@pytest.mark.parametrize("psa_type,key", [(0, "collect"), (1, "distribute")])
@pytest.mark.parametrize("reference", ["loop", "formula"])
def test_numpy_references_reproduce_mmcv(reference, psa_type, key):
    v = ref.load_mmcv_vectors()
    f = ref.psa_mask_loop if reference == "loop" else ref.psa_mask_formula
    out = f(v["input"], psa_type, *ref.MMCV_MASK)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, v[key])


@pytest.mark.parametrize("case", SWEEP, ids=sweep_id)
def test_numpy_references_agree_and_are_adjoint(case):
    for t in TYPES:
        x, y, g, gx = reference_case(case, t)
        np.testing.assert_array_equal(ref.psa_mask_formula(x, t, case[1], case[2]), y)
        # <op(x), g> == <x, op^T(g)>: the backward loop is the adjoint of the forward loop
        assert float(np.sum(y * g)) == pytest.approx(float(np.sum(x * gx)), rel=1e-12, abs=1e-12)


def test_distribute_is_collect_transposed():
    x, y0, _, _ = reference_case(SWEEP[2], 0)
    y1 = ref.psa_mask_loop(x, 1, *SWEEP[2][1:3])
    n, hw = y0.shape[:2]
    np.testing.assert_array_equal(y1.reshape(n, hw, hw), y0.reshape(n, hw, hw).transpose(0, 2, 1))


def test_full_window_has_no_zeros_and_oversized_mask_crops_to_it():
    h, w = 4, 5
    full_h, full_w = 2 * h - 1, 2 * w - 1
    x = np.arange(1, 1 + 2 * full_h * full_w * h * w, dtype=np.float64).reshape(2, full_h * full_w, h, w)
    y_full = ref.psa_mask_loop(x, 0, full_h, full_w)
    assert np.count_nonzero(y_full == 0) == 0  # the full (2H-1, 2W-1) window reaches every pixel pair
    # A larger mask (13x15 here) only ever uses its central (2H-1, 2W-1) cells.
    big_h, big_w = 13, 15
    big = np.zeros((2, big_h, big_w, h, w))
    oh, ow = (big_h - 1) // 2 - (h - 1), (big_w - 1) // 2 - (w - 1)
    big[:, oh:oh + full_h, ow:ow + full_w] = x.reshape(2, full_h, full_w, h, w)
    np.testing.assert_array_equal(ref.psa_mask_loop(big.reshape(2, big_h * big_w, h, w), 0, big_h, big_w), y_full)


# --- every implementation against the vectors and the reference --------------------------------------------------

@pytest.mark.parametrize("psa_type,key", [(0, "collect"), (1, "distribute"), ("collect", "collect"),
                                          ("distribute", "distribute")])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_op_reproduces_mmcv_vectors(framework, impl, psa_type, key):
    s = _prepare(framework, impl)
    v = ref.load_mmcv_vectors()
    out = s.forward(v["input"], psa_type, ref.MMCV_MASK, impl)
    assert out.dtype == np.float32 and out.shape == (4, 64, 8, 8)
    np.testing.assert_array_equal(out, v[key])


@pytest.mark.parametrize("psa_type", TYPES)
@pytest.mark.parametrize("case", SWEEP, ids=sweep_id)
@pytest.mark.parametrize("impl", ["cpp", "tensor"])
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_sweep_forward_backward_float64(framework, impl, case, psa_type):
    s = _prepare(framework, impl)
    x, y_ref, g, gx_ref = reference_case(case, psa_type)
    y, gx, ydt, gxdt = s.forward_backward(x, g, psa_type, case[1:3], impl)
    assert (ydt, gxdt) == ("float64", "float64")
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(gx, gx_ref)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("impl", ["cpp", "tensor"])
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_dtypes_forward_backward(framework, impl, dtype):
    """Every float dtype keeps its dtype and moves values bit-exactly (the 16-bit types exercise the 2-byte
    instantiation of the shared kernel body, the one the CUDA build also uses for float16)."""
    s = _prepare(framework, impl)
    for case in (SWEEP[1], SWEEP[3], SWEEP[5]):
        for t in TYPES:
            x, y_ref, g, gx_ref = reference_case(case, t, np.float32)
            y, gx, ydt, gxdt = s.forward_backward(x, g, t, case[1:3], impl, dtype)
            assert (ydt, gxdt) == (dtype, dtype)
            np.testing.assert_array_equal(y, y_ref)
            np.testing.assert_array_equal(gx, gx_ref)


# Shapes whose stage per destination row r is large enough that the CPU loop splits the H rows of a group into
# several work items (at most 256 KiB of stage per item, kStageBudgetBytes in psa_mask_cpu.h), most with an uneven
# last item (the SWEEP shapes all fit one item). Stage per r: W x (the span of window indices the group's rows
# read). Rows per item, forward / backward (the same for both types), for 2-, 4- and 8-byte elements:
#   (2, 2, 129, 11, 64) N=2, even mask, wider than the full window: 11 / 6+5, 6+5 / 4+4+3, 4+4+3 / 2+2+2+2+2+1
#   (1, 5, 9, 7, 96)    mask smaller than the map:                   7 / 7, 3+3+1 / 4+3, 1 x 7 / 3+3+1
#   (1, 1, 255, 9, 128) 1xW mask:                                    3+3+3 / 2+2+2+2+1, 2+2+2+2+1 / 1 x 9, 1 x 9 / 1 x 9
ROW_BLOCK_CASES = [(2, 2, 129, 11, 64, "row blocks, wide even mask, N=2"), (1, 5, 9, 7, 96, "row blocks, small mask"),
                   (1, 1, 255, 9, 128, "row blocks, 1xW mask")]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_row_blocks_forward_backward(framework, dtype):
    """The CPU loop's work items of several destination rows each, including an uneven last item, in every width."""
    s = _prepare(framework, "cpp")
    for case in ROW_BLOCK_CASES:
        for t in TYPES:
            x, y_ref, g, gx_ref = reference_case(case, t, np.float32)
            y, gx, ydt, gxdt = s.forward_backward(x, g, t, case[1:3], "cpp", dtype)
            assert (ydt, gxdt) == (dtype, dtype)
            np.testing.assert_array_equal(y, y_ref)
            np.testing.assert_array_equal(gx, gx_ref)


@pytest.mark.parametrize("impl", ["cpp", "tensor"])
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_non_contiguous_input(framework, impl):
    s = _prepare(framework, impl)
    case = SWEEP[2]  # (1, 5, 3, 4, 6): H != W
    x, y_ref, _, _ = reference_case(case, 1)
    stored = np.ascontiguousarray(x.transpose(0, 1, 3, 2))  # memory holds (N, C, W, H)
    if framework == "torch":
        xt = s.tensor(stored).transpose(2, 3)
        assert not xt.is_contiguous()
    else:
        xt = s.tensor(stored).transpose([0, 1, 3, 2])
        assert not xt.is_contiguous(), "Paddle returned a contiguous transpose; the test would prove nothing"
    y = s.psa_mask(xt, 1, case[1:3], impl=impl)
    np.testing.assert_array_equal(s.numpy(y), y_ref)


@pytest.mark.parametrize("impl", ["cpp", "tensor"])
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_empty_batch(framework, impl):
    s = _prepare(framework, impl)
    x = np.zeros((0, 9, 4, 5), dtype=np.float32)
    out = s.forward(x, 0, 3, impl)
    assert out.shape == (0, 20, 4, 5)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_auto_is_the_compiled_op_without_warning(framework):
    ref.require_op(framework)
    s = side(framework)
    x, y_ref, _, _ = reference_case(SWEEP[1], 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback warning would fail here
        out = s.forward(x, "collect", 4, "auto")
    np.testing.assert_array_equal(out, y_ref)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("psa_type", TYPES)
def test_torch_paddle_parity(psa_type, dtype):
    """Same input, same upstream gradient: the compiled ops of the two frameworks agree bit for bit (a PSANet-like
    case: 9x9 mask on a 5x7 map, N=2), and so do the pure-tensor impls."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 81, 5, 7)).astype(dtype)
    g = rng.standard_normal((2, 35, 5, 7)).astype(dtype)
    results = {}
    for fw in FRAMEWORKS:
        ref.require_op(fw)
        for impl in ("cpp", "tensor"):
            y, gx, _, _ = side(fw).forward_backward(x, g, psa_type, 9, impl)
            results[fw, impl] = (y, gx)
    base_y, base_gx = results["torch", "cpp"]
    for key, (y, gx) in results.items():
        np.testing.assert_array_equal(y, base_y, err_msg=str(key))
        np.testing.assert_array_equal(gx, base_gx, err_msg=str(key))
    np.testing.assert_array_equal(base_y, ref.psa_mask_formula(x, psa_type, 9, 9))


def test_gather_index_map():
    from custom_ops.psa_mask_common import gather_index

    idx = gather_index(5, 6, 3, 5, 0)
    assert idx.dtype == np.int32 and idx.shape == (30 * 30,) and not idx.flags.writeable
    # each real input element is used at most once; the pad slot (C*H*W) fills the rest
    real = idx[idx != 15 * 30]
    assert len(np.unique(real)) == len(real)
    np.testing.assert_array_equal(gather_index(5, 6, 3, 5, 1).reshape(30, 30), idx.reshape(30, 30).T)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_sign_of_zero(framework):
    """-0.0 is a value like any other for a copy: the compiled op keeps it forward and backward, the tensor impl
    keeps it forward. The tensor impl's backward (index_select's scatter-add into a +0.0 buffer) turns every -0.0
    of the gradient into +0.0: equal as numbers, different bits -- the one documented exception (docs/psa_mask.md)."""
    ref.require_op(framework)
    s = side(framework)
    case = SWEEP[2]
    x, y_ref, g, gx_ref = reference_case(case, 0)
    x, g = x.copy(), g.copy()
    x[..., ::2] = -0.0  # half of the input and of the upstream gradient are negative zeros
    g[..., ::2] = -0.0
    y_ref = ref.psa_mask_loop(x, 0, *case[1:3])
    gx_ref = ref.psa_mask_backward_loop(g, 0, *case[1:3])
    neg_zero_in_gx = int(np.count_nonzero((gx_ref == 0) & np.signbit(gx_ref)))
    assert neg_zero_in_gx > 0
    results = {impl: s.forward_backward(x, g, 0, case[1:3], impl)[:2] for impl in ("cpp", "tensor")}
    for impl, (y, gx) in results.items():
        np.testing.assert_array_equal(np.signbit(y), np.signbit(y_ref), err_msg=impl)
        np.testing.assert_array_equal(gx, gx_ref, err_msg=impl)
    np.testing.assert_array_equal(np.signbit(results["cpp"][1]), np.signbit(gx_ref))
    flipped = int(np.count_nonzero(np.signbit(results["tensor"][1]) != np.signbit(gx_ref)))
    assert flipped == neg_zero_in_gx  # exactly the negative zeros, all of them


# --- torch's `.out` overloads: into a caller's buffer --------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_torch_out_overloads_fill_every_element(dtype):
    """psa_mask.out / psa_mask_backward.out write the reference result into the given buffer and return it. The
    buffer is prefilled with NaN, so an element the loop skipped (a zero it did not write) would show."""
    ref.require_op("torch")
    import torch

    for case in (SWEEP[1], SWEEP[5], SWEEP[10], (1, 1, 255, 9, 128, "1xW mask")):
        mh, mw = case[1:3]
        for t in TYPES:
            x, y_ref, g, gx_ref = reference_case(case, t, np.float32)
            xt, gt = torch.from_numpy(x).to(getattr(torch, dtype)), torch.from_numpy(g).to(getattr(torch, dtype))
            out = torch.full(y_ref.shape, float("nan"), dtype=xt.dtype)
            res = torch.ops.segtwin.psa_mask.out(xt, t, mh, mw, out=out)
            assert res.data_ptr() == out.data_ptr()
            np.testing.assert_array_equal(out.numpy(), y_ref)
            gout = torch.full(gx_ref.shape, float("nan"), dtype=gt.dtype)
            torch.ops.segtwin.psa_mask_backward.out(gt, t, mh, mw, out=gout)
            np.testing.assert_array_equal(gout.numpy(), gx_ref)


def test_torch_out_overload_rejects_a_wrong_buffer():
    """A wrong buffer is an error naming what is wrong -- never a silent resize or reallocation."""
    ref.require_op("torch")
    import torch

    x = torch.randn(1, 9, 4, 5)
    op = torch.ops.segtwin.psa_mask.out
    cases = {
        "shape [1, 20, 4, 5], got [1, 20, 4, 4]": torch.empty(1, 20, 4, 4),
        "dtype Float, got Double": torch.empty(1, 20, 4, 5, dtype=torch.float64),
        "must be contiguous": torch.empty(1, 20, 5, 4).transpose(2, 3),
    }
    for message, buf in cases.items():
        with pytest.raises(RuntimeError, match=re.escape(message)):
            op(x, 0, 3, 3, out=buf)
    # out aliasing the input: a 2x2 mask on a 2x2 map has H*W = mask_h*mask_w channels, so out could be x itself
    x2 = torch.randn(1, 4, 2, 2)
    with pytest.raises(RuntimeError, match="out overlaps the input"):
        op(x2, 0, 2, 2, out=x2)


@pytest.mark.slow
def test_cpu_loops_on_two_threads():
    """tox runs the suite on one thread per worker, so the C++ loops' OpenMP paths (work items split over threads,
    an uneven last share) are exercised here: the mask op's row-block and dtype tests and the fused op's float64
    equality and many-band tests, rerun in a process whose torch, ATen and OpenMP thread counts are 2 (torch does
    not go above the machine's 2 cores here)."""
    import subprocess
    import sys

    tests = [f"tests/test_psa_mask.py::{t}" for t in ("test_row_blocks_forward_backward",
                                                      "test_dtypes_forward_backward", "test_torch_paddle_parity")]
    tests += [f"tests/test_psa_attend.py::{t}" for t in ("test_fused_equals_reference_float64",
                                                         "test_fused_many_bands")]
    code = ("import sys, torch, pytest; n = torch.get_num_threads(); "
            "assert n == 2, f'torch runs {n} threads, not the 2 of OMP_NUM_THREADS'; "
            f"sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', '-p', 'no:xdist', *{tests!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ref.REPO_ROOT, capture_output=True, text=True,
                          timeout=900, env=ref.subprocess_env(OMP_NUM_THREADS="2"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout, proc.stdout[-2000:]
