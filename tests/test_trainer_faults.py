"""Training faults: a bad sample, a divergence, a full disk, a corrupted or unsafe checkpoint, a reused save dir.

Every failure path runs `segtwin train` in a subprocess with a timeout (a hang is a failure, never a stuck suite),
and checks the exit status (2 bad input, 1 a diverged run), the one-line error naming the file or value, and what is
left on disk: `latest` always names a finite, loadable checkpoint, and nothing is written after the last good one.
"""
from __future__ import annotations

import errno
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

paddle = pytest.importorskip("paddle")

from paddle_impl.config import load_config  # noqa: E402
from paddle_impl.datasets import write_cityscapes, write_voc  # noqa: E402
from paddle_impl.engine import trainer as trainer_mod  # noqa: E402
from paddle_impl.engine.trainer import Trainer  # noqa: E402
from test_trainer import tiny_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
EXIT_WITHIN = 60  # seconds a failing run may take to end, start-up included

pytestmark = pytest.mark.slow


def _train(cfg: Path, save_dir: Path, *extra: str, timeout: float = 240):
    """`segtwin train` in a subprocess -> (returncode, stderr, seconds). A hang fails the test (TimeoutExpired)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "paddle_impl.train", "--config", str(cfg), "--save-dir", str(save_dir),
                        "--no-progress", *extra], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    return r.returncode, r.stderr, time.time() - t0


def _error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("segtwin train: error:")]
    assert len(lines) == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


def _first_train_pair(root: Path, kind: str):
    if kind == "cs":
        img = sorted((root / "leftImg8bit" / "train").rglob("*_leftImg8bit.png"))[0]
        lbl = Path(str(img).replace("leftImg8bit", "gtFine", 1).replace("_leftImg8bit.png", "_gtFine_labelIds.png"))
    else:
        ids = (root / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
        img = root / "VOCdevkit" / "VOC2012" / "JPEGImages" / f"{ids[0]}.jpg"
        lbl = root / "VOCdevkit" / "VOC2012" / "SegmentationClass" / f"{ids[0]}.png"
    assert img.is_file() and lbl.is_file(), (img, lbl)
    return img, lbl


def _break(kind: str, how: str, root: Path) -> Path:
    """Damage the first training sample of a fresh mini dataset in `root`; returns the damaged file."""
    if kind == "cs":
        write_cityscapes(root, n=4, size=(48, 64))
    else:
        write_voc(root, n=4, size=(48, 64))
    img, lbl = _first_train_pair(root, kind)
    if how == "truncated-image":
        data = img.read_bytes()
        img.write_bytes(data[: len(data) // 3])
        return img
    if how == "label-value":
        from PIL import Image
        im = Image.open(lbl)
        arr = np.array(im)
        arr[0, :5] = 77 if kind == "cs" else 25  # a labelId outside cityscapesscripts' table / a VOC index > 20
        out = Image.fromarray(arr)
        if im.mode == "P":
            out.putpalette(im.getpalette())
        out.save(lbl)
        return lbl
    if how == "size-mismatch":
        lab = cv2.imread(str(lbl), cv2.IMREAD_UNCHANGED)
        if lab is None or kind == "voc":  # palette PNG: go through PIL to keep the indices
            from PIL import Image
            im = Image.open(lbl)
            im.crop((0, 0, im.width - 8, im.height)).save(lbl)
        else:
            cv2.imwrite(str(lbl), lab[:, :-8])
        return lbl
    raise ValueError(how)


BAD = [(k, h, w) for k in ("cs", "voc") for h in ("truncated-image", "label-value", "size-mismatch") for w in (0, 2)
       if not (k == "voc" and w == 2)]


@pytest.mark.parametrize("kind,how,workers", BAD, ids=[f"{k}-{h}-w{w}" for k, h, w in BAD])
def test_bad_training_sample_ends_the_run_with_exit_2(tmp_path, kind, how, workers):
    root = tmp_path / kind
    bad = _break(kind, how, root)
    cfg = tiny_config(tmp_path / "t.yml", "Cityscapes" if kind == "cs" else "VOCSegmentation", root, iters=4,
                      num_workers=workers, save_iters=1)
    rc, err, secs = _train(cfg, tmp_path / "out")
    line = _error_line(err)
    assert rc == 2 and secs < EXIT_WITHIN, (rc, secs, line)
    assert str(bad) in line, line
    if how == "label-value":
        assert ("77" if kind == "cs" else "25") in line, line
    # nothing written after the last good checkpoint: each one on disk is complete and finite
    for ckpt in (tmp_path / "out").glob("iter_*"):
        assert (ckpt / "state.json").is_file()
    assert not [p for p in (tmp_path / "out").iterdir() if ".tmp-" in p.name]


@pytest.mark.parametrize("death", ["sigkill", "exit"])
def test_a_dying_data_worker_ends_the_run_instead_of_a_hang(death):
    """A data-loading worker that dies while reading a batch (SIGKILL, or a native crash that ends the process --
    seen once as a glibc heap assertion) must end the read with DataWorkerDied, the training CLI's exit status 1.
    multiprocessing.Pool replaced such a worker and waited for its batch forever. In a subprocess with a timeout."""
    code = f"""
import os, signal, sys
import numpy as np
from paddle_impl.engine.trainer import BatchReader, DataWorkerDied

class Samples:
    def __getitem__(self, k):
        if k == 5:  # only ever read in a worker
            os.kill(os.getpid(), signal.SIGKILL) if {death!r} == "sigkill" else os._exit(3)
        return np.full(2, k, np.float32), np.full(2, k, np.int64)

reader = BatchReader(Samples(), 2)
got = []
try:
    for images, labels in reader([[0, 1], [2, 3], [4, 5], [6, 7]]):
        got.append(int(images[0, 0]))
    print("NO ERROR", got)
except DataWorkerDied as e:
    print("DIED", got, e)
finally:
    reader.close()
"""
    t0 = time.time()
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                       capture_output=True, text=True, timeout=EXIT_WITHIN)
    assert r.returncode == 0, r.stderr[-3000:]
    # (Paddle's signal handler prints a line when close() terminates the surviving worker)
    out = [ln for ln in r.stdout.splitlines() if ln.startswith(("DIED", "NO ERROR"))]
    # the batches before the dead one came through in order; the error names the batch the worker held
    assert len(out) == 1 and out[0].startswith("DIED [0, 2]"), r.stdout[-2000:]
    assert "worker process ended abruptly" in out[0] and "[4, 5]" in out[0], out
    assert time.time() - t0 < EXIT_WITHIN


def test_bad_validation_sample_is_an_error_after_the_checkpoint(tmp_path):
    root = tmp_path / "cs"
    write_cityscapes(root, n=4, size=(48, 64))
    img = sorted((root / "leftImg8bit" / "val").rglob("*_leftImg8bit.png"))[0]
    img.write_bytes(img.read_bytes()[:100])
    cfg = tiny_config(tmp_path / "t.yml", "Cityscapes", root, iters=2, val=True, eval_iters=2, save_iters=2)
    rc, err, secs = _train(cfg, tmp_path / "out")
    line = _error_line(err)
    assert rc == 2 and secs < EXIT_WITHIN and str(img) in line, line
    # the checkpoint of the iteration is written before its evaluation: no training is lost
    assert (tmp_path / "out" / "latest").read_text().strip() == "iter_2"


def _finite_checkpoint(ckpt: Path) -> bool:
    for name in ("model.pdparams", "model.pdopt"):
        for v in paddle.load(str(ckpt / name)).values():
            if hasattr(v, "numpy") and v.numpy().dtype.kind == "f" and not np.isfinite(v.numpy()).all():
                return False
    return True


def test_divergence_exits_1_and_latest_stays_finite(tmp_path):
    root = tmp_path / "cs"
    write_cityscapes(root, n=4, size=(48, 64))
    cfg = tiny_config(tmp_path / "t.yml", "Cityscapes", root, iters=8, save_iters=1, keep_checkpoints=8,
                      lr_scheduler={"type": "poly", "learning_rate": 1.0e+6, "power": 0.9})
    rc, err, secs = _train(cfg, tmp_path / "out")
    line = _error_line(err)
    assert rc == 1 and "training diverged" in line and secs < 240, line
    out = tmp_path / "out"
    ckpts = sorted(out.glob("iter_*"))
    assert all(_finite_checkpoint(c) for c in ckpts), [c.name for c in ckpts]
    if (out / "latest").exists():
        latest = out / (out / "latest").read_text().strip()
        assert latest in ckpts and f"the last good checkpoint is {latest}" in line and "--resume" in line, line
    else:
        assert "no checkpoint of this run exists yet" in line, line


def test_full_disk_while_checkpointing_keeps_the_previous_one(tmp_path, monkeypatch):
    root = tmp_path / "cs"
    write_cityscapes(root, n=4, size=(48, 64))
    cfg = load_config(tiny_config(tmp_path / "t.yml", "Cityscapes", root, iters=3, save_iters=1))
    real_save, calls = paddle.save, []

    def save(obj, path, *a, **k):
        calls.append(path)
        if ".iter_2.tmp-" in str(path) and str(path).endswith("model.pdopt"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(trainer_mod.paddle, "save", save)
    with pytest.raises(OSError, match=r"cannot write checkpoint .*iter_2: No space left on device; the previous "
                                      r"checkpoint .*iter_1 is intact"):
        Trainer(cfg, tmp_path / "out", progress=False).train()
    out = tmp_path / "out"
    assert (out / "latest").read_text().strip() == "iter_1"
    assert sorted(p.name for p in out.iterdir()) == ["config.yml", "iter_1", "latest", "scalars.jsonl", "train.log"]
    assert _finite_checkpoint(out / "iter_1")


class _Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_pickled_state_is_never_read(tmp_path):
    root = tmp_path / "cs"
    write_cityscapes(root, n=4, size=(48, 64))
    cfg = tiny_config(tmp_path / "t.yml", "Cityscapes", root, iters=2, save_iters=1)
    ckpt = tmp_path / "out" / "iter_1"
    ckpt.mkdir(parents=True)
    marker = tmp_path / "pwned"
    (ckpt / "state.pkl").write_bytes(pickle.dumps({"iteration": 1, "x": _Payload(marker)}))
    (tmp_path / "out" / "latest").write_text("iter_1\n")
    for how in (("--resume", str(ckpt)), ("--resume",)):  # the checkpoint named, or found through `latest`
        rc, err, _ = _train(cfg, tmp_path / "out", *how)
        line = _error_line(err)
        assert rc == 2 and "never read" in line and "state.pkl" in line, line
    assert not marker.exists(), "the pickle's payload ran"


def test_reused_save_dir_is_refused_then_resumed_or_overwritten(tmp_path):
    root = tmp_path / "cs"
    write_cityscapes(root, n=4, size=(48, 64))
    cfg = tiny_config(tmp_path / "t.yml", "Cityscapes", root, iters=2, save_iters=1, keep_checkpoints=2)
    out = tmp_path / "out"
    assert _train(cfg, out)[0] == 0
    before = (out / "iter_2" / "model.pdparams").read_bytes()
    rc, err, _ = _train(cfg, out)
    line = _error_line(err)
    assert rc == 2 and "already holds a run" in line and "--resume" in line and "--overwrite" in line, line
    assert (out / "iter_2" / "model.pdparams").read_bytes() == before  # untouched
    # the newest checkpoint corrupted: --resume falls back to the previous one and says so
    (out / "iter_2" / "model.pdparams").write_bytes(b"\0" * 64)
    cfg3 = tiny_config(tmp_path / "t3.yml", "Cityscapes", root, iters=3, save_iters=1, keep_checkpoints=2)
    rc, err, _ = _train(cfg3, out, "--resume")
    assert rc == 0, err[-3000:]
    log = (out / "train.log").read_text()
    assert "is unusable" in log and "iter_2" in log and "resuming from the previous one" in log and "iter_1" in log
    assert "resumed from" in log and (out / "latest").read_text().strip() == "iter_3"
    rc, err, _ = _train(cfg, out, "--overwrite")
    assert rc == 0, err[-3000:]
    assert sorted(p.name for p in out.glob("iter_*")) == ["iter_1", "iter_2"]
    assert "resumed from" not in (out / "train.log").read_text()
