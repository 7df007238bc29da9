// segtwin fused PSA aggregation: the CUDA executor of the band driver (psa_attend_cuda_driver.h) and the entry points
// declared in psa_attend_cuda.h. No framework headers (compiles with plain nvcc).
//
// Every element body of the driver runs as one generic grid-stride kernel, `each_kernel<F>`, launched on the
// caller's stream; the GEMMs are the framework's (the callback), the scratch memory the caller's workspace. Nothing
// here allocates, synchronises or touches any stream but the caller's.
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "cuda_launch.h"
#include "psa_attend_cuda.h"
#include "psa_attend_cuda_driver.h"

namespace segtwin {
namespace psa {
namespace {

constexpr int kThreads = 256;

template <typename F>
__global__ void __launch_bounds__(kThreads) each_kernel(F f, int64_t total) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * static_cast<int64_t>(blockDim.x);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += step) {
    f(i);
  }
}

// The executor of the band driver: one launch of each_kernel per call.
struct CudaExec {
  cudaStream_t stream;
  int64_t max_blocks;  // enough blocks to fill the device many times over; the grid-stride loop covers the rest

  template <typename F>
  const char* each(int64_t total, const F& f) {
    if (total <= 0) return nullptr;
    const int64_t needed = (total + kThreads - 1) / kThreads;
    const unsigned blocks = static_cast<unsigned>(needed < max_blocks ? needed : max_blocks);
    each_kernel<F><<<blocks, kThreads, 0, stream>>>(f, total);
    const cudaError_t err = cudaGetLastError();
    return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
  }
};

const char* make_exec(int device, cudaStream_t stream, CudaExec* ex) {
  const cudaError_t err = grid_cap(device, 32, &ex->max_blocks);
  if (err != cudaSuccess) return cudaGetErrorString(err);
  ex->stream = stream;
  return nullptr;
}

template <typename T>
const char* forward(const T* x, const T* logits, T* out, const AttendGeom& g, int psa_type,
                    const DeviceGemm<T>& gemm, void* workspace, size_t workspace_bytes, cudaStream_t stream,
                    int device) {
  DeviceScope scope(device);
  if (!scope.ok()) return "psa_attend_cuda: cannot select the tensors' CUDA device";
  CudaExec ex;
  const char* err = make_exec(device, stream, &ex);
  if (err != nullptr) return err;
  return attend_forward_bands<T>(ex, x, logits, out, g, psa_type, gemm, workspace, workspace_bytes);
}

template <typename T>
const char* backward(const T* g_out, const T* x, const T* logits, const T* out, T* grad_x, T* grad_logits,
                     const AttendGeom& g, int psa_type, const DeviceGemm<T>& gemm, void* workspace,
                     size_t workspace_bytes, cudaStream_t stream, int device) {
  DeviceScope scope(device);
  if (!scope.ok()) return "psa_attend_cuda: cannot select the tensors' CUDA device";
  CudaExec ex;
  const char* err = make_exec(device, stream, &ex);
  if (err != nullptr) return err;
  return attend_backward_bands<T>(ex, g_out, x, logits, out, grad_x, grad_logits, g, psa_type, gemm, workspace,
                                  workspace_bytes);
}

}  // namespace

size_t psa_attend_cuda_workspace_bytes(const AttendGeom& g, int elem_bytes, bool backward) {
  return static_cast<size_t>(attend_workspace(g, elem_bytes, backward).elems) * static_cast<size_t>(elem_bytes);
}

const char* psa_attend_forward_cuda(const float* x, const float* logits, float* out, const AttendGeom& g,
                                    int psa_type, const DeviceGemm<float>& gemm, void* workspace,
                                    size_t workspace_bytes, CUstream_st* stream, int device) {
  return forward<float>(x, logits, out, g, psa_type, gemm, workspace, workspace_bytes, stream, device);
}

const char* psa_attend_forward_cuda(const double* x, const double* logits, double* out, const AttendGeom& g,
                                    int psa_type, const DeviceGemm<double>& gemm, void* workspace,
                                    size_t workspace_bytes, CUstream_st* stream, int device) {
  return forward<double>(x, logits, out, g, psa_type, gemm, workspace, workspace_bytes, stream, device);
}

const char* psa_attend_backward_cuda(const float* g_out, const float* x, const float* logits, const float* out,
                                     float* grad_x, float* grad_logits, const AttendGeom& g, int psa_type,
                                     const DeviceGemm<float>& gemm, void* workspace, size_t workspace_bytes,
                                     CUstream_st* stream, int device) {
  return backward<float>(g_out, x, logits, out, grad_x, grad_logits, g, psa_type, gemm, workspace, workspace_bytes,
                         stream, device);
}

const char* psa_attend_backward_cuda(const double* g_out, const double* x, const double* logits, const double* out,
                                     double* grad_x, double* grad_logits, const AttendGeom& g, int psa_type,
                                     const DeviceGemm<double>& gemm, void* workspace, size_t workspace_bytes,
                                     CUstream_st* stream, int device) {
  return backward<double>(g_out, x, logits, out, grad_x, grad_logits, g, psa_type, gemm, workspace,
                          workspace_bytes, stream, device);
}

const char* psa_attend_cuda_copy_2d(void* dst, size_t dpitch, const void* src, size_t spitch, size_t width_bytes,
                                    size_t rows, CUstream_st* stream) {
  if (rows == 0 || width_bytes == 0) return nullptr;
  const cudaError_t err =
      cudaMemcpy2DAsync(dst, dpitch, src, spitch, width_bytes, rows, cudaMemcpyDeviceToDevice, stream);
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace psa
}  // namespace segtwin
