"""Inference defaults (issue 15): `segtwin eval` / `predict` / `export` build PSANet with the fused PSA aggregation
(`psa_impl: fused`) and DANet with the efficient PAM (`pam_impl: efficient`) unless the config sets the key;
`segtwin train` builds the recipe as written. PSANet exported with the fused op holds `psa_attend` in its static
program and `segtwin infer` runs it to the dynamic model's numbers.

One rule, in `paddle_impl.engine._cli.inference_options` (the spec's `inference_cfg` fills a key the config's
`model:` section does not have after `--opts`); every test below goes through the commands' own code paths.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import paddle
import pytest
from PIL import Image

import psa_reference as ref
from paddle_impl.config import load_config, parse_opts
from paddle_impl.engine import _cli

ROOT = Path(__file__).resolve().parents[1]
SIZE = 33  # the smallest PSANet input worth exporting: (H-1)%8 == 0, a 5x5 layer4 map, 3x3 after the PSA shrink


@pytest.fixture(scope="module")
def cs_root(tmp_path_factory):
    from paddle_impl.datasets import write_cityscapes

    root = tmp_path_factory.mktemp("cs")
    write_cityscapes(root, n=2, size=(SIZE, SIZE), splits=("train", "val"), seed=5)
    return root


def _write_cfg(path: Path, root, model: str) -> Path:
    """A tiny Cityscapes config; `model` is the YAML flow mapping of the model section."""
    path.write_text(
        "batch_size: 2\niters: 2\n"
        f"train_dataset: {{type: Cityscapes, dataset_root: {root}, split: train}}\n"
        f"val_dataset: {{type: Cityscapes, dataset_root: {root}, split: val}}\n"
        f"model: {model}\n"
        "optimizer: {type: sgd, momentum: 0.9, weight_decay: 0.0001}\n"
        "lr_scheduler: {type: poly, learning_rate: 0.01, power: 0.9}\n")
    return path


PSA = "{type: psanet, num_classes: 19, layers: 50, mask_size: 3}"
PSA_CPP = "{type: psanet, num_classes: 19, layers: 50, mask_size: 3, psa_impl: cpp}"
DAN = "{type: danet, num_classes: 19, layers: 50}"
DAN_REF = "{type: danet, num_classes: 19, layers: 50, pam_impl: reference}"


# ----------------------------------------------------------------------------------------------------------------------
# the rule (no model built)


def test_inference_options_rule(tmp_path, cs_root):
    def opts(model, *items):
        cfg = load_config(_write_cfg(tmp_path / "c.yml", cs_root, model), parse_opts(items))
        return {k: v for k, (v, _) in _cli.inference_options(cfg).items()}, _cli.inference_options(cfg)

    # absent key -> the spec's inference value
    got, full = opts(PSA)
    assert got == {"psa_impl": "fused"} and "inference default" in full["psa_impl"][1]
    got, full = opts(DAN)
    assert got == {"pam_impl": "efficient"} and "inference default" in full["pam_impl"][1]
    # a key in the YAML is the user's choice, and says where it came from
    got, full = opts(PSA_CPP)
    assert got == {"psa_impl": "cpp"} and full["psa_impl"][1] == "model.psa_impl in c.yml"
    got, _ = opts(DAN_REF)
    assert got == {"pam_impl": "reference"}
    # --opts wins over the file; null removes the key, which brings the inference value back
    got, full = opts(PSA_CPP, "model.psa_impl=tensor")
    assert got == {"psa_impl": "tensor"} and full["psa_impl"][1] == "--opts model.psa_impl"
    got, _ = opts(PSA_CPP, "model.psa_impl=null")
    assert got == {"psa_impl": "fused"}
    got, _ = opts(DAN, "model.pam_impl=reference")
    assert got == {"pam_impl": "reference"}
    # compact mode has no PSA mask: no fused default, the reason is given, and nothing is passed to the builder
    got, full = opts(PSA, "model.compact=true")
    assert got == {"psa_impl": None} and "compact mode has no PSA mask" in full["psa_impl"][1]
    assert _cli.chosen_values(full) == {}
    got, _ = opts(PSA, "model.compact=true", "model.psa_impl=tensor")  # the user's own choice is still kept
    assert got == {"psa_impl": "tensor"}
    got, _ = opts(PSA, "model.compact=false")
    assert got == {"psa_impl": "fused"}
    # a model without an attention choice gets nothing
    got, _ = opts("{type: pspnet, num_classes: 19, layers: 50}")
    assert got == {}
    # the shipped recipes do not set the keys: their inference takes the memory-saving paths, their training not
    from alignment.specs import SPECS
    for spec in SPECS.values():  # every inference key is an option of the model's builder
        assert set(spec.inference_cfg) <= set(spec.config_keys()), spec.name
    for name in ("psanet", "danet"):
        recipe = load_config(ROOT / SPECS[name].recipe)
        chosen = _cli.inference_options(recipe)
        assert {k: v for k, (v, _) in chosen.items()} == dict(SPECS[name].inference_cfg)
        assert not set(chosen) & set(recipe.raw["model"])


# ----------------------------------------------------------------------------------------------------------------------
# the inference builder vs the trainer's


@pytest.mark.slow  # builds PSANet three times (~4 s)
def test_inference_builder_takes_fused_psa_unless_set(tmp_path, cs_root, capsys):
    cfg = load_config(_write_cfg(tmp_path / "c.yml", cs_root, PSA))
    model = _cli.build_model(cfg, None)
    assert model.psa.psa_impl == "fused" and not model.training
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["segtwin: psanet inference uses psa_impl=fused (inference default; the config does not set "
                   "model.psa_impl)"]
    cfg = load_config(tmp_path / "c.yml", parse_opts(["model.psa_impl=cpp"]))
    assert _cli.build_model(cfg, None).psa.psa_impl == "cpp"
    assert "psa_impl=cpp (--opts model.psa_impl)" in capsys.readouterr().err
    # a bad value is one line and exit status 2, as any bad key
    from paddle_impl.engine import evaluate as eval_cli
    assert eval_cli.main(["--config", str(tmp_path / "c.yml"), "--opts", "model.psa_impl=bogus",
                          "--no-progress"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("segtwin eval: error: PSA psa_impl must be one of")


@pytest.mark.slow  # builds and exports one PSANet (~6 s)
def test_compact_psanet_gets_no_fused_default_and_exports_no_custom_op(tmp_path, cs_root, capsys):
    """Compact mode attends with the logits themselves: the inference builder leaves psa_impl to the model (no
    'fused runs the reference path' warning), says so in its line, and the exported graph holds no custom op."""
    import warnings

    from paddle_impl.engine import export as export_cli

    cfg_path = _write_cfg(tmp_path / "c.yml", cs_root, PSA[:-1] + ", compact: true}")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        model = _cli.build_model(load_config(cfg_path), None)
    assert model.psa.compact and model.psa.psa_impl == "auto"
    assert capsys.readouterr().err.strip().splitlines() == [
        "segtwin: psanet inference uses psa_impl as the model builds it (no inference default: compact mode has no "
        "PSA mask to fuse; the reference path)"]
    prefix = str(tmp_path / "exp" / "compact")
    assert export_cli.main(["--config", str(cfg_path), "--out", prefix, "--input-size", f"1,3,{SIZE},{SIZE}"]) == 0
    deploy = json.loads(Path(prefix + ".deploy.json").read_text())
    assert deploy["custom_ops"] == [] and deploy["model_options"] == {}


@pytest.mark.slow  # builds two trainers (~5 s)
def test_training_keeps_the_recipe_path_and_can_select_the_fused_one(tmp_path, cs_root):
    from paddle_impl.engine.trainer import Trainer

    def trainer_model(model, *items):
        cfg = load_config(_write_cfg(tmp_path / "t.yml", cs_root, model), parse_opts(items))
        tr = Trainer(cfg, tmp_path / "out", progress=False)
        tr._build()  # what `segtwin train` builds before its first iteration
        return tr.model

    assert trainer_model(PSA).psa.psa_impl == "auto"  # PSANet's own default: the path `segtwin align` verifies
    assert trainer_model(PSA, "model.psa_impl=fused").psa.psa_impl == "fused"
    assert trainer_model(DAN).head.sa.impl == "reference"


# ----------------------------------------------------------------------------------------------------------------------
# DANet: segtwin eval runs the efficient PAM by default


def test_eval_runs_efficient_pam_by_default(tmp_path, cs_root, capsys, monkeypatch):
    import paddle_impl.layers as L
    from paddle_impl.engine import evaluate as eval_cli

    calls = []
    real = L.position_attention

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(L, "position_attention", counting)
    cfg = _write_cfg(tmp_path / "d.yml", cs_root, DAN)
    out = tmp_path / "r.json"
    assert eval_cli.main(["--config", str(cfg), "--limit", "1", "--no-progress", "--out", str(out)]) == 0
    assert len(calls) == 1 and json.loads(out.read_text())["num_images"] == 1
    assert "pam_impl=efficient (inference default" in capsys.readouterr().err
    calls.clear()
    assert eval_cli.main(["--config", str(cfg), "--limit", "1", "--no-progress", "--opts",
                          "model.pam_impl=reference"]) == 0
    assert calls == []  # the official map-building PAM, as asked
    assert "pam_impl=reference (--opts model.pam_impl)" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------------
# PSANet: export holds the fused op, segtwin infer runs it


@pytest.mark.slow
def test_psanet_export_has_the_fused_op_and_infer_matches_dynamic(tmp_path, cs_root, capsys):
    ref.require_op("paddle")
    import paddle_impl
    from paddle_impl.engine import export as export_cli
    from paddle_impl.engine import predict as predict_cli
    from paddle_impl.engine.exporter import program_op_types
    from paddle_impl.engine.infer import ExportedModel

    cfg_path = _write_cfg(tmp_path / "p.yml", cs_root, PSA)
    paddle.seed(3)
    weights = tmp_path / "w.pdparams"
    paddle.save(paddle_impl.build_model("psanet", num_classes=19, layers=50, mask_size=3).state_dict(), str(weights))

    prefix = str(tmp_path / "exp" / "psa")
    assert export_cli.main(["--config", str(cfg_path), "--weights", str(weights), "--out", prefix,
                            "--input-size", f"1,3,{SIZE},{SIZE}"]) == 0
    assert "psa_impl=fused (inference default" in capsys.readouterr().err
    deploy = json.loads(Path(prefix + ".deploy.json").read_text())
    assert deploy["custom_ops"] == ["psa_attend"] and deploy["model_options"] == {"psa_impl": "fused"}
    ops = program_op_types(prefix)  # the ops are registered: this process ran them
    # both PSA branches (collect, distribute) are the fused op; no PSA mask op, no (HW x HW) bmm left
    assert ops["custom_op.psa_attend"] == 2, ops
    assert ops["custom_op.psa_mask"] == 0 and ops["pd_op.bmm"] == 0, ops

    x = np.random.RandomState(0).randn(1, 3, SIZE, SIZE).astype("float32")
    cfg = load_config(cfg_path)
    with paddle.no_grad():
        fused = _cli.build_model(cfg, str(weights))(paddle.to_tensor(x)).numpy()
        official = _cli.build_model(load_config(cfg_path, parse_opts(["model.psa_impl=cpp"])),
                                    str(weights))(paddle.to_tensor(x)).numpy()
    exported = ExportedModel(prefix, custom_ops=deploy["custom_ops"])(paddle.to_tensor(x)).numpy()
    assert exported.shape == fused.shape == (1, 19, SIZE, SIZE)
    scale = float(np.abs(fused).max())
    assert scale > 0.1  # random weights give logits of a real range: the comparisons below are not between zeros
    # measured at 1x3x33x33, |logits| <= 27.4: 0.0 against the dynamic fused model, 1.5e-5 against the reference
    # path (float32 rounding of the fused softmax/GEMM order); the bound also covers 1-vs-2-thread GEMM rounding
    np.testing.assert_allclose(exported, fused, rtol=0, atol=1e-5 * scale)     # the graph == the dynamic model
    np.testing.assert_allclose(exported, official, rtol=0, atol=1e-5 * scale)  # == PSANet's reference path

    # `segtwin infer` in a fresh process (the op library is loaded because deploy.json says custom_ops) gives the
    # labels `segtwin predict` gives with the same weights
    img = sorted(Path(cs_root, "leftImg8bit", "val").glob("*/*.png"))[0]
    assert predict_cli.main(["--config", str(cfg_path), "--weights", str(weights), "--image", str(img),
                             "--out", str(tmp_path / "pred"), "--no-progress"]) == 0
    proc = subprocess.run([sys.executable, "-m", "paddle_impl.engine.infer", "--model", prefix, "--image", str(img),
                           "--out", str(tmp_path / "inf"), "--no-progress"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=ref.subprocess_env())
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "segtwin: psanet exported graph uses psa_impl=fused" in proc.stderr
    a = np.array(Image.open(tmp_path / "pred" / (img.stem + ".png")))
    b = np.array(Image.open(tmp_path / "inf" / (img.stem + ".png")))
    assert a.shape == (SIZE, SIZE) and np.array_equal(a, b)


def test_infer_without_the_custom_ops_is_one_error(tmp_path, monkeypatch, capsys):
    """A graph exported with segtwin's custom ops, on a machine that can neither build nor load them: `segtwin
    infer` exits 2 with one line naming the graph and the reason (no traceback)."""
    import importlib

    from custom_ops.build import BuildUnavailable
    from paddle_impl.engine import infer as infer_cli

    pm = importlib.import_module("paddle_impl.ops.psa_mask")  # the module (the package exports the function)

    prefix = tmp_path / "psa"
    (tmp_path / "psa.json").write_text("{}")
    (tmp_path / "psa.pdiparams").write_bytes(b"")
    (tmp_path / "psa.deploy.json").write_text(json.dumps({"model_type": "psanet", "custom_ops": ["psa_attend"],
                                                          "input_shape": [1, 3, 33, 33]}))

    def unavailable():
        raise BuildUnavailable("no C++ compiler: 'c++' (from $CXX, default 'c++') is not on PATH")

    monkeypatch.setattr(pm, "load_op", unavailable)
    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img)
    assert infer_cli.main(["--model", str(prefix), "--image", str(img), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert f"{prefix}.json holds segtwin's custom ops" in err[0] and "no C++ compiler" in err[0]
