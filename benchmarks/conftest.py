"""Benchmark conventions: thread counts are set explicitly and equally for torch and Paddle; results are read as
RATIOS against the baseline of the same group measured in the same run (printed at the end of the session).

A benchmark marks its baseline with `benchmark.extra_info["baseline"] = True`; every other benchmark of the same
`group` is reported as median / baseline median.
"""
from __future__ import annotations

import os

#: the one thread count of every benchmark: $SEGTWIN_BENCH_THREADS, else $OMP_NUM_THREADS, else 2. Exported as
#: OMP_NUM_THREADS here, before any benchmark imports a framework (Paddle's math library and the PSA op's OpenMP loop
#: read it at start-up).
THREADS = int(os.environ.get("SEGTWIN_BENCH_THREADS") or os.environ.get("OMP_NUM_THREADS") or 2)
os.environ["OMP_NUM_THREADS"] = str(THREADS)


def set_threads(n: int = THREADS) -> int:
    """The benchmarks' thread count for torch and Paddle alike."""
    from alignment.utils import set_threads as _set_threads

    return _set_threads(n)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not getattr(session, "benchmarks", None):
        return
    groups = {}
    for b in session.benchmarks:
        groups.setdefault(b.group, []).append(b)
    lines = []
    for group, benches in sorted(groups.items(), key=lambda kv: str(kv[0])):
        base = next((b for b in benches if b.extra_info.get("baseline")), None)
        if base is None or not base.stats or not base.stats.median:
            continue
        lines.append(f"[{group}] baseline {base.name}: median {base.stats.median * 1e3:.3f} ms"
                     + "".join(f"  {k}={v}" for k, v in base.extra_info.items() if k != "baseline"))
        for b in benches:
            if b is base or not b.stats:
                continue
            ratio = b.stats.median / base.stats.median
            lines.append(f"    {b.name}: median {b.stats.median * 1e3:.3f} ms = {ratio:.3f}x"
                         + "".join(f"  {k}={v}" for k, v in b.extra_info.items() if k != "baseline"))
    if lines:
        terminalreporter.write_sep("=", "segtwin ratios (same run, same thread count)")
        for line in lines:
            terminalreporter.write_line(line)


def model_twins(name: str, size, num_classes: int = 19, **cfg):
    """(torch model, Paddle twin with the same weights, input x, labels y) for a forward+backward benchmark.

    Both in eval mode (a batch of one cannot run training-mode BN in small-map branches; dropout off), weights
    copied from torch to Paddle through the converter's key rule, seeded input and labels."""
    import numpy as np
    import torch

    import paddle_impl
    import torch_ref
    from paddle_impl.checkpoint import strict_load
    from weights_convert.keymap import get_keymap

    set_threads()
    torch.manual_seed(0)
    tm = torch_ref.build_model(name, num_classes=num_classes, **cfg).eval()
    pm = paddle_impl.build_model(name, num_classes=num_classes, **cfg)
    to_paddle = get_keymap(name).to_paddle  # the converter's key rule (BN renames, the spec's key_renames)
    strict_load(pm, {to_paddle(k): v.numpy() for k, v in tm.state_dict().items() if to_paddle(k)})
    pm.eval()
    rng = np.random.default_rng(0)
    x = rng.standard_normal(size).astype(np.float32)
    y = rng.integers(0, num_classes, (size[0],) + tuple(size[2:])).astype(np.int64)
    return tm, pm, x, y


def torch_step(tm, x, y) -> float:
    """One forward + cross-entropy on the main logits + backward of the torch model."""
    import torch
    import torch.nn.functional as F

    tm.zero_grad(set_to_none=True)
    loss = F.cross_entropy(tm(torch.from_numpy(x)), torch.from_numpy(y), ignore_index=255)
    loss.backward()
    return float(loss.detach())


def paddle_step(pm, x, y) -> float:
    """The same step on the Paddle twin."""
    import paddle
    import paddle.nn.functional as F

    pm.clear_gradients()
    loss = F.cross_entropy(pm(paddle.to_tensor(x)), paddle.to_tensor(y), ignore_index=255, axis=1)
    loss.backward()
    return float(loss.detach())
