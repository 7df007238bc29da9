// segtwin PSA mask: the CPU loops over the bodies of psa_mask_kernel.h. Host only, no framework headers.
//
// Parallel over destination planes (n, channel) with OpenMP, each plane's rows in turn. Every destination element
// is written exactly once in a single pass (zeros and copied values), so the output buffer may come from an uninitialised allocation.
//
// The op moves values and never does arithmetic on them, so one instantiation per element width serves every
// floating type: float (4 bytes), double (8 bytes), and uint16_t for the bit patterns of float16 / bfloat16
// (their +0.0 is the all-zero pattern, which is what T(0) writes).
#ifndef SEGTWIN_PSA_MASK_CPU_H_
#define SEGTWIN_PSA_MASK_CPU_H_

#include <cstdint>

#include "psa_mask_kernel.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace segtwin {
namespace psa {

// Below this many destination elements the loop stays on the calling thread (a parallel region costs more).
constexpr int64_t kCpuParallelGrain = 1 << 15;

template <typename T>
inline void fill_row(T* dst, const T* src, const PsaRow& r, int64_t width) {
  int64_t col = 0;
  for (; col < r.lo; ++col) dst[col] = T(0);
  // Index arithmetic stays in int64 (r.base alone may lie outside the buffer; base + col*stride never does).
  for (; col < r.hi; ++col) dst[col] = src[r.base + col * r.stride];
  for (; col < width; ++col) dst[col] = T(0);
}

// forward == true: dst = out (N, HW, H, W), src = x (N, C, H, W).
// forward == false: dst = grad_x (N, C, H, W), src = grad_out (N, HW, H, W).
// Work item = one destination plane (n, channel): its row number is split once (split_row, the CUDA kernel's
// splitter) and its H rows are walked with the shared row bodies, each row written in one pass.
template <typename T>
void psa_mask_cpu(const T* src, T* dst, const PsaGeom& g, int psa_type, bool forward, int num_threads) {
  const int64_t planes = g.n * (forward ? g.hw : g.c);
  const int64_t width = g.w;
  const int64_t plane_size = g.h * width;
#ifdef _OPENMP
  const bool parallel = num_threads > 1 && planes * plane_size >= kCpuParallelGrain;
#pragma omp parallel for schedule(static) num_threads(num_threads) if (parallel)
#else
  (void)num_threads;  // built without OpenMP: one thread
#endif
  for (int64_t p = 0; p < planes; ++p) {
    const PsaRowCoord rc = split_row<int64_t>(g, forward, p * g.h);  // row 0 of the plane
    T* out = dst + p * plane_size;
    for (int64_t r = 0; r < g.h; ++r) {
      const PsaRow row = forward ? forward_row_at(g, psa_type, rc.n, rc.a, rc.b, r)
                                 : backward_row_at(g, psa_type, rc.n, rc.a, rc.b, r);
      fill_row(out + r * width, src, row, width);
    }
  }
}

// Threads to use when the framework does not say: OpenMP's default (OMP_NUM_THREADS, else the core count).
inline int default_cpu_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// Entry point of the glue: validates the geometry (the same rule as the CUDA launcher) and dispatches on the
// element width (2, 4 or 8 bytes). Returns nullptr on success, otherwise a message (static storage).
inline const char* psa_mask_cpu_bytes(const void* src, void* dst, int elem_bytes, const PsaGeom& g, int psa_type,
                                      bool forward, int num_threads) {
  if (psa_type != kCollect && psa_type != kDistribute) return "psa_mask_cpu: psa_type must be 0 or 1";
  if (g.n < 0 || !mask_side_ok(g.mask_h) || !mask_side_ok(g.mask_w) || !area_fits(g.h, g.w)) {
    return "psa_mask_cpu: invalid sizes (mask sides must be in [1, 2**31-1], H*W must fit in int64)";
  }
  switch (elem_bytes) {
    case 2:
      psa_mask_cpu(static_cast<const uint16_t*>(src), static_cast<uint16_t*>(dst), g, psa_type, forward,
                   num_threads);
      return nullptr;
    case 4:
      psa_mask_cpu(static_cast<const float*>(src), static_cast<float*>(dst), g, psa_type, forward, num_threads);
      return nullptr;
    case 8:
      psa_mask_cpu(static_cast<const double*>(src), static_cast<double*>(dst), g, psa_type, forward,
                   num_threads);
      return nullptr;
    default:
      return "psa_mask_cpu: element size must be 2, 4 or 8 bytes";
  }
}

}  // namespace psa
}  // namespace segtwin

#endif  // SEGTWIN_PSA_MASK_CPU_H_
