// segtwin PSA mask: PyTorch glue. Defines the operators segtwin::psa_mask and segtwin::psa_mask_backward with a
// CPU kernel (OpenMP loop of psa_mask_cpu.h) and, when built with SEGTWIN_WITH_CUDA, a CUDA kernel (the launcher of
// ../cuda/psa_mask.cu on the current stream). Autograd and the fake (meta) kernels are registered from Python
// (torch_ref/ops/psa_mask.py) with torch.library.register_autograd / register_fake.
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "psa_mask_cpu.h"

#ifdef SEGTWIN_WITH_CUDA
#include <c10/cuda/CUDAStream.h>

#include "psa_mask_cuda.h"
#endif

namespace {

namespace psa = segtwin::psa;

// Validates the arguments of either direction and returns the geometry. `t` is x (forward) or grad_out (backward).
psa::PsaGeom check_and_geom(const at::Tensor& t, int64_t psa_type, int64_t mask_h, int64_t mask_w, bool forward) {
  const char* op = forward ? "segtwin::psa_mask" : "segtwin::psa_mask_backward";
  TORCH_CHECK(t.dim() == 4, op, ": expected a 4-D tensor ",
              forward ? "(N, mask_h*mask_w, H, W)" : "(N, H*W, H, W)", ", got a ", t.dim(), "-D tensor of shape ",
              t.sizes());
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, op,
              ": expected a floating-point tensor (float16, bfloat16, float32 or float64), got ", st);
  TORCH_CHECK(psa_type == 0 || psa_type == 1, op, ": psa_type must be 0 (collect) or 1 (distribute), got ",
              psa_type);
  TORCH_CHECK(mask_h > 0 && mask_w > 0, op, ": mask size must be positive, got (", mask_h, ", ", mask_w, ")");
  TORCH_CHECK(psa::mask_side_ok(mask_h) && psa::mask_side_ok(mask_w), op, ": mask size must be at most ",
              psa::kMaxMaskSide, " (2**31-1) per side, got (", mask_h, ", ", mask_w, ")");
  const int64_t n = t.size(0), c = t.size(1), h = t.size(2), w = t.size(3);
  TORCH_CHECK(psa::area_fits(h, w), op, ": H*W overflows int64 (shape ", t.sizes(), ")");
  if (forward) {
    // By division: a product of two bounded sides fits, but the check must not depend on that.
    TORCH_CHECK(psa::is_product(c, mask_h, mask_w), op, ": input has ", c, " channels but the mask (", mask_h, ", ",
                mask_w, ") needs mask_h*mask_w = ", mask_h * mask_w, " (input shape ", t.sizes(), ")");
  } else {
    TORCH_CHECK(c == h * w, op, ": grad_out must have H*W = ", h * w, " channels, got shape ", t.sizes());
  }
  return psa::make_geom(n, mask_h, mask_w, h, w);
}

std::vector<int64_t> dst_shape(const psa::PsaGeom& g, bool forward) {
  return {g.n, forward ? g.hw : g.c, g.h, g.w};
}

// The destination buffer, uninitialised on purpose: the kernels write every element.
at::Tensor alloc_dst(const at::Tensor& src, const psa::PsaGeom& g, bool forward) {
  return at::empty(dst_shape(g, forward), src.options().memory_format(at::MemoryFormat::Contiguous));
}

// The caller's destination of the `.out` overloads: exactly the result's shape, dtype and device, contiguous, and
// not overlapping the source (it is never resized: a wrong buffer is an error, not a silent reallocation).
void check_out(const at::Tensor& out, const at::Tensor& src, const psa::PsaGeom& g, bool forward) {
  const char* op = forward ? "segtwin::psa_mask.out" : "segtwin::psa_mask_backward.out";
  TORCH_CHECK(out.sizes() == at::IntArrayRef(dst_shape(g, forward)), op, ": out must have shape ",
              at::IntArrayRef(dst_shape(g, forward)), ", got ", out.sizes());
  TORCH_CHECK(out.scalar_type() == src.scalar_type(), op, ": out must have dtype ", src.scalar_type(), ", got ",
              out.scalar_type());
  TORCH_CHECK(out.device() == src.device(), op, ": out must be on ", src.device(), ", got ", out.device());
  TORCH_CHECK(out.is_contiguous(), op, ": out must be contiguous (strides ", out.strides(), ")");
  const at::MemOverlapStatus overlap = at::get_overlap_status(out, src);
  TORCH_CHECK(overlap != at::MemOverlapStatus::Full && overlap != at::MemOverlapStatus::Partial, op,
              ": out overlaps the input in memory; pass a separate buffer");
}

// Runs the CPU loop into `out` (when given, after check_out) or into a fresh uninitialised tensor.
at::Tensor run_cpu(const at::Tensor& t, int64_t psa_type, int64_t mask_h, int64_t mask_w, bool forward,
                   const at::Tensor* out = nullptr) {
  const psa::PsaGeom g = check_and_geom(t, psa_type, mask_h, mask_w, forward);
  TORCH_CHECK(t.device().is_cpu(), "segtwin::psa_mask: CPU kernel called with a tensor on ", t.device());
  const at::Tensor src = t.contiguous();
  if (out != nullptr) check_out(*out, src, g, forward);
  at::Tensor dst = out != nullptr ? *out : alloc_dst(src, g, forward);
  if (dst.numel() == 0) return dst;
  const char* err = psa::psa_mask_cpu_bytes(src.const_data_ptr(), dst.mutable_data_ptr(),
                                            static_cast<int>(src.element_size()), g, static_cast<int>(psa_type),
                                            forward, at::get_num_threads());
  TORCH_CHECK(err == nullptr, "segtwin::psa_mask: ", err);
  return dst;
}

at::Tensor psa_mask_cpu(const at::Tensor& x, int64_t psa_type, int64_t mask_h, int64_t mask_w) {
  return run_cpu(x, psa_type, mask_h, mask_w, true);
}

at::Tensor psa_mask_backward_cpu(const at::Tensor& grad_out, int64_t psa_type, int64_t mask_h, int64_t mask_w) {
  return run_cpu(grad_out, psa_type, mask_h, mask_w, false);
}

at::Tensor& psa_mask_out_cpu(const at::Tensor& x, int64_t psa_type, int64_t mask_h, int64_t mask_w,
                             at::Tensor& out) {
  run_cpu(x, psa_type, mask_h, mask_w, true, &out);
  return out;
}

at::Tensor& psa_mask_backward_out_cpu(const at::Tensor& grad_out, int64_t psa_type, int64_t mask_h,
                                      int64_t mask_w, at::Tensor& out) {
  run_cpu(grad_out, psa_type, mask_h, mask_w, false, &out);
  return out;
}

#ifdef SEGTWIN_WITH_CUDA
at::Tensor run_cuda(const at::Tensor& t, int64_t psa_type, int64_t mask_h, int64_t mask_w, bool forward) {
  const psa::PsaGeom g = check_and_geom(t, psa_type, mask_h, mask_w, forward);
  TORCH_CHECK(t.device().is_cuda(), "segtwin::psa_mask: CUDA kernel called with a tensor on ", t.device());
  const at::Tensor src = t.contiguous();
  at::Tensor dst = alloc_dst(src, g, forward);
  if (dst.numel() == 0) return dst;
  const int device = static_cast<int>(src.get_device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device)).stream();
  const char* err = psa::psa_mask_cuda(src.const_data_ptr(), dst.mutable_data_ptr(),
                                       static_cast<int>(src.element_size()), g.n, g.mask_h, g.mask_w, g.h, g.w,
                                       static_cast<int>(psa_type), forward, stream, device);
  TORCH_CHECK(err == nullptr, "segtwin::psa_mask: CUDA launch failed: ", err);
  return dst;
}

at::Tensor psa_mask_cuda(const at::Tensor& x, int64_t psa_type, int64_t mask_h, int64_t mask_w) {
  return run_cuda(x, psa_type, mask_h, mask_w, true);
}

at::Tensor psa_mask_backward_cuda(const at::Tensor& grad_out, int64_t psa_type, int64_t mask_h, int64_t mask_w) {
  return run_cuda(grad_out, psa_type, mask_h, mask_w, false);
}
#endif

// Test hook: the destination buffer exactly as the kernels get it (allocated, never written), so that tests can show
// what an unwritten element would contain (e.g. NaN under torch's deterministic fill_uninitialized_memory).
at::Tensor alloc_probe(const at::Tensor& t, int64_t psa_type, int64_t mask_h, int64_t mask_w, bool forward) {
  const psa::PsaGeom g = check_and_geom(t, psa_type, mask_h, mask_w, forward);
  return alloc_dst(t, g, forward);
}

bool built_with_cuda() {
#ifdef SEGTWIN_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY(segtwin, m) {
  m.def("psa_mask(Tensor x, int psa_type, int mask_h, int mask_w) -> Tensor");
  m.def("psa_mask_backward(Tensor grad_out, int psa_type, int mask_h, int mask_w) -> Tensor");
  // Into a caller's buffer (CPU only): no allocation, so no first-touch page faults when the buffer is reused.
  m.def("psa_mask.out(Tensor x, int psa_type, int mask_h, int mask_w, *, Tensor(a!) out) -> Tensor(a!)");
  m.def("psa_mask_backward.out(Tensor grad_out, int psa_type, int mask_h, int mask_w, *, Tensor(a!) out) -> "
        "Tensor(a!)");
  // Whether this build has the CUDA kernels (a plain function, no tensors).
  m.def("psa_mask_built_with_cuda() -> bool", &built_with_cuda);
  m.def("_psa_mask_alloc_probe(Tensor t, int psa_type, int mask_h, int mask_w, bool forward) -> Tensor");
}

TORCH_LIBRARY_IMPL(segtwin, CPU, m) {
  m.impl("psa_mask", &psa_mask_cpu);
  m.impl("psa_mask_backward", &psa_mask_backward_cpu);
  m.impl("psa_mask.out", &psa_mask_out_cpu);
  m.impl("psa_mask_backward.out", &psa_mask_backward_out_cpu);
  m.impl("_psa_mask_alloc_probe", &alloc_probe);
}

#ifdef SEGTWIN_WITH_CUDA
TORCH_LIBRARY_IMPL(segtwin, CUDA, m) {
  m.impl("psa_mask", &psa_mask_cuda);
  m.impl("psa_mask_backward", &psa_mask_backward_cuda);
  m.impl("_psa_mask_alloc_probe", &alloc_probe);
}
#endif
