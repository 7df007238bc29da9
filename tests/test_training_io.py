"""What a run reads and writes besides checkpoints: `--opts` on every config-taking command, the resolved
`config.yml`, `scalars.jsonl` and `training_curves.png`, state files read without running code, and `segtwin
predict` over a Cityscapes split folder."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

paddle = pytest.importorskip("paddle")

from paddle_impl.checkpoint import UnsafeStateFile, read_state_file  # noqa: E402
from paddle_impl.config import REMOVE, ConfigError, load_config, parse_opts  # noqa: E402
from paddle_impl.datasets import write_cityscapes  # noqa: E402
from paddle_impl.engine.curves import ScalarLog, plot_curves, read_scalars  # noqa: E402
from paddle_impl.engine.predictor import list_image_names, predict  # noqa: E402
from test_trainer import tiny_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "paddle_impl" / "configs"


def _cli(cmd: str, *args: str, timeout: float = 240):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "alignment.cli", cmd, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _ours(stderr: str) -> list:
    """stderr lines without the two Paddle prints at import when OMP_NUM_THREADS > 1."""
    return [ln for ln in stderr.strip().splitlines() if "OMP_NUM_THREADS" not in ln]


# ------------------------------------------------------------------------------------------------------- --opts
def test_parse_opts_types_values():
    o = parse_opts(["lr_scheduler.learning_rate=1e-3", "iters=20", "amp=true", "optimizer.momentum=null",
                    "train_dataset.transforms.5.size=[65, 65]", "optimizer.type=adam", "seed=-3", "x=.5"])
    assert o["lr_scheduler.learning_rate"] == 1e-3 and isinstance(o["lr_scheduler.learning_rate"], float)
    assert o["iters"] == 20 and isinstance(o["iters"], int) and o["seed"] == -3 and o["x"] == 0.5
    assert o["amp"] is True and o["optimizer.momentum"] is REMOVE and o["optimizer.type"] == "adam"
    assert o["train_dataset.transforms.5.size"] == [65, 65]
    for bad in ("iters", "=3"):
        with pytest.raises(ConfigError, match="expected KEY=VALUE"):
            parse_opts([bad])


def test_opts_are_checked_by_the_schema():
    cfg = CONFIGS / "pspnet_r50_cityscapes.yml"
    with pytest.raises(ConfigError, match=r"unknown key 'learning_rat'.*did you mean 'learning_rate'"):
        load_config(cfg, parse_opts(["lr_scheduler.learning_rat=0.1"]))
    with pytest.raises(ConfigError, match=r"iters must be"):
        load_config(cfg, parse_opts(["iters=many"]))
    c = load_config(cfg, parse_opts(["optimizer.weight_decay=4e-5", "optimizer.momentum=null"]))
    assert c.raw["optimizer"]["weight_decay"] == 4e-5 and "momentum" not in c.raw["optimizer"]


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yml")))
def test_saved_config_runs_the_same_recipe(tmp_path, name):
    """config.yml (to_yaml) read back gives the same config, overrides included."""
    opts = parse_opts(["iters=7000", "optimizer.weight_decay=2e-4", "lr_scheduler.learning_rate=3e-3"])
    c = load_config(CONFIGS / name, opts)
    text = c.to_yaml()
    assert text.splitlines()[1].startswith("# overrides: iters=7000 optimizer.weight_decay=0.0002")
    (tmp_path / "config.yml").write_text(text)
    again = load_config(tmp_path / "config.yml")
    assert again.raw == yaml.safe_load(text) and again.raw["iters"] == 7000
    assert again.recipe == c.recipe


@pytest.mark.slow
@pytest.mark.parametrize("cmd,extra", [("train", []), ("eval", []), ("predict", ["--image", "x.png", "--out", "o"]),
                                       ("export", ["--out", "o/m"])])
def test_every_config_command_takes_opts(tmp_path, cmd, extra):
    cfg = str(CONFIGS / "pspnet_r50_cityscapes.yml")
    r = _cli(cmd, "--config", cfg, *extra, "--opts", "optimiser.type=sgd", timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert _ours(r.stderr) == [f"segtwin {cmd}: error: pspnet_r50_cityscapes.yml: unknown key 'optimiser' in "
                               f"<root>; did you mean 'optimizer'?"], r.stderr


# ------------------------------------------------------------------------------- a run's config, scalars, curves
@pytest.fixture(scope="module")
def cs(tmp_path_factory):
    root = tmp_path_factory.mktemp("io") / "cs"
    write_cityscapes(root, n=4, size=(48, 64))
    return root


@pytest.mark.slow
def test_train_records_config_scalars_and_curves(tmp_path, cs):
    cfg = tiny_config(tmp_path / "t.yml", "Cityscapes", cs, val=True, iters=4, save_iters=2, eval_iters=2)
    out = tmp_path / "out"
    r = _cli("train", "--config", str(cfg), "--save-dir", str(out), "--no-progress",
             "--opts", "log_iters=1", "lr_scheduler.learning_rate=2e-3", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    saved = (out / "config.yml").read_text()
    assert "# overrides: log_iters=1 lr_scheduler.learning_rate=0.002" in saved
    assert yaml.safe_load(saved)["lr_scheduler"]["learning_rate"] == 0.002
    recs = read_scalars(str(out / "scalars.jsonl"))
    train = [x for x in recs if x["kind"] == "train"]
    assert [x["iter"] for x in train] == [1, 2, 3, 4] and [x["epoch"] for x in train] == [1, 1, 2, 2]
    # poly, power 0.9 over 4 iterations; the head group at the spec's x10 (PSPNet)
    want = [0.002 * (1 - i / 4) ** 0.9 for i in range(4)]
    assert [x["lr/backbone"] for x in train] == pytest.approx(want, rel=1e-6)
    assert [x["lr/head"] for x in train] == pytest.approx([10 * w for w in want], rel=1e-6)
    for x in train:
        assert x["loss/loss"] == pytest.approx(x["loss/main"] + 0.4 * x["loss/aux"], rel=1e-5)
        assert x["batch_cost"] >= x["reader_cost"] >= 0 and x["ips"] > 0
    log = (out / "train.log").read_text()
    assert f"main={train[-1]['loss/main']:.4f}" in log  # the log and the file carry the same numbers
    evals = [x for x in recs if x["kind"] == "eval"]
    assert [x["iter"] for x in evals] == [2, 4] and all(0 <= x["mIoU"] <= 1 for x in evals)
    png = out / "training_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000

    # resuming from iteration 2 with another config: the old config kept and named, records past 2 replaced
    r = _cli("train", "--config", str(cfg), "--save-dir", str(out), "--no-progress", "--resume", str(out / "iter_2"),
             "--opts", "log_iters=2", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "config.prev-1.yml").read_text() == saved
    log = (out / "train.log").read_text()
    assert "differs from the run's (log_iters, lr_scheduler.learning_rate)" in log and "config.prev-1.yml" in log
    again = read_scalars(str(out / "scalars.jsonl"))
    assert [(x["kind"], x["iter"]) for x in again] == [("train", 1), ("train", 2), ("eval", 2), ("train", 4),
                                                       ("eval", 4)]
    assert again[:3] == recs[:3]


def test_scalar_log_cuts_back_on_resume_and_skips_a_partial_line(tmp_path):
    log = ScalarLog(str(tmp_path))
    for i in range(1, 6):
        log.add({"kind": "train", "iter": i, "loss/loss": 1.0 / i})
    log.close()
    with open(tmp_path / "scalars.jsonl", "a") as f:
        f.write('{"kind": "train", "it')  # a run killed mid-line
    assert [x["iter"] for x in read_scalars(str(tmp_path / "scalars.jsonl"))] == [1, 2, 3, 4, 5]
    log = ScalarLog(str(tmp_path), start=3)
    assert [x["iter"] for x in log.records] == [1, 2, 3]
    log.add({"kind": "train", "iter": 4, "loss/loss": 9.0})
    log.close()
    lines = (tmp_path / "scalars.jsonl").read_text().splitlines()
    assert [json.loads(ln)["iter"] for ln in lines] == [1, 2, 3, 4] and json.loads(lines[-1])["loss/loss"] == 9.0
    assert plot_curves([], str(tmp_path / "c.png")) is None and not (tmp_path / "c.png").exists()
    assert plot_curves(log.records, str(tmp_path / "c.png")) == str(tmp_path / "c.png")


# ------------------------------------------------------------------------------- state files never run code
class _Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _evil(path: Path, marker: Path) -> Path:
    path.write_bytes(pickle.dumps({"conv.weight": np.zeros(3, np.float32), "x": _Payload(marker)}, protocol=4))
    return path


def test_read_state_file_reads_paddle_save_and_refuses_everything_else(tmp_path):
    layer = paddle.nn.Sequential(paddle.nn.Conv2D(3, 4, 3), paddle.nn.BatchNorm2D(4))
    paddle.save(layer.state_dict(), str(tmp_path / "m.pdparams"))
    got = read_state_file(tmp_path / "m.pdparams")
    ref = paddle.load(str(tmp_path / "m.pdparams"))
    assert sorted(got) == sorted(ref)
    for k in ref:
        assert isinstance(got[k], np.ndarray) and np.array_equal(got[k], ref[k].numpy())
    marker = tmp_path / "pwned"
    with pytest.raises(UnsafeStateFile, match=r"evil.pdparams: refused: it names posix.system"):
        read_state_file(_evil(tmp_path / "evil.pdparams", marker))
    assert not marker.exists()
    (tmp_path / "empty.pdparams").write_bytes(b"")
    with pytest.raises(OSError, match=r"empty.pdparams is empty \(0 bytes\)"):
        read_state_file(tmp_path / "empty.pdparams")
    data = (tmp_path / "m.pdparams").read_bytes()
    (tmp_path / "cut.pdparams").write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError, match=r"cut.pdparams \(\d+ bytes\) is truncated or not a Paddle state file"):
        read_state_file(tmp_path / "cut.pdparams")
    (tmp_path / "list.pdparams").write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(ValueError, match="holds a list, not a state dict"):
        read_state_file(tmp_path / "list.pdparams")


@pytest.mark.slow
def test_bad_weight_files_exit_2_with_one_line(tmp_path, cs):
    cfg = tiny_config(tmp_path / "t.yml", "Cityscapes", cs, val=True, iters=1)
    marker = tmp_path / "pwned"
    evil = _evil(tmp_path / "evil.pdparams", marker)
    (tmp_path / "empty.pdparams").write_bytes(b"")
    cases = [("eval", ["--weights", str(evil)], "refused: it names posix.system"),
             ("eval", ["--weights", str(tmp_path / "empty.pdparams")], "is empty (0 bytes)"),
             ("train", ["--save-dir", str(tmp_path / "o"), "--opts", f"model.pretrained={evil}"],
              "refused: it names posix.system")]
    for cmd, extra, words in cases:
        t0 = time.time()
        r = _cli(cmd, "--config", str(cfg), *extra, timeout=120)
        lines = [ln for ln in r.stderr.splitlines() if ln.startswith(f"segtwin {cmd}: error: ")]
        assert r.returncode == 2 and len(lines) == 1 and words in lines[0], (cmd, r.stderr[-2000:])
        assert "Traceback" not in r.stderr and time.time() - t0 < 60
    assert not marker.exists(), "a payload ran"


# ------------------------------------------------------------------------------------------------ predict
def test_predict_walks_a_cityscapes_split_and_keeps_its_layout(tmp_path, cs):
    split = cs / "leftImg8bit" / "val"
    names = list_image_names([split])
    assert len(names) == 4 and all(os.path.dirname(n) for _, n in names)  # <city>/<stem>
    assert [p for p, _ in names] == sorted(str(p) for p in split.rglob("*.png"))
    res = predict(None, [split], tmp_path / "pred", "cityscapes", predict_fn=lambda im: np.zeros(im.shape[:2], int))
    for (src, name), r in zip(names, res):
        assert r["label"] == str(tmp_path / "pred" / (name + ".png")) and os.path.isfile(r["label"])
        rel = os.path.relpath(src, split)
        assert r["label"].endswith(os.path.splitext(rel)[0] + ".png")
    empty = tmp_path / "none"
    (empty / "sub").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no images .* in directory .*none or below it"):
        list_image_names([empty])


@pytest.mark.slow
def test_predict_cli_on_a_split_folder_without_progress(tmp_path, cs):
    cfg = tiny_config(tmp_path / "t.yml", "Cityscapes", cs, val=True)
    r = _cli("predict", "--config", str(cfg), "--image", str(cs / "leftImg8bit" / "val"), "--out",
             str(tmp_path / "p"), "--no-progress", timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "4 image(s)" in r.stdout and "predict:" not in r.stderr  # no tqdm bar
    pngs = sorted(p.relative_to(tmp_path / "p") for p in (tmp_path / "p").rglob("*_leftImg8bit.png"))
    assert len(pngs) == 4 and all(len(p.parts) == 2 for p in pngs)
