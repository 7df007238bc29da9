// segtwin PSA mask: CUDA kernels and their launcher. No framework headers (compiles with plain nvcc).
//
// One thread per destination element runs the shared body `gather_flat` (psa_mask_kernel.h): it splits its flat
// index into (row, column), takes the row's source map and gathers one value (or writes 0). Consecutive threads write consecutive addresses of the
// destination's innermost dimension (coalesced stores). Every destination element is written by exactly one
// thread in a single launch: there is no separate zeroing pass to race with, no atomics, and the destination may
// come from an uninitialised allocation.
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_launch.h"
#include "psa_mask_cuda.h"
#include "psa_mask_kernel.h"

namespace segtwin {
namespace psa {
namespace {

constexpr int kThreads = 256;

template <typename T, typename Index>
__global__ void __launch_bounds__(kThreads)
    psa_mask_gather_kernel(const T* __restrict__ src, T* __restrict__ dst, PsaGeom g, int psa_type, bool forward,
                           Index total) {
  const Index step = static_cast<Index>(gridDim.x) * static_cast<Index>(blockDim.x);
  for (Index idx = static_cast<Index>(blockIdx.x) * static_cast<Index>(blockDim.x) + threadIdx.x; idx < total;
       idx += step) {
    gather_flat<T, Index>(src, dst, g, psa_type, forward, idx);
  }
}

template <typename T>
cudaError_t launch(const void* src, void* dst, const PsaGeom& g, int psa_type, bool forward, int64_t total,
                   cudaStream_t stream, int device) {
  int64_t cap = 0;
  const cudaError_t err = grid_cap(device, 64, &cap);
  if (err != cudaSuccess) return err;
  const int64_t needed = (total + kThreads - 1) / kThreads;
  const unsigned blocks = static_cast<unsigned>(needed < cap ? needed : cap);
  const T* s = static_cast<const T*>(src);
  T* d = static_cast<T*>(dst);
  // 32-bit index arithmetic whenever the flat index (plus one grid-stride step) cannot overflow it.
  const int64_t headroom = static_cast<int64_t>(blocks) * kThreads;
  if (total + headroom < (static_cast<int64_t>(1) << 32)) {
    psa_mask_gather_kernel<T, uint32_t>
        <<<blocks, kThreads, 0, stream>>>(s, d, g, psa_type, forward, static_cast<uint32_t>(total));
  } else {
    psa_mask_gather_kernel<T, int64_t><<<blocks, kThreads, 0, stream>>>(s, d, g, psa_type, forward, total);
  }
  return cudaGetLastError();
}

}  // namespace

const char* psa_mask_cuda(const void* src, void* dst, int elem_bytes, int64_t n, int64_t mask_h, int64_t mask_w,
                          int64_t h, int64_t w, int psa_type, bool forward, CUstream_st* stream, int device) {
  if (psa_type != kCollect && psa_type != kDistribute) return "psa_mask_cuda: psa_type must be 0 or 1";
  if (n < 0 || !mask_side_ok(mask_h) || !mask_side_ok(mask_w) || !area_fits(h, w)) {
    return "psa_mask_cuda: invalid sizes (mask sides must be in [1, 2**31-1], H*W must fit in int64)";
  }
  const PsaGeom g = make_geom(n, mask_h, mask_w, h, w);
  const int64_t total = (forward ? forward_rows(g) : backward_rows(g)) * g.w;
  if (total == 0) return nullptr;
  DeviceScope scope(device);
  if (!scope.ok()) return "psa_mask_cuda: cannot select the tensor's CUDA device";
  cudaError_t err = cudaSuccess;
  switch (elem_bytes) {
    case 2:
      err = launch<uint16_t>(src, dst, g, psa_type, forward, total, stream, device);
      break;
    case 4:
      err = launch<float>(src, dst, g, psa_type, forward, total, stream, device);
      break;
    case 8:
      err = launch<double>(src, dst, g, psa_type, forward, total, stream, device);
      break;
    default:
      return "psa_mask_cuda: element size must be 2, 4 or 8 bytes";
  }
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace psa
}  // namespace segtwin
