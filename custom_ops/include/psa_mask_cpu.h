// segtwin PSA mask: the CPU loops over the bodies of psa_mask_kernel.h. Host only, no framework headers.
//
// Parallel (OpenMP) over groups of destination rows that share their source rows (see psa_mask_cpu below). Every
// destination element is written exactly once in a single pass (zeros and copied values), so the output buffer may
// come from an uninitialised allocation.
//
// The op moves values and never does arithmetic on them, so one instantiation per element width serves every
// floating type: float (4 bytes), double (8 bytes), and uint16_t for the bit patterns of float16 / bfloat16
// (their +0.0 is the all-zero pattern, which is what T(0) writes).
#ifndef SEGTWIN_PSA_MASK_CPU_H_
#define SEGTWIN_PSA_MASK_CPU_H_

#include <cstddef>
#include <cstdint>
#include <vector>

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
//
// Traversal (cache blocking). A destination row of either direction reads its W values from W different source
// planes, so walking the destination plane by plane (each plane's H rows in turn) streams the whole source through
// the cache again for every plane. Instead, one work item is a GROUP of destination rows that share their source:
//   forward, item (n, kh, r): the rows r of the W planes k = kh*W + kw (kw = 0..W-1). With i = kh - r + half_h
//     (collect) or r - kh + half_h (distribute), all of them read the mask_w planes i*mask_w .. i*mask_w+mask_w-1 of
//     x at one feature row (collect: row r; distribute: row kh) -- mask_w*W values;
//   backward, item (n, i, ph): the rows ph of the mask_w planes i*mask_w + j (j = 0..mask_w-1). All of them read
//     the W planes of one feature row qh = ph + i - half_h of grad_out at one row (collect: row ph of planes
//     qh*W..qh*W+W-1; distribute: row qh of planes ph*W..ph*W+W-1) -- W*W values.
// The group's source (15-130 KB at PSANet's shapes) stays in L1/L2 while its rows are written, and each source row
// is brought in from memory once. The rows themselves are the same row bodies as before (forward_row_at /
// backward_row_at, shared with the CUDA kernel), each written in one pass: zeros, copies, zeros. Items write
// disjoint rows, so every destination element is still written exactly once.
// Floor division (b > 0), for the pack coordinates below.
inline int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

// A source offset k*plane + col from the group's origin (0 <= col < width <= plane) as an index of the packed copy
// pack[k*width + col]. Also converts a row's stride (+-1 plane and 0 or +1 column: 1 - HW, HW, HW + 1).
inline int64_t pack_index(int64_t offset, int64_t plane, int64_t width) {
  const int64_t k = floor_div(offset, plane);
  return k * width + (offset - k * plane);
}

// Bytes of packed source one work item may hold (per thread; the L2 cache is 0.5-1 MiB per core on current CPUs).
constexpr int64_t kPackBudgetBytes = 256 << 10;

template <typename T>
void psa_mask_cpu(const T* src, T* dst, const PsaGeom& g, int psa_type, bool forward, int num_threads) {
  const int64_t width = g.w;
  const int64_t groups = forward ? g.h : g.mask_h;      // kh (forward) or i (backward)
  const int64_t group_rows = forward ? g.w : g.mask_w;  // rows per group: kw = 0..W-1 or j = 0..mask_w-1
  const int64_t planes = forward ? g.hw : g.c;          // destination channels
  const int64_t src_rows = forward ? g.mask_w : g.w;    // source rows per group
  const int64_t src_planes = forward ? g.c : g.hw;      // source channels
  const int64_t pack_elems = src_rows * width;          // one group's packed source
  // Groups per work item: consecutive r (the row inside the destination planes), as many as the pack budget holds,
  // spread evenly over the H rows (e.g. 2 x 16 rather than 17 + 15).
  const int64_t pack_bytes = pack_elems * static_cast<int64_t>(sizeof(T));
  const int64_t max_rows = pack_bytes > 0 ? imax(kPackBudgetBytes / pack_bytes, 1) : g.h;
  const int64_t row_blocks = g.h > 0 ? (g.h + max_rows - 1) / max_rows : 0;
  const int64_t rows_per_item = row_blocks > 0 ? (g.h + row_blocks - 1) / row_blocks : 1;
  const int64_t items = g.n * groups * row_blocks;
#ifdef _OPENMP
  const bool parallel = num_threads > 1 && g.n * groups * g.h * group_rows * width >= kCpuParallelGrain;
#pragma omp parallel num_threads(num_threads) if (parallel)
#else
  (void)num_threads;  // built without OpenMP: one thread
#endif
  {
    // The item's source rows, copied into contiguous blocks (one per r): they are rows of distant planes (one plane
    // apart), whose addresses alias to the same cache sets; the copy is read sequentially once and then hit in cache.
    std::vector<T> pack(static_cast<size_t>(rows_per_item * pack_elems));
    std::vector<int64_t> origins(static_cast<size_t>(rows_per_item));
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
    for (int64_t item = 0; item < items; ++item) {
      const int64_t rb = item % row_blocks;
      const int64_t ng = item / row_blocks;
      const int64_t a = ng % groups;  // kh or i
      const int64_t n = ng / groups;
      const int64_t r0 = rb * rows_per_item;
      const int64_t r1 = imin(r0 + rows_per_item, g.h);
      for (int64_t r = r0; r < r1; ++r) {
        // The first source row of group r: forward x[n, i*mask_w, row, :]; backward grad_out[n, plane0, row, :].
        int64_t first_plane = -1, src_row = 0;
        if (forward) {
          const int64_t i = psa_type == kCollect ? a - r + g.half_h : r - a + g.half_h;
          if (i >= 0 && i < g.mask_h) {
            first_plane = i * g.mask_w;
            src_row = psa_type == kCollect ? r : a;
          }
        } else {
          const int64_t qh = r + a - g.half_h;
          if (qh >= 0 && qh < g.h) {
            first_plane = (psa_type == kCollect ? qh : r) * g.w;
            src_row = psa_type == kCollect ? r : qh;
          }
        }
        const int64_t origin = ((n * src_planes + (first_plane < 0 ? 0 : first_plane)) * g.h + src_row) * width;
        origins[r - r0] = origin;
        if (first_plane >= 0) {
          T* to = pack.data() + (r - r0) * pack_elems;
          for (int64_t k = 0; k < src_rows; ++k, to += width) {
            const T* from = src + origin + k * g.hw;
            for (int64_t col = 0; col < width; ++col) to[col] = from[col];
          }
        }
      }
      // Destination rows plane by plane: the item's rows r0..r1-1 of one plane are contiguous in memory.
      for (int64_t b = 0; b < group_rows; ++b) {  // kw or j
        const int64_t plane = forward ? a * g.w + b : a * g.mask_w + b;
        T* out = dst + ((n * planes + plane) * g.h + r0) * width;
        for (int64_t r = r0; r < r1; ++r, out += width) {
          PsaRow row = forward ? forward_row_at(g, psa_type, n, a, b, r) : backward_row_at(g, psa_type, n, a, b, r);
          if (row.lo < row.hi) {  // non-empty rows read group r's source: its packed copy
            // Convert through the row's first real element (its column lies in [0, W), unlike the base's).
            const int64_t first = pack_index(row.base + row.lo * row.stride - origins[r - r0], g.hw, width);
            row.stride = pack_index(row.stride, g.hw, width);
            row.base = first - row.lo * row.stride;
          }
          fill_row(out, pack.data() + (r - r0) * pack_elems, row, width);
        }
      }
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
