// segtwin fused PSA aggregation: PyTorch glue. Operators segtwin::psa_attend and segtwin::psa_attend_backward
// (CPU kernels: the driver of psa_attend_cpu.h with at::mm as its GEMM; when built with SEGTWIN_WITH_CUDA, CUDA
// kernels: the launchers of ../cuda/psa_attend.cu on the current stream, with at::mm_out on CUDA tensors as their
// GEMM and a workspace from the caching allocator). Autograd and fake kernels are registered from Python
// (torch_ref/ops/psa_mask.py, with those of psa_mask).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

#include "psa_attend_cpu.h"

#ifdef SEGTWIN_WITH_CUDA
#include <c10/cuda/CUDAStream.h>

#include "psa_attend_cuda.h"
#endif

namespace {

namespace psa = segtwin::psa;

// `cuda`: the kernel being called is the CUDA one (both tensors on one CUDA device), else the CPU one.
psa::AttendGeom check_attend(const char* op, const at::Tensor& feat, const at::Tensor& logits, int64_t psa_type,
                             int64_t mask_h, int64_t mask_w, bool cuda = false) {
  TORCH_CHECK(feat.dim() == 4 && logits.dim() == 4, op, ": expected 4-D feat (N, C, H, W) and logits (N, ",
              "mask_h*mask_w, H, W), got shapes ", feat.sizes(), " and ", logits.sizes());
  const auto st = feat.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble, op, ": expected float32 or float64, got ", st);
  TORCH_CHECK(logits.scalar_type() == st, op, ": feat and logits must have the same dtype, got ", st, " and ",
              logits.scalar_type());
  if (cuda) {
    TORCH_CHECK(feat.device().is_cuda() && logits.device() == feat.device(), op,
                ": the CUDA kernel needs feat and logits on one CUDA device, got ", feat.device(), " and ",
                logits.device());
  } else {
    TORCH_CHECK(feat.device().is_cpu() && logits.device().is_cpu(), op, ": the CPU kernel needs CPU tensors, got ",
                feat.device(), " and ", logits.device());
  }
  TORCH_CHECK(psa_type == 0 || psa_type == 1, op, ": psa_type must be 0 (collect) or 1 (distribute), got ",
              psa_type);
  TORCH_CHECK(psa::mask_side_ok(mask_h) && psa::mask_side_ok(mask_w), op, ": mask size must be in [1, ",
              psa::kMaxMaskSide, "] per side, got (", mask_h, ", ", mask_w, ")");
  const int64_t n = feat.size(0), c = feat.size(1), h = feat.size(2), w = feat.size(3);
  TORCH_CHECK(logits.size(0) == n && logits.size(2) == h && logits.size(3) == w, op,
              ": feat and logits must share N, H, W, got shapes ", feat.sizes(), " and ", logits.sizes());
  TORCH_CHECK(psa::is_product(logits.size(1), mask_h, mask_w), op, ": logits have ", logits.size(1),
              " channels but the mask (", mask_h, ", ", mask_w, ") needs mask_h*mask_w = ", mask_h * mask_w);
  return psa::make_attend_geom(n, c, h, w, mask_h, mask_w);
}

// The operands of a backward call, checked and made contiguous, and its two results allocated. `trivial`: the
// results are already final (an empty batch or map; no feature channels, where nothing flows back to the logits and
// grad_x is empty), no kernel runs.
struct BackwardCall {
  psa::AttendGeom g;
  at::Tensor x, l, gy, y, gx, gl;
  bool trivial;
};

BackwardCall prepare_backward(const at::Tensor& grad, const at::Tensor& feat, const at::Tensor& logits,
                              const at::Tensor& out, int64_t psa_type, int64_t mask_h, int64_t mask_w, bool cuda) {
  const char* op = "segtwin::psa_attend_backward";
  BackwardCall b{check_attend(op, feat, logits, psa_type, mask_h, mask_w, cuda)};
  TORCH_CHECK(grad.sizes() == feat.sizes() && out.sizes() == feat.sizes(), op,
              ": grad and out must have feat's shape ", feat.sizes(), ", got ", grad.sizes(), " and ", out.sizes());
  TORCH_CHECK(grad.scalar_type() == feat.scalar_type() && out.scalar_type() == feat.scalar_type(), op,
              ": grad and out must have feat's dtype");
  TORCH_CHECK(grad.device() == feat.device() && out.device() == feat.device(), op,
              ": grad and out must be on feat's device ", feat.device(), ", got ", grad.device(), " and ",
              out.device());
  b.x = feat.contiguous();
  b.l = logits.contiguous();
  b.gy = grad.contiguous();
  b.y = out.contiguous();
  b.gx = at::empty(b.x.sizes(), b.x.options().memory_format(at::MemoryFormat::Contiguous));
  b.gl = at::empty(b.l.sizes(), b.l.options().memory_format(at::MemoryFormat::Contiguous));
  b.trivial = b.g.n == 0 || b.g.hw == 0 || b.g.c == 0;
  if (b.g.c == 0) b.gl.zero_();
  return b;
}

template <typename T>
psa::Gemm<T> torch_gemm(const at::TensorOptions& opts) {
  return [opts](bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b,
                int64_t ldb, T* c) {
    at::Tensor ta = trans_a ? at::from_blob(const_cast<T*>(a), {k, m}, {lda, 1}, opts).t()
                            : at::from_blob(const_cast<T*>(a), {m, k}, {lda, 1}, opts);
    at::Tensor tb = trans_b ? at::from_blob(const_cast<T*>(b), {n, k}, {ldb, 1}, opts).t()
                            : at::from_blob(const_cast<T*>(b), {k, n}, {ldb, 1}, opts);
    at::Tensor tc = at::from_blob(c, {m, n}, opts);
    at::mm_out(tc, ta, tb);
  };
}

at::Tensor psa_attend_cpu(const at::Tensor& feat, const at::Tensor& logits, int64_t psa_type, int64_t mask_h,
                          int64_t mask_w) {
  const psa::AttendGeom g = check_attend("segtwin::psa_attend", feat, logits, psa_type, mask_h, mask_w);
  const at::Tensor x = feat.contiguous(), l = logits.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "psa_attend", [&] {
    psa::psa_attend_forward_cpu<scalar_t>(x.const_data_ptr<scalar_t>(), l.const_data_ptr<scalar_t>(),
                                          out.mutable_data_ptr<scalar_t>(), g, static_cast<int>(psa_type),
                                          torch_gemm<scalar_t>(x.options()), at::get_num_threads());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> psa_attend_backward_cpu(const at::Tensor& grad, const at::Tensor& feat,
                                                           const at::Tensor& logits, const at::Tensor& out,
                                                           int64_t psa_type, int64_t mask_h, int64_t mask_w) {
  BackwardCall b = prepare_backward(grad, feat, logits, out, psa_type, mask_h, mask_w, false);
  if (b.trivial) return {b.gx, b.gl};
  AT_DISPATCH_FLOATING_TYPES(b.x.scalar_type(), "psa_attend_backward", [&] {
    psa::psa_attend_backward_cpu<scalar_t>(b.gy.const_data_ptr<scalar_t>(), b.x.const_data_ptr<scalar_t>(),
                                           b.l.const_data_ptr<scalar_t>(), b.y.const_data_ptr<scalar_t>(),
                                           b.gx.mutable_data_ptr<scalar_t>(), b.gl.mutable_data_ptr<scalar_t>(),
                                           b.g, static_cast<int>(psa_type), torch_gemm<scalar_t>(b.x.options()),
                                           at::get_num_threads());
  });
  return {b.gx, b.gl};
}

#ifdef SEGTWIN_WITH_CUDA
// Scratch device memory of the launchers, from the caching allocator on the current stream: freed when the caller
// returns, it is reused only by work enqueued after the launchers' on that stream.
at::Tensor cuda_workspace(const at::Tensor& like, const psa::AttendGeom& g, bool backward) {
  const size_t bytes = psa::psa_attend_cuda_workspace_bytes(g, static_cast<int>(like.element_size()), backward);
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

cudaStream_t current_stream(int device) {
  return c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device)).stream();
}

at::Tensor psa_attend_cuda(const at::Tensor& feat, const at::Tensor& logits, int64_t psa_type, int64_t mask_h,
                           int64_t mask_w) {
  const psa::AttendGeom g = check_attend("segtwin::psa_attend", feat, logits, psa_type, mask_h, mask_w, true);
  const at::Tensor x = feat.contiguous(), l = logits.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const int device = static_cast<int>(x.get_device());
  at::Tensor ws = cuda_workspace(x, g, false);
  const char* err = nullptr;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "psa_attend_cuda", [&] {
    err = psa::psa_attend_forward_cuda(x.const_data_ptr<scalar_t>(), l.const_data_ptr<scalar_t>(),
                                       out.mutable_data_ptr<scalar_t>(), g, static_cast<int>(psa_type),
                                       torch_gemm<scalar_t>(x.options()), ws.mutable_data_ptr(),
                                       static_cast<size_t>(ws.numel()), current_stream(device), device);
  });
  TORCH_CHECK(err == nullptr, "segtwin::psa_attend: CUDA launch failed: ", err);
  return out;
}

std::tuple<at::Tensor, at::Tensor> psa_attend_backward_cuda(const at::Tensor& grad, const at::Tensor& feat,
                                                            const at::Tensor& logits, const at::Tensor& out,
                                                            int64_t psa_type, int64_t mask_h, int64_t mask_w) {
  BackwardCall b = prepare_backward(grad, feat, logits, out, psa_type, mask_h, mask_w, true);
  if (b.trivial) return {b.gx, b.gl};
  const int device = static_cast<int>(b.x.get_device());
  at::Tensor ws = cuda_workspace(b.x, b.g, true);
  const char* err = nullptr;
  AT_DISPATCH_FLOATING_TYPES(b.x.scalar_type(), "psa_attend_backward_cuda", [&] {
    err = psa::psa_attend_backward_cuda(b.gy.const_data_ptr<scalar_t>(), b.x.const_data_ptr<scalar_t>(),
                                        b.l.const_data_ptr<scalar_t>(), b.y.const_data_ptr<scalar_t>(),
                                        b.gx.mutable_data_ptr<scalar_t>(), b.gl.mutable_data_ptr<scalar_t>(), b.g,
                                        static_cast<int>(psa_type), torch_gemm<scalar_t>(b.x.options()),
                                        ws.mutable_data_ptr(), static_cast<size_t>(ws.numel()),
                                        current_stream(device), device);
  });
  TORCH_CHECK(err == nullptr, "segtwin::psa_attend_backward: CUDA launch failed: ", err);
  return {b.gx, b.gl};
}
#endif

}  // namespace

TORCH_LIBRARY_FRAGMENT(segtwin, m) {
  m.def("psa_attend(Tensor feat, Tensor logits, int psa_type, int mask_h, int mask_w) -> Tensor");
  m.def("psa_attend_backward(Tensor grad, Tensor feat, Tensor logits, Tensor out, int psa_type, int mask_h, "
        "int mask_w) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(segtwin, CPU, m) {
  m.impl("psa_attend", &psa_attend_cpu);
  m.impl("psa_attend_backward", &psa_attend_backward_cpu);
}

#ifdef SEGTWIN_WITH_CUDA
TORCH_LIBRARY_IMPL(segtwin, CUDA, m) {
  m.impl("psa_attend", &psa_attend_cuda);
  m.impl("psa_attend_backward", &psa_attend_backward_cuda);
}
#endif
