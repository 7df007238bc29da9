// segtwin fused PSA aggregation: the CPU driver. Host only, no framework headers.
//
// The per-pixel bodies come from psa_attend_kernel.h. The dense products run through a GEMM the framework glue
// passes in (its own BLAS): the driver only ever hands it tiles, so no (HW, HW) matrix is ever formed. A tile is a
// band of whole pixel rows on one side (a few rows, ~kTilePixels pixels) and, on the other side, the rows of pixels
// that any of them pairs with through the window; pairs of the band outside the window have weight 0 in the tile.
// Work: C * HW * (mask_h rows * W) multiply-adds per product, i.e. O(C * HW * |window|) when the window spans the
// width (PSANet's full-coverage masks) and at most W/mask_w times that otherwise. Extra memory: O(HW * tile).
//
// Notation (psa_attend_kernel.h): out[c, p] = w0_p * S_c + sum_q D[q, p] x[c, q] with D = A - w0 inside windows.
// Backward, g = d loss / d out:
//   grad_x[c, q] = sum_p A[q, p] g[c, p] = sum_p D[q, p] g[c, p] + T_c,          T_c = sum_p w0_p g[c, p]
//   dA[q, p]     = sum_c x[c, q] g[c, p]
//   grad L[p, q] = A[q, p] (dA[q, p] - r_p) for q in win(p),   r_p = sum_q A[q, p] dA[q, p] = sum_c g[c, p] out[c, p]
// and grad L lands on the logit of the pair (the out-of-window zeros are constants). Every output element is
// written exactly once (no accumulation into the caller's buffers, no reliance on zeroed memory).
#ifndef SEGTWIN_PSA_ATTEND_CPU_H_
#define SEGTWIN_PSA_ATTEND_CPU_H_

#include <cstddef>
#include <cstdint>
#include <functional>
#include <vector>

#include "psa_attend_kernel.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace segtwin {
namespace psa {

// c (m x n, contiguous) = op(a) @ b, op(a) = a (m x k, row stride lda) or, with trans_a, a^T for a stored k x m
// (row stride lda); b is k x n with row stride ldb. Supplied by the glue (the framework's matmul).
template <typename T>
using Gemm = std::function<void(bool trans_a, int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b,
                                int64_t ldb, T* c)>;

constexpr int64_t kTilePixels = 256;

inline int64_t tile_rows(const AttendGeom& g) {
  const int64_t rows = kTilePixels / (g.w > 0 ? g.w : 1);
  return rows < 1 ? 1 : rows;
}

// Per-pixel softmax statistics of batch item n: m[p], inv_z[p].
template <typename T>
void attend_stats(const T* logits, const AttendGeom& g, int psa_type, int64_t n, T* m, T* inv_z, int threads) {
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && g.hw > 64)
#else
  (void)threads;
#endif
  for (int64_t p = 0; p < g.hw; ++p) row_stats(logits, g, psa_type, n, p, &m[p], &inv_z[p]);
}

// Fills the weight tile between a band of "tile" pixels [t0, t0 + nt) and the "other" pixels [o0, o0 + no):
// tile[o * nt + t] = D of the pair, with p and q assigned by `tile_is_p`.
template <typename T>
void fill_weights(const T* logits, const AttendGeom& g, int psa_type, int64_t n, const T* m, const T* inv_z,
                  bool tile_is_p, int64_t t0, int64_t nt, int64_t o0, int64_t no, T* tile, int threads) {
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && no * nt > 4096)
#else
  (void)threads;
#endif
  for (int64_t o = 0; o < no; ++o) {
    for (int64_t t = 0; t < nt; ++t) {
      const int64_t p = tile_is_p ? t0 + t : o0 + o;
      const int64_t q = tile_is_p ? o0 + o : t0 + t;
      const int64_t idx = pair_logit(g, psa_type, n, p, q);
      tile[o * nt + t] = idx < 0 ? T(0) : window_weight(logits[idx], m[p], inv_z[p]) - outside_weight(m[p], inv_z[p]);
    }
  }
}

template <typename T>
void psa_attend_forward_cpu(const T* x, const T* logits, T* out, const AttendGeom& g, int psa_type, const Gemm<T>& gemm,
                            int threads) {
  std::vector<T> m(g.hw), inv_z(g.hw), sums(g.c), tile, prod;
  const int64_t rows = tile_rows(g);
  for (int64_t n = 0; n < g.n; ++n) {
    const T* xn = x + n * g.c * g.hw;
    T* on = out + n * g.c * g.hw;
    attend_stats(logits, g, psa_type, n, m.data(), inv_z.data(), threads);
    for (int64_t c = 0; c < g.c; ++c) {
      T s = T(0);
      for (int64_t q = 0; q < g.hw; ++q) s += xn[c * g.hw + q];
      sums[c] = s;
    }
    for (int64_t r0 = 0; r0 < g.h; r0 += rows) {  // a band of p rows
      const int64_t r1 = imin(r0 + rows, g.h);
      int64_t lo = g.h, hi = 0;
      for (int64_t r = r0; r < r1; ++r) {
        int64_t a, b;
        q_rows_of_p_row(g, psa_type, r, &a, &b);
        if (a < b) lo = imin(lo, a), hi = imax(hi, b);
      }
      const int64_t p0 = r0 * g.w, np = (r1 - r0) * g.w;
      const int64_t q0 = lo * g.w, nq = hi > lo ? (hi - lo) * g.w : 0;
      prod.assign(static_cast<size_t>(g.c * np), T(0));
      if (nq > 0) {
        tile.resize(static_cast<size_t>(nq * np));
        fill_weights(logits, g, psa_type, n, m.data(), inv_z.data(), true, p0, np, q0, nq, tile.data(), threads);
        gemm(false, g.c, np, nq, xn + q0, g.hw, tile.data(), np, prod.data());
      }
      for (int64_t c = 0; c < g.c; ++c) {
        for (int64_t t = 0; t < np; ++t) {
          const int64_t p = p0 + t;
          on[c * g.hw + p] = prod[c * np + t] + outside_weight(m[p], inv_z[p]) * sums[c];
        }
      }
    }
  }
}

// grad_x and grad_logits from g_out = d loss / d out (all dense, contiguous, uninitialised on entry).
template <typename T>
void psa_attend_backward_cpu(const T* g_out, const T* x, const T* logits, const T* out, T* grad_x, T* grad_logits,
                             const AttendGeom& g, int psa_type, const Gemm<T>& gemm, int threads) {
  std::vector<T> m(g.hw), inv_z(g.hw), tsum(g.c), r(g.hw), tile, prod;
  const int64_t rows = tile_rows(g);
  for (int64_t n = 0; n < g.n; ++n) {
    const T* xn = x + n * g.c * g.hw;
    const T* gn = g_out + n * g.c * g.hw;
    const T* on = out + n * g.c * g.hw;
    T* gxn = grad_x + n * g.c * g.hw;
    attend_stats(logits, g, psa_type, n, m.data(), inv_z.data(), threads);
    for (int64_t c = 0; c < g.c; ++c) {
      T s = T(0);
      for (int64_t p = 0; p < g.hw; ++p) s += outside_weight(m[p], inv_z[p]) * gn[c * g.hw + p];
      tsum[c] = s;
    }
    for (int64_t p = 0; p < g.hw; ++p) {
      T s = T(0);
      for (int64_t c = 0; c < g.c; ++c) s += gn[c * g.hw + p] * on[c * g.hw + p];
      r[p] = s;
    }
    // grad_x, by bands of q rows: grad_x[:, band] = g[:, p rows pairing with the band] @ E + T.
    for (int64_t r0 = 0; r0 < g.h; r0 += rows) {
      const int64_t r1 = imin(r0 + rows, g.h);
      int64_t lo = g.h, hi = 0;
      for (int64_t rr = r0; rr < r1; ++rr) {
        int64_t a, b;
        p_rows_of_q_row(g, psa_type, rr, &a, &b);
        if (a < b) lo = imin(lo, a), hi = imax(hi, b);
      }
      const int64_t q0 = r0 * g.w, nq = (r1 - r0) * g.w;
      const int64_t p0 = lo * g.w, np = hi > lo ? (hi - lo) * g.w : 0;
      prod.assign(static_cast<size_t>(g.c * nq), T(0));
      if (np > 0) {
        tile.resize(static_cast<size_t>(np * nq));
        fill_weights(logits, g, psa_type, n, m.data(), inv_z.data(), false, q0, nq, p0, np, tile.data(), threads);
        gemm(false, g.c, nq, np, gn + p0, g.hw, tile.data(), nq, prod.data());
      }
      for (int64_t c = 0; c < g.c; ++c) {
        for (int64_t t = 0; t < nq; ++t) gxn[c * g.hw + q0 + t] = prod[c * nq + t] + tsum[c];
      }
    }
    // grad_logits, by bands of owner rows (p for collect, q for distribute): dA of the band against the partner
    // rows, then each logit of the band's pixels (every cell, zero where the partner is outside the image).
    for (int64_t r0 = 0; r0 < g.h; r0 += rows) {
      const int64_t r1 = imin(r0 + rows, g.h);
      int64_t lo = g.h, hi = 0;
      for (int64_t rr = r0; rr < r1; ++rr) {
        int64_t a, b;
        if (psa_type == kCollect) {
          q_rows_of_p_row(g, psa_type, rr, &a, &b);
        } else {
          p_rows_of_q_row(g, psa_type, rr, &a, &b);
        }
        if (a < b) lo = imin(lo, a), hi = imax(hi, b);
      }
      const int64_t o0 = r0 * g.w, no = (r1 - r0) * g.w;    // owners
      const int64_t t0 = lo * g.w, nt = hi > lo ? (hi - lo) * g.w : 0;  // partners
      if (nt > 0) {
        // dA rows = partners, columns = owners. collect: dA[q, p] = x[:, q]^T g[:, p]; distribute: the partner is
        // p and the owner q: dA^T[p, q] = g[:, p]^T x[:, q].
        prod.resize(static_cast<size_t>(nt * no));
        if (psa_type == kCollect) {
          gemm(true, nt, no, g.c, xn + t0, g.hw, gn + o0, g.hw, prod.data());
        } else {
          gemm(true, nt, no, g.c, gn + t0, g.hw, xn + o0, g.hw, prod.data());
        }
      }
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && no * g.cells > 4096)
#endif
      for (int64_t o = 0; o < no; ++o) {
        const int64_t owner = o0 + o;
        for (int64_t i = 0; i < g.mask_h; ++i) {
          for (int64_t j = 0; j < g.mask_w; ++j) {
            const int64_t partner = cell_partner(g, owner, i, j);
            const int64_t idx = (n * g.cells + i * g.mask_w + j) * g.hw + owner;
            if (partner < 0) {
              grad_logits[idx] = T(0);
              continue;
            }
            const int64_t p = psa_type == kCollect ? owner : partner;
            const T a = window_weight(logits[idx], m[p], inv_z[p]);
            grad_logits[idx] = a * (prod[(partner - t0) * no + o] - r[p]);
          }
        }
      }
    }
  }
}

inline int attend_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace psa
}  // namespace segtwin

#endif  // SEGTWIN_PSA_ATTEND_CPU_H_
