// segtwin PSA mask: PaddlePaddle glue. Registers the custom operator `psa_mask` (attrs psa_type, mask_h, mask_w)
// and its gradient operator. CPU: the OpenMP loop of psa_mask_cpu.h. CUDA (only when built with
// SEGTWIN_WITH_CUDA, which build.py sets together with the .cu source on a CUDA build of Paddle): the launcher of
// ../cuda/psa_mask.cu on the tensor's stream.
#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

#include "paddle/extension.h"
#include "psa_mask_cpu.h"

#if defined(SEGTWIN_WITH_CUDA) && defined(PADDLE_WITH_CUDA)
#define SEGTWIN_PADDLE_CUDA 1
#include "psa_mask_cuda.h"
#endif

namespace {

namespace psa = segtwin::psa;

std::string shape_str(const std::vector<int64_t>& s) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < s.size(); ++i) os << (i ? ", " : "") << s[i];
  os << "]";
  return os.str();
}

int elem_bytes(paddle::DataType dt) {
  switch (dt) {
    case paddle::DataType::FLOAT16:
    case paddle::DataType::BFLOAT16:
      return 2;
    case paddle::DataType::FLOAT32:
      return 4;
    case paddle::DataType::FLOAT64:
      return 8;
    default:
      return 0;
  }
}

void check_attrs(const char* op, int psa_type, int mask_h, int mask_w) {
  PD_CHECK(psa_type == 0 || psa_type == 1, op, ": psa_type must be 0 (collect) or 1 (distribute), got ", psa_type);
  PD_CHECK(mask_h > 0 && mask_w > 0, op, ": mask size must be positive, got (", mask_h, ", ", mask_w, ")");
  // int attributes cannot exceed the shared bound; checked anyway so that every entry point applies the same rule.
  PD_CHECK(psa::mask_side_ok(mask_h) && psa::mask_side_ok(mask_w), op, ": mask size must be at most ",
           psa::kMaxMaskSide, " (2**31-1) per side, got (", mask_h, ", ", mask_w, ")");
}

// Validates either direction (`t` = x for forward, grad_out for backward) and returns the geometry.
psa::PsaGeom check_and_geom(const paddle::Tensor& t, int psa_type, int mask_h, int mask_w, bool forward) {
  const char* op = forward ? "psa_mask" : "psa_mask_grad";
  const std::vector<int64_t> s = t.shape();
  PD_CHECK(s.size() == 4, op, ": expected a 4-D tensor ", forward ? "(N, mask_h*mask_w, H, W)" : "(N, H*W, H, W)",
           ", got shape ", shape_str(s));
  PD_CHECK(elem_bytes(t.dtype()) != 0, op,
           ": expected a floating-point tensor (float16, bfloat16, float32 or float64), got ",
           phi::DataTypeToString(t.dtype()));
  check_attrs(op, psa_type, mask_h, mask_w);
  const int64_t mh = mask_h, mw = mask_w;
  PD_CHECK(psa::area_fits(s[2], s[3]), op, ": H*W overflows int64 (shape ", shape_str(s), ")");
  if (forward) {
    PD_CHECK(psa::is_product(s[1], mh, mw), op, ": input has ", s[1], " channels but the mask (", mh, ", ", mw,
             ") needs mask_h*mask_w = ", mh * mw, " (input shape ", shape_str(s), ")");
  } else {
    PD_CHECK(s[1] == s[2] * s[3], op, ": grad_out must have H*W = ", s[2] * s[3], " channels, got shape ",
             shape_str(s));
  }
  return psa::make_geom(s[0], mh, mw, s[2], s[3]);
}

std::vector<paddle::Tensor> run(const paddle::Tensor& t, int psa_type, int mask_h, int mask_w, bool forward) {
  const psa::PsaGeom g = check_and_geom(t, psa_type, mask_h, mask_w, forward);
  const paddle::Tensor src = t.is_contiguous() ? t : t.contiguous();
  const std::vector<int64_t> shape = {g.n, forward ? g.hw : g.c, g.h, g.w};
  // Uninitialised on purpose: the kernel writes every element.
  paddle::Tensor dst = paddle::empty(shape, src.dtype(), src.place());
  if (dst.numel() == 0) return {dst};
  const int bytes = elem_bytes(src.dtype());
  if (src.is_cpu()) {
    const char* err =
        psa::psa_mask_cpu_bytes(src.data(), dst.data(), bytes, g, psa_type, forward, psa::default_cpu_threads());
    PD_CHECK(err == nullptr, "psa_mask: ", err ? err : "");
    return {dst};
  }
#ifdef SEGTWIN_PADDLE_CUDA
  if (src.is_gpu()) {
    const char* err = psa::psa_mask_cuda(src.data(), dst.data(), bytes, g.n, g.mask_h, g.mask_w, g.h, g.w,
                                         psa_type, forward, src.stream(), src.place().GetDeviceId());
    PD_CHECK(err == nullptr, "psa_mask: CUDA launch failed: ", err ? err : "");
    return {dst};
  }
  PD_THROW("psa_mask: the tensor is on ", src.place().DebugString(), "; this build has CPU and CUDA kernels only");
#else
  PD_THROW("psa_mask: the tensor is on ", src.place().DebugString(),
           "; this build of the op has a CPU kernel only (Paddle without CUDA, or CUDA glue not compiled)");
#endif
  return {};
}

std::vector<paddle::Tensor> PsaMaskForward(const paddle::Tensor& x, int psa_type, int mask_h, int mask_w) {
  return run(x, psa_type, mask_h, mask_w, true);
}

std::vector<paddle::Tensor> PsaMaskBackward(const paddle::Tensor& grad_out, int psa_type, int mask_h, int mask_w) {
  return run(grad_out, psa_type, mask_h, mask_w, false);
}

// Shapes may hold -1 (unknown at graph-build time): products of unknowns stay unknown, checks run on known sizes.
int64_t known_product(int64_t a, int64_t b) { return (a < 0 || b < 0) ? -1 : a * b; }

std::vector<std::vector<int64_t>> PsaMaskInferShape(const std::vector<int64_t>& x_shape, int psa_type, int mask_h,
                                                    int mask_w) {
  PD_CHECK(x_shape.size() == 4, "psa_mask: expected a 4-D input (N, mask_h*mask_w, H, W), got shape ",
           shape_str(x_shape));
  check_attrs("psa_mask", psa_type, mask_h, mask_w);
  const int64_t c = static_cast<int64_t>(mask_h) * mask_w;
  PD_CHECK(x_shape[1] < 0 || psa::is_product(x_shape[1], mask_h, mask_w), "psa_mask: input has ", x_shape[1], " channels but the mask (",
           mask_h, ", ", mask_w, ") needs mask_h*mask_w = ", c);
  return {{x_shape[0], known_product(x_shape[2], x_shape[3]), x_shape[2], x_shape[3]}};
}

std::vector<std::vector<int64_t>> PsaMaskGradInferShape(const std::vector<int64_t>& grad_out_shape, int psa_type,
                                                        int mask_h, int mask_w) {
  PD_CHECK(grad_out_shape.size() == 4, "psa_mask_grad: expected a 4-D grad_out (N, H*W, H, W), got shape ",
           shape_str(grad_out_shape));
  check_attrs("psa_mask_grad", psa_type, mask_h, mask_w);
  return {{grad_out_shape[0], static_cast<int64_t>(mask_h) * mask_w, grad_out_shape[2], grad_out_shape[3]}};
}

std::vector<paddle::DataType> PsaMaskInferDtype(const paddle::DataType& x_dtype) { return {x_dtype}; }

}  // namespace

PD_BUILD_OP(psa_mask)
    .Inputs({"X"})
    .Outputs({"Out"})
    .Attrs({"psa_type: int", "mask_h: int", "mask_w: int"})
    .SetKernelFn(PD_KERNEL(PsaMaskForward))
    .SetInferShapeFn(PD_INFER_SHAPE(PsaMaskInferShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(PsaMaskInferDtype));

PD_BUILD_GRAD_OP(psa_mask)
    .Inputs({paddle::Grad("Out")})
    .Outputs({paddle::Grad("X")})
    .Attrs({"psa_type: int", "mask_h: int", "mask_w: int"})
    .SetKernelFn(PD_KERNEL(PsaMaskBackward))
    .SetInferShapeFn(PD_INFER_SHAPE(PsaMaskGradInferShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(PsaMaskInferDtype));
