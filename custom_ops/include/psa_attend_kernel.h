// segtwin fused PSA aggregation: the per-pixel bodies shared by the CPU driver (psa_attend_cpu.h) and the CUDA path
// (psa_attend_cuda_driver.h, ../cuda/psa_attend.cu), written `SEGTWIN_HD` (as in psa_mask_kernel.h): the window
// geometry, `cell_map`, `window_pair` / `pair_cell` and the softmax statistics of one pixel (`pixel_stats`, the
// CUDA statistics kernel's body, with the CPU pass's formulas and summation order). `exp_nonpos` is the CPU's
// vectorisable exp (host only); the CUDA bodies use `exp`. No framework headers.
//
// What is computed (PSANet's attention with semseg's semantics, unscaled):
//   out[n, c, p] = sum_q A[n, q, p] * x[n, c, q],   A[n, :, p] = softmax over q of L[n, p, q],
// where p, q run over the H*W pixels and L[p, q] is the PSA-mask logit of the pair when q lies in p's window and 0
// (not -inf) otherwise -- exactly softmax(psa_mask(logits), dim=1) of the reference path:
//   collect    (0): q = p + (i - half_h, j - half_w) for window cell (i, j); L[p, q] = logits[n, i*mask_w+j, p]
//   distribute (1): p = q + (i - half_h, j - half_w);                        L[p, q] = logits[n, i*mask_w+j, q]
// (the logit of a pair lives at its "owner" pixel: p for collect, q for distribute).
// With m_p = max(0, max over the window of L[p, q]), e_q = exp(L[p, q] - m_p), e0 = exp(-m_p) and
//   Z_p = sum_{q in win(p)} e_q + (HW - |win(p)|) * e0,
// A[q, p] = e_q / Z_p inside the window and e0 / Z_p outside, so with S_c = sum_q x[c, q]:
//   out[c, p] = e0/Z_p * S_c + sum_{q in win(p)} (e_q - e0)/Z_p * x[c, q]
// i.e. a constant weight w0_p = e0/Z_p for every pixel plus a window-sparse correction D[q, p] = (e_q - e0)/Z_p.
#ifndef SEGTWIN_PSA_ATTEND_KERNEL_H_
#define SEGTWIN_PSA_ATTEND_KERNEL_H_

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "psa_mask_kernel.h"

namespace segtwin {
namespace psa {

struct AttendGeom {
  int64_t n, c, h, w, hw;
  int64_t mask_h, mask_w, half_h, half_w, cells;  // cells = mask_h*mask_w (channels of the logits)
};

SEGTWIN_HD AttendGeom make_attend_geom(int64_t n, int64_t c, int64_t h, int64_t w, int64_t mask_h, int64_t mask_w) {
  AttendGeom g;
  g.n = n;
  g.c = c;
  g.h = h;
  g.w = w;
  g.hw = h * w;
  g.mask_h = mask_h;
  g.mask_w = mask_w;
  g.half_h = (mask_h - 1) / 2;
  g.half_w = (mask_w - 1) / 2;
  g.cells = mask_h * mask_w;
  return g;
}

// Rows of q in p-row ph's windows (and, swapped, rows of p whose windows hold q-row qh): [lo, hi), clipped.
SEGTWIN_HD void q_rows_of_p_row(const AttendGeom& g, int psa_type, int64_t ph, int64_t* lo, int64_t* hi) {
  const int64_t first = psa_type == kCollect ? ph - g.half_h : ph + g.half_h - g.mask_h + 1;
  *lo = imax(first, 0);
  *hi = imin(first + g.mask_h, g.h);
  if (*hi < *lo) *hi = *lo;
}
SEGTWIN_HD void p_rows_of_q_row(const AttendGeom& g, int psa_type, int64_t qh, int64_t* lo, int64_t* hi) {
  const int64_t first = psa_type == kCollect ? qh + g.half_h - g.mask_h + 1 : qh - g.half_h;
  *lo = imax(first, 0);
  *hi = imin(first + g.mask_h, g.h);
  if (*hi < *lo) *hi = *lo;
}

// Window cell (i, j) seen from a "tile" pixel u, for the loops that walk the pairs cell by cell. With
// d = (i - half_h, j - half_w): collect pairs p with q = p + d, distribute pairs p with q = p - d; the logit of
// the pair lives at p (collect) or q (distribute). Seen from u = p (tile_is_p) or u = q (otherwise), the partner
// pixel is u + (fh, fw) and, in flat indices, the pair's logit sits at plane `cell`, pixel u + logit_off, and the
// pair's softmax statistics (those of p) at u + stats_off. Every offset is the same for all u of the map, so a run
// of consecutive u along an image row reads consecutive logits and statistics.
struct CellMap {
  int64_t cell, fh, fw, logit_off, stats_off;
};

SEGTWIN_HD CellMap cell_map(const AttendGeom& g, int psa_type, bool tile_is_p, int64_t i, int64_t j) {
  const int64_t sign = psa_type == kCollect ? 1 : -1;
  const int64_t eh = sign * (i - g.half_h), ew = sign * (j - g.half_w);  // q = p + e
  const int64_t e = eh * g.w + ew;
  CellMap c;
  c.cell = i * g.mask_w + j;
  c.fh = tile_is_p ? eh : -eh;
  c.fw = tile_is_p ? ew : -ew;
  const int64_t owner_from_p = psa_type == kCollect ? 0 : e;  // owner - p
  c.logit_off = tile_is_p ? owner_from_p : owner_from_p - e;
  c.stats_off = tile_is_p ? 0 : -e;
  return c;
}

// The u of one axis (size `size`) whose partner u + f stays inside [0, size): [lo, hi), possibly empty.
SEGTWIN_HD void partner_span(int64_t size, int64_t f, int64_t* lo, int64_t* hi) {
  *lo = imax(0, -f);
  *hi = imin(size, size - f);
  if (*hi < *lo) *hi = *lo;
}

// Number of window cells of pixel p whose pair lies inside the image: the rows of the window inside the image
// times its columns (the window is a rectangle).
SEGTWIN_HD int64_t window_count(const AttendGeom& g, int psa_type, int64_t p) {
  const int64_t ph = p / g.w, pw = p - ph * g.w;
  int64_t rlo, rhi, clo, chi;
  q_rows_of_p_row(g, psa_type, ph, &rlo, &rhi);
  const int64_t first_col = psa_type == kCollect ? pw - g.half_w : pw + g.half_w - g.mask_w + 1;
  clo = imax(first_col, 0);
  chi = imin(first_col + g.mask_w, g.w);
  return (rhi - rlo) * (chi > clo ? chi - clo : 0);
}

// Window cell (i, j) of pixel p: returns the paired q (-1 when outside the image) and sets *idx to the logit's
// index in logits (N, cells, H, W). collect: q = p + (i, j) - half, logit at p; distribute: p = q + (i, j) - half,
// so q = p - (i, j) + half, logit at q.
SEGTWIN_HD int64_t window_pair(const AttendGeom& g, int psa_type, int64_t n, int64_t p, int64_t i, int64_t j,
                               int64_t* idx) {
  const int64_t ph = p / g.w, pw = p - ph * g.w;
  const int64_t di = i - g.half_h, dj = j - g.half_w;
  const int64_t qh = psa_type == kCollect ? ph + di : ph - di;
  const int64_t qw = psa_type == kCollect ? pw + dj : pw - dj;
  if (qh < 0 || qh >= g.h || qw < 0 || qw >= g.w) return -1;
  const int64_t q = qh * g.w + qw;
  *idx = (n * g.cells + i * g.mask_w + j) * g.hw + (psa_type == kCollect ? p : q);
  return q;
}

// Whether pixel q lies in pixel p's window (both flat indices of the map): if so, *cell gets the window cell
// i*mask_w+j of the pair and *owner the pixel whose logits hold it (p for collect, q for distribute). The inverse of
// window_pair: collect q = p + (i, j) - half, distribute q = p - (i, j) + half.
SEGTWIN_HD bool pair_cell(const AttendGeom& g, int psa_type, int64_t p, int64_t q, int64_t* cell, int64_t* owner) {
  const int64_t ph = p / g.w, pw = p - ph * g.w, qh = q / g.w, qw = q - qh * g.w;
  const int64_t sign = psa_type == kCollect ? 1 : -1;
  const int64_t i = sign * (qh - ph) + g.half_h, j = sign * (qw - pw) + g.half_w;
  if (i < 0 || i >= g.mask_h || j < 0 || j >= g.mask_w) return false;
  *cell = i * g.mask_w + j;
  *owner = psa_type == kCollect ? p : q;
  return true;
}

// exp(x) for x <= 0 (and NaN), written with plain arithmetic so that the CPU loops vectorise: Cody-Waite range
// reduction x = k ln2 + r, |r| <= ln2/2, a Taylor polynomial of e^r (degree 7 for float: truncation 5e-9 relative;
// degree 13 for double: 4e-18) and 2^k built in the exponent bits. Arguments below the smallest normal result
// (-87 for float, -708 for double) give 0 where exp would give a subnormal (< 1.2e-38 / 2.3e-308): the softmax
// denominators here are >= 1, so the weights differ from exp's by less than that. NaN stays NaN, -inf gives 0.
template <typename T>
struct ExpBits;
template <>
struct ExpBits<float> {
  using I = int32_t;
  static constexpr float kLo = -87.0f, kShifter = 12582912.0f;  // 1.5 * 2**23
  static constexpr I kShifterBits = 0x4B400000, kBias = 127, kMantissa = 23;
  static constexpr float kLn2Hi = 0.693145751953125f, kLn2Lo = 1.428606765330187045e-06f;
};
template <>
struct ExpBits<double> {
  using I = int64_t;
  static constexpr double kLo = -708.0, kShifter = 6755399441055744.0;  // 1.5 * 2**52
  static constexpr I kShifterBits = 0x4338000000000000LL, kBias = 1023, kMantissa = 52;
  static constexpr double kLn2Hi = 6.93147180369123816490e-01, kLn2Lo = 1.90821492927058770002e-10;
};

// Horner form of the Taylor polynomial, 1 + r(1 + r/2(1 + r/3(...))), unrolled so that the loops calling it
// vectorise.
inline float exp_poly(float r) {
  float p = 1.0f + r * (1.0f / 7.0f);
  p = 1.0f + r * (1.0f / 6.0f) * p;
  p = 1.0f + r * (1.0f / 5.0f) * p;
  p = 1.0f + r * (1.0f / 4.0f) * p;
  p = 1.0f + r * (1.0f / 3.0f) * p;
  p = 1.0f + r * 0.5f * p;
  return 1.0f + r * p;
}
inline double exp_poly(double r) {
  double p = 1.0 + r * (1.0 / 13.0);
  p = 1.0 + r * (1.0 / 12.0) * p;
  p = 1.0 + r * (1.0 / 11.0) * p;
  p = 1.0 + r * (1.0 / 10.0) * p;
  p = 1.0 + r * (1.0 / 9.0) * p;
  p = 1.0 + r * (1.0 / 8.0) * p;
  p = 1.0 + r * (1.0 / 7.0) * p;
  p = 1.0 + r * (1.0 / 6.0) * p;
  p = 1.0 + r * (1.0 / 5.0) * p;
  p = 1.0 + r * (1.0 / 4.0) * p;
  p = 1.0 + r * (1.0 / 3.0) * p;
  p = 1.0 + r * 0.5 * p;
  return 1.0 + r * p;
}

template <typename T>
inline T exp_nonpos(T x) {
  using B = ExpBits<T>;
  using I = typename B::I;
  const T xc = x < B::kLo ? B::kLo : x;
  const T t = xc * T(1.4426950408889634) + B::kShifter;  // round(x / ln2) in the low mantissa bits
  const T kf = t - B::kShifter;
  I tb;
  std::memcpy(&tb, &t, sizeof(T));
  const I k = tb - B::kShifterBits;
  const T r = (xc - kf * B::kLn2Hi) - kf * B::kLn2Lo;
  const T poly = exp_poly(r);
  const I eb = (k + B::kBias) << B::kMantissa;
  T scale;
  std::memcpy(&scale, &eb, sizeof(T));
  const T y = poly * scale;
  return x < B::kLo ? T(0) : y;
}

// Softmax statistics of pixel p: m_p and 1/Z_p (see the header comment), over the window cells of p.
template <typename T>
SEGTWIN_HD void row_stats(const T* logits, const AttendGeom& g, int psa_type, int64_t n, int64_t p, T* m_out,
                          T* inv_z_out) {
  T m = T(0);  // the out-of-window zeros take part in the max
  int64_t count = 0;
  for (int64_t i = 0; i < g.mask_h; ++i) {
    for (int64_t j = 0; j < g.mask_w; ++j) {
      int64_t idx = 0;
      if (window_pair(g, psa_type, n, p, i, j, &idx) < 0) continue;
      if (logits[idx] > m) m = logits[idx];
      ++count;
    }
  }
  T z = static_cast<T>(g.hw - count) * exp(-m);
  for (int64_t i = 0; i < g.mask_h; ++i) {
    for (int64_t j = 0; j < g.mask_w; ++j) {
      int64_t idx = 0;
      if (window_pair(g, psa_type, n, p, i, j, &idx) >= 0) z += exp(logits[idx] - m);
    }
  }
  *m_out = m;
  *inv_z_out = T(1) / z;
}

// Softmax statistics of pixel p of one batch item (logits_n: its (cells, H, W) logits): m_p, 1/Z_p and
// w0_p = exp(-m_p)/Z_p, with the formulas and the summation order of the CPU driver's statistics pass (cells in
// (i, j) order; the out-of-window term added last) -- only the exp differs (`exp` here, exp_nonpos there).
template <typename T>
SEGTWIN_HD void pixel_stats(const T* logits_n, const AttendGeom& g, int psa_type, int64_t p, T* m_out, T* inv_z_out,
                            T* w0_out) {
  const int64_t ph = p / g.w, pw = p - ph * g.w;
  T m = T(0);  // the out-of-window zeros take part in the max
  T z = T(0);
  for (int pass = 0; pass < 2; ++pass) {
    for (int64_t i = 0; i < g.mask_h; ++i) {
      for (int64_t j = 0; j < g.mask_w; ++j) {
        const CellMap cm = cell_map(g, psa_type, true, i, j);
        const int64_t qh = ph + cm.fh, qw = pw + cm.fw;
        if (qh < 0 || qh >= g.h) break;  // the whole window row i is outside the image
        if (qw < 0 || qw >= g.w) continue;
        const T v = logits_n[cm.cell * g.hw + cm.logit_off + p];
        if (pass == 0) {
          m = v > m ? v : m;
        } else {
          z += exp(v - m);
        }
      }
    }
  }
  const T e0 = exp(-m);
  const T inv = T(1) / (z + static_cast<T>(g.hw - window_count(g, psa_type, p)) * e0);
  *m_out = m;
  *inv_z_out = inv;
  *w0_out = e0 * inv;
}

// Upper bound of one weight tile in bytes (host only): $SEGTWIN_PSA_ATTEND_TILE_BYTES when set to a positive
// integer (the tests shrink it to exercise many bands), else the driver's default.
inline int64_t tile_bytes_or(int64_t default_bytes) {
  const char* env = std::getenv("SEGTWIN_PSA_ATTEND_TILE_BYTES");
  if (env != nullptr && *env != '\0') {
    const long long v = std::atoll(env);
    if (v > 0) return static_cast<int64_t>(v);
  }
  return default_bytes;
}

}  // namespace psa
}  // namespace segtwin

#endif  // SEGTWIN_PSA_ATTEND_KERNEL_H_
