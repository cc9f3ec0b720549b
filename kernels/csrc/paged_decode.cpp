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
#include <torch/all.h>
#include <torch/library.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

template <typename T>
void decode_kernel(const T* q, int64_t q_row, const T* kc, const T* vc, const int32_t* tables,
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
        if constexpr (std::is_same_v<T, float>) {
          kb = kc + base;
          vb = vc + base;
          row = s_tok;
        } else {
          for (int64_t t = t0; t < n; ++t) {
            const T* kp = kc + base + t * s_tok;
            const T* vp = vc + base + t * s_tok;
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

}  // namespace

torch::Tensor paged_decode(const torch::Tensor& query, const torch::Tensor& key_cache,
                           const torch::Tensor& value_cache, const torch::Tensor& block_tables,
                           const torch::Tensor& seq_lens, double scale, int64_t window) {
  TORCH_CHECK_VALUE(query.dim() == 3 && query.stride(2) == 1 && query.stride(1) == query.size(2),
                    "query must be [num_seqs, num_heads, head_dim] with contiguous heads");
  TORCH_CHECK_VALUE(query.scalar_type() == key_cache.scalar_type() &&
                    key_cache.scalar_type() == value_cache.scalar_type(),
                    "query, key_cache and value_cache must share a dtype");
  TORCH_CHECK_VALUE(block_tables.size(0) == query.size(0) && seq_lens.size(0) == query.size(0),
                    "block_tables and seq_lens need one row per query");
  TORCH_CHECK_VALUE(key_cache.is_contiguous() || (key_cache.stride(3) == 1 &&
                    key_cache.stride(2) == key_cache.size(3)), "key_cache rows must be contiguous");
  TORCH_CHECK_VALUE(key_cache.strides() == value_cache.strides(),
                    "key/value caches differ in layout");
  auto tables = block_tables.to(torch::kInt32).contiguous();
  auto lens = seq_lens.to(torch::kInt32).contiguous();
  const int64_t num_seqs = query.size(0), H = query.size(1), D = query.size(2);
  const int64_t BS = key_cache.size(1), KVH = key_cache.size(2);
  TORCH_CHECK_VALUE(H % KVH == 0, "num_heads must be a multiple of num_kv_heads");
  auto out = torch::empty({num_seqs, H, D}, query.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, query.scalar_type(), "paged_decode", [&] {
    decode_kernel<scalar_t>(query.data_ptr<scalar_t>(), query.stride(0),
                            key_cache.data_ptr<scalar_t>(), value_cache.data_ptr<scalar_t>(),
                            tables.data_ptr<int32_t>(), lens.data_ptr<int32_t>(),
                            out.data_ptr<scalar_t>(), num_seqs, H, KVH, D, BS, tables.size(1),
                            key_cache.stride(0), key_cache.stride(1), static_cast<float>(scale),
                            window);
  });
  return out;
}

// Writes each token's K/V row ([num_tokens, kv_heads, head_dim]) into its pool slot
// (block * block_size + offset); slot -1 (padding) is skipped. No host sync, no masks.
void store_kv(const torch::Tensor& key, const torch::Tensor& value, torch::Tensor& key_cache,
              torch::Tensor& value_cache, const torch::Tensor& slot_mapping) {
  TORCH_CHECK_VALUE(key_cache.is_contiguous() && value_cache.is_contiguous(),
                    "key/value caches must be contiguous");
  TORCH_CHECK_VALUE(key.scalar_type() == key_cache.scalar_type() &&
                    value.scalar_type() == value_cache.scalar_type(),
                    "key/value and their caches must share a dtype");
  const int64_t T = key.size(0);
  TORCH_CHECK_VALUE(slot_mapping.size(0) == T, "slot_mapping needs one slot per token");
  const int64_t row = key_cache.size(2) * key_cache.size(3);
  const int64_t num_slots = key_cache.size(0) * key_cache.size(1);
  TORCH_CHECK_VALUE(key.numel() == T * row && value.numel() == T * row,
                    "key/value rows do not match the cache's kv_heads x head_dim");
  auto k = key.contiguous(), v = value.contiguous();
  auto slots = slot_mapping.to(torch::kInt64).contiguous();
  const int64_t* sp = slots.data_ptr<int64_t>();
  const size_t bytes = row * key.element_size();
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
