"""Small helpers that torch_ref, paddle_impl, weights_convert, the tests and the benchmarks share.

This module imports neither torch nor paddle: `set_threads` imports the frameworks it is asked to configure when it
is called.

* `atomic_path` / `atomic_write`: write a file through a temporary file next to it, renamed into place only when the
  writing finished, so a reader never sees a half-written file;
* `set_threads`: the same CPU thread count for torch and/or Paddle;
* `parse_size`: "H,W" / "HxW" / (H, W) / int sizes, and "N,C,H,W" input sizes, as positive integers.
"""
from __future__ import annotations

import contextlib
import numbers
import os
import tempfile
from typing import IO, Iterator, Optional, Sequence, Tuple

__all__ = ["atomic_path", "atomic_write", "set_threads", "parse_size"]


# --------------------------------------------------------------------------------------------------------------------
# atomic writes


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


@contextlib.contextmanager
def atomic_path(path) -> Iterator[str]:
    """Yield a temporary path next to `path`; when the block ends without an error the temporary file replaces `path`
    (one `os.replace`), when it raises the temporary file is removed and `path` is left as it was.

    The temporary file is created empty, named `.NAME.tmp-XXXXXXXX` in the same directory (missing directories are
    made), with the permissions an ordinary new file gets (not mkstemp's 0600)."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", dir=directory)
    os.close(fd)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        _unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_write(path, mode: str = "w", encoding: Optional[str] = None, fsync: bool = False) -> Iterator[IO]:
    """`open(path, mode)` through `atomic_path`: the file object writes the temporary file, which replaces `path`
    when the block ends cleanly. `fsync=True` also forces the data to disk before the rename."""
    if "w" not in mode:
        raise ValueError(f"atomic_write: mode must be a writing mode ('w', 'wb', ...), got {mode!r}")
    with atomic_path(path) as tmp:
        with open(tmp, mode, encoding=encoding) as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())


# --------------------------------------------------------------------------------------------------------------------
# threads


def set_threads(threads: Optional[int] = None, frameworks: Sequence[str] = ("torch", "paddle")) -> int:
    """Set the CPU thread count of each framework named in `frameworks` ("torch", "paddle"); returns the count.

    `threads` defaults to $OMP_NUM_THREADS, else min(4, cores). Paddle defaults to 1 thread and torch to all cores,
    so a comparison or a benchmark sets both explicitly."""
    n = int(threads or os.environ.get("OMP_NUM_THREADS") or min(4, os.cpu_count() or 1))
    for fw in frameworks:
        if fw == "torch":
            import torch

            torch.set_num_threads(n)
        elif fw == "paddle":
            import paddle

            paddle.base.core.set_num_threads(n)
        else:
            raise ValueError(f"set_threads: unknown framework {fw!r} (torch or paddle)")
    return n


# --------------------------------------------------------------------------------------------------------------------
# sizes


def parse_size(value, name: str = "size", dims: str = "HW") -> Tuple[int, ...]:
    """`len(dims)` positive integers from a string ("64,128" or "64x128"; "2,3,65,65" for dims="NCHW"), a sequence,
    or, for two dims, one int (a square). ValueError naming `name` and the expected form otherwise."""
    n = len(dims)
    form = ",".join(dims)
    if isinstance(value, str):
        try:
            vals = tuple(int(p.strip()) for p in value.lower().replace("x", ",").split(","))
        except ValueError:
            raise ValueError(f"{name} must be {form} with {n} positive integers, got {value!r}") from None
    elif isinstance(value, numbers.Integral) and not isinstance(value, bool):
        if n != 2:
            raise ValueError(f"{name} must be {form} with {n} positive integers, got {value!r}")
        vals = (int(value), int(value))
    else:
        try:
            vals = tuple(int(v) for v in value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be {form} with {n} positive integers, got {value!r}") from None
    if len(vals) != n:
        raise ValueError(f"{name} must be {form} with {n} positive integers, got {value!r}")
    if min(vals) <= 0:
        raise ValueError(f"{name} must be positive, got ({', '.join(dims)}) = ({', '.join(map(str, vals))})")
    return vals


def run_parser(parser, argv, run) -> int:
    """`run(parser.parse_args(argv))`, with argparse's exit (--help: 0, a usage error: 2) returned as the exit code
    instead of raised, for `main(argv) -> int` functions that tests call in-process."""
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    return run(args)
