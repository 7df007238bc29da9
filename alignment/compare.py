"""The comparison core of segtwin: one function compares two arrays and returns a structured result.

Every alignment step and every test goes through :func:`compare` (or :func:`compare_dicts`, which calls it per key).
The rules close the holes of reprod_log and PaDiff (NaN that passes, silent broadcasting and transposing, means
compared instead of elements, no dtype check; listed in ``docs/references.md``, section 5):

* elementwise ``|a - b| <= atol + rtol * |b|`` (``a`` = actual = Paddle side, ``b`` = expected = torch reference);
  never a mean, never a comparison of means;
* per-dtype default tolerances from the ``torch.testing.assert_close`` table; integers and bools compare exactly;
* shapes must be equal (never broadcast, never auto-transpose) and dtypes must be equal;
* NaN/Inf on either side fails, unless ``nan_policy="same_positions"``, in which case the non-finite values must sit
  at the same positions with the same values (NaN == NaN, +Inf == +Inf) and the finite rest is compared normally;
* the difference is computed in float64 (or exactly, for integers), so the check itself adds no rounding.

This module imports neither torch nor paddle: tensors are recognised by the module of their class.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Tuple, Union

import numpy as np

__all__ = [
    "AlignmentError",
    "CompareResult",
    "DEFAULT_REASON",
    "DEFAULT_TOLERANCES",
    "NAN_POLICIES",
    "SUPPORTED_DTYPES",
    "TypedArray",
    "assert_aligned",
    "compare",
    "compare_dicts",
    "default_tolerance",
    "to_numpy",
    "to_numpy_with_dtype",
]

#: ``(rtol, atol)`` per dtype: the ``torch.testing.assert_close`` table. Integers and bools are exact.
DEFAULT_TOLERANCES: Dict[str, Tuple[float, float]] = {
    "float16": (1e-3, 1e-5),
    "bfloat16": (1.6e-2, 1e-5),
    "float32": (1.3e-6, 1e-5),
    "float64": (1e-7, 1e-7),
    **{name: (0.0, 0.0) for name in (
        "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")},
}

#: Every dtype the comparison core accepts (logical names; ``bfloat16`` is carried as exact float32 values).
SUPPORTED_DTYPES: Tuple[str, ...] = tuple(DEFAULT_TOLERANCES)
FLOAT_DTYPES: Tuple[str, ...] = ("float16", "bfloat16", "float32", "float64")
NAN_POLICIES: Tuple[str, ...] = ("fail", "same_positions")
DEFAULT_REASON = "dtype default (torch.testing table)"

Index = Tuple[int, ...]
Scalar = Union[int, float, None]


class AlignmentError(AssertionError):
    """Raised when a comparison fails; ``.result`` holds the :class:`CompareResult` (or a list of them)."""

    def __init__(self, message: str, result: Any = None) -> None:
        super().__init__(message)
        self.result = result


# ----------------------------------------------------------------------------------------------------------------
# Conversion
# ----------------------------------------------------------------------------------------------------------------


class TypedArray(NamedTuple):
    """A numpy array plus its logical dtype name.

    numpy has no bfloat16: bfloat16 tensors are carried as float32 arrays (an exact widening) with
    ``dtype="bfloat16"`` so that dtype checks and default tolerances still see bfloat16.
    :func:`compare` accepts a ``TypedArray`` wherever it accepts a tensor.
    """

    array: np.ndarray
    dtype: str


def _class_from(x: Any, package: str) -> bool:
    """True when ``x`` is (a subclass of) a ``Tensor`` class defined in ``package`` (torch or paddle)."""
    for cls in type(x).__mro__:
        module = getattr(cls, "__module__", "") or ""
        if cls.__name__ in ("Tensor", "TensorBase") and (module == package or module.startswith(package + ".")):
            return True
    return False


def _torch_to_numpy(x: Any) -> TypedArray:
    t = x.detach()
    if str(t.layout) != "torch.strided":  # sparse layouts: compare the dense values
        t = t.to_dense()
    t = t.cpu()
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    name = str(t.dtype).replace("torch.", "")
    if name == "bfloat16":
        return TypedArray(t.float().numpy(), "bfloat16")  # exact widening; numpy has no bfloat16
    return TypedArray(t.numpy(), name)


def _paddle_to_numpy(x: Any) -> TypedArray:
    name = str(x.dtype).replace("paddle.", "")
    arr = np.asarray(x.numpy())
    if name == "bfloat16":
        # paddle returns the raw bfloat16 bit patterns as uint16: widen them to float32 exactly.
        bits = arr.astype(np.uint32) << np.uint32(16)
        return TypedArray(bits.view(np.float32), "bfloat16")
    return TypedArray(arr, name)


def to_numpy_with_dtype(x: Any) -> TypedArray:
    """Convert ``x`` to a numpy array and report its logical dtype name.

    Accepts numpy arrays and scalars, python bools/ints/floats, lists/tuples of numbers, torch tensors (detached,
    moved to CPU) and paddle tensors, without importing torch or paddle.
    """
    if isinstance(x, TypedArray):
        return x
    if _class_from(x, "torch"):
        out = _torch_to_numpy(x)
    elif _class_from(x, "paddle"):
        out = _paddle_to_numpy(x)
    elif isinstance(x, (np.ndarray, np.generic)):
        arr = np.asarray(x)
        out = TypedArray(arr, arr.dtype.name)
    elif isinstance(x, (numbers.Real, list, tuple)):
        arr = np.asarray(x)
        out = TypedArray(arr, arr.dtype.name)
    else:
        raise TypeError(
            f"cannot compare an object of type {type(x).__module__}.{type(x).__qualname__}: expected a numpy array, "
            "a torch or paddle tensor, or a python number")
    if out.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"unsupported dtype {out.dtype!r} (from {type(x).__module__}.{type(x).__qualname__}); supported: "
            + ", ".join(SUPPORTED_DTYPES))
    return out


def to_numpy(x: Any) -> np.ndarray:
    """Convert ``x`` (numpy, python number, torch or paddle tensor) to a numpy array.

    bfloat16 tensors come back as float32 arrays holding the same values exactly
    (use :func:`to_numpy_with_dtype` to keep the dtype name).
    """
    return to_numpy_with_dtype(x).array


# ----------------------------------------------------------------------------------------------------------------
# Result
# ----------------------------------------------------------------------------------------------------------------


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.6g}" if math.isfinite(v) else str(v)
    return str(v)


def _fmt_index(idx: Optional[Index]) -> str:
    if idx is None:
        return "n/a"
    return "(" + ",".join(str(i) for i in idx) + (",)" if len(idx) == 1 else ")")


def _jsonable(v: Any) -> Any:
    """Plain python values; non-finite floats as the strings "nan", "inf", "-inf"."""
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, (np.bool_,)):
        return bool(v)
    if isinstance(v, (numbers.Integral,)):
        return int(v)
    if isinstance(v, numbers.Real):
        f = float(v)
        if math.isnan(f):
            return "nan"
        if math.isinf(f):
            return "inf" if f > 0 else "-inf"
        return f
    if isinstance(v, (list, tuple)):
        return [_jsonable(i) for i in v]
    if isinstance(v, Mapping):
        return {str(k): _jsonable(i) for k, i in v.items()}
    return str(v)


@dataclass
class CompareResult:
    """Outcome of one comparison. ``actual`` is the Paddle side, ``expected`` the torch reference.

    Statistics (``max_abs_diff``, ``mean_abs_diff``, ``max_rel_diff``, ``cosine``) are taken over the elements that
    are finite on both sides; non-finite elements are counted separately. ``max_abs_index`` is the WORST element
    under the tolerance rule (argmax of ``|a-b| - atol - rtol*|b|``, or the first offending non-finite element);
    ``max_abs_diff_index`` is the argmax of ``|a-b|``. Indices are tuples of ints (``()`` for 0-d arrays).
    """

    key: str
    passed: bool
    failure: Optional[str] = None  # "shape mismatch" | "dtype mismatch" | "non-finite" | "tolerance" | key failures
    detail: Optional[str] = None  # human-readable explanation of the failure
    shape_actual: Optional[Tuple[int, ...]] = None
    shape_expected: Optional[Tuple[int, ...]] = None
    dtype_actual: Optional[str] = None
    dtype_expected: Optional[str] = None
    numel: int = 0
    max_abs_diff: Optional[float] = None
    max_abs_diff_index: Optional[Index] = None
    max_abs_index: Optional[Index] = None
    actual_at_worst: Scalar = None
    expected_at_worst: Scalar = None
    allowed_at_worst: Optional[float] = None
    mean_abs_diff: Optional[float] = None
    max_rel_diff: Optional[float] = None
    mismatch_count: int = 0
    mismatch_fraction: float = 0.0
    cosine: Optional[float] = None
    nonfinite_actual: int = 0
    nonfinite_expected: int = 0
    rtol: Optional[float] = None
    atol: Optional[float] = None
    nan_policy: str = "fail"
    tolerance_reason: Optional[str] = None
    tolerance_source: Optional[str] = None

    @property
    def worst_index(self) -> Optional[Index]:
        """Alias of ``max_abs_index``: the worst element under the tolerance rule."""
        return self.max_abs_index

    def to_dict(self) -> Dict[str, Any]:
        """JSON-serialisable dict (``json.dumps(d, allow_nan=False)`` works; NaN/Inf become strings)."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def summary(self) -> str:
        """One line: verdict, key, worst error and its index, mismatch count, cosine and the tolerance."""
        head = "PASS" if self.passed else f"FAIL[{self.failure}]"
        parts = [f"{head} {self.key or '<unnamed>'}"]
        if self.failure in ("missing key", "unexpected key", "shape mismatch"):
            parts.append(self.detail or "")
        else:
            parts.append(f"max_abs={_fmt(self.max_abs_diff)} at {_fmt_index(self.max_abs_diff_index)}")
            if self.max_abs_index != self.max_abs_diff_index:
                parts.append(f"worst={_fmt_index(self.max_abs_index)}")
            pct = 100.0 * self.mismatch_fraction
            parts.append(f"rel={_fmt(self.max_rel_diff)} mismatched={self.mismatch_count}/{self.numel} "
                         f"({pct:.4g}%) cos={_fmt(self.cosine)}")
            if self.nonfinite_actual or self.nonfinite_expected:
                parts.append(f"non-finite(actual={self.nonfinite_actual}, expected={self.nonfinite_expected})")
            if self.failure == "dtype mismatch":
                parts.append(f"dtype {self.dtype_actual} != {self.dtype_expected}")
        parts.append(f"tol(rtol={_fmt(self.rtol)}, atol={_fmt(self.atol)})")
        return " ".join(p for p in parts if p)

    def __str__(self) -> str:
        lines = [self.summary()]
        if self.detail:
            lines.append(f"  detail:            {self.detail}")
        lines += [
            f"  key:               {self.key!r}",
            f"  shape:             actual={self.shape_actual} expected={self.shape_expected}",
            f"  dtype:             actual={self.dtype_actual} expected={self.dtype_expected}",
            f"  numel:             {self.numel}",
            f"  worst element:     index={_fmt_index(self.max_abs_index)} actual={_fmt(self.actual_at_worst)} "
            f"expected={_fmt(self.expected_at_worst)} allowed={_fmt(self.allowed_at_worst)}",
            f"  max abs diff:      {_fmt(self.max_abs_diff)} at {_fmt_index(self.max_abs_diff_index)}",
            f"  mean abs diff:     {_fmt(self.mean_abs_diff)}",
            f"  max rel diff:      {_fmt(self.max_rel_diff)}",
            f"  mismatched:        {self.mismatch_count}/{self.numel} ({100.0 * self.mismatch_fraction:.4g}%)",
            f"  cosine:            {_fmt(self.cosine)}",
            f"  non-finite:        actual={self.nonfinite_actual} expected={self.nonfinite_expected} "
            f"(nan_policy={self.nan_policy})",
            f"  tolerance:         |a-b| <= atol + rtol*|b| with rtol={_fmt(self.rtol)} atol={_fmt(self.atol)}",
            f"  tolerance reason:  {self.tolerance_reason}"
            + (f" [{self.tolerance_source}]" if self.tolerance_source else ""),
        ]
        return "\n".join(lines)

    def raise_if_failed(self) -> "CompareResult":
        """Raise :class:`AlignmentError` (an AssertionError) with the full report when the comparison failed."""
        if not self.passed:
            raise AlignmentError(str(self), self)
        return self


# ----------------------------------------------------------------------------------------------------------------
# Tolerances and policies
# ----------------------------------------------------------------------------------------------------------------


def default_tolerance(dtype: str) -> Tuple[float, float]:
    """``(rtol, atol)`` for a logical dtype name, from the torch.testing table (exact for ints and bool)."""
    try:
        return DEFAULT_TOLERANCES[dtype]
    except KeyError:
        raise ValueError(f"no default tolerance for dtype {dtype!r}; supported: {', '.join(SUPPORTED_DTYPES)}") \
            from None


def _check_tol_value(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)) or float(v) < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
    return float(v)


def _resolve_tolerance(dtype: str, rtol: Optional[float], atol: Optional[float],
                       reason: Optional[str]) -> Tuple[float, float, str]:
    if (rtol is None) != (atol is None):
        raise ValueError("rtol and atol must be given together (both or neither); "
                         f"got rtol={rtol!r}, atol={atol!r}")
    if rtol is None:
        r, a = default_tolerance(dtype)
        return r, a, reason or DEFAULT_REASON
    return (_check_tol_value("rtol", rtol), _check_tol_value("atol", atol),
            reason or "explicit rtol/atol from the caller (no reason given)")


def _resolve_nan_policy(nan_policy: str, equal_nan: Optional[bool]) -> str:
    if nan_policy not in NAN_POLICIES:
        raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}")
    if equal_nan is None:
        return nan_policy
    wanted = "same_positions" if equal_nan else "fail"
    if nan_policy != "fail" and nan_policy != wanted:
        raise ValueError(f"equal_nan={equal_nan!r} contradicts nan_policy={nan_policy!r}")
    return wanted


# ----------------------------------------------------------------------------------------------------------------
# Core
# ----------------------------------------------------------------------------------------------------------------


def _unravel(flat: int, shape: Tuple[int, ...]) -> Index:
    return tuple(int(i) for i in np.unravel_index(int(flat), shape))


def _scalar(arr: np.ndarray, idx: Index) -> Scalar:
    v = arr[idx]
    if arr.dtype.kind == "b":
        return bool(v)
    return int(v) if arr.dtype.kind in "iu" else float(v)


def _exact_int_absdiff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|a-b| for two integer/bool arrays of the SAME dtype, without overflow, as float64 (non-zero iff a != b)."""
    if a.dtype.kind == "b":
        a, b = a.astype(np.uint8), b.astype(np.uint8)
    hi, lo = np.maximum(a, b), np.minimum(a, b)
    # two's complement: (hi - lo) mod 2**64 is the true, non-negative difference, which fits in uint64.
    return (hi.astype(np.uint64) - lo.astype(np.uint64)).astype(np.float64)


def _cosine(x: np.ndarray, y: np.ndarray) -> float:
    """Cosine similarity of two flat float64 vectors, scaled first so that the dot product cannot overflow."""
    if x.size == 0:
        return 1.0
    nx, ny = float(np.max(np.abs(x))), float(np.max(np.abs(y)))
    if nx == 0.0 and ny == 0.0:
        return 1.0
    if nx == 0.0 or ny == 0.0:
        return 0.0
    xs, ys = x / nx, y / ny
    denom = float(np.linalg.norm(xs)) * float(np.linalg.norm(ys))
    return float(min(1.0, max(-1.0, float(np.dot(xs, ys)) / denom)))


def _nonfinite_detail(a: np.ndarray, b: np.ndarray, offenders: np.ndarray, nan_policy: str) -> str:
    first = _unravel(int(np.flatnonzero(offenders)[0]), a.shape)
    na, nb = int(np.count_nonzero(~np.isfinite(a))), int(np.count_nonzero(~np.isfinite(b)))
    count = int(np.count_nonzero(offenders))
    where = (f"first at {_fmt_index(first)} (actual={_fmt(float(a[first]))}, expected={_fmt(float(b[first]))})")
    if nan_policy == "fail":
        return (f"non-finite values with nan_policy='fail': actual has {na} "
                f"({int(np.count_nonzero(np.isnan(a)))} NaN), expected has {nb} "
                f"({int(np.count_nonzero(np.isnan(b)))} NaN); {count} offending elements, {where}")
    return (f"non-finite values differ in position or value (nan_policy='same_positions'): {count} offending "
            f"elements, {where}; actual has {na} non-finite, expected has {nb}")


def _fill_stats_finite(res: CompareResult, a: np.ndarray, b: np.ndarray, rtol: float, atol: float) -> bool:
    """Fast path of `_fill_stats` for the common case, float arrays finite everywhere on both sides (the alignment
    compares thousands of tensors per run): the same statistics without the masks. False (nothing set) when a value
    is not finite."""
    af = np.asarray(a, dtype=np.float64).reshape(-1)
    bf = np.asarray(b, dtype=np.float64).reshape(-1)
    with np.errstate(invalid="ignore", over="ignore"):
        absdiff = np.abs(af - bf)
    if not (np.isfinite(absdiff).all() and np.isfinite(bf).all()):
        return False
    res.nonfinite_actual = res.nonfinite_expected = 0
    absb = np.abs(bf)
    excess = absdiff - (atol + rtol * absb)
    res.mismatch_count = int(np.count_nonzero(excess > 0))
    res.mismatch_fraction = res.mismatch_count / a.size
    flat_max = int(np.argmax(absdiff))
    res.max_abs_diff_index = _unravel(flat_max, a.shape)
    res.max_abs_diff = float(absdiff[flat_max])
    res.mean_abs_diff = float(np.sum(absdiff) / a.size)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(absdiff == 0.0, 0.0, absdiff / absb)
    res.max_rel_diff = float(np.max(rel))
    res.cosine = _cosine(af, bf)
    worst = int(np.argmax(excess))
    idx = _unravel(worst, a.shape)
    res.max_abs_index = idx
    res.actual_at_worst = float(af[worst])
    res.expected_at_worst = float(bf[worst])
    res.allowed_at_worst = float(atol + rtol * abs(float(bf[worst])))
    if res.mismatch_count:
        res.passed, res.failure = False, "tolerance"
        res.detail = (f"{res.mismatch_count} of {res.numel} elements exceed |a-b| <= atol + rtol*|b|; worst at "
                      f"{_fmt_index(idx)}: actual={_fmt(res.actual_at_worst)} expected={_fmt(res.expected_at_worst)} "
                      f"|a-b|={_fmt(float(absdiff[worst]))} allowed={_fmt(res.allowed_at_worst)}")
    return True


def _fill_stats(res: CompareResult, a: np.ndarray, b: np.ndarray, rtol: float, atol: float, nan_policy: str) -> None:
    """Compute every statistic of ``res`` for two arrays of equal shape; sets ``passed``/``failure`` by value."""
    shape = a.shape
    res.numel = int(a.size)
    if a.size == 0:
        res.max_abs_diff, res.mean_abs_diff, res.max_rel_diff, res.cosine = 0.0, 0.0, 0.0, 1.0
        return

    exact_ints = a.dtype == b.dtype and a.dtype.kind in "biu"
    if not exact_ints and _fill_stats_finite(res, a, b, rtol, atol):
        return
    if exact_ints:
        absdiff = _exact_int_absdiff(a, b)
        bf = b.astype(np.float64)
        af = a.astype(np.float64)
        both = np.ones(shape, dtype=bool)
        offenders = np.zeros(shape, dtype=bool)
    else:
        af = np.asarray(a, dtype=np.float64)
        bf = np.asarray(b, dtype=np.float64)
        fa, fb = np.isfinite(af), np.isfinite(bf)
        both = fa & fb
        with np.errstate(invalid="ignore", over="ignore"):
            absdiff = np.where(both, np.abs(af - bf), 0.0)
        if nan_policy == "fail":
            offenders = ~both
        else:
            same_nan = np.isnan(af) & np.isnan(bf)
            same_inf = np.isinf(af) & (af == bf)
            offenders = ~both & ~(same_nan | same_inf)
    res.nonfinite_actual = int(a.size - np.count_nonzero(np.isfinite(af)))
    res.nonfinite_expected = int(b.size - np.count_nonzero(np.isfinite(bf)))

    absb = np.abs(np.where(both, bf, 0.0))
    allowed = atol + rtol * absb
    excess = np.where(both, absdiff - allowed, -np.inf)
    out_of_tol = both & (absdiff > allowed)
    mismatched = out_of_tol | offenders
    res.mismatch_count = int(np.count_nonzero(mismatched))
    res.mismatch_fraction = res.mismatch_count / a.size

    n_both = int(np.count_nonzero(both))
    if n_both:
        flat_max = int(np.argmax(np.where(both, absdiff, -1.0)))
        res.max_abs_diff_index = _unravel(flat_max, shape)
        res.max_abs_diff = float(absdiff.flat[flat_max])
        res.mean_abs_diff = float(np.sum(absdiff) / n_both)
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = np.where(absdiff == 0.0, 0.0, absdiff / absb)  # |b| == 0 and diff > 0 -> inf
        res.max_rel_diff = float(np.max(np.where(both, rel, 0.0)))
        res.cosine = _cosine(af[both], bf[both])
    if offenders.any():
        worst_flat = int(np.flatnonzero(offenders)[0])
    elif n_both:
        worst_flat = int(np.argmax(excess))
    else:
        worst_flat = None
    if worst_flat is not None:
        idx = _unravel(worst_flat, shape)
        res.max_abs_index = idx
        res.actual_at_worst = _scalar(a, idx) if exact_ints else float(af[idx])
        res.expected_at_worst = _scalar(b, idx) if exact_ints else float(bf[idx])
        res.allowed_at_worst = float(atol + rtol * abs(float(bf[idx]))) if math.isfinite(float(bf[idx])) else None

    if offenders.any():
        res.passed, res.failure = False, "non-finite"
        res.detail = _nonfinite_detail(af, bf, offenders, nan_policy)
    elif out_of_tol.any():
        res.passed, res.failure = False, "tolerance"
        res.detail = (f"{res.mismatch_count} of {res.numel} elements exceed |a-b| <= atol + rtol*|b|; worst at "
                      f"{_fmt_index(res.max_abs_index)}: actual={_fmt(res.actual_at_worst)} "
                      f"expected={_fmt(res.expected_at_worst)} |a-b|={_fmt(float(absdiff[res.max_abs_index]))} "
                      f"allowed={_fmt(res.allowed_at_worst)}")


def compare(actual: Any, expected: Any, *, key: str = "", rtol: Optional[float] = None,
            atol: Optional[float] = None, reason: Optional[str] = None, nan_policy: str = "fail",
            equal_nan: Optional[bool] = None, tolerance_source: Optional[str] = None) -> CompareResult:
    """Compare ``actual`` (Paddle side) against ``expected`` (torch reference) elementwise.

    Args:
        actual, expected: numpy arrays/scalars, python numbers, torch or paddle tensors, or :class:`TypedArray`.
        key: name of the compared quantity, carried into the result and every message.
        rtol, atol: both or neither; default from the expected dtype (torch.testing table; ints/bool exact).
        reason: why this tolerance (from the policy); defaults to ``"dtype default (torch.testing table)"``.
        nan_policy: ``"fail"`` (any NaN/Inf fails) or ``"same_positions"`` (non-finite values must coincide).
        equal_nan: shorthand: True means ``"same_positions"``, False ``"fail"``.
        tolerance_source: where the tolerance came from (e.g. ``"override #2 (tolerances.yaml:31)"``).

    Returns:
        A :class:`CompareResult`; check ``.passed`` or call ``.raise_if_failed()``.

    Raises:
        ValueError: only one of rtol/atol given, a negative or non-finite tolerance, or an unknown nan_policy.
        TypeError: an input that is not array-like or has an unsupported dtype (complex, object, string, ...).
    """
    policy = _resolve_nan_policy(nan_policy, equal_nan)
    a_t, b_t = to_numpy_with_dtype(actual), to_numpy_with_dtype(expected)
    r, t, why = _resolve_tolerance(b_t.dtype, rtol, atol, reason)
    a, b = a_t.array, b_t.array
    res = CompareResult(
        key=key, passed=True, shape_actual=tuple(int(s) for s in a.shape),
        shape_expected=tuple(int(s) for s in b.shape), dtype_actual=a_t.dtype, dtype_expected=b_t.dtype,
        numel=int(b.size), rtol=r, atol=t, nan_policy=policy, tolerance_reason=why,
        tolerance_source=tolerance_source)
    if a.shape != b.shape:
        res.passed, res.failure = False, "shape mismatch"
        res.detail = (f"shape {res.shape_actual} (actual) != {res.shape_expected} (expected); "
                      "segtwin never broadcasts or transposes")
        return res
    _fill_stats(res, a, b, r, t, policy)
    if a_t.dtype != b_t.dtype:
        by_value = "passes" if res.passed else f"also fails ({res.failure})"
        res.passed, res.failure = False, "dtype mismatch"
        res.detail = (f"dtype {a_t.dtype} (actual) != {b_t.dtype} (expected); by value it {by_value} under the "
                      f"{b_t.dtype} tolerance")
    return res


def assert_aligned(actual: Any, expected: Any, **kw: Any) -> CompareResult:
    """pytest helper: :func:`compare` and raise :class:`AlignmentError` with the full report on failure."""
    return compare(actual, expected, **kw).raise_if_failed()


def _key_failure(key: str, failure: str, detail: str) -> CompareResult:
    return CompareResult(key=key, passed=False, failure=failure, detail=detail)


def compare_dicts(actual: Mapping[str, Any], expected: Mapping[str, Any], *,
                  tolerance_for: Optional[Callable[[str, str], Any]] = None, **kw: Any) -> List[CompareResult]:
    """Compare two flat dicts key by key; the key sets must match exactly.

    A key only in ``expected`` gives a failed result with ``failure="missing key"``; a key only in ``actual`` gives
    ``failure="unexpected key"``. Results follow ``expected``'s key order, then the extra keys in ``actual``'s order.

    ``tolerance_for(key, dtype_name)`` may return a tolerance object (anything with ``rtol``, ``atol``, ``reason``,
    ``nan_policy`` and optionally ``source`` attributes, e.g. :class:`alignment.policy.Tolerance`); it then replaces
    the corresponding ``kw`` for that key. Returning None keeps ``kw`` (dtype defaults unless ``kw`` says otherwise).
    """
    results: List[CompareResult] = []
    for key, exp in expected.items():
        if key not in actual:
            results.append(_key_failure(str(key), "missing key",
                                        f"key {key!r} is in expected (torch) but missing in actual (paddle)"))
            continue
        key_kw = dict(kw)
        if tolerance_for is not None:
            tol = tolerance_for(str(key), to_numpy_with_dtype(exp).dtype)
            if tol is not None:
                key_kw.update(rtol=tol.rtol, atol=tol.atol, reason=tol.reason, nan_policy=tol.nan_policy,
                              tolerance_source=getattr(tol, "source", None))
                key_kw.pop("equal_nan", None)
        results.append(compare(actual[key], exp, key=str(key), **key_kw))
    for key in actual:
        if key not in expected:
            results.append(_key_failure(str(key), "unexpected key",
                                        f"key {key!r} is in actual (paddle) but not in expected (torch)"))
    return results
