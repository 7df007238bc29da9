"""Tests of the tolerance policy (alignment/policy.py, alignment/tolerances.yaml) and logging hygiene
(alignment/logutil.py)."""

from __future__ import annotations

import copy
import logging
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Dict

import numpy as np
import pytest

try:
    import alignment  # noqa: F401
except ImportError:  # running from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alignment.logutil import get_logger, root_logger_guard
from alignment.policy import DEFAULT_POLICY_PATH, Policy, PolicyError, Tolerance

ROOT = Path(__file__).resolve().parents[1]
TABLE = {"float16": (1e-3, 1e-5), "bfloat16": (1.6e-2, 1e-5), "float32": (1.3e-6, 1e-5), "float64": (1e-7, 1e-7)}


def base(*overrides: Dict[str, Any]) -> Dict[str, Any]:
    return {"version": 1, "overrides": [copy.deepcopy(o) for o in overrides]}


def ov(**kw: Any) -> Dict[str, Any]:
    d = {"rtol": 1e-4, "atol": 1e-4, "reason": "measured: a test reason"}
    d.update(kw)
    return {k: v for k, v in d.items() if v is not None}


# ---------------------------------------------------------------------------------------------------- shipped file


def test_shipped_yaml_loads_with_torch_table_and_measured_overrides_only() -> None:
    p = Policy.load()
    assert Path(p.source) == DEFAULT_POLICY_PATH
    for dtype, (rtol, atol) in TABLE.items():
        t = p.default_for(dtype)
        assert (t.rtol, t.atol, t.nan_policy) == (rtol, atol, "fail")
        # a key no override names gets the default
        t = p.lookup("pspnet", "backward", "iter0/grad/layer0.0.weight", dtype)
        assert (t.rtol, t.atol, t.source) == (rtol, atol, "default")
    # every shipped override states what was measured
    for i, o in enumerate(p.overrides):
        assert "measured" in o.reason, (i, o.reason)
    # the loosened keys are exactly the documented ones
    assert p.lookup("pspnet", "forward", "logits", "float32").source.startswith("override")
    assert p.lookup("pspnet", "backward", "eval_logits_after", "float64").source.startswith("override")


def test_readme_override_table_has_a_row_per_shipped_override() -> None:
    rows = [line for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
            if line.startswith("| `") and " / " in line.split("|")[1]]
    for o in Policy.load().overrides:
        head = f"`{o.model}` / {o.step} / "
        hits = [r for r in rows if r.split("|")[1].strip().startswith(head) and f"`{o.key}`" in r.split("|")[1]]
        assert hits, f"README's override table has no row for {o.model} / {o.step} / {o.key}"
        if o.floor is not None:
            assert f"floor ×{o.floor:g}" in hits[0], hits[0]


def test_lookup_on_int_dtype_is_exact_even_with_wildcard_override() -> None:
    p = Policy.from_dict(base(ov()))  # model/step/key all "*"
    assert p.lookup("pspnet", "metric", "confusion", "int64") == p.default_for("int64")
    t = p.lookup("pspnet", "metric", "confusion", np.dtype("int64"))
    assert (t.rtol, t.atol) == (0.0, 0.0)
    assert (p.lookup("pspnet", "metric", "mask", "bool").rtol, p.lookup("x", "op", "k", "uint8").atol) == (0.0, 0.0)
    # only an override that names the integer dtype reaches it
    p2 = Policy.from_dict(base(ov(dtype="int64", rtol=0.0, atol=1.0)))
    assert p2.lookup("pspnet", "metric", "confusion", "int64").atol == 1.0


# ---------------------------------------------------------------------------------------------------- validation


def test_override_without_reason_rejected_naming_index_and_field() -> None:
    with pytest.raises(PolicyError, match=r"override #1.*reason"):
        Policy.from_dict(base(ov(), ov(reason=None)))


@pytest.mark.parametrize("reason", ["", "   ", "too short", 42])
def test_empty_or_short_reason_rejected(reason: Any) -> None:
    with pytest.raises(PolicyError, match="reason"):
        Policy.from_dict(base(ov(reason=reason)))


def test_unknown_field_rejected() -> None:
    with pytest.raises(PolicyError, match=r"override #0.*'layer'"):
        Policy.from_dict(base(ov(layer="conv1")))
    with pytest.raises(PolicyError, match="'extra'"):
        Policy.from_dict({**base(), "extra": 1})
    with pytest.raises(PolicyError, match="'tol'"):
        Policy.from_dict({"version": 1, "defaults": {"float32": {"rtol": 1.3e-6, "atol": 1e-5, "tol": 1}}})


@pytest.mark.parametrize("field,value", [("atol", -1e-5), ("rtol", -1.0), ("atol", float("nan")),
                                         ("rtol", float("inf")), ("atol", True), ("atol", "1e-4")])
def test_bad_numbers_rejected(field: str, value: Any) -> None:
    with pytest.raises(PolicyError, match=rf"override #0.*'{field}'"):
        Policy.from_dict(base(ov(**{field: value})))


def test_rtol_and_atol_go_together() -> None:
    with pytest.raises(PolicyError, match="together"):
        Policy.from_dict(base({"rtol": 1e-4, "reason": "measured: only rtol given"}))


@pytest.mark.parametrize("bad", [{"nan_policy": "ignore"}, {"dtype": "float33"}, {"step": "fwd"},
                                 {"step": "z*"}, {"model": ""}])
def test_bad_values_rejected(bad: Dict[str, Any]) -> None:
    with pytest.raises(PolicyError, match="override #0"):
        Policy.from_dict(base(ov(**bad)))


def test_version_required_and_known() -> None:
    with pytest.raises(PolicyError, match="version"):
        Policy.from_dict({"overrides": []})
    with pytest.raises(PolicyError, match="version"):
        Policy.from_dict({"version": 2, "overrides": []})


def test_defaults_must_equal_table_unless_reason() -> None:
    with pytest.raises(PolicyError, match=r"defaults\.float32.*reason"):
        Policy.from_dict({"version": 1, "defaults": {"float32": {"rtol": 1e-5, "atol": 1e-5}}})
    p = Policy.from_dict({"version": 1, "defaults": {
        "float32": {"rtol": 1e-5, "atol": 1e-5, "reason": "measured: CPU oneDNN conv drift 8e-6"}}})
    assert p.lookup("m", "loss", "k", "float32") == Tolerance(1e-5, 1e-5, "measured: CPU oneDNN conv drift 8e-6")
    with pytest.raises(PolicyError, match="dtype"):
        Policy.from_dict({"version": 1, "defaults": {"float8": {"rtol": 0.0, "atol": 0.0}}})


def test_file_errors_name_the_file_and_line(tmp_path: Path) -> None:
    f = tmp_path / "tol.yaml"
    f.write_text(textwrap.dedent("""\
        version: 1
        overrides:
          - key: "a"
            rtol: 1.0e-4
            atol: 1.0e-4
            reason: "measured: fine reason"
          - key: "b"
            rtol: 1.0e-4
            atol: 1.0e-4
        """))
    with pytest.raises(PolicyError) as ei:
        Policy.load(f)
    msg = str(ei.value)
    assert str(f) in msg and "override #1" in msg and "line 7" in msg and "reason" in msg


def test_yaml_pitfalls_rejected(tmp_path: Path) -> None:
    f = tmp_path / "tol.yaml"
    f.write_text("version: 1\noverrides:\n  - {rtol: 1e-4, atol: 1.0e-4, reason: 'measured: something'}\n")
    with pytest.raises(PolicyError, match="1.0e-4"):  # PyYAML reads 1e-4 as a string: the message says so
        Policy.load(f)
    f.write_text("version: 1\nversion: 1\noverrides: []\n")
    with pytest.raises(PolicyError, match="duplicate"):
        Policy.load(f)


def test_source_names_file_and_line(tmp_path: Path) -> None:
    f = tmp_path / "tol.yaml"
    f.write_text("version: 1\noverrides:\n  - key: 'x*'\n    rtol: 1.0e-3\n    atol: 1.0e-3\n"
                 "    reason: 'measured: fine reason'\n")
    t = Policy.load(f).lookup("pspnet", "forward", "xy", "float32")
    assert t.source == f"override #0 ({f}:3)" and t.rtol == 1e-3


# ---------------------------------------------------------------------------------------------------- matching


def test_last_matching_override_wins() -> None:
    p = Policy.from_dict(base(ov(key="logits*", atol=1e-3, reason="measured: first, broad"),
                              ov(key="logits_aux", atol=2e-3, reason="measured: second, narrow"),
                              ov(key="*", step="loss", atol=3e-3, reason="measured: third, other step")))
    assert p.lookup("pspnet", "forward", "logits", "float32").atol == 1e-3
    t = p.lookup("pspnet", "forward", "logits_aux", "float32")
    assert t.atol == 2e-3 and t.reason == "measured: second, narrow" and t.source.startswith("override #1")
    assert p.lookup("pspnet", "loss", "logits_aux", "float32").atol == 3e-3
    # reversing the order flips the winner
    p_rev = Policy.from_dict(base(ov(key="logits_aux", atol=2e-3), ov(key="logits*", atol=1e-3)))
    assert p_rev.lookup("pspnet", "forward", "logits_aux", "float32").atol == 1e-3


def test_glob_matching_on_model_step_key() -> None:
    p = Policy.from_dict(base(ov(model="psa*", step="back*", key="grad.layer[34].*", atol=5e-4)))
    assert p.lookup("psanet", "backward", "grad.layer4.0.conv1.weight", "float32").atol == 5e-4
    assert p.lookup("pspnet", "backward", "grad.layer4.0.conv1.weight", "float32").source == "default"
    assert p.lookup("psanet", "forward", "grad.layer4.0.conv1.weight", "float32").source == "default"
    assert p.lookup("psanet", "backward", "grad.layer2.0.conv1.weight", "float32").source == "default"
    with pytest.raises(ValueError, match="step"):
        p.lookup("psanet", "backwards", "k", "float32")


def test_dtype_specific_override() -> None:
    p = Policy.from_dict(base(ov(dtype="float16", rtol=1e-2, atol=1e-3)))
    assert p.lookup("m", "forward", "k", "float16").rtol == 1e-2
    assert p.lookup("m", "forward", "k", "float32").rtol == 1.3e-6


def test_nan_policy_only_override_keeps_dtype_tolerance() -> None:
    p = Policy.from_dict(base({"key": "ohem*", "nan_policy": "same_positions",
                               "reason": "measured: empty OHEM batches give NaN on both sides"}))
    t = p.lookup("pspnet", "loss", "ohem_loss", "float32")
    assert (t.rtol, t.atol, t.nan_policy) == (1.3e-6, 1e-5, "same_positions")


def test_policy_compare_uses_expected_dtype_and_reason() -> None:
    p = Policy.from_dict(base(ov(model="pspnet", step="forward", key="logits", rtol=0.0, atol=1e-3,
                                 reason="measured: 2048-channel conv drift 4e-4")))
    b = np.zeros(4, np.float32)
    a = b + np.float32(5e-4)
    r = p.compare(a, b, model="pspnet", step="forward", key="logits")
    assert r.passed and r.tolerance_reason == "measured: 2048-channel conv drift 4e-4"
    assert r.tolerance_source.startswith("override #0")
    assert not p.compare(a, b, model="danet", step="forward", key="logits").passed
    res = p.compare_dicts({"logits": a, "aux": a}, {"logits": b, "aux": b}, model="pspnet", step="forward")
    assert [r.passed for r in res] == [True, False]


def test_reference_floor_raises_atol_only_where_the_override_asks_and_says_so() -> None:
    p = Policy.from_dict(base(ov(model="m", step="backward", key="eval*", rtol=0.0, atol=1e-3, floor=2.0,
                                 reason="measured: the reference moves against itself")))
    b = np.zeros(4, np.float64)
    a = b + 0.5
    # without a measured floor the override's own atol applies
    r = p.compare(a, b, model="m", step="backward", key="eval_logits_after")
    assert not r.passed and r.atol == 1e-3
    # a floor of 0.3 -> atol 0.6 covers 0.5, and the reason carries the measurement
    r = p.compare(a, b, model="m", step="backward", key="eval_logits_after", floor=0.3)
    assert r.passed and r.atol == pytest.approx(0.6) and "0.3" in r.tolerance_reason
    # a floor of 0.2 -> atol 0.4 does not: the twin is further off than twice torch's own variation
    assert not p.compare(a, b, model="m", step="backward", key="eval_logits_after", floor=0.2).passed
    # a floor below the override's atol changes nothing
    r = p.compare(b + 5e-4, b, model="m", step="backward", key="eval_logits_after", floor=1e-6)
    assert r.passed and r.atol == 1e-3 and "below the policy's atol" in r.tolerance_reason
    # a key whose override has no floor factor ignores a measured floor
    r = p.compare(a, b, model="other", step="backward", key="eval_logits_after", floor=10.0)
    assert not r.passed and r.atol == 1e-7


@pytest.mark.parametrize("floor", [0.5, -1.0, "2", float("nan")])
def test_floor_factor_must_be_a_number_at_least_one(floor: Any) -> None:
    with pytest.raises(PolicyError, match="floor"):
        Policy.from_dict(base(ov(floor=floor)))


def test_shipped_floor_factors_are_where_the_reference_was_measured_ill_conditioned() -> None:
    p = Policy.load()
    floors = [(o.model, o.step, o.key, o.floor) for o in p.overrides if o.floor is not None]
    assert floors == [("hrnet_ocr_psa", "backward", "eval_logits_after", 3.0)]


def test_backward_step_floor_is_torch_against_itself_in_other_layouts_and_thread_counts() -> None:
    import torch

    from alignment.steps.backward import reference_floor

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3)).double()
    x = torch.randn(2, 3, 9, 11, dtype=torch.float64)
    with torch.no_grad():
        out = net(x)
    floor = reference_floor(net, x, out)
    assert 0.0 <= floor < 1e-12  # a well-conditioned float64 net reproduces itself
    assert net[0].weight.is_contiguous()  # the measurement ran on a copy: the model keeps its memory format
    threads = torch.get_num_threads()

    class Layout(torch.nn.Module):  # an output that depends on the memory format: the copy must really be evaluated
        def forward(self, t):
            return t * (2.0 if t.is_contiguous(memory_format=torch.channels_last) else 1.0)

    assert reference_floor(Layout(), x, Layout()(x)) == pytest.approx(float(x.abs().max()))

    class Threads(torch.nn.Module):  # an output that depends on the thread count: the other count must really run
        def forward(self, t):
            return t * torch.get_num_threads()

    out = Threads()(x)
    other = 2 if threads == 1 else 1
    assert reference_floor(Threads(), x, out) == pytest.approx(float(x.abs().max()) * abs(threads - other))
    assert torch.get_num_threads() == threads  # restored


# ---------------------------------------------------------------------------------------------------- logging


def test_get_logger_is_idempotent() -> None:
    a = get_logger("segtwin.test_idem")
    b = get_logger("segtwin.test_idem")
    assert a is b and len(a.handlers) == 1 and a.propagate is False


def test_root_logger_guard_restores_handlers_and_level(tmp_path: Path) -> None:
    root = logging.getLogger()
    before, level = list(root.handlers), root.level
    fh = logging.FileHandler(tmp_path / "x.log")
    with root_logger_guard():
        root.addHandler(fh)
        root.addHandler(logging.StreamHandler(sys.stdout))
        root.setLevel(logging.DEBUG)
    assert root.handlers == before and root.level == level
    assert fh.stream is None  # the added file handler was closed


def test_import_paddle_and_reprod_log_under_guard_leave_root_untouched(tmp_path: Path) -> None:
    pytest.importorskip("paddle")
    code = textwrap.dedent(f"""
        import logging, sys
        import numpy as np
        from alignment.logutil import root_logger_guard, quiet_imports
        root = logging.getLogger()
        before = (list(root.handlers), root.level)
        with root_logger_guard():
            import paddle
        assert "paddle" in sys.modules
        assert (list(root.handlers), root.level) == before, (root.handlers, root.level)
        with root_logger_guard():
            from reprod_log import ReprodDiffHelper
        h = ReprodDiffHelper()
        h.compare_info({{"x": np.zeros(2)}}, {{"x": np.zeros(2)}})
        with root_logger_guard():  # one guard per reprod_log call
            h.report(path={str(tmp_path / 'a.log')!r})
        with root_logger_guard():
            h.report(path={str(tmp_path / 'b.log')!r})
        assert (list(root.handlers), root.level) == before, (root.handlers, root.level)
    """)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, capture_output=True, timeout=120)
    a_log = (tmp_path / "a.log").read_text()
    assert a_log.count("diff check passed") == 1  # the second report did not leak into the first file


def test_paddle_import_pollutes_root_without_guard() -> None:
    """Keeps the guard honest: if paddle stopped touching the root logger, this tells us the trap moved."""
    pytest.importorskip("paddle")
    code = ("import logging; n = len(logging.getLogger().handlers); import paddle; "
            "print(len(logging.getLogger().handlers) - n)")
    out = subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert int(out.stdout.strip().splitlines()[-1]) >= 1


def test_lookup_accepts_framework_dtype_objects() -> None:
    p = Policy.from_dict(base(ov(dtype="float16", rtol=1e-2, atol=1e-3)))
    assert p.lookup("m", "forward", "k", np.float16).rtol == 1e-2
    assert p.lookup("m", "forward", "k", np.dtype("float16")).rtol == 1e-2
    torch = pytest.importorskip("torch")
    assert p.lookup("m", "forward", "k", torch.float16).rtol == 1e-2
    with pytest.raises(ValueError, match="dtype"):
        p.lookup("m", "forward", "k", "complex64")
