"""PSA mask op: compilers (g++ C++17/C++20, nvcc sm_80/sm_90), the build cache (keys, concurrent builders, cache
hits, no-compiler fallback), Paddle export to paddle.inference in a fresh process, and CPU <-> CUDA parity where a
GPU exists."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import psa_reference as ref
from custom_ops import build

HEADER_PROBE = textwrap.dedent("""
    #include "psa_mask_cpu.h"
    #include "psa_mask_cuda.h"
    // instantiate every width the glue uses
    template void segtwin::psa::psa_mask_cpu<float>(const float*, float*, const segtwin::psa::PsaGeom&, int, bool, int);
    template void segtwin::psa::psa_mask_cpu<double>(const double*, double*, const segtwin::psa::PsaGeom&, int, bool,
                                                     int);
    template void segtwin::psa::psa_mask_cpu<uint16_t>(const uint16_t*, uint16_t*, const segtwin::psa::PsaGeom&, int,
                                                       bool, int);
    int main() { return 0; }
""")


@pytest.mark.parametrize("openmp", [True, False], ids=["openmp", "no-openmp"])
@pytest.mark.parametrize("std", ["c++17", "c++20"])
def test_headers_compile_with_gxx(tmp_path, std, openmp):
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ is not on PATH")
    src = tmp_path / "probe.cc"
    src.write_text(HEADER_PROBE)
    cmd = [gxx, f"-std={std}", "-Wall", "-Wextra", "-Wpedantic", "-Werror", "-I", str(build.INCLUDE_DIR), "-c",
           str(src), "-o", str(tmp_path / "probe.o")] + (["-fopenmp"] if openmp else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


KERNEL_EMULATOR = textwrap.dedent("""
    // Runs the CUDA kernel's per-element body (gather_flat, one call per thread index) on the CPU for every
    // destination element and compares with the CPU loop, bit for bit, for both index widths the launcher uses.
    #include <cstdio>
    #include <cstring>
    #include <vector>
    #include "psa_mask_cpu.h"
    using namespace segtwin::psa;

    template <typename T, typename Index>
    int check(const PsaGeom& g, int type, bool fwd) {
      const int64_t in_n = (fwd ? g.c : g.hw) * g.n * g.h * g.w, out_n = (fwd ? g.hw : g.c) * g.n * g.h * g.w;
      std::vector<T> src(in_n), a(out_n), b(out_n);
      for (int64_t i = 0; i < in_n; ++i) src[i] = static_cast<T>(1 + i % 30000);
      std::memset(a.data(), 0xFF, out_n * sizeof(T));  // poison: every element must be overwritten
      std::memset(b.data(), 0xFF, out_n * sizeof(T));
      psa_mask_cpu(src.data(), a.data(), g, type, fwd, 2);
      for (Index idx = 0; idx < static_cast<Index>(out_n); ++idx)
        gather_flat<T, Index>(src.data(), b.data(), g, type, fwd, idx);
      if (std::memcmp(a.data(), b.data(), out_n * sizeof(T)) != 0) {
        std::printf("MISMATCH n=%lld mask=%lldx%lld map=%lldx%lld type=%d fwd=%d bytes=%zu index=%zu\\n",
                    (long long)g.n, (long long)g.mask_h, (long long)g.mask_w, (long long)g.h, (long long)g.w, type,
                    (int)fwd, sizeof(T), sizeof(Index));
        return 1;
      }
      return 0;
    }

    int main() {
      const int64_t shapes[][5] = {SHAPES};
      int bad = 0, runs = 0;
      for (const auto& s : shapes) {
        const PsaGeom g = make_geom(s[0], s[1], s[2], s[3], s[4]);
        for (int type = 0; type < 2; ++type) {
          for (int fwd = 0; fwd < 2; ++fwd) {
            bad += check<float, uint32_t>(g, type, fwd) + check<float, int64_t>(g, type, fwd);
            bad += check<double, uint32_t>(g, type, fwd) + check<uint16_t, uint32_t>(g, type, fwd);
            runs += 4;
          }
        }
      }
      std::printf("checked %d, mismatches %d\\n", runs, bad);
      return bad != 0;
    }
""")


def test_cuda_kernel_body_emulated_on_cpu(tmp_path):
    """The CUDA kernel's element body (gather_flat, including the 32-bit index split the launcher uses for all but
    huge tensors) agrees with the CPU loop on every element of the sweep's shapes, both types, both directions."""
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ is not on PATH")
    shapes = [c[:5] for c in ref.SWEEP] + [(4, 4, 4, 8, 8), (2, 59, 59, 7, 9), (1, 2, 7, 5, 3)]
    src = tmp_path / "emulate.cc"
    src.write_text(KERNEL_EMULATOR.replace("SHAPES", ", ".join("{%d, %d, %d, %d, %d}" % s for s in shapes)))
    exe = tmp_path / "emulate"
    proc = subprocess.run([gxx, "-std=c++17", "-O1", "-fopenmp", "-I", str(build.INCLUDE_DIR), str(src), "-o",
                           str(exe)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"checked {len(shapes) * 16}, mismatches 0" in run.stdout


@pytest.mark.slow  # nvcc, 2-4 s per source and standard
@pytest.mark.parametrize("source", [s.name for s in build.CUDA_SOURCES])
@pytest.mark.parametrize("std", ["c++17", "c++20"])
def test_cuda_kernels_compile_with_nvcc_for_sm80_sm90(tmp_path, std, source):
    """The framework builders pick the standard (Paddle C++17, torch maybe C++20): every .cu (psa_mask.cu,
    psa_attend.cu) must take both, with no warning (nvcc_command: -Wall -Wextra, all warnings are errors)."""
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not on PATH: the CUDA kernels cannot be compiled on this machine")
    src = next(s for s in build.CUDA_SOURCES if s.name == source)
    out = tmp_path / f"{src.stem}.o"
    proc = build.nvcc_check(out, archs=(80, 90), std=std, source=src)
    assert proc.returncode == 0, f"{' '.join(build.nvcc_command(out, std=std, source=src))}\n{proc.stdout}"
    assert "warning" not in proc.stdout.lower(), proc.stdout
    # both device images are embedded (the fat binary names the SM of each cubin it carries)
    blob = out.read_bytes()
    assert b"sm_80" in blob and b"sm_90" in blob


@pytest.mark.slow
def test_torch_cuda_glue_compiles(tmp_path):
    """The CUDA branch of the torch glue (SEGTWIN_WITH_CUDA; psa_mask_op.cpp and psa_attend_op.cpp) is only built on
    a CUDA machine; check here that it at least compiles (-fsyntax-only) against this torch's headers and the CUDA
    toolkit of nvcc. The CPU wheel lacks one CMake-generated header (c10/cuda/impl/cuda_cmake_macros.h): a one-line
    stand-in is supplied."""
    import sysconfig

    import torch.utils.cpp_extension as tce

    gxx, nvcc = shutil.which("g++"), shutil.which("nvcc")
    if gxx is None or nvcc is None:
        pytest.skip(f"needs g++ and the CUDA toolkit headers (g++: {gxx}, nvcc: {nvcc})")
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), Path(nvcc).resolve().parents[1],
             "/usr/local/cuda"]
    found = [Path(h) / "include" for h in homes if h and (Path(h) / "include" / "cuda_runtime_api.h").exists()]
    if not found:
        pytest.skip(f"no cuda_runtime_api.h under any of {homes}")
    cuda_include = found[0]
    stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    real = [Path(p) / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h" for p in tce.include_paths()]
    if not any(r.exists() for r in real):
        (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    cmd = [gxx, "-std=c++20", "-fsyntax-only", "-Wall", "-DSEGTWIN_WITH_CUDA", "-D_GLIBCXX_USE_CXX11_ABI=1",
           "-I", str(build.INCLUDE_DIR), "-I", str(tmp_path / "stub"), "-I", str(cuda_include),
           "-I", sysconfig.get_paths()["include"]]
    for inc in tce.include_paths():
        cmd += ["-I", inc]
    for glue in build.GLUE["torch"]:  # psa_mask_op.cpp and psa_attend_op.cpp
        proc = subprocess.run(cmd + [str(glue)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{glue.name}:\n{proc.stderr[-4000:]}"


# --- cache ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("framework", ["torch", "paddle"])
def test_build_cache_layout_and_key(framework, monkeypatch):
    ref.require_op(framework)
    d = build.build_dir(framework)
    assert d.parent == build.cache_root() / "psa_mask"
    meta = json.loads((d / "build.json").read_text())
    spec = build._build_spec(framework)
    assert d.name == spec["key"] and meta["hash"] == spec["hash"] and d.name.startswith(framework + "-")
    assert meta["with_cuda"] == build._framework_info(framework)[1]
    assert "-fopenmp" in meta["cxx_flags"] and "-fopenmp" in meta["ld_flags"]
    # the key moves with the compiler flags
    monkeypatch.setattr(build, "CXX_FLAGS", build.CXX_FLAGS + ["-DSEGTWIN_KEY_TEST"])
    assert build._build_spec(framework)["hash"] != spec["hash"]


def test_cached_build_is_loaded_without_rebuilding():
    """A fresh process with the same cache loads both ops and prints no build line (and needs no compiler)."""
    for fw in ("torch", "paddle"):
        ref.require_op(fw)
    code = ("from torch_ref.ops.psa_mask import load_op as a; from paddle_impl.ops.psa_mask import load_op as b; "
            "a(); b(); print('LOADED')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=ref.subprocess_env(CXX="/nonexistent/c++", CC="/nonexistent/cc"))
    assert proc.returncode == 0 and "LOADED" in proc.stdout, proc.stderr[-3000:]
    assert "segtwin: building" not in proc.stderr


_FAKE_BUILDER = textwrap.dedent(r"""
    import sys
    import custom_ops.build as b
    b._framework_info = lambda fw: ("0.0+fake", False)
    b.compiler_problem = lambda fw: None
    b._TORCH_CHILD = r'''
    import json, os, sys, time
    a = json.loads(sys.argv[1])
    time.sleep(1.0)
    open(os.path.join(a["dir"], a["name"] + ".so"), "w").write("not a library")
    with open(os.environ["SEGTWIN_TEST_COUNT"], "a") as f:
        f.write("built\n")
    '''
    print("DIR", b.build_dir("torch"))
""")


def test_concurrent_builders_build_once(tmp_path):
    """Two processes asking for the same uncached build: one builds (lock + temp dir + atomic rename), the other
    waits and reuses it. The framework builder is replaced by a stub that takes a second."""
    count = tmp_path / "count.txt"
    env = ref.subprocess_env(SEGTWIN_CACHE=tmp_path / "cache", SEGTWIN_TEST_COUNT=count)
    procs = [subprocess.Popen([sys.executable, "-c", _FAKE_BUILDER], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    dirs = {line.split(" ", 1)[1] for out, _ in outs for line in out.splitlines() if line.startswith("DIR ")}
    assert len(dirs) == 1
    final = Path(dirs.pop())
    assert count.read_text().count("built") == 1
    assert sum(err.count("segtwin: building psa_mask for torch") for _, err in outs) == 1
    assert (final / "build.json").exists() and (final / "segtwin_psa_mask_torch.so").exists()
    assert not [p for p in final.parent.iterdir() if ".tmp-" in p.name], "a temporary build dir was left behind"


_NO_COMPILER_CHILD = textwrap.dedent(r"""
    import warnings
    import numpy as np
    import psa_reference as ref
    import torch, paddle
    from torch_ref.ops import psa_mask as tpm
    from paddle_impl.ops import psa_mask as ppm

    x, y_ref, _, _ = ref.reference_case(ref.SWEEP[1], 0)
    for name, f, t in (("torch", tpm, torch.from_numpy(x)), ("paddle", ppm, paddle.to_tensor(x))):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                np.testing.assert_array_equal(np.asarray(f(t, 0, 4).numpy()), y_ref)  # impl="auto"
        msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert len(msgs) == 1 and "pure-tensor" in msgs[0] and "no C++ compiler" in msgs[0], msgs
        try:
            f(t, 0, 4, impl="cpp")
        except RuntimeError as e:
            assert "impl='cpp'" in str(e) and "no C++ compiler" in str(e), str(e)
        else:
            raise AssertionError("impl='cpp' did not raise without a compiler")
        print("OK", name, msgs[0])
""")


def test_no_compiler_falls_back_with_one_warning(tmp_path):
    proc = subprocess.run([sys.executable, "-c", _NO_COMPILER_CHILD], capture_output=True, text=True, timeout=300,
                          env=ref.subprocess_env(SEGTWIN_CACHE=tmp_path / "empty-cache", CXX="/nonexistent/c++"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "OK torch" in proc.stdout and "OK paddle" in proc.stdout
    assert "segtwin: building" not in proc.stderr


# --- Paddle export -------------------------------------------------------------------------------------------

_INFER_CHILD = textwrap.dedent(r"""
    import sys
    import numpy as np
    import paddle.inference as pi
    from paddle_impl.ops.psa_mask import load_op

    prefix = sys.argv[1]
    load_op()  # a fresh process must register the custom op before it loads the program
    cfg = pi.Config(prefix + ".json", prefix + ".pdiparams")
    cfg.disable_mkldnn()
    cfg.disable_gpu()
    pred = pi.create_predictor(cfg)
    x = np.load(prefix + "_x.npy")
    h = pred.get_input_handle(pred.get_input_names()[0])
    h.reshape(list(x.shape))
    h.copy_from_cpu(x)
    pred.run()
    np.save(prefix + "_out.npy", pred.get_output_handle(pred.get_output_names()[0]).copy_to_cpu())
""")


@pytest.mark.parametrize("full_graph", [False, True], ids=["sot", "ast"])
def test_paddle_export_runs_in_inference_fresh_process(tmp_path, full_graph):
    ref.require_op("paddle")
    import paddle

    from paddle_impl.ops import psa_mask

    class PSALike(paddle.nn.Layer):
        """Both branches of PSANet's bi-directional PSA on a tiny map: conv -> psa_mask -> softmax -> bmm."""

        def __init__(self):
            super().__init__()
            self.attention = paddle.nn.Conv2D(4, 12, 1)
            self.attention_p = paddle.nn.Conv2D(4, 12, 1)

        def forward(self, x):
            n, c, h, w = x.shape
            col = paddle.nn.functional.softmax(psa_mask(self.attention(x), "collect", (3, 4)), axis=1)
            dis = paddle.nn.functional.softmax(psa_mask(self.attention_p(x), "distribute", (3, 4)), axis=1)
            feats = x.reshape([-1, c, h * w])
            return paddle.concat([paddle.bmm(feats, col.reshape([-1, h * w, h * w])),
                                  paddle.bmm(feats, dis.reshape([-1, h * w, h * w]))], axis=1)

    paddle.seed(0)
    model = PSALike()
    model.eval()
    x = paddle.randn([2, 4, 5, 6])
    expected = model(x).numpy()
    static = paddle.jit.to_static(model, input_spec=[paddle.static.InputSpec([None, 4, 5, 6], "float32", "x")],
                                  full_graph=full_graph)
    np.testing.assert_allclose(static(x).numpy(), expected, rtol=1e-6, atol=1e-6)
    prefix = str(tmp_path / "psa_like")
    paddle.jit.save(static, prefix)
    np.save(prefix + "_x.npy", x.numpy())
    proc = subprocess.run([sys.executable, "-c", _INFER_CHILD, prefix], capture_output=True, text=True, timeout=300,
                          env=ref.subprocess_env())
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = np.load(prefix + "_out.npy")
    assert out.shape == expected.shape
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)


# --- CUDA parity (runs where a GPU exists) -------------------------------------------------------------------

CUDA_CASES = ref.SWEEP + [(2, 9, 9, 40, 40, "5.1M outputs: more than one grid-stride step")]


def _torch_cuda():
    return ref.torch_cuda()


def _paddle_cuda():
    return ref.paddle_cuda()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_torch_cuda_matches_cpu(dtype):
    torch = _torch_cuda()
    from torch_ref.ops import psa_mask

    dt = getattr(torch, dtype)
    stream = torch.cuda.Stream()  # the kernels must run on the caller's current stream
    for case in CUDA_CASES:
        n, mh, mw, h, w = case[:5]
        for t in (0, 1):
            rng = np.random.default_rng(1)
            x = torch.from_numpy(ref.exact_values(rng, (n, mh * mw, h, w))).to(dt)
            g = torch.from_numpy(ref.exact_values(rng, (n, h * w, h, w))).to(dt)
            xc = x.clone().requires_grad_(True)
            y_cpu = psa_mask(xc, t, (mh, mw), impl="cpp")
            (gx_cpu,) = torch.autograd.grad(y_cpu, xc, g)
            poison = torch.full((4 * y_cpu.numel() + 1024,), float("nan"), device="cuda", dtype=dt)
            del poison  # the caching allocator hands these NaN blocks to the op next
            with torch.cuda.stream(stream):
                xg = x.cuda().requires_grad_(True)
                y_gpu = psa_mask(xg, t, (mh, mw), impl="cpp")
                (gx_gpu,) = torch.autograd.grad(y_gpu, xg, g.cuda())
            stream.synchronize()
            assert torch.equal(y_gpu.cpu(), y_cpu.detach()), (case, t)
            assert torch.equal(gx_gpu.cpu(), gx_cpu), (case, t)


@pytest.mark.gpu
def test_torch_cuda_gradcheck_and_opcheck():
    torch = _torch_cuda()
    from torch_ref.ops import psa_mask

    x = torch.randn(2, 12, 3, 5, dtype=torch.float64, device="cuda", requires_grad=True)
    for t in (0, 1):
        assert torch.autograd.gradcheck(lambda a: psa_mask(a, t, (3, 4), impl="cpp"), (x,))
        torch.library.opcheck(torch.ops.segtwin.psa_mask.default, (x, t, 3, 4))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_paddle_cuda_matches_cpu(dtype):
    paddle = _paddle_cuda()
    from paddle_impl.ops import psa_mask

    for case in CUDA_CASES:
        n, mh, mw, h, w = case[:5]
        for t in (0, 1):
            rng = np.random.default_rng(2)
            x = ref.exact_values(rng, (n, mh * mw, h, w))
            g = ref.exact_values(rng, (n, h * w, h, w))
            results = []
            for place in (paddle.CPUPlace(), paddle.CUDAPlace(0)):
                if isinstance(place, paddle.CUDAPlace):
                    poison = paddle.full([4 * n * h * w * h * w + 1024], float("nan"), dtype=dtype).cuda()
                    del poison
                xt = paddle.to_tensor(x, place=place).astype(dtype)
                xt.stop_gradient = False
                y = psa_mask(xt, t, (mh, mw), impl="cpp")
                (gx,) = paddle.grad([y], [xt], [paddle.to_tensor(g, place=place).astype(dtype)])
                results.append((y.astype("float32").cpu().numpy(), gx.astype("float32").cpu().numpy()))
            np.testing.assert_array_equal(results[1][0], results[0][0], err_msg=f"{case} {t}")
            np.testing.assert_array_equal(results[1][1], results[0][1], err_msg=f"{case} {t}")
