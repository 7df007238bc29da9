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

Faults: a sample that cannot be read or holds bad values stops the run at once with a `DataError` naming the file
(the batches are read in this process, or by worker processes whose exceptions come back with the batch: nothing
can hang on a dead reader thread); a checkpoint is written only when every model and optimizer tensor is finite, so
`latest` always names a finite, loadable checkpoint, and a divergence names it with the command to resume from it.

Checkpoint layout (written atomically: a temporary directory renamed into place, then the ``latest`` pointer)::

    SAVE_DIR/iter_N/model.pdparams     model state_dict (parameters + BN buffers)
    SAVE_DIR/iter_N/model.pdopt        optimizer state, keyed by STRUCTURED parameter names
    SAVE_DIR/iter_N/state.json         iteration, epoch, lr schedule, best mIoU, RNG states, AMP scaler (plain JSON:
                                       reading a checkpoint never runs code; no pickle anywhere)
    SAVE_DIR/iter_N/meta.json          the same, human readable (no RNG states)
    SAVE_DIR/latest                    text: the name of the newest complete checkpoint (``iter_N``)
    SAVE_DIR/best_model/model.pdparams best val mIoU so far (+ meta.json)
    SAVE_DIR/train.log                 log lines (rank 0)
"""
from __future__ import annotations

import json
import logging
import collections
import math
import multiprocessing
import os
import random
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Dict, Optional

import numpy as np
import paddle
import paddle.io

from alignment.utils import atomic_write

from .. import optim as optim_mod
from ..checkpoint import read_state_file
from .curves import CURVES_FILE, SCALARS_FILE, ScalarLog, plot_curves
from ..syncbn import convert_sync_batchnorm
from ..metrics import confusion_matrix, metrics_from_confusion

__all__ = ["Trainer", "TrainingDiverged", "DataError", "DataWorkerDied", "RunDirError", "ResumableBatchSampler",
           "SeededSamples", "evaluate_miou", "find_checkpoint", "load_checkpoint_state", "DUMP_ENV"]

#: when set to a directory, every rank writes ``rank{r}.npz`` (trainable parameters) there at the end of training
DUMP_ENV = "SEGTWIN_DUMP_RANK_PARAMS"
CKPT_PREFIX = "iter_"


class TrainingDiverged(RuntimeError):
    """A loss term or a weight became NaN or Inf; the message names the iteration, the term and the last good
    checkpoint (exit status 1: the job's own failure)."""


class DataError(ValueError):
    """A training or validation sample cannot be used (unreadable, truncated, sizes differ, label values outside the
    dataset's set); the one-line message names the file (exit status 2: bad input)."""


class DataWorkerDied(RuntimeError):
    """A data-loading worker process ended abruptly (killed, or crashed in native code) while reading a batch: the
    run stops with this message instead of waiting forever for the batch (exit status 1: the job's own failure)."""


class RunDirError(ValueError):
    """The save dir cannot be used as asked: it holds another run, or its checkpoint cannot be read safely."""


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
        try:
            image, label = self.dataset[i]
        except (OSError, ValueError, IndexError) as e:
            raise DataError(_sample_error(self.dataset, i, e)) from None
        return np.asarray(image, dtype=np.float32), np.asarray(label, dtype=np.int64)


def _sample_error(dataset, i: int, e: BaseException) -> str:
    """One line: the dataset's own message (it names the file) and, when it does not, the sample's files."""
    msg = " ".join(str(e).split()) or type(e).__name__
    files = getattr(dataset, "files", None)
    if files is not None and 0 <= i < len(files) and not any(str(f) in msg for f in files[i]):
        msg += f" (sample {i}: {', '.join(str(f) for f in files[i])})"
    return f"bad {type(dataset).__name__} sample: {msg}"


# The batches of a training run: read in this process (num_workers 0) or by a pool of forked worker processes that
# each return whole batches in order. An exception while reading comes back as the exception itself, so the run ends
# at once with its message; Paddle's DataLoader, whose reader THREAD dies silently on an exception, left the main
# loop waiting forever on its queue (num_workers 0). A worker process that dies (SIGKILL, a crash in native code)
# ends the run with DataWorkerDied: the executor notices the death, where multiprocessing.Pool silently replaced
# the worker and waited forever for the batch it held. At most 2 x num_workers batches are read ahead.
_WORKER_SAMPLES = None


def _init_worker(samples) -> None:
    global _WORKER_SAMPLES
    _WORKER_SAMPLES = samples
    try:
        import cv2
        cv2.setNumThreads(0)
    except Exception:  # pragma: no cover - cv2 is a dependency; thread count is an optimisation
        pass


def _read_batch(samples, keys):
    items = [samples[k] for k in keys]
    return np.stack([a for a, _ in items]), np.stack([b for _, b in items])


def _worker_batch(keys):
    return _read_batch(_WORKER_SAMPLES, keys)


class BatchReader:
    """Iterate numpy batches (images, labels) for a list of key batches; `close()` stops the workers."""

    def __init__(self, samples, num_workers: int = 0):
        self.samples = samples
        self.num_workers = int(num_workers)
        self._pool = None

    def __call__(self, key_batches):
        if self.num_workers <= 0:
            for keys in key_batches:
                yield _read_batch(self.samples, keys)
            return
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.num_workers, mp_context=multiprocessing.get_context("fork"),
                                             initializer=_init_worker, initargs=(self.samples,))
        pending = collections.deque()
        try:
            for keys in key_batches:
                pending.append((keys, self._submit(keys)))
                if len(pending) >= 2 * self.num_workers:
                    yield self._result(*pending.popleft())
            while pending:
                yield self._result(*pending.popleft())
        finally:
            for _, future in pending:
                future.cancel()

    def _submit(self, keys):
        try:
            return self._pool.submit(_worker_batch, keys)
        except BrokenProcessPool as e:
            raise self._died(keys) from e

    def _result(self, keys, future):
        try:
            return future.result()
        except BrokenProcessPool as e:
            raise self._died(keys) from e

    def _died(self, keys) -> DataWorkerDied:
        return DataWorkerDied(f"a data-loading worker process ended abruptly (killed, or crashed in native code) "
                              f"while reading the batch of sample keys {list(keys)}; with num_workers 0 the same "
                              f"samples are read in the training process")

    def close(self) -> None:
        """Stop the workers now: batches still being read are dropped (terminate, as multiprocessing.Pool did; the
        executor's own shutdown would wait for a worker stuck in a read)."""
        if self._pool is not None:
            workers = list((getattr(self._pool, "_processes", None) or {}).values())
            self._pool.shutdown(wait=False, cancel_futures=True)
            for w in workers:
                w.terminate()
            for w in workers:
                w.join(timeout=10)
            self._pool = None


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
            try:
                image, label = dataset[i]
            except (OSError, ValueError, IndexError) as e:
                raise DataError(_sample_error(dataset, i, e)) from None
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


STATE_FILE = "state.json"
LEGACY_STATE = "state.pkl"
CONFIG_FILE = "config.yml"
#: what a run writes next to its checkpoints; --overwrite removes them with the checkpoints
RUN_FILES = ("train.log", "vdl", CONFIG_FILE, SCALARS_FILE, CURVES_FILE)


def find_checkpoint(path: str) -> str:
    """A checkpoint directory from ``path``: a checkpoint dir itself (holding state.json), or a save dir holding a
    ``latest`` pointer."""
    if os.path.isfile(os.path.join(path, STATE_FILE)):
        return path
    if os.path.isfile(os.path.join(path, LEGACY_STATE)):
        raise RunDirError(f"{os.path.join(path, LEGACY_STATE)}: a pickled training state (older segtwin) is never "
                          f"read: unpickling a file can run any code it names. Resume from a checkpoint written by "
                          f"this version (state.json), or start the run again")
    pointer = os.path.join(path, "latest")
    if os.path.isfile(pointer):
        with open(pointer, encoding="utf-8") as f:
            name = f.read().strip()
        ckpt = os.path.join(path, name)
        if os.path.isfile(os.path.join(ckpt, LEGACY_STATE)) and not os.path.isfile(os.path.join(ckpt, STATE_FILE)):
            return find_checkpoint(ckpt)  # the same refusal as for the directory itself
        if not os.path.isfile(os.path.join(ckpt, STATE_FILE)):
            raise FileNotFoundError(f"{pointer} points to {ckpt}, which is not a complete checkpoint")
        return ckpt
    raise FileNotFoundError(f"no checkpoint to resume at {path}: neither a checkpoint directory (with {STATE_FILE}) "
                            f"nor a save dir with a 'latest' pointer file")


def load_checkpoint_state(ckpt: str) -> Dict[str, Any]:
    """The training state of a checkpoint (plain JSON; RunDirError naming the file when it is not readable)."""
    path = os.path.join(ckpt, STATE_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError) as e:
        raise RunDirError(f"{path}: cannot read the training state ({' '.join(str(e).split())})") from None
    if not isinstance(state, dict) or "iteration" not in state or "rng" not in state:
        raise RunDirError(f"{path}: not a segtwin training state (no 'iteration' / 'rng')")
    return state


def _changed_keys(old: Dict[str, Any], new: Dict[str, Any], prefix: str = "") -> list:
    """Dotted keys whose values differ between two config dicts."""
    out = []
    for k in sorted(set(old) | set(new), key=str):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changed_keys(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}")
    return out


def _nonfinite(named_tensors) -> list:
    """Names of the floating tensors holding NaN or Inf."""
    bad = []
    for name, t in named_tensors:
        if isinstance(t, np.ndarray):
            if t.dtype.kind == "f" and not np.isfinite(t).all():
                bad.append(name)
        elif hasattr(t, "dtype") and "float" in str(t.dtype) and not bool(paddle.isfinite(t).all()):
            bad.append(name)
    return bad


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
    """Python / numpy / Paddle generator states as plain JSON values."""
    py_version, py_state, py_gauss = random.getstate()
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": [py_version, list(py_state), py_gauss],
            "numpy": [kind, [int(k) for k in keys], int(pos), int(has_gauss), float(gauss)],
            "paddle": [list(g.__getstate__()) for g in paddle.get_rng_state()]}


def _set_rng_states(states: Dict[str, Any]) -> None:
    from paddle.base.libpaddle import GeneratorState

    py_version, py_state, py_gauss = states["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    gens = []
    for st in states["paddle"]:
        g = GeneratorState.__new__(GeneratorState)
        g.__setstate__(tuple(st))
        gens.append(g)
    paddle.set_rng_state(gens)


def _plain(value):
    """A JSON-able copy of a (nested) state value: tensors and numpy values as python numbers / lists."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "numpy"):
        value = value.numpy()
    if isinstance(value, np.ndarray):
        return value.item() if value.size == 1 else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


# ----------------------------------------------------------------------------------------------------------------------
# trainer

class Trainer:
    """Train ``cfg`` (a ``paddle_impl.config.Config``) into ``save_dir``.

    ``resume``: None (fresh start), ``"latest"`` (``save_dir/latest``) or a checkpoint / save directory.
    ``data_root`` replaces both datasets' ``dataset_root``. ``progress``: show a tqdm bar on rank 0.
    """

    def __init__(self, cfg, save_dir: str, resume: Optional[str] = None, data_root: Optional[str] = None,
                 progress: bool = True, overwrite: bool = False):
        self.cfg = cfg
        self.overwrite = overwrite
        self.last_good: Optional[str] = None  # the newest checkpoint written (or resumed from): finite, loadable
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
        self._scalars: Optional[ScalarLog] = None
        self._pending_warnings: list = []  # found before the log handlers exist
        #: per-iteration record {'iter', 'lr', <loss terms>, 'loss'} of this run (python floats)
        self.history = []

    # -------------------------------------------------------------------------------------------- run dir
    def _previous_run(self) -> list:
        """What of an earlier run the save dir holds (checkpoints, the latest pointer, best_model)."""
        if not os.path.isdir(self.save_dir):
            return []
        return sorted(d for d in os.listdir(self.save_dir) if d in ("latest", "best_model")
                      or (d.startswith(CKPT_PREFIX) and d[len(CKPT_PREFIX):].isdigit()))

    def _claim_save_dir(self) -> None:
        """Never mix two runs: an earlier run in the save dir is continued (--resume) or removed (--overwrite)."""
        found = self._previous_run()
        if not found or self.resume:
            return
        if not self.overwrite:
            raise RunDirError(f"save dir {self.save_dir} already holds a run ({', '.join(found[:4])}"
                              f"{', ...' if len(found) > 4 else ''}): pass --resume to continue it, --overwrite to "
                              f"delete it and start again, or choose another --save-dir")
        for d in found + [d for d in os.listdir(self.save_dir) if d in RUN_FILES or d.startswith("config.prev-")]:
            path = os.path.join(self.save_dir, d)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)

    # -------------------------------------------------------------------------------------------- logging
    def _setup_logging(self) -> None:
        if not self.is_main:
            return
        os.makedirs(self.save_dir, exist_ok=True)
        if not os.access(self.save_dir, os.W_OK):
            raise RunDirError(f"save dir {self.save_dir} is not writable")
        self._claim_save_dir()
        self._record_config()
        fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s")
        fh = logging.FileHandler(os.path.join(self.save_dir, "train.log"), encoding="utf-8")
        fh.setFormatter(fmt)
        sh = _TqdmHandler() if self.progress else logging.StreamHandler(sys.stderr)
        sh.setFormatter(fmt)
        for h in (fh, sh):
            self.log.addHandler(h)
            self._handlers.append(h)
        for w in self._pending_warnings:
            self.log.warning(w)
        try:
            from visualdl import LogWriter
        except ImportError:
            self.log.info("VisualDL is not installed: scalars are written to train.log only")
        else:
            self._vdl = LogWriter(logdir=os.path.join(self.save_dir, "vdl"))

    def _record_config(self) -> None:
        """``SAVE_DIR/config.yml``: the config as this run uses it (the file, ``--opts`` and flags, defaults). A
        resume whose config differs keeps the earlier one as ``config.prev-K.yml`` and warns which keys changed."""
        import yaml

        path = os.path.join(self.save_dir, CONFIG_FILE)
        text = self.cfg.to_yaml()
        if self.resume and os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    old = yaml.safe_load(f)
            except (OSError, yaml.YAMLError):
                old = None
            if old == yaml.safe_load(text):
                return
            k = 1
            while os.path.exists(os.path.join(self.save_dir, f"config.prev-{k}.yml")):
                k += 1
            prev = os.path.join(self.save_dir, f"config.prev-{k}.yml")
            os.replace(path, prev)
            changed = _changed_keys(old, yaml.safe_load(text)) if isinstance(old, dict) else ["(unreadable)"]
            shown = ", ".join(changed[:8]) + (" ..." if len(changed) > 8 else "")
            self._pending_warnings.append(f"resuming with a config that differs from the run's ({shown}); the "
                                          f"earlier one is kept as {prev}")
        with atomic_write(path, encoding="utf-8") as f:
            f.write(text)

    def _close_logging(self) -> None:
        if self._scalars is not None:
            self._scalars.close()
            self._scalars = None
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

    def _record(self, rec: Dict[str, Any]) -> None:
        """One record of scalars.jsonl (and VisualDL when installed)."""
        rec = dict(rec, time=round(time.time(), 3))
        if self._scalars is not None:
            self._scalars.add(rec)
        tag = "Train" if rec["kind"] == "train" else "Evaluate"
        for k, v in rec.items():
            if k not in ("kind", "iter", "epoch", "time"):
                self._scalar(f"{tag}/{k}", v, rec["iter"])

    def _plot(self) -> None:
        if self._scalars is not None:
            plot_curves(self._scalars.records, os.path.join(self.save_dir, CURVES_FILE),
                        title=f"{self.cfg.model_type} ({self.cfg.file})")

    # -------------------------------------------------------------------------------------------- checkpoints
    def _check_weights_finite(self, it: int) -> None:
        """TrainingDiverged when a model or optimizer tensor holds NaN/Inf: such a state is never written."""
        bad = _nonfinite(self.model.state_dict().items())
        opt = self.optimizer.state_dict()
        bad_opt = _nonfinite((k, v) for k, v in opt.items() if hasattr(v, "dtype"))
        if bad or bad_opt:
            total = len(self.model.state_dict())
            shown = ", ".join((bad + bad_opt)[:3])
            raise TrainingDiverged(f"training diverged by iteration {it}: {len(bad)} of {total} model tensors "
                                   f"and {len(bad_opt)} optimizer tensors hold NaN/Inf (e.g. {shown}); no checkpoint "
                                   f"was written{self._resume_hint()}")

    def _resume_hint(self) -> str:
        if self.last_good is None:
            return "; no checkpoint of this run exists yet: lower lr_scheduler.learning_rate and start again"
        return (f"; the last good checkpoint is {self.last_good}: continue from it with a lower "
                f"lr_scheduler.learning_rate: segtwin train --config {self.cfg.path} --save-dir {self.save_dir} "
                f"--resume")

    def _save_checkpoint(self, it: int, epoch: int) -> None:
        self._check_weights_finite(it)
        name = f"{CKPT_PREFIX}{it}"
        final = os.path.join(self.save_dir, name)
        tmp = os.path.join(self.save_dir, f".{name}.tmp-{os.getpid()}")
        try:
            self._write_checkpoint(tmp, it, epoch)
            _commit_dir(tmp, final)
        except OSError as e:  # e.g. a full disk: the temporary directory goes, the previous checkpoint stays
            shutil.rmtree(tmp, ignore_errors=True)
            kept = f"; the previous checkpoint {self.last_good} is intact" if self.last_good else ""
            raise OSError(e.errno, f"cannot write checkpoint {final}: {e.strerror or e}{kept}") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        with atomic_write(os.path.join(self.save_dir, "latest"), encoding="utf-8", fsync=True) as f:
            f.write(name + "\n")
        self.last_good = final
        self._prune()
        self.log.info(f"[iter {it}] checkpoint saved: {final}")

    def _write_checkpoint(self, tmp: str, it: int, epoch: int) -> None:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        paddle.save(self.model.state_dict(), os.path.join(tmp, "model.pdparams"))
        paddle.save(_opt_state_by_structured_name(self.optimizer.state_dict(), self.model, True),
                    os.path.join(tmp, "model.pdopt"))
        meta = {"iteration": it, "epoch": epoch, "schedule": self.schedule.state_dict(), "best_miou": self.best_miou,
                "best_iter": self.best_iter, "seed": self.seed, "world_size": self.world_size,
                "batch_size": self.batch_size, "config": self.cfg.path}
        state = dict(meta, rng=_rng_states(),
                     scaler=_plain(self.scaler.state_dict()) if self.scaler is not None else None)
        with open(os.path.join(tmp, STATE_FILE), "w", encoding="utf-8") as f:
            json.dump(state, f)
            f.flush()
            os.fsync(f.fileno())
        with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)

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
        self._check_weights_finite(it)
        final = os.path.join(self.save_dir, "best_model")
        tmp = os.path.join(self.save_dir, f".best_model.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        paddle.save(self.model.state_dict(), os.path.join(tmp, "model.pdparams"))
        with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as f:
            json.dump({"iteration": it, "mIoU": metrics["mIoU"], "Acc": metrics["Acc"], "mAcc": metrics["mAcc"]},
                      f, indent=2)
        _commit_dir(tmp, final)

    def _older_checkpoints(self, ckpt: str) -> list:
        """Complete checkpoints next to `ckpt` with a lower iteration, newest first."""
        parent, name = os.path.split(os.path.normpath(ckpt))
        if not (name.startswith(CKPT_PREFIX) and name[len(CKPT_PREFIX):].isdigit()):
            return []
        n = int(name[len(CKPT_PREFIX):])
        older = [int(d[len(CKPT_PREFIX):]) for d in os.listdir(parent)
                 if d.startswith(CKPT_PREFIX) and d[len(CKPT_PREFIX):].isdigit() and int(d[len(CKPT_PREFIX):]) < n]
        return [os.path.join(parent, f"{CKPT_PREFIX}{k}") for k in sorted(older, reverse=True)
                if os.path.isfile(os.path.join(parent, f"{CKPT_PREFIX}{k}", STATE_FILE))]

    def _read_checkpoint(self, ckpt: str):
        """(state, model state_dict, optimizer state) of `ckpt`; RunDirError naming the file when one is unreadable
        or holds NaN/Inf."""
        state = load_checkpoint_state(ckpt)
        arrays = []
        for fname in ("model.pdparams", "model.pdopt"):
            path = os.path.join(ckpt, fname)
            try:
                obj = read_state_file(path)
            except Exception as e:  # noqa: BLE001 - any failure to read is a bad checkpoint file
                raise RunDirError(f"{path}: cannot be read ({type(e).__name__}: {' '.join(str(e).split())[:200]})") \
                    from None
            if not isinstance(obj, dict):
                raise RunDirError(f"{path}: holds a {type(obj).__name__}, not a state dict")
            bad = _nonfinite((k, v) for k, v in obj.items() if hasattr(v, "dtype"))
            if bad:
                raise RunDirError(f"{path}: {len(bad)} tensor(s) hold NaN/Inf (e.g. {', '.join(bad[:3])})")
            arrays.append(obj)
        return state, arrays[0], arrays[1]

    def _load_checkpoint(self, path: str) -> int:
        from ..checkpoint import strict_load
        ckpt = find_checkpoint(path)
        try:
            state, model_sd, opt_state = self._read_checkpoint(ckpt)
        except RunDirError as first:
            for older in self._older_checkpoints(ckpt):
                try:
                    state, model_sd, opt_state = self._read_checkpoint(older)
                except RunDirError:
                    continue
                self.log.warning(f"the newest checkpoint {ckpt} is unusable ({first}); resuming from the previous "
                                 f"one, {older}")
                ckpt = older
                break
            else:
                raise
        strict_load(self.model, model_sd, source=os.path.join(ckpt, "model.pdparams"))
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
        # The checkpoint of iteration N is written before that iteration's evaluation, so best_model may hold a
        # better model of an iteration <= N than the state knows of: keep it as the best so far.
        best_meta = os.path.join(self.save_dir, "best_model", "meta.json")
        if os.path.isfile(best_meta):
            try:
                with open(best_meta, encoding="utf-8") as f:
                    bm = json.load(f)
                if int(bm["iteration"]) <= int(state["iteration"]) and float(bm["mIoU"]) > self.best_miou:
                    self.best_miou, self.best_iter = float(bm["mIoU"]), int(bm["iteration"])
            except (OSError, ValueError, KeyError, TypeError):
                self.log.warning(f"{best_meta} is unreadable; the best model so far is taken from {ckpt}")
        self.last_good = ckpt
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
        if cfg.init_kept:
            reasons = sorted(set(cfg.init_kept.values()))
            self.log.info(f"model.backbone_pretrained: {len(cfg.init_kept)} backbone keys not in the file keep "
                          f"their initialisation ({'; '.join(reasons)}), e.g. {next(iter(cfg.init_kept))}")
        if self.world_size > 1 and self.on_gpu:
            self.model = convert_sync_batchnorm(self.model)
        self.optimizer = cfg.build_optimizer(self.model)
        self.schedule = cfg.build_lr()
        self.loss = cfg.build_loss()
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
        self.reader = BatchReader(self.train_set, int(raw["num_workers"]))
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
                                   f"rate or check the data{self._resume_hint()}")

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
            self._scalars = ScalarLog(self.save_dir, start)
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
                    data_iter = self.reader(self.sampler.batches(epoch)[pos:])
                images, labels = next(data_iter)
                images, labels = paddle.to_tensor(images), paddle.to_tensor(labels)
                t1 = time.perf_counter()
                lr = self.schedule.lr_at(it)
                optim_mod.set_lr(self.optimizer, lr)
                paddle.seed(_seed_of(self.seed, it, self.rank))
                if self.amp:
                    with paddle.amp.auto_cast(level="O1"):
                        outputs = net(images)
                else:
                    outputs = net(images)
                terms = {k: v.astype("float32") for k, v in self.loss(outputs, labels).items()}
                total = terms["loss"]
                self._check_finite(it + 1, terms)
                if self.scaler is not None:
                    self.scaler.scale(total).backward()
                    self.scaler.unscale_(self.optimizer)  # clip (when the recipe asks) the true gradients
                    optim_mod.clip_gradients(self.optimizer)
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
                    lrs = dict(zip(optim_mod.group_names(self.optimizer), optim_mod.current_lrs(self.optimizer)))
                    self._record(dict({"kind": "train", "iter": it, "epoch": epoch + 1},
                                      **{f"loss/{k}": v for k, v in avg.items()},
                                      **{f"lr/{g}": v for g, v in lrs.items()},
                                      batch_cost=bc, reader_cost=rc, ips=ips))
                    sums, batch_cost, reader_cost, n_window = {}, 0.0, 0.0, 0
                if self.is_main and (it % save_iters == 0 or it == self.iters):
                    self._save_checkpoint(it, epoch)
                if self.val_set is not None and (it % eval_iters == 0 or it == self.iters):
                    m = evaluate_miou(self.model, self.val_set, self.cfg.num_classes, self.cfg.ignore_index)
                    if m["mIoU"] > self.best_miou:
                        self.best_miou, self.best_iter = m["mIoU"], it
                        self._save_best(it, m)
                    self.log.info(f"[EVAL] iter {it}: mIoU={m['mIoU']:.4f} Acc={m['Acc']:.4f} mAcc={m['mAcc']:.4f} "
                                  f"(best mIoU {self.best_miou:.4f} at iter {self.best_iter})")
                    self._record({"kind": "eval", "iter": it, "mIoU": m["mIoU"], "Acc": m["Acc"], "mAcc": m["mAcc"]})
                    self._plot()
        finally:
            if bar is not None:
                bar.close()
            self.reader.close()
        if self.is_main:
            self._plot()
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
