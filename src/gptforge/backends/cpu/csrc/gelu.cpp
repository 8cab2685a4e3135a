// GPT-2's tanh GELU on the vector exp, and the exp itself as an op (for the tests).
#include "kernels.h"
#include "exp.h"

namespace gptforge {
namespace {

// ---- gelu_tanh -------------------------------------------------------------------------------------
// GELU in its tanh form (GPT-2's "gelu_new"), 0.5 x (1 + tanh(u)) with u = sqrt(2 / pi) (x + 0.044715 x^3),
// computed as x / (1 + exp(-2u)): the same function (1 + tanh(u) = 2 / (1 + exp(-2u))), without the
// cancellation of 1 + tanh(u) for negative x, exp being exp_scalar's. ATen's vectorized tanh GELU took
// ~70-90 us for 16 rows of 3072 on an Intel Xeon; this ~15. The AVX-512 and AVX2 code and the scalar
// reference do the same operations in the same order: the same bits (tests/backends/cpu/test_native.py).
constexpr float kGeluC = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kGeluA = 0.044715f;
inline float gelu_tanh_scalar(float x) {
  const float u = kGeluC * (x + kGeluA * (x * x * x));
  return x / (1.0f + exp_scalar(-2.0f * u));
}

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx512f"))) void gelu_tanh_avx512(const float* x, float* y, int64_t count) {
  const __m512 c = _mm512_set1_ps(kGeluC), a = _mm512_set1_ps(kGeluA), minus2 = _mm512_set1_ps(-2.0f);
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t i = 0; i < count; i += 16) {
    const int64_t left = count - i;
    const __mmask16 mask = left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
    const __m512 v = _mm512_maskz_loadu_ps(mask, x + i);
    const __m512 u = _mm512_mul_ps(c, _mm512_add_ps(v, _mm512_mul_ps(a, _mm512_mul_ps(_mm512_mul_ps(v, v), v))));
    const __m512 e = exp_avx512(_mm512_mul_ps(minus2, u));
    _mm512_mask_storeu_ps(y + i, mask, _mm512_div_ps(v, _mm512_add_ps(one, e)));
  }
}

__attribute__((target("avx2,fma"))) void gelu_tanh_avx2(const float* x, float* y, int64_t count) {
  const __m256 c = _mm256_set1_ps(kGeluC), a = _mm256_set1_ps(kGeluA), minus2 = _mm256_set1_ps(-2.0f);
  const __m256 one = _mm256_set1_ps(1.0f);
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    const __m256 u = _mm256_mul_ps(c, _mm256_add_ps(v, _mm256_mul_ps(a, _mm256_mul_ps(_mm256_mul_ps(v, v), v))));
    const __m256 e = exp_avx2(_mm256_mul_ps(minus2, u));
    _mm256_storeu_ps(y + i, _mm256_div_ps(v, _mm256_add_ps(one, e)));
  }
  for (; i < count; ++i) y[i] = gelu_tanh_scalar(x[i]);  // the same operations: the same bits
}

__attribute__((target("avx512f"))) void exp_store_avx512(const float* x, float* y) {
  _mm512_storeu_ps(y, exp_avx512(_mm512_loadu_ps(x)));
}
__attribute__((target("avx2,fma"))) void exp_store_avx2(const float* x, float* y) {
  _mm256_storeu_ps(y, exp_avx2(_mm256_loadu_ps(x)));
}
#endif

// 2: the AVX-512 code, 1: AVX2 + FMA, 0: the scalar reference only (as panel_isa()).
int64_t gelu_isa() { return panel_isa(); }

}  // namespace

// y = gelu_tanh(x) over `count` floats (y may be x), split over threads in whole 16-value chunks.
void gelu_tanh_into(const float* x, float* y, int64_t count, int64_t isa) {
  const int level = static_cast<int>(isa < 0 ? gelu_isa() : std::min<int64_t>(isa, gelu_isa()));
  const int64_t chunks = (count + 15) / 16;
  at::parallel_for(0, chunks, 1024, [&](int64_t c0, int64_t c1) {
    const int64_t begin = c0 * 16, end = std::min(count, c1 * 16);
#if defined(__x86_64__) && defined(__GNUC__)
    if (level >= 2) return gelu_tanh_avx512(x + begin, y + begin, end - begin);
    if (level == 1) return gelu_tanh_avx2(x + begin, y + begin, end - begin);
#endif
    for (int64_t i = begin; i < end; ++i) y[i] = gelu_tanh_scalar(x[i]);
  });
}

namespace {

// exp of every value (float32, for the tests: the vector levels against the scalar reference).
torch::Tensor exp_values(const torch::Tensor& x_in, int64_t isa) {
  TORCH_CHECK(x_in.scalar_type() == torch::kFloat && x_in.device().is_cpu(), "expected a float32 CPU tensor");
  const torch::Tensor x = x_in.contiguous();
  torch::Tensor y = torch::empty_like(x);
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t count = x.numel();
  const int level = static_cast<int>(isa < 0 ? gelu_isa() : std::min<int64_t>(isa, gelu_isa()));
  int64_t i = 0;
#if defined(__x86_64__) && defined(__GNUC__)
  if (level >= 2)
    for (; i + 16 <= count; i += 16) exp_store_avx512(xp + i, yp + i);
  if (level == 1)
    for (; i + 8 <= count; i += 8) exp_store_avx2(xp + i, yp + i);
#endif
  for (; i < count; ++i) yp[i] = exp_scalar(xp[i]);
  return y;
}

torch::Tensor gelu_tanh(const torch::Tensor& x_in, int64_t isa) {
  TORCH_CHECK(x_in.scalar_type() == torch::kFloat && x_in.device().is_cpu(), "expected a float32 CPU tensor");
  const torch::Tensor x = x_in.contiguous();
  torch::Tensor y = torch::empty_like(x);
  gelu_tanh_into(x.data_ptr<float>(), y.data_ptr<float>(), x.numel(), isa);
  return y;
}

}  // namespace

void bind_gelu(py::module& m) {
  m.def("gelu_isa", &gelu_isa);
  m.def("exp_values", &exp_values, py::arg("x"), py::arg("isa") = -1);
  m.def("gelu_tanh", &gelu_tanh, py::arg("x"), py::arg("isa") = -1, py::call_guard<py::gil_scoped_release>());
}
}  // namespace gptforge
