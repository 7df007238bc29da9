// segtwin fused PSA aggregation: the CPU driver. Host only, no framework headers.
//
// Notation (psa_attend_kernel.h): out[c, p] = w0_p * S_c + sum_q D[q, p] x[c, q] with D = A - w0 inside windows.
// Backward, g = d loss / d out:
//   grad_x[c, q] = sum_p A[q, p] g[c, p] = sum_p D[q, p] g[c, p] + T_c,          T_c = sum_p w0_p g[c, p]
//   dA[q, p]     = sum_c x[c, q] g[c, p]
//   grad L[p, q] = A[q, p] (dA[q, p] - r_p) for q in win(p),   r_p = sum_q A[q, p] dA[q, p] = sum_c g[c, p] out[c, p]
// and grad L lands on the logit of the pair (the out-of-window zeros are constants).
//
// How the work is laid out (each pass touches memory in long contiguous runs):
//  * statistics m_p, 1/Z_p, w0_p: cell by cell over the logits in their own layout (N, cells, H, W) -- for one
//    cell the pairs of consecutive pixels of a row have consecutive logits -- one max pass and one exp pass, the
//    threads splitting the image rows;
//  * products: the image is cut into bands of whole pixel rows; for a band, a weight tile (band pixels x the
//    pixel rows their windows reach) is filled in groups of kGroup consecutive pixels of one row, cell by cell (kGroup
//    consecutive logits read, kGroup exps, kGroup tile rows each written left to right), then multiplied by the
//    framework's own GEMM (passed in by the glue). The tile is at most tile_bytes(), so no (HW, HW) matrix is formed.
// Work: C * HW * (mask_h rows * W) multiply-adds per product -- O(C * HW * |window|) for PSANet's full-coverage
// masks -- and 2 (forward) or 4 (backward) exps per pair. Extra memory: O(HW) statistics plus one tile.
// Every output element is written exactly once (no accumulation into the caller's buffers, no reliance on zeroed
// memory).
#ifndef SEGTWIN_PSA_ATTEND_CPU_H_
#define SEGTWIN_PSA_ATTEND_CPU_H_

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <vector>

#include "psa_attend_kernel.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace segtwin {
namespace psa {

// c (m x n, contiguous) = op(a) @ op(b). op(a) is m x k: a stored m x k (row stride lda) or, with trans_a, a^T for
// a stored k x m; op(b) is k x n: b stored k x n (row stride ldb) or, with trans_b, b^T for b stored n x k.
// Supplied by the glue (the framework's matmul).
template <typename T>
using Gemm = std::function<void(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const T* a, int64_t lda,
                                const T* b, int64_t ldb, T* c)>;

constexpr int64_t kGroup = 128;  // consecutive pixels of one row filled together (long contiguous logit runs)

// Cells ahead whose logit run the fill loops prefetch.
constexpr int64_t kAhead = 2;

template <typename T>
inline void prefetch_run(const T* p, int64_t len) {
  for (int64_t k = 0; k < len; k += 64 / static_cast<int64_t>(sizeof(T))) __builtin_prefetch(p + k, 0, 3);
}

// Upper bound of one weight tile in bytes: 32 MiB unless $SEGTWIN_PSA_ATTEND_TILE_BYTES says otherwise.
inline int64_t tile_bytes() { return tile_bytes_or(int64_t(32) << 20); }

// Rows per band: a tile of band pixels x (at most) every pixel of the map stays within tile_bytes().
template <typename T>
int64_t band_rows(const AttendGeom& g) {
  const int64_t per_row = g.w * g.hw * static_cast<int64_t>(sizeof(T));
  const int64_t rows = per_row > 0 ? tile_bytes() / per_row : g.h;
  return imax(1, imin(rows, g.h));
}

// [lo, hi) of the partner rows of the rows [r0, r1): `rows_of(r)` gives the span of one row.
template <typename RowsOf>
void partner_rows(const AttendGeom& g, int64_t r0, int64_t r1, RowsOf rows_of, int64_t* lo, int64_t* hi) {
  *lo = g.h;
  *hi = 0;
  for (int64_t r = r0; r < r1; ++r) {
    int64_t a, b;
    rows_of(r, &a, &b);
    if (a < b) *lo = imin(*lo, a), *hi = imax(*hi, b);
  }
  if (*hi < *lo) *hi = *lo;
}

template <typename T>
struct Stats {
  std::vector<T> m, inv_z, w0;  // per pixel p: max, 1/Z and the out-of-window weight exp(-m)/Z
};

// The softmax statistics of every pixel p of batch item n (logits_n: that item's (cells, H, W) logits).
template <typename T>
void attend_stats(const T* logits_n, const AttendGeom& g, int psa_type, Stats<T>* st, int threads) {
  st->m.assign(static_cast<size_t>(g.hw), T(0));  // the out-of-window zeros take part in the max
  st->inv_z.assign(static_cast<size_t>(g.hw), T(0));
  st->w0.resize(static_cast<size_t>(g.hw));
  T* m = st->m.data();
  T* z = st->inv_z.data();  // Z first, inverted at the end
  const int64_t chunks = imax(1, imin(threads, g.h));
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(threads) if (chunks > 1)
#endif
  for (int64_t ch = 0; ch < chunks; ++ch) {
    const int64_t ra = g.h * ch / chunks, rb = g.h * (ch + 1) / chunks;
    for (int pass = 0; pass < 2; ++pass) {
      for (int64_t i = 0; i < g.mask_h; ++i) {
        for (int64_t j = 0; j < g.mask_w; ++j) {
          const CellMap cm = cell_map(g, psa_type, true, i, j);
          int64_t rlo, rhi, clo, chi;
          partner_span(g.h, cm.fh, &rlo, &rhi);
          partner_span(g.w, cm.fw, &clo, &chi);
          rlo = imax(rlo, ra);
          rhi = imin(rhi, rb);
          const T* lc = logits_n + cm.cell * g.hw + cm.logit_off;
          for (int64_t r = rlo; r < rhi; ++r) {
            const int64_t p0 = r * g.w;
            if (pass == 0) {
              for (int64_t c = clo; c < chi; ++c) m[p0 + c] = lc[p0 + c] > m[p0 + c] ? lc[p0 + c] : m[p0 + c];
            } else {
              for (int64_t c = clo; c < chi; ++c) z[p0 + c] += exp_nonpos(lc[p0 + c] - m[p0 + c]);
            }
          }
        }
      }
    }
    for (int64_t p = ra * g.w; p < rb * g.w; ++p) {
      const T e0 = exp_nonpos(-m[p]);
      const T inv = T(1) / (z[p] + static_cast<T>(g.hw - window_count(g, psa_type, p)) * e0);
      z[p] = inv;
      st->w0[p] = e0 * inv;
    }
  }
}

// The correction tile of one band: tile[t * ldt + (v - v0)] = D of the pair of tile pixel u = u0 + t and other
// pixel v, for the band's whole rows [r0, r1) and the other pixels [v0, v0 + ldt) (whole rows covering every
// partner of the band); 0 for pairs outside the window. u is p (forward) or q (backward, grad_x).
template <typename T>
void fill_tile(const T* logits_n, const AttendGeom& g, int psa_type, bool tile_is_p, const Stats<T>& st, int64_t r0,
               int64_t r1, int64_t v0, int64_t ldt, T* tile, int threads) {
  const int64_t groups_per_row = (g.w + kGroup - 1) / kGroup;
  const int64_t items = (r1 - r0) * groups_per_row;
  const int64_t u0 = r0 * g.w;
  const T* m = st.m.data();
  const T* iz = st.inv_z.data();
  const T* w0 = st.w0.data();
  // The partner offsets (fh, fw) of the window cells span [fh_lo, fh_hi] x [fw_lo, fw_hi] (monotone in i and j).
  const CellMap first = cell_map(g, psa_type, tile_is_p, 0, 0);
  const CellMap last = cell_map(g, psa_type, tile_is_p, g.mask_h - 1, g.mask_w - 1);
  const int64_t fh_lo = imin(first.fh, last.fh), fh_hi = imax(first.fh, last.fh);
  const int64_t fw_lo = imin(first.fw, last.fw), fw_hi = imax(first.fw, last.fw);
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && items > 1)
#endif
  for (int64_t it = 0; it < items; ++it) {
    const int64_t r = r0 + it / groups_per_row;
    const int64_t c0 = (it % groups_per_row) * kGroup, c1 = imin(c0 + kGroup, g.w);
    for (int64_t c = c0; c < c1; ++c) {  // zeros where the window does not reach (the cells write the rest)
      T* row = tile + (r * g.w + c - u0) * ldt;
      const int64_t wr0 = imax(r + fh_lo, 0), wr1 = imin(r + fh_hi + 1, g.h);
      const int64_t wc0 = imax(c + fw_lo, 0), wc1 = imin(c + fw_hi + 1, g.w);
      for (int64_t vr = v0 / g.w; vr < (v0 + ldt) / g.w; ++vr) {
        T* seg = row + vr * g.w - v0;
        const bool inside = vr >= wr0 && vr < wr1 && wc0 < wc1;
        for (int64_t k = 0; k < (inside ? wc0 : g.w); ++k) seg[k] = T(0);
        if (inside) {
          for (int64_t k = wc1; k < g.w; ++k) seg[k] = T(0);
        }
      }
    }
    T val[kGroup];
    for (int64_t i = 0; i < g.mask_h; ++i) {
      for (int64_t j = 0; j < g.mask_w; ++j) {
        const CellMap cm = cell_map(g, psa_type, tile_is_p, i, j);
        const int64_t vr = r + cm.fh;
        if (vr < 0 || vr >= g.h) break;  // the whole window row i is outside the image
        int64_t clo, chi;
        partner_span(g.w, cm.fw, &clo, &chi);
        clo = imax(clo, c0);
        chi = imin(chi, c1);
        if (clo >= chi) continue;
        const int64_t u = r * g.w + clo, len = chi - clo;
        const T* lc = logits_n + cm.cell * g.hw + cm.logit_off + u;
        // The runs of consecutive cells lie a whole plane apart, too far for the hardware prefetchers: ask for the
        // run kAhead cells on while this one is computed (same u; the logit offset moves by at most kAhead).
        if (cm.cell + kAhead < g.cells) prefetch_run(lc + kAhead * g.hw - kAhead, len + 2 * kAhead);
        const T* ms = m + cm.stats_off + u;
        const T* is = iz + cm.stats_off + u;
        const T* ws = w0 + cm.stats_off + u;
        for (int64_t k = 0; k < len; ++k) val[k] = exp_nonpos(lc[k] - ms[k]) * is[k] - ws[k];
        T* dst = tile + (u - u0) * ldt + (vr * g.w + clo + cm.fw - v0);
        for (int64_t k = 0; k < len; ++k) dst[k * (ldt + 1)] = val[k];
      }
    }
  }
}

template <typename T>
void psa_attend_forward_cpu(const T* x, const T* logits, T* out, const AttendGeom& g, int psa_type, const Gemm<T>& gemm,
                            int threads) {
  Stats<T> st;
  std::vector<T> sums(static_cast<size_t>(g.c)), tile, prod;
  const int64_t rows = band_rows<T>(g);
  for (int64_t n = 0; n < g.n; ++n) {
    const T* xn = x + n * g.c * g.hw;
    const T* ln = logits + n * g.cells * g.hw;
    T* on = out + n * g.c * g.hw;
    attend_stats(ln, g, psa_type, &st, threads);
    for (int64_t c = 0; c < g.c; ++c) {
      T s = T(0);
      for (int64_t q = 0; q < g.hw; ++q) s += xn[c * g.hw + q];
      sums[c] = s;
    }
    for (int64_t r0 = 0; r0 < g.h; r0 += rows) {  // a band of p rows against the q rows of their windows
      const int64_t r1 = imin(r0 + rows, g.h);
      int64_t lo, hi;
      partner_rows(g, r0, r1, [&](int64_t r, int64_t* a, int64_t* b) { q_rows_of_p_row(g, psa_type, r, a, b); },
                   &lo, &hi);
      const int64_t p0 = r0 * g.w, np = (r1 - r0) * g.w, q0 = lo * g.w, nq = (hi - lo) * g.w;
      prod.assign(static_cast<size_t>(g.c * np), T(0));
      if (nq > 0) {
        tile.resize(static_cast<size_t>(np * nq));
        fill_tile(ln, g, psa_type, true, st, r0, r1, q0, nq, tile.data(), threads);
        gemm(false, true, g.c, np, nq, xn + q0, g.hw, tile.data(), nq, prod.data());
      }
      for (int64_t c = 0; c < g.c; ++c) {
        const T* pr = prod.data() + c * np;
        const T* w0 = st.w0.data() + p0;
        T* dst = on + c * g.hw + p0;
        for (int64_t t = 0; t < np; ++t) dst[t] = pr[t] + w0[t] * sums[c];
      }
    }
  }
}

// grad_x and grad_logits from g_out = d loss / d out (all dense, contiguous, uninitialised on entry).
template <typename T>
void psa_attend_backward_cpu(const T* g_out, const T* x, const T* logits, const T* out, T* grad_x, T* grad_logits,
                             const AttendGeom& g, int psa_type, const Gemm<T>& gemm, int threads) {
  Stats<T> st;
  std::vector<T> tsum(static_cast<size_t>(g.c)), r(static_cast<size_t>(g.hw)), tile, prod;
  const int64_t rows = band_rows<T>(g);
  for (int64_t n = 0; n < g.n; ++n) {
    const T* xn = x + n * g.c * g.hw;
    const T* gn = g_out + n * g.c * g.hw;
    const T* on = out + n * g.c * g.hw;
    const T* ln = logits + n * g.cells * g.hw;
    T* gxn = grad_x + n * g.c * g.hw;
    T* gln = grad_logits + n * g.cells * g.hw;
    attend_stats(ln, g, psa_type, &st, threads);
    for (int64_t c = 0; c < g.c; ++c) {
      T s = T(0);
      for (int64_t p = 0; p < g.hw; ++p) s += st.w0[p] * gn[c * g.hw + p];
      tsum[c] = s;
    }
    for (int64_t p = 0; p < g.hw; ++p) r[p] = T(0);
    for (int64_t c = 0; c < g.c; ++c) {
      for (int64_t p = 0; p < g.hw; ++p) r[p] += gn[c * g.hw + p] * on[c * g.hw + p];
    }
    // grad_x, by bands of q rows: grad_x[:, band] = g[:, p rows pairing with the band] @ D^T + T.
    for (int64_t r0 = 0; r0 < g.h; r0 += rows) {
      const int64_t r1 = imin(r0 + rows, g.h);
      int64_t lo, hi;
      partner_rows(g, r0, r1, [&](int64_t rr, int64_t* a, int64_t* b) { p_rows_of_q_row(g, psa_type, rr, a, b); },
                   &lo, &hi);
      const int64_t q0 = r0 * g.w, nq = (r1 - r0) * g.w, p0 = lo * g.w, np = (hi - lo) * g.w;
      prod.assign(static_cast<size_t>(g.c * nq), T(0));
      if (np > 0) {
        tile.resize(static_cast<size_t>(nq * np));
        fill_tile(ln, g, psa_type, false, st, r0, r1, p0, np, tile.data(), threads);
        gemm(false, true, g.c, nq, np, gn + p0, g.hw, tile.data(), np, prod.data());
      }
      for (int64_t c = 0; c < g.c; ++c) {
        for (int64_t t = 0; t < nq; ++t) gxn[c * g.hw + q0 + t] = prod[c * nq + t] + tsum[c];
      }
    }
    // grad_logits, by bands of owner rows (p for collect, q for distribute): dA of the band's owners against their
    // partners (owner-major), then every logit of the band: cell by cell over groups of consecutive owners.
    for (int64_t r0 = 0; r0 < g.h; r0 += rows) {
      const int64_t r1 = imin(r0 + rows, g.h);
      int64_t lo, hi;  // partner = owner + d for both types
      partner_rows(g, r0, r1, [&](int64_t rr, int64_t* a, int64_t* b) { q_rows_of_p_row(g, kCollect, rr, a, b); },
                   &lo, &hi);
      const int64_t o0 = r0 * g.w, no = (r1 - r0) * g.w, t0 = lo * g.w, nt = (hi - lo) * g.w;
      if (nt > 0) {
        // collect: owners p, partners q: dA^T[p, q] = g[:, p]^T x[:, q]; distribute: owners q, partners p:
        // dA[q, p] = x[:, q]^T g[:, p].
        prod.resize(static_cast<size_t>(no * nt));
        const T* own = psa_type == kCollect ? gn : xn;
        const T* par = psa_type == kCollect ? xn : gn;
        gemm(true, false, no, nt, g.c, own + o0, g.hw, par + t0, g.hw, prod.data());
      }
      const int64_t groups_per_row = (g.w + kGroup - 1) / kGroup;
      const int64_t items = (r1 - r0) * groups_per_row;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && items > 1)
#endif
      for (int64_t it = 0; it < items; ++it) {
        const int64_t row = r0 + it / groups_per_row;
        const int64_t c0 = (it % groups_per_row) * kGroup, c1 = imin(c0 + kGroup, g.w);
        for (int64_t i = 0; i < g.mask_h; ++i) {
          for (int64_t j = 0; j < g.mask_w; ++j) {
            // seen from the owner: the partner is owner + d, the logit at the owner, the statistics at p
            const CellMap cm = cell_map(g, kCollect, true, i, j);
            const int64_t stats_off = psa_type == kCollect ? 0 : cm.fh * g.w + cm.fw;
            T* dst = gln + cm.cell * g.hw + row * g.w;
            int64_t clo = c1, chi = c1;  // the owners of the group whose partner is inside the image
            const int64_t pr = row + cm.fh;
            if (pr >= 0 && pr < g.h) {
              partner_span(g.w, cm.fw, &clo, &chi);
              clo = imin(imax(clo, c0), c1);
              chi = imax(imin(chi, c1), clo);
            }
            for (int64_t c = c0; c < clo; ++c) dst[c] = T(0);  // no pair, no logit: gradient 0
            for (int64_t c = chi; c < c1; ++c) dst[c] = T(0);
            if (clo == chi) continue;
            const int64_t u = row * g.w + clo, len = chi - clo;
            const T* lc = ln + cm.cell * g.hw + u;
            if (cm.cell + kAhead < g.cells) prefetch_run(lc + kAhead * g.hw, len);  // as in fill_tile
            const T* ms = st.m.data() + stats_off + u;
            const T* is = st.inv_z.data() + stats_off + u;
            const T* rs = r.data() + stats_off + u;
            const T* da = prod.data() + (u - o0) * nt + (u + cm.fh * g.w + cm.fw - t0);
            T dav[kGroup];
            for (int64_t k = 0; k < len; ++k) dav[k] = da[k * (nt + 1)];
            for (int64_t k = 0; k < len; ++k) dst[clo + k] = exp_nonpos(lc[k] - ms[k]) * is[k] * (dav[k] - rs[k]);
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
