// The vector exp shared by attention's softmax (attention.cpp), the GELU (gelu.cpp) and the screen's
// sampling weights (screen.cpp): inline, so each keeps it in its inner loops.
#pragma once

#include "kernels.h"

namespace gptforge {
namespace {

// ---- exp ----------------------------------------------------------------------------------------------
// exp(z), z clamped to [-104, 89]: n = round(z log2(e)), r = z - n ln2 (two fused steps, ln2 split in two),
// a degree-7 Taylor polynomial in r (|r| <= 0.35: its truncation error is 6e-9, under float32's rounding)
// by fused Horner steps, times 2^n (one rounding). For the GELU, attention's softmax and the screen's
// sampling weights; the AVX-512 and AVX2 code give the scalar reference's bits (tests/backends/cpu/test_native.py).
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2Hi = 0.693359375f;  // ln 2 = hi + lo, hi with few bits: n * hi is exact
constexpr float kLn2Lo = -2.12194440e-4f;
constexpr float kExpTaylor[8] = {1.0f / 5040, 1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f};

// exp(z) for float32 z, clamped to [-104, 89] first (e^-104 is 0 in float32, e^89 is inf); a NaN stays
// NaN. Within a few ulp of the true value; the AVX-512 and AVX2 code below give the same bits.
inline float exp_scalar(float z) {
  z = -104.0f > z ? -104.0f : z;  // as _mm512_max_ps(-104, z): a NaN z stays NaN
  z = 89.0f < z ? 89.0f : z;
  const float n = std::nearbyint(z * kLog2e);
  float r = std::fma(-n, kLn2Hi, z);
  r = std::fma(-n, kLn2Lo, r);
  float p = kExpTaylor[0];
  for (int i = 1; i < 8; ++i) p = std::fma(p, r, kExpTaylor[i]);
  return std::isnan(n) ? n : std::ldexp(p, static_cast<int>(n));
}

#if defined(__x86_64__) && defined(__GNUC__)
// exp_scalar on 16 lanes, bit for bit.
__attribute__((target("avx512f"))) inline __m512 exp_avx512(__m512 z) {
  z = _mm512_min_ps(_mm512_set1_ps(89.0f), _mm512_max_ps(_mm512_set1_ps(-104.0f), z));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(z, _mm512_set1_ps(kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), z);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
  __m512 p = _mm512_set1_ps(kExpTaylor[0]);
  for (int k = 1; k < 8; ++k) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpTaylor[k]));
  return _mm512_scalef_ps(p, n);
}

// exp_scalar on 8 lanes, bit for bit. AVX2 has no scalef: 2^n is applied as two powers of two, 2^(n >> 1)
// and then the rest. n is in [-150, 128] after the clamp and p in [0.7, 1.42], so the first product is
// exact (a normal float) and only the second rounds: once, as ldexp and scalef round.
__attribute__((target("avx2,fma"))) inline __m256 exp_avx2(__m256 z) {
  z = _mm256_min_ps(_mm256_set1_ps(89.0f), _mm256_max_ps(_mm256_set1_ps(-104.0f), z));  // NaN stays NaN
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(z, _mm256_set1_ps(kLog2e)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), z);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
  __m256 p = _mm256_set1_ps(kExpTaylor[0]);
  for (int k = 1; k < 8; ++k) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpTaylor[k]));
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i n1 = _mm256_srai_epi32(ni, 1), n2 = _mm256_sub_epi32(ni, n1);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 two1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23));
  const __m256 two2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23));
  const __m256 out = _mm256_mul_ps(_mm256_mul_ps(p, two1), two2);
  return _mm256_blendv_ps(out, n, _mm256_cmp_ps(n, n, _CMP_UNORD_Q));  // NaN in, NaN out
}

#endif

}  // namespace
}  // namespace gptforge
