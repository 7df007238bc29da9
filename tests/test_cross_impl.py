"""Cross-implementation alignment (`segtwin align --torch-cfg/--paddle-cfg`): one side on the reference path, the
other on the memory-saving one -- PSANet's fused PSA aggregation and DANet's efficient PAM -- and the other way
round. The alignment then proves the new path against the OTHER framework's official path, not only against its own
twin."""
from __future__ import annotations

import warnings

import pytest

import alignment
import paddle_impl.layers as PL
import paddle_impl.models.psanet as PP
import torch_ref.layers as TL
import torch_ref.models.psanet as TP
from alignment.runner import AlignmentSetupError

pytestmark = pytest.mark.slow


def _counting(monkeypatch, targets):
    calls = {}
    for side, module, attr in targets:
        fn = getattr(module, attr)
        calls[side] = 0

        def wrapper(*a, _fn=fn, _side=side, **k):
            calls[_side] += 1
            return _fn(*a, **k)
        monkeypatch.setattr(module, attr, wrapper)
    return calls


@pytest.mark.parametrize("fused_side", ["paddle", "torch"])
def test_psanet_fused_against_the_other_frameworks_reference(tmp_path, monkeypatch, fused_side):
    from custom_ops.build import BuildUnavailable, load_paddle, load_torch
    try:
        load_torch()
        load_paddle()
    except BuildUnavailable as e:
        pytest.skip(f"the compiled ops are unavailable here: {e.reason}")
    calls = _counting(monkeypatch, [("torch", TP, "psa_attend"), ("paddle", PP, "psa_attend")])
    other = "torch" if fused_side == "paddle" else "paddle"
    side_cfg = {fused_side: {"psa_impl": "fused"}, other: {"psa_impl": "cpp"}}
    # forward and loss (the training forward): the fused op's gradients are compared with the reference path's in
    # float64 in both frameworks by tests/test_psa_attend.py; a backward step here costs 35 s of the suite's budget
    steps = ("forward", "loss") if fused_side == "paddle" else ("forward",)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        v = alignment.run("psanet", out=str(tmp_path), steps=steps, iters=1, progress=False,
                          trace=False, input_size="2,3,33,33", model_cfg={"layers": 50}, side_cfg=side_cfg)
    assert v["passed"], {s: (r["worst"] or {}).get("key") for s, r in v["steps"].items()}
    assert v["provenance"]["side_cfg"] == {s: c for s, c in side_cfg.items()}
    assert calls[fused_side] >= len(steps) and calls[other] == 0  # only the fused side took the fused path
    fallbacks = [str(w.message) for w in caught if "psa_attend" in str(w.message) and "reference" in str(w.message)]
    assert not fallbacks, fallbacks  # the fused kernel really ran (no silent fallback to the reference path)


@pytest.mark.parametrize("efficient_side", ["paddle", "torch"])
def test_danet_efficient_pam_against_the_other_frameworks_reference(tmp_path, monkeypatch, efficient_side):
    calls = _counting(monkeypatch, [("torch", TL, "position_attention"), ("paddle", PL, "position_attention")])
    other = "torch" if efficient_side == "paddle" else "paddle"
    v = alignment.run("danet", out=str(tmp_path), steps=("forward", "loss"), iters=1, progress=False,
                      trace=False, input_size="2,3,33,33", model_cfg={"layers": 50},
                      side_cfg={efficient_side: {"pam_impl": "efficient"}})
    assert v["passed"], {s: (r["worst"] or {}).get("key") for s, r in v["steps"].items()}
    assert calls[efficient_side] >= 2 and calls[other] == 0


def test_a_side_option_the_model_does_not_take_is_one_error(tmp_path):
    with pytest.raises(AlignmentSetupError, match="--paddle-cfg"):
        alignment.run("pspnet", out=str(tmp_path), steps=("forward",), progress=False, trace=False,
                      side_cfg={"paddle": {"psa_impl": "fused"}})
