"""Measure the training fault cases of tests/test_trainer_faults.py once more and print them as a table: exit
status, seconds to exit (Python and Paddle start-up included), and what the save dir holds afterwards.

    PYTHONPATH=. python tests/fault_table.py [--workdir DIR]

Not a test (the tests assert; this reports): each case runs `segtwin train` in a subprocess with a timeout on a
fresh synthetic dataset, as the tests do.
"""
from __future__ import annotations

import argparse
import os
import pickle
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from test_trainer import tiny_config  # noqa: E402
from test_trainer_faults import _break, _train  # noqa: E402
from test_training_io import _evil  # noqa: E402

from paddle_impl.datasets import write_cityscapes  # noqa: E402


def _left(out: Path) -> str:
    if not out.is_dir():
        return "(no save dir)"
    names = sorted(p.name for p in out.iterdir())
    latest = (out / "latest").read_text().strip() if (out / "latest").is_file() else None
    shown = ", ".join(names) if names else "(empty)"
    return shown + (f"; latest -> {latest}" if latest else "")


def _cases(work: Path):
    for kind, how in [(k, h) for k in ("cs", "voc") for h in ("truncated-image", "label-value", "size-mismatch")]:
        def case(d, kind=kind, how=how):
            root = d / kind
            _break(kind, how, root)
            cfg = tiny_config(d / "t.yml", "Cityscapes" if kind == "cs" else "VOCSegmentation", root, iters=4,
                              save_iters=1, num_workers=0)
            return cfg, ()
        yield f"train sample: {how} ({kind})", case

    def val_case(d):
        root = d / "cs"
        write_cityscapes(root, n=4, size=(48, 64))
        img = sorted((root / "leftImg8bit" / "val").rglob("*_leftImg8bit.png"))[0]
        img.write_bytes(img.read_bytes()[:100])
        return tiny_config(d / "t.yml", "Cityscapes", root, iters=2, val=True, eval_iters=2, save_iters=2), ()
    yield "val sample: truncated image (cs)", val_case

    def lr_case(d):
        root = d / "cs"
        write_cityscapes(root, n=4, size=(48, 64))
        return tiny_config(d / "t.yml", "Cityscapes", root, iters=8, save_iters=1, keep_checkpoints=8,
                           lr_scheduler={"type": "poly", "learning_rate": 1.0e+6, "power": 0.9}), ()
    yield "lr 1e6 (divergence)", lr_case

    def pkl_case(d):
        root = d / "cs"
        write_cityscapes(root, n=4, size=(48, 64))
        ckpt = d / "out" / "iter_1"
        ckpt.mkdir(parents=True)
        (ckpt / "state.pkl").write_bytes(pickle.dumps({"iteration": 1}))
        (d / "out" / "latest").write_text("iter_1\n")
        return tiny_config(d / "t.yml", "Cityscapes", root, iters=2), ("--resume",)
    yield "resume from a pickled state.pkl", pkl_case

    def evil_case(d):
        root = d / "cs"
        write_cityscapes(root, n=4, size=(48, 64))
        evil = _evil(d / "evil.pdparams", d / "pwned")
        return tiny_config(d / "t.yml", "Cityscapes", root, iters=2), ("--opts", f"model.pretrained={evil}")
    yield "model.pretrained naming os.system", evil_case

    def empty_case(d):
        root = d / "cs"
        write_cityscapes(root, n=4, size=(48, 64))
        (d / "empty.pdparams").write_bytes(b"")
        return tiny_config(d / "t.yml", "Cityscapes", root, iters=2), ("--opts", f"model.pretrained={d}/empty.pdparams")
    yield "model.pretrained empty file", empty_case

    def opts_case(d):
        root = d / "cs"
        write_cityscapes(root, n=4, size=(48, 64))
        return tiny_config(d / "t.yml", "Cityscapes", root, iters=2), ("--opts", "lr_scheduler.learning_rat=0.1")
    yield "--opts typo", opts_case


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default=None, help="where the cases run (default: a temporary directory)")
    args = ap.parse_args()
    base = Path(args.workdir or tempfile.mkdtemp(prefix="segtwin-faults-"))
    print("| case | exit | seconds | error (first 90 chars) | left in the save dir |")
    print("|---|---|---|---|---|")
    for i, (name, make) in enumerate(_cases(base)):
        d = base / f"case{i}"
        d.mkdir(parents=True)
        cfg, extra = make(d)
        rc, err, secs = _train(cfg, d / "out", *extra)
        line = next((ln for ln in err.splitlines() if ln.startswith("segtwin train: error:")), "")
        msg = line[len("segtwin train: error: "):][:90].replace("|", "/").replace(str(d), "D")
        print(f"| {name} | {rc} | {secs:.1f} | {msg} | {_left(d / 'out')} |", flush=True)
    print(f"\n(cases ran in {base})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
