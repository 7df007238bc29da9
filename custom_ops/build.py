"""Just-in-time build of the PSA mask operator for PyTorch and PaddlePaddle, cached on disk.

Each framework's op is built by that framework's own extension builder (`torch.utils.cpp_extension.load`,
`paddle.utils.cpp_extension.load`) in a child process, into a temporary directory that is renamed into the cache
once complete. The cache directory is ``$SEGTWIN_CACHE`` (default ``~/.cache/segtwin``); each build lives in
``psa_mask/<framework>-<version>-<python>-<hash>`` where the hash covers the source files, the compiler flags, the
framework version and whether the CUDA kernels are included. A file lock serialises concurrent builders of the same
key; a process that finds a finished build only loads it (no compiler needed).

When no C++ compiler (or, for torch, no ninja) is available and nothing is cached, `BuildUnavailable` is raised
with the reason; `torch_ref.ops.psa_mask` / `paddle_impl.ops.psa_mask` then fall back to their pure-tensor
implementation (impl="auto") or re-raise (impl="cpp").

Command line: ``python -m custom_ops.build [torch] [paddle] [--nvcc-check]`` builds (or loads) and reports.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

__all__ = [
    "BuildUnavailable", "ROOT", "INCLUDE_DIR", "CUDA_SOURCE", "CUDA_SOURCES", "cache_root", "compiler_problem",
    "build_dir", "load_torch", "load_paddle", "paddle_library_path", "nvcc_command", "nvcc_check", "nvcc_check_all",
]

ROOT = Path(__file__).resolve().parent
INCLUDE_DIR = ROOT / "include"
HEADERS = (INCLUDE_DIR / "psa_mask_kernel.h", INCLUDE_DIR / "psa_mask_cpu.h", INCLUDE_DIR / "psa_mask_cuda.h",
           INCLUDE_DIR / "psa_attend_kernel.h", INCLUDE_DIR / "psa_attend_cpu.h", INCLUDE_DIR / "psa_attend_cuda.h",
           INCLUDE_DIR / "psa_attend_cuda_driver.h", INCLUDE_DIR / "cuda_launch.h")
CUDA_SOURCE = ROOT / "cuda" / "psa_mask.cu"
# The framework-free CUDA sources, compiled into the library only when building with CUDA: the PSA mask kernels and
# the fused PSA aggregation's kernels + band driver.
CUDA_SOURCES = (CUDA_SOURCE, ROOT / "cuda" / "psa_attend.cu")
# Glue sources per framework: the PSA mask op and the fused PSA aggregation (psa_attend), one library.
GLUE = {"torch": [ROOT / "torch" / "psa_mask_op.cpp", ROOT / "torch" / "psa_attend_op.cpp"],
        "paddle": [ROOT / "paddle" / "psa_mask_op.cc", ROOT / "paddle" / "psa_attend_op.cc"]}
#: the Paddle custom operators of the library (each gets a generated Python entry point)
PADDLE_OPS = ("psa_mask", "psa_attend")
LIB_NAME = {"torch": "segtwin_psa_mask_torch", "paddle": "segtwin_psa_mask_paddle"}
# Flags each framework's builder gets on top of its own. -fopenmp: the CPU loops are OpenMP loops.
# -fno-trapping-math: lets GCC vectorise the branch-free exp of psa_attend (its clamps are selects); no code here
# relies on floating-point traps, and the values computed are the same.
CXX_FLAGS = ["-O3", "-fopenmp", "-fno-trapping-math", "-Wall"]
LD_FLAGS = ["-fopenmp"]
CUDA_FLAGS = ["-O3"]  # the framework's builder picks the C++ standard (the .cu compiles as C++17 and C++20)
FIRST_BUILD_SECONDS = {"torch": 20, "paddle": 16}


class BuildUnavailable(RuntimeError):
    """The compiled op cannot be had: no compiler/ninja and nothing cached, or the build failed. `reason` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def cache_root() -> Path:
    """``$SEGTWIN_CACHE`` if set, else ``~/.cache/segtwin``."""
    env = os.environ.get("SEGTWIN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "segtwin"


def _tool_env() -> dict:
    """Environment for the build child: the interpreter's bin dir (venv ninja) and the ninja wheel on PATH."""
    env = dict(os.environ)
    extra = [os.path.dirname(sys.executable)]
    try:
        import ninja  # the PyPI wheel ships the binary

        extra.append(ninja.BIN_DIR)
    except Exception:  # noqa: BLE001 - optional
        pass
    env["PATH"] = os.pathsep.join(extra + [env.get("PATH", "")])
    return env


def compiler_problem(framework: str) -> str | None:
    """Why this machine cannot build the op for `framework` (None when it can)."""
    path = _tool_env()["PATH"]
    cxx = (os.environ.get("CXX") or "c++").split()[0]
    if shutil.which(cxx, path=path) is None:
        return f"no C++ compiler: {cxx!r} (from $CXX, default 'c++') is not on PATH"
    if framework == "paddle":
        cc = (os.environ.get("CC") or "cc").split()[0]
        if shutil.which(cc, path=path) is None:
            return f"no C compiler driver: {cc!r} (from $CC, default 'cc') is not on PATH (Paddle's builder uses it)"
    if framework == "torch" and shutil.which("ninja", path=path) is None:
        return "ninja is not installed (torch's extension builder needs it: pip install ninja)"
    return None


def _framework_info(framework: str) -> tuple[str, bool]:
    """(framework version, whether to compile the CUDA kernels and glue)."""
    want_cuda = os.environ.get("SEGTWIN_PSA_CUDA", "auto").lower() not in ("0", "off", "no", "false")
    if framework == "torch":
        import torch
        from torch.utils.cpp_extension import CUDA_HOME

        return torch.__version__, want_cuda and torch.version.cuda is not None and CUDA_HOME is not None
    if framework == "paddle":
        import paddle

        nvcc = shutil.which("nvcc") or (os.environ.get("CUDA_HOME") and shutil.which(
            os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")))
        return paddle.__version__, want_cuda and paddle.is_compiled_with_cuda() and bool(nvcc)
    raise ValueError(f"unknown framework {framework!r} (expected 'torch' or 'paddle')")


def _build_spec(framework: str) -> dict:
    version, with_cuda = _framework_info(framework)
    sources = list(GLUE[framework]) + (list(CUDA_SOURCES) if with_cuda else [])
    defines = ["-DSEGTWIN_WITH_CUDA"] if with_cuda else []
    spec = {
        "framework": framework,
        "framework_version": version,
        "python": sys.implementation.cache_tag,
        "name": LIB_NAME[framework],
        "sources": [str(s) for s in sources],
        "include": str(INCLUDE_DIR),
        "cxx_flags": CXX_FLAGS + defines,
        "ld_flags": LD_FLAGS,
        "cuda_flags": CUDA_FLAGS + defines if with_cuda else [],
        "with_cuda": with_cuda,
        "paddle_ops": list(PADDLE_OPS),
    }
    h = hashlib.sha256()
    for f in sorted(set(sources) | set(HEADERS)):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    for k in ("framework", "framework_version", "python", "cxx_flags", "ld_flags", "cuda_flags", "with_cuda",
              "paddle_ops"):
        h.update(json.dumps(spec[k]).encode())
    spec["hash"] = h.hexdigest()[:16]
    safe_version = "".join(ch if ch.isalnum() or ch in ".-_" else "_" for ch in version)
    spec["key"] = f"{framework}-{safe_version}-{spec['python']}-{spec['hash']}"
    return spec


_TORCH_CHILD = r"""
import json, sys
from torch.utils.cpp_extension import load
a = json.loads(sys.argv[1])
load(name=a["name"], sources=a["sources"], extra_cflags=a["cxx_flags"], extra_ldflags=a["ld_flags"],
     extra_cuda_cflags=a["cuda_flags"] or None, extra_include_paths=[a["include"]], build_directory=a["dir"],
     with_cuda=a["with_cuda"], is_python_module=False, verbose=True)
"""

_PADDLE_CHILD = r"""
import json, os, sys
from paddle.utils.cpp_extension import load
from paddle.utils.cpp_extension.extension_utils import _custom_api_content
a = json.loads(sys.argv[1])
load(name=a["name"], sources=a["sources"], extra_cxx_cflags=a["cxx_flags"], extra_cuda_cflags=a["cuda_flags"],
     extra_ldflags=a["ld_flags"], extra_include_paths=[a["include"]], build_directory=a["dir"], verbose=True)
# The Python entry points Paddle generates for the ops, written once here so that loading never writes files.
with open(os.path.join(a["dir"], "psa_mask_api.py"), "w") as f:
    f.write("\n".join(_custom_api_content(op) for op in a["paddle_ops"]))
"""


def _library_file(framework: str, directory: Path) -> Path:
    name = LIB_NAME[framework]
    if framework == "torch":
        return directory / f"{name}.so"
    candidates = [directory / name / f"{name}.so", directory / f"{name}.so"]
    for c in candidates:
        if c.exists():
            return c
    return candidates[0]


class _FileLock:
    """Exclusive advisory lock on a file (fcntl; a no-op where fcntl is missing)."""

    def __init__(self, path: Path):
        self.path = path
        self._fd = None

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            import fcntl

            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - non-POSIX
            pass
        return self

    def __exit__(self, *exc):
        try:
            import fcntl

            fcntl.flock(self._fd, fcntl.LOCK_UN)
        except ImportError:  # pragma: no cover
            pass
        os.close(self._fd)


def _complete(directory: Path, framework: str) -> bool:
    return (directory / "build.json").exists() and _library_file(framework, directory).exists()


def build_dir(framework: str, verbose: bool = False) -> Path:
    """Directory of the finished build for `framework`, building it first when the cache has none."""
    spec = _build_spec(framework)
    base = cache_root() / "psa_mask"
    final = base / spec["key"]
    if _complete(final, framework):
        return final
    problem = compiler_problem(framework)
    if problem:
        raise BuildUnavailable(f"cannot build the psa_mask op for {framework}: {problem}; nothing cached in {base}")
    try:
        return _build_locked(framework, spec, base, final, verbose)
    except OSError as e:  # unwritable cache, full disk, ...
        raise BuildUnavailable(f"cannot build the psa_mask op for {framework} in {base}: {e}") from e


def _build_locked(framework: str, spec: dict, base: Path, final: Path, verbose: bool) -> Path:
    with _FileLock(base / f"{spec['key']}.lock"):
        if _complete(final, framework):  # another process finished it while we waited
            return final
        print(f"segtwin: building psa_mask for {framework} (first use, ~{FIRST_BUILD_SECONDS[framework]} s)…",
              file=sys.stderr, flush=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{spec['key']}.tmp-", dir=base))
        child = _TORCH_CHILD if framework == "torch" else _PADDLE_CHILD
        args = dict(spec, dir=str(tmp))
        t0 = time.time()
        proc = subprocess.run([sys.executable, "-c", child, json.dumps(args)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=_tool_env())
        log = proc.stdout
        (tmp / "build.log").write_text(log)
        lib = _library_file(framework, tmp)
        if proc.returncode != 0 or not lib.exists():
            failed = base / f"{spec['key']}.failed.log"
            failed.write_text(log)
            shutil.rmtree(tmp, ignore_errors=True)
            tail = "\n".join(log.strip().splitlines()[-25:])
            raise BuildUnavailable(f"building the psa_mask op for {framework} failed (exit {proc.returncode}); "
                                   f"full log: {failed}\n{tail}")
        meta = dict(spec, seconds=round(time.time() - t0, 1), library=str(lib.relative_to(tmp)),
                    built_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
        (tmp / "build.json").write_text(json.dumps(meta, indent=2))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the finished build is as readable as the cache dir
        if final.exists():  # a stale, incomplete directory (e.g. from an interrupted older layout)
            shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        if verbose:
            print(log, file=sys.stderr)
        return final


_lock = threading.Lock()
_loaded: dict = {}


def load_torch() -> Path:
    """Build (if needed) and load the torch op library into this process; returns its path. Idempotent."""
    with _lock:
        if "torch" not in _loaded:
            import torch

            lib = _library_file("torch", build_dir("torch"))
            torch.ops.load_library(str(lib))
            _loaded["torch"] = lib
        return _loaded["torch"]


def paddle_library_path() -> Path:
    """Path of the built Paddle op library (building it if needed), e.g. to load before running an exported model."""
    return _library_file("paddle", build_dir("paddle"))


def load_paddle():
    """Build (if needed) and register the Paddle op in this process; returns the generated Python entry point
    module, whose ``psa_mask(x, psa_type, mask_h, mask_w)`` runs the op in dynamic and static mode. Idempotent."""
    with _lock:
        if "paddle" not in _loaded:
            import importlib.util
            from importlib import machinery

            from paddle.utils.cpp_extension.extension_utils import load_op_meta_info_and_register_op

            directory = build_dir("paddle")
            lib = _library_file("paddle", directory)
            load_op_meta_info_and_register_op(str(lib))
            loader = machinery.SourceFileLoader("_segtwin_psa_mask_paddle_api", str(directory / "psa_mask_api.py"))
            spec = importlib.util.spec_from_loader(loader.name, loader)
            module = importlib.util.module_from_spec(spec)
            loader.exec_module(module)
            module.library_path = lib
            module.build_info = json.loads((directory / "build.json").read_text())
            _loaded["paddle"] = module
        return _loaded["paddle"]


def nvcc_command(output: str | os.PathLike, archs=(80, 90), std: str = "c++17",
                 source: str | os.PathLike = CUDA_SOURCE) -> list[str]:
    """The nvcc command that compiles one framework-free CUDA source (default psa_mask.cu) for the given SM
    architectures, with the host compiler's -Wall -Wextra and every warning an error."""
    cmd = ["nvcc", "-c", str(source), f"-std={std}", "-Xcompiler", "-fPIC,-Wall,-Wextra", "-Werror", "all-warnings"]
    for a in archs:
        cmd += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    return cmd + ["-I", str(INCLUDE_DIR), "-o", str(output)]


def nvcc_check(output: str | os.PathLike, archs=(80, 90), std: str = "c++17",
               source: str | os.PathLike = CUDA_SOURCE) -> subprocess.CompletedProcess:
    """Compile one CUDA source (default psa_mask.cu) with nvcc (compile only; no GPU needed). Raises
    FileNotFoundError without nvcc."""
    if shutil.which("nvcc") is None:
        raise FileNotFoundError("nvcc is not on PATH")
    return subprocess.run(nvcc_command(output, archs, std, source), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)


def nvcc_check_all(directory: str | os.PathLike, archs=(80, 90), std: str = "c++17") -> dict:
    """nvcc_check of every CUDA source (CUDA_SOURCES: psa_mask.cu and psa_attend.cu), each into
    ``directory/<name>.o``; returns {source file name: CompletedProcess}."""
    return {src.name: nvcc_check(Path(directory) / f"{src.stem}.o", archs, std, src) for src in CUDA_SOURCES}


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m custom_ops.build", description=__doc__.split("\n\n")[0])
    # no `choices`: argparse (3.11) checks an empty nargs="*" list against them and rejects it
    p.add_argument("frameworks", nargs="*", metavar="{torch,paddle}", help="default: both")
    p.add_argument("--nvcc-check", action="store_true",
                   help="also compile the CUDA sources (psa_mask.cu, psa_attend.cu) for sm_80 and sm_90, "
                        "C++17 and C++20")
    a = p.parse_args(argv)
    unknown = [f for f in a.frameworks if f not in ("torch", "paddle")]
    if unknown:
        p.error(f"unknown framework(s) {unknown} (choose from 'torch', 'paddle')")
    rc = 0
    for fw in a.frameworks or ["torch", "paddle"]:
        try:
            d = build_dir(fw)
            print(f"{fw}: {_library_file(fw, d)}")
        except BuildUnavailable as e:
            print(f"{fw}: unavailable: {e.reason}")
            rc = 1
    if a.nvcc_check:
        with tempfile.TemporaryDirectory() as t:
            try:
                for std in ("c++17", "c++20"):
                    for name, r in nvcc_check_all(t, std=std).items():
                        print(f"nvcc {name} {std}: {'ok' if r.returncode == 0 else 'FAILED'}\n{r.stdout}".rstrip())
                        rc = rc or r.returncode
            except FileNotFoundError as e:
                print(f"nvcc: skipped ({e})")
    return rc


if __name__ == "__main__":
    sys.exit(main())
