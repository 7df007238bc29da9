"""Fused PSA aggregation vs the reference path (psa_mask + softmax + bmm), torch, CPU: time ratio and peak memory.

    PYTHONPATH=. python benchmarks/bench_psa_attend.py [seed semseg fullres]      # the table of docs/psa_mask.md
    pytest benchmarks/bench_psa_attend.py -p no:cacheprovider --benchmark-only -o python_files=bench_*.py \
        --rootdir=benchmarks                                                        # timings (seed, semseg)

Each measurement runs in a fresh subprocess (one impl, one shape, collect branch, inference under no_grad): it
allocates the inputs, reads VmHWM (peak resident set) from /proc/self/status, runs the aggregation, reads VmHWM again
and reports both the peak and its growth over the inputs. Shapes (N, C, H, W, mask):
seed (the seed's Cityscapes recipe after shrink): (2, 512, 32, 64, 59); semseg's Cityscapes (crop 705 -> 89x89 ->
45x45, mask 89): (1, 512, 45, 45, 89); full-resolution inference (1024x2048 -> 64x128, mask 127x255):
(1, 512, 64, 128, 127x255). Nothing asserts a wall time.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SHAPES = {"seed": (2, 512, 32, 64, 59, 59), "semseg": (1, 512, 45, 45, 89, 89),
          "fullres": (1, 512, 64, 128, 127, 255)}
ROOT = Path(__file__).resolve().parents[1]

_CHILD = r"""
import json, sys, time
import torch
from torch_ref.ops.psa_attend import psa_attend
from torch_ref.ops.psa_mask import load_op
load_op()
n, c, h, w, mh, mw = json.loads(sys.argv[1]); impl = sys.argv[2]; reps = int(sys.argv[3])
torch.set_num_threads(int(sys.argv[4]))

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0

g = torch.Generator().manual_seed(0)
feat = torch.randn(n, c, h, w, generator=g)
logits = torch.randn(n, mh * mw, h, w, generator=g)
base = hwm()
times = []
with torch.no_grad():
    for _ in range(reps):
        t0 = time.perf_counter()
        out = psa_attend(feat, logits, 0, (mh, mw), impl=impl)
        times.append(time.perf_counter() - t0)
        del out
print(json.dumps({"impl": impl, "min_s": min(times), "base_mib": base, "peak_mib": hwm()}))
"""


def measure(shape: str, impl: str, reps: int = 3, threads: int = 2) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS=str(threads))
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(SHAPES[shape]), impl, str(reps), str(threads)],
                          capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(shapes) -> list[str]:
    lines = ["| shape (N, C, H, W, mask) | impl | min time | time ratio ref/fused | peak RSS | growth over inputs |",
             "|---|---|---|---|---|---|"]
    for shape in shapes:
        res = {impl: measure(shape, impl, reps=2 if shape == "fullres" else 3) for impl in ("reference", "fused")}
        for impl, r in res.items():
            ratio = res["reference"]["min_s"] / res["fused"]["min_s"]
            lines.append(f"| {shape} {SHAPES[shape]} | {impl} | {r['min_s'] * 1e3:.0f} ms | "
                         f"{ratio:.2f}x | {r['peak_mib']:.0f} MiB | {r['peak_mib'] - r['base_mib']:.0f} MiB |")
    return lines


# --- pytest-benchmark (timing only, in process) --------------------------------------------------------------------

try:
    import pytest
except ImportError:  # pragma: no cover - the script form needs no pytest
    pytest = None

if pytest is not None:
    @pytest.fixture(scope="module")
    def attend_setup():
        sys.path.insert(0, str(ROOT / "tests"))
        import psa_reference as ref

        ref.require_op("torch")
        import torch

        from torch_ref.ops.psa_attend import psa_attend

        return torch, psa_attend

    @pytest.mark.benchmark(group="psa_attend")
    @pytest.mark.parametrize("impl", ["reference", "fused"])
    @pytest.mark.parametrize("shape", ["seed", "semseg"])
    def test_psa_attend(benchmark, attend_setup, shape, impl):
        torch, psa_attend = attend_setup
        n, c, h, w, mh, mw = SHAPES[shape]
        g = torch.Generator().manual_seed(0)
        feat, logits = torch.randn(n, c, h, w, generator=g), torch.randn(n, mh * mw, h, w, generator=g)
        benchmark.extra_info.update(shape=shape, baseline=impl == "reference" and shape == "seed")
        with torch.no_grad():
            benchmark.pedantic(psa_attend, args=(feat, logits, 0, (mh, mw)), kwargs={"impl": impl}, rounds=3,
                               iterations=1)


if __name__ == "__main__":
    for line in table(sys.argv[1:] or list(SHAPES)):
        print(line, flush=True)
