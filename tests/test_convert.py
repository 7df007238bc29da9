"""weights_convert on checkpoints in the official formats, made from random weights (tests/ckpt_factory.py).

PSPNet-ResNet50 with 3 classes: small enough to build in about a second, real enough to have every key of the
official model (deep stem, four dilated stages, PPM, cls, aux, BN buffers).
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import ckpt_factory as F  # noqa: I001  (first: puts the repository on sys.path when it is not installed)
import numpy as np
import pytest
import torch

import torch_ref
from weights_convert import CheckpointError, ConversionError, ConversionReport, convert, read_checkpoint
from weights_convert.cli import main as cli_main
from weights_convert.convert import _import_paddle
from weights_convert.keymap import (KEYMAPS, ModelKeymap, linear_weight_keys, materialize, plan_conversion,
                                    torch_to_paddle_key)

paddle = _import_paddle()
import paddle_impl  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES = 3
IMAGENET_FC_REASON = "drop: ImageNet classifier (not in the segmentation model)"


# --------------------------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """The module's checkpoints (~2 GB of ResNet-50/101 files): removed when the module is done."""
    path = tmp_path_factory.mktemp("convert")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def model():
    return F.random_pspnet(NUM_CLASSES, seed=0)


@pytest.fixture(scope="module")
def semseg_ckpt(model, work) -> Path:
    return F.save_semseg_checkpoint(model, work / "train_epoch_3.pth")


@pytest.fixture(scope="module")
def converted(semseg_ckpt, work):
    dst, rep_path = work / "pspnet.pdparams", work / "pspnet_convert.json"
    rep = convert("pspnet", semseg_ckpt, dst, report=rep_path)
    return rep, dst, rep_path


def _variant(model, path, edit) -> Path:
    sd = OrderedDict(model.state_dict())
    edit(sd)
    return F.save_semseg_checkpoint(sd, path)


# kind -> (edit of the state dict, strings the error must contain)
BAD = {
    "missing": (lambda sd: sd.pop("layer2.1.conv2.weight"), ["layer2.1.conv2.weight", "missing"]),
    "missing-bn-buffer": (lambda sd: sd.pop("layer3.2.bn1.running_var"),
                          ["layer3.2.bn1._variance", "layer3.2.bn1.running_var", "missing"]),
    "unexpected": (lambda sd: sd.__setitem__("extra_head.weight", torch.zeros(4, 4)), ["extra_head.weight", "unused"]),
    "mis-shaped": (lambda sd: sd.__setitem__("layer1.0.conv2.weight", torch.zeros(64, 64, 1, 1)),
                   ["layer1.0.conv2.weight", "[64, 64, 1, 1]", "[64, 64, 3, 3]", "mis-shaped"]),
}


@pytest.fixture(scope="module")
def bad_ckpts(model, work) -> dict:
    return {kind: _variant(model, work / f"bad_{kind}.pth", edit) for kind, (edit, _) in BAD.items()}


def _cli(argv, capsys):
    rc = cli_main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _error_line(err: str) -> str:
    """The CLI's error line (stderr may also carry a finished progress bar)."""
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def _no_temporaries(directory: Path) -> None:
    left = sorted(p.name for p in directory.iterdir() if ".tmp" in p.name)  # `.X.tmp-abc` or `.X.abc.tmp`
    assert left == [], left


# --------------------------------------------------------------------------------------------------------------------
# round trip


@pytest.fixture(scope="module")
def loaded_twin(converted):
    return paddle_impl.load_pdparams("pspnet", converted[1])


def test_round_trip_every_value_bit_exact(model, loaded_twin):
    twin = loaded_twin
    twin_sd = twin.state_dict()
    compared = 0
    for key, value in model.state_dict().items():
        pkey = torch_to_paddle_key(key)
        if pkey is None:
            assert key.endswith("num_batches_tracked")
            continue
        got = twin_sd[pkey].numpy()
        want = value.numpy()
        assert got.dtype == want.dtype and got.shape == want.shape, key
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), f"{key} -> {pkey} differs"
        compared += 1
    assert compared == len(twin_sd)


def test_round_trip_forward_agrees(model, loaded_twin):
    twin = loaded_twin
    x = np.random.default_rng(0).standard_normal((1, 3, 33, 33)).astype(np.float32)
    with torch.no_grad():
        want = model.eval()(torch.from_numpy(x)).numpy()
    got = twin.eval()(paddle.to_tensor(x)).numpy()
    assert got.shape == want.shape == (1, NUM_CLASSES, 33, 33)
    # The weights are bit-exact (test above); what is left is float32 summation order in the two frameworks' conv
    # kernels, judged by the project's tolerance policy for PSPNet forward logits (alignment/tolerances.yaml).
    try:
        from alignment.compare import assert_aligned
        from alignment.policy import Policy
    except ImportError:  # pragma: no cover - alignment not there yet
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(want).max())))
        return
    tol = Policy.load().lookup("pspnet", "forward", "logits", "float32")
    assert_aligned(got, want, key="logits", rtol=tol.rtol, atol=tol.atol, reason=tol.reason)


def test_round_trip_report(model, semseg_ckpt, converted):
    rep, dst, rep_path = converted
    assert isinstance(rep, ConversionReport) and rep.ok
    n_src = len(model.state_dict())
    assert [r.source for r in rep.rows] == list(model.state_dict())  # one row per source key, in file order
    assert all(r.action in ("copy", "rename", "drop") for r in rep.rows)
    drops = rep.rows_with("drop")
    assert {r.source for r in drops} == {k for k in model.state_dict() if k.endswith("num_batches_tracked")}
    assert all("step counter" in r.reason for r in drops)
    renamed = {r.source: r.target for r in rep.rows_with("rename")}
    assert renamed["layer0.1.running_mean"] == "layer0.1._mean"
    assert renamed["ppm.features.3.2.running_var"] == "ppm.features.3.2._variance"
    assert rep.cfg == {"num_classes": NUM_CLASSES, "layers": 50} == rep.cfg_inferred
    assert rep.info["unwrapped"] == "state_dict" and rep.info["stripped_prefix"] == "module."
    assert sorted(rep.info["ignored_top_level_keys"]) == ["epoch", "optimizer"]
    assert rep.info["size_bytes"] == semseg_ckpt.stat().st_size and len(rep.info["sha256"]) == 64

    data = json.loads(rep_path.read_text())
    assert data["ok"] is True and len(data["rows"]) == n_src
    assert data["summary"] == rep.summary and sum(data["summary"].values()) == n_src
    row = next(r for r in data["rows"] if r["source"] == "cls.4.weight")
    assert row == {"source": "cls.4.weight", "target": "cls.4.weight", "source_shape": [NUM_CLASSES, 512, 1, 1],
                   "target_shape": [NUM_CLASSES, 512, 1, 1], "dtype": "float32", "action": "copy", "reason": ""}
    assert data["cfg"]["num_classes"] == NUM_CLASSES
    assert data["memory"]["checkpoint_bytes"] == semseg_ckpt.stat().st_size


def test_pdparams_reads_back_as_a_paddle_state_dict(model, converted):
    _, dst, _ = converted
    sd = paddle.load(str(dst))
    assert isinstance(sd, dict) and all(isinstance(v, paddle.Tensor) for v in sd.values())
    assert list(sd) == [torch_to_paddle_key(k) for k in model.state_dict() if torch_to_paddle_key(k)]
    assert oct(dst.stat().st_mode & 0o777) != oct(0o600)  # an ordinary file, not mkstemp's private mode


def test_load_official_strict(model, semseg_ckpt, bad_ckpts):
    ref = torch_ref.load_official("pspnet", semseg_ckpt)
    assert not ref.training and ref.num_classes == NUM_CLASSES
    for k, v in model.state_dict().items():
        assert torch.equal(ref.state_dict()[k], v), k
    with pytest.raises(RuntimeError, match=r"layer2\.1\.conv2\.weight"):
        torch_ref.load_official("pspnet", bad_ckpts["missing"])


# --------------------------------------------------------------------------------------------------------------------
# key mismatches: every offending key named, library and CLI


@pytest.mark.parametrize("kind", list(BAD))
def test_mismatch_names_the_key(kind, bad_ckpts, work, capsys):
    src = bad_ckpts[kind]
    dst = work / f"out_{kind}.pdparams"
    with pytest.raises(ConversionError) as ei:
        convert("pspnet", src, dst)
    msg = str(ei.value)
    for s in BAD[kind][1]:
        assert s in msg, (s, msg)
    assert "\n" not in msg
    assert ei.value.report is not None and not ei.value.report.ok
    assert not dst.exists()

    rc, out, err = _cli(["pspnet", src, dst, "--report", work / f"rep_{kind}.json", "--no-progress"], capsys)
    assert rc == 2
    line = _error_line(err)
    for s in BAD[kind][1]:
        assert s in line
    assert not dst.exists()
    rep = json.loads((work / f"rep_{kind}.json").read_text())  # the report is written for a failed plan too
    assert rep["ok"] is False and rep["error"] == msg
    _no_temporaries(work)


def test_all_offending_keys_are_named_grouped(model, work):
    def edit(sd):
        sd.pop("aux.4.bias")
        sd.pop("cls.1.weight")
        sd["bogus.a"] = torch.zeros(1)
        sd["bogus.b"] = torch.zeros(1)
        sd["layer4.0.conv1.weight"] = torch.zeros(3)
    src = _variant(model, work / "bad_many.pth", edit)
    with pytest.raises(ConversionError) as ei:
        convert("pspnet", src, work / "many.pdparams")
    msg = str(ei.value)
    assert "2 unused source keys: bogus.a, bogus.b" in msg
    assert "2 missing twin keys: " in msg and "aux.4.bias" in msg and "cls.1.weight" in msg
    assert "1 mis-shaped keys: layer4.0.conv1.weight [3] -> layer4.0.conv1.weight [512, 1024, 1, 1]" in msg


@pytest.mark.slow
def test_cli_subprocess_one_line_error(bad_ckpts, work):
    dst = work / "sub.pdparams"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "weights_convert", "pspnet", str(bad_ckpts["missing"]), str(dst)],
                          capture_output=True, text=True, env=env, cwd=str(work), timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "layer2.1.conv2.weight" in errors[0], proc.stderr
    assert not dst.exists()


def test_cli_num_classes_override_mismatch(semseg_ckpt, work, capsys):
    rc, _, err = _cli(["pspnet", semseg_ckpt, work / "nc.pdparams", "--num-classes", "5"], capsys)
    assert rc == 2
    line = _error_line(err)
    assert "cls.4.weight [3, 512, 1, 1] -> cls.4.weight [5, 512, 1, 1]" in line and "aux.4.bias" in line


# --------------------------------------------------------------------------------------------------------------------
# malicious and broken files


class _OpenOnLoad:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


class _SystemOnLoad:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@pytest.mark.parametrize("payload,global_name", [(_OpenOnLoad, "io.open"), (_SystemOnLoad, "system")])
@pytest.mark.parametrize("fmt", ["pth", "pth-inside-state-dict", "pkl"])
def test_malicious_pickle_is_refused_without_running(payload, global_name, fmt, tmp_path, capsys):
    sentinel = tmp_path / "pwned"
    evil = payload(sentinel)
    if fmt == "pkl":
        path = tmp_path / "model_final.pkl"
        with open(path, "wb") as f:
            pickle.dump({"model": {"w": np.zeros(2, np.float32), "x": evil}}, f, protocol=4)
    elif fmt == "pth":
        path = tmp_path / "evil.pth"
        torch.save({"epoch": 1, "state_dict": {"w": torch.zeros(2)}, "optimizer": evil}, path)
    else:
        path = tmp_path / "evil.pth"
        torch.save({"state_dict": {"module.w": torch.zeros(2), "module.x": evil}}, path)
    with pytest.raises(CheckpointError) as ei:
        read_checkpoint(path)
    msg = str(ei.value)
    assert msg.startswith(f"refused: {path} contains pickled code/objects that weights_only loading does not allow")
    assert global_name in msg and msg.endswith("segtwin never executes checkpoint code") and "\n" not in msg
    assert not sentinel.exists()

    rc, _, err = _cli(["pspnet", path, tmp_path / "out.pdparams"], capsys)
    assert rc == 2 and "refused" in _error_line(err) and global_name in err
    assert not sentinel.exists() and not (tmp_path / "out.pdparams").exists()


def test_load_official_refuses_malicious_pth(tmp_path):
    sentinel = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "x": _OpenOnLoad(sentinel)}, path)
    with pytest.raises(CheckpointError, match="refused"):
        torch_ref.load_official("pspnet", path)
    assert not sentinel.exists()


def _broken(kind: str, tmp: Path, semseg_ckpt: Path) -> tuple:
    if kind == "truncated":
        p = tmp / "truncated.pth"
        data = semseg_ckpt.read_bytes()
        p.write_bytes(data[: len(data) // 2])
        return p, "truncated"
    if kind == "truncated-legacy":
        p = tmp / "legacy.pth"
        torch.save({"state_dict": {"w": torch.zeros(1000)}}, p, _use_new_zipfile_serialization=False)
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 2])
        return p, "truncated"
    if kind == "truncated-pkl":
        p = F.save_detectron2_pkl({"w": np.ones(1000, np.float32)}, tmp / "half.pkl")
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 2])
        return p, "truncated"
    if kind == "text":
        p = tmp / "notes.pth"
        p.write_text("these are not weights\n")
        return p, "not a checkpoint"
    if kind == "empty":
        p = tmp / "empty.pth"
        p.write_bytes(b"")
        return p, "empty"
    if kind == "missing":
        return tmp / "nope.pth", "no such file"
    if kind == "directory":
        p = tmp / "adir.pth"
        p.mkdir()
        return p, "directory"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["truncated", "truncated-legacy", "truncated-pkl", "text", "empty", "missing",
                                  "directory"])
def test_unreadable_file_is_one_line_error(kind, tmp_path, semseg_ckpt, capsys):
    path, what = _broken(kind, tmp_path, semseg_ckpt)
    with pytest.raises(CheckpointError) as ei:
        read_checkpoint(path)
    msg = str(ei.value)
    assert str(path) in msg and what in msg and "\n" not in msg, msg
    assert ei.value.path == str(path)
    rc, _, err = _cli(["pspnet", path, tmp_path / "out.pdparams"], capsys)
    assert rc == 2 and str(path) in _error_line(err)
    assert not (tmp_path / "out.pdparams").exists()


# --------------------------------------------------------------------------------------------------------------------
# reader: containers, prefixes, formats


def test_reader_danet_container_without_prefix(tmp_path):
    sd = OrderedDict([("head.sa.query_conv.weight", torch.randn(64, 512, 1, 1)), ("head.sa.gamma", torch.zeros(1))])
    p = tmp_path / "danet.pth.tar"
    torch.save({"epoch": 240, "state_dict": sd, "optimizer": {"state": {}}, "best_pred": 0.8}, p)
    got, info = read_checkpoint(p)
    assert list(got) == list(sd) and all(torch.equal(got[k], sd[k]) for k in sd)
    assert info["format"] == "torch-zip" and info["unwrapped"] == "state_dict" and info["stripped_prefix"] is None
    assert info["ignored_top_level_keys"] == ["epoch", "optimizer", "best_pred"]


def test_reader_flat_and_model_container_and_legacy(tmp_path):
    sd = {"a.weight": torch.arange(6.0).reshape(2, 3), "a.num_batches_tracked": torch.tensor(7)}
    torch.save(sd, tmp_path / "flat.pt")
    got, info = read_checkpoint(tmp_path / "flat.pt")
    assert info["unwrapped"] is None and info["ignored_top_level_keys"] == [] and list(got) == list(sd)
    assert got["a.num_batches_tracked"].dtype == torch.int64
    torch.save({"model": sd, "iteration": 9}, tmp_path / "d2.pth")
    got, info = read_checkpoint(tmp_path / "d2.pth")
    assert info["unwrapped"] == "model" and info["ignored_top_level_keys"] == ["iteration"]
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, tmp_path / "old.pth",
               _use_new_zipfile_serialization=False)
    got, info = read_checkpoint(tmp_path / "old.pth")  # legacy format: no mmap, same result
    assert info["format"] == "torch-legacy" and info["stripped_prefix"] == "module."
    assert torch.equal(got["a.weight"], sd["a.weight"])


def test_reader_rejects_odd_layouts(tmp_path):
    cases = {
        "partial_prefix.pth": ({"state_dict": {"module.a": torch.zeros(1), "b": torch.zeros(1)}},
                               ["only some keys start with 'module.'", "module.a", "b"]),
        "non_tensor.pth": ({"state_dict": {"a": torch.zeros(1), "b.scale": 0.5}}, ["'b.scale'", "float"]),
        "flat_non_tensor.pth": ({"a": torch.zeros(1), "epoch": 3}, ["'epoch'", "int"]),
        "list.pth": ([torch.zeros(1)], ["list", "not a state dict"]),
        "empty_sd.pth": ({"state_dict": {}}, ["empty state dict"]),
    }
    for name, (obj, needles) in cases.items():
        p = tmp_path / name
        torch.save(obj, p)
        with pytest.raises(CheckpointError) as ei:
            read_checkpoint(p)
        msg = str(ei.value)
        assert str(p) in msg and "\n" not in msg
        for s in needles:
            assert s in msg, (name, s, msg)


def test_reader_detectron2_pkl(tmp_path):
    arrays = OrderedDict([
        ("backbone.bottom_up.stem.conv1.weight", np.random.default_rng(0).standard_normal((64, 3, 7, 7)).astype("f4")),
        ("backbone.bottom_up.stem.conv1.norm.running_mean", np.arange(64, dtype=np.float32)),
        ("sem_seg_head.step", np.array(5, dtype=np.int64)),
        ("big_endian", np.arange(4, dtype=">f4")),
    ])
    p = F.save_detectron2_pkl(arrays, tmp_path / "model_final_abc.pkl")
    got, info = read_checkpoint(p)
    assert info["format"] == "detectron2-pkl" and info["unwrapped"] == "model"
    assert info["ignored_top_level_keys"] == ["__author__", "matching_heuristics"]
    assert list(got) == list(arrays)
    for k, v in arrays.items():
        assert isinstance(got[k], torch.Tensor)
        np.testing.assert_array_equal(got[k].numpy(), v)
    assert got["sem_seg_head.step"].dtype == torch.int64 and got["big_endian"].dtype == torch.float32

    # a protocol-2 pickle written by Python 3 encodes bytes through `_codecs.encode`: not on the allow-list
    p2 = F.save_detectron2_pkl({"w": np.ones(3, np.float32)}, tmp_path / "p2.pkl", protocol=2)
    with pytest.raises(CheckpointError, match=r"refused: .*\(_codecs\.encode\)"):
        read_checkpoint(p2)

    obj = tmp_path / "objarr.pkl"
    with open(obj, "wb") as f:
        pickle.dump({"model": {"w": np.array([1, "a"], dtype=object)}}, f, protocol=4)
    with pytest.raises(CheckpointError, match="'w' is a numpy array of dtype object"):
        read_checkpoint(obj)


# --------------------------------------------------------------------------------------------------------------------
# partial conversion: an ImageNet backbone into the segmentation model


@pytest.fixture(scope="module")
def imagenet_ckpt(model, work) -> Path:
    return F.save_imagenet_backbone_checkpoint(model, work / "resnet50_v2.pth")


@pytest.mark.slow
def test_partial_imagenet_backbone(model, imagenet_ckpt, work):
    dst = work / "init.pdparams"
    rep = convert("pspnet", imagenet_ckpt, dst, partial=("backbone",), cfg={"num_classes": NUM_CLASSES})
    assert rep.ok and rep.flavour == "semseg-imagenet-resnet"
    assert rep.cfg == {"layers": 50, "num_classes": NUM_CLASSES} and rep.cfg_inferred == {"layers": 50}
    by_source = {r.source: r for r in rep.rows if r.source}
    for k in ("fc.weight", "fc.bias"):
        assert by_source[k].action == "drop" and by_source[k].reason == IMAGENET_FC_REASON
    assert by_source["conv1.weight"].action == "rename" and by_source["conv1.weight"].target == "layer0.0.weight"
    assert by_source["bn3.running_var"].target == "layer0.7._variance"
    assert by_source["layer4.2.conv3.weight"].action == "copy"
    keep = {r.target for r in rep.rows_with("keep-init")}
    twin = paddle_impl.build_model("pspnet", num_classes=NUM_CLASSES)
    twin_keys = set(twin.state_dict())
    assert keep == {k for k in twin_keys if k.split(".")[0] in ("ppm", "cls", "aux")}
    assert not rep.rows_with(*("unused", "missing", "mis-shaped", "duplicate"))

    written = paddle.load(str(dst), return_numpy=True)
    assert set(written) == twin_keys - keep
    for k, v in model.state_dict().items():
        pk = torch_to_paddle_key(k)
        if pk in written:
            assert np.array_equal(written[pk], v.numpy()), k
    with pytest.warns(UserWarning, match="Skip loading for"):  # Paddle's note for each keep-init key
        missing, unexpected = twin.set_state_dict(written)
    assert sorted(missing) == sorted(keep) and not unexpected

    # a plain prefix works the same as the alias
    rep2 = convert("pspnet", imagenet_ckpt, work / "init2.pdparams", partial=("layer",),
                   cfg={"num_classes": NUM_CLASSES})
    assert {r.target for r in rep2.rows_with("keep-init")} == keep


def test_imagenet_backbone_without_partial_fails(imagenet_ckpt, work, capsys):
    with pytest.raises(ConversionError) as ei:
        convert("pspnet", imagenet_ckpt, work / "no_partial.pdparams")
    msg = str(ei.value)
    for key in ("fc.weight", "fc.bias", "cls.4.weight", "aux.4.bias", "ppm.features.0.1.weight"):
        assert key in msg, key
    assert "unused source keys" in msg and "missing twin keys" in msg and "--partial backbone" in msg
    rc, _, err = _cli(["pspnet", imagenet_ckpt, work / "no_partial.pdparams"], capsys)
    assert rc == 2 and "fc.weight" in _error_line(err)
    assert not (work / "no_partial.pdparams").exists()


def test_partial_still_requires_the_covered_keys(model, work):
    sd = F.imagenet_backbone_state_dict(model)
    sd.pop("layer1.0.conv1.weight")
    sd["layer9.bogus"] = torch.zeros(1)
    p = work / "resnet_broken.pth"
    torch.save(sd, p)
    with pytest.raises(ConversionError) as ei:
        convert("pspnet", p, work / "x.pdparams", partial=("backbone",), cfg={"num_classes": NUM_CLASSES})
    msg = str(ei.value)
    assert "1 missing twin keys: layer1.0.conv1.weight" in msg and "1 unused source keys: layer9.bogus" in msg
    with pytest.raises(ConversionError, match="--partial 'decoder' matches no key"):
        convert("pspnet", p, work / "x.pdparams", partial=("decoder",))


@pytest.mark.slow
def test_cli_partial_then_overwrite(imagenet_ckpt, work, capsys):
    dst, rep_path = work / "cli_init.pdparams", work / "cli_init.json"
    argv = ["pspnet", imagenet_ckpt, dst, "--report", rep_path, "--num-classes", str(NUM_CLASSES),
            "--partial", "backbone"]
    rc, out, err = _cli(argv, capsys)
    assert rc == 0, err
    assert "keep-init" in out and str(dst) in out and str(rep_path) in out
    data = json.loads(rep_path.read_text())
    assert data["ok"] and data["partial"] == ["backbone"] and data["summary"]["keep-init"] > 0
    before = dst.read_bytes()

    rc, _, err = _cli(argv, capsys)  # dst exists: refused, untouched
    assert rc == 2 and "exists" in _error_line(err) and str(dst) in err
    assert dst.read_bytes() == before

    rc, _, err = _cli(argv + ["--overwrite"], capsys)
    assert rc == 0, err
    assert dst.read_bytes() == before  # deterministic output
    _no_temporaries(work)


# --------------------------------------------------------------------------------------------------------------------
# destination safety


def test_existing_dst_is_refused(semseg_ckpt, tmp_path):
    dst = tmp_path / "keep.pdparams"
    dst.write_bytes(b"precious")
    with pytest.raises(ConversionError, match=f"{dst} exists; refusing to overwrite"):
        convert("pspnet", semseg_ckpt, dst)
    assert dst.read_bytes() == b"precious"


@pytest.mark.slow
def test_failure_after_writing_leaves_nothing_behind(semseg_ckpt, tmp_path, monkeypatch):
    import paddle_impl.checkpoint as pc

    def boom(*a, **k):
        raise pc.StateDictMismatch("simulated", ["x"], [], [])

    monkeypatch.setattr(pc, "strict_load", boom)
    dst = tmp_path / "out.pdparams"
    dst.write_bytes(b"old")
    with pytest.raises(pc.StateDictMismatch):
        convert("pspnet", semseg_ckpt, dst, overwrite=True)
    assert dst.read_bytes() == b"old"  # the old file survives a failed overwrite
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.pdparams"]  # no temporary left
    dst.unlink()
    with pytest.raises(pc.StateDictMismatch):
        convert("pspnet", semseg_ckpt, tmp_path / "sub" / "new.pdparams")
    assert not (tmp_path / "sub" / "new.pdparams").exists()
    assert [p.name for p in (tmp_path / "sub").iterdir()] == []


# --------------------------------------------------------------------------------------------------------------------
# key map and transposition by module type


def test_generic_bn_renames():
    assert torch_to_paddle_key("a.bn1.running_mean") == "a.bn1._mean"
    assert torch_to_paddle_key("a.bn1.running_var") == "a.bn1._variance"
    assert torch_to_paddle_key("a.bn1.num_batches_tracked") is None
    assert torch_to_paddle_key("a.bn1.weight") == "a.bn1.weight"
    assert torch_to_paddle_key("running_mean") == "_mean"
    assert KEYMAPS["pspnet"].to_paddle("layer0.1.running_var") == "layer0.1._variance"
    km = ModelKeymap(model="toy", renames=((r"(.*)\.prelu\.weight", r"\1.prelu._weight"),))
    assert km.to_paddle("head.prelu.weight") == "head.prelu._weight"
    assert km.to_paddle("head.prelu.weight2") == "head.prelu.weight2"


class _TorchToy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 6)        # 2-D weight (10, 6): never transposed
        self.proj = torch.nn.Linear(6, 6)           # square Linear: transposed although the shape cannot tell
        self.conv = torch.nn.Conv1d(6, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm1d(4)
        self.head = torch.nn.Linear(4, 5)

    def forward(self, ids):
        x = self.proj(self.emb(ids))                 # (N, L, 6)
        x = self.bn(self.conv(x.transpose(1, 2)))    # (N, 4, L)
        return self.head(x.transpose(1, 2))          # (N, L, 5)


class _PaddleToy(paddle.nn.Layer):
    def __init__(self):
        super().__init__()
        self.emb = paddle.nn.Embedding(10, 6)
        self.proj = paddle.nn.Linear(6, 6)
        self.conv = paddle.nn.Conv1D(6, 4, 3, padding=1)
        self.bn = paddle.nn.BatchNorm1D(4)
        self.head = paddle.nn.Linear(4, 5)

    def forward(self, ids):
        x = self.proj(self.emb(ids))
        x = self.bn(self.conv(x.transpose([0, 2, 1])))
        return self.head(x.transpose([0, 2, 1]))


def test_transpose_decided_by_module_type():
    torch.manual_seed(0)
    tmod = _TorchToy().eval()
    with torch.no_grad():
        tmod.bn.running_mean.uniform_(-0.5, 0.5)
        tmod.bn.running_var.uniform_(0.5, 1.5)
    pmod = _PaddleToy()
    pmod.eval()
    assert linear_weight_keys(tmod) == {"proj.weight", "head.weight"}
    target = {k: tuple(v.shape) for k, v in pmod.state_dict().items()}
    src = tmod.state_dict()
    rows = plan_conversion(tmod, {k: tuple(v.shape) for k, v in src.items()}, None, target_shapes=target)
    action = {r.source: r.action for r in rows if r.source}
    assert action["proj.weight"] == "transpose" and action["head.weight"] == "transpose"
    assert action["emb.weight"] == "copy" and action["conv.weight"] == "copy"
    assert action["proj.bias"] == action["head.bias"] == "copy"
    assert action["bn.running_mean"] == "rename" and action["bn.num_batches_tracked"] == "drop"
    assert not [r for r in rows if not r.ok]
    by_src = {r.source: r for r in rows if r.source}
    assert by_src["head.weight"].source_shape == (5, 4) and by_src["head.weight"].target_shape == (4, 5)

    # the planned arrays make the Paddle toy compute what the torch toy computes
    arrays = {r.target: materialize(r, src[r.source]) for r in rows if r.action in ("copy", "rename", "transpose")}
    pmod.set_state_dict(arrays)
    ids = np.array([[1, 2, 3, 9], [0, 5, 5, 7]], dtype=np.int64)
    with torch.no_grad():
        want = tmod(torch.from_numpy(ids)).numpy()
    got = pmod(paddle.to_tensor(ids)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

    # a shape-based rule (X2Paddle's "every 2-D weight") would transpose the Embedding: the module type says no
    emb_rows = plan_conversion(tmod, {"emb.weight": (10, 6)}, None, target_shapes={"emb.weight": (6, 10)})
    assert emb_rows[0].action == "mis-shaped"
    # the derived twin shapes (twin rule, no Paddle model given) agree with the real Paddle toy
    derived = plan_conversion(tmod, {k: tuple(v.shape) for k, v in src.items()}, None)
    assert [(r.source, r.target, r.action) for r in derived] == [(r.source, r.target, r.action) for r in rows]


def test_transpose_works_on_the_meta_device():
    with torch.device("meta"):
        tmod = _TorchToy()
    rows = plan_conversion(tmod, {"proj.weight": (6, 6), "emb.weight": (10, 6)}, None,
                           target_shapes={"proj.weight": (6, 6), "emb.weight": (10, 6)})
    assert [r.action for r in rows] == ["transpose", "copy"]


def test_half_precision_and_aliased_tensors(model, work):
    """float16 values are cast to the twin's float32 (noted per row); two keys sharing one storage both convert
    correctly although the converter gives back the source's pages as it goes (shared pages are never dropped)."""
    sd = OrderedDict((k, v.half() if v.is_floating_point() else v) for k, v in model.state_dict().items())
    sd["layer1.1.bn1.running_mean"] = sd["layer1.0.bn1.running_mean"]  # the same tensor object: one storage
    src = F.save_semseg_checkpoint(sd, work / "half_aliased.pth")
    rep = convert("pspnet", src, work / "half_aliased.pdparams")
    rows = {r.source: r for r in rep.rows if r.source}
    assert rows["cls.0.weight"].dtype == "float16->float32"
    assert rows["layer0.1.num_batches_tracked"].dtype == "int64"
    assert rep.memory["source_pages_released_bytes"] > 0
    written = paddle.load(str(work / "half_aliased.pdparams"), return_numpy=True)
    for k, v in sd.items():
        pk = torch_to_paddle_key(k)
        if pk is not None:
            assert written[pk].dtype == np.float32
            assert np.array_equal(written[pk], v.float().numpy()), k


def test_materialize_bfloat16_and_transpose():
    from weights_convert.keymap import KeyAction

    t = torch.arange(6, dtype=torch.bfloat16).reshape(2, 3)
    copy = KeyAction("w", "w", (2, 3), (2, 3), "bfloat16->float32", "copy")
    arr = materialize(copy, t, "float32")
    assert arr.dtype == np.float32 and np.array_equal(arr, t.float().numpy())
    tr = KeyAction("w", "w", (2, 3), (3, 2), "float32", "transpose")
    arr = materialize(tr, t.float(), "float32")
    assert arr.shape == (3, 2) and arr.flags.c_contiguous and np.array_equal(arr, t.float().numpy().T)
    with pytest.raises(ValueError, match="nothing to write"):
        materialize(KeyAction("w", None, (2, 3), None, None, "drop", "x"), t)
