"""HRNetV2-W48 + OCR + MscaleOCR with PSA_p (`hrnet_ocr_psa`, psa="p", mscale=True): torch reference vs Paddle twin,
same weights, same input, same thread count on both sides.

1. Training step at 1x3x512x1024 (`SEGTWIN_BENCH_HRNET_SIZE=N,C,H,W`): train-mode forward (BN on batch statistics;
   dropout p=0 through `alignment.context.disable_dropout`), giving the four MscaleOCR outputs at 0.5 + 1.0 scale, the
   recipe's loss (`build_loss("hrnet_ocr_psa")` of each side: RMI on the joint prediction + 0.4 BCE aux + 0.05 BCE on
   pred_05x and pred_10x) and backward. Group `hrnet_ocr_psa-train-step`, ratio paddle / torch. `loss` in the
   extra info is each side's loss value (same weights and input: they should agree).
2. Share of the 104 PSA blocks in the eval forward (two-scale MscaleOCR inference, no_grad), per framework, same size:
   the PSA_p model against a model built with psa=None into which every tensor of the PSA model except the
   `.deattn.` ones is copied with a strict load (so every other weight and BN statistic is the same, the key sets
   match exactly). With psa=None the backbone's BasicBlock skips `deattn`, i.e. computes exactly the PSA model with
   each PSA block replaced by the identity. Group `hrnet_ocr_psa-psa-share-<fw>`, the PSA model is the baseline,
   so the printed ratio is t(no PSA) / t(PSA); `psa_share` = 1 - that ratio (medians), on the no-PSA line.
3. Peak memory of ONE training step (as in 1.), from the OS: VmHWM (peak resident set) read from /proc/self/status
   by a fresh Python subprocess that imports only its own framework, builds the model (seeded random weights), runs
   the step and reports. Measured at `SEGTWIN_BENCH_HRNET_MEM_SIZE` (default 1x3x256x512) and at half of it in each
   side (1x3x128x256), one subprocess per size and framework; then extrapolated to 1x3x1024x2048 linearly in pixels
   (N*H*W) through the two points:  peak(P) = peak_b + (peak_b - peak_a) * (P - P_b) / (P_b - P_a). The constant part
   (interpreter, framework, weights) cancels in the slope; the estimate assumes activations grow linearly with the
   pixel count (they do for every conv/BN/PSA/OCR tensor; allocator rounding at small sizes is the error source).
   The benchmark times the two subprocesses (start-up + build + step: a wall time, not a kernel time); the memory
   numbers are in its extra info (`measured_sizes`, `measured_peak_MiB`, `extrapolated_1x3x1024x2048_peak_MiB`).
   `SEGTWIN_BENCH_HRNET_MEM_TIMEOUT` (seconds, default 900) bounds each subprocess.

Sizes: BN in train mode needs more than one value per channel in every branch, and the smallest is the 1/32 branch
of the 0.5 scale, ceil(H/64) x ceil(W/64) (per image); a size where N times that is 1 is skipped with the reason (for
the memory test this applies to the HALF size: MEM_SIZE 1,3,128,128 is too small, 1,3,128,256 is the smallest).

Full measurement (slow: a few minutes on 2 cores):
    PYTHONPATH=. python -m pytest benchmarks/bench_hrnet_ocr_psa.py -p no:cacheprovider --benchmark-only \
        --benchmark-columns=min,median,mean,rounds -o python_files=bench_*.py --rootdir=benchmarks
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import THREADS, model_twins, set_threads

MODEL = "hrnet_ocr_psa"
CFG = {"psa": "p", "mscale": True}
NUM_CLASSES = 19
SIZE = tuple(int(v) for v in os.environ.get("SEGTWIN_BENCH_HRNET_SIZE", "1,3,512,1024").split(","))
MEM_SIZE = tuple(int(v) for v in os.environ.get("SEGTWIN_BENCH_HRNET_MEM_SIZE", "1,3,256,512").split(","))
MEM_TIMEOUT = float(os.environ.get("SEGTWIN_BENCH_HRNET_MEM_TIMEOUT", "900"))
TARGET = (1, 3, 1024, 2048)
REPO = Path(__file__).resolve().parent.parent


def _smallest_bn_plane(size) -> int:
    """N x the positions of the smallest train-mode BN input: the 1/32 branch of the 0.5 scale (ResizeX floors, each
    stride-2 3x3 conv with padding 1 gives ceil(size / 2))."""
    n, _, h, w = size
    h, w = math.floor(h * 0.5), math.floor(w * 0.5)
    for _ in range(5):
        h, w = -(-h // 2), -(-w // 2)
    return n * h * w


def _need_train_bn(size, what: str) -> None:
    if _smallest_bn_plane(size) < 2:
        pytest.skip(f"{what} {'x'.join(map(str, size))}: train-mode BN would see one value per channel in the 1/32 "
                    f"branch of the 0.5 scale (needs ceil(H/64) * ceil(W/64) * N > 1)")


@pytest.fixture(scope="module")
def twins():
    return model_twins(MODEL, SIZE, num_classes=NUM_CLASSES, **CFG)


# --------------------------------------------------------------------------------------------------------------------
# 1. training step


def _torch_train_step(tm, loss, x, y):
    import torch

    tm.zero_grad(set_to_none=True)
    terms = loss(tm(torch.from_numpy(x)), torch.from_numpy(y))
    terms["loss"].backward()
    return float(terms["loss"].detach())


def _paddle_train_step(pm, loss, x, y):
    import paddle

    pm.clear_gradients()
    terms = loss(pm(paddle.to_tensor(x)), paddle.to_tensor(y))
    terms["loss"].backward()
    return float(terms["loss"].detach())


@pytest.mark.benchmark(group=f"{MODEL}-train-step")
@pytest.mark.parametrize("fw", ["torch", "paddle"])
def test_hrnet_ocr_psa_train_step(benchmark, twins, fw):
    from alignment.context import disable_dropout

    _need_train_bn(SIZE, "SEGTWIN_BENCH_HRNET_SIZE")
    tm, pm, x, y = twins
    if fw == "torch":
        import torch_ref.losses

        model, loss, step = tm, torch_ref.losses.build_loss(MODEL), _torch_train_step
        benchmark.extra_info["baseline"] = True
    else:
        import paddle_impl.losses

        model, loss, step = pm, paddle_impl.losses.build_loss(MODEL), _paddle_train_step
    model.train()
    benchmark.extra_info["dropouts_off"] = disable_dropout(model)
    benchmark.extra_info["threads"] = set_threads()
    benchmark.extra_info["size"] = "x".join(map(str, SIZE))
    try:
        value = benchmark.pedantic(step, args=(model, loss, x, y), rounds=2, iterations=1, warmup_rounds=1)
    finally:  # free the gradients (and leave eval mode) for the forward benchmarks below
        if fw == "torch":
            tm.zero_grad(set_to_none=True)
        else:
            pm.clear_gradients(set_to_zero=False)
        model.eval()
    benchmark.extra_info["loss"] = round(value, 6)


# --------------------------------------------------------------------------------------------------------------------
# 2. share of the PSA blocks in the eval forward


@pytest.fixture(scope="module")
def eval_models(twins):
    """{(fw, "psa" | "no_psa"): model in eval mode}; the no-PSA models hold the PSA models' other tensors."""
    import torch

    import paddle_impl
    import torch_ref
    from paddle_impl.checkpoint import strict_load

    tm, pm, _, _ = twins
    set_threads()
    cfg = dict(CFG, psa=None)
    t0 = torch_ref.build_model(MODEL, num_classes=NUM_CLASSES, **cfg)
    with torch.no_grad():
        t0.load_state_dict({k: v for k, v in tm.state_dict().items() if ".deattn." not in k}, strict=True)
    p0 = paddle_impl.build_model(MODEL, num_classes=NUM_CLASSES, **cfg)
    strict_load(p0, {k: v.numpy() for k, v in pm.state_dict().items() if ".deattn." not in k}, "PSA twin")
    models = {("torch", "psa"): tm, ("torch", "no_psa"): t0, ("paddle", "psa"): pm, ("paddle", "no_psa"): p0}
    for m in models.values():
        m.eval()
    return models


def _psa_blocks(model) -> int:
    named = model.named_modules() if hasattr(model, "named_modules") else model.named_sublayers()
    return sum(1 for name, _ in named if name.endswith(".deattn"))


_FWD_MEDIANS = {}  # (fw, variant) -> (median seconds, extra_info dict)


@pytest.mark.parametrize("fw,variant", [("torch", "psa"), ("torch", "no_psa"), ("paddle", "psa"),
                                        ("paddle", "no_psa")])
def test_hrnet_ocr_psa_eval_forward_psa_share(benchmark, twins, eval_models, fw, variant):
    _, _, x, _ = twins
    model = eval_models[(fw, variant)]
    if fw == "torch":
        import torch

        xt, no_grad = torch.from_numpy(x), torch.no_grad
    else:
        import paddle

        xt, no_grad = paddle.to_tensor(x), paddle.no_grad

    def run():
        with no_grad():
            model(xt)

    benchmark.group = f"{MODEL}-psa-share-{fw}"
    benchmark.extra_info["threads"] = set_threads()
    benchmark.extra_info["size"] = "x".join(map(str, SIZE))
    benchmark.extra_info["psa_blocks"] = _psa_blocks(model)
    if variant == "psa":
        benchmark.extra_info["baseline"] = True
    benchmark.pedantic(run, rounds=2, iterations=1, warmup_rounds=1)
    if benchmark.stats:  # None under --benchmark-disable
        _FWD_MEDIANS[(fw, variant)] = (benchmark.stats.stats.median, benchmark.extra_info)
    if (fw, "psa") in _FWD_MEDIANS and (fw, "no_psa") in _FWD_MEDIANS:
        t_psa, _ = _FWD_MEDIANS[(fw, "psa")]
        t_none, info = _FWD_MEDIANS[(fw, "no_psa")]
        info["psa_share"] = round(1.0 - t_none / t_psa, 4)


# --------------------------------------------------------------------------------------------------------------------
# 3. peak memory of a training step (fresh subprocess per size and framework)

_CHILD = r"""
import json, sys, time

fw = sys.argv[1]
n, c, h, w, threads = (int(v) for v in sys.argv[2:7])


def hwm_kib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


import numpy as np

from alignment.context import disable_dropout
from alignment.utils import set_threads

rng = np.random.default_rng(0)
x = rng.standard_normal((n, c, h, w)).astype(np.float32)
y = rng.integers(0, 19, (n, h, w)).astype(np.int64)
if fw == "torch":
    import torch
    import torch_ref
    import torch_ref.losses as losses

    set_threads(threads, ("torch",))
    torch.manual_seed(0)
    model = torch_ref.build_model("hrnet_ocr_psa", num_classes=19, psa="p", mscale=True)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
else:
    import paddle
    import paddle_impl
    import paddle_impl.losses as losses

    set_threads(threads, ("paddle",))
    paddle.seed(0)
    model = paddle_impl.build_model("hrnet_ocr_psa", num_classes=19, psa="p", mscale=True)
    xt, yt = paddle.to_tensor(x), paddle.to_tensor(y)
loss_fn = losses.build_loss("hrnet_ocr_psa")
model.train()
disable_dropout(model)
before = hwm_kib()
t0 = time.perf_counter()
terms = loss_fn(model(xt), yt)
terms["loss"].backward()
loss = float(terms["loss"])
step_s = time.perf_counter() - t0
print("SEGTWIN_MEM " + json.dumps({"before_step_kib": before, "peak_kib": hwm_kib(), "step_s": step_s,
                                   "loss": loss, "other_framework_loaded": ("paddle" if fw == "torch" else "torch")
                                   in sys.modules}))
"""


def _peak_of_step(fw: str, size) -> dict:
    """One training step of `fw` at `size` in a fresh interpreter -> the child's report (kiB, seconds)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS),
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p))
    cmd = [sys.executable, "-c", _CHILD, fw, *(str(v) for v in size), str(THREADS)]
    try:
        proc = subprocess.run(cmd, env=env, cwd=str(REPO), capture_output=True, text=True, timeout=MEM_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{fw} training step at {'x'.join(map(str, size))}: subprocess killed after {MEM_TIMEOUT:g} s "
                    f"(SEGTWIN_BENCH_HRNET_MEM_TIMEOUT)")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("SEGTWIN_MEM ")]
    if proc.returncode != 0 or not lines:
        pytest.fail(f"{fw} training step at {'x'.join(map(str, size))}: exit {proc.returncode}\n"
                    f"{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("SEGTWIN_MEM "):])


def _pixels(size) -> int:
    return size[0] * size[2] * size[3]


@pytest.mark.benchmark(group=f"{MODEL}-train-step-peak-rss")
@pytest.mark.parametrize("fw", ["torch", "paddle"])
def test_hrnet_ocr_psa_train_step_peak_rss(benchmark, fw):
    big = MEM_SIZE
    small = (big[0], big[1], big[2] // 2, big[3] // 2)
    _need_train_bn(small, "half of SEGTWIN_BENCH_HRNET_MEM_SIZE")
    reports = {}

    def run():
        for size in (small, big):
            t0 = time.perf_counter()
            reports[size] = _peak_of_step(fw, size)
            reports[size]["wall_s"] = time.perf_counter() - t0

    if fw == "torch":
        benchmark.extra_info["baseline"] = True
    benchmark.extra_info["threads"] = THREADS
    benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    mib = {s: reports[s]["peak_kib"] / 1024 for s in (small, big)}
    slope = (mib[big] - mib[small]) / (_pixels(big) - _pixels(small))  # MiB per pixel
    extrapolated = mib[big] + slope * (_pixels(TARGET) - _pixels(big))
    fmt = "x".join
    benchmark.extra_info["method"] = "VmHWM of a fresh subprocess per size; linear in N*H*W through the 2 points"
    benchmark.extra_info["measured_sizes"] = [fmt(map(str, s)) for s in (small, big)]
    benchmark.extra_info["measured_peak_MiB"] = [round(mib[s], 1) for s in (small, big)]
    benchmark.extra_info["before_step_MiB"] = [round(reports[s]["before_step_kib"] / 1024, 1) for s in (small, big)]
    benchmark.extra_info["step_s"] = [round(reports[s]["step_s"], 2) for s in (small, big)]
    benchmark.extra_info["MiB_per_Mpixel"] = round(slope * 1e6, 1)
    benchmark.extra_info[f"extrapolated_{fmt(map(str, TARGET))}_peak_MiB"] = round(extrapolated, 1)
    benchmark.extra_info["other_framework_loaded"] = any(reports[s]["other_framework_loaded"] for s in (small, big))
