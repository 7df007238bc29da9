// segtwin fused PSA aggregation: the band driver of the CUDA path and its element bodies. No framework headers, no
// CUDA headers: the driver is a template over an executor `Exec` whose `const char* each(int64_t total, const F& f)`
// runs f(i) for every i in [0, total) and returns nullptr (or an error message). ../cuda/psa_attend.cu instantiates it
// with a CUDA executor (one grid-stride kernel launch per call, on the caller's stream); the tests instantiate it with
// a serial host loop and a naive GEMM, so that the index arithmetic of the CUDA path runs on machines without a GPU.
//
// Same mathematics, passes, bands and tile layouts as the CPU driver (psa_attend_cpu.h; notation of
// psa_attend_kernel.h), with one thread per element instead of cache-friendly groups:
//  * statistics m_p, 1/Z_p, w0_p: one thread per pixel p (pixel_stats, the CPU pass's formulas and order);
//  * S_c = sum_q x[c, q] (forward) and T_c = sum_p w0_p g[c, p] (backward): one GEMM each (against a ones vector / w0);
//    r_p = sum_c g[c, p] out[c, p]: one thread per pixel, c in order, as the CPU driver;
//  * products: bands of whole pixel rows; per band a weight tile, one thread per tile element (D inside the window,
//    0 outside: pair_cell), multiplied by the framework GEMM (callback, device pointers), then an epilogue, one
//    thread per output element (prod + w0_p S_c, or prod + T_c);
//  * grad_logits: per band of owner rows, dA = owners x partners by one GEMM, then one thread per (cell, owner)
//    element: A (dA - r_p) when the partner is inside the image, 0 otherwise.
// Every output element is written by exactly one thread of one launch (no accumulation, no zeroing pass).
// Scratch memory comes from the caller as one workspace (attend_workspace: O(HW) statistics + one tile + one
// product block); the driver allocates nothing.
#ifndef SEGTWIN_PSA_ATTEND_CUDA_DRIVER_H_
#define SEGTWIN_PSA_ATTEND_CUDA_DRIVER_H_

#include <cstddef>
#include <cstdint>
#include <cstdlib>

#include "psa_attend_cuda.h"
#include "psa_attend_kernel.h"

namespace segtwin {
namespace psa {

// Upper bound of one device weight tile in bytes: 64 MiB unless $SEGTWIN_PSA_ATTEND_TILE_BYTES says otherwise (the
// CPU driver's default is 32 MiB).
inline int64_t device_tile_bytes() { return tile_bytes_or(int64_t(64) << 20); }

// Pixel rows a band of `rows` rows pairs with, at most: its own rows widened by the window's height, within the map.
inline int64_t partner_rows_bound(const AttendGeom& g, int64_t rows) {
  return imin(g.h, rows + imin(g.mask_h, g.h) - 1);
}

// Where each scratch buffer sits in the workspace, in elements of T (each start rounded up to 64 elements).
struct AttendWorkspace {
  int64_t rows;     // pixel rows per band
  int64_t m, inv_z, w0;  // HW each: the statistics
  int64_t vec;      // HW: ones (forward) or r (backward)
  int64_t sums;     // C: S (forward) or T (backward)
  int64_t tile;     // band pixels x partner pixels
  int64_t prod;     // C x band pixels (forward, grad_x), or band owners x partners (grad_logits)
  int64_t elems;    // total
};

inline int64_t round_up64(int64_t v) { return (v + 63) / 64 * 64; }

inline AttendWorkspace attend_workspace(const AttendGeom& g, int64_t elem_bytes, bool backward) {
  AttendWorkspace ws;
  // The most rows whose tile (rows*W x partner_rows*W elements) stays within the budget; at least one.
  const int64_t budget = device_tile_bytes() / (elem_bytes > 0 ? elem_bytes : 1);
  int64_t lo = 1, hi = imax(g.h, 1);
  while (lo < hi) {  // binary search: the tile size grows with the rows
    const int64_t mid = lo + (hi - lo + 1) / 2;
    if (mid * g.w * partner_rows_bound(g, mid) * g.w <= budget) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  ws.rows = lo;
  const int64_t band = ws.rows * g.w, tile = band * partner_rows_bound(g, ws.rows) * g.w;
  int64_t at = 0;
  ws.m = at, at += round_up64(g.hw);
  ws.inv_z = at, at += round_up64(g.hw);
  ws.w0 = at, at += round_up64(g.hw);
  ws.vec = at, at += round_up64(g.hw);
  ws.sums = at, at += round_up64(g.c);
  ws.tile = at, at += round_up64(tile);
  ws.prod = at, at += round_up64(backward ? imax(g.c * band, tile) : g.c * band);
  ws.elems = at;
  return ws;
}

// --- element bodies (one call per thread index) -------------------------------------------------------------------

template <typename T>
struct ConstBody {  // dst[i] = v
  T* dst;
  T v;
  SEGTWIN_HD void operator()(int64_t i) const { dst[i] = v; }
};

template <typename T>
struct StatsBody {  // one pixel p
  const T* logits_n;
  AttendGeom g;
  int psa_type;
  T *m, *inv_z, *w0;
  SEGTWIN_HD void operator()(int64_t p) const { pixel_stats(logits_n, g, psa_type, p, m + p, inv_z + p, w0 + p); }
};

// The correction tile of a band, the CPU driver's layout: tile[t * ldt + (v - v0)] = D of the pair of tile pixel
// u = u0 + t and other pixel v (u is p when tile_is_p, else q), 0 for pairs outside the window.
template <typename T>
struct FillTileBody {
  const T* logits_n;
  AttendGeom g;
  int psa_type;
  bool tile_is_p;
  const T *m, *inv_z, *w0;
  int64_t u0, v0, ldt;
  T* tile;
  SEGTWIN_HD void operator()(int64_t idx) const {
    const int64_t t = idx / ldt;
    const int64_t u = u0 + t, v = v0 + (idx - t * ldt);
    const int64_t p = tile_is_p ? u : v, q = tile_is_p ? v : u;
    int64_t cell = 0, owner = 0;
    T d = T(0);
    if (pair_cell(g, psa_type, p, q, &cell, &owner)) d = exp(logits_n[cell * g.hw + owner] - m[p]) * inv_z[p] - w0[p];
    tile[idx] = d;
  }
};

// Epilogue of a band of np pixels starting at p0 (pointers already offset by p0): forward
// dst[c, p] = prod[c, p] + w0_p * sums[c]; grad_x (w0 == nullptr) dst[c, q] = prod[c, q] + sums[c]. prod is nullptr
// when the band has no partner (a zero product).
template <typename T>
struct EpilogueBody {
  const T* prod;
  const T* w0;
  const T* sums;
  T* dst;
  int64_t np, hw;
  SEGTWIN_HD void operator()(int64_t idx) const {
    const int64_t c = idx / np, t = idx - c * np;
    const T pr = prod != nullptr ? prod[idx] : T(0);
    dst[c * hw + t] = w0 != nullptr ? pr + w0[t] * sums[c] : pr + sums[c];
  }
};

template <typename T>
struct RBody {  // r_p = sum_c g[c, p] out[c, p], c in order
  const T *g_out, *out;
  int64_t c, hw;
  T* r;
  SEGTWIN_HD void operator()(int64_t p) const {
    T s = T(0);
    for (int64_t k = 0; k < c; ++k) s += g_out[k * hw + p] * out[k * hw + p];
    r[p] = s;
  }
};

// grad_logits of one band of owner pixels [o0, o0 + no): one thread per (cell, owner) element. prod (no x nt,
// owner-major) holds dA of the band's owners against the partner pixels [t0, t0 + nt); nullptr when nt == 0.
template <typename T>
struct GradLogitsBody {
  const T* logits_n;
  AttendGeom g;
  int psa_type;
  const T *m, *inv_z, *r, *prod;
  int64_t o0, no, t0, nt;
  T* grad_logits_n;
  SEGTWIN_HD void operator()(int64_t idx) const {
    const int64_t cell = idx / no, k = idx - cell * no, u = o0 + k;
    const int64_t i = cell / g.mask_w, j = cell - i * g.mask_w;
    // seen from the owner: the partner is owner + d for both types, the statistics sit at p
    const CellMap cm = cell_map(g, kCollect, true, i, j);
    const int64_t uh = u / g.w, uw = u - uh * g.w, vh = uh + cm.fh, vw = uw + cm.fw;
    T val = T(0);  // no pair, no logit: gradient 0
    if (prod != nullptr && vh >= 0 && vh < g.h && vw >= 0 && vw < g.w) {
      const int64_t partner = vh * g.w + vw;
      const int64_t s = psa_type == kCollect ? u : partner;
      const T da = prod[k * nt + (partner - t0)];
      val = exp(logits_n[cell * g.hw + u] - m[s]) * inv_z[s] * (da - r[s]);
    }
    grad_logits_n[cell * g.hw + u] = val;
  }
};

// --- drivers ----------------------------------------------------------------------------------------------------

// [lo, hi) of the rows paired with the rows [r0, r1): the union of rows_of(r) (q_rows_of_p_row / p_rows_of_q_row,
// each an interval; consecutive rows give overlapping or adjacent intervals).
template <bool kQofP>
void band_partner_rows(const AttendGeom& g, int psa_type, int64_t r0, int64_t r1, int64_t* lo, int64_t* hi) {
  *lo = g.h;
  *hi = 0;
  for (int64_t r = r0; r < r1; ++r) {
    int64_t a, b;
    if (kQofP) {
      q_rows_of_p_row(g, psa_type, r, &a, &b);
    } else {
      p_rows_of_q_row(g, psa_type, r, &a, &b);
    }
    if (a < b) *lo = imin(*lo, a), *hi = imax(*hi, b);
  }
  if (*hi < *lo) *hi = *lo;
}

#define SEGTWIN_ATTEND_TRY(expr)             \
  do {                                       \
    const char* segtwin_err_ = (expr);       \
    if (segtwin_err_ != nullptr) return segtwin_err_; \
  } while (0)

inline const char* attend_check(const AttendGeom& g, int psa_type, size_t workspace_bytes, size_t needed) {
  if (psa_type != kCollect && psa_type != kDistribute) return "psa_attend_cuda: psa_type must be 0 or 1";
  if (g.n < 0 || g.c < 0 || !mask_side_ok(g.mask_h) || !mask_side_ok(g.mask_w) || !area_fits(g.h, g.w) ||
      g.hw != g.h * g.w || !is_product(g.cells, g.mask_h, g.mask_w)) {
    return "psa_attend_cuda: invalid geometry (mask sides in [1, 2**31-1], cells = mask_h*mask_w, H*W in int64)";
  }
  if (workspace_bytes < needed) return "psa_attend_cuda: workspace smaller than psa_attend_cuda_workspace_bytes()";
  return nullptr;
}

template <typename T, typename Exec>
const char* attend_forward_bands(Exec& ex, const T* x, const T* logits, T* out, const AttendGeom& g, int psa_type,
                                 const DeviceGemm<T>& gemm, void* workspace, size_t workspace_bytes) {
  const AttendWorkspace ws = attend_workspace(g, sizeof(T), false);
  SEGTWIN_ATTEND_TRY(attend_check(g, psa_type, workspace_bytes, static_cast<size_t>(ws.elems) * sizeof(T)));
  if (g.n == 0 || g.c == 0 || g.hw == 0) return nullptr;
  T* base = static_cast<T*>(workspace);
  T *m = base + ws.m, *iz = base + ws.inv_z, *w0 = base + ws.w0, *ones = base + ws.vec, *sums = base + ws.sums;
  T *tile = base + ws.tile, *prod = base + ws.prod;
  SEGTWIN_ATTEND_TRY(ex.each(g.hw, ConstBody<T>{ones, T(1)}));
  for (int64_t n = 0; n < g.n; ++n) {
    const T* xn = x + n * g.c * g.hw;
    const T* ln = logits + n * g.cells * g.hw;
    T* on = out + n * g.c * g.hw;
    SEGTWIN_ATTEND_TRY(ex.each(g.hw, StatsBody<T>{ln, g, psa_type, m, iz, w0}));
    gemm(false, false, g.c, 1, g.hw, xn, g.hw, ones, 1, sums);  // S = x @ 1
    for (int64_t r0 = 0; r0 < g.h; r0 += ws.rows) {  // a band of p rows against the q rows of their windows
      const int64_t r1 = imin(r0 + ws.rows, g.h);
      int64_t lo, hi;
      band_partner_rows<true>(g, psa_type, r0, r1, &lo, &hi);
      const int64_t p0 = r0 * g.w, np = (r1 - r0) * g.w, q0 = lo * g.w, nq = (hi - lo) * g.w;
      if (nq > 0) {
        SEGTWIN_ATTEND_TRY(
            ex.each(np * nq, FillTileBody<T>{ln, g, psa_type, true, m, iz, w0, p0, q0, nq, tile}));
        gemm(false, true, g.c, np, nq, xn + q0, g.hw, tile, nq, prod);
      }
      SEGTWIN_ATTEND_TRY(
          ex.each(g.c * np, EpilogueBody<T>{nq > 0 ? prod : nullptr, w0 + p0, sums, on + p0, np, g.hw}));
    }
  }
  return nullptr;
}

template <typename T, typename Exec>
const char* attend_backward_bands(Exec& ex, const T* g_out, const T* x, const T* logits, const T* out, T* grad_x,
                                  T* grad_logits, const AttendGeom& g, int psa_type, const DeviceGemm<T>& gemm,
                                  void* workspace, size_t workspace_bytes) {
  const AttendWorkspace ws = attend_workspace(g, sizeof(T), true);
  SEGTWIN_ATTEND_TRY(attend_check(g, psa_type, workspace_bytes, static_cast<size_t>(ws.elems) * sizeof(T)));
  if (g.n == 0 || g.hw == 0) return nullptr;
  if (g.c == 0) return "psa_attend_backward_cuda: C must be positive (the caller zero-fills grad_logits when C = 0)";
  T* base = static_cast<T*>(workspace);
  T *m = base + ws.m, *iz = base + ws.inv_z, *w0 = base + ws.w0, *r = base + ws.vec, *tsum = base + ws.sums;
  T *tile = base + ws.tile, *prod = base + ws.prod;
  for (int64_t n = 0; n < g.n; ++n) {
    const T* xn = x + n * g.c * g.hw;
    const T* gn = g_out + n * g.c * g.hw;
    const T* on = out + n * g.c * g.hw;
    const T* ln = logits + n * g.cells * g.hw;
    T* gxn = grad_x + n * g.c * g.hw;
    T* gln = grad_logits + n * g.cells * g.hw;
    SEGTWIN_ATTEND_TRY(ex.each(g.hw, StatsBody<T>{ln, g, psa_type, m, iz, w0}));
    gemm(false, false, g.c, 1, g.hw, gn, g.hw, w0, 1, tsum);  // T = g @ w0
    SEGTWIN_ATTEND_TRY(ex.each(g.hw, RBody<T>{gn, on, g.c, g.hw, r}));
    // grad_x, by bands of q rows: grad_x[:, band] = g[:, p rows pairing with the band] @ D^T + T.
    for (int64_t r0 = 0; r0 < g.h; r0 += ws.rows) {
      const int64_t r1 = imin(r0 + ws.rows, g.h);
      int64_t lo, hi;
      band_partner_rows<false>(g, psa_type, r0, r1, &lo, &hi);
      const int64_t q0 = r0 * g.w, nq = (r1 - r0) * g.w, p0 = lo * g.w, np = (hi - lo) * g.w;
      if (np > 0) {
        SEGTWIN_ATTEND_TRY(
            ex.each(nq * np, FillTileBody<T>{ln, g, psa_type, false, m, iz, w0, q0, p0, np, tile}));
        gemm(false, true, g.c, nq, np, gn + p0, g.hw, tile, np, prod);
      }
      SEGTWIN_ATTEND_TRY(
          ex.each(g.c * nq, EpilogueBody<T>{np > 0 ? prod : nullptr, nullptr, tsum, gxn + q0, nq, g.hw}));
    }
    // grad_logits, by bands of owner rows (p for collect, q for distribute): dA of the band's owners against their
    // partners (partner = owner + d for both types), then one thread per (cell, owner) element.
    for (int64_t r0 = 0; r0 < g.h; r0 += ws.rows) {
      const int64_t r1 = imin(r0 + ws.rows, g.h);
      int64_t lo, hi;
      band_partner_rows<true>(g, kCollect, r0, r1, &lo, &hi);
      const int64_t o0 = r0 * g.w, no = (r1 - r0) * g.w, t0 = lo * g.w, nt = (hi - lo) * g.w;
      if (nt > 0) {
        // collect: owners p, partners q: dA^T[p, q] = g[:, p]^T x[:, q]; distribute: owners q, partners p:
        // dA[q, p] = x[:, q]^T g[:, p].
        const T* own = psa_type == kCollect ? gn : xn;
        const T* par = psa_type == kCollect ? xn : gn;
        gemm(true, false, no, nt, g.c, own + o0, g.hw, par + t0, g.hw, prod);
      }
      SEGTWIN_ATTEND_TRY(ex.each(g.cells * no, GradLogitsBody<T>{ln, g, psa_type, m, iz, r, nt > 0 ? prod : nullptr,
                                                                 o0, no, t0, nt, gln}));
    }
  }
  return nullptr;
}

#undef SEGTWIN_ATTEND_TRY

}  // namespace psa
}  // namespace segtwin

#endif  // SEGTWIN_PSA_ATTEND_CUDA_DRIVER_H_
