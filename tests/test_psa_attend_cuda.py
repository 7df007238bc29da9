"""Fused PSA aggregation on CUDA (custom_ops/cuda/psa_attend.cu, psa_attend_cuda_driver.h).

Without a GPU (every machine this project's tests have run on so far): the .cu compiles with nvcc for sm_80/sm_90
under C++17 and C++20 with no warning, the build includes it whenever it includes the CUDA kernels, and the CUDA
path's band driver -- the kernels' element bodies, bands, workspace layout and GEMM calls -- runs on the CPU with a
serial executor and a naive GEMM against the CPU driver, with poisoned outputs and workspace.

With a GPU (`@pytest.mark.gpu`, skipped elsewhere with the reason): CUDA fused vs CPU fused vs the reference path in
float64 (<= 1e-12, forward and both gradients, both psa types, masks smaller and larger than the map, many bands),
float32 within the CPU tests' tolerance, for torch and Paddle."""
from __future__ import annotations

import shutil
import subprocess
import textwrap
import warnings

import numpy as np
import pytest

import psa_reference as ref
from custom_ops import build

ATTEND_CU = build.ROOT / "cuda" / "psa_attend.cu"

# (N, C, H, W, mask_h, mask_w): odd / even / non-square masks, smaller and larger than the map's full window
CASES = [
    (2, 3, 4, 5, 3, 3),     # odd, smaller than the full window, N=2
    (1, 2, 5, 3, 4, 2),     # even, non-square
    (2, 4, 3, 4, 7, 9),     # larger than the full window (5, 7)
    (1, 3, 6, 6, 11, 11),   # exactly the full window
    (1, 2, 9, 7, 3, 5),     # H != W, most pairs outside the window
    (1, 3, 5, 37, 5, 7),    # wide rows
    (2, 2, 4, 20, 9, 41),   # wide mask, larger than the full window (7, 39)
]


def _case_id(c):
    return "n{}-c{}-{}x{}-m{}x{}".format(*c)


# --- without a GPU -------------------------------------------------------------------------------------------

def test_build_includes_psa_attend_cu_with_cuda(monkeypatch):
    """psa_attend.cu is one of the CUDA sources, compiled into the library exactly when the CUDA kernels are."""
    assert ATTEND_CU in build.CUDA_SOURCES and ATTEND_CU.exists()
    for header in ("psa_attend_cuda.h", "psa_attend_cuda_driver.h"):
        assert build.INCLUDE_DIR / header in build.HEADERS  # part of the build key
    for fw in ("torch", "paddle"):
        monkeypatch.setattr(build, "_framework_info", lambda f: ("0.0+fake", True))
        spec = build._build_spec(fw)
        assert str(ATTEND_CU) in spec["sources"] and "-DSEGTWIN_WITH_CUDA" in spec["cuda_flags"]
        monkeypatch.setattr(build, "_framework_info", lambda f: ("0.0+fake", False))
        assert not any(s.endswith(".cu") for s in build._build_spec(fw)["sources"])


@pytest.mark.slow  # nvcc (~5 s)
@pytest.mark.parametrize("std", ["c++17"])  # C++20 of each .cu: tests/test_psa_mask_build.py (the suite's budget)
def test_nvcc_check_covers_psa_attend_cu(tmp_path, std):
    """The compile check (python -m custom_ops.build --nvcc-check, nvcc_check_all) compiles psa_attend.cu for sm_80
    and sm_90 with no warning; both device images are embedded. Compiled only: nothing runs on a GPU here."""
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not on PATH: the CUDA kernels cannot be compiled on this machine")
    results = build.nvcc_check_all(tmp_path, archs=(80, 90), std=std)
    assert set(results) == {s.name for s in build.CUDA_SOURCES} and "psa_attend.cu" in results
    proc = results["psa_attend.cu"]
    out = tmp_path / "psa_attend.o"
    assert proc.returncode == 0, f"{' '.join(build.nvcc_command(out, std=std, source=ATTEND_CU))}\n{proc.stdout}"
    assert "warning" not in proc.stdout.lower(), proc.stdout
    blob = out.read_bytes()
    assert b"sm_80" in blob and b"sm_90" in blob


DRIVER_EMULATOR = textwrap.dedent(r"""
    // The CUDA path's band driver (psa_attend_cuda_driver.h: element bodies, bands, workspace layout, GEMM calls) run
    // on the CPU with a serial executor (one call per thread index) and a naive GEMM, against the CPU driver.
    #include <cmath>
    #include <cstdio>
    #include <cstdlib>
    #include <limits>
    #include <vector>

    #include "psa_attend_cpu.h"
    #include "psa_attend_cuda_driver.h"

    using namespace segtwin::psa;

    struct SerialExec {
      template <typename F>
      const char* each(int64_t total, const F& f) {
        for (int64_t i = 0; i < total; ++i) f(i);
        return nullptr;
      }
    };

    template <typename T>
    void naive_gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b,
                    int64_t ldb, T* c) {
      for (int64_t i = 0; i < m; ++i) {
        for (int64_t j = 0; j < n; ++j) {
          T s = T(0);
          for (int64_t l = 0; l < k; ++l) {
            s += (ta ? a[l * lda + i] : a[i * lda + l]) * (tb ? b[j * ldb + l] : b[l * ldb + j]);
          }
          c[i * n + j] = s;
        }
      }
    }

    uint64_t state = 88172645463325252ull;
    double uniform() {  // xorshift64, in [-1, 1)
      state ^= state << 13;
      state ^= state >> 7;
      state ^= state << 17;
      return static_cast<double>(state >> 11) / 4503599627370496.0 - 1.0;
    }

    template <typename T>
    double max_diff(const std::vector<T>& a, const std::vector<T>& b) {  // infinite when either holds a NaN
      double d = 0;
      for (size_t i = 0; i < a.size(); ++i) {
        const double x = static_cast<double>(a[i]), y = static_cast<double>(b[i]);
        if (std::isnan(x) || std::isnan(y)) return INFINITY;
        d = std::fmax(d, std::fabs(x - y));
      }
      return d;
    }

    template <typename T>
    int check(const int64_t* s, int type, double tol, const char* budget) {
      setenv("SEGTWIN_PSA_ATTEND_TILE_BYTES", budget, 1);
      const AttendGeom g = make_attend_geom(s[0], s[1], s[2], s[3], s[4], s[5]);
      const int64_t nx = g.n * g.c * g.hw, nl = g.n * g.cells * g.hw;
      std::vector<T> x(nx), l(nl), gy(nx);
      for (auto& v : x) v = static_cast<T>(uniform());
      for (auto& v : l) v = static_cast<T>(3 * uniform());
      for (auto& v : gy) v = static_cast<T>(uniform());
      const T nan = std::numeric_limits<T>::quiet_NaN();  // poison: every element must be written
      std::vector<T> out_c(nx, nan), out_d(nx, nan), gx_c(nx, nan), gx_d(nx, nan), gl_c(nl, nan), gl_d(nl, nan);
      const Gemm<T> gemm = naive_gemm<T>;
      psa_attend_forward_cpu<T>(x.data(), l.data(), out_c.data(), g, type, gemm, 1);
      psa_attend_backward_cpu<T>(gy.data(), x.data(), l.data(), out_c.data(), gx_c.data(), gl_c.data(), g, type,
                                 gemm, 1);
      SerialExec ex;
      const size_t fb = static_cast<size_t>(attend_workspace(g, sizeof(T), false).elems) * sizeof(T);
      const size_t bb = static_cast<size_t>(attend_workspace(g, sizeof(T), true).elems) * sizeof(T);
      std::vector<T> ws(bb / sizeof(T), nan);  // poisoned: scratch values must be written before they are read
      const char* err = attend_forward_bands<T>(ex, x.data(), l.data(), out_d.data(), g, type, gemm, ws.data(), fb);
      if (err == nullptr) {
        std::vector<T>(ws.size(), nan).swap(ws);
        err = attend_backward_bands<T>(ex, gy.data(), x.data(), l.data(), out_d.data(), gx_d.data(), gl_d.data(), g,
                                       type, gemm, ws.data(), bb);
      }
      // a workspace one byte short is refused before anything runs
      const char* small = attend_forward_bands<T>(ex, x.data(), l.data(), out_d.data(), g, type, gemm, ws.data(),
                                                  fb - 1);
      const double d0 = max_diff(out_c, out_d), d1 = max_diff(gx_c, gx_d), d2 = max_diff(gl_c, gl_d);
      const bool ok = err == nullptr && small != nullptr && d0 <= tol && d1 <= tol && d2 <= tol;
      if (!ok) {
        std::printf("MISMATCH shape=(%lld,%lld,%lld,%lld,%lld,%lld) type=%d bytes=%zu budget=%s err=%s small=%s "
                    "out=%.3g gx=%.3g gl=%.3g\n", (long long)s[0], (long long)s[1], (long long)s[2],
                    (long long)s[3], (long long)s[4], (long long)s[5], type, sizeof(T), budget, err ? err : "-",
                    small ? small : "-", d0, d1, d2);
      }
      return ok ? 0 : 1;
    }

    int main() {
      const int64_t shapes[][6] = {SHAPES};
      const char* budgets[] = {"1", "2000", "67108864"};  // one row per band, a few rows, the default (one band)
      int bad = 0, runs = 0;
      for (const auto& s : shapes) {
        for (int type = 0; type < 2; ++type) {
          for (const char* b : budgets) {
            bad += check<double>(s, type, 1e-12, b) + check<float>(s, type, 2e-5, b);
            runs += 2;
          }
        }
      }
      std::printf("checked %d, mismatches %d\n", runs, bad);
      return bad != 0;
    }
""")


def test_cuda_driver_emulated_on_cpu(tmp_path):
    """The CUDA path minus the hardware: its driver and element bodies (exp instead of exp_nonpos, one thread per
    element, the device band sizes) equal the CPU driver to 1e-12 in float64 (2e-5 in float32) on every case, both
    types, 1 row per band / a few rows / one band; every output, gradient and scratch element is written before use
    (NaN poison), and a short workspace is refused. Also compiles the headers with -Wall -Wextra -Werror."""
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ is not on PATH")
    shapes = CASES + [(1, 3, 9, 19, 5, 7), (2, 2, 7, 5, 13, 9), (1, 1, 1, 1, 1, 1), (1, 2, 1, 6, 3, 3)]
    src = tmp_path / "emulate.cc"
    src.write_text(DRIVER_EMULATOR.replace("SHAPES", ", ".join("{%d, %d, %d, %d, %d, %d}" % s for s in shapes)))
    exe = tmp_path / "emulate"
    proc = subprocess.run([gxx, "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", "-fopenmp", "-I",
                           str(build.INCLUDE_DIR), str(src), "-o", str(exe)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert f"checked {len(shapes) * 12}, mismatches 0" in run.stdout


# --- with a GPU ----------------------------------------------------------------------------------------------

def _torch_cuda():
    return ref.torch_cuda(": the psa_attend CUDA kernels were compiled (nvcc) but cannot run here")


def _paddle_cuda():
    return ref.paddle_cuda(": the psa_attend CUDA kernels were compiled (nvcc) but cannot run here")


def _data(case, seed=0):
    n, c, h, w, mh, mw = case
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, c, h, w)), 3.0 * rng.standard_normal((n, mh * mw, h, w)),
            rng.standard_normal((n, c, h, w)))


def _run(framework, device, impl, f, lg, g, psa_type, mask, dtype="float64"):
    """(out, grad_feat, grad_logits) as float64 numpy; device 'cpu' or 'cuda'. A fused call must not fall back."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=r"psa_attend: using the reference path", category=RuntimeWarning)
        if framework == "torch":
            import torch

            from torch_ref.ops.psa_attend import psa_attend

            ft = torch.tensor(f.astype(dtype), device=device, requires_grad=True)
            lt = torch.tensor(lg.astype(dtype), device=device, requires_grad=True)
            stream = torch.cuda.Stream() if device == "cuda" else None
            if stream is not None:  # the kernels and the GEMMs must run on the caller's current stream
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    out = psa_attend(ft, lt, psa_type, mask, impl=impl)
                    gf, gl = torch.autograd.grad(out, (ft, lt), torch.tensor(g.astype(dtype), device=device))
                stream.synchronize()
            else:
                out = psa_attend(ft, lt, psa_type, mask, impl=impl)
                gf, gl = torch.autograd.grad(out, (ft, lt), torch.tensor(g.astype(dtype)))
            assert out.device.type == device
            return tuple(a.detach().cpu().numpy().astype(np.float64) for a in (out, gf, gl))
        import paddle

        from paddle_impl.ops.psa_attend import psa_attend

        place = paddle.CUDAPlace(0) if device == "cuda" else paddle.CPUPlace()
        fp = paddle.to_tensor(f.astype(dtype), place=place, stop_gradient=False)
        lp = paddle.to_tensor(lg.astype(dtype), place=place, stop_gradient=False)
        out = psa_attend(fp, lp, psa_type, mask, impl=impl)
        gf, gl = paddle.grad([out], [fp, lp], [paddle.to_tensor(g.astype(dtype), place=place)])
        return tuple(a.cpu().numpy().astype(np.float64) for a in (out, gf, gl))


def _require(framework):
    return _torch_cuda() if framework == "torch" else _paddle_cuda()


def _poison(framework, elements):
    """Leave NaN blocks in the framework's caching allocator, so that an unwritten element shows."""
    if framework == "torch":
        import torch

        block = torch.full((elements,), float("nan"), device="cuda", dtype=torch.float64)
    else:
        import paddle

        block = paddle.full([elements], float("nan"), dtype="float64").cuda()
    del block  # freed: the allocator hands these blocks to the op next


@pytest.mark.gpu
@pytest.mark.parametrize("psa_type", [0, 1])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("framework", ["torch", "paddle"])
def test_cuda_fused_equals_cpu_fused_and_reference_float64(framework, case, psa_type):
    _require(framework)
    f, lg, g = _data(case)
    mask = case[4:]
    _poison(framework, 4 * (f.size + lg.size) + 4096)
    gpu = _run(framework, "cuda", "fused", f, lg, g, psa_type, mask)
    cpu = _run(framework, "cpu", "fused", f, lg, g, psa_type, mask)
    expected = _run(framework, "cpu", "reference", f, lg, g, psa_type, mask)
    for name, a, b, c in zip(("out", "grad_feat", "grad_logits"), gpu, cpu, expected):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12, err_msg=f"{name}: CUDA vs CPU fused")
        np.testing.assert_allclose(a, c, rtol=0, atol=1e-12, err_msg=f"{name}: CUDA vs reference")


@pytest.mark.gpu
@pytest.mark.parametrize("tile_bytes", ["1", "2000"])
@pytest.mark.parametrize("framework", ["torch", "paddle"])
def test_cuda_fused_many_bands(framework, tile_bytes, monkeypatch):
    """$SEGTWIN_PSA_ATTEND_TILE_BYTES also bounds the device tile: 1 byte gives one row per band."""
    _require(framework)
    monkeypatch.setenv("SEGTWIN_PSA_ATTEND_TILE_BYTES", tile_bytes)
    for case in [(1, 3, 9, 19, 5, 7), (2, 2, 7, 5, 13, 9)]:
        f, lg, g = _data(case, seed=11)
        for psa_type in (0, 1):
            gpu = _run(framework, "cuda", "fused", f, lg, g, psa_type, case[4:])
            expected = _run(framework, "cpu", "reference", f, lg, g, psa_type, case[4:])
            for name, a, b in zip(("out", "grad_feat", "grad_logits"), gpu, expected):
                np.testing.assert_allclose(a, b, rtol=0, atol=1e-12, err_msg=f"{case} {psa_type} {name}")


@pytest.mark.gpu
@pytest.mark.parametrize("framework", ["torch", "paddle"])
def test_cuda_fused_float32(framework):
    _require(framework)
    case = (2, 4, 7, 9, 5, 7)
    f, lg, g = _data(case, seed=5)
    for psa_type in (0, 1):
        gpu = _run(framework, "cuda", "fused", f, lg, g, psa_type, case[4:], dtype="float32")
        expected = _run(framework, "cpu", "reference", f, lg, g, psa_type, case[4:])
        for name, a, b in zip(("out", "grad_feat", "grad_logits"), gpu, expected):
            np.testing.assert_allclose(a, b, rtol=0, atol=2e-5, err_msg=f"{psa_type} {name}")


@pytest.mark.gpu
def test_torch_cuda_gradcheck():
    torch = _torch_cuda()
    from torch_ref.ops.psa_attend import psa_attend

    for psa_type in (0, 1):
        f = torch.randn(2, 2, 3, 4, dtype=torch.float64, device="cuda", requires_grad=True)
        lg = torch.randn(2, 15, 3, 4, dtype=torch.float64, device="cuda", requires_grad=True)
        assert torch.autograd.gradcheck(lambda a, b: psa_attend(a, b, psa_type, (3, 5)), (f, lg))
