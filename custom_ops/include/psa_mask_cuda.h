// segtwin PSA mask: declaration of the framework-free CUDA launcher defined in ../cuda/psa_mask.cu.
//
// Includes no CUDA header: `CUstream_st*` is exactly the type that `cudaStream_t` names, so the framework glue can
// pass its current stream without this header pulling in the CUDA runtime.
#ifndef SEGTWIN_PSA_MASK_CUDA_H_
#define SEGTWIN_PSA_MASK_CUDA_H_

#include <cstdint>

struct CUstream_st;

namespace segtwin {
namespace psa {

// Runs the forward gather (forward == true: src = x (N, C, H, W), dst = out (N, HW, H, W)) or the backward gather
// (forward == false: src = grad_out (N, HW, H, W), dst = grad_x (N, C, H, W)) on `stream` of CUDA device `device`.
// Both buffers are dense, row-major, on that device; dst is written completely (zeros included), so it may be
// uninitialised. elem_bytes: 2 (float16 / bfloat16 bit patterns), 4 (float32) or 8 (float64).
// Returns nullptr on success, otherwise a message (static storage) naming what failed.
const char* psa_mask_cuda(const void* src, void* dst, int elem_bytes, int64_t n, int64_t mask_h, int64_t mask_w,
                          int64_t h, int64_t w, int psa_type, bool forward, CUstream_st* stream, int device);

}  // namespace psa
}  // namespace segtwin

#endif  // SEGTWIN_PSA_MASK_CUDA_H_
