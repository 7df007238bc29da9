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
  const psa::AttendGeom g = check_attend("segtwin::psa_attend_backward", feat, logits, psa_type, mask_h, mask_w);
  TORCH_CHECK(grad.sizes() == feat.sizes() && out.sizes() == feat.sizes(),
              "segtwin::psa_attend_backward: grad and out must have feat's shape ", feat.sizes(), ", got ",
              grad.sizes(), " and ", out.sizes());
  TORCH_CHECK(grad.scalar_type() == feat.scalar_type() && out.scalar_type() == feat.scalar_type(),
              "segtwin::psa_attend_backward: grad and out must have feat's dtype");
  const at::Tensor x = feat.contiguous(), l = logits.contiguous(), gy = grad.contiguous(), y = out.contiguous();
  at::Tensor gx = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor gl = at::empty(l.sizes(), l.options().memory_format(at::MemoryFormat::Contiguous));
  if (g.n == 0 || g.hw == 0) return {gx, gl};
  if (g.c == 0) {  // no features: nothing flows back to the logits (grad_x is empty)
    gl.zero_();
    return {gx, gl};
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "psa_attend_backward", [&] {
    psa::psa_attend_backward_cpu<scalar_t>(gy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                           l.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(),
                                           gx.mutable_data_ptr<scalar_t>(), gl.mutable_data_ptr<scalar_t>(), g,
                                           static_cast<int>(psa_type), torch_gemm<scalar_t>(x.options()),
                                           at::get_num_threads());
  });
  return {gx, gl};
}

#ifdef SEGTWIN_WITH_CUDA
// Scratch device memory of the launchers, from the caching allocator on the current stream: freed when the caller
// returns, it is reused only by work enqueued after the launchers' on that stream.
at::Tensor cuda_workspace(const at::Tensor& like, const psa::AttendGeom& g, bool backward) {
  const size_t bytes = psa::psa_attend_cuda_workspace_bytes(g, static_cast<int>(like.element_size()), backward);
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

at::Tensor psa_attend_cuda(const at::Tensor& feat, const at::Tensor& logits, int64_t psa_type, int64_t mask_h,
                           int64_t mask_w) {
  const psa::AttendGeom g = check_attend("segtwin::psa_attend", feat, logits, psa_type, mask_h, mask_w, true);
  const at::Tensor x = feat.contiguous(), l = logits.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const int device = static_cast<int>(x.get_device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device)).stream();
  at::Tensor ws = cuda_workspace(x, g, false);
  const char* err = nullptr;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "psa_attend_cuda", [&] {
    err = psa::psa_attend_forward_cuda(x.const_data_ptr<scalar_t>(), l.const_data_ptr<scalar_t>(),
                                       out.mutable_data_ptr<scalar_t>(), g, static_cast<int>(psa_type),
                                       torch_gemm<scalar_t>(x.options()), ws.mutable_data_ptr(),
                                       static_cast<size_t>(ws.numel()), stream, device);
  });
  TORCH_CHECK(err == nullptr, "segtwin::psa_attend: CUDA launch failed: ", err);
  return out;
}

std::tuple<at::Tensor, at::Tensor> psa_attend_backward_cuda(const at::Tensor& grad, const at::Tensor& feat,
                                                            const at::Tensor& logits, const at::Tensor& out,
                                                            int64_t psa_type, int64_t mask_h, int64_t mask_w) {
  const psa::AttendGeom g =
      check_attend("segtwin::psa_attend_backward", feat, logits, psa_type, mask_h, mask_w, true);
  TORCH_CHECK(grad.sizes() == feat.sizes() && out.sizes() == feat.sizes(),
              "segtwin::psa_attend_backward: grad and out must have feat's shape ", feat.sizes(), ", got ",
              grad.sizes(), " and ", out.sizes());
  TORCH_CHECK(grad.scalar_type() == feat.scalar_type() && out.scalar_type() == feat.scalar_type(),
              "segtwin::psa_attend_backward: grad and out must have feat's dtype");
  TORCH_CHECK(grad.device() == feat.device() && out.device() == feat.device(),
              "segtwin::psa_attend_backward: grad and out must be on feat's device ", feat.device(), ", got ",
              grad.device(), " and ", out.device());
  const at::Tensor x = feat.contiguous(), l = logits.contiguous(), gy = grad.contiguous(), y = out.contiguous();
  at::Tensor gx = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor gl = at::empty(l.sizes(), l.options().memory_format(at::MemoryFormat::Contiguous));
  if (g.n == 0 || g.hw == 0) return {gx, gl};
  if (g.c == 0) {  // no features: nothing flows back to the logits (grad_x is empty)
    gl.zero_();
    return {gx, gl};
  }
  const int device = static_cast<int>(x.get_device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device)).stream();
  at::Tensor ws = cuda_workspace(x, g, true);
  const char* err = nullptr;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "psa_attend_backward_cuda", [&] {
    err = psa::psa_attend_backward_cuda(gy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                        l.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(),
                                        gx.mutable_data_ptr<scalar_t>(), gl.mutable_data_ptr<scalar_t>(), g,
                                        static_cast<int>(psa_type), torch_gemm<scalar_t>(x.options()),
                                        ws.mutable_data_ptr(), static_cast<size_t>(ws.numel()), stream, device);
  });
  TORCH_CHECK(err == nullptr, "segtwin::psa_attend_backward: CUDA launch failed: ", err);
  return {gx, gl};
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
