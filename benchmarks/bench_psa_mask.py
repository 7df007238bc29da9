"""Benchmarks of the PSA mask op (pytest-benchmark): the compiled kernels against the pure-tensor gather, the literal
reference loop, and a plain `zeros` of the output's size (the memory-write floor), in torch and Paddle. A second
floor, `full(shape, 1.0)`, stores a non-zero value everywhere: an allocator may serve `zeros` from lazily zeroed
pages without writing them, `full` cannot skip the stores.

    pytest benchmarks/bench_psa_mask.py --benchmark-only -q            # or: tox -e bench

Shape: PSANet on VOC/ADE (crop 465 -> 59x59 features -> shrink 2 -> 30x30, mask 59x59): x (2, 3481, 30, 30) ->
(2, 900, 30, 30). Both frameworks run with the same thread count, SEGTWIN_BENCH_THREADS (default: OMP_NUM_THREADS,
else 2), set before either is imported. Nothing asserts a wall time; at the end a table of ratios (of the minimum
times, the least noisy statistic on a shared machine) is printed.
"""
from __future__ import annotations

import sys
from pathlib import Path

from conftest import THREADS  # also exports it as OMP_NUM_THREADS, before any framework is imported

import numpy as np  # noqa: E402
import pytest  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import psa_reference as ref  # noqa: E402  (also puts the checkout on sys.path if needed)

N, MASK, H, W = 2, 59, 30, 30
IN_SHAPE = (N, MASK * MASK, H, W)
OUT_SHAPE = (N, H * W, H, W)
TYPES = {"collect": 0, "distribute": 1}
_results: dict = {}


def _record(benchmark, key):
    benchmark.extra_info.update(shape=list(IN_SHAPE), threads=THREADS)
    _results[key] = benchmark.stats.stats.min if benchmark.stats is not None else None


@pytest.fixture(scope="module", autouse=True)
def _ratio_table(request):
    yield
    rep = request.config.pluginmanager.getplugin("terminalreporter")
    capman = request.config.pluginmanager.getplugin("capturemanager")
    if rep is None or not _results:
        return
    t = _results.get
    lines = ["", f"PSA mask ratios (min times), x {IN_SHAPE} -> {OUT_SHAPE}, {THREADS} threads:"]
    for fw in ("torch", "paddle"):
        for kind in TYPES:
            cpp, ten, zer, full = t((fw, "cpp", kind)), t((fw, "tensor", kind)), t((fw, "zeros")), t((fw, "full"))
            loop = t(("numpy", "loop", kind))
            if cpp and zer:
                parts = [f"{fw:6s} {kind:10s} cpp {cpp * 1e3:8.2f} ms = {cpp / zer:5.2f}x zeros"
                         + (f" = {cpp / full:5.2f}x full" if full else "")]
                if ten:
                    parts.append(f"tensor {ten * 1e3:8.2f} ms = {ten / cpp:5.1f}x cpp")
                if loop:
                    parts.append(f"loop {loop:7.1f} s = {loop / cpp:8.0f}x cpp")
                lines.append(" | ".join(parts))
        fb_cpp, fb_ten, fb_zer = t((fw, "cpp", "fwd+bwd")), t((fw, "tensor", "fwd+bwd")), t((fw, "zeros", "fwd+bwd"))
        if fb_cpp and fb_zer:
            line = (f"{fw:6s} {'fwd+bwd':10s} cpp {fb_cpp * 1e3:8.2f} ms = {fb_cpp / fb_zer:5.2f}x "
                    f"zeros(out)+zeros(in)")
            if fb_ten:
                line += f" | tensor {fb_ten * 1e3:8.2f} ms = {fb_ten / fb_cpp:5.1f}x cpp"
            lines.append(line)
    for fw in ("torch", "paddle"):
        if t((fw, "zeros")) and t((fw, "full")):
            lines.append(f"{fw} floors: zeros {t((fw, 'zeros')) * 1e3:.3f} ms, "
                         f"full(1.0) {t((fw, 'full')) * 1e3:.3f} ms")
    with capman.global_and_fixture_disabled():  # module teardown output is captured otherwise
        for line in lines:
            rep.write_line(line)


# --- torch -----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def torch_setup():
    ref.require_op("torch")
    import torch

    from alignment.utils import set_threads
    from torch_ref.ops import psa_mask

    set_threads(THREADS, ("torch",))
    x = torch.randn(IN_SHAPE, generator=torch.Generator().manual_seed(0))
    for t in TYPES.values():  # same work: the two impls agree exactly
        assert torch.equal(psa_mask(x, t, MASK, impl="cpp"), psa_mask(x, t, MASK, impl="tensor"))
    return torch, psa_mask, x


@pytest.mark.benchmark(group="psa_mask torch forward")
@pytest.mark.parametrize("kind", list(TYPES))
@pytest.mark.parametrize("impl", ["cpp", "tensor"])
def test_torch_forward(benchmark, torch_setup, impl, kind):
    torch, psa_mask, x = torch_setup
    benchmark(psa_mask, x, TYPES[kind], MASK, impl=impl)
    _record(benchmark, ("torch", impl, kind))


@pytest.mark.benchmark(group="psa_mask torch forward")
def test_torch_zeros_floor(benchmark, torch_setup):
    torch = torch_setup[0]
    benchmark(torch.zeros, OUT_SHAPE)
    _record(benchmark, ("torch", "zeros"))


@pytest.mark.benchmark(group="psa_mask torch forward")
def test_torch_full_floor(benchmark, torch_setup):
    """Allocate and store a non-zero value everywhere: a floor that cannot be served by lazily zeroed pages."""
    torch = torch_setup[0]
    benchmark(torch.full, OUT_SHAPE, 1.0)
    _record(benchmark, ("torch", "full"))


@pytest.mark.benchmark(group="psa_mask torch fwd+bwd")
@pytest.mark.parametrize("impl", ["cpp", "tensor"])
def test_torch_forward_backward(benchmark, torch_setup, impl):
    torch, psa_mask, x = torch_setup
    xg = x.clone().requires_grad_(True)
    g = torch.randn(OUT_SHAPE)

    def step():
        return torch.autograd.grad(psa_mask(xg, 0, MASK, impl=impl), xg, g)

    benchmark(step)
    _record(benchmark, ("torch", impl, "fwd+bwd"))


@pytest.mark.benchmark(group="psa_mask torch fwd+bwd")
def test_torch_zeros_floor_fwd_bwd(benchmark, torch_setup):
    torch = torch_setup[0]
    benchmark(lambda: (torch.zeros(OUT_SHAPE), torch.zeros(IN_SHAPE)))
    _record(benchmark, ("torch", "zeros", "fwd+bwd"))


# --- Paddle ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def paddle_setup():
    ref.require_op("paddle")
    import paddle

    from paddle_impl.ops import psa_mask

    paddle.seed(0)
    x = paddle.randn(list(IN_SHAPE))
    for t in TYPES.values():
        assert np.array_equal(psa_mask(x, t, MASK, impl="cpp").numpy(), psa_mask(x, t, MASK, impl="tensor").numpy())
    return paddle, psa_mask, x


@pytest.mark.benchmark(group="psa_mask paddle forward")
@pytest.mark.parametrize("kind", list(TYPES))
@pytest.mark.parametrize("impl", ["cpp", "tensor"])
def test_paddle_forward(benchmark, paddle_setup, impl, kind):
    paddle, psa_mask, x = paddle_setup
    benchmark(psa_mask, x, TYPES[kind], MASK, impl=impl)
    _record(benchmark, ("paddle", impl, kind))


@pytest.mark.benchmark(group="psa_mask paddle forward")
def test_paddle_zeros_floor(benchmark, paddle_setup):
    paddle = paddle_setup[0]
    benchmark(paddle.zeros, list(OUT_SHAPE))
    _record(benchmark, ("paddle", "zeros"))


@pytest.mark.benchmark(group="psa_mask paddle forward")
def test_paddle_full_floor(benchmark, paddle_setup):
    paddle = paddle_setup[0]
    benchmark(paddle.full, list(OUT_SHAPE), 1.0)
    _record(benchmark, ("paddle", "full"))


@pytest.mark.benchmark(group="psa_mask paddle fwd+bwd")
@pytest.mark.parametrize("impl", ["cpp", "tensor"])
def test_paddle_forward_backward(benchmark, paddle_setup, impl):
    paddle, psa_mask, x = paddle_setup
    xg = x.clone()
    xg.stop_gradient = False
    g = paddle.randn(list(OUT_SHAPE))

    def step():
        return paddle.grad([psa_mask(xg, 0, MASK, impl=impl)], [xg], [g])

    benchmark(step)
    _record(benchmark, ("paddle", impl, "fwd+bwd"))


@pytest.mark.benchmark(group="psa_mask paddle fwd+bwd")
def test_paddle_zeros_floor_fwd_bwd(benchmark, paddle_setup):
    paddle = paddle_setup[0]
    benchmark(lambda: (paddle.zeros(list(OUT_SHAPE)), paddle.zeros(list(IN_SHAPE))))
    _record(benchmark, ("paddle", "zeros", "fwd+bwd"))


# --- the literal reference loop (numpy, framework-free) ---------------------------------------------------------

@pytest.mark.benchmark(group="psa_mask reference loop")
@pytest.mark.parametrize("kind", list(TYPES))
def test_reference_loop(benchmark, kind):
    """The 5-nested-loop reference of tests/psa_reference.py at the same shape: one round (it takes seconds)."""
    x = np.random.default_rng(0).standard_normal(IN_SHAPE).astype(np.float32)
    benchmark.pedantic(ref.psa_mask_loop, args=(x, TYPES[kind], MASK, MASK), rounds=1, iterations=1)
    _record(benchmark, ("numpy", "loop", kind))


# --- the compiled op against a plain copy, at the seed's shape and at full resolution ----------------------------
#
# Seed shape: the seed's Cityscapes recipe (crop 512x1024 -> 64x128 features -> shrink 2 -> 32x64, mask 59x59),
# N = 2: x (2, 3481, 32, 64) -> (2, 2048, 32, 64). Each direction has its own group, whose baseline is `copy_` of a
# tensor the size of THAT direction's result into a preallocated one (forward: the output, 33.5 MB; backward: the
# input gradient, 57 MB); the op reads at most as many bytes as it writes. The op runs twice: as called in a model
# (a fresh result tensor: torch's allocator maps new pages for a tensor this large, and their first-touch faults are
# part of the time) and through the `.out` overload into a reused buffer (the kernel alone). Two more rows pay a
# fresh allocation without the op: `clone()` (copy into it) and `empty().fill_(1.0)` (store into it).
# Full resolution: 1024x2048 inference (128x256 features -> 64x128, mask 127x255), N = 1; floor `zeros` of the
# output (1.07 GB: the copy floor would need twice that). Printed by conftest's ratio table (group baseline).

COPY_CASES = {"seed": (2, 59, 59, 32, 64), "fullres": (1, 127, 255, 64, 128)}


@pytest.fixture(scope="module")
def copy_setup():
    ref.require_op("torch")
    import torch

    from alignment.utils import set_threads

    set_threads(THREADS, ("torch",))
    return torch


def _case_tensors(torch, case):
    n, mh, mw, h, w = COPY_CASES[case]
    x = torch.randn((n, mh * mw, h, w), generator=torch.Generator().manual_seed(0))
    return x, (n, h * w, h, w), (mh, mw)


def _result_shape(direction, x, out_shape):
    return out_shape if direction == "forward" else tuple(x.shape)


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_seed_copy_floor(benchmark, copy_setup, direction):
    """The baseline: copy a tensor the size of the direction's result into a preallocated one (no allocation)."""
    torch = copy_setup
    x, out_shape, _ = _case_tensors(torch, "seed")
    shape = _result_shape(direction, x, out_shape)
    y, dst = torch.randn(shape), torch.empty(shape)
    benchmark.group = f"psa_mask seed shape {direction} vs copy"
    benchmark.extra_info["baseline"] = True
    benchmark(dst.copy_, y)


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_seed_clone_floor(benchmark, copy_setup, direction):
    """The same copy into a fresh allocation, as the op's result is (first-touch page faults included)."""
    torch = copy_setup
    x, out_shape, _ = _case_tensors(torch, "seed")
    y = torch.randn(_result_shape(direction, x, out_shape))
    benchmark.group = f"psa_mask seed shape {direction} vs copy"
    benchmark(y.clone)


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_seed_fresh_floor(benchmark, copy_setup, direction):
    """The fresh-allocation floor: allocate a result-sized tensor and store to every element once (no read), as
    the op does with its result -- the first-touch page faults of the allocation without the copy's reads."""
    torch = copy_setup
    x, out_shape, _ = _case_tensors(torch, "seed")
    shape = _result_shape(direction, x, out_shape)
    benchmark.group = f"psa_mask seed shape {direction} vs copy"
    benchmark(lambda: torch.empty(shape).fill_(1.0))


@pytest.mark.parametrize("into", ["fresh", "out="])
@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("kind", list(TYPES))
def test_seed_compiled(benchmark, copy_setup, kind, direction, into):
    torch = copy_setup
    x, out_shape, (mh, mw) = _case_tensors(torch, "seed")
    benchmark.group = f"psa_mask seed shape {direction} vs copy"
    op = torch.ops.segtwin.psa_mask if direction == "forward" else torch.ops.segtwin.psa_mask_backward
    src = x if direction == "forward" else torch.randn(out_shape)
    if into == "fresh":
        benchmark(op, src, TYPES[kind], mh, mw)
    else:
        buf = torch.empty(_result_shape(direction, x, out_shape))
        benchmark(op.out, src, TYPES[kind], mh, mw, out=buf)


@pytest.mark.benchmark(group="psa_mask full resolution vs zeros")
def test_fullres_zeros_floor(benchmark, copy_setup):
    torch = copy_setup
    _, out_shape, _ = _case_tensors(torch, "fullres")
    benchmark.extra_info["baseline"] = True
    benchmark.pedantic(torch.zeros, args=(out_shape,), rounds=5, iterations=1)


@pytest.mark.benchmark(group="psa_mask full resolution vs zeros")
@pytest.mark.parametrize("kind", list(TYPES))
def test_fullres_compiled(benchmark, copy_setup, kind):
    torch = copy_setup
    x, _, (mh, mw) = _case_tensors(torch, "fullres")
    benchmark.pedantic(torch.ops.segtwin.psa_mask, args=(x, TYPES[kind], mh, mw), rounds=5, iterations=1)
