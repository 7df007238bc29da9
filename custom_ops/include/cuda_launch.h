// segtwin CUDA launch helpers shared by the psa_mask and psa_attend kernels (psa_mask.cu, psa_attend.cu). Include
// from .cu files only: it needs the CUDA runtime header. No framework headers.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace segtwin {
namespace psa {

// Makes `device` the calling thread's current device and restores the previous one on scope exit (also when a
// framework callback throws). ok() is false when either CUDA call failed: the caller must not launch then.
class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    ok_ = cudaGetDevice(&previous_) == cudaSuccess;
    if (ok_ && previous_ != device) ok_ = cudaSetDevice(device) == cudaSuccess;
  }
  ~DeviceScope() {
    if (ok_) cudaSetDevice(previous_);
  }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;
  bool ok() const { return ok_; }

 private:
  int previous_ = 0;
  bool ok_ = false;
};

// The grid-size cap of a grid-stride kernel: `blocks_per_sm` blocks on each multiprocessor of `device` (enough to
// fill it many times over; the grid-stride loop covers the rest).
inline cudaError_t grid_cap(int device, int64_t blocks_per_sm, int64_t* cap) {
  int sms = 0;
  const cudaError_t err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err == cudaSuccess) *cap = static_cast<int64_t>(sms > 0 ? sms : 1) * blocks_per_sm;
  return err;
}

}  // namespace psa
}  // namespace segtwin
