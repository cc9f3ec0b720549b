// Fused elementwise ops for eager CPU steps (prefill above all): each replaces 3-8 aten
// kernels, every one a full pass over a [tokens, width] fp32 tensor, by one pass.
// torch.compile'd steps fuse these themselves and keep the aten forms.
//
//   silu_mul(gate_up [T, 2I]) -> [T, I]      SiLU(gate) * up, gate and up the two halves
//   add_rms_norm(x [T, C], residual [T, C], weight [C], eps) -> out [T, C]
//       residual += x in place, out = RMSNorm(residual) * weight (a pre-norm block's
//       residual add and the next norm)
//   rotary_(q [T, H, D], k [T, KVH, D], cos [T, D], sin [T, D])
//       in place, "rotate half" convention: x' = x * cos + rotate_half(x) * sin with
//       rotate_half(x) = cat(-x[D/2:], x[:D/2]); q and k may be views with row strides
//       (the qkv projection's output), their last two dims dense.
// Not bitwise equal to aten (own exp, fused multiply-adds), so the model uses them only
// where outputs are not fp32-exact anyway (quantized models).
#include <torch/all.h>
#include <torch/library.h>
#include <ATen/Parallel.h>

#include <cmath>

#include "vec_math.h"

namespace {

void silu_mul_row(const float* g, const float* u, float* o, int64_t n) {
  int64_t j = 0;
#if defined(__AVX512F__)
  using namespace kvserve_vec;
  const __m512 one = _mm512_set1_ps(1.f);
  for (; j < n; j += 16) {
    const __mmask16 m = tail_mask(n - j);
    const __m512 x = _mm512_maskz_loadu_ps(m, g + j);
    const __m512 s = _mm512_div_ps(x, _mm512_add_ps(one, exp512(_mm512_sub_ps(_mm512_setzero_ps(), x))));
    _mm512_mask_storeu_ps(o + j, m, _mm512_mul_ps(s, _mm512_maskz_loadu_ps(m, u + j)));
  }
#endif
  for (; j < n; ++j) o[j] = g[j] / (1.f + std::exp(-g[j])) * u[j];
}

at::Tensor silu_mul(const at::Tensor& gate_up) {
  TORCH_CHECK_VALUE(gate_up.scalar_type() == at::kFloat && gate_up.dim() == 2 &&
                    gate_up.size(1) % 2 == 0, "silu_mul: gate_up must be [T, 2I] float32");
  const auto x = gate_up.contiguous();
  const int64_t T = x.size(0), I = x.size(1) / 2;
  auto out = at::empty({T, I}, x.options());
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) silu_mul_row(xp + t * 2 * I, xp + t * 2 * I + I, op + t * I, I);
  });
  return out;
}

void add_rms_norm_row(const float* x, float* r, const float* w, float* o, int64_t C, float eps) {
  float ss = 0.f;
  int64_t j = 0;
#if defined(__AVX512F__)
  using namespace kvserve_vec;
  __m512 acc = _mm512_setzero_ps();
  for (; j < C; j += 16) {
    const __mmask16 m = tail_mask(C - j);
    const __m512 v = _mm512_add_ps(_mm512_maskz_loadu_ps(m, r + j), _mm512_maskz_loadu_ps(m, x + j));
    _mm512_mask_storeu_ps(r + j, m, v);
    acc = _mm512_fmadd_ps(v, v, acc);
  }
  ss = _mm512_reduce_add_ps(acc);
#endif
  for (; j < C; ++j) {
    r[j] += x[j];
    ss += r[j] * r[j];
  }
  const float inv = 1.f / std::sqrt(ss / static_cast<float>(C) + eps);
  j = 0;
#if defined(__AVX512F__)
  const __m512 vinv = _mm512_set1_ps(inv);
  for (; j < C; j += 16) {
    const __mmask16 m = tail_mask(C - j);
    _mm512_mask_storeu_ps(o + j, m, _mm512_mul_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, r + j), vinv),
                                                  _mm512_maskz_loadu_ps(m, w + j)));
  }
#endif
  for (; j < C; ++j) o[j] = r[j] * inv * w[j];
}

at::Tensor add_rms_norm(const at::Tensor& x, at::Tensor& residual, const at::Tensor& weight,
                        double eps) {
  TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat && residual.scalar_type() == at::kFloat &&
                    weight.scalar_type() == at::kFloat, "add_rms_norm: float32 only");
  TORCH_CHECK_VALUE(x.dim() == 2 && x.sizes() == residual.sizes() && residual.is_contiguous() &&
                    weight.numel() == x.size(1) && weight.is_contiguous(),
                    "add_rms_norm: x and a contiguous residual must be [T, C], weight [C]");
  const auto xc = x.contiguous();
  const int64_t T = xc.size(0), C = xc.size(1);
  auto out = at::empty({T, C}, xc.options());
  const float* xp = xc.data_ptr<float>();
  float* rp = residual.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      add_rms_norm_row(xp + t * C, rp + t * C, wp, op + t * C, C, static_cast<float>(eps));
  });
  return out;
}

// One token's heads: x [heads, D] (dense), c/s [D].
void rotate_heads(float* x, int64_t heads, int64_t D, const float* c, const float* s) {
  const int64_t h = D / 2;
  for (int64_t i = 0; i < heads; ++i, x += D) {
    int64_t d = 0;
#if defined(__AVX512F__)
    using namespace kvserve_vec;
    for (; d < h; d += 16) {
      const __mmask16 m = tail_mask(h - d);
      const __m512 a = _mm512_maskz_loadu_ps(m, x + d), b = _mm512_maskz_loadu_ps(m, x + h + d);
      const __m512 lo = _mm512_fmsub_ps(a, _mm512_maskz_loadu_ps(m, c + d),
                                        _mm512_mul_ps(b, _mm512_maskz_loadu_ps(m, s + d)));
      const __m512 hi = _mm512_fmadd_ps(b, _mm512_maskz_loadu_ps(m, c + h + d),
                                        _mm512_mul_ps(a, _mm512_maskz_loadu_ps(m, s + h + d)));
      _mm512_mask_storeu_ps(x + d, m, lo);
      _mm512_mask_storeu_ps(x + h + d, m, hi);
    }
#endif
    for (; d < h; ++d) {
      const float a = x[d], b = x[h + d];
      x[d] = a * c[d] - b * s[d];
      x[h + d] = b * c[h + d] + a * s[h + d];
    }
  }
}

void check_rows(const at::Tensor& x, const char* name) {
  TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat && x.dim() == 3 && x.stride(2) == 1 &&
                    x.stride(1) == x.size(2) && x.size(2) % 2 == 0,
                    "rotary_: ", name, " must be float32 [T, heads, D] with dense heads, D even");
}

void rotary_(at::Tensor& q, at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin) {
  check_rows(q, "q");
  check_rows(k, "k");
  const int64_t T = q.size(0), D = q.size(2);
  TORCH_CHECK_VALUE(k.size(0) == T && k.size(2) == D, "rotary_: q and k differ in T or D");
  const auto c = cos.reshape({-1, D}).contiguous(), s = sin.reshape({-1, D}).contiguous();
  TORCH_CHECK_VALUE(c.scalar_type() == at::kFloat && s.scalar_type() == at::kFloat &&
                    c.size(0) == T && s.size(0) == T, "rotary_: cos/sin must be [T, D] float32");
  float* qp = q.data_ptr<float>();
  float* kp = k.data_ptr<float>();
  const float* cp = c.data_ptr<float>();
  const float* sp = s.data_ptr<float>();
  const int64_t qs = q.stride(0), ks = k.stride(0), H = q.size(1), KVH = k.size(1);
  at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      rotate_heads(qp + t * qs, H, D, cp + t * D, sp + t * D);
      rotate_heads(kp + t * ks, KVH, D, cp + t * D, sp + t * D);
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kvserve, m) {
  m.def("silu_mul(Tensor gate_up) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor(a!) residual, Tensor weight, float eps) -> Tensor");
  m.def("rotary_(Tensor(a!) q, Tensor(b!) k, Tensor cos, Tensor sin) -> ()");
}

TORCH_LIBRARY_IMPL(kvserve, CPU, m) {
  m.impl("silu_mul", &silu_mul);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("rotary_", &rotary_);
}
