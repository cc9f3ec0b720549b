// Paged prefill attention for CPU: the multi-token sequences of a step (whole prompts, chunks
// after cached context, prefix-cache hits) attend causally over all their K/V, read from the
// block pool through the block table (after store_kv wrote this step's rows). Decode rows
// (one token) are left to paged_decode.
//
//   query            [num_tokens, num_heads, head_dim] fp32 (row stride given)
//   key/value        [num_blocks, block_size, num_kv_heads, head_dim] fp32 / bf16 / fp16
//   block_tables     [num_seqs, max_blocks] int32, seq_lens [num_seqs] int32 (context + new)
//   query_start_loc  [num_seqs + 1] int32: sequence s owns query rows qsl[s] .. qsl[s+1)
//   out              [num_tokens, num_heads, head_dim]: the multi-token sequences' rows written
//   window           sliding window (0 = none): keys with q_pos - k_pos < window
//
// Why not per-sequence SDPA: at prompt sizes (~128 tokens) its per-call overhead dominated
// (~0.5 ms per sequence and layer on the 2-core dev VM), and sequences with cached context
// needed a gather of the pool plus a mask tensor first.
//
// Each (sequence, kv head) first lays its keys out transposed, Kt[d][j] in fp32, so that one
// query's scores come 16 keys per FMA with no horizontal sums, and its values as fp32 rows.
// Then (sequence, kv head, block of query rows) items run in parallel, a few queries at a
// time: scores of 64 keys per pass, an exact softmax over each row (max first, no online
// rescaling), and P V one value row at a time.
#include <torch/all.h>
#include <torch/library.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>

#include "vec_math.h"

namespace {

constexpr int64_t kRowBlock = 16;  // query rows per work item

// scores[i][j .. j + 16 NB) = q_i . K^T[:, j ..] for NQ queries: each K^T load feeds NQ FMAs,
// and NQ x NB independent accumulators hide the FMA latency.
template <int NDV, int NQ, int NB>
inline void qk_pass(const float* const* q, const float* kt, int64_t lp, int64_t j, float* scores) {
  __m512 a[NQ][NB];
#pragma GCC unroll 4
  for (int i = 0; i < NQ; ++i)
#pragma GCC unroll 4
    for (int b = 0; b < NB; ++b) a[i][b] = _mm512_setzero_ps();
  for (int64_t d = 0; d < 16 * NDV; ++d) {
    __m512 k[NB];
#pragma GCC unroll 4
    for (int b = 0; b < NB; ++b) k[b] = _mm512_loadu_ps(kt + d * lp + j + 16 * b);
#pragma GCC unroll 4
    for (int i = 0; i < NQ; ++i) {
      const __m512 qd = _mm512_set1_ps(q[i][d]);
#pragma GCC unroll 4
      for (int b = 0; b < NB; ++b) a[i][b] = _mm512_fmadd_ps(qd, k[b], a[i][b]);
    }
  }
#pragma GCC unroll 4
  for (int i = 0; i < NQ; ++i)
#pragma GCC unroll 4
    for (int b = 0; b < NB; ++b) _mm512_storeu_ps(scores + i * lp + j + 16 * b, a[i][b]);
}

// NQ queries (pre-scaled, D = 16 * NDV) of one (sequence, kv head), query i against keys
// [first[i], last[i]]: out[i] = softmax(q_i K^T) V. Taken together so that each K^T and V
// load feeds NQ FMAs (one query alone was latency-bound). scores: NQ rows of `lp` floats of
// scratch.
template <int NDV, int NQ>
void attend_rows(const float* const* q, const int64_t* first, const int64_t* last,
                 const float* kt, int64_t lp, const float* v, float* scores, float* const* out) {
  constexpr int64_t D = 16 * NDV;
  int64_t lo = first[0], hi = last[0];
  for (int i = 1; i < NQ; ++i) lo = std::min(lo, first[i]), hi = std::max(hi, last[i]);
  // Scores over whole 16-key blocks, 64 keys per pass, then the last 1-3 blocks: K^T is
  // zero-padded past len, and the lanes outside a query's range are dropped by the softmax.
  const int64_t j_begin = lo / 16 * 16, j_end = hi + 1;
  int64_t j = j_begin;
  for (; j + 48 < j_end; j += 64) qk_pass<NDV, NQ, 4>(q, kt, lp, j, scores);
  switch ((j_end - j + 15) / 16) {
    case 3: qk_pass<NDV, NQ, 3>(q, kt, lp, j, scores); break;
    case 2: qk_pass<NDV, NQ, 2>(q, kt, lp, j, scores); break;
    case 1: qk_pass<NDV, NQ, 1>(q, kt, lp, j, scores); break;
    default: break;
  }

  // Each query's softmax over its own range; lanes outside it become 0, so the P V loop
  // below can run over the union of the ranges.
  const int64_t p_begin = j_begin;
  float inv[NQ];
  for (int i = 0; i < NQ; ++i) {
    float* s = scores + i * lp;
    auto lanes = [&](int64_t j0) -> __mmask16 {
      const int64_t lo_i = std::min<int64_t>(std::max<int64_t>(first[i] - j0, 0), 16);
      const int64_t hi_i = std::max<int64_t>(std::min<int64_t>(last[i] - j0 + 1, 16), 0);
      return hi_i <= lo_i ? 0 : static_cast<__mmask16>(((1u << hi_i) - 1) & ~((1u << lo_i) - 1));
    };
    __m512 vmax = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (int64_t j = p_begin; j < j_end; j += 16)
      vmax = _mm512_mask_max_ps(vmax, lanes(j), vmax, _mm512_loadu_ps(s + j));
    const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
    __m512 vsum = _mm512_setzero_ps();
    for (int64_t j = p_begin; j < j_end; j += 16) {
      const __m512 p = _mm512_maskz_mov_ps(
          lanes(j), kvserve_vec::exp512(_mm512_sub_ps(_mm512_loadu_ps(s + j), mx)));
      vsum = _mm512_add_ps(vsum, p);
      _mm512_storeu_ps(s + j, p);
    }
    inv[i] = 1.f / _mm512_reduce_add_ps(vsum);
  }

  __m512 acc[NQ][NDV];
#pragma GCC unroll 4
  for (int i = 0; i < NQ; ++i)
#pragma GCC unroll 16
    for (int e = 0; e < NDV; ++e) acc[i][e] = _mm512_setzero_ps();
  for (int64_t j = lo; j <= hi; ++j) {
    __m512 vr[NDV];
#pragma GCC unroll 16
    for (int e = 0; e < NDV; ++e) vr[e] = _mm512_loadu_ps(v + j * D + 16 * e);
#pragma GCC unroll 4
    for (int i = 0; i < NQ; ++i) {
      const __m512 p = _mm512_set1_ps(scores[i * lp + j]);
#pragma GCC unroll 16
      for (int e = 0; e < NDV; ++e) acc[i][e] = _mm512_fmadd_ps(p, vr[e], acc[i][e]);
    }
  }
#pragma GCC unroll 4
  for (int i = 0; i < NQ; ++i) {
    const __m512 s = _mm512_set1_ps(inv[i]);
#pragma GCC unroll 16
    for (int e = 0; e < NDV; ++e) _mm512_storeu_ps(out[i] + 16 * e, _mm512_mul_ps(acc[i][e], s));
  }
}

// Queries per attend_rows call: 4 x NDV accumulators must fit the 32 registers with the V row.
template <int NDV>
constexpr int kQueries = NDV <= 4 ? 4 : (NDV <= 8 ? 2 : 1);

struct Seq {
  int64_t index, q_start, q_len, len;  // len = context + q_len
  int64_t ws;                          // offset of its (kv head) workspaces
};

template <typename C, int NDV>
void prefill_kernel(const float* q, int64_t q_row, const C* kc, const C* vc, const int32_t* tables,
                    int64_t max_blocks, const std::vector<Seq>& seqs, int64_t H, int64_t KVH,
                    int64_t BS, int64_t s_block, int64_t s_tok, float scale, int64_t window,
                    float* ws, float* out, int64_t out_row) {
  constexpr int64_t D = 16 * NDV;
  const int64_t G = H / KVH;
  const int64_t S = static_cast<int64_t>(seqs.size());
  auto lp_of = [](int64_t len) { return (len + 63) / 64 * 64; };

  // K^T and V of every (sequence, kv head) in fp32; K^T's columns past len are zero.
  at::parallel_for(0, S * KVH, 1, [&](int64_t begin, int64_t end) {
    for (int64_t idx = begin; idx < end; ++idx) {
      const Seq& s = seqs[idx / KVH];
      const int64_t h = idx % KVH, lp = lp_of(s.len);
      float* kt = ws + s.ws + h * 2 * D * lp;
      float* v = kt + D * lp;
      for (int64_t d = 0; d < D; ++d) std::fill(kt + d * lp + s.len, kt + (d + 1) * lp, 0.f);
      for (int64_t j = 0; j < s.len; ++j) {
        const int64_t off = static_cast<int64_t>(tables[s.index * max_blocks + j / BS]) * s_block +
                            (j % BS) * s_tok + h * D;
        for (int64_t i = 0; i < NDV; ++i) {
          alignas(64) float row[16];
          _mm512_store_ps(row, kvserve_vec::load16(kc + off + 16 * i));
          for (int64_t e = 0; e < 16; ++e) kt[(16 * i + e) * lp + j] = row[e];
          _mm512_storeu_ps(v + j * D + 16 * i, kvserve_vec::load16(vc + off + 16 * i));
        }
      }
    }
  });

  // Items: (sequence, kv head, block of query rows); G query heads share the item's K/V.
  std::vector<int64_t> first_item(S + 1, 0);
  for (int64_t i = 0; i < S; ++i)
    first_item[i + 1] = first_item[i] + KVH * ((seqs[i].q_len + kRowBlock - 1) / kRowBlock);
  constexpr int NQ = kQueries<NDV>;
  at::parallel_for(0, first_item[S], 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, qs(NQ * D);
    for (int64_t it = begin; it < end; ++it) {
      const int64_t si = std::upper_bound(first_item.begin(), first_item.end(), it) - first_item.begin() - 1;
      const Seq& s = seqs[si];
      const int64_t blocks = (s.q_len + kRowBlock - 1) / kRowBlock;
      const int64_t h = (it - first_item[si]) / blocks, rb = (it - first_item[si]) % blocks;
      const int64_t lp = lp_of(s.len), ctx = s.len - s.q_len;
      const float* kt = ws + s.ws + h * 2 * D * lp;
      const float* v = kt + D * lp;
      scores.resize(NQ * lp);
      // The item's (row, head) queries, NQ at a time (a partial last group repeats its last
      // query: written twice, identically).
      const int64_t r0 = rb * kRowBlock, n = (std::min(s.q_len, r0 + kRowBlock) - r0) * G;
      for (int64_t c = 0; c < n; c += NQ) {
        const float* qp[NQ];
        float* op[NQ];
        int64_t first[NQ], last[NQ];
        for (int i = 0; i < NQ; ++i) {
          const int64_t k = std::min(c + i, n - 1), r = r0 + k / G, head = h * G + k % G;
          const float* src = q + (s.q_start + r) * q_row + head * D;
          for (int64_t d = 0; d < D; ++d) qs[i * D + d] = src[d] * scale;
          qp[i] = qs.data() + i * D;
          op[i] = out + (s.q_start + r) * out_row + head * D;
          last[i] = ctx + r;
          first[i] = window > 0 ? std::max<int64_t>(last[i] - window + 1, 0) : 0;
        }
        attend_rows<NDV, NQ>(qp, first, last, kt, lp, v, scores.data(), op);
      }
    }
  });
}

template <typename C>
void dispatch_dim(int64_t D, const float* q, int64_t q_row, const C* kc, const C* vc,
                  const int32_t* tables, int64_t max_blocks, const std::vector<Seq>& seqs,
                  int64_t H, int64_t KVH, int64_t BS, int64_t s_block, int64_t s_tok, float scale,
                  int64_t window, float* ws, float* out, int64_t out_row) {
  switch (D) {
#define KVSERVE_DIM(NDV)                                                                         \
  case 16 * NDV:                                                                                 \
    prefill_kernel<C, NDV>(q, q_row, kc, vc, tables, max_blocks, seqs, H, KVH, BS, s_block, s_tok, \
                           scale, window, ws, out, out_row);                                     \
    break;
    KVSERVE_DIM(1) KVSERVE_DIM(2) KVSERVE_DIM(4) KVSERVE_DIM(8) KVSERVE_DIM(16)
#undef KVSERVE_DIM
    default:
      TORCH_CHECK(false, "paged_prefill: head_dim must be 16, 32, 64, 128 or 256, got ", D);
  }
}

void paged_prefill(const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
                   const at::Tensor& block_tables, const at::Tensor& seq_lens,
                   const at::Tensor& query_start_loc, double scale, int64_t window, at::Tensor& out) {
  TORCH_CHECK(query.dim() == 3 && query.scalar_type() == at::kFloat && query.stride(2) == 1 &&
                  query.stride(1) == query.size(2),
              "paged_prefill: query must be float32 [num_tokens, num_heads, head_dim] with dense rows");
  TORCH_CHECK(out.sizes() == query.sizes() && out.scalar_type() == at::kFloat &&
                  out.stride(2) == 1 && out.stride(1) == out.size(2),
              "paged_prefill: out must match query");
  TORCH_CHECK(key_cache.dim() == 4 && key_cache.sizes() == value_cache.sizes() &&
                  key_cache.scalar_type() == value_cache.scalar_type() &&
                  key_cache.is_contiguous() && value_cache.is_contiguous(),
              "paged_prefill: key/value caches must be contiguous [num_blocks, block_size, kv_heads, head_dim]");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt &&
                  query_start_loc.scalar_type() == at::kInt,
              "paged_prefill: block_tables, seq_lens and query_start_loc must be int32");
  const int64_t H = query.size(1), D = query.size(2), KVH = key_cache.size(2), BS = key_cache.size(1);
  TORCH_CHECK(key_cache.size(3) == D && H % KVH == 0, "paged_prefill: head shapes do not match");
  const int64_t S = seq_lens.numel();
  TORCH_CHECK(query_start_loc.numel() == S + 1 && block_tables.size(0) == S,
              "paged_prefill: seq_lens, query_start_loc and block_tables disagree on num_seqs");
  const auto bt = block_tables.contiguous();
  const auto lens_t = seq_lens.contiguous();
  const auto qsl_t = query_start_loc.contiguous();
  const int32_t* lens = lens_t.data_ptr<int32_t>();
  const int32_t* qsl = qsl_t.data_ptr<int32_t>();
  const int64_t max_blocks = bt.size(1);

  std::vector<Seq> seqs;
  int64_t ws_size = 0;
  for (int64_t s = 0; s < S; ++s) {
    const int64_t q_len = qsl[s + 1] - qsl[s], len = lens[s];
    if (q_len <= 1) continue;  // decode rows: paged_decode's
    TORCH_CHECK(len >= q_len && (len + BS - 1) / BS <= max_blocks && qsl[s + 1] <= query.size(0),
                "paged_prefill: sequence ", s, " does not fit its block table or the query");
    seqs.push_back({s, qsl[s], q_len, len, ws_size});
    ws_size += KVH * 2 * D * ((len + 63) / 64 * 64);
  }
  if (seqs.empty()) return;
  // Every element that is read is written first (K^T padding included; V rows past len are
  // never read), so no zero-fill.
  std::unique_ptr<float[]> ws(new float[ws_size]);
  const float* qp = query.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t s_block = key_cache.stride(0), s_tok = key_cache.stride(1);
#define KVSERVE_POOL(C)                                                                         \
  dispatch_dim<C>(D, qp, query.stride(0), key_cache.data_ptr<C>(), value_cache.data_ptr<C>(),   \
                  bt.data_ptr<int32_t>(), max_blocks, seqs, H, KVH, BS, s_block, s_tok,          \
                  static_cast<float>(scale), window, ws.get(), op, out.stride(0))
  switch (key_cache.scalar_type()) {
    case at::kFloat: KVSERVE_POOL(float); break;
    case at::kBFloat16: KVSERVE_POOL(at::BFloat16); break;
    case at::kHalf: KVSERVE_POOL(at::Half); break;
    default: TORCH_CHECK(false, "paged_prefill: the pool must be float32, bfloat16 or float16");
  }
#undef KVSERVE_POOL
}

}  // namespace
#endif

TORCH_LIBRARY_FRAGMENT(kvserve, m) {
  m.def("paged_prefill(Tensor query, Tensor key_cache, Tensor value_cache, Tensor block_tables, "
        "Tensor seq_lens, Tensor query_start_loc, float scale, int window, Tensor(a!) out) -> ()");
}

// Without AVX-512 the op has no CPU kernel and the backend keeps SDPA (cpu_ops.has_op).
#if defined(__AVX512F__)
TORCH_LIBRARY_IMPL(kvserve, CPU, m) {
  m.impl("paged_prefill", &paged_prefill);
}
#endif
