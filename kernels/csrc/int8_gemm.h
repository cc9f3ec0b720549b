// The int8 GEMM of w8a8_linear (int8_linear.cpp): AVX-512 VNNI over weights packed once at
// load time, 8 rows x 48 columns per tile, with the dequantization and the fp32 outlier terms
// applied to each tile while it sits in L1.
//
// Why not at::_int_mm: oneDNN repacks the [N, K] weight on every call, and at decode sizes
// that costs more than the products; the separate dequantize and outlier passes then read the
// [M, N] output twice more. Whole w8a8_linear op, SmolLM2's 30 layers + lm_head, 2-core dev
// VM, same process: 15.1 -> 5.9 ms at 8 rows, 45 -> 32 ms at 64 rows, and about even for a
// 1024-row prefill (bench: see the issue 6 notes).
//
// Packing (engine/quant.py, pack_w8a8): output columns in panels of kPanel = 48, input
// features in groups of 4, panel-major: packed[p][k4][c][j] = w[48 p + c][4 k4 + j] + 128 as
// uint8. One 64-byte load then holds 4 features of 16 columns, the operand layout of
// vpdpbusd. The +128 makes the weights the unsigned operand, so the activation can be the
// signed one and come straight from memory as an embedded broadcast; the extra 128 * sum(x)
// is subtracted per row. Padding (N to a multiple of 48, K to one of 4) is zero weights.
#pragma once

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <immintrin.h>

#include "vec_math.h"

namespace kvserve_gemm {

constexpr int kNV = 3;            // zmm vectors of 16 output columns per panel
constexpr int kPanel = 16 * kNV;  // output columns per panel
constexpr int kMR = 8;            // rows per tile: 8 x 3 accumulators + 3 weight vectors

// What a tile adds to its rows' scaled products besides the bias.
struct Outliers {
  const float* x_outl;      // [M, n_outl] the rows' fixed-outlier inputs
  const float* w_outl;      // [P, n_outl, kPanel] their fp32 W^T rows, panel-major
  int64_t n_outl;
  const at::BFloat16* w_t;  // [K, N] bf16 W^T, for the dynamic outliers
  const int64_t* dyn_idx;   // [M, dyn]
  const float* dyn_val;     // [M, dyn]
  int64_t dyn;
};

// acc[r][0 .. 48) = sum_k x[r, k] (w + 128)[n0 + c, k] for rows r < MR of x (int8, row stride
// ldx, K4 groups of 4 features, zero-padded), against one weight panel. Named accumulators,
// not an array, and a function of its own (noinline): otherwise GCC spilled or shuffled the
// 24 accumulators inside the loop, at half the speed.
template <int MR>
__attribute__((noinline)) void dot_tile(const int8_t* x, int64_t ldx, const uint8_t* panel,
                                        int64_t K4, int32_t* acc) {
  static_assert(kNV == 3 && MR <= 8, "dot_tile is written out for 3 vectors x 8 rows");
  const __m512i z = _mm512_setzero_si512();
  __m512i c00 = z, c01 = z, c02 = z, c10 = z, c11 = z, c12 = z, c20 = z, c21 = z, c22 = z,
          c30 = z, c31 = z, c32 = z, c40 = z, c41 = z, c42 = z, c50 = z, c51 = z, c52 = z,
          c60 = z, c61 = z, c62 = z, c70 = z, c71 = z, c72 = z;
  for (int64_t k = 0; k < K4; ++k) {
    const uint8_t* wp = panel + k * (4 * kPanel);
    const __m512i w0 = _mm512_loadu_si512(wp), w1 = _mm512_loadu_si512(wp + 64),
                  w2 = _mm512_loadu_si512(wp + 128);
#define KVSERVE_ROW(r)                                                                          \
  if constexpr (MR > r) {                                                                       \
    const __m512i a = _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(x + r * ldx + 4 * k)); \
    c##r##0 = _mm512_dpbusd_epi32(c##r##0, w0, a);                                              \
    c##r##1 = _mm512_dpbusd_epi32(c##r##1, w1, a);                                              \
    c##r##2 = _mm512_dpbusd_epi32(c##r##2, w2, a);                                              \
  }
    KVSERVE_ROW(0) KVSERVE_ROW(1) KVSERVE_ROW(2) KVSERVE_ROW(3)
    KVSERVE_ROW(4) KVSERVE_ROW(5) KVSERVE_ROW(6) KVSERVE_ROW(7)
#undef KVSERVE_ROW
  }
#define KVSERVE_ROW(r)                                        \
  if constexpr (MR > r) {                                     \
    _mm512_store_si512(acc + r * kPanel, c##r##0);            \
    _mm512_store_si512(acc + r * kPanel + 16, c##r##1);       \
    _mm512_store_si512(acc + r * kPanel + 32, c##r##2);       \
  }
  KVSERVE_ROW(0) KVSERVE_ROW(1) KVSERVE_ROW(2) KVSERVE_ROW(3)
  KVSERVE_ROW(4) KVSERVE_ROW(5) KVSERVE_ROW(6) KVSERVE_ROW(7)
#undef KVSERVE_ROW
}

// y[r, 0 .. 48) for rows r < MR of a tile from dot_tile's acc:
//   (acc[r] - comp[r]) * sx[r] * w_scale + bias + sum_j xo[r, j] wo[j]
// with comp[r] = 128 * sum(x[r]) taking out the weights' +128. The fixed outliers' fp32
// products accumulate in 24 registers like dot_tile's.
template <int MR>
__attribute__((noinline)) void finish_tile(const int32_t* acc, const int32_t* comp,
                                           const float* sx, const float* sw, const float* bias,
                                           const float* xo, const float* wo, int64_t n_outl,
                                           const __mmask16* mask, float* y, int64_t N) {
  static_assert(kNV == 3 && MR <= 8, "finish_tile is written out for 3 vectors x 8 rows");
  const __m512 sw0 = _mm512_maskz_loadu_ps(mask[0], sw), sw1 = _mm512_maskz_loadu_ps(mask[1], sw + 16),
               sw2 = _mm512_maskz_loadu_ps(mask[2], sw + 32);
  const __m512 zf = _mm512_setzero_ps();
  const __m512 b0 = bias ? _mm512_maskz_loadu_ps(mask[0], bias) : zf,
               b1 = bias ? _mm512_maskz_loadu_ps(mask[1], bias + 16) : zf,
               b2 = bias ? _mm512_maskz_loadu_ps(mask[2], bias + 32) : zf;
  __m512 f00, f01, f02, f10, f11, f12, f20, f21, f22, f30, f31, f32, f40, f41, f42, f50, f51, f52,
      f60, f61, f62, f70, f71, f72;
#define KVSERVE_DEQ(r, v)                                                                     \
  f##r##v = _mm512_add_ps(                                                                    \
      _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_load_si512(acc + r * kPanel + 16 * v), cr)), s), sw##v), \
      b##v);
#define KVSERVE_ROW(r)                                            \
  if constexpr (MR > r) {                                         \
    const __m512i cr = _mm512_set1_epi32(comp[r]);                \
    const __m512 s = _mm512_set1_ps(sx[r]);                       \
    KVSERVE_DEQ(r, 0) KVSERVE_DEQ(r, 1) KVSERVE_DEQ(r, 2)         \
  }
  KVSERVE_ROW(0) KVSERVE_ROW(1) KVSERVE_ROW(2) KVSERVE_ROW(3)
  KVSERVE_ROW(4) KVSERVE_ROW(5) KVSERVE_ROW(6) KVSERVE_ROW(7)
#undef KVSERVE_ROW
#undef KVSERVE_DEQ

  for (int64_t j = 0; j < n_outl; ++j) {
    const float* wj = wo + j * kPanel;
    const __m512 w0 = _mm512_loadu_ps(wj), w1 = _mm512_loadu_ps(wj + 16),
                 w2 = _mm512_loadu_ps(wj + 32);
#define KVSERVE_ROW(r)                                           \
  if constexpr (MR > r) {                                        \
    const __m512 a = _mm512_set1_ps(xo[r * n_outl + j]);         \
    f##r##0 = _mm512_fmadd_ps(a, w0, f##r##0);                   \
    f##r##1 = _mm512_fmadd_ps(a, w1, f##r##1);                   \
    f##r##2 = _mm512_fmadd_ps(a, w2, f##r##2);                   \
  }
    KVSERVE_ROW(0) KVSERVE_ROW(1) KVSERVE_ROW(2) KVSERVE_ROW(3)
    KVSERVE_ROW(4) KVSERVE_ROW(5) KVSERVE_ROW(6) KVSERVE_ROW(7)
#undef KVSERVE_ROW
  }

#define KVSERVE_ROW(r)                                                  \
  if constexpr (MR > r) {                                               \
    _mm512_mask_storeu_ps(y + r * N, mask[0], f##r##0);                 \
    _mm512_mask_storeu_ps(y + r * N + 16, mask[1], f##r##1);            \
    _mm512_mask_storeu_ps(y + r * N + 32, mask[2], f##r##2);            \
  }
  KVSERVE_ROW(0) KVSERVE_ROW(1) KVSERVE_ROW(2) KVSERVE_ROW(3)
  KVSERVE_ROW(4) KVSERVE_ROW(5) KVSERVE_ROW(6) KVSERVE_ROW(7)
#undef KVSERVE_ROW
}

// Each row's dynamic outliers, added to y[m, n0 .. n0 + 48) after its tile: the rows of W^T
// differ from row to row, so they gain nothing from the tile's registers.
inline void add_dynamic(const Outliers& o, int64_t m, int64_t rows, int64_t n0, int64_t N,
                        const __mmask16* mask, float* y) {
  for (int64_t r = m; r < m + rows; ++r)
    for (int v = 0; v < kNV; ++v) {
      if (!mask[v]) break;
      float* yv = y + r * N + n0 + 16 * v;
      __m512 f = _mm512_maskz_loadu_ps(mask[v], yv);
      for (int64_t d = 0; d < o.dyn; ++d) {
        const int64_t i = r * o.dyn + d;
        const __m256i h = _mm256_maskz_loadu_epi16(mask[v], o.w_t + o.dyn_idx[i] * N + n0 + 16 * v);
        const __m512 wv = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
        f = _mm512_fmadd_ps(_mm512_set1_ps(o.dyn_val[i]), wv, f);
      }
      _mm512_mask_storeu_ps(yv, mask[v], f);
    }
}

// Rows [m0, m1) of y against panel p, kMR rows at a time.
inline void gemm_block(const int8_t* x, int64_t ldx, const uint8_t* packed, int64_t K4,
                       const int32_t* comp, const float* sx, const float* w_scale,
                       const float* bias, const Outliers& o, int64_t m0, int64_t m1, int64_t p,
                       int64_t N, float* y) {
  const uint8_t* panel = packed + p * K4 * 4 * kPanel;
  const float* wo = o.w_outl + p * o.n_outl * kPanel;
  const int64_t n0 = p * kPanel;
  __mmask16 mask[kNV];
  for (int v = 0; v < kNV; ++v) {  // the last panel may run past N
    const int64_t left = N - n0 - 16 * v;
    mask[v] = left > 0 ? kvserve_vec::tail_mask(left) : static_cast<__mmask16>(0);
  }
  const float* b = bias ? bias + n0 : nullptr;
  alignas(64) int32_t acc[kMR * kPanel];
  for (int64_t m = m0; m < m1; m += kMR) {
    const int8_t* xm = x + m * ldx;
    const float* xo = o.x_outl + m * o.n_outl;
    float* ym = y + m * N + n0;
    const int64_t rows = std::min<int64_t>(kMR, m1 - m);
    switch (rows) {
#define KVSERVE_TILE(R)                                                                       \
  case R:                                                                                     \
    dot_tile<R>(xm, ldx, panel, K4, acc);                                                     \
    finish_tile<R>(acc, comp + m, sx + m, w_scale + n0, b, xo, wo, o.n_outl, mask, ym, N);    \
    break;
      KVSERVE_TILE(1) KVSERVE_TILE(2) KVSERVE_TILE(3) KVSERVE_TILE(4)
      KVSERVE_TILE(5) KVSERVE_TILE(6) KVSERVE_TILE(7) KVSERVE_TILE(8)
#undef KVSERVE_TILE
    }
    if (o.dyn > 0) add_dynamic(o, m, rows, n0, N, mask, y);
  }
}

}  // namespace kvserve_gemm
