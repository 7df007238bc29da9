"""Memory bookkeeping of a conversion: dropping source pages once written, and measuring the peak RSS."""
from __future__ import annotations

import ctypes
import os
import resource
import sys
from typing import Mapping, Optional

__all__ = ["SourcePageReleaser", "MemoryMeter", "rss_bytes", "maxrss_bytes"]

_MADV_DONTNEED = 4  # Linux


def rss_bytes() -> Optional[int]:
    """Current resident set size (Linux /proc; None elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def maxrss_bytes() -> int:
    """The process's peak RSS so far.

    Linux: VmHWM of /proc/self/status, the high-water mark of this address space. (getrusage's ru_maxrss is NOT
    used there: it survives exec, so a child started by a big parent -- pytest holding a model -- inherits the
    parent's peak and hides its own.) Elsewhere: ru_maxrss (kilobytes; bytes on macOS).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r) if sys.platform == "darwin" else int(r) * 1024


class MemoryMeter:
    """Peak RSS of a piece of work from the process high-water mark.

    Exact when the work set a new process peak (e.g. a fresh `python -m weights_convert`); otherwise reported as
    unknown (None), because an earlier, higher peak hides it.
    """

    def __init__(self):
        self.rss_start = rss_bytes()
        self.maxrss_start = maxrss_bytes()

    def result(self, ckpt_bytes: int) -> dict:
        maxrss_end = maxrss_bytes()
        exact = maxrss_end > self.maxrss_start and self.rss_start is not None
        delta = maxrss_end - self.rss_start if exact else None
        return {
            "rss_start_bytes": self.rss_start,
            "process_peak_rss_bytes": maxrss_end,
            "peak_rss_delta_bytes": delta,
            "checkpoint_bytes": ckpt_bytes,
            "peak_delta_over_checkpoint": round(delta / ckpt_bytes, 3) if delta is not None and ckpt_bytes else None,
            "measured": exact,
            "method": "peak RSS (VmHWM / ru_maxrss) at the end minus RSS at the start; valid when the conversion "
                      "set the process peak",
        }


class SourcePageReleaser:
    """Give back the resident pages of memory-mapped source tensors once they have been written.

    A tensor from `torch.load(mmap=True)` is a slice of one private read-only mapping of the checkpoint file: its
    pages stay resident after the tensor is dropped, so streaming alone would still end with the whole file in RSS.
    `release(key)` calls madvise(MADV_DONTNEED) on the pages that lie ENTIRELY inside that tensor's bytes, and only
    when (a) the bytes lie in a file-backed mapping of the checkpoint itself (never anonymous memory) and (b) no other
    tensor of the checkpoint overlaps them (tied / aliased weights keep their pages). Pages of a clean private file
    mapping that are dropped read back from the file if touched again, so this never changes any value. Linux only;
    elsewhere a no-op.
    """

    def __init__(self, path, tensors: Mapping):
        self.ranges: dict = {}
        self.released_bytes = 0
        self._madvise = None
        if not sys.platform.startswith("linux"):
            return
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            madvise = libc.madvise
            madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
            madvise.restype = ctypes.c_int
            self._page = os.sysconf("SC_PAGE_SIZE")
            maps = self._file_mappings(os.path.realpath(path))
        except (OSError, AttributeError, ValueError):
            return
        if not maps:
            return
        spans = []
        for key, t in tensors.items():
            try:
                start, n = int(t.data_ptr()), int(t.nbytes)
            except (AttributeError, RuntimeError):
                continue
            if n > 0:
                spans.append((start, start + n, key))
        spans.sort()
        shared = set()
        for (s0, e0, k0), (s1, e1, k1) in zip(spans, spans[1:]):
            if s1 < e0:
                shared.update((k0, k1))
        # also catch a span overlapped by a non-neighbour (a long span covering several)
        reach, reach_key = -1, None
        for s, e, k in spans:
            if s < reach:
                shared.update((k, reach_key))
            if e > reach:
                reach, reach_key = e, k
        for s, e, k in spans:
            if k not in shared and any(a <= s and e <= b for a, b in maps):
                self.ranges[k] = (s, e)
        self._madvise = madvise

    @staticmethod
    def _file_mappings(realpath: str) -> list:
        out = []
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) == 6 and parts[5].strip() == realpath:
                    a, b = (int(x, 16) for x in parts[0].split("-"))
                    out.append((a, b))
        return out

    def release(self, key) -> None:
        span = self.ranges.pop(key, None)
        if span is None or self._madvise is None:
            return
        page = self._page
        start = -(-span[0] // page) * page  # whole pages inside the tensor only
        end = span[1] // page * page
        if end > start and self._madvise(start, end - start, _MADV_DONTNEED) == 0:
            self.released_bytes += end - start
