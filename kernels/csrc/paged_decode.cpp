// Paged decode attention for CPU: one query token per sequence, K/V read straight from the
// block pool through the block table (no gather into padded tensors), online softmax over
// one KV block at a time, fp32 accumulation. Parallel over (sequence, kv head); the query
// heads sharing a kv head reuse each K/V row while it is in cache.
//
//   query        [num_seqs, num_heads, head_dim]            (row stride given)
//   key/value    [num_blocks, block_size, num_kv_heads, head_dim]
//   block_tables [num_seqs, max_blocks] int32,  seq_lens [num_seqs] int32
//   out          [num_seqs, num_heads, head_dim]
//   window       sliding window (0 = none): keys with q_pos - k_pos < window
// The query (and out) may be float32 over a bfloat16/float16 pool (kv_cache_dtype): rows are
// widened to fp32 as they are loaded, so the pool's narrower rows halve the bytes streamed.
#include <torch/all.h>
#include <torch/library.h>
#include <ATen/Parallel.h>

#include <cmath>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "vec_math.h"

namespace {

template <typename T, typename C>
void decode_kernel(const T* q, int64_t q_row, const C* kc, const C* vc, const int32_t* tables,
                   const int32_t* lens, T* out, int64_t num_seqs, int64_t H, int64_t KVH, int64_t D,
                   int64_t BS, int64_t max_blocks, int64_t s_block, int64_t s_tok, float scale,
                   int64_t window) {
  const int64_t G = H / KVH;
  at::parallel_for(0, num_seqs * KVH, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * D), acc(G * D), kf(BS * D), vf(BS * D), p(G * BS), m(G), l(G);
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t b = idx / KVH, h = idx % KVH;
      const int64_t L = lens[b];
      // Sliding window W: the query at position L-1 sees keys L-W .. L-1.
      const int64_t first = window > 0 ? std::max<int64_t>(L - window, 0) : 0;
      for (int64_t g = 0; g < G; ++g) {
        const T* qp = q + b * q_row + (h * G + g) * D;
        for (int64_t d = 0; d < D; ++d) qf[g * D + d] = static_cast<float>(qp[d]) * scale;
        m[g] = -std::numeric_limits<float>::infinity();
        l[g] = 0.f;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t j = first / BS; j * BS < L; ++j) {
        const int64_t n = std::min(BS, L - j * BS);
        const int64_t t0 = std::max<int64_t>(first - j * BS, 0);  // rows before it: out of window
        const int64_t base = static_cast<int64_t>(tables[b * max_blocks + j]) * s_block + h * D;
        // This block's rows of this kv head as fp32: read in place for fp32 pools (rows are
        // s_tok apart), converted into a small buffer for bf16/fp16 ones.
        const float* kb;
        const float* vb;
        int64_t row;
        if constexpr (std::is_same_v<C, float>) {
          kb = kc + base;
          vb = vc + base;
          row = s_tok;
        } else {
          for (int64_t t = t0; t < n; ++t) {
            const C* kp = kc + base + t * s_tok;
            const C* vp = vc + base + t * s_tok;
            for (int64_t d = 0; d < D; ++d) {
              kf[t * D + d] = static_cast<float>(kp[d]);
              vf[t * D + d] = static_cast<float>(vp[d]);
            }
          }
          kb = kf.data();
          vb = vf.data();
          row = D;
        }
        for (int64_t g = 0; g < G; ++g) {
          const float* qg = &qf[g * D];
          float* pg = &p[g * BS];
          float block_max = -std::numeric_limits<float>::infinity();
          for (int64_t t = t0; t < n; ++t) {
            const float* kt = kb + t * row;
            float s = 0.f;
#pragma omp simd reduction(+ : s)
            for (int64_t d = 0; d < D; ++d) s += qg[d] * kt[d];
            pg[t] = s;
            block_max = std::max(block_max, s);
          }
          const float m_new = std::max(m[g], block_max);
          const float corr = std::exp(m[g] - m_new);
          float sum = 0.f;
#pragma omp simd reduction(+ : sum)
          for (int64_t t = t0; t < n; ++t) {  // vector expf (libmvec) under -ffast-math
            pg[t] = std::exp(pg[t] - m_new);
            sum += pg[t];
          }
          l[g] = l[g] * corr + sum;
          m[g] = m_new;
          float* ag = &acc[g * D];
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) ag[d] *= corr;
          for (int64_t t = t0; t < n; ++t) {
            const float pt = pg[t];
            const float* vt = vb + t * row;
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) ag[d] += pt * vt[d];
          }
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        T* op = out + (b * H + h * G + g) * D;
        const float inv = l[g] > 0.f ? 1.f / l[g] : 0.f;
        for (int64_t d = 0; d < D; ++d) op[d] = static_cast<T>(acc[g * D + d] * inv);
      }
    }
  });
}


#if defined(__AVX512F__)
using namespace kvserve_vec;

// AVX-512 path for head_dim = 16 * NV: two passes over the sequence instead of a per-block
// online softmax. Pass 1 computes every score (each K row loaded once for all G query
// heads of its kv head, q held in registers), then one long vectorized max / exp / sum;
// pass 2 accumulates p * V with the accumulators in registers. The per-block rescaling
// and the short, runtime-length inner loops of the generic kernel made it compute-bound at
// ~13 GB/s of K/V; this one streams K/V at several times that.
// The four horizontal sums of a, b, c, d as one [sum a, sum b, sum c, sum d].
inline __m128 hsum4(__m512 a, __m512 b, __m512 c, __m512 d) {
  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3] and the same for c, d
  const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
  const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  // per lane: [a, b, c, d] partial sums
  const __m512 abcd = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(1, 0, 1, 0)),
                                    _mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(3, 2, 3, 2)));
  const __m256 half = _mm256_add_ps(_mm512_castps512_ps256(abcd),
                                    _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(abcd), 1)));
  return _mm_add_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps(half, 1));
}

// Rows come from scattered blocks, which the hardware prefetcher cannot guess: ask for the
// row kAhead tokens ahead while this one is computed.
constexpr int64_t kAhead = 16;

template <typename T, int NV>
inline void prefetch_row(const T* p) {
  constexpr int64_t bytes = 16 * NV * static_cast<int64_t>(sizeof(T));
  for (int64_t off = 0; off < bytes; off += 64)
    _mm_prefetch(reinterpret_cast<const char*>(p) + off, _MM_HINT_T0);
}

template <typename T, typename C, int NV>
void decode_kernel_avx512(const T* q, int64_t q_row, const C* kc, const C* vc,
                          const int32_t* tables, const int32_t* lens, T* out, int64_t num_seqs,
                          int64_t H, int64_t KVH, int64_t BS, int64_t max_blocks, int64_t s_block,
                          int64_t s_tok, float scale, int64_t window) {
  constexpr int64_t D = 16 * NV;
  const int64_t G = H / KVH;
  at::parallel_for(0, num_seqs * KVH, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * D), scores, accv(G * D), inv(G);
    std::vector<int64_t> rows;
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t b = idx / KVH, h = idx % KVH;
      const int64_t L = lens[b];
      const int64_t first = window > 0 ? std::max<int64_t>(L - window, 0) : 0;
      const int64_t n = L - first;
      for (int64_t g = 0; g < G; ++g) {
        const T* qp = q + b * q_row + (h * G + g) * D;
        for (int64_t d = 0; d < D; ++d) qf[g * D + d] = static_cast<float>(qp[d]) * scale;
      }
      if (static_cast<int64_t>(scores.size()) < G * n) scores.resize(G * n);
      rows.resize(n);
      const int32_t* table = tables + b * max_blocks;
      for (int64_t t = 0; t < n; ++t) {  // offset of token first+t's row of this kv head
        const int64_t pos = first + t;
        rows[t] = static_cast<int64_t>(table[pos / BS]) * s_block + (pos % BS) * s_tok + h * D;
      }
      // Pass 1: scores[g * n + t] = q_g . k_t, four tokens at a time so one transposing
      // reduction (hsum4) yields four scores instead of four full horizontal sums.
      int64_t t = 0;
      for (; t + 4 <= n; t += 4) {
        if (t + kAhead + 4 <= n)
          for (int j = 0; j < 4; ++j) prefetch_row<C, NV>(kc + rows[t + kAhead + j]);
        __m512 k[4][NV];
        for (int j = 0; j < 4; ++j)
          for (int i = 0; i < NV; ++i) k[j][i] = load16(kc + rows[t + j] + 16 * i);
        for (int64_t g = 0; g < G; ++g) {
          const float* qg = qf.data() + g * D;
          __m512 acc[4];
          for (int j = 0; j < 4; ++j) acc[j] = _mm512_mul_ps(_mm512_loadu_ps(qg), k[j][0]);
          for (int i = 1; i < NV; ++i) {
            const __m512 qi = _mm512_loadu_ps(qg + 16 * i);
            for (int j = 0; j < 4; ++j) acc[j] = _mm512_fmadd_ps(qi, k[j][i], acc[j]);
          }
          _mm_storeu_ps(scores.data() + g * n + t, hsum4(acc[0], acc[1], acc[2], acc[3]));
        }
      }
      for (; t < n; ++t) {
        const C* kt = kc + rows[t];
        __m512 k[NV];
        for (int i = 0; i < NV; ++i) k[i] = load16(kt + 16 * i);
        for (int64_t g = 0; g < G; ++g) {
          const float* qg = qf.data() + g * D;
          __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(qg), k[0]);
          for (int i = 1; i < NV; ++i) acc = _mm512_fmadd_ps(_mm512_loadu_ps(qg + 16 * i), k[i], acc);
          scores[g * n + t] = _mm512_reduce_add_ps(acc);
        }
      }
      // Softmax over each head's n scores, 16 at a time (the tail masked).
      for (int64_t g = 0; g < G; ++g) {
        float* sg = scores.data() + g * n;
        const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
        __m512 vmax = ninf;
        for (int64_t t = 0; t < n; t += 16) {
          const __mmask16 mk = tail_mask(n - t);
          vmax = _mm512_max_ps(vmax, _mm512_mask_loadu_ps(ninf, mk, sg + t));
        }
        const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
        __m512 vsum = _mm512_setzero_ps();
        for (int64_t t = 0; t < n; t += 16) {
          const __mmask16 mk = tail_mask(n - t);
          const __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, sg + t), mx));
          _mm512_mask_storeu_ps(sg + t, mk, e);
          vsum = _mm512_mask_add_ps(vsum, mk, vsum, e);
        }
        const float sum = _mm512_reduce_add_ps(vsum);
        inv[g] = sum > 0.f ? 1.f / sum : 0.f;
      }
      // Pass 2: out_g = sum_t p_gt v_t / sum_g. Heads go GB at a time with all their
      // accumulators in registers, so each V row is loaded (and widened) once per group.
      constexpr int GB = 16 / NV < 4 ? 16 / NV : 4;
      for (int64_t g0 = 0; g0 < G; g0 += GB) {
        const int64_t gn = std::min<int64_t>(GB, G - g0);
        __m512 acc[GB][NV];
        for (int j = 0; j < GB; ++j)
          for (int i = 0; i < NV; ++i) acc[j][i] = _mm512_setzero_ps();
        const float* p0 = scores.data() + g0 * n;
        for (int64_t t = 0; t < n; ++t) {
          const C* vt = vc + rows[t];
          if (t + kAhead < n) prefetch_row<C, NV>(vc + rows[t + kAhead]);
          __m512 v[NV];
          for (int i = 0; i < NV; ++i) v[i] = load16(vt + 16 * i);
          for (int j = 0; j < GB; ++j) {
            if (j >= gn) break;
            const __m512 pt = _mm512_set1_ps(p0[j * n + t]);
            for (int i = 0; i < NV; ++i) acc[j][i] = _mm512_fmadd_ps(pt, v[i], acc[j][i]);
          }
        }
        for (int64_t j = 0; j < gn; ++j) {
          const int64_t g = g0 + j;
          const __m512 sc = _mm512_set1_ps(inv[g]);
          float* ag = accv.data() + g * D;
          for (int i = 0; i < NV; ++i) _mm512_storeu_ps(ag + 16 * i, _mm512_mul_ps(acc[j][i], sc));
          T* op = out + (b * H + h * G + g) * D;
          for (int64_t d = 0; d < D; ++d) op[d] = static_cast<T>(ag[d]);
        }
      }
    }
  });
}
#endif

// Query/out of type T over a pool of type C: the AVX-512 kernel for head sizes 16..128,
// the generic one otherwise.
template <typename T, typename C>
void run_decode(const torch::Tensor& query, const torch::Tensor& key_cache,
                const torch::Tensor& value_cache, const torch::Tensor& tables,
                const torch::Tensor& lens, torch::Tensor& out, float sc, int64_t window) {
  const int64_t num_seqs = query.size(0), H = query.size(1), D = query.size(2);
  const int64_t BS = key_cache.size(1), KVH = key_cache.size(2);
  const T* qp = query.data_ptr<T>();
  const C* kp = key_cache.data_ptr<C>();
  const C* vp = value_cache.data_ptr<C>();
  T* op = out.data_ptr<T>();
  const int32_t* tp = tables.data_ptr<int32_t>();
  const int32_t* lp = lens.data_ptr<int32_t>();
  const int64_t qs = query.stride(0), mb = tables.size(1);
  const int64_t sb = key_cache.stride(0), st = key_cache.stride(1);
#if defined(__AVX512F__)
  if constexpr (!std::is_same_v<T, double>) {
    switch (D) {
      case 16: return decode_kernel_avx512<T, C, 1>(qp, qs, kp, vp, tp, lp, op, num_seqs, H, KVH, BS, mb, sb, st, sc, window);
      case 32: return decode_kernel_avx512<T, C, 2>(qp, qs, kp, vp, tp, lp, op, num_seqs, H, KVH, BS, mb, sb, st, sc, window);
      case 64: return decode_kernel_avx512<T, C, 4>(qp, qs, kp, vp, tp, lp, op, num_seqs, H, KVH, BS, mb, sb, st, sc, window);
      case 128: return decode_kernel_avx512<T, C, 8>(qp, qs, kp, vp, tp, lp, op, num_seqs, H, KVH, BS, mb, sb, st, sc, window);
      default: break;  // other head sizes: the generic kernel below
    }
  }
#endif
  decode_kernel<T, C>(qp, qs, kp, vp, tp, lp, op, num_seqs, H, KVH, D, BS, mb, sb, st, sc, window);
}

}  // namespace

torch::Tensor paged_decode(const torch::Tensor& query, const torch::Tensor& key_cache,
                           const torch::Tensor& value_cache, const torch::Tensor& block_tables,
                           const torch::Tensor& seq_lens, double scale, int64_t window) {
  TORCH_CHECK_VALUE(query.dim() == 3 && query.stride(2) == 1 && query.stride(1) == query.size(2),
                    "query must be [num_seqs, num_heads, head_dim] with contiguous heads");
  TORCH_CHECK_VALUE(key_cache.scalar_type() == value_cache.scalar_type(),
                    "key_cache and value_cache must share a dtype");
  TORCH_CHECK_VALUE(query.scalar_type() == key_cache.scalar_type() ||
                    query.scalar_type() == torch::kFloat,
                    "query must have the caches' dtype, or be float32 over a bf16/fp16 pool");
  TORCH_CHECK_VALUE(block_tables.size(0) == query.size(0) && seq_lens.size(0) == query.size(0),
                    "block_tables and seq_lens need one row per query");
  TORCH_CHECK_VALUE(key_cache.is_contiguous() || (key_cache.stride(3) == 1 &&
                    key_cache.stride(2) == key_cache.size(3)), "key_cache rows must be contiguous");
  TORCH_CHECK_VALUE(key_cache.strides() == value_cache.strides(),
                    "key/value caches differ in layout");
  auto tables = block_tables.to(torch::kInt32).contiguous();
  auto lens = seq_lens.to(torch::kInt32).contiguous();
  TORCH_CHECK_VALUE(query.size(1) % key_cache.size(2) == 0,
                    "num_heads must be a multiple of num_kv_heads");
  auto out = torch::empty({query.size(0), query.size(1), query.size(2)}, query.options());
  const float sc = static_cast<float>(scale);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, key_cache.scalar_type(), "paged_decode", [&] {
    if (query.scalar_type() == key_cache.scalar_type())
      run_decode<scalar_t, scalar_t>(query, key_cache, value_cache, tables, lens, out, sc, window);
    else if constexpr (!std::is_same_v<scalar_t, double>)
      run_decode<float, scalar_t>(query, key_cache, value_cache, tables, lens, out, sc, window);
    else
      TORCH_CHECK_VALUE(false, "a float64 pool needs a float64 query");
  });
  return out;
}

// Writes each token's K/V row ([num_tokens, kv_heads, head_dim]) into its pool slot
// (block * block_size + offset); slot -1 (padding) is skipped. No host sync, no masks.
void store_kv(const torch::Tensor& key, const torch::Tensor& value, torch::Tensor& key_cache,
              torch::Tensor& value_cache, const torch::Tensor& slot_mapping) {
  TORCH_CHECK_VALUE(key_cache.is_contiguous() && value_cache.is_contiguous(),
                    "key/value caches must be contiguous");
  TORCH_CHECK_VALUE(key_cache.scalar_type() == value_cache.scalar_type(),
                    "key_cache and value_cache must share a dtype");
  const int64_t T = key.size(0);
  TORCH_CHECK_VALUE(slot_mapping.size(0) == T, "slot_mapping needs one slot per token");
  const int64_t row = key_cache.size(2) * key_cache.size(3);
  const int64_t num_slots = key_cache.size(0) * key_cache.size(1);
  TORCH_CHECK_VALUE(key.numel() == T * row && value.numel() == T * row,
                    "key/value rows do not match the cache's kv_heads x head_dim");
  // Rows are rounded to the pool's dtype here (kv_cache_dtype narrower than the model's).
  auto k = key.to(key_cache.scalar_type()).contiguous();
  auto v = value.to(value_cache.scalar_type()).contiguous();
  auto slots = slot_mapping.to(torch::kInt64).contiguous();
  const int64_t* sp = slots.data_ptr<int64_t>();
  const size_t bytes = row * key_cache.element_size();
  auto* kd = static_cast<char*>(key_cache.data_ptr());
  auto* vd = static_cast<char*>(value_cache.data_ptr());
  const auto* ks = static_cast<const char*>(k.data_ptr());
  const auto* vs = static_cast<const char*>(v.data_ptr());
  for (int64_t t = 0; t < T; ++t) {
    const int64_t s = sp[t];
    if (s < 0) continue;
    TORCH_CHECK_INDEX(s < num_slots, "slot ", s, " is outside the KV pool");
    std::memcpy(kd + s * bytes, ks + t * bytes, bytes);
    std::memcpy(vd + s * bytes, vs + t * bytes, bytes);
  }
}

// Real torch ops (torch.ops.kvserve.*), not pybind functions: torch.compile'd graphs call
// them straight from their wrapper, and the schemas tell it which inputs are written.
TORCH_LIBRARY(kvserve, m) {
  m.def("paged_decode(Tensor query, Tensor key_cache, Tensor value_cache, Tensor block_tables, "
        "Tensor seq_lens, float scale, int window) -> Tensor");
  m.def("store_kv(Tensor key, Tensor value, Tensor(a!) key_cache, Tensor(b!) value_cache, "
        "Tensor slot_mapping) -> ()");
}

TORCH_LIBRARY_IMPL(kvserve, CPU, m) {
  m.impl("paged_decode", &paged_decode);
  m.impl("store_kv", &store_kv);
}
