"""`segtwin data check`: every train/val sample of a config read once, ALL problems reported in one run.

Mini synthetic datasets (paddle_impl.datasets.synthetic) with planted faults: a truncated image, a labelId outside
cityscapesscripts' table, an image/label size mismatch, a VOC index > 20, a missing label file, a duplicate and a
train/val leak. Runs in a subprocess have a timeout: a hang is a failure, never a stuck suite.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

paddle = pytest.importorskip("paddle")

from alignment.cli import main as segtwin  # noqa: E402
from paddle_impl.config import load_config  # noqa: E402
from paddle_impl.datasets import check as dc  # noqa: E402
from paddle_impl.datasets import write_cityscapes, write_voc  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CS_CFG = str(REPO / "paddle_impl" / "configs" / "pspnet_r50_cityscapes.yml")
# write_voc writes VOC2012 train/val lists, no SBD train_aug: the aug config checked with its train split
VOC_CFG = str(REPO / "paddle_impl" / "configs" / "pspnet_r50_voc2012aug.yml")
VOC_OPTS = ["--opts", "train_dataset.split=train"]
SIZE = (32, 64)
PADDLE_NOISE = ("WARNING: OMP_NUM_THREADS set to", "PLEASE USE OMP_NUM_THREADS WISELY")


def _cs_pair(root: Path, split: str, k: int):
    img = sorted((root / "leftImg8bit" / split).rglob("*_leftImg8bit.png"))[k]
    lbl = Path(str(img).replace("leftImg8bit", "gtFine", 1).replace("_leftImg8bit.png", "_gtFine_labelIds.png"))
    return img, lbl


def _voc_pair(root: Path, split: str, k: int):
    voc = root / "VOCdevkit" / "VOC2012"
    ids = (voc / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()
    return voc / "JPEGImages" / f"{ids[k]}.jpg", voc / "SegmentationClass" / f"{ids[k]}.png"


def _set_label(lbl: Path, value: int, pixels: int) -> None:
    """Write ``value`` into the first ``pixels`` pixels of row 0, keeping a palette PNG's palette."""
    im = Image.open(lbl)
    arr = np.array(im)
    arr[0, :pixels] = value
    out = Image.fromarray(arr)
    if im.mode == "P":
        out.putpalette(im.getpalette())
    out.save(lbl)


def _crop_label(lbl: Path, cols: int = 8) -> None:
    im = Image.open(lbl)
    im.crop((0, 0, im.width - cols, im.height)).save(lbl)


@pytest.fixture(scope="module")
def broken_cs(tmp_path_factory):
    """Cityscapes, 3 frames a split, three problems: a truncated train image, a train label 8 px narrower than its
    image, a val labelIds PNG with 77 (not in the table) in 5 pixels."""
    root = tmp_path_factory.mktemp("data") / "cs"
    write_cityscapes(root, n=3, size=SIZE)
    trunc, _ = _cs_pair(root, "train", 0)
    trunc.write_bytes(trunc.read_bytes()[:200])
    small_img, small = _cs_pair(root, "train", 2)
    _crop_label(small)
    _, bad = _cs_pair(root, "val", 1)
    _set_label(bad, 77, 5)
    return {"root": root, "truncated": trunc, "mismatch": (small_img, small), "label77": bad}


def _check(capsys, *args):
    """`segtwin data check` in this process -> (exit code, stdout, stderr)."""
    rc = segtwin(["data", "check", "--no-progress", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def _problem_lines(out: str):
    return [ln for ln in out.splitlines() if ln.startswith(("train: ", "val: "))]


# ----------------------------------------------------------------------------------------------------------------------
# clean data

def test_clean_cityscapes_and_voc_pass(tmp_path, capsys):
    write_cityscapes(tmp_path / "cs", n=2, size=SIZE)
    write_voc(tmp_path / "voc", n=2, size=SIZE)
    rc, out, _ = _check(capsys, "--config", CS_CFG, "--data-root", tmp_path / "cs", "--workers", 0)
    assert rc == 0, out
    assert out.splitlines()[-1] == "segtwin data check: OK: no problems; 4 sample(s) scanned", out
    assert not _problem_lines(out)
    rc, out, _ = _check(capsys, "--config", VOC_CFG, "--data-root", tmp_path / "voc", "--workers", 0, *VOC_OPTS)
    assert rc == 0 and "OK: no problems; 4 sample(s)" in out, out
    table = {ln.split()[0]: ln.split() for ln in out.splitlines()[1:4]}
    assert table["train"][1:6] == ["VOCSegmentation", "2", "2", "0", "0"], out


# ----------------------------------------------------------------------------------------------------------------------
# every problem in one run

def test_three_problems_in_one_run(broken_cs, tmp_path, capsys):
    report_path = tmp_path / "report.json"
    rc, out, _ = _check(capsys, "--config", CS_CFG, "--data-root", broken_cs["root"], "--workers", 0,
                        "--json", report_path)
    assert rc == 1, out
    lines = _problem_lines(out)
    assert len(lines) == 3, out
    trunc, (small_img, small), bad = broken_cs["truncated"], broken_cs["mismatch"], broken_cs["label77"]
    assert lines[0].startswith(f"train: {trunc}: ") and "cannot read image" in lines[0], lines
    assert lines[1].startswith(f"train: {small_img}: ") and str(small) in lines[1] and "64x32" in lines[1], lines
    assert "56x32" in lines[1], lines
    assert lines[2].startswith(f"val: {bad}: ") and "77" in lines[2] and "[value 77: 5 px]" in lines[2], lines
    assert out.splitlines()[-1] == "segtwin data check: FAILED: 3 problem(s); 6 sample(s) scanned", out

    report = json.loads(report_path.read_text())
    assert report["errors"] == 3 and report["warnings"] == 0 and report["exit_code"] == 1
    assert report["sections"]["train"] == {"type": "Cityscapes", "root": str(broken_cs["root"]), "samples": 3,
                                           "scanned": 3, "errors": 2, "warnings": 0}
    assert report["sections"]["val"]["errors"] == 1
    p77 = report["problems"][2]
    assert p77["section"] == "val" and p77["files"] == [str(bad)] and p77["values"] == [{"value": 77, "pixels": 5}]
    assert report["problems"][1]["files"] == [str(small_img), str(small)]


def test_workers_0_and_2_give_the_same_report(broken_cs):
    cfg = load_config(CS_CFG)
    serial = dc.check_config(cfg, data_root=str(broken_cs["root"]), workers=0)
    pooled = dc.check_config(cfg, data_root=str(broken_cs["root"]), workers=2)
    assert pooled == serial
    assert serial["errors"] == 3


def test_voc_label_value_25_with_its_pixel_count(tmp_path, capsys):
    root = tmp_path / "voc"
    write_voc(root, n=2, size=SIZE)
    _, lbl = _voc_pair(root, "val", 0)
    _set_label(lbl, 25, 7)
    rc, out, _ = _check(capsys, "--config", VOC_CFG, "--data-root", root, "--workers", 0, *VOC_OPTS)
    assert rc == 1, out
    (line,) = _problem_lines(out)
    assert line.startswith(f"val: {lbl}: ") and "25" in line and line.endswith("[value 25: 7 px]"), line


def test_a_sample_with_a_bad_image_and_a_bad_label_reports_both(tmp_path):
    root = tmp_path / "cs"
    write_cityscapes(root, n=1, size=SIZE, splits=("train",))
    img, lbl = _cs_pair(root, "train", 0)
    img.write_bytes(b"")
    _set_label(lbl, 250, 3)
    ds = load_config(CS_CFG).build_dataset("train", root=str(root))
    found = dc.check_sample(ds, 0)
    assert [p["files"] for p in found] == [[str(img)], [str(lbl)]], found
    assert found[1]["values"] == [{"value": 250, "pixels": 3}]
    assert dc.bad_label_counts(ds, str(lbl)) == {250: 3}


def test_label_train_ids_are_counted_against_0_to_18_and_255(tmp_path):
    root = tmp_path / "cs"
    write_cityscapes(root, n=1, size=SIZE, splits=("train",))
    _, lbl = _cs_pair(root, "train", 0)
    train_ids = Path(str(lbl).replace("_labelIds.png", "_labelTrainIds.png"))
    Image.fromarray(np.full(SIZE, 255, np.uint8), "L").save(train_ids)
    _set_label(train_ids, 19, 6)  # 19 is a valid labelId but not a trainId
    ds = load_config(CS_CFG).build_dataset("train", root=str(root))
    assert ds.files[0][1] == str(train_ids)
    (found,) = dc.check_sample(ds, 0)
    assert found["files"] == [str(train_ids)] and found["values"] == [{"value": 19, "pixels": 6}], found


# ----------------------------------------------------------------------------------------------------------------------
# a section that cannot be built; list warnings

def test_missing_label_fails_its_section_and_the_other_is_still_scanned(tmp_path, capsys):
    root = tmp_path / "cs"
    write_cityscapes(root, n=2, size=SIZE)
    img, lbl = _cs_pair(root, "train", 1)
    lbl.unlink()
    rc, out, _ = _check(capsys, "--config", CS_CFG, "--data-root", root, "--workers", 0)
    assert rc == 1, out
    (line,) = _problem_lines(out)
    assert line.startswith("train: ") and str(img) in line and str(lbl) in line and "has no label" in line, line
    rows = {ln.split()[0]: ln.split() for ln in out.splitlines()[1:4]}
    assert rows["train"][2:5] == ["-", "0", "1"] and rows["val"][2:5] == ["2", "2", "0"], out


def test_duplicates_and_train_val_leakage_are_warnings(tmp_path, capsys):
    root = tmp_path / "cs"
    write_cityscapes(root, n=2, size=SIZE)
    rel = [[p.relative_to(root).as_posix() for p in _cs_pair(root, s, k)] for s, k in
           (("train", 0), ("train", 1), ("train", 0), ("val", 1))]
    (root / "train.txt").write_text("".join(f"{a} {b}\n" for a, b in rel))
    rc, out, _ = _check(capsys, "--config", CS_CFG, "--data-root", root, "--workers", 0,
                        "--opts", "train_dataset.list_file=train.txt")
    assert rc == 0, out
    lines = _problem_lines(out)
    assert len(lines) == 2, out
    assert lines[0] == f"train: {root / rel[0][0]}: warning: listed 2 times in the train split (samples 0, 2)"
    assert lines[1] == f"val: {root / rel[3][0]}: warning: also in the train split (train/val leakage)"
    assert out.splitlines()[-1].endswith("; 6 sample(s) scanned; 2 warning(s)"), out


# ----------------------------------------------------------------------------------------------------------------------
# the pool never hangs

class _Unpicklable:
    """Pickles in the parent, fails to unpickle in a worker: the pool breaks at start-up."""

    def __init__(self, files):
        self.files = files

    def __len__(self):
        return len(self.files)

    def __reduce__(self):  # unpickling calls int("...") -> ValueError, in the worker's initializer
        return (int, ("cannot rebuild the dataset here",))


def test_a_broken_pool_is_a_problem_not_a_hang(tmp_path):
    failures = []
    ds = _Unpicklable([(str(tmp_path / f"{i}.png"), str(tmp_path / f"{i}_l.png")) for i in range(3)])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dc, "_without_transforms", lambda d: d)
        scanned = dc._scan({"train": ds}, workers=2, progress=False, failures=failures)
    assert not scanned.get("train") and failures, (scanned, failures)
    found, sections = [], {"train": {}}
    dc._collect(scanned, failures, {"train": ds}, sections, found)
    assert sections["train"]["scanned"] == 0
    (rec,) = found
    assert rec["files"] == [ds.files[0][0]] and rec["message"].startswith("3 sample(s) not checked"), rec


# ----------------------------------------------------------------------------------------------------------------------
# command line

def _run(*args, timeout=120):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "alignment.cli", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _stderr_lines(err: str):
    return [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(PADDLE_NOISE)]


def test_missing_config_is_exit_2_with_one_line(tmp_path):
    r = _run("data", "check", "--config", tmp_path / "nope.yml", "--no-progress")
    assert r.returncode == 2, r.stderr
    assert _stderr_lines(r.stderr) == [f"segtwin data check: error: config file {tmp_path / 'nope.yml'} does not "
                                       f"exist"], r.stderr
    assert r.stdout == ""


def test_invalid_config_and_bad_opts_are_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.yml"
    bad.write_text("batch_size: [1\n")
    rc, out, err = _check(capsys, "--config", bad)
    assert rc == 2 and err.startswith("segtwin data check: error: bad.yml: not valid YAML") and not out, err
    rc, _, err = _check(capsys, "--config", CS_CFG, "--opts", "train_dataset.typo=1")
    assert rc == 2 and "unknown key 'typo'" in err and len(err.strip().splitlines()) == 1, err
    rc, _, err = _check(capsys, "--config", CS_CFG, "--workers", "-1")
    assert rc == 2 and "--workers" in err


def test_segtwin_data_help_lists_check(capsys):
    assert segtwin(["data", "--help"]) == 0
    out = capsys.readouterr().out
    assert "check" in out and "usage: segtwin data" in out
    assert segtwin(["data"]) == 2


@pytest.mark.slow
def test_cli_subprocess_with_a_pool(broken_cs, tmp_path):
    r = _run("data", "check", "--config", CS_CFG, "--data-root", broken_cs["root"], "--workers", 2,
             "--json", tmp_path / "r.json")
    assert r.returncode == 1, r.stderr
    assert len(_problem_lines(r.stdout)) == 3 and "[value 77: 5 px]" in r.stdout, r.stdout
    assert "data check" in r.stderr  # the tqdm bar
    assert "Traceback" not in r.stderr, r.stderr
    assert json.loads((tmp_path / "r.json").read_text())["errors"] == 3


def test_module_entry_point_without_segtwin(broken_cs, capsys):
    assert dc.main(["check", "--config", CS_CFG, "--data-root", str(broken_cs["root"]), "--workers", "0",
                    "--no-progress"]) == 1
    assert "FAILED: 3 problem(s)" in capsys.readouterr().out
