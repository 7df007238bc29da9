"""``segtwin data check --config CFG [--data-root DIR] [--workers N] [--json PATH]``: scan a training config's data.

Every sample of ``train_dataset`` and ``val_dataset`` is read once, untransformed (``dataset.load(i)``: decodable
image, readable label, equal sizes, label values in the dataset's valid set), in a pool of worker processes, and ALL
the problems are reported in one run; bad label values come with their pixel counts. An image listed twice in one
split, or present in both train and val, is a warning. A section whose dataset cannot be built (missing root, image
without label, bad list file) is a problem of that section; the other section is still scanned.

Library: ``check_config(cfg, data_root=None, workers=0, progress=False) -> report`` (a JSON-able dict) and
``format_report(report)``. Mounted by the ``segtwin`` CLI as ``segtwin data`` (``build_parser`` + ``run``); run
directly as ``python -m paddle_impl.datasets.check check --config CFG``.

Exit codes: 0 no problems (warnings allowed), 1 problems found, 2 bad usage or input (config missing or invalid).
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
from collections import defaultdict
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

__all__ = ["check_config", "check_sample", "bad_label_counts", "format_report", "build_parser", "run", "main"]

PROG = "segtwin data check"
#: (split, config section), in report order
SECTIONS = (("train", "train_dataset"), ("val", "val_dataset"))
ERROR, WARNING = "error", "warning"


def default_workers() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    return max(1, min(8, n))


def problem(section: str, files: Sequence[str], message: str, kind: str = ERROR,
            values: Optional[Dict[int, int]] = None) -> Dict[str, Any]:
    """One finding: ``section`` (train/val), ``files`` (the first is the one shown), ``message``, ``kind``
    (error/warning) and, for bad label values, ``values`` ``[{"value": v, "pixels": n}]``."""
    rec: Dict[str, Any] = {"section": section, "kind": kind, "files": [str(f) for f in files], "message": message}
    if values:
        rec["values"] = [{"value": int(v), "pixels": int(n)} for v, n in sorted(values.items())]
    return rec


# ----------------------------------------------------------------------------------------------------------------------
# label values and their pixel counts

def valid_label_mask(dataset, path: str) -> np.ndarray:
    """256 booleans: the raw PNG values the dataset's reader accepts in the label file ``path`` (Cityscapes
    ``*_labelIds.png``: ids of cityscapesscripts' table; other Cityscapes labels: trainIds 0..18 and 255; VOC: the
    raw indices 0..20 and 255, whatever ``reduce_zero_label``)."""
    from .cityscapes import Cityscapes, _known_label_ids
    from .voc import VOCSegmentation

    mask = np.zeros(256, dtype=bool)
    name = os.path.basename(path)
    if isinstance(dataset, Cityscapes) and name.endswith("labelIds.png") and not name.endswith("labelTrainIds.png"):
        mask[_known_label_ids()] = True
        return mask
    n = 21 if isinstance(dataset, VOCSegmentation) else int(dataset.num_classes)
    mask[: max(0, min(n, 256))] = True
    if 0 <= int(dataset.ignore_index) < 256:
        mask[int(dataset.ignore_index)] = True
    return mask


def bad_label_counts(dataset, path: str) -> Dict[int, int]:
    """``{value: pixels}`` of the values of the label PNG ``path`` that ``dataset`` does not accept; ``{}`` when the
    file cannot be read as an index PNG."""
    from .cityscapes import read_index_png

    try:
        raw = read_index_png(path)
    except (OSError, ValueError):
        return {}
    counts = np.bincount(raw.ravel(), minlength=256)
    bad = np.flatnonzero((counts > 0) & ~valid_label_mask(dataset, path))
    return {int(v): int(counts[v]) for v in bad}


# ----------------------------------------------------------------------------------------------------------------------
# one sample (runs in the worker processes)

def _message(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if isinstance(e, (OSError, ValueError)) else f"{type(e).__name__}: {text}"


def _attempt(found: List[dict], files: Sequence[str], fn: Callable[[], Any], values: Callable[[], dict] = dict):
    """``fn()``, or None with a finding appended (``values()`` gives the bad label values of a ValueError)."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - every failure is a finding, never a crash of the check
        counts = values() if isinstance(e, ValueError) else {}
        found.append(problem("", files, _message(e), values=counts))
        return None


def _label_shape(dataset, label: Optional[np.ndarray], path: str):
    if label is not None:
        return label.shape[:2]
    from .cityscapes import read_index_png

    try:
        return read_index_png(path).shape[:2]
    except (OSError, ValueError):
        return None


def check_sample(dataset, index: int) -> List[dict]:
    """The problems of sample ``index`` (``[]`` when ``dataset.load(index)`` succeeds). When it fails, the image and
    the label are checked apart, so a sample with a bad image AND a bad label reports both; ``section`` is left
    empty for the caller."""
    img, lbl = dataset.files[index]
    try:
        dataset.load(index)
        return []
    except Exception as e:  # noqa: BLE001 - every failure is a finding
        first = e
    from .cityscapes import read_rgb

    found: List[dict] = []
    image = _attempt(found, [img], lambda: read_rgb(img))
    label = _attempt(found, [lbl], lambda: dataset.read_label(lbl), lambda: bad_label_counts(dataset, lbl))
    shape = _label_shape(dataset, label, lbl) if image is not None else None
    if image is not None and shape is not None and tuple(image.shape[:2]) != tuple(shape):
        found.append(problem("", [img, lbl], f"image {img} is {image.shape[1]}x{image.shape[0]} (WxH) but its label "
                                             f"{lbl} is {shape[1]}x{shape[0]}"))
    if not found:  # load() failed for a reason the parts do not show: report it as it came
        found.append(problem("", [img, lbl], _message(first)))
    return found


_WORKER: Dict[str, Any] = {}


def _init_worker(payload: bytes) -> None:
    """Pool initializer: the datasets arrive pickled, so unpickling (which imports the readers, and paddle) happens
    here, after the warning filters are set."""
    import warnings

    warnings.filterwarnings("ignore", message="No ccache found")
    os.environ["OMP_NUM_THREADS"] = "1"  # readers compute nothing; and paddle warns at import when it is not 1
    try:
        import cv2

        cv2.setNumThreads(1)
    except ImportError:  # pragma: no cover - cv2 is a dependency
        pass
    _WORKER["datasets"] = pickle.loads(payload)


def _check_chunk(section: str, indices: Sequence[int]) -> List[tuple]:
    """``[(index, problems)]`` of the samples ``indices`` of ``section``, in a worker."""
    dataset = _WORKER["datasets"][section]
    return [(i, check_sample(dataset, i)) for i in indices]


# ----------------------------------------------------------------------------------------------------------------------
# scanning

def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="data check", unit="img", file=sys.stderr, disable=not enabled)


def _chunks(datasets: Dict[str, Any], workers: int) -> List[tuple]:
    total = sum(len(d) for d in datasets.values())
    size = max(1, min(32, total // max(1, 4 * workers)))
    return [(s, list(range(a, min(a + size, len(d))))) for s, d in datasets.items() for a in range(0, len(d), size)]


def _scan_in_process(datasets, bar) -> Dict[str, Dict[int, list]]:
    out: Dict[str, Dict[int, list]] = defaultdict(dict)
    for section, dataset in datasets.items():
        for i in range(len(dataset)):
            out[section][i] = check_sample(dataset, i)
            bar.update(1)
    return out


def _scan_pool(datasets, payload: bytes, workers: int, bar, failures: List[str]) -> Dict[str, Dict[int, list]]:
    """Every sample in a process pool (spawn: no forked paddle state; ``payload``: the pickled ``datasets``, unpickled
    once per worker). A chunk that fails (a worker that died, a dataset that does not unpickle) leaves its samples
    out of the result, its error in ``failures``; the pool is always shut down."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    chunks = _chunks(datasets, workers)
    out: Dict[str, Dict[int, list]] = defaultdict(dict)
    pool = ProcessPoolExecutor(max_workers=min(workers, len(chunks)), mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker, initargs=(payload,))
    try:
        futures = {pool.submit(_check_chunk, s, idx): (s, idx) for s, idx in chunks}
        for fut in as_completed(futures):
            section, indices = futures[fut]
            try:
                for i, found in fut.result():
                    out[section][i] = found
            except Exception as e:  # noqa: BLE001 - a broken pool is reported, never raised or waited on
                failures.append(_message(e))
            bar.update(len(indices))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return out


def _scan(datasets: Dict[str, Any], workers: int, progress: bool, failures: List[str]) -> Dict[str, Dict[int, list]]:
    """``{section: {index: problems}}``; an index missing was not checked (its error in ``failures``)."""
    total = sum(len(d) for d in datasets.values())
    with _progress(total, progress) as bar:
        if workers <= 0 or total == 0:
            return _scan_in_process(datasets, bar)
        light = {s: _without_transforms(d) for s, d in datasets.items()}  # raw samples need no transforms
        try:
            payload = pickle.dumps(light)
        except Exception:  # noqa: BLE001 - a dataset that cannot travel to a worker is read here instead
            return _scan_in_process(datasets, bar)
        return _scan_pool(light, payload, workers, bar, failures)


def _without_transforms(dataset):
    import copy

    d = copy.copy(dataset)
    d.transforms = None
    return d


# ----------------------------------------------------------------------------------------------------------------------
# list-level warnings: duplicates and train/val leakage

def _image_keys(dataset) -> Dict[str, List[int]]:
    keys: Dict[str, List[int]] = defaultdict(list)
    for i, (img, _) in enumerate(dataset.files):
        keys[os.path.realpath(img)].append(i)
    return keys


def list_warnings(datasets: Dict[str, Any]) -> List[dict]:
    """Warnings: an image listed more than once in one split; an image in both train and val (leakage)."""
    found = []
    keys = {s: _image_keys(d) for s, d in datasets.items()}
    for section, k in keys.items():
        for img, idx in k.items():
            if len(idx) > 1:
                found.append(problem(section, [datasets[section].files[idx[0]][0]], f"listed {len(idx)} times in "
                                     f"the {section} split (samples {', '.join(map(str, idx))})", WARNING))
    if "train" in keys and "val" in keys:
        for img, idx in keys["val"].items():
            if img in keys["train"]:
                found.append(problem("val", [datasets["val"].files[idx[0]][0]],
                                     "also in the train split (train/val leakage)", WARNING))
    return found


# ----------------------------------------------------------------------------------------------------------------------
# a whole config

def _build(cfg, split: str, section: str, data_root: Optional[str], info: dict, found: List[dict]):
    root = data_root if data_root is not None else cfg.raw[section].get("dataset_root", "")
    info.update(type=cfg.raw[section].get("type"), root=os.path.abspath(root))
    try:
        dataset = cfg.build_dataset(split, root=data_root)
    except Exception as e:  # noqa: BLE001 - a section that cannot be built is a finding; the other one goes on
        found.append(problem(split, [], _message(e)))  # the message names the file or directory
        return None
    info["samples"] = len(dataset)
    return dataset


def _collect(scanned: Dict[str, Dict[int, list]], failures: List[str], datasets, sections: Dict[str, dict],
             found: List[dict]) -> None:
    for section, dataset in datasets.items():
        results = scanned.get(section, {})
        unchecked = [i for i in range(len(dataset)) if i not in results]
        for i in range(len(dataset)):
            found += [dict(rec, section=section) for rec in results.get(i, [])]
        sections[section]["scanned"] = len(dataset) - len(unchecked)
        if unchecked:
            why = failures[0] if failures else "unknown"
            found.append(problem(section, [dataset.files[unchecked[0]][0]], f"{len(unchecked)} sample(s) not "
                                 f"checked, this one first: a worker process failed: {why}"))


def check_config(cfg, data_root: Optional[str] = None, workers: int = 0, progress: bool = False) -> Dict[str, Any]:
    """The report of every train/val sample of ``cfg`` (a ``paddle_impl.config.Config``): ``{"config", "data_root",
    "sections": {split: {type, root, samples, scanned, errors, warnings}}, "problems": [...], "errors",
    "warnings"}``. ``data_root`` replaces both sections' ``dataset_root`` (as ``segtwin train --data-root``);
    ``workers`` 0 reads in this process."""
    sections: Dict[str, dict] = {}
    datasets: Dict[str, Any] = {}
    found: List[dict] = []
    for split, section in SECTIONS:
        if section not in cfg.raw:
            continue
        sections[split] = info = {"type": None, "root": None, "samples": None, "scanned": 0}
        dataset = _build(cfg, split, section, data_root, info, found)
        if dataset is not None:
            datasets[split] = dataset
    failures: List[str] = []
    _collect(_scan(datasets, workers, progress, failures), failures, datasets, sections, found)
    found += list_warnings(datasets)
    order = {s: k for k, (s, _) in enumerate(SECTIONS)}
    found.sort(key=lambda r: (r["kind"] != ERROR, order.get(r["section"], 9)))  # stable: sample order kept
    for split, info in sections.items():
        info["errors"] = sum(r["kind"] == ERROR and r["section"] == split for r in found)
        info["warnings"] = sum(r["kind"] == WARNING and r["section"] == split for r in found)
    return {"config": os.path.abspath(cfg.path), "data_root": data_root, "sections": sections, "problems": found,
            "errors": sum(r["kind"] == ERROR for r in found), "warnings": sum(r["kind"] == WARNING for r in found)}


# ----------------------------------------------------------------------------------------------------------------------
# output

def format_problem(rec: Dict[str, Any]) -> str:
    """``train: FILE: message`` (inside the message FILE is shortened to its name; bad label values come with their
    pixel counts); a problem of a whole section (its dataset cannot be built) is ``train: message``."""
    msg = rec["message"]
    if rec["kind"] == WARNING:
        msg = f"warning: {msg}"
    if rec.get("values"):
        msg += " [" + ", ".join(f"value {v['value']}: {v['pixels']} px" for v in rec["values"]) + "]"
    if not rec["files"]:
        return f"{rec['section']}: {msg}"
    shown = rec["files"][0]
    return f"{rec['section']}: {shown}: {msg.replace(shown, os.path.basename(shown))}"


def _table(sections: Dict[str, dict]) -> List[str]:
    rows = [("section", "type", "samples", "scanned", "errors", "warnings", "root")]
    for split, s in sections.items():
        rows.append((split, s["type"] or "-", "-" if s["samples"] is None else str(s["samples"]), str(s["scanned"]),
                     str(s["errors"]), str(s["warnings"]), s["root"] or "-"))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]) - 1)]
    return ["  ".join(cell.ljust(w) if c < 2 else cell.rjust(w) for c, (cell, w) in enumerate(zip(r, widths)))
            + "  " + r[-1] for r in rows]


def format_report(report: Dict[str, Any]) -> str:
    """The text report: the per-section table, every problem one line each, then a verdict line."""
    lines = [f"{PROG}: {report['config']}"] + _table(report["sections"])
    errors = [r for r in report["problems"] if r["kind"] == ERROR]
    warns = [r for r in report["problems"] if r["kind"] == WARNING]
    if errors:
        lines += ["", f"problems ({len(errors)}):"] + [format_problem(r) for r in errors]
    if warns:
        lines += ["", f"warnings ({len(warns)}):"] + [format_problem(r) for r in warns]
    scanned = sum(s["scanned"] for s in report["sections"].values())
    w = f"; {len(warns)} warning(s)" if warns else ""
    verdict = f"FAILED: {len(errors)} problem(s)" if errors else "OK: no problems"
    lines.append(f"{PROG}: {verdict}; {scanned} sample(s) scanned{w}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# command line

def _workers_arg(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = -1
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0 (0: read in this process), got {text!r}")
    return v


def _add_check_arguments(p: argparse.ArgumentParser) -> None:
    from ..engine._cli import add_opts_argument

    p.add_argument("--config", required=True, metavar="CFG", help="YAML training config (paddle_impl/configs/*.yml)")
    p.add_argument("--data-root", default=None, metavar="DIR",
                   help="replaces dataset_root of train_dataset and val_dataset")
    p.add_argument("--workers", type=_workers_arg, default=None, metavar="N",
                   help=f"reader processes (default min(8, CPUs) = {default_workers()}; 0: in this process)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the full report as JSON to PATH")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar on stderr")
    add_opts_argument(p)


def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    """``segtwin data VERB ...``: the ``check`` verb's arguments on a subparser of ``parser`` (a new one when
    None)."""
    p = parser or argparse.ArgumentParser(prog="segtwin data", description="Dataset tools of a training config.")
    sub = p.add_subparsers(dest="verb", metavar="VERB", required=True)
    check = sub.add_parser("check", help="read every train/val sample once and report all problems",
                           description=__doc__.split("\n\n")[1].replace("``", ""))
    _add_check_arguments(check)
    return p


def _check_writable(path: str) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"--json {path}: directory {parent} does not exist")
    if os.path.isdir(path) or not os.access(parent, os.W_OK):
        raise PermissionError(f"--json {path}: cannot write a file there")


def _write_json(path: str, report: Dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
        f.write("\n")


def run(args: argparse.Namespace) -> int:
    """Run the parsed ``check`` command; print the report. Returns the exit code (0 clean, 1 problems, 2 input)."""
    from ..config import load_config, parse_opts

    if getattr(args, "verb", "check") != "check":  # pragma: no cover - argparse allows only the verbs above
        print(f"segtwin data: error: unknown verb {args.verb!r}", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, parse_opts(args.opts))
        if args.json:
            _check_writable(args.json)  # a bad --json path fails now, not after the scan
    except (OSError, ValueError) as e:  # ConfigError is a ValueError
        print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    workers = default_workers() if args.workers is None else args.workers
    report = check_config(cfg, data_root=args.data_root, workers=workers, progress=not args.no_progress)
    report["exit_code"] = 1 if report["errors"] else 0
    print(format_report(report), flush=True)
    if args.json:
        try:
            _write_json(args.json, report)
        except OSError as e:
            print(f"{PROG}: error: cannot write --json {args.json}: {e}", file=sys.stderr)
            return 2
    return report["exit_code"]


def main(argv: Optional[List[str]] = None) -> int:
    import warnings

    warnings.filterwarnings("ignore", message="No ccache found")  # paddle's, at the readers' import
    from alignment.utils import run_parser

    return run_parser(build_parser(), argv, run)


if __name__ == "__main__":
    sys.exit(main())
