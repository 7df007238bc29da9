"""Iteration-based trainer of the Paddle twins (one trainer for every model).

    from paddle_impl.config import load_config
    from paddle_impl.engine.trainer import Trainer
    Trainer(load_config("paddle_impl/configs/pspnet_r50_cityscapes.yml"), save_dir="output/psp").train()

Determinism / exact resume (CPU): everything random is a pure function of the seed and a counter, never of how
many times something was called before:

* data order: epoch ``e`` visits ``default_rng([seed, e]).permutation(n)`` (rank ``r`` of ``w`` takes every
  ``w``-th index, batches drop the last partial one); iteration ``it`` is batch ``it % per_epoch`` of epoch
  ``it // per_epoch``, so a resumed run skips exactly the consumed batches;
* augmentation: sample ``i`` of epoch ``e`` is transformed with the transforms reseeded from ``(seed, e, i)``
  (identical in any DataLoader worker);
* dropout and other Paddle randomness: the Paddle generator is reseeded from ``(seed, it, rank)`` before every
  iteration.

Checkpoints additionally store the Python / numpy / Paddle generator states (restored on resume).

Checkpoint layout (written atomically: a temporary directory renamed into place, then the ``latest`` pointer)::

    SAVE_DIR/iter_N/model.pdparams     model state_dict (parameters + BN buffers)
    SAVE_DIR/iter_N/model.pdopt        optimizer state, keyed by STRUCTURED parameter names
    SAVE_DIR/iter_N/state.pkl          iteration, epoch, lr schedule, best mIoU, RNG states, AMP scaler
    SAVE_DIR/iter_N/meta.json          the same, human readable (no RNG states)
    SAVE_DIR/latest                    text: the name of the newest complete checkpoint (``iter_N``)
    SAVE_DIR/best_model/model.pdparams best val mIoU so far (+ meta.json)
    SAVE_DIR/train.log                 log lines (rank 0)
"""
from __future__ import annotations

import json
import logging
import math
import os
import pickle
import random
import shutil
import sys
import time
from typing import Any, Dict, Optional

import numpy as np
import paddle
import paddle.io

from alignment.utils import atomic_write

from .. import optim as optim_mod
from ..losses import compute_loss
from ..metrics import confusion_matrix, metrics_from_confusion

__all__ = ["Trainer", "TrainingDiverged", "ResumableBatchSampler", "SeededSamples", "evaluate_miou",
           "find_checkpoint", "load_checkpoint_state", "DUMP_ENV"]

#: when set to a directory, every rank writes ``rank{r}.npz`` (trainable parameters) there at the end of training
DUMP_ENV = "SEGTWIN_DUMP_RANK_PARAMS"
CKPT_PREFIX = "iter_"


class TrainingDiverged(RuntimeError):
    """A loss term became NaN or Inf; the message names the iteration and the term."""


def _logger(name: str = "segtwin.train") -> logging.Logger:
    log = logging.getLogger(name)
    log.propagate = False  # `import paddle` attaches handlers to the root logger: never go through it
    log.setLevel(logging.INFO)
    return log


class _TqdmHandler(logging.Handler):
    def emit(self, record):
        try:
            from tqdm import tqdm
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # pragma: no cover
            self.handleError(record)


# ----------------------------------------------------------------------------------------------------------------------
# data

def _seed_of(*key: int) -> int:
    return int(np.random.SeedSequence([int(k) for k in key]).generate_state(1, np.uint32)[0])


class SeededSamples(paddle.io.Dataset):
    """Wrap a dataset whose ``transforms`` is a ``Compose``: key ``epoch * n + i`` returns sample ``i`` transformed
    with the transforms reseeded from ``(seed, epoch, i)``."""

    def __init__(self, dataset, seed: int):
        super().__init__()
        self.dataset = dataset
        self.seed = int(seed)
        self.n = len(dataset)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key):
        epoch, i = divmod(int(key), self.n)
        tf = getattr(self.dataset, "transforms", None)
        if tf is not None and hasattr(tf, "reseed"):
            tf.reseed(np.random.SeedSequence([self.seed, epoch, i]))
        image, label = self.dataset[i]
        return np.asarray(image, dtype=np.float32), np.asarray(label, dtype=np.int64)


class ResumableBatchSampler(paddle.io.BatchSampler):
    """Batches of keys ``epoch * n + i`` for ``SeededSamples``: a (seed, epoch) permutation, split over ranks
    (rank r takes positions r, r + w, ...; the tail that does not divide is dropped), ``drop_last`` batches.
    ``set_epoch(e, start_batch=k)`` makes the next iteration start at batch ``k`` of epoch ``e``."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.n, self.batch_size, self.seed = int(n), int(batch_size), int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.drop_last = True
        self.epoch, self.start_batch = 0, 0

    def __len__(self) -> int:
        """Batches per epoch (the full epoch, regardless of ``start_batch``)."""
        return (self.n // self.world_size) // self.batch_size

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def batches(self, epoch: int):
        perm = np.random.default_rng([self.seed, int(epoch)]).permutation(self.n)
        per_rank = self.n // self.world_size
        mine = perm[self.rank::self.world_size][:per_rank]
        base = int(epoch) * self.n
        return [[base + int(i) for i in mine[b * self.batch_size:(b + 1) * self.batch_size]]
                for b in range(len(self))]

    def __iter__(self):
        yield from self.batches(self.epoch)[self.start_batch:]


# ----------------------------------------------------------------------------------------------------------------------
# evaluation (whole image; the evaluator module has the sliding / flip / multi-scale modes)

def evaluate_miou(model, dataset, num_classes: int, ignore_index: int = 255) -> Dict[str, Any]:
    """Whole-image evaluation: each sample as one batch of 1 -> {'mIoU', 'Acc', 'mAcc', 'IoU'} (python floats)."""
    was_training = model.training
    model.eval()
    cm = None
    with paddle.no_grad():
        for i in range(len(dataset)):
            image, label = dataset[i]
            x = paddle.to_tensor(np.asarray(image, np.float32)[None])
            y = paddle.to_tensor(np.asarray(label, np.int64)[None])
            logits = model(x)
            if isinstance(logits, (tuple, list)):
                logits = logits[0]
            if tuple(logits.shape[2:]) != tuple(y.shape[1:]):
                logits = paddle.nn.functional.interpolate(logits, size=list(y.shape[1:]), mode="bilinear",
                                                          align_corners=True)
            c = confusion_matrix(paddle.argmax(logits, axis=1), y, num_classes, ignore_index)
            cm = c if cm is None else cm + c
    if was_training:
        model.train()
    m = metrics_from_confusion(cm)
    return {"mIoU": float(m["mIoU"]), "Acc": float(m["Acc"]), "mAcc": float(m["mAcc"]),
            "IoU": [float(v) for v in m["IoU"].numpy()]}


# ----------------------------------------------------------------------------------------------------------------------
# checkpoints

def _commit_dir(tmp: str, final: str) -> None:
    """Rename a fully written temporary directory into place (replacing an older one of the same name)."""
    if os.path.isdir(final):
        old = f"{final}.old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def find_checkpoint(path: str) -> str:
    """A checkpoint directory from ``path``: a checkpoint dir itself (holding state.pkl), or a save dir holding a
    ``latest`` pointer."""
    if os.path.isfile(os.path.join(path, "state.pkl")):
        return path
    pointer = os.path.join(path, "latest")
    if os.path.isfile(pointer):
        with open(pointer, encoding="utf-8") as f:
            name = f.read().strip()
        ckpt = os.path.join(path, name)
        if not os.path.isfile(os.path.join(ckpt, "state.pkl")):
            raise FileNotFoundError(f"{pointer} points to {ckpt}, which is not a complete checkpoint")
        return ckpt
    raise FileNotFoundError(f"no checkpoint to resume at {path}: neither a checkpoint directory (with state.pkl) "
                            f"nor a save dir with a 'latest' pointer file")


def load_checkpoint_state(ckpt: str) -> Dict[str, Any]:
    with open(os.path.join(ckpt, "state.pkl"), "rb") as f:
        return pickle.load(f)


def _opt_state_by_structured_name(opt_state: Dict[str, Any], model, to_structured: bool) -> Dict[str, Any]:
    """Optimizer accumulators are keyed ``<param.name>_<acc>_0`` where param.name is a per-process counter
    (``conv2d_3.w_0``); rename them to/from the structured names (``layer1.0.conv1.weight``) so a checkpoint loads
    in a process that built other layers first."""
    pairs = [(p.name, name) for name, p in model.named_parameters()]
    src = {a: b for a, b in pairs} if to_structured else {b: a for a, b in pairs}
    keys = sorted(src, key=len, reverse=True)
    out = {}
    for k, v in opt_state.items():
        new = k
        for prefix in keys:
            if k.startswith(prefix + "_") or k == prefix:
                new = src[prefix] + k[len(prefix):]
                break
        if isinstance(v, dict):  # e.g. master_weights {param.name: tensor}
            v = {src.get(kk, kk): vv for kk, vv in v.items()}
        out[new] = v
    return out


def _rng_states() -> Dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "paddle": paddle.get_rng_state()}


def _set_rng_states(states: Dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    paddle.set_rng_state(states["paddle"])


# ----------------------------------------------------------------------------------------------------------------------
# trainer

class Trainer:
    """Train ``cfg`` (a ``paddle_impl.config.Config``) into ``save_dir``.

    ``resume``: None (fresh start), ``"latest"`` (``save_dir/latest``) or a checkpoint / save directory.
    ``data_root`` replaces both datasets' ``dataset_root``. ``progress``: show a tqdm bar on rank 0.
    """

    def __init__(self, cfg, save_dir: str, resume: Optional[str] = None, data_root: Optional[str] = None,
                 progress: bool = True):
        self.cfg = cfg
        self.raw = cfg.raw
        self.save_dir = os.fspath(save_dir)
        self.resume = resume
        self.data_root = data_root
        self.progress = progress
        self.world_size = int(paddle.distributed.get_world_size())
        self.rank = int(paddle.distributed.get_rank()) if self.world_size > 1 else 0
        self.is_main = self.rank == 0
        self.on_gpu = paddle.device.get_device().startswith("gpu")
        self.log = _logger()
        self._handlers = []
        self._vdl = None
        #: per-iteration record {'iter', 'lr', <loss terms>, 'loss'} of this run (python floats)
        self.history = []

    # -------------------------------------------------------------------------------------------- logging
    def _setup_logging(self) -> None:
        if not self.is_main:
            return
        os.makedirs(self.save_dir, exist_ok=True)
        fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s")
        fh = logging.FileHandler(os.path.join(self.save_dir, "train.log"), encoding="utf-8")
        fh.setFormatter(fmt)
        sh = _TqdmHandler() if self.progress else logging.StreamHandler(sys.stderr)
        sh.setFormatter(fmt)
        for h in (fh, sh):
            self.log.addHandler(h)
            self._handlers.append(h)
        try:
            from visualdl import LogWriter
        except ImportError:
            self.log.info("VisualDL is not installed: scalars are written to train.log only")
        else:
            self._vdl = LogWriter(logdir=os.path.join(self.save_dir, "vdl"))

    def _close_logging(self) -> None:
        for h in self._handlers:
            self.log.removeHandler(h)
            h.close()
        self._handlers = []
        if self._vdl is not None:
            self._vdl.close()
            self._vdl = None

    def _scalar(self, tag: str, value: float, step: int) -> None:
        if self._vdl is not None:
            self._vdl.add_scalar(tag, value, step)

    # -------------------------------------------------------------------------------------------- checkpoints
    def _save_checkpoint(self, it: int, epoch: int) -> None:
        name = f"{CKPT_PREFIX}{it}"
        final = os.path.join(self.save_dir, name)
        tmp = os.path.join(self.save_dir, f".{name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        paddle.save(self.model.state_dict(), os.path.join(tmp, "model.pdparams"))
        paddle.save(_opt_state_by_structured_name(self.optimizer.state_dict(), self.model, True),
                    os.path.join(tmp, "model.pdopt"))
        meta = {"iteration": it, "epoch": epoch, "schedule": self.schedule.state_dict(), "best_miou": self.best_miou,
                "best_iter": self.best_iter, "seed": self.seed, "world_size": self.world_size,
                "batch_size": self.batch_size, "config": self.cfg.path}
        state = dict(meta, rng=_rng_states(), scaler=self.scaler.state_dict() if self.scaler is not None else None)
        with open(os.path.join(tmp, "state.pkl"), "wb") as f:
            pickle.dump(state, f)
            f.flush()
            os.fsync(f.fileno())
        with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
        _commit_dir(tmp, final)
        with atomic_write(os.path.join(self.save_dir, "latest"), encoding="utf-8", fsync=True) as f:
            f.write(name + "\n")
        self._prune()
        self.log.info(f"[iter {it}] checkpoint saved: {final}")

    def _remove_stale_temporaries(self) -> None:
        """Leftovers of a run killed while saving (never a complete checkpoint: those are renamed into place)."""
        if not os.path.isdir(self.save_dir):
            return
        for d in os.listdir(self.save_dir):
            if ".tmp-" in d or ".old-" in d:
                path = os.path.join(self.save_dir, d)
                if os.path.isdir(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    os.remove(path)

    def _prune(self) -> None:
        keep = int(self.raw["keep_checkpoints"])
        found = []
        for d in os.listdir(self.save_dir):
            if d.startswith(CKPT_PREFIX) and d[len(CKPT_PREFIX):].isdigit():
                found.append(int(d[len(CKPT_PREFIX):]))
        for n in sorted(found)[:-keep]:
            shutil.rmtree(os.path.join(self.save_dir, f"{CKPT_PREFIX}{n}"), ignore_errors=True)

    def _save_best(self, it: int, metrics: Dict[str, Any]) -> None:
        final = os.path.join(self.save_dir, "best_model")
        tmp = os.path.join(self.save_dir, f".best_model.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        paddle.save(self.model.state_dict(), os.path.join(tmp, "model.pdparams"))
        with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as f:
            json.dump({"iteration": it, "mIoU": metrics["mIoU"], "Acc": metrics["Acc"], "mAcc": metrics["mAcc"]},
                      f, indent=2)
        _commit_dir(tmp, final)

    def _load_checkpoint(self, path: str) -> int:
        from ..checkpoint import strict_load
        ckpt = find_checkpoint(path)
        state = load_checkpoint_state(ckpt)
        strict_load(self.model, paddle.load(os.path.join(ckpt, "model.pdparams")),
                    source=os.path.join(ckpt, "model.pdparams"))
        opt_state = paddle.load(os.path.join(ckpt, "model.pdopt"))
        self.optimizer.set_state_dict(_opt_state_by_structured_name(opt_state, self.model, False))
        if state["schedule"] != self.schedule.state_dict():
            self.log.warning(f"resuming with a different lr schedule: checkpoint {state['schedule']}, "
                             f"now {self.schedule.state_dict()}")
        if state.get("world_size", 1) != self.world_size or state.get("batch_size") != self.batch_size:
            self.log.warning(f"resuming with world size x batch {self.world_size}x{self.batch_size}, checkpoint "
                             f"was {state.get('world_size')}x{state.get('batch_size')}: the data order changes")
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        _set_rng_states(state["rng"])
        self.best_miou, self.best_iter = state["best_miou"], state["best_iter"]
        self.log.info(f"resumed from {ckpt} at iteration {state['iteration']}")
        return int(state["iteration"])

    # -------------------------------------------------------------------------------------------- build
    def _build(self) -> None:
        cfg, raw = self.cfg, self.raw
        self.seed = int(raw["seed"])
        self.batch_size = int(raw["batch_size"])
        self.iters = int(raw["iters"])
        random.seed(self.seed)
        np.random.seed(self.seed)
        paddle.seed(self.seed)
        self.model = cfg.build_model()
        if self.world_size > 1 and self.on_gpu:
            self.model = convert_sync_batchnorm(self.model)
        self.optimizer = cfg.build_optimizer(self.model)
        self.schedule = cfg.build_lr()
        self.coefs = cfg.loss_coefs
        self.amp = bool(raw["amp"]) and self.on_gpu
        if raw["amp"] and not self.on_gpu:
            self.log.info("amp: true in the config, but AMP runs on GPU only: training in float32")
        self.scaler = paddle.amp.GradScaler(init_loss_scaling=2.0 ** 15) if self.amp else None
        train_set = cfg.build_dataset("train", root=self.data_root)
        self.train_set = SeededSamples(train_set, self.seed)
        self.sampler = ResumableBatchSampler(len(train_set), self.batch_size, self.seed, self.rank, self.world_size)
        if len(self.sampler) == 0:
            raise ValueError(f"{cfg.file}: the training set has {len(train_set)} samples, fewer than batch_size "
                             f"{self.batch_size} x {self.world_size} rank(s): no full batch")
        self.loader = paddle.io.DataLoader(self.train_set, batch_sampler=self.sampler,
                                           num_workers=int(raw["num_workers"]), use_shared_memory=False)
        self.val_set = (cfg.build_dataset("val", root=self.data_root, seed=self.seed)
                        if "val_dataset" in raw and self.is_main else None)
        self.best_miou, self.best_iter = -1.0, -1

    # -------------------------------------------------------------------------------------------- loop
    def _check_finite(self, it: int, terms: Dict[str, Any]) -> None:
        values = {k: float(v) for k, v in terms.items()}
        bad = [k for k, v in values.items() if not math.isfinite(v)]
        flag = 1.0 if bad else 0.0
        if self.world_size > 1:
            t = paddle.to_tensor([flag], dtype="float32")
            paddle.distributed.all_reduce(t)
            flag = float(t.numpy()[0])
        if flag:
            where = (", ".join(f"loss term '{k}' = {values[k]}" for k in bad) if bad
                     else "a loss term on another rank")
            raise TrainingDiverged(f"training diverged at iteration {it}: {where} (all terms: "
                                   f"{', '.join(f'{k}={v:.6g}' for k, v in values.items())}); lower the learning "
                                   f"rate or check the data")

    def train(self) -> Dict[str, Any]:
        """Run to ``iters``; returns {'iteration', 'rank', 'best_miou', 'best_iter', 'last_loss'}."""
        if self.world_size > 1:
            paddle.distributed.init_parallel_env()
        self._setup_logging()
        try:
            return self._train()
        finally:
            self._close_logging()

    def _train(self) -> Dict[str, Any]:
        self._build()
        raw = self.raw
        start = 0
        if self.resume:
            path = self.save_dir if self.resume == "latest" else self.resume
            start = self._load_checkpoint(path)
        if self.is_main:
            self._remove_stale_temporaries()
        net = paddle.DataParallel(self.model) if self.world_size > 1 else self.model
        self.model.train()
        if self.is_main:
            self.log.info(f"training {self.cfg.model_type} ({self.cfg.path}) for {self.iters} iterations from "
                          f"{start}, batch {self.batch_size} x {self.world_size} rank(s), {len(self.sampler)} "
                          f"iterations per epoch, save dir {self.save_dir}")
        per_epoch = len(self.sampler)
        log_iters, eval_iters, save_iters = raw["log_iters"], raw["eval_iters"], raw["save_iters"]
        bar = None
        if self.is_main and self.progress:
            from tqdm import tqdm
            bar = tqdm(total=self.iters, initial=start, desc="train", dynamic_ncols=True, file=sys.stderr)
        data_iter, epoch = None, -1
        sums: Dict[str, float] = {}
        batch_cost = reader_cost = 0.0
        n_window = 0
        last = {}
        it = start
        try:
            while it < self.iters:
                t0 = time.perf_counter()
                e, pos = divmod(it, per_epoch)
                if e != epoch or data_iter is None:
                    epoch = e
                    self.sampler.set_epoch(epoch, start_batch=pos)
                    data_iter = iter(self.loader)
                images, labels = next(data_iter)
                t1 = time.perf_counter()
                lr = self.schedule.lr_at(it)
                optim_mod.set_lr(self.optimizer, lr)
                paddle.seed(_seed_of(self.seed, it, self.rank))
                if self.amp:
                    with paddle.amp.auto_cast(level="O1"):
                        outputs = net(images)
                else:
                    outputs = net(images)
                terms = compute_loss(self.cfg.model_type, outputs, labels, self.cfg.ignore_index)
                terms = {k: v.astype("float32") for k, v in terms.items() if k != "loss"}
                total = sum(self.coefs[k] * terms[k] for k in self.coefs)
                terms = dict(terms, loss=total)
                self._check_finite(it + 1, terms)
                if self.scaler is not None:
                    self.scaler.scale(total).backward()
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                    self.optimizer.clear_grad(set_to_zero=False)
                else:
                    total.backward()
                    optim_mod.step(self.optimizer)
                it += 1
                t2 = time.perf_counter()
                last = {k: float(v) for k, v in terms.items()}
                self.history.append(dict(last, iter=it, lr=lr))
                for k, v in last.items():
                    sums[k] = sums.get(k, 0.0) + v
                batch_cost += t2 - t0
                reader_cost += t1 - t0
                n_window += 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{lr:.3g}")
                if self.is_main and (it % log_iters == 0 or it == self.iters):
                    avg = {k: v / n_window for k, v in sums.items()}
                    bc, rc = batch_cost / n_window, reader_cost / n_window
                    ips = self.batch_size * self.world_size / bc if bc > 0 else float("inf")
                    eta = bc * (self.iters - it)
                    self.log.info(f"[TRAIN] epoch {epoch + 1} iter {it}/{self.iters} "
                                  + " ".join(f"{k}={v:.4f}" for k, v in avg.items())
                                  + f" lr={lr:.6g} batch_cost={bc:.4f}s reader_cost={rc:.5f}s ips={ips:.3f} "
                                  f"samples/s eta={int(eta // 3600)}:{int(eta % 3600 // 60):02d}:{int(eta % 60):02d}")
                    for k, v in avg.items():
                        self._scalar(f"Train/{k}", v, it)
                    self._scalar("Train/lr", lr, it)
                    self._scalar("Train/batch_cost", bc, it)
                    self._scalar("Train/reader_cost", rc, it)
                    sums, batch_cost, reader_cost, n_window = {}, 0.0, 0.0, 0
                if self.val_set is not None and (it % eval_iters == 0 or it == self.iters):
                    m = evaluate_miou(self.model, self.val_set, self.cfg.num_classes, self.cfg.ignore_index)
                    if m["mIoU"] > self.best_miou:
                        self.best_miou, self.best_iter = m["mIoU"], it
                        self._save_best(it, m)
                    self.log.info(f"[EVAL] iter {it}: mIoU={m['mIoU']:.4f} Acc={m['Acc']:.4f} mAcc={m['mAcc']:.4f} "
                                  f"(best mIoU {self.best_miou:.4f} at iter {self.best_iter})")
                    self._scalar("Evaluate/mIoU", m["mIoU"], it)
                    self._scalar("Evaluate/Acc", m["Acc"], it)
                if self.is_main and (it % save_iters == 0 or it == self.iters):
                    self._save_checkpoint(it, epoch)
        finally:
            if bar is not None:
                bar.close()
        self._dump_rank_params()
        return {"iteration": it, "rank": self.rank, "best_miou": self.best_miou, "best_iter": self.best_iter,
                "last_loss": last.get("loss")}

    def _dump_rank_params(self) -> None:
        out = os.environ.get(DUMP_ENV)
        if not out:
            return
        os.makedirs(out, exist_ok=True)
        arrays = {name: p.numpy() for name, p in self.model.named_parameters()}
        np.savez(os.path.join(out, f"rank{self.rank}.npz"), **arrays)


def convert_sync_batchnorm(model):
    """GPU multi-card only: replace the twins' torch-semantics ``BatchNorm2d`` by ``paddle.nn.SyncBatchNorm``
    (same parameter/buffer names; Paddle momentum = 1 - torch momentum). Paddle has no CPU SyncBN kernel."""
    from .. import layers as L

    def swap(layer):
        for name, child in list(layer.named_children()):
            if isinstance(child, L.BatchNorm2d):
                sync = paddle.nn.SyncBatchNorm(child.num_features, momentum=1.0 - child.momentum,
                                               epsilon=child.eps)
                sync.weight.set_value(child.weight)
                sync.bias.set_value(child.bias)
                sync._mean.set_value(child._mean)
                sync._variance.set_value(child._variance)
                setattr(layer, name, sync)
            else:
                swap(child)
        return layer

    return swap(model)
