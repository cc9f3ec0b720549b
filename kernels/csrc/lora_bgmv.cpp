// Multi-LoRA delta for a batch whose tokens are grouped into runs of one adapter slot
// (Punica's BGMV idea, for CPU): each row meets only its own slot's A and B, shrink and
// expand fused, so four adapters in a step cost what one does. The torch form of the same
// contract is kernels/lora.py: lora_delta_torch.
//
//   lora_bgmv_(out [T, N], x [T, K], a [K, S*W], b [S*W, N], runs [R, 3] int64, W)
//       for each run (start, end, slot): out[start:end] += x[start:end] @ a[:, slot*W:(slot+1)*W]
//                                                                      @ b[slot*W:(slot+1)*W]
//       rows in no run (the base model's) are left alone.
//
// Work items are blocks of up to 4 rows of one run, spread over threads: a block's shrink
// (4 x W, fp32) stays in L1 and goes straight into the expand, so nothing is written in
// between. Tiles of 4 rows x 2 vectors keep 8 accumulators in registers (AVX2 has 16), and
// each weight vector loaded feeds 4 rows. Written with GCC vector extensions rather than
// intrinsics so -march=native picks AVX2 or AVX-512; bf16 is widened to fp32 on load and
// rounded to nearest even once, when the delta is added to out.
#include <torch/all.h>
#include <torch/library.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

#if defined(__AVX512F__)
constexpr int VL = 16;
#else
constexpr int VL = 8;
#endif
constexpr int RB = 4;  // rows per work item
constexpr int kMaxW = 2048;  // widest slot (sub-projections x rank): the shrink sits on the stack

typedef float vfloat __attribute__((vector_size(VL * 4)));
typedef uint16_t vu16 __attribute__((vector_size(VL * 2)));
typedef uint32_t vu32 __attribute__((vector_size(VL * 4)));

inline vfloat vload(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline vfloat vload(const at::BFloat16* p) {
  vu16 h;
  std::memcpy(&h, p, sizeof h);
  const vu32 w = __builtin_convertvector(h, vu32) << 16;
  vfloat v;
  std::memcpy(&v, &w, sizeof v);
  return v;
}

inline void vstore(float* p, vfloat v) { std::memcpy(p, &v, sizeof v); }

inline void vstore(at::BFloat16* p, vfloat v) {
  vu32 w;
  std::memcpy(&w, &v, sizeof w);
  w = (w + 0x7FFFu + ((w >> 16) & 1u)) >> 16;  // round to nearest even
  const vu16 h = __builtin_convertvector(w, vu16);
  std::memcpy(p, &h, sizeof h);
}

inline vfloat splat(float x) { return vfloat{} + x; }

template <typename T>
inline float to_f32(T x) { return static_cast<float>(x); }

// s[r][0:W] = x[r] @ a_slot   (a_slot: column block of a, row stride lda)
template <int R, typename T>
void shrink(const T* x, int64_t ldx, const T* a, int64_t lda, int64_t K, int64_t W,
            float (*s)[kMaxW]) {
  int64_t j = 0;
  for (; j + 2 * VL <= W; j += 2 * VL) {
    vfloat acc[R][2] = {};
    for (int64_t k = 0; k < K; ++k) {
      const vfloat a0 = vload(a + k * lda + j), a1 = vload(a + k * lda + j + VL);
      for (int r = 0; r < R; ++r) {
        const vfloat xv = splat(to_f32(x[r * ldx + k]));
        acc[r][0] += xv * a0;
        acc[r][1] += xv * a1;
      }
    }
    for (int r = 0; r < R; ++r) {
      vstore(s[r] + j, acc[r][0]);
      vstore(s[r] + j + VL, acc[r][1]);
    }
  }
  for (; j + VL <= W; j += VL) {
    vfloat acc[R] = {};
    for (int64_t k = 0; k < K; ++k) {
      const vfloat a0 = vload(a + k * lda + j);
      for (int r = 0; r < R; ++r) acc[r] += splat(to_f32(x[r * ldx + k])) * a0;
    }
    for (int r = 0; r < R; ++r) vstore(s[r] + j, acc[r]);
  }
  for (; j < W; ++j) {
    for (int r = 0; r < R; ++r) {
      float acc = 0.f;
      for (int64_t k = 0; k < K; ++k) acc += to_f32(x[r * ldx + k]) * to_f32(a[k * lda + j]);
      s[r][j] = acc;
    }
  }
}

// out[r][0:N] += s[r][0:W] @ b_slot   (b_slot: row block of b, row stride ldb)
template <int R, typename T>
void expand(float (*s)[kMaxW], const T* b, int64_t ldb, int64_t W, int64_t N, T* out,
            int64_t ldo) {
  int64_t n = 0;
  for (; n + 2 * VL <= N; n += 2 * VL) {
    vfloat acc[R][2] = {};
    for (int64_t j = 0; j < W; ++j) {
      const vfloat b0 = vload(b + j * ldb + n), b1 = vload(b + j * ldb + n + VL);
      for (int r = 0; r < R; ++r) {
        const vfloat sv = splat(s[r][j]);
        acc[r][0] += sv * b0;
        acc[r][1] += sv * b1;
      }
    }
    for (int r = 0; r < R; ++r) {
      T* o = out + r * ldo + n;
      vstore(o, vload(o) + acc[r][0]);
      vstore(o + VL, vload(o + VL) + acc[r][1]);
    }
  }
  for (; n < N; ++n) {
    for (int r = 0; r < R; ++r) {
      float acc = 0.f;
      for (int64_t j = 0; j < W; ++j) acc += s[r][j] * to_f32(b[j * ldb + n]);
      out[r * ldo + n] = static_cast<T>(to_f32(out[r * ldo + n]) + acc);
    }
  }
}

template <int R, typename T>
void block(T* out, int64_t ldo, const T* x, int64_t ldx, const T* a, int64_t lda, const T* b,
           int64_t ldb, int64_t K, int64_t W, int64_t N) {
  float s[RB][kMaxW];
  shrink<R>(x, ldx, a, lda, K, W, s);
  expand<R>(s, b, ldb, W, N, out, ldo);
}

template <typename T>
void run_blocks(at::Tensor& out, const at::Tensor& x, const at::Tensor& a, const at::Tensor& b,
                const std::vector<int64_t>& items, int64_t W) {
  const int64_t K = x.size(1), N = out.size(1);
  const int64_t ldx = x.stride(0), ldo = out.stride(0), lda = a.stride(0), ldb = b.stride(0);
  T* op = out.data_ptr<T>();
  const T* xp = x.data_ptr<T>();
  const T* ap = a.data_ptr<T>();
  const T* bp = b.data_ptr<T>();
  const int64_t n_items = static_cast<int64_t>(items.size()) / 3;
  at::parallel_for(0, n_items, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t row = items[3 * i], rows = items[3 * i + 1], slot = items[3 * i + 2];
      T* o = op + row * ldo;
      const T* xr = xp + row * ldx;
      const T* as = ap + slot * W;
      const T* bs = bp + slot * W * ldb;
      switch (rows) {
        case 4: block<4>(o, ldo, xr, ldx, as, lda, bs, ldb, K, W, N); break;
        case 3: block<3>(o, ldo, xr, ldx, as, lda, bs, ldb, K, W, N); break;
        case 2: block<2>(o, ldo, xr, ldx, as, lda, bs, ldb, K, W, N); break;
        default: block<1>(o, ldo, xr, ldx, as, lda, bs, ldb, K, W, N); break;
      }
    }
  });
}

void lora_bgmv_(at::Tensor out, const at::Tensor& x, const at::Tensor& a, const at::Tensor& b,
                const at::Tensor& runs, int64_t W) {
  TORCH_CHECK_VALUE(x.dim() == 2 && out.dim() == 2 && a.dim() == 2 && b.dim() == 2,
                    "lora_bgmv_: out, x, a and b must be 2-D");
  const auto dtype = x.scalar_type();
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kBFloat16,
                    "lora_bgmv_: float32 or bfloat16 only, got ", dtype);
  TORCH_CHECK_VALUE(out.scalar_type() == dtype && a.scalar_type() == dtype &&
                    b.scalar_type() == dtype, "lora_bgmv_: out, x, a and b must share a dtype");
  TORCH_CHECK_VALUE(W > 0 && W <= kMaxW, "lora_bgmv_: width must be in 1..", kMaxW, ", got ", W);
  const int64_t T = x.size(0), K = x.size(1), N = out.size(1);
  TORCH_CHECK_VALUE(out.size(0) == T && a.size(0) == K && b.size(1) == N &&
                    a.size(1) % W == 0 && b.size(0) == a.size(1),
                    "lora_bgmv_: shapes do not fit: out ", out.sizes(), ", x ", x.sizes(),
                    ", a ", a.sizes(), ", b ", b.sizes(), ", width ", W);
  TORCH_CHECK_VALUE(x.stride(1) == 1 && out.stride(1) == 1 && a.stride(1) == 1 &&
                    b.stride(1) == 1, "lora_bgmv_: rows must be dense");
  TORCH_CHECK_VALUE(runs.scalar_type() == at::kLong && runs.dim() == 2 && runs.size(1) == 3,
                    "lora_bgmv_: runs must be int64 [R, 3] (start, end, slot)");
  const auto r = runs.contiguous();
  const int64_t* rp = r.data_ptr<int64_t>();
  const int64_t slots = a.size(1) / W;
  std::vector<int64_t> items;  // (first row, rows, slot) per block of up to RB rows
  for (int64_t i = 0; i < r.size(0); ++i) {
    const int64_t start = rp[3 * i], end = rp[3 * i + 1], slot = rp[3 * i + 2];
    TORCH_CHECK_VALUE(0 <= start && start <= end && end <= T && 0 <= slot && slot < slots,
                      "lora_bgmv_: run ", i, " (", start, ", ", end, ", ", slot,
                      ") is out of range for ", T, " rows and ", slots, " slots");
    for (int64_t row = start; row < end; row += RB) {
      items.insert(items.end(), {row, std::min<int64_t>(RB, end - row), slot});
    }
  }
  if (dtype == at::kFloat) {
    run_blocks<float>(out, x, a, b, items, W);
  } else {
    run_blocks<at::BFloat16>(out, x, a, b, items, W);
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kvserve, m) {
  m.def("lora_bgmv_(Tensor(a!) out, Tensor x, Tensor a, Tensor b, Tensor runs, int width) -> ()");
}

TORCH_LIBRARY_IMPL(kvserve, CPU, m) {
  m.impl("lora_bgmv_", &lora_bgmv_);
}
