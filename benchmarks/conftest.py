"""Benchmark conventions: thread counts are set explicitly and equally for torch and Paddle; results are read as
RATIOS against the baseline of the same group measured in the same run (printed at the end of the session).

A benchmark marks its baseline with `benchmark.extra_info["baseline"] = True`; every other benchmark of the same
`group` is reported as median / baseline median.
"""
from __future__ import annotations

import os

THREADS = int(os.environ.get("SEGTWIN_BENCH_THREADS", "2"))
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))


def set_threads(n: int = THREADS) -> int:
    import paddle
    import torch

    torch.set_num_threads(n)
    paddle.base.core.set_num_threads(n)
    return n


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
        lines.append(f"[{group}] baseline {base.name}: median {base.stats.median * 1e3:.3f} ms")
        for b in benches:
            if b is base or not b.stats:
                continue
            lines.append(f"    {b.name}: median {b.stats.median * 1e3:.3f} ms = {b.stats.median / base.stats.median:.3f}x"
                         + "".join(f"  {k}={v}" for k, v in b.extra_info.items() if k != "baseline"))
    if lines:
        terminalreporter.write_sep("=", "segtwin ratios (same run, same thread count)")
        for line in lines:
            terminalreporter.write_line(line)
