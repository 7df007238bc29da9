"""Tests of the comparison core (alignment/compare.py).

Each hole of reprod_log / PaDiff listed in docs/references.md (section 5) has a test here that would fail if segtwin
had the same hole.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

try:
    import alignment  # noqa: F401
except ImportError:  # running from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alignment.compare import (AlignmentError, CompareResult, assert_aligned, compare, compare_dicts,
                               to_numpy, to_numpy_with_dtype)

RNG = np.random.default_rng(1234)


def f32(*vals: float) -> np.ndarray:
    return np.array(vals, dtype=np.float32)


# ---------------------------------------------------------------------------------------------------- basics


def test_identical_arrays_pass_with_dtype_default() -> None:
    x = RNG.standard_normal((3, 4)).astype(np.float32)
    r = compare(x, x.copy(), key="logits")
    assert r.passed and r.failure is None
    assert (r.rtol, r.atol) == (1.3e-6, 1e-5)
    assert r.tolerance_reason == "dtype default (torch.testing table)"
    assert r.max_abs_diff == 0.0 and r.mismatch_count == 0 and r.cosine == pytest.approx(1.0)


@pytest.mark.parametrize("dtype,expected", [
    (np.float16, (1e-3, 1e-5)), (np.float32, (1.3e-6, 1e-5)), (np.float64, (1e-7, 1e-7)),
    (np.int64, (0.0, 0.0)), (np.uint8, (0.0, 0.0)), (np.bool_, (0.0, 0.0))])
def test_default_tolerance_table(dtype: type, expected: tuple) -> None:
    r = compare(np.zeros(2, dtype=dtype), np.zeros(2, dtype=dtype))
    assert (r.rtol, r.atol) == expected


def test_empty_arrays_of_equal_shape_pass() -> None:
    r = compare(np.zeros((0, 3), np.float32), np.zeros((0, 3), np.float32))
    assert r.passed and r.numel == 0 and r.mismatch_fraction == 0.0
    assert not compare(np.zeros((0, 3), np.float32), np.zeros((3, 0), np.float32)).passed


def test_zero_dim_arrays() -> None:
    r = compare(np.float32(1.0), np.float32(1.5), key="loss")
    assert not r.passed and r.max_abs_index == () and r.max_abs_diff == 0.5


# ---------------------------------------------------------------------------------------------------- NaN / Inf


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("side", ["actual", "expected"])
def test_non_finite_on_one_side_fails(bad: float, side: str) -> None:
    clean = f32(1.0, 2.0, 3.0)
    dirty = f32(1.0, bad, 3.0)
    a, b = (dirty, clean) if side == "actual" else (clean, dirty)
    for policy in ("fail", "same_positions"):
        r = compare(a, b, key="k", nan_policy=policy)
        assert not r.passed and r.failure == "non-finite", (policy, r)
        assert r.max_abs_index == (1,)
        assert "(1,)" in r.detail


def test_both_nan_same_positions_passes_only_under_same_positions() -> None:
    a = f32(1.0, np.nan, 3.0, np.inf)
    b = f32(1.0, np.nan, 3.0, np.inf)
    strict = compare(a, b, key="k")
    assert not strict.passed and strict.failure == "non-finite"
    assert strict.mismatch_count == 2 and strict.nonfinite_actual == 2 and strict.nonfinite_expected == 2
    assert compare(a, b, nan_policy="same_positions").passed
    assert compare(a, b, equal_nan=True).passed
    # the finite part is still compared under same_positions
    r = compare(f32(1.5, np.nan), f32(1.0, np.nan), nan_policy="same_positions")
    assert not r.passed and r.failure == "tolerance" and r.max_abs_index == (0,)


def test_nan_at_different_positions_fails_under_same_positions() -> None:
    r = compare(f32(np.nan, 2.0, 3.0), f32(1.0, np.nan, 3.0), key="k", nan_policy="same_positions")
    assert not r.passed and r.failure == "non-finite" and r.mismatch_count == 2
    assert r.max_abs_index == (0,)


def test_inf_sign_or_kind_must_match_under_same_positions() -> None:
    assert not compare(f32(np.inf), f32(-np.inf), nan_policy="same_positions").passed
    assert not compare(f32(np.nan), f32(np.inf), nan_policy="same_positions").passed


def test_conflicting_equal_nan_raises() -> None:
    with pytest.raises(ValueError):
        compare(f32(1.0), f32(1.0), nan_policy="same_positions", equal_nan=False)
    with pytest.raises(ValueError):
        compare(f32(1.0), f32(1.0), nan_policy="nope")


# ---------------------------------------------------------------------------------------------------- shapes


def test_no_broadcast_4_vs_4x1() -> None:
    r = compare(np.zeros(4, np.float32), np.zeros((4, 1), np.float32), key="w")
    assert not r.passed and r.failure == "shape mismatch"
    assert r.shape_actual == (4,) and r.shape_expected == (4, 1)


def test_no_transpose_2x3_vs_3x2() -> None:
    x = RNG.standard_normal((2, 3)).astype(np.float32)
    r = compare(x, x.T.copy(), key="w")
    assert not r.passed and r.failure == "shape mismatch"


def test_square_matrix_vs_transpose_fails_by_value_with_true_argmax() -> None:
    w = RNG.standard_normal((6, 6)).astype(np.float64)
    r = compare(w, w.T, key="fc.weight")
    assert not r.passed and r.failure == "tolerance"
    err = np.abs(w - w.T) - (r.atol + r.rtol * np.abs(w.T))  # independent argmax of the excess
    want = tuple(int(i) for i in np.unravel_index(int(np.argmax(err)), w.shape))
    assert r.max_abs_index == want
    assert r.actual_at_worst == w[want] and r.expected_at_worst == w.T[want]
    want_abs = np.unravel_index(int(np.argmax(np.abs(w - w.T))), w.shape)
    assert r.max_abs_diff == pytest.approx(float(np.abs(w - w.T).max()))
    assert r.max_abs_diff_index == tuple(int(i) for i in want_abs)


def test_one_element_off_by_half_in_a_million_fails_at_that_index() -> None:
    b = RNG.standard_normal((1000, 1000)).astype(np.float32)
    a = b.copy()
    a[123, 456] += 0.5
    assert np.abs(a - b).mean() <= 1e-6  # reprod_log's default 'mean' rule would call this aligned
    r = compare(a, b, key="feat")
    assert not r.passed and r.failure == "tolerance"
    assert r.mismatch_count == 1 and r.numel == 1_000_000
    assert r.max_abs_index == (123, 456) and r.max_abs_diff_index == (123, 456)
    assert r.max_abs_diff == pytest.approx(0.5, abs=1e-6)


def test_permutation_fails() -> None:  # PaDiff's mean mode passes it
    x = RNG.standard_normal(100).astype(np.float32)
    assert not compare(RNG.permutation(x), x).passed


# ---------------------------------------------------------------------------------------------------- dtypes


def test_float32_vs_float64_is_a_dtype_mismatch() -> None:
    x = RNG.standard_normal(5)
    r = compare(x.astype(np.float32), x, key="k")
    assert not r.passed and r.failure == "dtype mismatch"
    assert r.dtype_actual == "float32" and r.dtype_expected == "float64"


def test_ints_compare_exactly() -> None:
    b = np.arange(10, dtype=np.int64)
    assert compare(b.copy(), b).passed
    a = b.copy()
    a[7] += 1
    r = compare(a, b, key="confusion")
    assert not r.passed and r.failure == "tolerance" and r.max_abs_index == (7,) and r.mismatch_count == 1
    assert (r.actual_at_worst, r.expected_at_worst) == (8, 7)


def test_int64_extremes_do_not_overflow_or_round() -> None:
    big = np.array([2**62, -(2**62), 2**60], dtype=np.int64)
    near = big.copy()
    near[2] += 1  # 2**60 + 1 is not representable in float64: a float comparison would call it equal
    r = compare(near, big)
    assert not r.passed and r.mismatch_count == 1 and r.max_abs_index == (2,) and r.max_abs_diff == 1.0
    far = np.array([-(2**62), 2**62, 2**60], dtype=np.int64)
    assert compare(far, big).max_abs_diff == pytest.approx(2.0**63)


def test_bools_compare_exactly() -> None:
    r = compare(np.array([True, False, True]), np.array([True, True, True]))
    assert not r.passed and r.max_abs_index == (1,)


def test_tolerance_boundary_is_inclusive() -> None:
    # dyadic values: atol + rtol*|b| = 0.5 + 0.25*1 = 0.75 exactly, |a - b| = 0.75 exactly
    b = np.array([1.0, -2.0])
    at = np.array([1.75, -2.0])
    assert compare(at, b, rtol=0.25, atol=0.5).passed
    above = np.array([np.nextafter(1.75, 2.0), -2.0])
    r = compare(above, b, rtol=0.25, atol=0.5)
    assert not r.passed and r.max_abs_index == (0,)


def test_relative_tolerance_uses_expected_side() -> None:
    # |a-b| = 1, rtol*|b| = 0.1*10 = 1 passes; swapping the roles gives rtol*|a| = 0.9 and fails.
    assert compare(np.array([9.0]), np.array([10.0]), rtol=0.1, atol=0.0).passed
    assert not compare(np.array([10.0]), np.array([9.0]), rtol=0.1, atol=0.0).passed


def test_rtol_without_atol_raises() -> None:
    with pytest.raises(ValueError, match="together"):
        compare(f32(1.0), f32(1.0), rtol=1e-3)
    with pytest.raises(ValueError, match="together"):
        compare(f32(1.0), f32(1.0), atol=1e-3)
    with pytest.raises(ValueError):
        compare(f32(1.0), f32(1.0), rtol=-1.0, atol=0.0)


def test_unsupported_inputs_raise() -> None:
    with pytest.raises(TypeError):
        compare(np.array([1 + 2j]), np.array([1 + 2j]))
    with pytest.raises(TypeError):
        compare(object(), f32(1.0))


# ---------------------------------------------------------------------------------------------------- statistics


def test_statistics() -> None:
    b = np.array([1.0, 2.0, 0.0, 4.0])
    a = np.array([1.0, 2.5, 0.0, 3.0])
    r = compare(a, b, rtol=0.0, atol=0.0)
    assert r.mismatch_count == 2 and r.mismatch_fraction == 0.5
    assert r.mean_abs_diff == pytest.approx(1.5 / 4)
    assert r.max_abs_diff == 1.0 and r.max_abs_diff_index == (3,)
    assert r.max_rel_diff == pytest.approx(0.25)
    cos = float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    assert r.cosine == pytest.approx(cos)
    assert compare(np.array([1.0]), np.array([0.0])).max_rel_diff == float("inf")
    assert compare(np.array([0.0]), np.array([0.0])).max_rel_diff == 0.0


def test_cosine_of_negation_is_minus_one_and_zeros_are_one() -> None:
    x = RNG.standard_normal(50).astype(np.float32)
    assert compare(-x, x).cosine == pytest.approx(-1.0)
    assert compare(np.zeros(5), np.zeros(5)).cosine == 1.0
    big = np.full(4, 1e300)
    assert compare(big, big).cosine == pytest.approx(1.0)  # no overflow in the dot product


def test_worst_index_differs_from_max_abs_index_under_rtol() -> None:
    b = np.array([1000.0, 1.0])
    a = np.array([1001.0, 1.5])  # diff 1.0 is allowed at 1000 (rtol 1e-2 -> 10), diff 0.5 at 1 is not
    r = compare(a, b, rtol=1e-2, atol=0.0)
    assert r.max_abs_diff_index == (0,) and r.max_abs_index == (1,)
    assert "worst=(1,)" in r.summary()


# ---------------------------------------------------------------------------------------------------- reporting


def test_json_serialisable_without_nan_literals() -> None:
    r = compare(f32(np.nan, 1.0, np.inf), f32(1.0, 1.0, -np.inf), key="k")
    text = json.dumps(r.to_dict(), allow_nan=False)
    d = json.loads(text)
    assert d["actual_at_worst"] == "nan" and d["passed"] is False and d["max_abs_index"] == [0]
    all_nan = compare(f32(np.nan), f32(np.nan))
    json.dumps(all_nan.to_dict(), allow_nan=False)
    inf_rel = compare(np.array([1.0]), np.array([0.0]))
    assert json.loads(json.dumps(inf_rel.to_dict(), allow_nan=False))["max_rel_diff"] == "inf"


def test_raise_if_failed_message_holds_key_index_and_tolerance() -> None:
    b = np.zeros((3, 4), np.float32)
    a = b.copy()
    a[2, 1] = 1.0
    with pytest.raises(AlignmentError) as ei:
        compare(a, b, key="head.cls.weight", rtol=1e-4, atol=2e-4,
                reason="measured: conv accumulation 1e-4").raise_if_failed()
    msg = str(ei.value)
    assert isinstance(ei.value, AssertionError)
    assert "head.cls.weight" in msg and "(2,1)" in msg
    assert "rtol=0.0001" in msg and "atol=0.0002" in msg and "measured: conv accumulation" in msg
    assert isinstance(ei.value.result, CompareResult)


def test_summary_format() -> None:
    r = compare(f32(1.0, 2.0), f32(1.0, 2.0), key="x")
    s = r.summary()
    assert s.startswith("PASS x max_abs=0 at ") and "mismatched=0/2 (0%)" in s and "tol(rtol=1.3e-06, atol=1e-05)" in s
    assert "\n" not in s and "tolerance reason" in str(r)


def test_assert_aligned_returns_result_and_raises() -> None:
    r = assert_aligned(f32(1.0), f32(1.0), key="ok")
    assert isinstance(r, CompareResult) and r.passed
    with pytest.raises(AlignmentError, match="bad"):
        assert_aligned(f32(1.0), f32(2.0), key="bad")


# ---------------------------------------------------------------------------------------------------- dicts


def test_compare_dicts_missing_and_extra_keys() -> None:
    exp = {"a": f32(1.0), "b": f32(2.0), "c": f32(3.0)}
    act = {"c": f32(3.0), "a": f32(1.0), "z": f32(0.0)}
    res = compare_dicts(act, exp)
    assert [r.key for r in res] == ["a", "b", "c", "z"]
    by = {r.key: r for r in res}
    assert by["a"].passed and by["c"].passed
    assert not by["b"].passed and by["b"].failure == "missing key" and "'b'" in by["b"].detail
    assert not by["z"].passed and by["z"].failure == "unexpected key" and "'z'" in by["z"].detail
    assert "b" in by["b"].summary()
    json.dumps([r.to_dict() for r in res], allow_nan=False)


def test_compare_dicts_tolerance_for() -> None:
    from types import SimpleNamespace

    seen = []

    def tol(key: str, dtype: str):
        seen.append((key, dtype))
        if key == "loose":
            return SimpleNamespace(rtol=0.0, atol=0.1, reason="measured: test tolerance", nan_policy="fail",
                                   source="test")
        return None

    res = compare_dicts({"loose": f32(1.05), "tight": f32(1.05)}, {"loose": f32(1.0), "tight": f32(1.0)},
                        tolerance_for=tol)
    assert [r.passed for r in res] == [True, False]
    assert res[0].tolerance_reason == "measured: test tolerance" and res[0].tolerance_source == "test"
    assert seen == [("loose", "float32"), ("tight", "float32")]


# ---------------------------------------------------------------------------------------------------- frameworks


def test_to_numpy_python_and_numpy_inputs() -> None:
    assert to_numpy(1.5).dtype == np.float64 and to_numpy(3).dtype == np.int64
    assert to_numpy(np.float32(2.0)).dtype == np.float32
    x = np.arange(3)
    assert to_numpy(x) is x


def test_module_imports_no_framework() -> None:
    code = textwrap.dedent("""
        import sys
        import alignment, alignment.compare, alignment.policy, alignment.logutil
        bad = [m for m in ("torch", "paddle", "reprod_log") if m in sys.modules]
        assert not bad, bad
    """)
    root = str(Path(__file__).resolve().parents[1])
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


def test_torch_and_paddle_tensors() -> None:
    torch = pytest.importorskip("torch")
    from alignment.logutil import quiet_imports

    (paddle,) = quiet_imports("paddle")
    x = RNG.standard_normal((2, 3)).astype(np.float32)
    t = torch.tensor(x, requires_grad=True)
    p = paddle.to_tensor(x, stop_gradient=False)
    assert compare(p, t, key="logits").passed
    assert compare(p * 2, t).failure == "tolerance"
    assert compare(p.astype("float64"), t).failure == "dtype mismatch"
    pb = paddle.to_tensor([1.5, -2.0, 3.25], dtype="bfloat16")
    tb = torch.tensor([1.5, -2.0, 3.25], dtype=torch.bfloat16)
    assert to_numpy_with_dtype(pb).dtype == "bfloat16" and to_numpy_with_dtype(tb).dtype == "bfloat16"
    np.testing.assert_array_equal(to_numpy(pb), [1.5, -2.0, 3.25])  # not the raw uint16 bits
    r = compare(pb, tb)
    assert r.passed and (r.rtol, r.atol) == (1.6e-2, 1e-5)
    assert compare(pb, tb.float()).failure == "dtype mismatch"
