// W8A8 linear for CPU: y = x W^T with x quantized per row to int8 on the fly, W per output
// channel, the product on AVX-512 VNNI (int8_gemm.h: ~5x the fp32 rate on the 2-core dev
// VM), and a few outlier input channels kept in fp32.
//
//   x          [..., K] fp32
//   w_packed   the int8 weight [N, K], zero in the outlier columns, packed by
//              engine/quant.py pack_w8a8 (layout in int8_gemm.h); w_scale [N] fp32
//   outliers   [n] int64 input channels computed in fp32; w_outliers: their fp32 W^T rows
//              [n, N], packed in 48-column panels like w_packed
//   bias       [N] fp32 or none
//   w_t        [K, N] bf16 (W^T) when dynamic > 0: each row's `dynamic` largest |x| entries
//              are taken out of the int8 product and added in fp32 from these rows. For
//              inputs whose spikes move from token to token (down_proj's SiLU(gate) * up),
//              where a fixed channel set misses them. bf16 (rounding 2^-9, below the int8
//              weights' own error) keeps it half the size: each row reads `dynamic` rows of
//              it, which should come from L2, not L3.
//
// Outlier channels are excluded from the row's scale: a post-norm activation carries a few
// channels tens of times larger than the rest, and letting them set the scale would leave
// the others a handful of int8 levels. Their int8 codes saturate harmlessly (zero weights).
//
// Built only where the compiler targets AVX-512 VNNI; elsewhere the op has no CPU kernel and
// engine/quant.py keeps its torch form (kernels/cpu_ops.py has_w8a8).
#include <torch/all.h>
#include <torch/library.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <vector>

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include "int8_gemm.h"
#include "vec_math.h"

namespace {

// The `dyn` entries of row[0..K) largest in magnitude: indices into idx, values into val,
// and zeroed in row. Keeps the running top `dyn`; once it is full, 16 entries at a time are
// compared with its smallest magnitude and only the few that beat it are looked at.
void take_largest(float* row, int64_t K, int64_t dyn, int64_t* idx, float* val) {
  int64_t filled = 0, low = 0;
  float low_abs = 0.f;  // |val[low]|, the smallest kept, once filled == dyn
  auto find_low = [&]() {
    low = 0;
    for (int64_t j = 1; j < dyn; ++j) low = std::fabs(val[j]) < std::fabs(val[low]) ? j : low;
    low_abs = std::fabs(val[low]);
  };
  auto consider = [&](int64_t k) {
    if (filled < dyn) {
      idx[filled] = k;
      val[filled++] = row[k];
      if (filled == dyn) find_low();
    } else if (std::fabs(row[k]) > low_abs) {
      idx[low] = k;
      val[low] = row[k];
      find_low();
    }
  };
  int64_t k = 0;
  // A lower bound for the dyn-th largest |x| before the scan: the dyn-th largest of the 16
  // lanes' maxima (each a distinct entry). Without it the first entries fill the top set
  // with small values and many more pass the filter early in the row.
  float seed = 0.f;
  if (K >= 16 && dyn <= 16) {
    __m512 vmax = _mm512_setzero_ps();
    for (int64_t j = 0; j + 16 <= K; j += 16)
      vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_loadu_ps(row + j)));
    alignas(64) float lanes[16];
    _mm512_store_ps(lanes, vmax);
    std::nth_element(lanes, lanes + dyn - 1, lanes + 16, std::greater<float>());
    seed = lanes[dyn - 1];
  }
  for (; k + 16 <= K; k += 16) {
    const __m512 a = _mm512_abs_ps(_mm512_loadu_ps(row + k));
    __mmask16 m = filled == dyn ? _mm512_cmp_ps_mask(a, _mm512_set1_ps(low_abs), _CMP_GT_OQ)
                                : _mm512_cmp_ps_mask(a, _mm512_set1_ps(seed), _CMP_GE_OQ);
    for (; m; m &= m - 1) consider(k + __builtin_ctz(m));
  }
  for (; k < K; ++k) consider(k);
  for (int64_t j = 0; j < filled; ++j) row[idx[j]] = 0.f;
}

// One row: the scale over the non-outlier channels, then codes = round(x / scale), and
// comp = 128 * sum(codes) (int8_gemm.h stores the weights + 128).
void quantize_row(const float* x, int64_t K, const int64_t* outl, int64_t n_outl, int64_t dyn,
                  float* row, int8_t* q, float* scale, int32_t* comp, int64_t* dyn_idx,
                  float* dyn_val) {
  std::copy(x, x + K, row);
  for (int64_t i = 0; i < n_outl; ++i) row[outl[i]] = 0.f;
  if (dyn > 0) take_largest(row, K, dyn, dyn_idx, dyn_val);
  int64_t k = 0;
  float amax = 0.f;
  __m512 vmax = _mm512_setzero_ps();
  for (; k + 16 <= K; k += 16) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_loadu_ps(row + k)));
  amax = _mm512_reduce_max_ps(vmax);
  for (int64_t j = k; j < K; ++j) amax = std::max(amax, std::fabs(row[j]));
  const float s = amax > 0.f ? amax / 127.f : 1.f;
  const float inv = 1.f / s;
  // cvtps_epi32 rounds half to even (the default MXCSR mode), like torch.round; the
  // saturating pack cannot overflow since |x * inv| <= 127 up to rounding.
  const __m512 vinv = _mm512_set1_ps(inv);
  __m512i vsum = _mm512_setzero_si512();
  for (k = 0; k + 16 <= K; k += 16) {
    const __m512i c = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(row + k), vinv));
    vsum = _mm512_add_epi32(vsum, c);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k), _mm512_cvtsepi32_epi8(c));
  }
  int32_t sum = _mm512_reduce_add_epi32(vsum);
  for (int64_t j = k; j < K; ++j) {
    q[j] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, std::nearbyint(row[j] * inv))));
    sum += q[j];
  }
  *scale = s;
  *comp = 128 * sum;
}

at::Tensor w8a8_linear(const at::Tensor& x, const at::Tensor& w_packed, const at::Tensor& w_scale,
                       const at::Tensor& outliers, const at::Tensor& w_outliers,
                       const std::optional<at::Tensor>& bias,
                       const std::optional<at::Tensor>& w_t, int64_t dynamic) {
  using kvserve_gemm::kPanel;
  TORCH_CHECK(x.scalar_type() == at::kFloat, "w8a8_linear: x must be float32");
  TORCH_CHECK(w_packed.scalar_type() == at::kByte && w_packed.dim() == 4 &&
                  w_packed.size(2) == kPanel && w_packed.size(3) == 4 && w_packed.is_contiguous(),
              "w8a8_linear: w_packed must be a contiguous [N/48, K/4, 48, 4] uint8 tensor "
              "(engine/quant.py pack_w8a8)");
  const int64_t N = w_scale.numel(), K = x.size(-1), K4 = w_packed.size(1);
  TORCH_CHECK(w_packed.size(0) == (N + kPanel - 1) / kPanel && K4 == (K + 3) / 4,
              "w8a8_linear: w_packed holds a [", w_packed.size(0) * kPanel, ", ", K4 * 4,
              "] weight, x has ", K, " features and w_scale ", N, " outputs");
  TORCH_CHECK(w_scale.scalar_type() == at::kFloat && w_scale.is_contiguous(),
              "w8a8_linear: w_scale must be [N] float32");
  TORCH_CHECK(outliers.scalar_type() == at::kLong && outliers.dim() == 1,
              "w8a8_linear: outliers must be a 1-d int64 tensor");
  const int64_t n_outl = outliers.numel();
  TORCH_CHECK(w_outliers.dim() == 3 && w_outliers.size(0) == w_packed.size(0) &&
                  w_outliers.size(1) == n_outl && w_outliers.size(2) == kPanel,
              "w8a8_linear: w_outliers must be [N/48, num_outliers, 48] (engine/quant.py pack_w8a8)");
  if (bias) TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == N && bias->is_contiguous(),
                        "w8a8_linear: bias must be [N] float32");
  TORCH_CHECK(dynamic >= 0 && dynamic <= K, "w8a8_linear: dynamic must be in [0, K]");
  if (dynamic > 0)
    TORCH_CHECK(w_t && w_t->scalar_type() == at::kBFloat16 && w_t->is_contiguous() &&
                    w_t->size(0) == K && w_t->size(1) == N,
                "w8a8_linear: dynamic outliers need w_t, a contiguous [K, N] bfloat16 tensor");
  auto out_shape = x.sizes().vec();
  out_shape.back() = N;
  const auto x2 = x.reshape({-1, K}).contiguous();
  const int64_t M = x2.size(0);
  auto y = at::empty({M, N}, x.options());
  if (M == 0) return y.view(out_shape);

  const int64_t ldx = K4 * 4;  // zero-padded to whole groups of 4
  std::vector<int8_t> xq(M * ldx, 0);
  std::vector<float> sx(M), xo(M * n_outl);
  std::vector<int32_t> comp(M);
  const int64_t dyn = dynamic;
  std::vector<int64_t> dyn_idx(M * dyn);
  std::vector<float> dyn_val(M * dyn);
  const auto outl_t = outliers.contiguous();
  const auto wo_t = w_outliers.to(at::kFloat).contiguous();  // no copy when packed
  const int64_t* outl = outl_t.data_ptr<int64_t>();
  const float* xp = x2.data_ptr<float>();
  at::parallel_for(0, M, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> row(K);
    for (int64_t m = begin; m < end; ++m) {
      quantize_row(xp + m * K, K, outl, n_outl, dyn, row.data(), xq.data() + m * ldx, &sx[m],
                   &comp[m], dyn_idx.data() + m * dyn, dyn_val.data() + m * dyn);
      for (int64_t j = 0; j < n_outl; ++j) xo[m * n_outl + j] = xp[m * K + outl[j]];
    }
  });

  const kvserve_gemm::Outliers o{xo.data(), wo_t.data_ptr<float>(), n_outl,
                                 dyn > 0 ? w_t->data_ptr<at::BFloat16>() : nullptr,
                                 dyn_idx.data(), dyn_val.data(), dyn};
  // Work items are (panel, chunk of rows), panel-major, so a thread's consecutive items reuse
  // a panel from L1/L2; chunks keep a large prefill divisible between the threads.
  const int64_t P = w_packed.size(0), chunk = 128, chunks = (M + chunk - 1) / chunk;
  const uint8_t* wp = w_packed.data_ptr<uint8_t>();
  const float* sw = w_scale.data_ptr<float>();
  const float* b = bias ? bias->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, P * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t p = i / chunks, m0 = (i % chunks) * chunk;
      kvserve_gemm::gemm_block(xq.data(), ldx, wp, K4, comp.data(), sx.data(), sw, b, o, m0,
                               std::min(M, m0 + chunk), p, N, yp);
    }
  });
  return y.view(out_shape);
}

}  // namespace
#endif

TORCH_LIBRARY_FRAGMENT(kvserve, m) {
  m.def("w8a8_linear(Tensor x, Tensor w_packed, Tensor w_scale, Tensor outliers, Tensor w_outliers, "
        "Tensor? bias, Tensor? w_t, int dynamic) -> Tensor");
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
TORCH_LIBRARY_IMPL(kvserve, CPU, m) {
  m.impl("w8a8_linear", &w8a8_linear);
}
#endif
