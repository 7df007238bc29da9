"""DANet-R101 numbers: forward+backward torch vs Paddle at 1x3x513x513 (same weights, input and thread count), and
the peak memory of the position-attention module (PAM) at 1/8 of a 1024x2048 image (128x256 = 32768 positions).

fwd+bwd: eval-mode BN (a batch of one), dropout off, the real cross-entropy on the main logits; ratio paddle / torch.

PAM memory: the PAM alone (512 channels, the released model's width) on a (1, 512, h, w) map in a fresh
subprocess; the figure is the growth of the process's peak RSS (VmHWM) over the forward (no_grad, i.e. inference)
and over forward+backward. The (HW x HW) energy and attention maps dominate: 2 x (HW)^2 x 4 bytes in the forward.
The size defaults to 1/8 of 512x1024 (64x128) so the run fits a small machine; set SEGTWIN_BENCH_PAM_HW=128,256 for
the full-resolution shape (needs ~30 GiB free for forward+backward).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import THREADS, model_twins, paddle_step, set_threads, torch_step

SIZE = tuple(int(v) for v in os.environ.get("SEGTWIN_BENCH_DANET_SIZE", "1,3,513,513").split(","))
PAM_HW = tuple(int(v) for v in os.environ.get("SEGTWIN_BENCH_PAM_HW", "64,128").split(","))
ROOT = Path(__file__).resolve().parents[1]

_PAM_PROBE = r"""
import json, sys
import numpy as np
from alignment.utils import set_threads

def hwm_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024

fw, h, w, backward, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1", int(sys.argv[5])
x = np.random.default_rng(0).standard_normal((1, 512, h, w)).astype(np.float32)
set_threads(threads, (fw,))
if fw == "torch":
    import torch
    from torch_ref.models.danet import PAM
    pam = PAM(512)
    t = torch.from_numpy(x).requires_grad_(backward)
    before = hwm_mib()
    if backward:
        pam(t).sum().backward()
    else:
        with torch.no_grad():
            pam(t)
else:
    import paddle
    from paddle_impl.models.danet import PAM
    pam = PAM(512)
    t = paddle.to_tensor(x, stop_gradient=not backward)
    before = hwm_mib()
    if backward:
        pam(t).sum().backward()
    else:
        with paddle.no_grad():
            pam(t)
print(json.dumps({"peak_growth_MiB": round(hwm_mib() - before, 1)}))
"""


@pytest.fixture(scope="module")
def twins():
    return model_twins("danet", SIZE, layers=101)


@pytest.mark.benchmark(group="danet-fwd-bwd")
def test_torch_danet(benchmark, twins):
    tm, _, x, y = twins
    benchmark.extra_info["baseline"] = True
    benchmark.extra_info["threads"] = set_threads()
    benchmark.pedantic(torch_step, args=(tm, x, y), rounds=2, iterations=1, warmup_rounds=1)


@pytest.mark.benchmark(group="danet-fwd-bwd")
def test_paddle_danet(benchmark, twins):
    _, pm, x, y = twins
    benchmark.extra_info["threads"] = set_threads()
    benchmark.pedantic(paddle_step, args=(pm, x, y), rounds=2, iterations=1, warmup_rounds=1)


def _pam_probe(fw: str, backward: bool) -> float:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", _PAM_PROBE, fw, str(PAM_HW[0]), str(PAM_HW[1]),
                          "1" if backward else "0", str(THREADS)], capture_output=True, text=True, env=env,
                         check=False)
    if out.returncode != 0:
        raise RuntimeError(f"PAM memory probe ({fw}, backward={backward}) failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_growth_MiB"]


@pytest.mark.benchmark(group="danet-pam-memory")
@pytest.mark.parametrize("fw", ["torch", "paddle"])
def test_pam_peak_memory(benchmark, fw):
    hw = PAM_HW[0] * PAM_HW[1]
    result = {}

    def run():
        result["fwd"] = _pam_probe(fw, False)
        result["fwd_bwd"] = _pam_probe(fw, True)

    benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    benchmark.extra_info["hw"] = hw
    benchmark.extra_info["one_hw_x_hw_map_MiB"] = round(hw * hw * 4 / 2 ** 20, 1)
    benchmark.extra_info["peak_growth_fwd_MiB"] = result["fwd"]
    benchmark.extra_info["peak_growth_fwd_bwd_MiB"] = result["fwd_bwd"]
    if fw == "torch":
        benchmark.extra_info["baseline"] = True
    # the maps dominate: the forward's peak growth holds at least the energy map
    assert result["fwd"] >= hw * hw * 4 / 2 ** 20, result
