// segtwin PSA mask: the element bodies shared by the CPU loop and the CUDA kernels.
//
// No framework headers. Compiles under g++ -std=c++17, g++ -std=c++20 and nvcc: `SEGTWIN_HD` is
// `__host__ __device__` under nvcc and plain `inline` elsewhere, so the CPU loop (psa_mask_cpu.h) and the CUDA
// kernels (../cuda/psa_mask.cu) run the very same index arithmetic.
//
// Semantics (semseg / mmcv PSAMask). Input x: (N, C = mask_h*mask_w, H, W). Output: (N, H*W, H, W).
// half_h = (mask_h-1)/2, half_w = (mask_w-1)/2 (integer division, so an even mask is allowed: 4 -> 1).
// Window cell (i, j) of pixel p = (ph, pw) is the weight for pixel q = (ph + i - half_h, pw + j - half_w):
//   collect    (0): out[n, qh*W+qw, ph, pw] = x[n, i*mask_w+j, ph, pw]
//   distribute (1): out[n, ph*W+pw, qh, qw] = x[n, i*mask_w+j, ph, pw]
// for every q inside the image; every other output element is 0. Each input element reaches at most one output
// element, so the backward pass (the exact adjoint) is a gather too:
//   collect:    gx[n, i*mask_w+j, ph, pw] = gy[n, qh*W+qw, ph, pw]   (q inside the image, else 0)
//   distribute: gx[n, i*mask_w+j, ph, pw] = gy[n, ph*W+pw, qh, qw]   (q inside the image, else 0)
//
// Everything is written as a GATHER over the destination: every destination element is produced exactly once
// (a copied value or a zero), nothing is accumulated and nothing relies on a zeroed buffer.
//
// Destination "rows": the destination is viewed as rows of length W (its innermost dimension). Along one row the
// source index is an affine function of the column w, and the columns that have a source form one interval. A
// `PsaRow` holds that interval [lo, hi) and the affine map src = base + w*stride. The CPU loop walks a row with
// three plain loops (zeros, copies, zeros); a CUDA thread computes the row of its element and gathers one value.
#ifndef SEGTWIN_PSA_MASK_KERNEL_H_
#define SEGTWIN_PSA_MASK_KERNEL_H_

#include <cstdint>

#if defined(__CUDACC__)
#define SEGTWIN_HD __host__ __device__ __forceinline__
#else
#define SEGTWIN_HD inline
#endif

namespace segtwin {
namespace psa {

enum PsaType : int { kCollect = 0, kDistribute = 1 };

// Largest mask side accepted by every entry point (2**31-1, the range of Paddle's int attributes). With both sides
// bounded, mask_h*mask_w < 2**62 and every index product below stays inside int64.
constexpr int64_t kMaxMaskSide = 2147483647;

// The argument checks of every entry point (torch and Paddle glue, CPU and CUDA launchers), written without a
// product that could wrap: a huge mask must never pass the channel check by overflow.
SEGTWIN_HD bool mask_side_ok(int64_t v) { return v >= 1 && v <= kMaxMaskSide; }

// c == a*b, decided by division (b >= 1 assumed: callers check the mask sides first).
SEGTWIN_HD bool is_product(int64_t c, int64_t a, int64_t b) { return c >= 0 && c % b == 0 && c / b == a; }

// Whether h*w (and so the output's H*W channels) fits in int64; sizes are non-negative.
SEGTWIN_HD bool area_fits(int64_t h, int64_t w) { return h >= 0 && w >= 0 && (w == 0 || h <= INT64_MAX / w); }

// Problem geometry, all sizes as int64 so that products never overflow (given the checks above).
struct PsaGeom {
  int64_t n;       // batch
  int64_t mask_h;  // window height
  int64_t mask_w;  // window width
  int64_t h;       // feature height
  int64_t w;       // feature width
  int64_t half_h;  // (mask_h-1)/2
  int64_t half_w;  // (mask_w-1)/2
  int64_t hw;      // h*w
  int64_t c;       // mask_h*mask_w (channels of the op input / of the gradient w.r.t. it)
};

SEGTWIN_HD PsaGeom make_geom(int64_t n, int64_t mask_h, int64_t mask_w, int64_t h, int64_t w) {
  PsaGeom g;
  g.n = n;
  g.mask_h = mask_h;
  g.mask_w = mask_w;
  g.h = h;
  g.w = w;
  g.half_h = (mask_h - 1) / 2;
  g.half_w = (mask_w - 1) / 2;
  g.hw = h * w;
  g.c = mask_h * mask_w;
  return g;
}

// Number of destination rows (of length g.w) of the forward output (N, HW, H, W) and of the input gradient
// (N, C, H, W).
SEGTWIN_HD int64_t forward_rows(const PsaGeom& g) { return g.n * g.hw * g.h; }
SEGTWIN_HD int64_t backward_rows(const PsaGeom& g) { return g.n * g.c * g.h; }

// One destination row: columns [lo, hi) read src[base + col*stride], all other columns are 0.
struct PsaRow {
  int64_t base;
  int64_t stride;
  int64_t lo;
  int64_t hi;
};

SEGTWIN_HD int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }
SEGTWIN_HD int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

// Row with the valid interval clipped to [0, width); an empty interval becomes lo == hi.
SEGTWIN_HD PsaRow make_row(int64_t base, int64_t stride, int64_t lo, int64_t hi, int64_t width) {
  PsaRow r;
  r.base = base;
  r.stride = stride;
  r.lo = imax(lo, 0);
  r.hi = imin(hi, width);
  if (r.hi < r.lo) r.hi = r.lo;
  return r;
}

SEGTWIN_HD PsaRow empty_row() {
  PsaRow r;
  r.base = 0;
  r.stride = 0;
  r.lo = 0;
  r.hi = 0;
  return r;
}

// Forward: destination row out[n, k, r, :] of out (N, HW, H, W), k = (kh, kw) split as kh*W + kw.
// Source: the op input x (N, C, H, W).
SEGTWIN_HD PsaRow forward_row_at(const PsaGeom& g, int psa_type, int64_t n, int64_t kh, int64_t kw,
                                 int64_t r) {
  if (psa_type == kCollect) {
    // k = q (the other pixel), r = ph, column = pw.  i = qh - ph + half_h, j = qw - pw + half_w.
    const int64_t i = kh - r + g.half_h;
    if (i < 0 || i >= g.mask_h) return empty_row();
    // x[n, i*mw + j, ph, pw] with j = (qw + half_w) - pw: moving pw by +1 moves j by -1 (one plane back).
    const int64_t base = ((n * g.c + i * g.mask_w + kw + g.half_w) * g.h + r) * g.w;
    const int64_t stride = 1 - g.hw;
    // 0 <= qw + half_w - pw < mask_w  <=>  qw + half_w - mask_w < pw <= qw + half_w
    return make_row(base, stride, kw + g.half_w - g.mask_w + 1, kw + g.half_w + 1, g.w);
  }
  // distribute: k = p (the centre pixel), r = qh, column = qw.  i = qh - ph + half_h, j = qw - pw + half_w.
  const int64_t i = r - kh + g.half_h;
  if (i < 0 || i >= g.mask_h) return empty_row();
  // x[n, i*mw + j, ph, pw] with j = qw - pw + half_w: moving qw by +1 moves j by +1 (one plane on).
  const int64_t base = ((n * g.c + i * g.mask_w + g.half_w - kw) * g.h + kh) * g.w + kw;
  const int64_t stride = g.hw;
  // 0 <= qw - pw + half_w < mask_w  <=>  pw - half_w <= qw < pw - half_w + mask_w
  return make_row(base, stride, kw - g.half_w, kw - g.half_w + g.mask_w, g.w);
}

// Coordinates of a destination row: forward (n, kh, kw, r) of out[n, kh*W+kw, r, :]; backward (n, i, j, ph) of
// gx[n, i*mask_w+j, ph, :].
struct PsaRowCoord {
  int64_t n;
  int64_t a;
  int64_t b;
  int64_t r;
};

// Splits the flat row number row = (n*HW + k)*H + r (forward) or (n*C + c)*H + ph (backward). `Index` is the type
// the number is split in: the CUDA kernel uses a 32-bit type when everything fits (64-bit divisions are slow on a
// GPU). (The CPU loop walks groups of rows by their coordinates and does not split.)
template <typename Index>
SEGTWIN_HD PsaRowCoord split_row(const PsaGeom& g, bool forward, Index row) {
  const Index hh = static_cast<Index>(g.h);
  const Index planes = static_cast<Index>(forward ? g.hw : g.c);  // channels of the destination
  const Index inner = static_cast<Index>(forward ? g.w : g.mask_w);
  const Index nk = row / hh;
  const Index n = nk / planes;
  const Index k = nk - n * planes;
  const Index a = k / inner;
  PsaRowCoord rc;
  rc.n = static_cast<int64_t>(n);
  rc.a = static_cast<int64_t>(a);
  rc.b = static_cast<int64_t>(k - a * inner);
  rc.r = static_cast<int64_t>(row - nk * hh);
  return rc;
}

// Backward: destination row gx[n, i*mw+j, ph, :] of grad_x (N, C, H, W). Source: grad_out (N, HW, H, W).
SEGTWIN_HD PsaRow backward_row_at(const PsaGeom& g, int psa_type, int64_t n, int64_t i, int64_t j,
                                  int64_t ph) {
  const int64_t qh = ph + i - g.half_h;
  if (qh < 0 || qh >= g.h) return empty_row();
  // column = pw, qw = pw + j - half_w; valid iff 0 <= qw < W  <=>  half_w - j <= pw < W + half_w - j
  const int64_t lo = g.half_w - j;
  const int64_t hi = g.w + g.half_w - j;
  const int64_t stride = g.hw + 1;  // both layouts: +1 pixel in the HW channel axis and +1 column
  if (psa_type == kCollect) {
    // gy[n, qh*W + qw, ph, pw]
    const int64_t base = ((n * g.hw + qh * g.w + j - g.half_w) * g.h + ph) * g.w;
    return make_row(base, stride, lo, hi, g.w);
  }
  // distribute: gy[n, ph*W + pw, qh, qw]
  const int64_t base = ((n * g.hw + ph * g.w) * g.h + qh) * g.w + j - g.half_w;
  return make_row(base, stride, lo, hi, g.w);
}

// The source map of the destination row with flat number `row` (the CUDA kernel's entry point).
template <typename Index>
SEGTWIN_HD PsaRow dest_row(const PsaGeom& g, int psa_type, bool forward, Index row) {
  const PsaRowCoord rc = split_row<Index>(g, forward, row);
  return forward ? forward_row_at(g, psa_type, rc.n, rc.a, rc.b, rc.r)
                 : backward_row_at(g, psa_type, rc.n, rc.a, rc.b, rc.r);
}

// The element body: destination column `col` of a row.
template <typename T>
SEGTWIN_HD T gather_element(const T* src, const PsaRow& r, int64_t col) {
  return (col >= r.lo && col < r.hi) ? src[r.base + col * r.stride] : T(0);
}

// The whole per-element body of the CUDA kernel: destination element `idx` (flat, row-major) of the forward output
// or of the input gradient. Host code can run it too (the tests emulate the kernel with it on the CPU).
template <typename T, typename Index>
SEGTWIN_HD void gather_flat(const T* src, T* dst, const PsaGeom& g, int psa_type, bool forward, Index idx) {
  const Index width = static_cast<Index>(g.w);
  const Index row = idx / width;
  const PsaRow r = dest_row<Index>(g, psa_type, forward, row);
  dst[idx] = gather_element(src, r, static_cast<int64_t>(idx - row * width));
}

}  // namespace psa
}  // namespace segtwin

#endif  // SEGTWIN_PSA_MASK_KERNEL_H_
