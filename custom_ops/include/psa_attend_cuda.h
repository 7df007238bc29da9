// segtwin fused PSA aggregation: declarations of the framework-free CUDA path defined in ../cuda/psa_attend.cu.
//
// Includes no CUDA header (`CUstream_st*` is exactly the type `cudaStream_t` names, as in psa_mask_cuda.h), so the
// framework glue can include it in any build.
//
// How a call works (forward; the backward is alike, see psa_attend_cuda_driver.h):
//  1. the glue asks psa_attend_cuda_workspace_bytes() how much scratch device memory the problem needs and allocates
//     it with the framework's own (caching) allocator on the stream it will pass;
//  2. it calls psa_attend_forward_cuda() with DEVICE pointers, that workspace, its current stream and a GEMM callback;
//  3. the launcher enqueues, per batch item, the statistics kernel (one thread per pixel), then per band of pixel
//     rows the tile-fill kernel (one thread per tile element), the framework GEMM (the callback) and the epilogue
//     kernel (one thread per output element) -- all on `stream`, nothing synchronised, nothing allocated;
//  4. it returns nullptr (or a message); the glue may release the workspace at once: the framework allocator's
//     stream-ordered reuse keeps it alive for the work already enqueued on that stream.
// Every output element is written exactly once, so outputs may come uninitialised.
#ifndef SEGTWIN_PSA_ATTEND_CUDA_H_
#define SEGTWIN_PSA_ATTEND_CUDA_H_

#include <cstddef>
#include <cstdint>
#include <functional>

#include "psa_attend_kernel.h"

struct CUstream_st;

namespace segtwin {
namespace psa {

// c (m x n, contiguous) = op(a) @ op(b) on DEVICE memory, the contract of the CPU driver's Gemm<T> (the very same
// std::function type): op(a) is m x k, a stored m x k (row stride lda) or, with trans_a, a^T for a stored k x m;
// op(b) is k x n, b stored k x n (row stride ldb) or, with trans_b, b^T for b stored n x k. The callback must
// enqueue its work on the stream given to the launcher (or be otherwise ordered after the kernels enqueued before
// it and before those enqueued after it). It may throw: the launcher holds no resource but an RAII device guard.
template <typename T>
using DeviceGemm = std::function<void(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const T* a,
                                      int64_t lda, const T* b, int64_t ldb, T* c)>;

// Bytes of device workspace psa_attend_{forward,backward}_cuda need for geometry g (from make_attend_geom, after
// the glue's checks) and elements of elem_bytes (4: float32, 8: float64). Depends on the tile budget
// ($SEGTWIN_PSA_ATTEND_TILE_BYTES, default 64 MiB on the device), read on every call: keep it unchanged between this
// call and the launch (the launcher checks that the workspace is large enough and fails otherwise).
size_t psa_attend_cuda_workspace_bytes(const AttendGeom& g, int elem_bytes, bool backward);

// out = the fused aggregation of x (N, C, H, W) with logits (N, mask_h*mask_w, H, W) (contiguous, on CUDA device
// `device`; out uninitialised). Returns nullptr on success, otherwise a message (static storage).
const char* psa_attend_forward_cuda(const float* x, const float* logits, float* out, const AttendGeom& g,
                                    int psa_type, const DeviceGemm<float>& gemm, void* workspace,
                                    size_t workspace_bytes, CUstream_st* stream, int device);
const char* psa_attend_forward_cuda(const double* x, const double* logits, double* out, const AttendGeom& g,
                                    int psa_type, const DeviceGemm<double>& gemm, void* workspace,
                                    size_t workspace_bytes, CUstream_st* stream, int device);

// grad_x (N, C, H, W) and grad_logits (N, mask_h*mask_w, H, W) from g_out = d loss / d out and the forward's x,
// logits and out (all contiguous on `device`; the gradients uninitialised). C must be > 0 (the glue handles C = 0:
// grad_logits is then all zeros). Returns nullptr on success, otherwise a message (static storage).
const char* psa_attend_backward_cuda(const float* g_out, const float* x, const float* logits, const float* out,
                                     float* grad_x, float* grad_logits, const AttendGeom& g, int psa_type,
                                     const DeviceGemm<float>& gemm, void* workspace, size_t workspace_bytes,
                                     CUstream_st* stream, int device);
const char* psa_attend_backward_cuda(const double* g_out, const double* x, const double* logits, const double* out,
                                     double* grad_x, double* grad_logits, const AttendGeom& g, int psa_type,
                                     const DeviceGemm<double>& gemm, void* workspace, size_t workspace_bytes,
                                     CUstream_st* stream, int device);

// rows x width_bytes from src (row pitch spitch bytes) to dst (row pitch dpitch), device to device, enqueued on
// `stream` (cudaMemcpy2DAsync). For glue whose framework matmul wants packed operands and returns a new tensor
// (Paddle). Returns nullptr on success, otherwise a message.
const char* psa_attend_cuda_copy_2d(void* dst, size_t dpitch, const void* src, size_t spitch, size_t width_bytes,
                                    size_t rows, CUstream_st* stream);

}  // namespace psa
}  // namespace segtwin

#endif  // SEGTWIN_PSA_ATTEND_CUDA_H_
