// segtwin PSA mask: the CPU loops over the geometry of psa_mask_kernel.h. Host only, no framework headers.
//
// Parallel (OpenMP) over blocks of destination rows that share their source rows (see psa_mask_cpu below). Every
// destination element is written exactly once (a copied value or a zero), so the output buffer may come from an
// uninitialised allocation.
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

#if defined(__SSE2__)
#include <immintrin.h>
#endif

namespace segtwin {
namespace psa {

// Below this many destination elements the loop stays on the calling thread (a parallel region costs more).
constexpr int64_t kCpuParallelGrain = 1 << 15;

// Bytes of stage one work item may hold (per thread; the L2 cache is 0.5-1 MiB per core on current CPUs).
constexpr int64_t kStageBudgetBytes = 256 << 10;

// 4x4 block transpose: out[j][k] = in[k][j], where in[k] and out[j] each point to 4 contiguous elements.
template <typename T>
inline void transpose4(const T* const in[4], T* const out[4]) {
  for (int j = 0; j < 4; ++j) {
    for (int k = 0; k < 4; ++k) out[j][k] = in[k][j];
  }
}

#if defined(__SSE2__)
// float (the type that matters for speed): four unaligned loads, the SSE shuffle transpose, four stores.
inline void transpose4(const float* const in[4], float* const out[4]) {
  __m128 r0 = _mm_loadu_ps(in[0]), r1 = _mm_loadu_ps(in[1]), r2 = _mm_loadu_ps(in[2]), r3 = _mm_loadu_ps(in[3]);
  _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
  _mm_storeu_ps(out[0], r0);
  _mm_storeu_ps(out[1], r1);
  _mm_storeu_ps(out[2], r2);
  _mm_storeu_ps(out[3], r3);
}
#endif

template <typename T>
inline void zero_run(T* dst, int64_t count) {
  for (int64_t e = 0; e < count; ++e) dst[e] = T(0);
}

// forward == true: dst = out (N, HW, H, W), src = x (N, C, H, W).
// forward == false: dst = grad_x (N, C, H, W), src = grad_out (N, HW, H, W).
//
// A destination row (length W) of either direction reads its W values from W different source planes, along a
// diagonal: the source index moves by one plane and by 0 or +-1 column per destination column (psa_mask_kernel.h).
// Gathering such a diagonal element by element from memory streams the source through the cache over and over; a
// plain packed copy with a strided gather (this loop's previous form) still pays a scalar load per element. So:
//
// Groups. For a destination "group" (a, r) -- forward: row r of the W planes kh*W .. kh*W+W-1 (a = kh); backward:
// row ph of the mask_w planes i*mask_w .. i*mask_w+mask_w-1 (a = i, r = ph) -- all its rows b read the same source
// rows P[s][c] = src[first_plane + s, src_row, c] (forward: the mask_w planes of window row i at one feature row;
// backward: the W planes of feature row qh at one row). With the group's destination D[b][col]:
//   forward collect     D[b][col] = P[b + half_w - col][col]     (b = kw)
//   forward distribute  D[b][col] = P[col - b + half_w][b]
//   backward collect    D[b][col] = P[col + b - half_w][col]      (b = j)
//   backward distribute D[b][col] = P[col][col + b - half_w]
// (a source index outside P reads zero: the window cell misses the image).
//
// Stage. The group's source is copied once into a per-thread stage M, transposed in 4x4 blocks (M[c][s] = P[s][c];
// backward distribute keeps M = P), with zero pads on either side so that every index above lands in M. Then, for
// all cases but forward distribute, D[b][col] = M[col][b + sigma*col + off] (sigma = -1, off = half_w forward;
// +1, -half_w backward): for a fixed col and b..b+3 that is 4 contiguous elements of M, so the destination is
// written in 4x4 transposed blocks too (4 row pieces of 4 columns per block). Forward distribute needs no second
// transpose: D[b][col] = M[b][col - b + half_w] is a contiguous piece of M's row b.
//
// Blocks of rows. One work item is a block of consecutive rows r of one (n, a) (as many stages as the budget holds,
// spread evenly over the H rows), so that each destination plane receives runs of rows x W contiguous elements.
// Destination rows that no window cell reaches are zeroed in one run per plane. Items write disjoint rows, and each
// destination element is written once (a transposed-block store, a tail store or a zero), so the output may be
// uninitialised memory.
template <typename T>
void psa_mask_cpu(const T* src, T* dst, const PsaGeom& g, int psa_type, bool forward, int num_threads) {
  const int64_t width = g.w;
  const int64_t groups = forward ? g.h : g.mask_h;                // a: kh (forward) or i (backward)
  const int64_t rows = forward ? g.w : g.mask_w;                  // b: kw or j, destination rows per (a, r)
  const int64_t planes = forward ? g.hw : g.c;                    // destination channels
  const int64_t src_planes = forward ? g.c : g.hw;                // source channels
  const int64_t entries = forward ? g.mask_w : g.w;               // valid range of the stage's inner index t
  const bool keep_p = !forward && psa_type == kDistribute;        // M = P (else M = P transposed)
  const bool row_copy = forward && psa_type == kDistribute;       // D[b] is a contiguous piece of M[b]
  const int64_t sigma = forward ? -1 : 1;
  const int64_t off = forward ? g.half_w : -g.half_w;
  // Destination rows [b_lo, b_hi) can hold a value; the inner index t of those rows spans [tmin, tmax].
  int64_t b_lo = 0, b_hi = rows, tmin, tmax;
  if (row_copy) {
    tmin = g.half_w - (rows - 1);
    tmax = width - 1 + g.half_w;
  } else if (sigma < 0) {  // t = b + off - col
    b_lo = imax(0, -off);
    b_hi = imin(rows, entries + width - 1 - off);
    tmin = b_lo + off - (width - 1);
    tmax = b_hi - 1 + off;
  } else {  // t = b + off + col
    b_lo = imax(0, -off - (width - 1));
    b_hi = imin(rows, entries - off);
    tmin = b_lo + off;
    tmax = b_hi - 1 + (width - 1) + off;
  }
  if (b_hi < b_lo) b_hi = b_lo;
  if (tmax < tmin) tmax = tmin;
  const int64_t t_lo = imax(tmin, 0), t_hi = imin(tmax + 1, entries);  // the part of M that holds source values
  const int64_t pitch = tmax - tmin + 1;                                 // M[row][t] at row*pitch + (t - tmin)
  const int64_t stage_elems = width * pitch;                             // W rows (M = P: W rows too, backward)
  const int64_t stage_bytes = stage_elems * static_cast<int64_t>(sizeof(T));
  const int64_t max_rows = stage_bytes > 0 ? imax(kStageBudgetBytes / stage_bytes, 1) : g.h;
  const int64_t row_blocks = g.h > 0 ? (g.h + max_rows - 1) / max_rows : 0;
  const int64_t rows_per_item = row_blocks > 0 ? (g.h + row_blocks - 1) / row_blocks : 1;
  const int64_t items = g.n * groups * row_blocks;
  const int64_t row_step = g.h * width;  // from destination row (b, r) to (b + 1, r)
#ifdef _OPENMP
  const bool parallel = num_threads > 1 && g.n * groups * g.h * rows * width >= kCpuParallelGrain;
#pragma omp parallel num_threads(num_threads) if (parallel)
#else
  (void)num_threads;  // built without OpenMP: one thread
#endif
  {
    // One stage per row of the item. Value-initialised: the pads are zero and stay zero (only [t_lo, t_hi) of each
    // stage row is ever written).
    std::vector<T> stage(static_cast<size_t>(rows_per_item * stage_elems));
    std::vector<char> has_source(static_cast<size_t>(rows_per_item));
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
    for (int64_t item = 0; item < items; ++item) {
      const int64_t rb = item % row_blocks;
      const int64_t na = item / row_blocks;
      const int64_t a = na % groups;
      const int64_t n = na / groups;
      const int64_t r0 = rb * rows_per_item;
      const int64_t r1 = imin(r0 + rows_per_item, g.h);
      bool any_source = false;
      for (int64_t r = r0; r < r1; ++r) {
        // The group's source: P[s][c] = p[s*hw + c] (forward: x[n, i*mask_w + s, row, c]; backward collect
        // grad_out[n, qh*W + s, ph, c]; backward distribute grad_out[n, ph*W + s, qh, c]).
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
        has_source[r - r0] = first_plane >= 0;
        if (first_plane < 0) continue;
        any_source = true;
        const T* const p = src + ((n * src_planes + first_plane) * g.h + src_row) * width;
        T* const m = stage.data() + (r - r0) * stage_elems;  // M[row][t] = m[row*pitch + t - tmin]
        if (keep_p) {
          for (int64_t s = 0; s < g.w; ++s) {
            const T* from = p + s * g.hw;
            T* to = m + s * pitch - tmin;
            for (int64_t c = 0; c < width; ++c) to[c] = from[c];
          }
          continue;
        }
        int64_t s = t_lo;
        for (; s + 4 <= t_hi; s += 4) {  // M[c][s..s+3] = P[s..s+3][c], in 4x4 blocks
          const T* in[4] = {p + s * g.hw, p + (s + 1) * g.hw, p + (s + 2) * g.hw, p + (s + 3) * g.hw};
          int64_t c = 0;
          for (; c + 4 <= width; c += 4) {
            const T* from[4] = {in[0] + c, in[1] + c, in[2] + c, in[3] + c};
            T* to[4] = {m + c * pitch + s - tmin, m + (c + 1) * pitch + s - tmin, m + (c + 2) * pitch + s - tmin,
                        m + (c + 3) * pitch + s - tmin};
            transpose4(from, to);
          }
          for (; c < width; ++c) {
            for (int k = 0; k < 4; ++k) m[c * pitch + s + k - tmin] = in[k][c];
          }
        }
        for (; s < t_hi; ++s) {
          const T* from = p + s * g.hw;
          for (int64_t c = 0; c < width; ++c) m[c * pitch + s - tmin] = from[c];
        }
      }
      T* const out0 = dst + ((n * planes + a * rows) * g.h + r0) * width;  // destination row (b, r) at
      const int64_t run = (r1 - r0) * width;                              //   out0 + b*row_step + (r - r0)*W
      for (int64_t b = 0; b < rows; ++b) {  // rows no window cell reaches (all of them if no row r has a source)
        if (any_source && b >= b_lo && b < b_hi) continue;
        zero_run(out0 + b * row_step, run);
      }
      if (!any_source) continue;
      if (row_copy) {  // forward distribute: D[b][col] = M[b][col - b + half_w]
        for (int64_t b = 0; b < rows; ++b) {
          T* o = out0 + b * row_step;
          for (int64_t r = r0; r < r1; ++r, o += width) {
            const T* from = stage.data() + (r - r0) * stage_elems + b * pitch + g.half_w - b - tmin;
            if (has_source[r - r0]) {
              for (int64_t col = 0; col < width; ++col) o[col] = from[col];
            } else {
              zero_run(o, width);
            }
          }
        }
        continue;
      }
      // D[b][col] = M[col][b + sigma*col + off] = diag[col*(pitch + sigma) + b], diag = M[0][off] of row r's stage.
      const int64_t col_step = pitch + sigma;
      int64_t b = b_lo;
      for (; b + 4 <= b_hi; b += 4) {
        for (int64_t r = r0; r < r1; ++r) {
          T* o[4] = {out0 + b * row_step, out0 + (b + 1) * row_step, out0 + (b + 2) * row_step,
                     out0 + (b + 3) * row_step};
          for (int k = 0; k < 4; ++k) o[k] += (r - r0) * width;
          if (!has_source[r - r0]) {
            for (int k = 0; k < 4; ++k) zero_run(o[k], width);
            continue;
          }
          const T* const diag = stage.data() + (r - r0) * stage_elems + off - tmin + b;
          int64_t col = 0;
          for (; col + 4 <= width; col += 4) {
            const T* from[4] = {diag + col * col_step, diag + (col + 1) * col_step, diag + (col + 2) * col_step,
                                diag + (col + 3) * col_step};
            T* to[4] = {o[0] + col, o[1] + col, o[2] + col, o[3] + col};
            transpose4(from, to);
          }
          for (; col < width; ++col) {
            for (int k = 0; k < 4; ++k) o[k][col] = diag[col * col_step + k];
          }
        }
      }
      for (; b < b_hi; ++b) {
        T* o = out0 + b * row_step;
        for (int64_t r = r0; r < r1; ++r, o += width) {
          const T* const diag = stage.data() + (r - r0) * stage_elems + off - tmin + b;
          if (has_source[r - r0]) {
            for (int64_t col = 0; col < width; ++col) o[col] = diag[col * col_step];
          } else {
            zero_run(o, width);
          }
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
