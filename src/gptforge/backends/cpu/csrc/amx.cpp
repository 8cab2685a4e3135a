// The amx kernel: int8 weights times int8 activation parts on Intel AMX tiles.
// The AMX intrinsics came with GCC 11 and clang 12; older compilers build everything else.
#ifndef GPTFORGE_AMX
#if defined(__x86_64__) && defined(__GNUC__) && \
    ((defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && __GNUC__ >= 11))
#define GPTFORGE_AMX 1
#else
#define GPTFORGE_AMX 0
#endif
#endif
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "kernels.h"

namespace gptforge {
namespace {

// ---- AmxInt8Linear ------------------------------------------------------------------------------------
// int8 weights times int8 activations on Intel AMX (tile matrix multiply; Sapphire Rapids and later), for
// gptforge.backends.quant's kernel "amx". AMX multiplies 16 x 64 int8 tiles into 16 x 16 int32 in one
// instruction (1024 multiply-adds a cycle, 32x what float32 FMAs do), so a decode step's linears are
// bound by reading the weights, not by arithmetic, at any row count up to the server's 16.
//
// Activations are not rounded to 8 bits: each row is split into two int8 parts on a per-row grid,
//   step = max|x| / 127, t = x * (1 / step), hi = round(t), lo = round((t - hi) * 254),
// so x ~ step * (hi + lo / 254) to ~16 bits (|x - that| <= step / 508), far below the weight's own int8
// rounding. The parts are two rows of the A matrix (hi of row i at 2i, lo at 2i + 1), both multiplied by
// the weight in exact int32 arithmetic; then, per output,
//   y = (((float) acc_hi + (float) acc_lo * (1 / 254)) * step) * scale + bias
// in that order, the same float operations in the tile code and in the scalar reference. Integer sums are
// exact and a row's grid depends on that row alone, so every output has the same bits at any row count,
// thread count and instruction set (batch-invariant by construction, as the panel kernels are).
// A row holding an infinity or NaN gives NaN outputs.
//
// Weight layout (gptforge.backends.cpu.layouts.pack_amx): strips of 16 outputs, (ceil(N / 16), Kp / 4, 64) int8 with Kp
// = K rounded up to 64 and zero padding: strip s, k-group g holds w[16 s + j, 4 g + b] at [s, g, 4 j + b],
// which is AMX's B-tile layout, so one strip's 64-k tile is 1 KB of contiguous bytes.
constexpr int64_t kAmxRows = 16;   // A rows per tile (8 activation rows, as hi and lo)
constexpr float kLoSteps = 254.0f;  // the lo part's grid: 254 steps per hi step
constexpr int64_t kAmxMaxDepth = 131072;  // K x 127 x 127 < 2^31: the int32 sums cannot overflow

// One value on its row's grid (inv = 1 / step): hi = round(t), lo = round((t - hi) * 254), t = x * inv
// clamped to [-127, 127]; the vector code below does the same operations lane by lane.
inline void split_value(float x, float inv, int8_t* hi, int8_t* lo) {
  const float t = std::min(std::max(x * inv, -127.0f), 127.0f);
  const float h = round_even(t);
  *hi = static_cast<int8_t>(h);
  *lo = static_cast<int8_t>(std::min(std::max(round_even((t - h) * kLoSteps), -127.0f), 127.0f));
}

// x (M, K) float32 -> a (2M, Kp) int8, row i's hi part at row 2i and lo part at 2i + 1, inputs K .. Kp-1
// zero; step (M).
void quantize_rows(const float* x, int64_t m, int64_t k, int64_t kp, int8_t* a, float* step) {
  for (int64_t i = 0; i < m; ++i) {
    const float* xi = x + i * k;
    float amax = 0.0f;
    bool finite = true;
    for (int64_t j = 0; j < k; ++j) {
      const float v = std::fabs(xi[j]);
      amax = v > amax ? v : amax;
      finite = finite && v <= 3.4028234e38f;  // false for inf and NaN
    }
    int8_t* hi = a + 2 * i * kp;
    int8_t* lo = hi + kp;
    std::fill(hi + k, hi + kp, int8_t{0});
    std::fill(lo + k, lo + kp, int8_t{0});
    if (!finite) {
      std::fill(hi, hi + k, int8_t{0});
      std::fill(lo, lo + k, int8_t{0});
      step[i] = std::numeric_limits<float>::quiet_NaN();
      continue;
    }
    const float s = std::max(amax, 1e-30f) / 127.0f;
    const float inv = 1.0f / s;
    step[i] = s;
    for (int64_t j = 0; j < k; ++j) split_value(xi[j], inv, hi + j, lo + j);
  }
}

// y[r, j] for rows r0 .. r0 + rows - 1 and the outputs of one strip from int32 sums acc (A rows, 16 apart).
struct AmxEpilogue {
  const int32_t* acc;  // row 2r: hi sums of activation row r0 + r; 2r + 1: lo sums
  const float* step;   // per activation row (indexed from r0)
  const float* scale;  // this strip's 16 scales
  const float* bias;   // this strip's bias, or null
  float* y;            // y[r0, first output of the strip]; rows are ldy apart
  int64_t ldy, rows, valid;
};

void amx_epilogue_body(const AmxEpilogue& e) {
  const float inv = 1.0f / kLoSteps;
  for (int64_t r = 0; r < e.rows; ++r) {
    const int32_t* hi = e.acc + 2 * r * kAmxOut;
    const int32_t* lo = hi + kAmxOut;
    const float s = e.step[r];
    float* yr = e.y + r * e.ldy;
    for (int64_t j = 0; j < e.valid; ++j) {
      const float v = ((static_cast<float>(hi[j]) + static_cast<float>(lo[j]) * inv) * s) * e.scale[j];
      yr[j] = e.bias != nullptr ? v + e.bias[j] : v;
    }
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
// quantize_rows in AVX-512 vectors: the same IEEE operations on each value, so the same bits.
__attribute__((target("avx512f,avx512bw"))) void quantize_rows_avx512(const float* x, int64_t m, int64_t k,
                                                                      int64_t kp, int8_t* a, float* step) {
  const __m512 magic = _mm512_set1_ps(12582912.0f), lim = _mm512_set1_ps(127.0f), nlim = _mm512_set1_ps(-127.0f);
  const __m512 lo_steps = _mm512_set1_ps(kLoSteps);
  for (int64_t i = 0; i < m; ++i) {
    const float* xi = x + i * k;
    __m512 vmax = _mm512_setzero_ps();
    __mmask16 nan = 0;
    int64_t j = 0;
    for (; j + 16 <= k; j += 16) {
      const __m512 v = _mm512_loadu_ps(xi + j);
      vmax = _mm512_max_ps(vmax, _mm512_abs_ps(v));
      nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    }
    float amax = _mm512_reduce_max_ps(vmax);
    bool finite = nan == 0 && amax <= 3.4028234e38f;
    for (; j < k; ++j) {
      const float v = std::fabs(xi[j]);
      amax = v > amax ? v : amax;
      finite = finite && v <= 3.4028234e38f;
    }
    if (!finite) {  // the reference writes this row (NaN step, zero parts)
      quantize_rows(xi, 1, k, kp, a + 2 * i * kp, step + i);
      continue;
    }
    const float s = std::max(amax, 1e-30f) / 127.0f, inv_s = 1.0f / s;
    const __m512 inv = _mm512_set1_ps(inv_s);
    step[i] = s;
    int8_t* hi = a + 2 * i * kp;
    int8_t* lo = hi + kp;
    for (j = 0; j + 16 <= k; j += 16) {
      const __m512 t = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(_mm512_loadu_ps(xi + j), inv), nlim), lim);
      const __m512 h = _mm512_sub_ps(_mm512_add_ps(t, magic), magic);
      const __m512 r = _mm512_mul_ps(_mm512_sub_ps(t, h), lo_steps);
      const __m512 l = _mm512_min_ps(_mm512_max_ps(_mm512_sub_ps(_mm512_add_ps(r, magic), magic), nlim), lim);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(hi + j), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(h)));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(lo + j), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(l)));
    }
    for (; j < k; ++j) split_value(xi[j], inv_s, hi + j, lo + j);
    std::fill(hi + k, hi + kp, int8_t{0});
    std::fill(lo + k, lo + kp, int8_t{0});
  }
}
__attribute__((target("avx512f"))) void amx_epilogue_avx512(const AmxEpilogue& e) { amx_epilogue_body(e); }
#endif

#if GPTFORGE_AMX

// AMX: CPUID.7.0:EDX bits 24 (AMX-TILE) and 25 (AMX-INT8), the OS saving tile state (XCR0 bits 17-18),
// and Linux's per-process permission to use it (arch_prctl ARCH_REQ_XCOMP_PERM), asked for once.
bool amx_supported() {
  static const bool ok = [] {
    unsigned eax, ebx, ecx, edx;
    __asm__ volatile("cpuid" : "=a"(eax), "=b"(ebx), "=c"(ecx), "=d"(edx) : "a"(7), "c"(0));
    if (!((edx >> 24) & 1) || !((edx >> 25) & 1)) return false;
    __asm__ volatile("cpuid" : "=a"(eax), "=b"(ebx), "=c"(ecx), "=d"(edx) : "a"(1), "c"(0));
    if (!((ecx >> 27) & 1)) return false;  // OSXSAVE: xgetbv usable
    unsigned lo_bits, hi_bits;
    __asm__ volatile("xgetbv" : "=a"(lo_bits), "=d"(hi_bits) : "c"(0));
    if (((lo_bits >> 17) & 3) != 3) return false;
#if defined(__linux__)
    // Linux enables tile state but gates it per process: ask once (a no-op if torch already did).
    constexpr long kReqXcompPerm = 0x1023, kXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXtiledata) == 0;
#else
    return false;
#endif
  }();
  return ok;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Strips [s0, s1) for all A rows: tiles 0-1 accumulate A rows 32 g .. 32 g + 31 (hi and lo of 16
// activation rows), tiles 2-3 their A tiles, tile 4 the strip's weights; each B tile is read once per
// 32 A rows.
__attribute__((target("amx-tile,amx-int8,avx512f"))) void amx_strips(
    const int8_t* a, int64_t arows, int64_t kp, const int8_t* w, int64_t s0, int64_t s1, const float* step,
    const float* scale, const float* bias, float* y, int64_t m, int64_t n, int64_t prefetch) {
  TileConfig cfg;
  for (int t = 0; t < 5; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  _tile_loadconfig(&cfg);
  alignas(64) int32_t acc[2 * kAmxRows * kAmxOut];
  const int64_t steps = kp / kAmxDepth;
  for (int64_t s = s0; s < s1; ++s) {
    const int8_t* ws = w + s * kp * kAmxOut;
    for (int64_t g = 0; g < arows; g += 2 * kAmxRows) {
      const bool two = g + kAmxRows < arows;
      const int8_t* a0 = a + g * kp;
      const int8_t* a1 = a0 + kAmxRows * kp;
      _tile_zero(0);
      _tile_zero(1);
      for (int64_t t = 0; t < steps; ++t) {
        if (prefetch > 0 && g == 0) {  // past the last strip is harmless: a prefetch never faults
          const char* ahead = reinterpret_cast<const char*>(ws + (t + prefetch) * kAmxDepth * kAmxOut);
          for (int line = 0; line < kAmxDepth * kAmxOut; line += 64) _mm_prefetch(ahead + line, _MM_HINT_T0);
        }
        _tile_loadd(4, ws + t * kAmxDepth * kAmxOut, 64);
        _tile_loadd(2, a0 + t * kAmxDepth, kp);
        _tile_dpbssd(0, 2, 4);
        if (two) {
          _tile_loadd(3, a1 + t * kAmxDepth, kp);
          _tile_dpbssd(1, 3, 4);
        }
      }
      _tile_stored(0, acc, 64);
      if (two) _tile_stored(1, acc + kAmxRows * kAmxOut, 64);
      const int64_t r0 = g / 2, rows = std::min<int64_t>(m - r0, two ? kAmxRows : kAmxRows / 2);
      if (rows <= 0) continue;
      const AmxEpilogue e{acc, step + r0, scale + s * kAmxOut, bias != nullptr ? bias + s * kAmxOut : nullptr,
                          y + r0 * n + s * kAmxOut, n, rows, std::min<int64_t>(kAmxOut, n - s * kAmxOut)};
      amx_epilogue_avx512(e);
    }
  }
  _tile_release();
}
#else
bool amx_supported() { return false; }
#endif

// The reference for one strip: the same int32 sums in plain loops, then the same epilogue.
void reference_strips(const int8_t* a, int64_t arows, int64_t kp, const int8_t* w, int64_t s0, int64_t s1,
                      const float* step, const float* scale, const float* bias, float* y, int64_t m, int64_t n) {
  std::vector<int32_t> acc(arows * kAmxOut);
  for (int64_t s = s0; s < s1; ++s) {
    const int8_t* ws = w + s * kp * kAmxOut;
    for (int64_t r = 0; r < arows; ++r)
      for (int64_t j = 0; j < kAmxOut; ++j) {
        int32_t sum = 0;
        for (int64_t k = 0; k < kp; ++k)
          sum += static_cast<int32_t>(a[r * kp + k]) * static_cast<int32_t>(ws[(k / 4) * 64 + 4 * j + k % 4]);
        acc[r * kAmxOut + j] = sum;
      }
    const AmxEpilogue e{acc.data(), step, scale + s * kAmxOut, bias != nullptr ? bias + s * kAmxOut : nullptr,
                        y + s * kAmxOut, n, m, std::min<int64_t>(kAmxOut, n - s * kAmxOut)};
    amx_epilogue_body(e);
  }
}

int64_t amx_isa() { return amx_supported() ? 1 : 0; }

void check_amx(const torch::Tensor& packed, const torch::Tensor& scales, int64_t n, int64_t k) {
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == 4 * kAmxOut && packed.is_contiguous() &&
                  packed.scalar_type() == torch::kChar && packed.device().is_cpu(),
              "expected a contiguous int8 CPU weight packed as (strips, Kp / 4, 64)");
  TORCH_CHECK(n >= 1 && k >= 1 && packed.size(0) == (n + kAmxOut - 1) / kAmxOut &&
                  packed.size(1) * 4 == (k + kAmxDepth - 1) / kAmxDepth * kAmxDepth,
              "packed weight does not hold ", n, " outputs of ", k, " inputs");
  TORCH_CHECK(k <= kAmxMaxDepth, "the amx kernel takes at most ", kAmxMaxDepth, " inputs (int32 sums of ", k,
              " products of 127 x 127 could overflow)");
  check_scales(scales, packed.size(0) * kAmxOut);
}

// y (..., N) = x (..., K) @ (W * scale).T (+ bias); isa: -1 the best here, 0 the scalar reference.
torch::Tensor amx_forward(const torch::Tensor& x_in, const torch::Tensor& packed, const torch::Tensor& scales,
                          int64_t n, int64_t k, const c10::optional<torch::Tensor>& bias, int64_t isa,
                          int64_t prefetch) {
  TORCH_CHECK(x_in.dim() >= 1 && x_in.size(-1) == k, "expected an input of shape (..., ", k, ")");
  TORCH_CHECK(x_in.scalar_type() == torch::kFloat && x_in.device().is_cpu(), "expected a float32 CPU input");
  torch::Tensor b_keep;
  const float* bp = per_output(bias, n, "bias", b_keep);
  if (bp != nullptr && n % kAmxOut != 0) {  // the last strip reads 16 values: pad
    b_keep = torch::cat({b_keep, torch::zeros({kAmxOut - n % kAmxOut}, b_keep.options())});
    bp = b_keep.data_ptr<float>();
  }
  const torch::Tensor x = x_in.reshape({-1, k}).contiguous();
  const int64_t m = x.size(0), kp = packed.size(1) * 4, strips = packed.size(0);
  std::vector<int64_t> shape(x_in.sizes().begin(), x_in.sizes().end());
  shape.back() = n;
  torch::Tensor y = torch::empty({m, n}, x.options());
  if (m == 0) return y.view(shape);
  const bool use_amx = isa != 0 && amx_supported();
  const int64_t arows = use_amx ? (2 * m + kAmxRows - 1) / kAmxRows * kAmxRows : 2 * m;
  // quantize_rows writes rows 0 .. 2m-1 whole, so only the tile padding after them needs zeros.
  const std::unique_ptr<int8_t[]> a(new int8_t[arows * kp]);
  std::fill(a.get() + 2 * m * kp, a.get() + arows * kp, int8_t{0});
  std::vector<float> step(m);
  const float* xp = x.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 16384 / k);
  at::parallel_for(0, m, grain, [&](int64_t i0, int64_t i1) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (isa != 0 && __builtin_cpu_supports("avx512bw"))
      return quantize_rows_avx512(xp + i0 * k, i1 - i0, k, kp, a.get() + 2 * i0 * kp, step.data() + i0);
#endif
    quantize_rows(xp + i0 * k, i1 - i0, k, kp, a.get() + 2 * i0 * kp, step.data() + i0);
  });
  const int8_t* wp = packed.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, strips, 1, [&](int64_t s0, int64_t s1) {
#if GPTFORGE_AMX
    if (use_amx) return amx_strips(a.get(), arows, kp, wp, s0, s1, step.data(), sp, bp, yp, m, n, prefetch);
#endif
    reference_strips(a.get(), arows, kp, wp, s0, s1, step.data(), sp, bp, yp, m, n);
  });
  return y.view(shape);
}

torch::Tensor amx_int8_linear(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scales,
                              int64_t n, int64_t k, const c10::optional<torch::Tensor>& bias, int64_t isa,
                              int64_t prefetch) {
  check_amx(packed, scales, n, k);
  return amx_forward(x, packed, scales, n, k, bias, isa, prefetch);
}

class AmxInt8Linear : public LinearKernel {
 public:
  AmxInt8Linear(torch::Tensor packed, torch::Tensor scales, int64_t out_features, int64_t in_features)
      : packed_(std::move(packed)), scales_(std::move(scales)), n_(out_features), k_(in_features) {
    check_amx(packed_, scales_, n_, k_);
    TORCH_CHECK(amx_supported(), "this CPU or OS does not offer AMX-INT8");
  }

  torch::Tensor forward(const torch::Tensor& x, const c10::optional<torch::Tensor>& bias) const override {
    return amx_forward(x, packed_, scales_, n_, k_, bias, -1, kAmxPrefetch);
  }

 private:
  torch::Tensor packed_, scales_;
  int64_t n_, k_;
};

}  // namespace

void bind_amx(py::module& m) {
  py::class_<AmxInt8Linear, LinearKernel>(m, "AmxInt8Linear")
      .def(py::init<torch::Tensor, torch::Tensor, int64_t, int64_t>())
      .def("__call__", &AmxInt8Linear::forward, py::arg("x"), py::arg("bias"),
           py::call_guard<py::gil_scoped_release>());
  m.def("amx_int8_linear", &amx_int8_linear, py::arg("x"), py::arg("packed"), py::arg("scales"),
        py::arg("out_features"), py::arg("in_features"), py::arg("bias"), py::arg("isa") = -1,
        py::arg("prefetch") = kAmxPrefetch, py::call_guard<py::gil_scoped_release>());
  m.def("amx_isa", &amx_isa);
}
}  // namespace gptforge
