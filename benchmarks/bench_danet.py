"""DANet-R101 numbers: forward+backward torch vs Paddle at 1x3x513x513 (same weights, input and thread count), and
the peak memory of the position-attention module (PAM) at 1/8 of a 1024x2048 image (128x256 = 32768 positions).

fwd+bwd: eval-mode BN (a batch of one), dropout off, the real cross-entropy on the main logits; ratio paddle / torch.

PAM memory: the PAM alone (512 channels, the released model's width) on a (1, 512, h, w) map in a fresh
subprocess; the figure is the growth of the process's peak RSS (VmHWM) over the forward (no_grad, i.e. inference)
and over forward+backward. The (HW x HW) energy and attention maps dominate: 2 x (HW)^2 x 4 bytes in the forward.
The size defaults to 1/8 of 512x1024 (64x128) so the run fits a small machine; set SEGTWIN_BENCH_PAM_HW=128,256 for
the full-resolution shape (needs ~30 GiB free for forward+backward).

PAM implementations (`pam_impl`): inference (no_grad) of the PAM alone, "efficient" against "reference" (the
baseline of each framework's group, same weights and input), on features SEGTWIN_BENCH_PAM_SIZE=N,C,H,W (default
1,512,128,256: the released model's width at 1/8 of 1024x2048, 32768 positions, one float32 map 4 GiB). Each
benchmark also records the peak RSS growth (VmHWM) of one such forward in a fresh subprocess. At the default size
the reference needs ~8 GiB (torch) to ~12 GiB (Paddle) and the run takes minutes; a small size such as
SEGTWIN_BENCH_PAM_SIZE=1,64,32,64 checks the plumbing (there Paddle's efficient path is a single block: its memory
is bounded by `paddle_impl.layers.PAM_BLOCK_BYTES`, not below the map of a small input).
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
PAM_SIZE = tuple(int(v) for v in os.environ.get("SEGTWIN_BENCH_PAM_SIZE", "1,512,128,256").split(","))
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


# ---- pam_impl: efficient vs reference, inference ----------------------------------------------------------------
_PAM_IMPL_PROBE = r"""
import json, sys
import numpy as np
from alignment.utils import set_threads

def hwm_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024

fw, impl, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
n, c, h, w = (int(v) for v in sys.argv[4].split(","))
x = np.random.default_rng(0).standard_normal((n, c, h, w)).astype(np.float32)
set_threads(threads, (fw,))
if fw == "torch":
    import torch
    from torch_ref.models.danet import PAM
    pam, t, no_grad = PAM(c, impl=impl).eval(), torch.from_numpy(x), torch.no_grad
else:
    import paddle
    from paddle_impl.models.danet import PAM
    pam, t, no_grad = PAM(c, impl=impl), paddle.to_tensor(x), paddle.no_grad
    pam.eval()
before = hwm_mib()
with no_grad():
    pam(t)
print(json.dumps({"peak_growth_MiB": round(hwm_mib() - before, 1)}))
"""


def _pam_impl_probe(fw: str, impl: str) -> float:
    """Peak RSS growth (MiB) of one no_grad PAM forward at PAM_SIZE in a fresh process."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", _PAM_IMPL_PROBE, fw, impl, str(THREADS),
                          ",".join(str(v) for v in PAM_SIZE)], capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"PAM inference memory probe ({fw}, {impl}) failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_growth_MiB"]


@pytest.fixture(scope="module")
def pam_input():
    import numpy as np

    return np.random.default_rng(0).standard_normal(PAM_SIZE).astype(np.float32)


def _pam_extra_info(benchmark, fw: str, impl: str) -> None:
    hw = PAM_SIZE[2] * PAM_SIZE[3]
    benchmark.extra_info["size"] = ",".join(str(v) for v in PAM_SIZE)
    benchmark.extra_info["threads"] = set_threads()
    benchmark.extra_info["one_hw_x_hw_map_MiB"] = round(PAM_SIZE[0] * hw * hw * 4 / 2 ** 20, 1)
    benchmark.extra_info["peak_growth_MiB"] = _pam_impl_probe(fw, impl)
    if impl == "reference":
        benchmark.extra_info["baseline"] = True


@pytest.mark.benchmark(group="danet-pam-inference-torch")
@pytest.mark.parametrize("impl", ["reference", "efficient"])
def test_torch_pam_inference(benchmark, pam_input, impl):
    import torch

    from torch_ref.models.danet import PAM

    _pam_extra_info(benchmark, "torch", impl)
    torch.manual_seed(0)
    pam = PAM(PAM_SIZE[1], impl=impl).eval()
    x = torch.from_numpy(pam_input)

    def run():
        with torch.no_grad():
            pam(x)

    benchmark.pedantic(run, rounds=2, iterations=1, warmup_rounds=1)


@pytest.mark.benchmark(group="danet-pam-inference-paddle")
@pytest.mark.parametrize("impl", ["reference", "efficient"])
def test_paddle_pam_inference(benchmark, pam_input, impl):
    import paddle

    from paddle_impl.models.danet import PAM

    _pam_extra_info(benchmark, "paddle", impl)
    paddle.seed(0)
    pam = PAM(PAM_SIZE[1], impl=impl)
    pam.eval()
    x = paddle.to_tensor(pam_input)

    def run():
        with paddle.no_grad():
            pam(x)

    benchmark.pedantic(run, rounds=2, iterations=1, warmup_rounds=1)
