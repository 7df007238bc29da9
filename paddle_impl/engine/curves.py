"""Training curves: ``SAVE_DIR/scalars.jsonl`` (one JSON record per log interval and per evaluation) and the
``SAVE_DIR/training_curves.png`` drawn from it.

A record is flat, so ``pandas.read_json(path, lines=True)`` reads it as a table:

    {"kind": "train", "iter": 20, "epoch": 3, "loss/main": 1.93, "loss/aux": 2.11, "loss/loss": 2.78,
     "lr/backbone": 0.0098, "lr/head": 0.098, "batch_cost": 0.41, "reader_cost": 0.002, "ips": 4.9, "time": ...}
    {"kind": "eval", "iter": 1000, "mIoU": 0.41, "Acc": 0.88, "mAcc": 0.52, "time": ...}

The file is appended to as training runs and flushed after each record, so a run killed at any moment leaves at
most one partial last line; ``read_scalars`` skips it, and a resumed run first keeps only the records up to the
iteration it resumes from (the killed run's later records describe iterations that are trained again).
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional

from alignment.utils import atomic_write

SCALARS_FILE = "scalars.jsonl"
CURVES_FILE = "training_curves.png"


def read_scalars(path: str, upto: Optional[int] = None) -> List[Dict[str, Any]]:
    """The records of ``path`` (none when it does not exist), only those with ``iter <= upto`` when given; a line
    that is not a JSON object (the partial last line of a killed run) is skipped."""
    if not os.path.isfile(path):
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("iter"), int) and (upto is None or rec["iter"] <= upto):
                out.append(rec)
    return out


class ScalarLog:
    """Appends records to ``save_dir/scalars.jsonl``; ``start`` > 0 (a resume) first cuts the file back to the
    records of iterations <= start, 0 starts it empty."""

    def __init__(self, save_dir: str, start: int = 0):
        self.path = os.path.join(save_dir, SCALARS_FILE)
        self.records = read_scalars(self.path, upto=start) if start > 0 else []
        with atomic_write(self.path, encoding="utf-8") as f:
            for rec in self.records:
                f.write(json.dumps(rec) + "\n")
        self._f = open(self.path, "a", encoding="utf-8")

    def add(self, rec: Dict[str, Any]) -> None:
        self.records.append(rec)
        self._f.write(json.dumps(rec) + "\n")
        self._f.flush()

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()


def plot_curves(records: List[Dict[str, Any]], path: str, title: str = "") -> Optional[str]:
    """``training_curves.png``: loss terms, the lr of every parameter group (log scale) and the evaluation
    metrics against the iteration; written to a temporary file and renamed into place. None when there is
    nothing to draw yet."""
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    if not train and not evals:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for prefix, ax, ylabel in (("loss/", axes[0], "loss (mean over the log interval)"), ("lr/", axes[1], "lr")):
        keys = sorted({k for r in train for k in r if k.startswith(prefix)})
        for k in keys:
            pts = [(r["iter"], r[k]) for r in train if k in r]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=k[len(prefix):])
        ax.set_xlabel("iteration")
        ax.set_ylabel(ylabel)
        if keys:
            ax.legend()
    lrs = [v for r in train for k, v in r.items() if k.startswith("lr/")]
    if lrs and min(lrs) > 0:
        axes[1].set_yscale("log")
    for k in ("mIoU", "Acc", "mAcc"):
        pts = [(r["iter"], r[k]) for r in evals if k in r]
        if pts:
            axes[2].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=k)
    axes[2].set_xlabel("iteration")
    axes[2].set_ylabel("validation")
    if evals:
        axes[2].legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=80)
    plt.close(fig)
    return path
