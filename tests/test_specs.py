"""The spec table: one spec per model is all the rest of segtwin needs.

* a toy model made of two model files (tests/toy/) and one spec is built, converted, aligned end to end and accepted
  by the training config, found through `alignment.specs.SPECS` alone (docs/adding-a-model.md);
* every shipped spec agrees with its twins (head groups, zero-initialised parameters, loss terms);
* config flows: explicit cfg wins over the checkpoint, what cannot be inferred is asked for with the exact `--cfg`;
* no import cycle: torch_ref never imports the converter, the Paddle twins never import torch;
* the provenance of a run is read off the run itself; a default run leaves only small artifacts.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import alignment
from alignment import specs
from alignment.cli import main as segtwin

ROOT = Path(__file__).resolve().parents[1]

TOY = specs.ModelSpec(
    name="toy", title="ToyNet", upstream="tests/toy (a test fixture)",
    torch_module="tests.toy.torch_toy", paddle_module="tests.toy.paddle_toy",
    official_format="plain", loss_terms=(("main", 1.0),),
    head_prefixes=("cls.",), head_lr_mult=10.0,
    input_rule="H and W even", align_input=(2, 3, 16, 16), align_cfg={"width": 8},
    recipe=str(ROOT / "tests" / "toy" / "toy.yml"),
)


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(specs.SPECS, "toy", TOY)
    return TOY


# ------------------------------------------------------------------------------------------------ the toy model
def test_toy_model_builds_converts_and_aligns_through_the_spec_alone(toy, tmp_path, capsys):
    import torch

    import paddle_impl
    import torch_ref
    from torch_ref.official import save_official

    torch.manual_seed(0)
    model = torch_ref.build_model("toy", num_classes=5, width=8)
    twin = paddle_impl.build_model("toy", num_classes=5, width=8)
    from weights_convert.keymap import torch_to_paddle_key
    assert sorted(filter(None, map(torch_to_paddle_key, model.state_dict()))) == sorted(twin.state_dict())
    save_official("toy", model, tmp_path / "toy.pth")
    assert segtwin(["convert", "toy", str(tmp_path / "toy.pth"), str(tmp_path / "toy.pdparams"), "--no-progress"]) == 0
    loaded = paddle_impl.load_pdparams("toy", tmp_path / "toy.pdparams")
    np.testing.assert_array_equal(loaded.state_dict()["cls.weight"].numpy(), model.state_dict()["cls.weight"].numpy())

    out = tmp_path / "out"
    assert segtwin(["align", "toy", "--out", str(out), "--threads", "1"]) == 0
    verdict = json.loads((out / "toy" / "verdict.json").read_text())
    assert verdict["passed"] and set(verdict["steps"]) == {"forward", "loss", "schedule", "backward", "metric"}
    assert verdict["provenance"]["input_shape"] == [2, 3, 16, 16]  # the spec's align_input
    assert verdict["provenance"]["model_cfg"] == {"num_classes": 19, "width": 8}  # the spec's align_cfg
    assert "toy: PASS" in capsys.readouterr().err


def test_toy_model_with_a_porting_bug_fails(toy, tmp_path, monkeypatch):
    """The toy goes through the real comparisons: a wrong resize on the Paddle side fails the forward step."""
    from tests.toy import paddle_toy

    def forward(self, x):
        size = paddle_toy.L.spatial_size(x)
        x = self.cls(self.down(self.stem(x)))
        return paddle_toy.L.interpolate(x, size, align_corners=True)  # BUG: torch uses False

    monkeypatch.setattr(paddle_toy.ToyNet, "forward", forward)
    v = alignment.run("toy", out=str(tmp_path), threads=1, progress=False, trace=False, steps=("forward",))
    assert not v["passed"] and not v["steps"]["forward"]["passed"]


def test_toy_model_is_accepted_by_the_training_config(toy, tmp_path):
    """The config's model keys come from the builder's signature: the toy's `width` is valid, a typo is not."""
    from paddle_impl.config import ConfigError, load_config

    cfg_text = (ROOT / "paddle_impl" / "configs" / "pspnet_r50_cityscapes.yml").read_text()
    cfg_text = re.sub(r"(?m)^model:\n(  .*\n)+", "model:\n  type: toy\n  width: 4\n", cfg_text)
    cfg_text = re.sub(r"(?m)^loss:\n(  .*\n)+", "", cfg_text)  # the toy has one loss term: spec default
    p = tmp_path / "toy.yml"
    p.write_text(cfg_text)
    cfg = load_config(p, {"train_dataset.num_classes": 19})
    assert cfg.spec is TOY and cfg.loss_coefs == {"main": 1.0}
    assert cfg.build_model().stem[0].weight.shape[0] == 4
    p.write_text(cfg_text.replace("width: 4", "widht: 4"))
    with pytest.raises(ConfigError, match=r"unknown key 'widht' in model; did you mean 'width'\?"):
        load_config(p)
    p.write_text(cfg_text.replace("width: 4", "width: four"))
    with pytest.raises(ConfigError, match=r"model.width must be int, got 'four'"):
        load_config(p)


def test_unknown_model_is_one_line_exit_2(capsys):
    assert segtwin(["align", "nosuchnet"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'nosuchnet'" in err and "pspnet" in err and "Traceback" not in err


def test_batch_of_one_runs_the_eval_steps_with_the_forward_trace(toy, tmp_path, monkeypatch):
    """N=1 is accepted when no step trains: forward, schedule and metric run, the forward trace too; the backward
    trace (training-mode BatchNorm) is left out and the report says so. A forward bug still fails at N=1."""
    v = alignment.run("toy", out=str(tmp_path / "a"), input_size="1,3,16,16", threads=1, progress=False,
                      steps=("forward", "schedule", "metric"))
    assert v["passed"] and set(v["steps"]) == {"forward", "schedule", "metric"}, v["steps"]
    assert v["provenance"]["input_shape"] == [1, 3, 16, 16]
    assert v["trace"]["layers_forward"] > 0 and v["trace"]["layers_backward"] == 0
    d = tmp_path / "a" / "toy"
    assert (d / "trace_forward.csv").is_file() and not (d / "trace_backward.csv").exists()
    assert "first divergent module (backward trace): **not run**" in (d / "report.md").read_text()
    from tests.toy import paddle_toy

    def forward(self, x):
        x = self.stem(x) * 1.001  # BUG: the stem's output scaled
        return paddle_toy.L.interpolate(self.cls(self.down(x)), paddle_toy.L.spatial_size(x), align_corners=False)

    monkeypatch.setattr(paddle_toy.ToyNet, "forward", forward)
    v = alignment.run("toy", out=str(tmp_path / "b"), input_size="1,3,16,16", threads=1, progress=False,
                      steps=("forward",))
    assert not v["steps"]["forward"]["passed"] and v["trace"]["first_divergent_forward"] == "down.0"


@pytest.mark.parametrize("steps,named", [("forward,loss,schedule,backward,metric", "loss and backward"),
                                         ("forward,loss", "loss"), ("backward", "backward")])
def test_batch_of_one_is_refused_where_a_step_trains(toy, tmp_path, capsys, steps, named):
    assert segtwin(["align", "toy", "--input-size", "1,3,16,16", "--steps", steps, "--out", str(tmp_path)]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if "OMP_NUM_THREADS" not in ln]
    assert len(err) == 1 and f"N must be >= 2 for the {named} step(s)" in err[0] and "got N=1" in err[0], err
    assert not (tmp_path / "toy").exists()  # refused before anything is built or written
    from alignment.runner import AlignmentSetupError

    with pytest.raises(AlignmentSetupError, match="N must be >= 2"):
        alignment.run("toy", out=str(tmp_path), input_size="1,3,16,16", progress=False, steps=steps.split(","))


# ------------------------------------------------------------------------------------------------ shipped specs
@pytest.mark.parametrize("name", specs.model_names())
def test_shipped_spec_agrees_with_its_twins(name):
    import torch

    spec = specs.get_spec(name)
    for fw in ("torch", "paddle"):
        mod = spec.module(fw)
        assert callable(mod.build) and callable(mod.infer_config)
    with torch.device("meta"):
        model = spec.build("torch", num_classes=3)
    params = dict(model.named_parameters())
    for prefix in spec.head_prefixes:
        assert any(n.startswith(prefix) for n in params), f"{name}: head prefix {prefix!r} matches no parameter"
    assert any(not n.startswith(spec.head_prefixes) for n in params), f"{name}: no backbone parameter left"
    for n in spec.zero_init_params:
        assert n in params, f"{name}: zero_init_params names {n!r}, not a parameter"
    for alias, prefixes in spec.partial_aliases.items():
        for p in prefixes:
            assert any(k.startswith(p) for k in model.state_dict()), f"{name}: --partial {alias} prefix {p!r}"
    from torch_ref.official import FORMATS
    assert spec.official_format in FORMATS
    from weights_convert.keymap import FLAVOURS
    assert set(spec.source_flavours) <= set(FLAVOURS)
    if spec.recipe:
        assert (ROOT / spec.recipe).is_file()


def test_readme_model_table_is_the_generated_one():
    """The README's model table is `specs.markdown_table()` (regenerate it when a spec changes)."""
    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- specs:begin -->\n")[1].split("\n<!-- specs:end -->")[0]
    assert block == specs.markdown_table()
    assert [line.split("|")[1].strip().strip("`") for line in block.splitlines()[2:]] == specs.model_names()


# ------------------------------------------------------------------------------------------------ config flows
def test_cfg_items_parse_lists_and_reject_bad_items():
    assert specs.parse_cfg_items(["psa_type=0", "mask_size=7,11", "compact=true", "x=[1, 2]", "f=1.0e-3"]) == \
        {"psa_type": 0, "mask_size": [7, 11], "compact": True, "x": [1, 2], "f": 1e-3}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        specs.parse_cfg_items(["psa_type"])
    with pytest.raises(ValueError, match="given twice"):
        specs.parse_cfg_items(["a=1", "a=2"])


def test_psanet_builders_take_semsegs_own_mask_names():
    import torch

    import torch_ref
    with torch.device("meta"):
        m = torch_ref.build_model("psanet", num_classes=2, psa_type=0, mask_h=7, mask_w=11)
        assert (m.psa.mask_h, m.psa.mask_w) == (7, 11)
        m = torch_ref.build_model("psanet", num_classes=2, mask_size=[5, 3])
        assert (m.psa.mask_h, m.psa.mask_w) == (5, 3)
        with pytest.raises(ValueError, match="contradicts"):
            torch_ref.build_model("psanet", num_classes=2, mask_size=5, mask_h=7, mask_w=7)
        with pytest.raises(ValueError, match="give both mask_h and mask_w"):
            torch_ref.build_model("psanet", num_classes=2, mask_h=7)


def test_explicit_cfg_wins_and_the_missing_value_names_its_option():
    import torch

    sd = {"cls.4.weight": torch.empty(3, 512, 1, 1), "psa.attention.3.weight": torch.empty(77, 512, 1, 1)}
    sd.update({f"layer3.{i}.conv1.weight": torch.empty(1) for i in range(6)})
    spec = specs.get_spec("psanet")
    with pytest.raises(specs.ConfigInferenceError, match=r"--cfg mask_size=MASK_H,MASK_W"):
        spec.infer_config(sd)
    with pytest.raises(specs.ConfigInferenceError, match=r"--cfg psa_type=0 or --cfg psa_type=1"):
        spec.infer_config(sd, {"mask_size": [7, 11]})
    cfg = spec.infer_config(sd, {"mask_size": [7, 11], "psa_type": 1, "num_classes": 5})
    assert cfg == {"num_classes": 5, "layers": 50, "mask_size": [7, 11], "psa_type": 1}


def _psanet_ckpt(path, psa_type, mask):
    import torch

    import torch_ref
    from torch_ref.official import save_official
    torch.manual_seed(0)
    model = torch_ref.build_model("psanet", num_classes=3, psa_type=psa_type, mask_size=mask)
    return save_official("psanet", model, path)


def _cli(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "alignment.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_psanet_checkpoint_that_cannot_tell_its_cfg_is_refused_with_the_option(tmp_path):
    ckpt = _psanet_ckpt(tmp_path / "p0.pth", 0, (3, 5))
    for cmd in (["convert", "psanet", str(ckpt), str(tmp_path / "x.pdparams")],
                ["align", "psanet", "--weights", str(ckpt), "--out", str(tmp_path / "o"), "--steps", "forward"]):
        r = _cli(*cmd)
        assert r.returncode == 2, r.stderr
        assert "--cfg mask_size=MASK_H,MASK_W" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = _cli("convert", "psanet", str(ckpt), str(tmp_path / "x.pdparams"), "--cfg", "mask_size=3,5")
    assert r.returncode == 2 and "--cfg psa_type=0 or --cfg psa_type=1" in r.stderr, r.stderr
    assert not (tmp_path / "x.pdparams").exists()


PSANET_CFG_CASES = [(t, m) for t in (0, 1, 2) for m in ((3, 3), (3, 5))]


@pytest.mark.slow
@pytest.mark.parametrize("psa_type,mask", PSANET_CFG_CASES, ids=[f"type{t}-mask{m[0]}x{m[1]}" for t, m in
                                                                 PSANET_CFG_CASES])
def test_semseg_psanet_checkpoint_converts_loads_and_aligns_with_cfg(tmp_path, psa_type, mask):
    """A semseg-format PSANet of every psa_type, square and non-square mask: `--cfg` reaches convert and align."""
    import paddle_impl
    import torch_ref

    ckpt = _psanet_ckpt(tmp_path / "psanet.pth", psa_type, mask)
    cfg = [] if mask[0] == mask[1] else ["--cfg", f"mask_size={mask[0]},{mask[1]}"]
    cfg += [] if psa_type == 2 else ["--cfg", f"psa_type={psa_type}"]
    assert segtwin(["convert", "psanet", str(ckpt), str(tmp_path / "psanet.pdparams"), "--no-progress", *cfg]) == 0
    given = specs.parse_cfg_items(cfg[1::2])
    tm = torch_ref.load_official("psanet", ckpt, **given)
    pm = paddle_impl.load_pdparams("psanet", tmp_path / "psanet.pdparams", **given)
    for m in (tm, pm):
        assert (m.psa.psa_type, m.psa.mask_h, m.psa.mask_w) == (psa_type, *mask)
    del tm, pm
    # forward + loss show that both twins run the config; one case (single branch, non-square) runs every step
    steps = "forward,loss,backward,metric" if (psa_type, mask) == (0, (3, 5)) else "forward,loss"
    assert segtwin(["align", "psanet", "--weights", str(ckpt), "--out", str(tmp_path / "out"), "--input-size",
                    "2,3,33,33", "--iters", "1", "--no-trace", "--threads", "2", "--steps", steps, *cfg]) == 0
    v = json.loads((tmp_path / "out" / "psanet" / "verdict.json").read_text())
    used = v["provenance"]["model_cfg"]
    assert v["passed"] and used["psa_type"] == psa_type
    got = used["mask_size"] if isinstance(used["mask_size"], list) else [used["mask_size"]] * 2
    assert got == list(mask)


# ------------------------------------------------------------------------------------------------ no import cycle
@pytest.mark.parametrize("stmt,absent", [
    ("import torch_ref, torch_ref.official, torch_ref.models.psanet, torch_ref.models.danet", ("weights_convert",
                                                                                                "paddle")),
    ("import paddle_impl, paddle_impl.models.pspnet, paddle_impl.models.danet, paddle_impl.losses, "
     "paddle_impl.config", ("torch", "torch_ref", "weights_convert")),
    ("import alignment, alignment.specs", ("torch", "paddle")),
])
def test_package_imports_stay_one_way(stmt, absent):
    code = f"import sys; {stmt}; print(sorted(m for m in {absent!r} if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", f"{stmt} imported {r.stdout.strip()}"


# ------------------------------------------------------------------------------------------------ provenance, size
def test_provenance_is_read_off_the_run(toy, tmp_path):
    v = alignment.run("toy", out=str(tmp_path / "a"), threads=1, progress=False, trace=False,
                      steps=("forward", "backward"), lockstep=False, iters=2)
    p = v["provenance"]
    assert p["lockstep"] is False and p["free_run"] is True
    assert p["dtypes"] == {"forward": "float32", "backward": "float64"}
    assert p["device"]["torch"] == ["cpu"] and p["device"]["paddle_get_device"] == "cpu"
    assert p["threads"]["torch"] == 1
    v = alignment.run("toy", out=str(tmp_path / "b"), threads=1, progress=False, trace=False, steps=("forward",))
    assert v["provenance"]["lockstep"] is None and v["provenance"]["dtypes"] == {"forward": "float32"}


def test_default_run_keeps_no_weights_and_reports_its_size(toy, tmp_path):
    v = alignment.run("toy", out=str(tmp_path / "a"), threads=1, progress=False, trace=False, steps=("forward",))
    wdir = tmp_path / "a" / "toy" / "weights"
    assert sorted(f.name for f in wdir.iterdir()) == ["convert_report.json"]
    on_disk = sum(f.stat().st_size for f in (tmp_path / "a").rglob("*") if f.is_file())
    assert v["artifacts_bytes"] == on_disk
    v = alignment.run("toy", out=str(tmp_path / "b"), threads=1, progress=False, trace=False, steps=("forward",),
                      keep_weights=True)
    kept = sorted(f.name for f in (tmp_path / "b" / "toy" / "weights").iterdir())
    assert kept == ["convert_report.json", "toy.pdparams", "toy_random_official.pth"]
