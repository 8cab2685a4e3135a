// A decode step's attention: one new token a row over its cached keys, each (row, head) alone.
#include "kernels.h"
#include "exp.h"

namespace gptforge {
namespace {

// ---- decode_attention ---------------------------------------------------------------------------------
// Attention for one new token a row over that row's cached keys (a decode step), all rows and heads in
// one call. Row b's query attends to positions starts[b] .. S-1 of its keys; each (row, head) is computed
// start to end by one thread with the same code whatever else is in the call, so a row's result does
// not depend on the other rows (what the server's batching needs; before, it ran one SDPA call per
// row). scores = q.k * scale (a 16- or 8-lane fma dot, then a fixed-order lane sum), softmax with the
// max subtracted, out = sum_j p_j v_j (fma chains in j order) / sum_j p_j.

// The KV cache holds float32 or bfloat16 (the upper half of a float32: widening is exact, so the same code
// computes on the cached values whichever the cache holds). Cache writes round float32 to bfloat16 to
// nearest even, NaN to 0x7FC0, as torch's conversion (c10::BFloat16) does, so the native step and the
// Python path cache the same bits.
inline float widen(float x) { return x; }
inline float widen(bf16 x) {
  const uint32_t u = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline void narrow_to(float x, float* out) { *out = x; }
inline void narrow_to(float x, bf16* out) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  *out = std::isnan(x) ? static_cast<bf16>(0x7FC0) : static_cast<bf16>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

template <typename T>
struct AttnArgs {
  const float* q;  // D values
  const T* k;      // n keys, D apart
  const T* v;      // n values, D apart
  int64_t n, d;
  float scale;
  float* scores;   // n scratch values
  float* out;      // D values
};

// scores[j] = exp(scores[j] - m) in place (exp_scalar's bits at every level: a vector exp, ~8x faster
// than std::exp, which took most of a decode step's attention); returns their sum, added in j order.
#if defined(__x86_64__) && defined(__GNUC__)
// The whole vectors of exponentiate; returns how many scores they took.
__attribute__((target("avx512f"))) int64_t exponentiate_avx512(float* scores, int64_t n, float m) {
  const __m512 vm = _mm512_set1_ps(m);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) _mm512_storeu_ps(scores + j, exp_avx512(_mm512_sub_ps(_mm512_loadu_ps(scores + j), vm)));
  return j;
}

__attribute__((target("avx2,fma"))) int64_t exponentiate_avx2(float* scores, int64_t n, float m) {
  const __m256 vm = _mm256_set1_ps(m);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) _mm256_storeu_ps(scores + j, exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(scores + j), vm)));
  return j;
}
#endif

float exponentiate(float* scores, int64_t n, float m) {
  int64_t j = 0;
#if defined(__x86_64__) && defined(__GNUC__)
  const int64_t level = panel_isa();
  if (level >= 2) j = exponentiate_avx512(scores, n, m);
  if (level == 1) j = exponentiate_avx2(scores, n, m);
#endif
  for (; j < n; ++j) scores[j] = exp_scalar(scores[j] - m);
  float sum = 0.0f;
  for (j = 0; j < n; ++j) sum += scores[j];
  return sum;
}

template <typename T>
void attend_scalar(const AttnArgs<T>& a) {
  float m = -INFINITY;
  for (int64_t j = 0; j < a.n; ++j) {
    float dot = 0.0f;
    for (int64_t t = 0; t < a.d; ++t) dot = std::fma(a.q[t], widen(a.k[j * a.d + t]), dot);
    a.scores[j] = dot * a.scale;
    m = std::max(m, a.scores[j]);
  }
  const float sum = exponentiate(a.scores, a.n, m);
  for (int64_t t = 0; t < a.d; ++t) {
    float acc = 0.0f;
    for (int64_t j = 0; j < a.n; ++j) acc = std::fma(a.scores[j], widen(a.v[j * a.d + t]), acc);
    a.out[t] = acc / sum;
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx512f"))) inline __m512 load_kv16(const float* p) { return _mm512_loadu_ps(p); }
__attribute__((target("avx512f"))) inline __m512 load_kv16(const bf16* p) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

// D a multiple of 16, at most 256 (16 vectors).
template <typename T>
__attribute__((target("avx512f"))) void attend_avx512(const AttnArgs<T>& a) {
  const int64_t nv = a.d / 16;
  __m512 qv[16];
  for (int64_t t = 0; t < nv; ++t) qv[t] = _mm512_loadu_ps(a.q + 16 * t);
  float m = -INFINITY;
  for (int64_t j = 0; j < a.n; ++j) {
    const T* kj = a.k + j * a.d;
    __m512 acc = _mm512_mul_ps(qv[0], load_kv16(kj));
    for (int64_t t = 1; t < nv; ++t) acc = _mm512_fmadd_ps(qv[t], load_kv16(kj + 16 * t), acc);
    a.scores[j] = _mm512_reduce_add_ps(acc) * a.scale;
    m = std::max(m, a.scores[j]);
  }
  const float sum = exponentiate(a.scores, a.n, m);
  __m512 out[16];
  for (int64_t t = 0; t < nv; ++t) out[t] = _mm512_setzero_ps();
  for (int64_t j = 0; j < a.n; ++j) {
    const __m512 p = _mm512_set1_ps(a.scores[j]);
    const T* vj = a.v + j * a.d;
    for (int64_t t = 0; t < nv; ++t) out[t] = _mm512_fmadd_ps(p, load_kv16(vj + 16 * t), out[t]);
  }
  const __m512 total = _mm512_set1_ps(sum);
  for (int64_t t = 0; t < nv; ++t) _mm512_storeu_ps(a.out + 16 * t, _mm512_div_ps(out[t], total));
}

__attribute__((target("avx2,fma"))) inline __m256 load_kv8(const float* p) { return _mm256_loadu_ps(p); }
__attribute__((target("avx2,fma"))) inline __m256 load_kv8(const bf16* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

// D a multiple of 8, at most 128 (16 vectors).
template <typename T>
__attribute__((target("avx2,fma"))) void attend_avx2(const AttnArgs<T>& a) {
  const int64_t nv = a.d / 8;
  __m256 qv[16];
  for (int64_t t = 0; t < nv; ++t) qv[t] = _mm256_loadu_ps(a.q + 8 * t);
  float m = -INFINITY;
  for (int64_t j = 0; j < a.n; ++j) {
    const T* kj = a.k + j * a.d;
    __m256 acc = _mm256_mul_ps(qv[0], load_kv8(kj));
    for (int64_t t = 1; t < nv; ++t) acc = _mm256_fmadd_ps(qv[t], load_kv8(kj + 8 * t), acc);
    float lanes[8];
    _mm256_storeu_ps(lanes, acc);
    a.scores[j] = (((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]))) * a.scale;
    m = std::max(m, a.scores[j]);
  }
  const float sum = exponentiate(a.scores, a.n, m);
  __m256 out[16];
  for (int64_t t = 0; t < nv; ++t) out[t] = _mm256_setzero_ps();
  for (int64_t j = 0; j < a.n; ++j) {
    const __m256 p = _mm256_broadcast_ss(a.scores + j);
    const T* vj = a.v + j * a.d;
    for (int64_t t = 0; t < nv; ++t) out[t] = _mm256_fmadd_ps(p, load_kv8(vj + 8 * t), out[t]);
  }
  const __m256 total = _mm256_set1_ps(sum);
  for (int64_t t = 0; t < nv; ++t) _mm256_storeu_ps(a.out + 8 * t, _mm256_div_ps(out[t], total));
}
#endif

// One (row, head) with the best code this CPU and head size allow (the same bits in every case).
template <typename T>
void attend(int level, const AttnArgs<T>& a) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (level == 2 && a.d % 16 == 0 && a.d <= 256) return attend_avx512(a);
  if (level >= 1 && a.d % 8 == 0 && a.d <= 128) return attend_avx2(a);
#endif
  attend_scalar(a);
}

}  // namespace

// The element type of a KV cache tensor: float32 or bfloat16.
bool is_bf16_cache(const torch::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == torch::kFloat || t.scalar_type() == torch::kBFloat16,
              "the KV cache must be float32 or bfloat16, got ", t.scalar_type());
  return t.scalar_type() == torch::kBFloat16;
}

namespace {

// Every (row, head) of a decode step, rows and heads split across threads: row b's query (q + b * q_row +
// h * D) attends to its keys from starts[b] (empty: 0) to S-1, and the result goes to y + (b * H + h) * D.
// k, v: row b, head h at k + b * k_row + h * k_head (each an (S, D) block). With write_at >= 0 the row's new
// key and value, C = H * D and 2C after its query (the fused qkv layout), are first stored at that position.
template <typename T>
void attend_heads(const float* q, int64_t q_row, T* k, T* v, int64_t k_row, int64_t k_head, int64_t v_row,
                  int64_t v_head, int64_t write_at, const std::vector<int64_t>& starts, int64_t B, int64_t H,
                  int64_t S, int64_t D, double scale, float* y) {
  const int level = static_cast<int>(panel_isa());
  at::parallel_for(0, B * H, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> scores(S);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / H, h = i % H, s0 = starts.empty() ? 0 : starts[b];
      const float* qi = q + b * q_row + h * D;
      T* ki = k + b * k_row + h * k_head;
      T* vi = v + b * v_row + h * v_head;
      if (write_at >= 0)
        for (int64_t t = 0; t < D; ++t) {
          narrow_to(qi[H * D + t], ki + write_at * D + t);
          narrow_to(qi[2 * H * D + t], vi + write_at * D + t);
        }
      attend(level, AttnArgs<T>{qi, ki + s0 * D, vi + s0 * D, S - s0, D, static_cast<float>(scale), scores.data(),
                                y + (b * H + h) * D});
    }
  });
}

// q (B, H, 1, D) float32; k, v (B, H, S, D) float32 or bfloat16, each (b, h) block of S x D contiguous (a
// view of a KV cache); starts: B first positions (empty: all 0). Returns (B, H, 1, D) float32, a view of a
// contiguous (B, 1, H, D).
torch::Tensor decode_attention(const torch::Tensor& q_in, const torch::Tensor& k, const torch::Tensor& v,
                               std::vector<int64_t> starts, double scale) {
  TORCH_CHECK(q_in.dim() == 4 && k.dim() == 4 && v.dim() == 4, "expected 4-d q, k, v");
  const int64_t B = q_in.size(0), H = q_in.size(1), D = q_in.size(3), S = k.size(2);
  TORCH_CHECK(q_in.size(2) == 1, "decode attention takes one query a row");
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == B && k.size(1) == H && k.size(3) == D,
              "k and v must be (", B, ", ", H, ", S, ", D, ")");
  TORCH_CHECK(q_in.scalar_type() == torch::kFloat && q_in.device().is_cpu() && k.device().is_cpu() &&
                  v.device().is_cpu() && k.scalar_type() == v.scalar_type() &&
                  (k.scalar_type() == torch::kFloat || k.scalar_type() == torch::kBFloat16),
              "expected CPU tensors: q float32, k and v both float32 or both bfloat16");
  TORCH_CHECK(k.stride(3) == 1 && k.stride(2) == D && v.stride(3) == 1 && v.stride(2) == D,
              "each row and head of k and v must be one contiguous (S, D) block");
  if (starts.empty()) starts.assign(B, 0);
  TORCH_CHECK(static_cast<int64_t>(starts.size()) == B, "expected ", B, " starts");
  for (int64_t s : starts) TORCH_CHECK(s >= 0 && s < S, "a start outside the ", S, " keys");
  const torch::Tensor q = q_in.contiguous();
  torch::Tensor y = torch::empty({B, 1, H, D}, q.options());
  const float* qp = q.data_ptr<float>();
  if (k.scalar_type() == torch::kBFloat16)
    attend_heads(qp, H * D, static_cast<bf16*>(k.data_ptr()), static_cast<bf16*>(v.data_ptr()), k.stride(0),
                 k.stride(1), v.stride(0), v.stride(1), -1, starts, B, H, S, D, scale, y.data_ptr<float>());
  else
    attend_heads(qp, H * D, k.data_ptr<float>(), v.data_ptr<float>(), k.stride(0), k.stride(1), v.stride(0),
                 v.stride(1), -1, starts, B, H, S, D, scale, y.data_ptr<float>());
  return y.permute({0, 2, 1, 3});
}

}  // namespace

// One decode step's attention for a layer, from the fused qkv projection, in place of decode_blocks'
// ~15 ATen calls a layer around decode_attention (split, views, transposes, the cache writes, the copy
// back to (B, C)): for each (row, head), the new key and value go into the cache at position `length`
// (rounded to bfloat16 as torch rounds, for a bfloat16 cache), then the query attends to positions
// starts[b] .. length with the same code as decode_attention, and the result goes straight into y
// (B, 1, C). The same values in the same memory, so the same bits.
// qkv (B, 1, 3C) contiguous float32; cache_k, cache_v (n_layer, B, H, max_length, D) or a view of one.
template <typename T>
torch::Tensor attend_step(const torch::Tensor& qkv, const torch::Tensor& cache_k, const torch::Tensor& cache_v,
                          int64_t layer, int64_t n_head, int64_t length, const std::vector<int64_t>& starts,
                          double scale) {
  const int64_t B = qkv.size(0), C = qkv.size(2) / 3, D = C / n_head;
  torch::Tensor y = torch::empty({B, 1, C}, qkv.options());
  attend_heads(qkv.data_ptr<float>(), 3 * C, static_cast<T*>(cache_k.data_ptr()) + layer * cache_k.stride(0),
               static_cast<T*>(cache_v.data_ptr()) + layer * cache_v.stride(0), cache_k.stride(1), cache_k.stride(2),
               cache_v.stride(1), cache_v.stride(2), length, starts, B, n_head, length + 1, D, scale,
               y.data_ptr<float>());
  return y;
}

template torch::Tensor attend_step<float>(const torch::Tensor&, const torch::Tensor&, const torch::Tensor&, int64_t,
                                         int64_t, int64_t, const std::vector<int64_t>&, double);
template torch::Tensor attend_step<bf16>(const torch::Tensor&, const torch::Tensor&, const torch::Tensor&, int64_t,
                                        int64_t, int64_t, const std::vector<int64_t>&, double);

void bind_attention(py::module& m) {
  m.def("decode_attention", &decode_attention, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("starts"),
        py::arg("scale"), py::call_guard<py::gil_scoped_release>());
}
}  // namespace gptforge
