"""Fused PSA aggregation vs the reference path (psa_mask + softmax + bmm), CPU: time ratio and peak memory.

    PYTHONPATH=. python benchmarks/bench_psa_attend.py [seed semseg fullres] [--framework torch|paddle]
        [--backward]                                                              # the tables of docs/psa_mask.md
    pytest benchmarks/bench_psa_attend.py -p no:cacheprovider --benchmark-only -o python_files=bench_*.py \
        --rootdir=benchmarks                                                        # timings (seed, semseg)

Each measurement runs in a fresh subprocess (one framework, one impl, one shape, collect branch, 2 threads unless
SEGTWIN_BENCH_THREADS says otherwise): it allocates the inputs, resets VmHWM (peak resident set) through
/proc/self/clear_refs, runs the aggregation -- inference under no_grad, or with --backward one forward + backward
with gradients for both inputs -- and reports the peak and its growth over the RSS after the inputs. Shapes
(N, C, H, W, mask): seed (the seed's Cityscapes recipe after shrink): (2, 512, 32, 64, 59); semseg's Cityscapes
(crop 705 -> 89x89 -> 45x45, mask 89): (1, 512, 45, 45, 89); full-resolution inference (1024x2048 -> 64x128, mask
127x255): (1, 512, 64, 128, 127x255). Nothing asserts a wall time.
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
n, c, h, w, mh, mw = json.loads(sys.argv[1]); impl, fw = sys.argv[2], sys.argv[5]
reps, threads, backward = int(sys.argv[3]), int(sys.argv[4]), sys.argv[6] == "1"
import numpy as np
if fw == "torch":
    import torch
    from torch_ref.ops.psa_attend import psa_attend
    from torch_ref.ops.psa_mask import load_op
    torch.set_num_threads(threads)
    tensor = lambda a: torch.from_numpy(a).requires_grad_(backward)
    grads = lambda out, ins: torch.autograd.grad(out.sum(), ins)
    no_grad = torch.no_grad
else:
    import paddle
    from paddle_impl.ops.psa_attend import psa_attend
    from paddle_impl.ops.psa_mask import load_op
    paddle.set_device("cpu")
    tensor = lambda a: paddle.to_tensor(a, stop_gradient=not backward)
    grads = lambda out, ins: paddle.grad([out.sum()], ins)
    no_grad = paddle.no_grad
load_op()

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024.0

rng = np.random.default_rng(0)
feat = tensor(rng.standard_normal((n, c, h, w), dtype=np.float32))
logits = tensor(rng.standard_normal((n, mh * mw, h, w), dtype=np.float32))
import gc
gc.collect()
with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS: creating the inputs may have
    f.write("5")                                # peaked higher (temporary copies) than the aggregation will
base = status("VmRSS")
times = []
for _ in range(reps):
    t0 = time.perf_counter()
    if backward:
        out = psa_attend(feat, logits, 0, (mh, mw), impl=impl)
        g = grads(out, [feat, logits])
        del g
    else:
        with no_grad():
            out = psa_attend(feat, logits, 0, (mh, mw), impl=impl)
    times.append(time.perf_counter() - t0)
    del out
print(json.dumps({"impl": impl, "min_s": min(times), "base_mib": base, "peak_mib": status("VmHWM")}))
"""


def measure(shape: str, impl: str, reps: int = 3, threads: int | None = None, framework: str = "torch",
            backward: bool = False) -> dict:
    threads = threads or int(os.environ.get("SEGTWIN_BENCH_THREADS") or 2)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS=str(threads))
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(SHAPES[shape]), impl, str(reps), str(threads),
                           framework, "1" if backward else "0"], capture_output=True, text=True, env=env,
                          timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(shapes, framework: str = "torch", backward: bool = False) -> list[str]:
    lines = [f"{framework}, {'forward + backward' if backward else 'inference (no_grad)'}:",
             "| shape (N, C, H, W, mask) | impl | min time | speed-up fused/ref | peak RSS | growth over inputs |",
             "|---|---|---|---|---|---|"]
    for shape in shapes:
        res = {impl: measure(shape, impl, reps=2 if shape == "fullres" else 3, framework=framework,
                             backward=backward) for impl in ("reference", "fused")}
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
    import argparse

    ap = argparse.ArgumentParser(description="fused vs reference PSA aggregation: time and peak memory")
    ap.add_argument("shapes", nargs="*", help=f"any of {', '.join(SHAPES)} (default: all)")
    ap.add_argument("--framework", choices=["torch", "paddle"], default="torch")
    ap.add_argument("--backward", action="store_true", help="time forward + backward instead of inference")
    a = ap.parse_args()
    unknown = [x for x in a.shapes if x not in SHAPES]
    if unknown:
        ap.error(f"unknown shape(s) {unknown}; choose from {list(SHAPES)}")
    for line in table(a.shapes or list(SHAPES), a.framework, a.backward):
        print(line, flush=True)
