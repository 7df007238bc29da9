// segtwin fused PSA aggregation: PaddlePaddle glue. Custom operator `psa_attend` (inputs Feat, Logits; attrs
// psa_type, mask_h, mask_w) and its gradient operator. CPU kernels: the driver of psa_attend_cpu.h with
// paddle::experimental::matmul as its GEMM. CUDA kernels (only when built with SEGTWIN_WITH_CUDA on a CUDA build of
// Paddle, as psa_mask_op.cc): the launchers of ../cuda/psa_attend.cu on the tensors' stream, with
// paddle::experimental::matmul on GPU tensors as their GEMM and a workspace from Paddle's allocator; the kernel
// function dispatches on the inputs' place.
#include <cstdint>
#include <cstring>
#include <vector>

#include "paddle/extension.h"
#include "psa_attend_cpu.h"

#if defined(SEGTWIN_WITH_CUDA) && defined(PADDLE_WITH_CUDA)
#define SEGTWIN_PADDLE_ATTEND_CUDA 1
#include "psa_attend_cuda.h"
#endif

namespace {

namespace psa = segtwin::psa;

psa::AttendGeom check_attend(const char* op, const paddle::Tensor& feat, const paddle::Tensor& logits, int psa_type,
                             int mask_h, int mask_w) {
  const std::vector<int64_t> f = feat.shape(), l = logits.shape();
  PD_CHECK(f.size() == 4 && l.size() == 4, op, ": expected 4-D feat (N, C, H, W) and logits (N, mask_h*mask_w, H, W)");
  PD_CHECK(feat.dtype() == paddle::DataType::FLOAT32 || feat.dtype() == paddle::DataType::FLOAT64, op,
           ": expected float32 or float64, got ", phi::DataTypeToString(feat.dtype()));
  PD_CHECK(logits.dtype() == feat.dtype(), op, ": feat and logits must have the same dtype");
#ifdef SEGTWIN_PADDLE_ATTEND_CUDA
  PD_CHECK((feat.is_cpu() && logits.is_cpu()) || (feat.is_gpu() && logits.is_gpu() && feat.place() == logits.place()),
           op, ": feat and logits must be both on the CPU or both on one GPU");
#else
  PD_CHECK(feat.is_cpu() && logits.is_cpu(), op,
           ": this build of the fused kernel is CPU only (Paddle without CUDA, or CUDA glue not compiled)");
#endif
  PD_CHECK(psa_type == 0 || psa_type == 1, op, ": psa_type must be 0 (collect) or 1 (distribute), got ", psa_type);
  PD_CHECK(psa::mask_side_ok(mask_h) && psa::mask_side_ok(mask_w), op, ": mask size must be positive, got (", mask_h,
           ", ", mask_w, ")");
  PD_CHECK(l[0] == f[0] && l[2] == f[2] && l[3] == f[3], op, ": feat and logits must share N, H, W");
  PD_CHECK(psa::is_product(l[1], mask_h, mask_w), op, ": logits have ", l[1], " channels but the mask (", mask_h,
           ", ", mask_w, ") needs mask_h*mask_w = ", static_cast<int64_t>(mask_h) * mask_w);
  return psa::make_attend_geom(f[0], f[1], f[2], f[3], mask_h, mask_w);
}

// A (rows x cols, row stride ld) block as a Paddle tensor: the caller's memory itself when the rows are
// contiguous, else a packed copy.
template <typename T>
paddle::Tensor block(const T* a, int64_t rows, int64_t cols, int64_t ld, paddle::DataType dt) {
  if (ld == cols) return paddle::from_blob(const_cast<T*>(a), {rows, cols}, dt, phi::DataLayout::NCHW,
                                           paddle::CPUPlace());
  paddle::Tensor t = paddle::empty({rows, cols}, dt, paddle::CPUPlace());
  T* d = t.data<T>();
  for (int64_t r = 0; r < rows; ++r) std::memcpy(d + r * cols, a + r * ld, static_cast<size_t>(cols) * sizeof(T));
  return t;
}

template <typename T>
psa::Gemm<T> paddle_gemm(paddle::DataType dt) {
  return [dt](bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b,
              int64_t ldb, T* c) {
    const paddle::Tensor ta = trans_a ? block(a, k, m, lda, dt) : block(a, m, k, lda, dt);
    const paddle::Tensor tb = trans_b ? block(b, n, k, ldb, dt) : block(b, k, n, ldb, dt);
    paddle::Tensor tc = paddle::experimental::matmul(ta, tb, trans_a, trans_b);
    if (!tc.is_contiguous()) tc = tc.contiguous();
    std::memcpy(c, tc.data<T>(), static_cast<size_t>(m * n) * sizeof(T));
  };
}

#ifdef SEGTWIN_PADDLE_ATTEND_CUDA
// A (rows x cols, row stride ld) block of GPU memory as a Paddle tensor: the caller's memory itself when the rows are
// contiguous, else a packed copy (enqueued on `stream`).
template <typename T>
paddle::Tensor gpu_block(const T* a, int64_t rows, int64_t cols, int64_t ld, paddle::DataType dt,
                         const phi::Place& place, CUstream_st* stream) {
  if (ld == cols) return paddle::from_blob(const_cast<T*>(a), {rows, cols}, dt, phi::DataLayout::NCHW, place);
  paddle::Tensor t = paddle::empty({rows, cols}, dt, place);
  const char* err = psa::psa_attend_cuda_copy_2d(t.data<T>(), cols * sizeof(T), a, ld * sizeof(T),
                                                 cols * sizeof(T), static_cast<size_t>(rows), stream);
  PD_CHECK(err == nullptr, "psa_attend: CUDA copy failed: ", err ? err : "");
  return t;
}

// The GEMM callback of the CUDA launchers: paddle::experimental::matmul on GPU tensors (on the place's stream, the
// one the launchers use), its result copied into c on that stream.
template <typename T>
psa::DeviceGemm<T> paddle_gpu_gemm(paddle::DataType dt, const phi::Place& place, CUstream_st* stream) {
  return [dt, place, stream](bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const T* a, int64_t lda,
                             const T* b, int64_t ldb, T* c) {
    const paddle::Tensor ta = trans_a ? gpu_block(a, k, m, lda, dt, place, stream)
                                      : gpu_block(a, m, k, lda, dt, place, stream);
    const paddle::Tensor tb = trans_b ? gpu_block(b, n, k, ldb, dt, place, stream)
                                      : gpu_block(b, k, n, ldb, dt, place, stream);
    paddle::Tensor tc = paddle::experimental::matmul(ta, tb, trans_a, trans_b);
    if (!tc.is_contiguous()) tc = tc.contiguous();
    const char* err = psa::psa_attend_cuda_copy_2d(c, n * sizeof(T), tc.data<T>(), n * sizeof(T), n * sizeof(T),
                                                   static_cast<size_t>(m), stream);
    PD_CHECK(err == nullptr, "psa_attend: CUDA copy failed: ", err ? err : "");
  };
}

// Scratch device memory of the launchers, from Paddle's allocator on the tensors' place (stream-ordered reuse).
paddle::Tensor gpu_workspace(const paddle::Tensor& like, const psa::AttendGeom& g, bool backward) {
  const int elem = like.dtype() == paddle::DataType::FLOAT32 ? 4 : 8;
  const size_t bytes = psa::psa_attend_cuda_workspace_bytes(g, elem, backward);
  return paddle::empty({static_cast<int64_t>(bytes)}, paddle::DataType::UINT8, like.place());
}

std::vector<paddle::Tensor> PsaAttendForwardGpu(const paddle::Tensor& x, const paddle::Tensor& l,
                                                const psa::AttendGeom& g, int psa_type) {
  paddle::Tensor out = paddle::empty(x.shape(), x.dtype(), x.place());
  if (out.numel() == 0) return {out};
  paddle::Tensor ws = gpu_workspace(x, g, false);
  const int device = x.place().GetDeviceId();
  CUstream_st* stream = x.stream();
  const char* err = nullptr;
  if (x.dtype() == paddle::DataType::FLOAT32) {
    err = psa::psa_attend_forward_cuda(x.data<float>(), l.data<float>(), out.data<float>(), g, psa_type,
                                       paddle_gpu_gemm<float>(x.dtype(), x.place(), stream), ws.data(),
                                       static_cast<size_t>(ws.numel()), stream, device);
  } else {
    err = psa::psa_attend_forward_cuda(x.data<double>(), l.data<double>(), out.data<double>(), g, psa_type,
                                       paddle_gpu_gemm<double>(x.dtype(), x.place(), stream), ws.data(),
                                       static_cast<size_t>(ws.numel()), stream, device);
  }
  PD_CHECK(err == nullptr, "psa_attend: CUDA launch failed: ", err ? err : "");
  return {out};
}

std::vector<paddle::Tensor> PsaAttendBackwardGpu(const paddle::Tensor& x, const paddle::Tensor& l,
                                                 const paddle::Tensor& y, const paddle::Tensor& gy,
                                                 const psa::AttendGeom& g, int psa_type) {
  paddle::Tensor gx = paddle::empty(x.shape(), x.dtype(), x.place());
  paddle::Tensor gl = paddle::empty(l.shape(), l.dtype(), l.place());
  if (g.n == 0 || g.hw == 0) return {gx, gl};
  if (g.c == 0) {  // no features: nothing flows back to the logits
    gl = paddle::full(l.shape(), 0.0, l.dtype(), l.place());
    return {gx, gl};
  }
  paddle::Tensor ws = gpu_workspace(x, g, true);
  const int device = x.place().GetDeviceId();
  CUstream_st* stream = x.stream();
  const char* err = nullptr;
  if (x.dtype() == paddle::DataType::FLOAT32) {
    err = psa::psa_attend_backward_cuda(gy.data<float>(), x.data<float>(), l.data<float>(), y.data<float>(),
                                        gx.data<float>(), gl.data<float>(), g, psa_type,
                                        paddle_gpu_gemm<float>(x.dtype(), x.place(), stream), ws.data(),
                                        static_cast<size_t>(ws.numel()), stream, device);
  } else {
    err = psa::psa_attend_backward_cuda(gy.data<double>(), x.data<double>(), l.data<double>(), y.data<double>(),
                                        gx.data<double>(), gl.data<double>(), g, psa_type,
                                        paddle_gpu_gemm<double>(x.dtype(), x.place(), stream), ws.data(),
                                        static_cast<size_t>(ws.numel()), stream, device);
  }
  PD_CHECK(err == nullptr, "psa_attend_grad: CUDA launch failed: ", err ? err : "");
  return {gx, gl};
}
#endif

std::vector<paddle::Tensor> PsaAttendForward(const paddle::Tensor& feat, const paddle::Tensor& logits, int psa_type,
                                             int mask_h, int mask_w) {
  const psa::AttendGeom g = check_attend("psa_attend", feat, logits, psa_type, mask_h, mask_w);
  const paddle::Tensor x = feat.is_contiguous() ? feat : feat.contiguous();
  const paddle::Tensor l = logits.is_contiguous() ? logits : logits.contiguous();
#ifdef SEGTWIN_PADDLE_ATTEND_CUDA
  if (x.is_gpu()) return PsaAttendForwardGpu(x, l, g, psa_type);
#endif
  paddle::Tensor out = paddle::empty(feat.shape(), feat.dtype(), paddle::CPUPlace());
  if (out.numel() == 0) return {out};
  if (x.dtype() == paddle::DataType::FLOAT32) {
    psa::psa_attend_forward_cpu<float>(x.data<float>(), l.data<float>(), out.data<float>(), g, psa_type,
                                       paddle_gemm<float>(x.dtype()), psa::attend_threads());
  } else {
    psa::psa_attend_forward_cpu<double>(x.data<double>(), l.data<double>(), out.data<double>(), g, psa_type,
                                        paddle_gemm<double>(x.dtype()), psa::attend_threads());
  }
  return {out};
}

std::vector<paddle::Tensor> PsaAttendBackward(const paddle::Tensor& feat, const paddle::Tensor& logits,
                                              const paddle::Tensor& out, const paddle::Tensor& grad, int psa_type,
                                              int mask_h, int mask_w) {
  const psa::AttendGeom g = check_attend("psa_attend_grad", feat, logits, psa_type, mask_h, mask_w);
  PD_CHECK(grad.shape() == feat.shape() && out.shape() == feat.shape(),
           "psa_attend_grad: grad and out must have feat's shape");
  const paddle::Tensor x = feat.is_contiguous() ? feat : feat.contiguous();
  const paddle::Tensor l = logits.is_contiguous() ? logits : logits.contiguous();
  const paddle::Tensor y = out.is_contiguous() ? out : out.contiguous();
  const paddle::Tensor gy = grad.is_contiguous() ? grad : grad.contiguous();
#ifdef SEGTWIN_PADDLE_ATTEND_CUDA
  if (x.is_gpu()) {
    PD_CHECK(gy.place() == x.place() && y.place() == x.place(),
             "psa_attend_grad: grad and out must be on feat's place");
    return PsaAttendBackwardGpu(x, l, y, gy, g, psa_type);
  }
#endif
  paddle::Tensor gx = paddle::empty(feat.shape(), feat.dtype(), paddle::CPUPlace());
  paddle::Tensor gl = paddle::empty(logits.shape(), logits.dtype(), paddle::CPUPlace());
  if (g.n == 0 || g.hw == 0) return {gx, gl};
  if (g.c == 0) {  // no features: nothing flows back to the logits
    gl = paddle::full(logits.shape(), 0.0, logits.dtype(), paddle::CPUPlace());
    return {gx, gl};
  }
  if (x.dtype() == paddle::DataType::FLOAT32) {
    psa::psa_attend_backward_cpu<float>(gy.data<float>(), x.data<float>(), l.data<float>(), y.data<float>(),
                                        gx.data<float>(), gl.data<float>(), g, psa_type,
                                        paddle_gemm<float>(x.dtype()), psa::attend_threads());
  } else {
    psa::psa_attend_backward_cpu<double>(gy.data<double>(), x.data<double>(), l.data<double>(), y.data<double>(),
                                         gx.data<double>(), gl.data<double>(), g, psa_type,
                                         paddle_gemm<double>(x.dtype()), psa::attend_threads());
  }
  return {gx, gl};
}

std::vector<std::vector<int64_t>> PsaAttendInferShape(const std::vector<int64_t>& feat_shape,
                                                      const std::vector<int64_t>& logits_shape, int, int, int) {
  return {feat_shape};
}

std::vector<std::vector<int64_t>> PsaAttendGradInferShape(const std::vector<int64_t>& feat_shape,
                                                          const std::vector<int64_t>& logits_shape,
                                                          const std::vector<int64_t>&, const std::vector<int64_t>&,
                                                          int, int, int) {
  return {feat_shape, logits_shape};
}

std::vector<paddle::DataType> PsaAttendInferDtype(const paddle::DataType& feat, const paddle::DataType&) {
  return {feat};
}

std::vector<paddle::DataType> PsaAttendGradInferDtype(const paddle::DataType& feat, const paddle::DataType& logits,
                                                      const paddle::DataType&, const paddle::DataType&) {
  return {feat, logits};
}

}  // namespace

PD_BUILD_OP(psa_attend)
    .Inputs({"Feat", "Logits"})
    .Outputs({"Out"})
    .Attrs({"psa_type: int", "mask_h: int", "mask_w: int"})
    .SetKernelFn(PD_KERNEL(PsaAttendForward))
    .SetInferShapeFn(PD_INFER_SHAPE(PsaAttendInferShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(PsaAttendInferDtype));

PD_BUILD_GRAD_OP(psa_attend)
    .Inputs({"Feat", "Logits", "Out", paddle::Grad("Out")})
    .Outputs({paddle::Grad("Feat"), paddle::Grad("Logits")})
    .Attrs({"psa_type: int", "mask_h: int", "mask_w: int"})
    .SetKernelFn(PD_KERNEL(PsaAttendBackward))
    .SetInferShapeFn(PD_INFER_SHAPE(PsaAttendGradInferShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(PsaAttendGradInferDtype));
