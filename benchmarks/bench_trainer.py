"""Trainer overhead against a bare forward/backward/step loop on the same batches (goal <= 5%).

Both variants build the model, optimizer and data loader from the same config (PSPNet-50, batch 2, crop 65,
synthetic Cityscapes) and run ITERS iterations over the same batch sequence. The trainer additionally does its
logging, NaN guard, lr schedule, per-iteration reseeding and one checkpoint at the last iteration. The checkpoint
write is timed separately (`extra_info["checkpoint_s"]`) and `extra_info["overhead_excl_checkpoint"]` is the ratio
without it: in a real run (tens of thousands of iterations) a checkpoint every `save_iters` amortises to ~0.
"""
from __future__ import annotations

import time

import numpy as np
import pytest
import yaml

from conftest import set_threads

ITERS = 20
CROP = 65
_BARE = {}


@pytest.fixture(scope="module")
def cfg_path(tmp_path_factory):
    from paddle_impl.datasets import write_cityscapes

    root = tmp_path_factory.mktemp("bench_trainer")
    write_cityscapes(root / "cs", n=8, size=(96, 160))
    cfg = {
        "batch_size": 2, "iters": ITERS, "seed": 0,
        "train_dataset": {"type": "Cityscapes", "dataset_root": str(root / "cs"),
                          "transforms": [{"type": "ToFloat32"}, {"type": "RandomHorizontalFlip"},
                                         {"type": "RandomCrop", "size": CROP}]},
        "model": {"type": "pspnet", "layers": 50},
        "optimizer": {"type": "sgd", "momentum": 0.9, "weight_decay": 1e-4},
        "lr_scheduler": {"type": "poly", "learning_rate": 0.01, "power": 0.9},
        "loss": {"coef": [1.0, 0.4]},
        "log_iters": 10, "eval_iters": 100000, "save_iters": 100000, "keep_checkpoints": 1,
    }
    p = root / "bench.yml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _bare_loop(cfg_path):
    import paddle

    import paddle_impl.optim as optim
    from paddle_impl.config import load_config
    from paddle_impl.losses import compute_loss

    cfg = load_config(cfg_path)
    model = cfg.build_model()
    opt = cfg.build_optimizer(model)
    schedule = cfg.build_lr()
    ds = cfg.build_dataset("train")
    loader = paddle.io.DataLoader(ds, batch_size=2, shuffle=False, drop_last=True, num_workers=0)
    model.train()
    it = 0
    while it < ITERS:
        for images, labels in loader:
            optim.set_lr(opt, schedule.lr_at(it))
            terms = compute_loss("pspnet", model(images), labels)
            terms["loss"].backward()
            opt.step()
            opt.clear_grad(set_to_zero=False)
            it += 1
            if it == ITERS:
                break


def _trainer_run(cfg_path, out, info):
    from paddle_impl.config import load_config
    from paddle_impl.engine.trainer import Trainer

    tr = Trainer(load_config(cfg_path), str(out), progress=False)
    original = tr._save_checkpoint
    spent = [0.0]

    def timed_save(*a, **k):
        t = time.perf_counter()
        try:
            return original(*a, **k)
        finally:
            spent[0] += time.perf_counter() - t

    tr._save_checkpoint = timed_save
    t0 = time.perf_counter()
    tr.train()
    total = time.perf_counter() - t0
    info.setdefault("runs", []).append((total, spent[0]))


@pytest.mark.benchmark(group="trainer-overhead")
def test_bare_loop(benchmark, cfg_path):
    benchmark.extra_info["baseline"] = True
    benchmark.extra_info["threads"] = set_threads()
    benchmark.pedantic(_bare_loop, args=(cfg_path,), rounds=3, iterations=1, warmup_rounds=0)
    _BARE["median"] = benchmark.stats.stats.median


@pytest.mark.benchmark(group="trainer-overhead")
def test_trainer(benchmark, cfg_path, tmp_path):
    info = {}
    benchmark.extra_info["threads"] = set_threads()
    counter = iter(range(100))
    benchmark.pedantic(lambda: _trainer_run(cfg_path, tmp_path / f"run{next(counter)}", info), rounds=3,
                       iterations=1, warmup_rounds=0)
    totals = [t for t, _ in info["runs"]]
    ckpt = [c for _, c in info["runs"]]
    benchmark.extra_info["checkpoint_s"] = round(float(np.median(ckpt)), 3)
    if "median" in _BARE:
        excl = float(np.median([t - c for t, c in info["runs"]]))
        benchmark.extra_info["overhead_excl_checkpoint"] = round(excl / _BARE["median"] - 1.0, 4)
    benchmark.extra_info["median_total_s"] = round(float(np.median(totals)), 3)
