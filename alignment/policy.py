"""Tolerance policy as data (``alignment/tolerances.yaml``).

The policy maps ``(model, step, key, dtype)`` to a :class:`Tolerance`. Defaults are per dtype and must equal the
torch.testing table unless the entry carries a reason; overrides are fnmatch globs over model, step and key, each
with a REQUIRED measured reason, evaluated in order with the LAST match winning (like ``.gitignore``).

Integer and bool dtypes are exact: an override applies to them only when it names that dtype explicitly, so a
``step: metric`` override written for float mIoU can never loosen the integer confusion matrix.

Reference floor: an override may carry ``floor: F`` (a factor >= 1). A step that measures how far the torch
reference moves against ITSELF on the compared quantity (the same state evaluated through different kernels, e.g.
a channels_last copy) passes that measurement to :meth:`Policy.compare`; the tolerance then becomes
``atol = max(atol, F x floor)`` and the result's reason states the measured floor. Where the step measures nothing
the override's own ``atol`` applies unchanged. This is for quantities the reference itself cannot reproduce to the
policy's tolerance (an ill-conditioned network state), never a way around a port difference: the floor is measured
in the same run, on torch alone.
"""

from __future__ import annotations

import fnmatch
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np
import yaml

from .compare import (DEFAULT_REASON, DEFAULT_TOLERANCES, FLOAT_DTYPES, NAN_POLICIES, SUPPORTED_DTYPES,
                      CompareResult, compare, compare_dicts, to_numpy_with_dtype)

__all__ = ["DEFAULT_POLICY_PATH", "Policy", "PolicyError", "STEPS", "Tolerance"]

DEFAULT_POLICY_PATH = Path(__file__).with_name("tolerances.yaml")
SUPPORTED_VERSIONS = (1,)
#: The steps a policy can address (``trace`` = per-layer capture, ``op`` = custom-op parity, ``weights`` = the
#: state comparison of `alignment.any_port.align_models`).
STEPS: Tuple[str, ...] = ("forward", "loss", "schedule", "backward", "metric", "trace", "op", "weights")
MIN_REASON_LEN = 10

_TOP_FIELDS = ("version", "defaults", "overrides")
_DEFAULT_FIELDS = ("rtol", "atol", "reason", "nan_policy")
_OVERRIDE_FIELDS = ("model", "step", "key", "dtype", "rtol", "atol", "nan_policy", "floor", "reason")
_GLOB_CHARS = set("*?[")


class PolicyError(ValueError):
    """An invalid tolerance policy; the message names the file, the entry and the offending field."""


@dataclass(frozen=True)
class Tolerance:
    """The tolerance for one comparison: ``|a-b| <= atol + rtol*|b|``."""

    rtol: float
    atol: float
    reason: str
    nan_policy: str = "fail"
    source: str = "default"  # "default" or "override #i (file:line)"
    floor: Optional[float] = None  # factor on the reference's own measured variation (see the module docstring)


@dataclass(frozen=True)
class _Override:
    index: int
    model: str
    step: str
    key: str
    dtype: Optional[str]
    rtol: Optional[float]
    atol: Optional[float]
    nan_policy: Optional[str]
    reason: str
    where: str
    floor: Optional[float] = None

    def matches(self, model: str, step: str, key: str, dtype: str) -> bool:
        if self.dtype is None:
            if dtype not in FLOAT_DTYPES:  # ints/bool stay exact unless the override names their dtype
                return False
        elif self.dtype != dtype:
            return False
        return (fnmatch.fnmatchcase(model, self.model) and fnmatch.fnmatchcase(step, self.step)
                and fnmatch.fnmatchcase(key, self.key))


# ----------------------------------------------------------------------------------------------------------------
# YAML loading (duplicate keys rejected, line numbers kept)
# ----------------------------------------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate mapping keys (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> Dict[Any, Any]:
        seen: Dict[Any, int] = {}
        for key_node, _ in node.value:
            k = self.construct_object(key_node, deep=deep)
            if k in seen:
                raise PolicyError(f"duplicate key {k!r} at line {key_node.start_mark.line + 1} "
                                  f"(first at line {seen[k]})")
            seen[k] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _override_lines(text: str) -> List[int]:
    """1-based line of each item of the top-level ``overrides`` list (empty if not found)."""
    root = yaml.compose(text, Loader=_StrictLoader)
    if not isinstance(root, yaml.MappingNode):
        return []
    for k, v in root.value:
        if isinstance(k, yaml.ScalarNode) and k.value == "overrides" and isinstance(v, yaml.SequenceNode):
            return [item.start_mark.line + 1 for item in v.value]
    return []


# ----------------------------------------------------------------------------------------------------------------
# Validation helpers
# ----------------------------------------------------------------------------------------------------------------


def _number(v: Any, what: str) -> float:
    if isinstance(v, str):
        hint = (" (PyYAML reads exponents without a dot, like 1e-4, as strings: write 1.0e-4)"
                if _looks_numeric(v) else "")
        raise PolicyError(f"{what} must be a finite number >= 0, got the string {v!r}{hint}")
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)) or float(v) < 0:
        raise PolicyError(f"{what} must be a finite number >= 0, got {v!r}")
    return float(v)


def _looks_numeric(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def _reason(v: Any, what: str) -> str:
    if v is None:
        raise PolicyError(f"{what}: field 'reason' is required (a measured justification, "
                          f">= {MIN_REASON_LEN} characters)")
    if not isinstance(v, str) or len(v.strip()) < MIN_REASON_LEN:
        raise PolicyError(f"{what}: field 'reason' must be a string of at least {MIN_REASON_LEN} characters "
                          f"saying what was measured, got {v!r}")
    return v.strip()


def _nan_policy(v: Any, what: str) -> str:
    if v not in NAN_POLICIES:
        raise PolicyError(f"{what}: field 'nan_policy' must be one of {list(NAN_POLICIES)}, got {v!r}")
    return str(v)


def _dtype(v: Any, what: str) -> str:
    if not isinstance(v, str) or v not in SUPPORTED_DTYPES:
        raise PolicyError(f"{what}: unknown dtype {v!r}; known: {', '.join(SUPPORTED_DTYPES)}")
    return v


def _glob(v: Any, what: str, field_name: str) -> str:
    if not isinstance(v, str) or not v:
        raise PolicyError(f"{what}: field {field_name!r} must be a non-empty glob string, got {v!r}")
    return v


def _step_glob(v: Any, what: str) -> str:
    g = _glob(v, what, "step")
    if not any(fnmatch.fnmatchcase(s, g) for s in STEPS):
        kind = "matches no step" if _GLOB_CHARS & set(g) else "is not a step"
        raise PolicyError(f"{what}: field 'step' {g!r} {kind}; steps: {', '.join(STEPS)}")
    return g


def _unknown_fields(d: Mapping[str, Any], allowed: Tuple[str, ...], what: str) -> None:
    extra = [k for k in d if k not in allowed]
    if extra:
        raise PolicyError(f"{what}: unknown field(s) {', '.join(map(repr, extra))}; allowed: {', '.join(allowed)}")


def _pair(d: Mapping[str, Any], what: str) -> Tuple[Optional[float], Optional[float]]:
    if ("rtol" in d) != ("atol" in d):
        raise PolicyError(f"{what}: 'rtol' and 'atol' must be given together")
    if "rtol" not in d:
        return None, None
    return _number(d["rtol"], f"{what}: field 'rtol'"), _number(d["atol"], f"{what}: field 'atol'")


def _normalise_dtype(dtype: Any) -> str:
    """Accept 'float32', np.float32, np.dtype('float32'), torch.float32 or paddle.float32."""
    candidates = [dtype] if isinstance(dtype, str) else [str(dtype), getattr(dtype, "name", None)]
    for c in candidates:
        if isinstance(c, str):
            name = c.lower()
            for prefix in ("torch.", "paddle.", "numpy."):
                if name.startswith(prefix):
                    name = name[len(prefix):]
            if name in SUPPORTED_DTYPES:
                return name
    try:
        name = np.dtype(dtype).name
    except TypeError:
        name = ""
    if name not in SUPPORTED_DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(SUPPORTED_DTYPES)}")
    return name


# ----------------------------------------------------------------------------------------------------------------
# Policy
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Policy:
    """A validated tolerance policy. Build it with :meth:`load` or :meth:`from_dict`."""

    defaults: Dict[str, Tolerance]
    overrides: List[_Override] = field(default_factory=list)
    source: str = "<dict>"

    @classmethod
    def load(cls, path: Union[str, Path, None] = None) -> "Policy":
        """Load and validate a YAML policy (default: the packaged ``alignment/tolerances.yaml``)."""
        p = Path(path) if path is not None else DEFAULT_POLICY_PATH
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as e:
            raise PolicyError(f"{p}: cannot read tolerance policy: {e}") from e
        try:
            data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - SafeLoader subclass
            lines = _override_lines(text)
        except PolicyError as e:
            raise PolicyError(f"{p}: {e}") from None
        except yaml.YAMLError as e:
            raise PolicyError(f"{p}: invalid YAML: {e}") from e
        return cls.from_dict(data, source=str(p), _lines=lines)

    @classmethod
    def from_dict(cls, d: Any, source: str = "<dict>", *, _lines: Optional[List[int]] = None) -> "Policy":
        """Validate a policy given as a plain dict (the parsed YAML)."""
        if not isinstance(d, Mapping):
            raise PolicyError(f"{source}: a policy must be a mapping with 'version', 'defaults', 'overrides'; "
                              f"got {type(d).__name__}")
        _unknown_fields(d, _TOP_FIELDS, source)
        if "version" not in d:
            raise PolicyError(f"{source}: field 'version' is required (supported: {SUPPORTED_VERSIONS})")
        if isinstance(d["version"], bool) or d["version"] not in SUPPORTED_VERSIONS:
            raise PolicyError(f"{source}: unknown version {d['version']!r} (supported: {SUPPORTED_VERSIONS})")
        defaults = _parse_defaults(d.get("defaults") or {}, source)
        raw = d.get("overrides")
        if raw is None:
            raw = []
        if not isinstance(raw, list):
            raise PolicyError(f"{source}: 'overrides' must be a list, got {type(raw).__name__}")
        lines = _lines or []
        overrides = [_parse_override(o, i, source, lines[i] if i < len(lines) else None) for i, o in enumerate(raw)]
        return cls(defaults=defaults, overrides=overrides, source=source)

    def default_for(self, dtype: Any) -> Tolerance:
        """The dtype default (no override applied)."""
        return self.defaults[_normalise_dtype(dtype)]

    def lookup(self, model: str, step: str, key: str, dtype: Any) -> Tolerance:
        """The tolerance for one compared key: the LAST matching override, else the dtype default."""
        if step not in STEPS:
            raise ValueError(f"unknown step {step!r}; steps: {', '.join(STEPS)}")
        name = _normalise_dtype(dtype)
        base = self.defaults[name]
        for o in reversed(self.overrides):
            if o.matches(model, step, key, name):
                rtol, atol = (o.rtol, o.atol) if o.rtol is not None else (base.rtol, base.atol)
                return Tolerance(rtol=rtol, atol=atol, reason=o.reason,
                                 nan_policy=o.nan_policy or base.nan_policy, source=o.where, floor=o.floor)
        return base

    def tolerance_for(self, model: str, step: str) -> Callable[[str, str], Tolerance]:
        """A ``tolerance_for(key, dtype)`` callable for :func:`alignment.compare.compare_dicts`."""
        return lambda key, dtype: self.lookup(model, step, key, dtype)

    def compare(self, actual: Any, expected: Any, *, model: str, step: str, key: str,
                floor: Optional[float] = None) -> CompareResult:
        """Compare under this policy; the tolerance is looked up by the EXPECTED (torch) array's dtype.

        `floor`: the torch reference's own variation on this quantity, measured by the step; it raises atol only
        where the matching override carries a ``floor`` factor (module docstring)."""
        a, b = to_numpy_with_dtype(actual), to_numpy_with_dtype(expected)
        tol = self.lookup(model, step, key, b.dtype)
        atol, reason = tol.atol, tol.reason
        if floor is not None:
            floor = _number(floor, f"measured reference floor for {model}/{step}/{key}")
            if tol.floor is not None and tol.floor * floor > atol:
                atol = tol.floor * floor
                reason = (f"{reason} [reference floor measured in this run: torch moves by {floor:.3g} against "
                          f"itself; atol = {tol.floor:g} x floor = {atol:.3g}]")
            elif tol.floor is not None:
                reason = f"{reason} [reference floor measured in this run: {floor:.3g}, below the policy's atol]"
        return compare(a, b, key=key, rtol=tol.rtol, atol=atol, reason=reason, nan_policy=tol.nan_policy,
                       tolerance_source=tol.source)

    def compare_dicts(self, actual: Mapping[str, Any], expected: Mapping[str, Any], *, model: str,
                      step: str) -> List[CompareResult]:
        """:func:`alignment.compare.compare_dicts` with this policy's tolerance for every key."""
        return compare_dicts(actual, expected, tolerance_for=self.tolerance_for(model, step))

    def to_dict(self) -> Dict[str, Any]:
        """The effective policy as plain data (for provenance in verdict.json)."""
        return {
            "source": self.source,
            "defaults": {k: {"rtol": t.rtol, "atol": t.atol, "nan_policy": t.nan_policy, "reason": t.reason}
                         for k, t in self.defaults.items()},
            "overrides": [{f: getattr(o, f) for f in ("model", "step", "key", "dtype", "rtol", "atol", "nan_policy",
                                                      "floor", "reason", "where")} for o in self.overrides],
        }


def _parse_defaults(raw: Any, source: str) -> Dict[str, Tolerance]:
    if not isinstance(raw, Mapping):
        raise PolicyError(f"{source}: 'defaults' must be a mapping dtype -> {{rtol, atol}}, got {type(raw).__name__}")
    out = {name: Tolerance(rtol=r, atol=a, reason=DEFAULT_REASON) for name, (r, a) in DEFAULT_TOLERANCES.items()}
    for name, entry in raw.items():
        what = f"{source}: defaults.{name}"
        _dtype(name, f"{source}: defaults")
        if not isinstance(entry, Mapping):
            raise PolicyError(f"{what} must be a mapping with 'rtol' and 'atol'")
        _unknown_fields(entry, _DEFAULT_FIELDS, what)
        rtol, atol = _pair(entry, what)
        if rtol is None:
            raise PolicyError(f"{what}: 'rtol' and 'atol' are required")
        table = DEFAULT_TOLERANCES[name]
        policy = _nan_policy(entry["nan_policy"], what) if "nan_policy" in entry else "fail"
        if (rtol, atol) != table or policy != "fail":
            if "reason" not in entry:
                raise PolicyError(f"{what}: (rtol={rtol}, atol={atol}, nan_policy={policy}) differs from the "
                                  f"torch.testing table {table} with nan_policy=fail; field 'reason' is required "
                                  "to change a default")
        why = _reason(entry["reason"], what) if "reason" in entry else DEFAULT_REASON
        out[name] = Tolerance(rtol=rtol, atol=atol, reason=why, nan_policy=policy, source="default")
    return out


def _parse_override(o: Any, i: int, source: str, line: Optional[int]) -> _Override:
    where = f"override #{i} ({source}:{line})" if line is not None else f"override #{i} ({source})"
    what = f"{source}: override #{i}" + (f" (line {line})" if line is not None else "")
    if not isinstance(o, Mapping):
        raise PolicyError(f"{what}: must be a mapping, got {type(o).__name__}")
    _unknown_fields(o, _OVERRIDE_FIELDS, what)
    reason = _reason(o.get("reason"), what)
    rtol, atol = _pair(o, what)
    nan_policy = _nan_policy(o["nan_policy"], what) if "nan_policy" in o else None
    floor = _number(o["floor"], f"{what}: field 'floor'") if "floor" in o else None
    if floor is not None and floor < 1.0:
        raise PolicyError(f"{what}: field 'floor' is a factor on the reference's own measured variation and must "
                          f"be >= 1, got {floor!r}")
    if rtol is None and nan_policy is None and floor is None:
        raise PolicyError(f"{what}: changes nothing; give 'rtol' and 'atol', 'nan_policy' or 'floor'")
    return _Override(
        index=i,
        model=_glob(o.get("model", "*"), what, "model"),
        step=_step_glob(o.get("step", "*"), what),
        key=_glob(o.get("key", "*"), what, "key"),
        dtype=_dtype(o["dtype"], what) if "dtype" in o else None,
        rtol=rtol, atol=atol, nan_policy=nan_policy, reason=reason, where=where, floor=floor)
