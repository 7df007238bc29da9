"""The shared helpers of alignment/utils.py: atomic writes, size parsing, thread setup."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from alignment.utils import atomic_path, atomic_write, parse_size, set_threads

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------------------------
# atomic writes

def test_atomic_write_replaces_only_when_complete(tmp_path):
    target = tmp_path / "sub" / "r.json"  # missing directories are made
    with atomic_write(target) as f:
        f.write("first")
        assert not target.exists()  # nothing at the target while the block runs
    assert target.read_text() == "first"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_write(target) as f:
            f.write("half")
            raise RuntimeError("boom")
    assert target.read_text() == "first"  # the old file is untouched
    assert sorted(p.name for p in target.parent.iterdir()) == ["r.json"]  # and no temporary is left


def test_atomic_write_permissions_binary_and_fsync(tmp_path):
    target = tmp_path / "b.bin"
    with atomic_write(target, "wb", fsync=True) as f:
        f.write(b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # an ordinary new file, not mkstemp's 0600
    with pytest.raises(ValueError, match="writing mode"):
        with atomic_write(target, "r"):
            pass


def test_atomic_path_names_its_temporary_next_to_the_target(tmp_path):
    target = tmp_path / "latest"
    with atomic_path(target) as tmp:
        assert Path(tmp).parent == tmp_path and Path(tmp).name.startswith(".latest.tmp-")
        Path(tmp).write_text("iter_3\n")
    assert target.read_text() == "iter_3\n"


# ----------------------------------------------------------------------------------------------------------------------
# sizes

@pytest.mark.parametrize("value,expect", [
    ("64,128", (64, 128)), ("64x128", (64, 128)), ("64X128", (64, 128)), (" 64 , 128 ", (64, 128)),
    ((64, 128), (64, 128)), ([3, 5], (3, 5)), (7, (7, 7)), (np.int64(9), (9, 9)), (np.array([2, 4]), (2, 4)),
])
def test_parse_size_two_dims(value, expect):
    assert parse_size(value) == expect


@pytest.mark.parametrize("value,match", [
    ("banana", r"crop must be H,W with 2 positive integers, got 'banana'"),
    ("64", "H,W with 2"), ((1, 2, 3), "H,W with 2"), (None, "H,W with 2"), (True, "H,W with 2"),
    ((0, 5), r"crop must be positive, got \(H, W\) = \(0, 5\)"), (-3, "must be positive"),
])
def test_parse_size_errors_name_the_option(value, match):
    with pytest.raises(ValueError, match=match):
        parse_size(value, "crop")


def test_parse_size_four_dims():
    assert parse_size("2,3,65,65", "--input-size", "NCHW") == (2, 3, 65, 65)
    assert parse_size("1x3x33x33", "--input-size", "NCHW") == (1, 3, 33, 33)
    assert parse_size((2, 3, 9, 9), dims="NCHW") == (2, 3, 9, 9)
    with pytest.raises(ValueError, match=r"--input-size must be N,C,H,W with 4 positive integers"):
        parse_size("2,3,65", "--input-size", "NCHW")
    with pytest.raises(ValueError, match="N,C,H,W"):
        parse_size(65, "--input-size", "NCHW")  # one int is a square only for two dims
    with pytest.raises(ValueError, match=r"\(N, C, H, W\) = \(0, 3, 9, 9\)"):
        parse_size("0,3,9,9", dims="NCHW")


# ----------------------------------------------------------------------------------------------------------------------
# threads

def test_set_threads_sets_the_named_frameworks():
    code = ("import os, torch, paddle; from alignment.utils import set_threads; "
            "n = set_threads(3); assert n == 3 and torch.get_num_threads() == 3, torch.get_num_threads(); "
            "os.environ['OMP_NUM_THREADS'] = '2'; assert set_threads(None, ('torch',)) == 2; "
            "assert torch.get_num_threads() == 2; print('ok')")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
    with pytest.raises(ValueError, match="unknown framework 'jax'"):
        set_threads(1, ("jax",))


def test_importing_the_helpers_imports_no_framework():
    code = "import sys, alignment.utils; print(sorted(m for m in ('torch', 'paddle') if m in sys.modules))"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
