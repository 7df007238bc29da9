"""Trainer, config, lr schedules: PSPNet-50 at 33x33, batch 2, on synthetic Cityscapes / VOC (CPU)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

paddle = pytest.importorskip("paddle")

from paddle_impl.config import ConfigError, load_config  # noqa: E402
from paddle_impl.datasets import write_cityscapes, write_voc  # noqa: E402
from paddle_impl.engine import trainer as trainer_mod  # noqa: E402
from paddle_impl.engine.trainer import ResumableBatchSampler, Trainer, TrainingDiverged  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "paddle_impl" / "configs"
CROP = 33


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_cityscapes(root / "cs", n=4, size=(48, 64))
    write_voc(root / "voc", n=4, size=(48, 64))
    return root


def tiny_config(path: Path, dataset: str, root: Path, *, augment: bool = False, val: bool = False, **top) -> Path:
    """A tests-only config: PSPNet-50, crop 33, batch 2."""
    train_tf = ([{"type": "ToFloat32"}, {"type": "RandomScale", "scale_range": [0.75, 1.25]},
                 {"type": "RandomHorizontalFlip"}, {"type": "RandomCrop", "size": CROP}] if augment
                else [{"type": "ToFloat32"}, {"type": "CenterCrop", "size": CROP}])
    ds = {"type": dataset, "dataset_root": str(root), "transforms": train_tf}
    cfg = {
        "batch_size": 2, "iters": 10, "seed": 7,
        "train_dataset": ds,
        "model": {"type": "pspnet", "layers": 50},
        "optimizer": {"type": "sgd", "momentum": 0.9, "weight_decay": 1e-4},
        "lr_scheduler": {"type": "poly", "learning_rate": 0.01, "power": 0.9},
        "loss": {"coef": [1.0, 0.4]},
        "log_iters": 5, "eval_iters": 1000, "save_iters": 1000, "keep_checkpoints": 2,
    }
    if val:
        cfg["val_dataset"] = {"type": dataset, "dataset_root": str(root), "split": "val",
                              "transforms": [{"type": "CenterCrop", "size": 41}]}
    cfg.update(top)
    path.write_text(yaml.safe_dump(cfg))
    return path


# ----------------------------------------------------------------------------------------------------------------------
# training: the loss decreases

@pytest.mark.slow
@pytest.mark.parametrize("dataset,sub", [("Cityscapes", "cs"), ("VOCSegmentation", "voc")])
def test_loss_decreases(tmp_path, data, dataset, sub):
    # 4 images, batch 2, deterministic centre crop: the same two batches alternate, a learnable setting
    cfg = load_config(tiny_config(tmp_path / "tiny.yml", dataset, data / sub, val=True, eval_iters=10,
                                  save_iters=10))
    tr = Trainer(cfg, tmp_path / "out", progress=False)
    result = tr.train()
    losses = [h["loss"] for h in tr.history]
    assert len(losses) == 10 and all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses
    assert [h["iter"] for h in tr.history] == list(range(1, 11))
    assert tr.history[0]["lr"] == pytest.approx(0.01) and tr.history[-1]["lr"] < tr.history[0]["lr"]
    assert result["iteration"] == 10 and 0.0 <= result["best_miou"] <= 1.0
    out = tmp_path / "out"
    assert (out / "latest").read_text().strip() == "iter_10"
    assert sorted(p.name for p in (out / "iter_10").iterdir()) == ["meta.json", "model.pdopt", "model.pdparams",
                                                                    "state.json"]
    assert (out / "best_model" / "model.pdparams").is_file()
    log = (out / "train.log").read_text()
    for word in ("main=", "aux=", "lr=", "batch_cost=", "reader_cost=", "ips=", "[EVAL] iter 10: mIoU="):
        assert word in log
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]


# ----------------------------------------------------------------------------------------------------------------------
# resume after SIGKILL: bit-exact

def _train_cmd(cfg: Path, save_dir: Path, *extra: str):
    return [sys.executable, "-m", "paddle_impl.train", "--config", str(cfg), "--save-dir", str(save_dir),
            "--no-progress", *extra]


def _scalars(save_dir: Path, kind: str = "train") -> list:
    from paddle_impl.engine.curves import read_scalars
    return [r for r in read_scalars(str(save_dir / "scalars.jsonl")) if r["kind"] == kind]


def _wait_for(proc, cond, what: str, poll: float, timeout: float = 240.0) -> None:
    deadline = time.time() + timeout
    while not cond():
        assert proc.poll() is None, f"the run ended before {what}"
        assert time.time() < deadline, f"no {what} within {timeout} s"
        time.sleep(poll)


@pytest.mark.slow
def test_resume_after_random_sigkills_is_bit_exact(tmp_path, data):
    """SIGKILL at seeded random points -- one of them inside a checkpoint write -- then --resume each time: the
    final parameters, buffers and optimizer state equal an uninterrupted run's bit for bit, and so does every
    logged loss and lr (the killed runs' records past their checkpoint are dropped on resume)."""
    import random
    rng = random.Random(20261205)
    iters = 8
    cfg = tiny_config(tmp_path / "tiny.yml", "Cityscapes", data / "cs", augment=True, val=True, iters=iters,
                      save_iters=2, eval_iters=4, keep_checkpoints=1, log_iters=1)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    full, cut = tmp_path / "full", tmp_path / "cut"
    # the uninterrupted run and the runs to kill go side by side (Paddle uses one CPU thread each)
    p_full = subprocess.Popen(_train_cmd(cfg, full), cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)

    def launch():
        extra = ("--resume",) if (cut / "latest").exists() else ()
        return subprocess.Popen(_train_cmd(cfg, cut, *extra), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)

    def in_save():
        return any(".tmp-" in p.name and p.name.startswith(".iter_") for p in cut.iterdir()) if cut.is_dir() else False

    # 1) inside the first checkpoint write: the temporary checkpoint directory exists, `latest` does not yet
    proc = launch()
    _wait_for(proc, in_save, "a checkpoint write", poll=0.002)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert in_save() and not (cut / "latest").exists()  # killed mid-write: the half-written checkpoint is no checkpoint
    # 2), 3) at a random iteration (+ a random fraction of a second) of a resumed / restarted run
    kills = [rng.randint(3, 5), rng.randint(6, iters - 1)]
    for k in kills:
        t_launch = time.time()
        proc = launch()  # (records of an earlier killed run may still be there until this one cuts them back)
        _wait_for(proc, lambda: any(r["iter"] >= k and r["time"] > t_launch for r in _scalars(cut)),
                  f"iteration {k}", poll=0.02)
        time.sleep(rng.uniform(0.0, 1.5))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            assert proc.wait() == -signal.SIGKILL
    proc = launch()
    assert proc.wait(timeout=300) == 0
    out, _ = p_full.communicate(timeout=300)
    assert p_full.returncode == 0, out
    log = (cut / "train.log").read_text()
    assert log.count("resumed from") >= 2, log[-2000:]

    # keep_checkpoints: 1 -> only the last one remains, no temporary leftovers
    run_files = ["best_model", "config.yml", f"iter_{iters}", "latest", "scalars.jsonl", "train.log",
                 "training_curves.png"]
    assert sorted(p.name for p in cut.iterdir()) == run_files
    assert sorted(p.name for p in full.iterdir()) == run_files
    from paddle_impl.checkpoint import read_state_file
    for name in ("model.pdparams", "model.pdopt"):
        a = read_state_file(full / f"iter_{iters}" / name)
        b = read_state_file(cut / f"iter_{iters}" / name)
        assert sorted(a) == sorted(b) and len(a) > 100
        for k in a:
            assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), f"{name}: {k} differs after resume"
    # optimizer state is keyed by structured parameter names
    opt_keys = read_state_file(full / f"iter_{iters}" / "model.pdopt")
    assert any(k.startswith("layer0.0.weight_velocity") for k in opt_keys)
    # the curves: one record per iteration, the same losses and lrs as the uninterrupted run
    rf, rc = _scalars(full), _scalars(cut)
    assert [r["iter"] for r in rc] == [r["iter"] for r in rf] == list(range(1, iters + 1))
    for a, b in zip(rf, rc):
        assert {k: v for k, v in a.items() if k.startswith(("loss/", "lr/"))} == \
               {k: v for k, v in b.items() if k.startswith(("loss/", "lr/"))}
    assert [r["mIoU"] for r in _scalars(full, "eval")] == [r["mIoU"] for r in _scalars(cut, "eval")]


# ----------------------------------------------------------------------------------------------------------------------
# 2-process CPU run through paddle.distributed.launch

@pytest.mark.slow
def test_distributed_two_processes(tmp_path, data):
    cfg = tiny_config(tmp_path / "tiny.yml", "VOCSegmentation", data / "voc", augment=True, iters=4, save_iters=4)
    dump, save = tmp_path / "dump", tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(REPO), **{trainer_mod.DUMP_ENV: str(dump)})
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node=2", "--log_dir", str(tmp_path / "log"),
           str(REPO / "paddle_impl" / "train.py"), "--config", str(cfg), "--save-dir", str(save), "--no-progress"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    logs = "".join(p.read_text(errors="replace")[-2000:] for p in sorted((tmp_path / "log").glob("workerlog.*")))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:] + logs
    r0, r1 = np.load(dump / "rank0.npz"), np.load(dump / "rank1.npz")
    assert r0.files == r1.files and len(r0.files) > 100
    diff = [k for k in r0.files if not np.array_equal(r0[k], r1[k])]
    assert not diff, f"parameters differ between ranks: {diff[:5]}"
    assert sorted(p.name for p in save.glob("iter_*")) == ["iter_4"]
    assert "batch 2 x 2 rank(s)" in (save / "train.log").read_text()
    # rank 0 saved what both ranks hold
    saved = paddle.load(str(save / "iter_4" / "model.pdparams"))
    assert np.array_equal(saved["cls.4.weight"].numpy(), r0["cls.4.weight"])


# ----------------------------------------------------------------------------------------------------------------------
# NaN guard

@pytest.mark.slow  # a PSPNet training run (~5 s)
def test_nan_guard_names_iteration_and_term(tmp_path, data, monkeypatch):
    cfg = load_config(tiny_config(tmp_path / "tiny.yml", "Cityscapes", data / "cs", iters=3))
    import paddle_impl.losses as plosses
    real = plosses.MultiLoss.forward
    calls = []

    def poisoned(self, outputs, target):
        terms = real(self, outputs, target)
        calls.append(1)
        if len(calls) == 2:
            terms["aux"] = terms["aux"] * float("nan")
        return terms

    monkeypatch.setattr(plosses.MultiLoss, "forward", poisoned)
    tr = Trainer(cfg, tmp_path / "out", progress=False)
    with pytest.raises(TrainingDiverged, match=r"iteration 2: loss term 'aux' = nan"):
        tr.train()
    assert len(tr.history) == 1


@pytest.mark.slow
def test_nan_guard_huge_lr(tmp_path, data):
    cfg = load_config(tiny_config(tmp_path / "tiny.yml", "Cityscapes", data / "cs", iters=6),
                      {"lr_scheduler.learning_rate": 1e10})
    with pytest.raises(TrainingDiverged, match=r"training diverged at iteration \d+: loss term '\w+' = (nan|inf)"):
        Trainer(cfg, tmp_path / "out", progress=False).train()


# ----------------------------------------------------------------------------------------------------------------------
# config

def test_config_unknown_key_suggests_closest(tmp_path, data):
    p = tiny_config(tmp_path / "pspnet.yml", "Cityscapes", data / "cs")
    raw = yaml.safe_load(p.read_text())
    raw["optimiser"] = raw.pop("optimizer")
    p.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"^pspnet\.yml: unknown key 'optimiser' in <root>; did you mean "
                                          r"'optimizer'\?$"):
        load_config(p)
    raw["optimizer"] = raw.pop("optimiser")
    raw["lr_scheduler"]["powr"] = 0.9
    p.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"unknown key 'powr' in lr_scheduler; did you mean 'power'\?"):
        load_config(p)
    del raw["lr_scheduler"]["powr"]
    raw["batch_size"] = "two"
    p.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"pspnet\.yml: batch_size must be int, got 'two'"):
        load_config(p)


def test_missing_dataset_root_names_path(tmp_path, data, capsys):
    missing = tmp_path / "no" / "such" / "cityscapes"
    p = tiny_config(tmp_path / "tiny.yml", "Cityscapes", missing)
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_config(p).build_dataset("train")
    from paddle_impl import train
    assert train.main(["--config", str(p), "--save-dir", str(tmp_path / "o"), "--no-progress"]) == 2  # bad input
    err = capsys.readouterr().err
    assert str(missing) in err and "train_dataset.dataset_root" in err


@pytest.mark.slow  # a CLI training run (~5 s)
def test_cli_data_root_and_iters_override(tmp_path, data):
    p = tiny_config(tmp_path / "tiny.yml", "Cityscapes", tmp_path / "nowhere", iters=50)
    from paddle_impl import train
    assert train.main(["--config", str(p), "--data-root", str(data / "cs"), "--iters", "1",
                       "--save-dir", str(tmp_path / "o"), "--no-progress"]) == 0
    assert (tmp_path / "o" / "latest").read_text().strip() == "iter_1"


@pytest.mark.parametrize("name,classes,coefs,opt", [
    ("pspnet_r50_voc2012aug.yml", 21, {"main": 1.0, "aux": 0.4}, "Momentum"),
    ("pspnet_r50_cityscapes.yml", 19, {"main": 1.0, "aux": 0.4}, "Momentum"),
    ("pspnet_r50_voc2007.yml", 20, {"main": 0.6, "aux": 0.4}, "Adam"),
])
def test_shipped_configs(name, classes, coefs, opt):
    cfg = load_config(CONFIGS / name)
    assert cfg.num_classes == classes and cfg.ignore_index == 255 and cfg.loss_coefs == coefs
    sched = cfg.build_lr()
    assert sched.lr_at(0) == pytest.approx(cfg.raw["lr_scheduler"]["learning_rate"])
    # the optimizer (param groups, head multiplier) on a small model of the same kind
    import paddle_impl
    model = paddle_impl.build_model("pspnet", num_classes=classes, layers=50)
    o = cfg.build_optimizer(model)
    assert type(o).__name__ == opt
    mult = float(cfg.raw["optimizer"].get("head_lr_mult", 10 if opt == "Momentum" else 1))
    assert o._segtwin["lr_mults"] == [1.0, mult] and o._segtwin["groups"] == ["backbone", "head"]


def test_voc2007_config_builds_20_class_dataset(tmp_path):
    import inspect

    from paddle_impl.datasets import VOCSegmentation
    if "reduce_zero_label" not in inspect.signature(VOCSegmentation.__init__).parameters:
        pytest.skip("VOCSegmentation has no reduce_zero_label yet")
    write_voc(tmp_path / "voc07", n=2, size=(48, 64), year=2007)
    cfg = load_config(CONFIGS / "pspnet_r50_voc2007.yml")
    ds = cfg.build_dataset("val", root=tmp_path / "voc07")
    assert ds.num_classes == 20
    image, label = ds[0]
    assert image.shape == (3, 513, 513) and image.dtype == np.float32
    assert set(np.unique(label)) <= set(range(20)) | {255}


# ----------------------------------------------------------------------------------------------------------------------
# the sampler (pure python; the lr schedules: tests/test_recipe.py)

def test_sampler_order_is_a_function_of_seed_and_epoch():
    s = ResumableBatchSampler(10, 2, seed=3)
    s.set_epoch(1)
    full = list(s)
    s.set_epoch(1, start_batch=2)
    assert list(s) == full[2:]
    assert len(full) == 5 and sorted(k - 10 for b in full for k in b) == list(range(10))
    s.set_epoch(2)
    assert list(s) != full
    r0, r1 = ResumableBatchSampler(10, 2, 3, 0, 2), ResumableBatchSampler(10, 2, 3, 1, 2)
    r0.set_epoch(1)
    r1.set_epoch(1)
    a, b = [k for x in r0 for k in x], [k for x in r1 for k in x]
    assert len(r0) == 2 and not set(a) & set(b)


@pytest.mark.slow
def test_workers_do_not_change_the_result(tmp_path, data):
    """Augmentation is seeded per (seed, epoch, sample): 0 or 2 DataLoader workers train the same parameters."""
    params = []
    for workers in (0, 2):
        cfg = load_config(tiny_config(tmp_path / f"w{workers}.yml", "Cityscapes", data / "cs", augment=True,
                                      iters=2, num_workers=workers))
        tr = Trainer(cfg, tmp_path / f"out{workers}", progress=False)
        tr.train()
        params.append({k: v.numpy() for k, v in tr.model.state_dict().items()})
    assert all(np.array_equal(params[0][k], params[1][k]) for k in params[0])


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, data, capsys):
    p = tiny_config(tmp_path / "tiny.yml", "Cityscapes", data / "cs", iters=1)
    from paddle_impl import train
    argv = ["--config", str(p), "--save-dir", str(tmp_path / "empty"), "--resume", "--no-progress"]
    assert train.main(argv) == 2  # bad input
    assert "no checkpoint to resume at" in capsys.readouterr().err


@pytest.mark.slow
def test_backbone_pretrained_loads_all_but_heads(tmp_path, data):
    import paddle_impl
    src = paddle_impl.build_model("pspnet", num_classes=19, layers=50)
    from alignment.specs import get_spec
    heads = get_spec("pspnet").head_prefixes
    backbone = {k: v for k, v in src.state_dict().items() if not k.startswith(heads)}
    paddle.save(backbone, str(tmp_path / "backbone.pdparams"))
    p = tiny_config(tmp_path / "tiny.yml", "Cityscapes", data / "cs")
    cfg = load_config(p, {"model.backbone_pretrained": str(tmp_path / "backbone.pdparams")})
    model = cfg.build_model()
    got = model.state_dict()
    assert all(np.array_equal(got[k].numpy(), v.numpy()) for k, v in backbone.items())
    assert not np.array_equal(got["cls.4.weight"].numpy(), src.state_dict()["cls.4.weight"].numpy())
    del backbone["layer1.0.conv1.weight"]
    paddle.save(backbone, str(tmp_path / "backbone.pdparams"))
    with pytest.raises(ValueError, match=r"1 missing: layer1\.0\.conv1\.weight"):
        cfg.build_model()
