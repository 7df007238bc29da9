// segtwin fused PSA aggregation: the per-pixel bodies of the CPU driver (psa_attend_cpu.h), written `SEGTWIN_HD`
// (as in psa_mask_kernel.h) so that CUDA kernels can share them; there are no CUDA kernels for it yet. No framework
// headers.
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

// Index of the logit of pair (p, q) in logits (N, cells, H, W), or -1 when q is outside p's window.
SEGTWIN_HD int64_t pair_logit(const AttendGeom& g, int psa_type, int64_t n, int64_t p, int64_t q) {
  const int64_t ph = p / g.w, pw = p - ph * g.w, qh = q / g.w, qw = q - qh * g.w;
  // collect: cell = q - p + half (owner p); distribute: cell = p - q + half (owner q)
  const int64_t i = (psa_type == kCollect ? qh - ph : ph - qh) + g.half_h;
  const int64_t j = (psa_type == kCollect ? qw - pw : pw - qw) + g.half_w;
  if (i < 0 || i >= g.mask_h || j < 0 || j >= g.mask_w) return -1;
  return (n * g.cells + i * g.mask_w + j) * g.hw + (psa_type == kCollect ? p : q);
}

// The pixel paired with `owner` through window cell (i, j): q of p for collect, p of q for distribute -- in both
// cases owner + (i - half_h, j - half_w). -1 when it falls outside the image.
SEGTWIN_HD int64_t cell_partner(const AttendGeom& g, int64_t owner, int64_t i, int64_t j) {
  const int64_t oh = owner / g.w, ow = owner - oh * g.w;
  const int64_t th = oh + i - g.half_h, tw = ow + j - g.half_w;
  if (th < 0 || th >= g.h || tw < 0 || tw >= g.w) return -1;
  return th * g.w + tw;
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

// Attention weight A[q, p] of a pair inside the window from its logit, and the correction D = A - w0.
template <typename T>
SEGTWIN_HD T window_weight(T logit, T m, T inv_z) { return exp(logit - m) * inv_z; }
template <typename T>
SEGTWIN_HD T outside_weight(T m, T inv_z) { return exp(-m) * inv_z; }

}  // namespace psa
}  // namespace segtwin

#endif  // SEGTWIN_PSA_ATTEND_KERNEL_H_
