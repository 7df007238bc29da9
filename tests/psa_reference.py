"""Test helpers for the PSA mask op: numpy references, the mmcv conformance vectors, a finite-difference gradient.

The references are written from the semantics (docs/psa_mask.md; docs/references.md, section 6), independently of
the kernels:
* `psa_mask_loop` / `psa_mask_backward_loop`: the literal nested loops n, h, w, hidx, widx of the upstream kernels
  (scatter form: walk the input, write where its window cell lands).
* `psa_mask_formula`: the gather form, evaluated with numpy broadcasting.
Both must reproduce the mmcv vectors (tests/data/psa_mask) exactly.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

VECTOR_SHAPES = {"psa_input.bin": (4, 16, 8, 8), "psa_output_collect.bin": (4, 64, 8, 8),
                 "psa_output_distribute.bin": (4, 64, 8, 8)}
VECTOR_SHA1 = {"psa_input.bin": "032926f0", "psa_output_collect.bin": "c8017dd4",
               "psa_output_distribute.bin": "967c6898"}
MMCV_MASK = (4, 4)


def vectors_dir() -> Path:
    """tests/data/psa_mask (shipped with the repo); $SEGTWIN_PSA_VECTORS overrides it."""
    env = os.environ.get("SEGTWIN_PSA_VECTORS")
    return Path(env) if env else Path(__file__).resolve().parent / "data" / "psa_mask"


def load_mmcv_vectors() -> dict:
    """{'input', 'collect', 'distribute'} float32 arrays, after checking each file's sha1 prefix."""
    d = vectors_dir()
    out = {}
    for name, shape in VECTOR_SHAPES.items():
        path = d / name
        if not path.is_file():
            raise FileNotFoundError(f"mmcv PSA mask vector {path} is missing (set SEGTWIN_PSA_VECTORS to its folder)")
        raw = path.read_bytes()
        sha = hashlib.sha1(raw).hexdigest()
        if not sha.startswith(VECTOR_SHA1[name]):
            raise ValueError(f"{path}: sha1 {sha} does not start with {VECTOR_SHA1[name]} (corrupted copy?)")
        key = name[len("psa_"):-len(".bin")].replace("output_", "")
        out[key] = np.frombuffer(raw, dtype="<f4").reshape(shape).copy()
    return out


def _halves(mask_h: int, mask_w: int) -> tuple[int, int]:
    return (mask_h - 1) // 2, (mask_w - 1) // 2


def psa_mask_loop(x: np.ndarray, psa_type: int, mask_h: int, mask_w: int) -> np.ndarray:
    """Forward, literal loops (semseg/mmcv CPU kernel semantics). Output dtype = input dtype."""
    n_, c_, h_, w_ = x.shape
    assert c_ == mask_h * mask_w
    half_h, half_w = _halves(mask_h, mask_w)
    out = np.zeros((n_, h_ * w_, h_, w_), dtype=x.dtype)
    for n in range(n_):
        for h in range(h_):
            for w in range(w_):
                for hidx in range(mask_h):
                    for widx in range(mask_w):
                        qh, qw = h + hidx - half_h, w + widx - half_w
                        if 0 <= qh < h_ and 0 <= qw < w_:
                            v = x[n, hidx * mask_w + widx, h, w]
                            if psa_type == 0:
                                out[n, qh * w_ + qw, h, w] = v
                            else:
                                out[n, h * w_ + w, qh, qw] = v
    return out


def psa_mask_backward_loop(grad_out: np.ndarray, psa_type: int, mask_h: int, mask_w: int) -> np.ndarray:
    """Backward (the adjoint of the forward copy), literal loops; entries with no window cell stay 0."""
    n_, hw, h_, w_ = grad_out.shape
    assert hw == h_ * w_
    half_h, half_w = _halves(mask_h, mask_w)
    gx = np.zeros((n_, mask_h * mask_w, h_, w_), dtype=grad_out.dtype)
    for n in range(n_):
        for h in range(h_):
            for w in range(w_):
                for hidx in range(mask_h):
                    for widx in range(mask_w):
                        qh, qw = h + hidx - half_h, w + widx - half_w
                        if 0 <= qh < h_ and 0 <= qw < w_:
                            if psa_type == 0:
                                v = grad_out[n, qh * w_ + qw, h, w]
                            else:
                                v = grad_out[n, h * w_ + w, qh, qw]
                            gx[n, hidx * mask_w + widx, h, w] = v
    return gx


def psa_mask_formula(x: np.ndarray, psa_type: int, mask_h: int, mask_w: int) -> np.ndarray:
    """Forward by the gather form (docs/references.md, section 6): collect[n, q, p] = x[n, hi*mw+wi, p] where
    hi = qh-ph+half_h, wi = qw-pw+half_w are inside the window, else 0; distribute = collect transposed over (q, p)."""
    n_, c_, h_, w_ = x.shape
    assert c_ == mask_h * mask_w
    half_h, half_w = _halves(mask_h, mask_w)
    qh, qw, ph, pw = np.meshgrid(np.arange(h_), np.arange(w_), np.arange(h_), np.arange(w_), indexing="ij")
    hi, wi = qh - ph + half_h, qw - pw + half_w
    valid = (hi >= 0) & (hi < mask_h) & (wi >= 0) & (wi < mask_w)
    chan = np.where(valid, hi * mask_w + wi, 0)
    vals = x[:, chan, ph, pw]  # (N, H, W, H, W) indexed [q_h, q_w, p_h, p_w]
    col = np.where(valid[None], vals, np.zeros((), dtype=x.dtype)).reshape(n_, h_ * w_, h_ * w_)
    if psa_type == 1:
        col = col.transpose(0, 2, 1)
    return np.ascontiguousarray(col).reshape(n_, h_ * w_, h_, w_)


def numeric_grad(f, x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Central finite differences of the scalar function f (numpy float64 in, float out) at x."""
    x = np.array(x, dtype=np.float64)
    g = np.zeros_like(x)
    flat, gflat = x.reshape(-1), g.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        hi = f(x)
        flat[i] = old - eps
        lo = f(x)
        flat[i] = old
        gflat[i] = (hi - lo) / (2 * eps)
    return g


# The sweep: (N, mask_h, mask_w, H, W, why). Odd, even and non-square masks; masks larger and smaller than the
# full (2H-1, 2W-1) window; H != W; N > 1; 1x1 and 1xW feature maps.
SWEEP = [
    (1, 3, 3, 5, 5, "odd 3x3, smaller than full window"),
    (2, 4, 4, 8, 8, "even 4x4 as mmcv, N=2"),
    (1, 5, 3, 4, 6, "non-square odd mask, H != W"),
    (1, 2, 4, 3, 5, "non-square even mask"),
    (2, 9, 11, 5, 6, "full window (2H-1, 2W-1): no zeros"),
    (1, 13, 15, 4, 5, "mask larger than the full window"),
    (1, 1, 1, 3, 4, "1x1 mask"),
    (3, 3, 3, 1, 1, "1x1 feature map, N=3"),
    (1, 3, 5, 1, 7, "1xW feature map"),
    (1, 6, 2, 7, 1, "Hx1 feature map, even mask"),
    (2, 5, 5, 6, 9, "odd 5x5, wide map"),
]


def sweep_id(case) -> str:
    n, mh, mw, h, w, _ = case
    return f"n{n}-m{mh}x{mw}-{h}x{w}"


# ---------------------------------------------------------------------------------------------------------------
# Framework adapters: the same calls on both sides, numpy in and out.

REPO_ROOT = Path(__file__).resolve().parents[1]


def ensure_importable() -> None:
    """Put the checkout on sys.path when the package is not installed (running tests from a bare clone)."""
    import sys

    try:
        import custom_ops  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(REPO_ROOT))


def subprocess_env(**extra) -> dict:
    """Environment for a child python: the checkout and this folder importable, plus `extra`."""
    import custom_ops

    env = dict(os.environ)
    pkg_root = str(Path(custom_ops.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([pkg_root, str(Path(__file__).resolve().parent),
                                         env.get("PYTHONPATH", "")])
    env.update({k: str(v) for k, v in extra.items()})
    return env


def exact_values(rng: np.random.Generator, shape) -> np.ndarray:
    """float32 values exactly representable in float16 and bfloat16 (multiples of 1/8 in [-8, 8)), so every dtype
    sees the same numbers and results compare exactly."""
    return (rng.integers(-64, 64, size=shape) / 8.0).astype(np.float32)


class TorchSide:
    name = "torch"

    def __init__(self):
        import torch

        from torch_ref.ops import psa_mask

        self.torch = torch
        self.psa_mask = psa_mask

    def tensor(self, a: np.ndarray, dtype: str | None = None, grad: bool = False):
        t = self.torch.from_numpy(np.ascontiguousarray(a))
        if dtype is not None:
            t = t.to(getattr(self.torch, dtype))
        return t.requires_grad_(grad)

    def numpy(self, t) -> np.ndarray:
        t = t.detach()
        if t.dtype in (self.torch.float16, self.torch.bfloat16):
            t = t.float()
        return t.cpu().numpy()

    def dtype_name(self, t) -> str:
        return str(t.dtype).replace("torch.", "")

    def forward(self, x: np.ndarray, psa_type, mask, impl: str, dtype: str | None = None) -> np.ndarray:
        return self.numpy(self.psa_mask(self.tensor(x, dtype), psa_type, mask, impl=impl))

    def forward_backward(self, x, g, psa_type, mask, impl: str, dtype: str | None = None):
        xt = self.tensor(x, dtype, grad=True)
        y = self.psa_mask(xt, psa_type, mask, impl=impl)
        (gx,) = self.torch.autograd.grad(y, xt, self.tensor(g, dtype))
        return self.numpy(y), self.numpy(gx), self.dtype_name(y), self.dtype_name(gx)


class PaddleSide:
    name = "paddle"

    def __init__(self):
        import paddle

        from paddle_impl.ops import psa_mask

        self.paddle = paddle
        self.psa_mask = psa_mask

    def tensor(self, a: np.ndarray, dtype: str | None = None, grad: bool = False):
        t = self.paddle.to_tensor(np.ascontiguousarray(a))
        if dtype is not None:
            t = t.astype(dtype)
        t.stop_gradient = not grad
        return t

    def numpy(self, t) -> np.ndarray:
        if t.dtype in (self.paddle.float16, self.paddle.bfloat16):
            t = t.astype("float32")
        return t.numpy()

    def dtype_name(self, t) -> str:
        return str(t.dtype).replace("paddle.", "")

    def forward(self, x: np.ndarray, psa_type, mask, impl: str, dtype: str | None = None) -> np.ndarray:
        return self.numpy(self.psa_mask(self.tensor(x, dtype), psa_type, mask, impl=impl))

    def forward_backward(self, x, g, psa_type, mask, impl: str, dtype: str | None = None):
        xt = self.tensor(x, dtype, grad=True)
        y = self.psa_mask(xt, psa_type, mask, impl=impl)
        (gx,) = self.paddle.grad([y], [xt], [self.tensor(g, dtype)])
        return self.numpy(y), self.numpy(gx), self.dtype_name(y), self.dtype_name(gx)


_SIDES: dict = {}


def side(name: str):
    """The adapter for 'torch' or 'paddle' (one per process)."""
    if name not in _SIDES:
        _SIDES[name] = TorchSide() if name == "torch" else PaddleSide()
    return _SIDES[name]


def require_op(framework: str) -> None:
    """Load the compiled op for `framework`; pytest.skip (with the reason) only when this machine has no compiler
    and nothing is cached. A failing build fails the test."""
    import pytest

    from custom_ops import build

    try:
        if framework == "torch":
            from torch_ref.ops.psa_mask import load_op
        else:
            from paddle_impl.ops.psa_mask import load_op
        load_op()
    except build.BuildUnavailable as e:
        if build.compiler_problem(framework):
            pytest.skip(f"compiled psa_mask op unavailable for {framework}: {e.reason}")
        raise


_CASE_CACHE: dict = {}


def reference_case(case, psa_type: int, dtype=np.float64):
    """(x, y, g, gx) for a SWEEP case: random x and upstream gradient g, forward y and input gradient gx by the
    literal loops. Values are multiples of 1/8 (exact in every float dtype). Cached per process."""
    key = (tuple(case[:5]), psa_type, np.dtype(dtype).str)
    if key not in _CASE_CACHE:
        n, mh, mw, h, w = case[:5]
        rng = np.random.default_rng(abs(hash(key[:2])) % (2**32))
        x = exact_values(rng, (n, mh * mw, h, w)).astype(dtype)
        g = exact_values(rng, (n, h * w, h, w)).astype(dtype)
        _CASE_CACHE[key] = (x, psa_mask_loop(x, psa_type, mh, mw), g, psa_mask_backward_loop(g, psa_type, mh, mw))
    return _CASE_CACHE[key]


def torch_cuda(note: str = ""):
    """torch, where a CUDA device is visible and the op was built with its CUDA kernels; else skip, saying why
    (`note` is appended to the no-device reason)."""
    import pytest
    import torch

    if not torch.cuda.is_available():
        pytest.skip(f"no CUDA device visible to torch (torch {torch.__version__}, CUDA build: {torch.version.cuda})"
                    + note)
    require_op("torch")
    if not torch.ops.segtwin.psa_mask_built_with_cuda():
        pytest.skip("the torch op was built without CUDA kernels (nvcc / CUDA_HOME not found at build time)")
    return torch


def paddle_cuda(note: str = ""):
    """Paddle, where a CUDA device is visible and the op was built with its CUDA kernels; else skip, saying why."""
    import paddle
    import pytest

    if not (paddle.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0):
        pytest.skip(f"no CUDA device visible to Paddle {paddle.__version__} "
                    f"(compiled with CUDA: {paddle.is_compiled_with_cuda()})" + note)
    require_op("paddle")
    from paddle_impl.ops.psa_mask import load_op

    if not load_op().build_info.get("with_cuda"):
        pytest.skip("the Paddle op was built without CUDA kernels (nvcc not found at build time)")
    return paddle


ensure_importable()
