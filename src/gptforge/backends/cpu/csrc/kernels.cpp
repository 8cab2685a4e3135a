// gptforge's native CPU kernels: the per-layer glue of the decode step, moved out of Python.
//
// Built on first use by gptforge/native/__init__.py with torch.utils.cpp_extension (a C++ compiler and
// ninja are needed; without them gptforge uses the equivalent Python code). At decode sizes a layer's
// matrix product is short, and what surrounds it from Python costs as much again: each torch op called
// from Python pays 5-10 us of argument parsing and dispatch on this class of CPU, and the int8 layer
// needs ~14 of them. Here each layer is one call.
//
// Int8Linear:   the fbgemm weight-only int8 product of gptforge/quant.py (_fbgemm_linear), the same
//               arithmetic in the same order: per-row step = max|x| / 63, t = x / step, q1 = round(t),
//               q2 = round((t - q1) * 126), rows [q1; q2; pin] through fbgemm's dynamic linear,
//               y = (out1 + out2 / 126) * step + bias. Built with -ffp-contract=off, so the compiler
//               fuses no multiply-adds; the one std::fma is where torch's add(alpha=) fuses too.
// PanelLinear:  gptforge's own float32 product for the prepacked layers (gptforge/inference.py), made
//               for decode sizes (1-32 rows) and batch-invariant by construction. The weight is packed
//               once into panels of 64 outputs, (ceil(N / 64), K, 64), zero-padded; a register tile of
//               up to 6 rows x 64 outputs runs down a panel (AVX-512: 24 accumulators; AVX2: four
//               16-wide strips; a scalar loop elsewhere), and each output is one fused multiply-add chain
//               over k = 0 .. K-1 in order, then + bias. So an output has the same bits at any row count,
//               thread count and instruction set: what lets the server batch requests and still return
//               what `gptforge generate` returns. Panels are split across threads (OpenMP), and the
//               weight stream is prefetched 32 k-rows ahead, without which it is no faster than oneDNN
//               beyond 2 rows (benchmarks/panel_kernel.py); where a panel takes several passes (7 rows
//               or more) the next panel is also loaded into L2 during them.
// PanelInt8Linear: the same kernel on int8 panels with one float32 scale per output (gptforge/quant.py,
//               kernel "panel"): weights widened to float32 in registers (exact), activations not rounded.
// AmxInt8Linear: int8 weights times int8 activations on Intel AMX tiles (gptforge/quant.py, kernel "amx"):
//               each activation row split into two int8 parts on a per-row grid (~16 bits), exact int32
//               sums, one float epilogue; batch-invariant by construction (see its section below).
// PackedLinear: oneDNN's prepacked inner product (mkldnn::_linear_pointwise), called through the C++
//               dispatcher instead of Python's torch.ops; used where PanelLinear has no vector code.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/native/quantized/PackedParams.h>
#include <torch/csrc/jit/api/object.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif
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

namespace {

// Round half to even for |v| < 2^22 in the default rounding mode, like torch.round; unlike
// std::nearbyint it vectorizes without SSE4.1.
inline float round_even(float v) {
  constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23: the sum's last bit is the units place
  return (v + kMagic) - kMagic;          // not folded away: no -ffast-math
}

// y[i, j] = fma(out2[i, j], 1/126, out1[i, j]) * step[i] + bias[j] over the flat range [begin, end).
// The fused multiply-add is what torch's vectorized add(alpha=) does, so the result has the Python
// path's bits; on x86 a copy compiled for AVX2+FMA is picked at run time (std::fma is a libm call
// otherwise, ~4x slower on the LM head's 50k outputs).
struct Epilogue {
  const float* out;
  const float* bias;
  const float* step;
  float* y;
  int64_t m, n;
};

#define GPTFORGE_EPILOGUE_BODY                                                         \
  const float inv126 = 1.0f / 126.0f;                                                  \
  for (int64_t idx = begin; idx < end;) {                                              \
    const int64_t i = idx / e.n, j0 = idx - i * e.n;                                   \
    const int64_t j1 = std::min(e.n, j0 + (end - idx));                                \
    const float* o1 = e.out + i * e.n;                                                 \
    const float* o2 = e.out + (e.m + i) * e.n;                                         \
    const float s = e.step[i];                                                         \
    float* yi = e.y + i * e.n;                                                         \
    if (e.bias != nullptr) {                                                           \
      for (int64_t j = j0; j < j1; ++j) yi[j] = std::fma(o2[j], inv126, o1[j]) * s + e.bias[j]; \
    } else {                                                                           \
      for (int64_t j = j0; j < j1; ++j) yi[j] = std::fma(o2[j], inv126, o1[j]) * s;   \
    }                                                                                  \
    idx += j1 - j0;                                                                    \
  }

void epilogue_generic(const Epilogue& e, int64_t begin, int64_t end) { GPTFORGE_EPILOGUE_BODY }

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx2,fma"))) void epilogue_fma(const Epilogue& e, int64_t begin, int64_t end) {
  GPTFORGE_EPILOGUE_BODY
}
const bool kHasFma = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif

void run_epilogue(const Epilogue& e, int64_t begin, int64_t end) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (kHasFma) return epilogue_fma(e, begin, end);
#endif
  epilogue_generic(e, begin, end);
}

// What every layer kernel below is, so that decode_blocks can run a block's layers without Python.
class LinearKernel {
 public:
  virtual ~LinearKernel() = default;
  virtual torch::Tensor forward(const torch::Tensor& x, const c10::optional<torch::Tensor>& bias) const = 0;
};

class Int8Linear : public LinearKernel {
 public:
  Int8Linear(const torch::jit::Object& packed, int64_t in_features)
      : packed_(c10::IValue(packed._ivalue()).toCustomClass<LinearPackedParamsBase>()), k_(in_features) {
    TORCH_CHECK(in_features >= 2, "in_features must be at least 2");
  }

  // Any (..., K) input, as rows: what gptforge.quant.Int8Linear.forward does around this call.
  torch::Tensor forward(const torch::Tensor& x, const c10::optional<torch::Tensor>& bias) const override {
    if (x.dim() == 2) return forward2d(x, bias);
    TORCH_CHECK(x.dim() >= 1 && x.size(-1) == k_, "expected a (..., ", k_, ") input");
    std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
    torch::Tensor y = forward2d(x.reshape({-1, k_}), bias);
    shape.back() = y.size(1);
    return y.reshape(shape);
  }

  torch::Tensor forward2d(const torch::Tensor& x_in, const c10::optional<torch::Tensor>& bias) const {
    TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) == k_, "expected a (M, ", k_, ") input");
    TORCH_CHECK(x_in.scalar_type() == torch::kFloat && x_in.device().is_cpu(), "expected a float32 CPU input");
    const torch::Tensor x = x_in.contiguous();
    const int64_t m = x.size(0), k = k_;
    torch::Tensor rows = torch::empty({2 * m + 1, k}, x.options());
    std::vector<float> step(m);
    const float* xp = x.data_ptr<float>();
    float* rp = rows.data_ptr<float>();
    const int64_t grain = std::max<int64_t>(1, 32768 / k);
    at::parallel_for(0, m, grain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const float* xi = xp + i * k;
        float amax = 0.0f;
        for (int64_t j = 0; j < k; ++j) {
          const float a = std::fabs(xi[j]);
          amax = (a > amax || a != a) ? a : amax;  // a NaN sticks, as in torch.amax
        }
        const float s = std::max(amax, 1e-30f) / 63.0f;
        step[i] = s;
        float* q1 = rp + i * k;
        float* q2 = rp + (m + i) * k;
        for (int64_t j = 0; j < k; ++j) {
          const float t = xi[j] / s;
          const float a = round_even(t);
          q1[j] = a;
          q2[j] = round_even((t - a) * 126.0f);
        }
      }
    });
    float* pin = rp + 2 * m * k;  // pins fbgemm's input quantization to scale 1, zero point 64
    std::fill(pin, pin + k, 0.0f);
    pin[0] = -64.0f;
    pin[1] = 63.0f;

    const torch::Tensor out = packed_->apply_dynamic(rows, /*reduce_range=*/true);
    const int64_t n = out.size(1);
    torch::Tensor b;
    if (bias.has_value() && bias->defined()) {
      b = bias->to(torch::kFloat).contiguous();
      TORCH_CHECK(b.numel() == n, "bias has ", b.numel(), " values, expected ", n);
    }
    torch::Tensor y = torch::empty({m, n}, x.options());
    Epilogue e{out.data_ptr<float>(), b.defined() ? b.data_ptr<float>() : nullptr, step.data(),
               y.data_ptr<float>(), m, n};
    at::parallel_for(0, m * n, 16384, [&](int64_t begin, int64_t end) { run_epilogue(e, begin, end); });
    return y;
  }

 private:
  c10::intrusive_ptr<LinearPackedParamsBase> packed_;
  int64_t k_;
};

class PackedLinear : public LinearKernel {
 public:
  explicit PackedLinear(torch::Tensor packed_weight)
      : weight_(std::move(packed_weight)),
        op_(c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "")) {}

  torch::Tensor forward(const torch::Tensor& x, const c10::optional<torch::Tensor>& bias) const override {
    torch::jit::Stack stack;
    stack.reserve(6);
    stack.emplace_back(x);
    stack.emplace_back(weight_);
    stack.emplace_back(bias.has_value() && bias->defined() ? c10::IValue(*bias) : c10::IValue());
    stack.emplace_back(std::string("none"));
    stack.emplace_back(c10::List<c10::optional<c10::Scalar>>());
    stack.emplace_back(std::string(""));
    op_.callBoxed(&stack);
    return stack[0].toTensor();
  }

 private:
  torch::Tensor weight_;
  c10::OperatorHandle op_;
};


// ---- PanelLinear, PanelInt8Linear ------------------------------------------------------------------
// The same panel layout and tiles for float32 weights and for int8 weights with one float32 scale per
// output (weight-only int8: activations stay float32). An int8 weight is widened to float32 in registers
// (exact), so every output is acc = fma chain of x[k] * w[k] over k in order; then, for int8, acc * scale;
// then + bias: two separate roundings in every code path.

constexpr int64_t kPanel = 64;    // outputs per panel
constexpr int64_t kTileRows = 6;  // rows per register tile
constexpr int64_t kWideTileRows = 12;  // rows per tile on AVX-512 (see tile_avx512)
constexpr int64_t kPrefetch = 32; // k-rows of weights prefetched ahead (float32: 8 KB)
constexpr int64_t kPrefetchInt8 = 2 * kPrefetch;  // int8 rows are a quarter as long: 4 KB ahead

template <typename W>
struct TileArgs {
  const float* x;      // first row of the tile; rows are ldx apart
  int64_t ldx;
  const W* w;          // the panel: K rows of 64 weights
  int64_t k;
  const float* scale;  // this panel's per-output scales (int8), or null
  const float* bias;   // this panel's bias, or null
  float* y;            // first output of the tile; rows are ldy apart
  int64_t ldy;
  int64_t valid;       // outputs of this panel that exist (the last panel may be partial)
  int64_t prefetch;
  // The next panel, loaded into L2 while this one computes: `l2_lines` cache lines from `l2`, spread evenly
  // over `l2_iters` k-steps of all tiles and passes over this panel, of which this tile's first is
  // `l2_first`. Null: none.
  const char* l2;
  int64_t l2_lines, l2_iters, l2_first;
};

#if defined(__x86_64__) && defined(__GNUC__)
// The share of TileArgs::l2 that one pass loads: a pass starting `offset` k-steps into the tile's own
// steps loads, after its k-step i, the lines up to (l2_first + offset + i + 1) * l2_lines / l2_iters,
// counted without a division. Does nothing where `l2` is null.
struct L2Share {
  const char* line = nullptr;
  int64_t sum = 0, lines = 0, iters = 1;

  template <typename W>
  L2Share(const TileArgs<W>& a, int64_t offset) {
    if (a.l2 == nullptr) return;
    const int64_t first = a.l2_first + offset;
    line = a.l2 + first * a.l2_lines / a.l2_iters * 64;
    sum = first * a.l2_lines % a.l2_iters;
    lines = a.l2_lines;
    iters = a.l2_iters;
  }

  __attribute__((always_inline)) inline void step() {
    if (line == nullptr) return;
    for (sum += lines; sum >= iters; sum -= iters, line += 64) _mm_prefetch(line, _MM_HINT_T1);
  }
};
#endif

// The reference: what every vector tile below must equal bit for bit.
template <typename W>
void tile_scalar(int rows, const TileArgs<W>& a) {
  for (int r = 0; r < rows; ++r)
    for (int64_t j = 0; j < a.valid; ++j) {
      float acc = 0.0f;
      for (int64_t k = 0; k < a.k; ++k)
        acc = std::fma(a.x[r * a.ldx + k], static_cast<float>(a.w[k * kPanel + j]), acc);
      if (a.scale != nullptr) acc = acc * a.scale[j];
      a.y[r * a.ldy + j] = a.bias != nullptr ? acc + a.bias[j] : acc;
    }
}

#if defined(__x86_64__) && defined(__GNUC__)
// Sixteen weights of a k-row as one float vector (int8 widened exactly).
__attribute__((target("avx512f"))) inline __m512 load16(const float* w) { return _mm512_loadu_ps(w); }
__attribute__((target("avx512f"))) inline __m512 load16(const int8_t* w) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w))));
}

// A tile of R rows on AVX-512, run as 4 / S passes down the panel, each over S 16-output strips with all
// R rows (R x S accumulators): S = 4 (one pass) for up to 6 rows, S = 2 (two passes) for 7-12. Each pass
// reads its weights once; the 6-row tiles used before for 8 rows (6 + 2) re-read the panel for the
// second tile, bound by L2 bandwidth: 8 rows took longer than 12 (benchmarks/README.md). S = 1 with
// 13-24 rows was slower still (one broadcast load per fma). Same chains in every case, same bits.
template <typename W, int R, int S>
__attribute__((target("avx512f"))) void tile_avx512(const TileArgs<W>& a) {
  for (int h = 0; h < 4 / S && a.valid > h * S * 16; ++h) {
    __m512 acc[R][S];
    __mmask16 mask[S];
    for (int s = 0; s < S; ++s) {
      const int64_t left = a.valid - (h * S + s) * 16;
      mask[s] = left >= 16 ? static_cast<__mmask16>(0xFFFF)
                           : left <= 0 ? static_cast<__mmask16>(0) : static_cast<__mmask16>((1u << left) - 1);
    }
    for (int r = 0; r < R; ++r)
      for (int s = 0; s < S; ++s) acc[r][s] = _mm512_setzero_ps();
    const W* wh = a.w + h * S * 16;
    L2Share l2(a, h * a.k);
    for (int64_t k = 0; k < a.k; ++k) {
      const W* wk = wh + k * kPanel;
      if (a.prefetch > 0) {  // a prefetch past the panel's end is harmless: it never faults
        const char* ahead = reinterpret_cast<const char*>(wk + a.prefetch * kPanel);
        for (int64_t line = 0; line < static_cast<int64_t>(S * 16 * sizeof(W)); line += 64)
          _mm_prefetch(ahead + line, _MM_HINT_T0);
      }
      l2.step();
      __m512 w[S];
      for (int s = 0; s < S; ++s) w[s] = load16(wk + 16 * s);
      for (int r = 0; r < R; ++r) {
        const __m512 b = _mm512_set1_ps(a.x[r * a.ldx + k]);
        for (int s = 0; s < S; ++s) acc[r][s] = _mm512_fmadd_ps(b, w[s], acc[r][s]);
      }
    }
    for (int s = 0; s < S && mask[s]; ++s) {
      const int64_t o = (h * S + s) * 16;
      const __m512 sc = a.scale != nullptr ? _mm512_maskz_loadu_ps(mask[s], a.scale + o) : _mm512_setzero_ps();
      const __m512 b = a.bias != nullptr ? _mm512_maskz_loadu_ps(mask[s], a.bias + o) : _mm512_setzero_ps();
      for (int r = 0; r < R; ++r) {
        __m512 out = acc[r][s];
        if (a.scale != nullptr) out = _mm512_mul_ps(out, sc);
        if (a.bias != nullptr) out = _mm512_add_ps(out, b);
        _mm512_mask_storeu_ps(a.y + r * a.ldy + o, mask[s], out);
      }
    }
  }
}

// Eight weights of a k-row as one float vector.
__attribute__((target("avx2,fma"))) inline __m256 load8(const float* w) { return _mm256_loadu_ps(w); }
__attribute__((target("avx2,fma"))) inline __m256 load8(const int8_t* w) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w))));
}

template <typename W, int R>
__attribute__((target("avx2,fma"))) void tile_avx2(const TileArgs<W>& a) {
  const int64_t depth = a.k, ldx = a.ldx, prefetch = a.prefetch;
  const float* const x = a.x;
  for (int s = 0; s < 4 && a.valid > s * 16; ++s) {  // the panel as four 16-wide strips (four passes)
    __m256 acc[R][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    const W* const ws = a.w + s * 16;
    L2Share l2(a, s * depth);
    for (int64_t k = 0; k < depth; ++k) {
      if (prefetch > 0) _mm_prefetch(reinterpret_cast<const char*>(ws + (k + prefetch) * kPanel), _MM_HINT_T0);
      l2.step();
      const __m256 w0 = load8(ws + k * kPanel), w1 = load8(ws + k * kPanel + 8);
      for (int r = 0; r < R; ++r) {
        const __m256 b = _mm256_broadcast_ss(x + r * ldx + k);
        acc[r][0] = _mm256_fmadd_ps(b, w0, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(b, w1, acc[r][1]);
      }
    }
    // All accumulators out first, by constant indices: a runtime index into `acc` (the loop below) made GCC
    // keep the array in memory and store every accumulator at every k-step (the 6-row tile ran at 40% of
    // the FMA peak on a Zen 3).
    float tmp[R][16];
    for (int r = 0; r < R; ++r) {
      _mm256_storeu_ps(tmp[r], acc[r][0]);
      _mm256_storeu_ps(tmp[r] + 8, acc[r][1]);
    }
    const int64_t n = std::min<int64_t>(16, a.valid - s * 16);
    for (int r = 0; r < R; ++r) {
      float* yr = a.y + r * a.ldy + s * 16;
      for (int64_t j = 0; j < n; ++j) {
        float v = tmp[r][j];
        if (a.scale != nullptr) v = v * a.scale[s * 16 + j];
        yr[j] = a.bias != nullptr ? v + a.bias[s * 16 + j] : v;
      }
    }
  }
}

template <typename W>
struct Tiles {
  using Tile = void (*)(const TileArgs<W>&);
  static constexpr Tile avx512[kWideTileRows] = {
      tile_avx512<W, 1, 4>, tile_avx512<W, 2, 4>, tile_avx512<W, 3, 4>, tile_avx512<W, 4, 4>,
      tile_avx512<W, 5, 4>, tile_avx512<W, 6, 4>, tile_avx512<W, 7, 2>, tile_avx512<W, 8, 2>,
      tile_avx512<W, 9, 2>, tile_avx512<W, 10, 2>, tile_avx512<W, 11, 2>, tile_avx512<W, 12, 2>};
  static constexpr Tile avx2[kTileRows] = {tile_avx2<W, 1>, tile_avx2<W, 2>, tile_avx2<W, 3>,
                                           tile_avx2<W, 4>, tile_avx2<W, 5>, tile_avx2<W, 6>};
};
#endif

// 2: AVX-512, 1: AVX2 + FMA, 0: neither (the scalar loop: correct, slow; Python keeps other kernels then).
int64_t panel_isa() {
#if defined(__x86_64__) && defined(__GNUC__)
  if (__builtin_cpu_supports("avx512f")) return 2;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
#endif
  return 0;
}

void check_panels(const torch::Tensor& packed, c10::ScalarType dtype, int64_t n) {
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == kPanel && packed.is_contiguous() &&
                  packed.scalar_type() == dtype && packed.device().is_cpu(),
              "expected a contiguous ", c10::toString(dtype), " CPU weight packed as (panels, K, 64)");
  TORCH_CHECK(n >= 1 && packed.size(0) == (n + kPanel - 1) / kPanel, "packed weight does not hold ", n,
              " outputs");
}

// Per-output scales of a packed int8 weight: float32, one value per packed output (padded to whole panels
// or strips: `outputs` of them).
void check_scales(const torch::Tensor& scales, int64_t outputs) {
  TORCH_CHECK(scales.scalar_type() == torch::kFloat && scales.is_contiguous() && scales.device().is_cpu() &&
                  scales.numel() == outputs,
              "scales must be contiguous float32 with one value per packed output (", outputs, ")");
}

const float* per_output(const c10::optional<torch::Tensor>& t, int64_t n, const char* what, torch::Tensor& keep) {
  if (!t.has_value() || !t->defined()) return nullptr;
  keep = t->contiguous();
  TORCH_CHECK(keep.scalar_type() == torch::kFloat && keep.device().is_cpu() && keep.numel() == n, what,
              " must be float32 with ", n, " values");
  return keep.data_ptr<float>();
}

// y (..., N) = x (..., K) @ W.T (* scale) (+ bias) for W packed as (ceil(N / 64), K, 64). isa: -1 the
// best this CPU has, else at most that level (the tests compare levels); prefetch: k-rows ahead, 0: none.
template <typename W>
torch::Tensor panel_forward(const torch::Tensor& x_in, const torch::Tensor& packed, int64_t n,
                            const float* scale, const c10::optional<torch::Tensor>& bias, int64_t isa,
                            int64_t prefetch) {
  const int64_t k = packed.size(1), panels = packed.size(0);
  TORCH_CHECK(x_in.dim() >= 1 && x_in.size(-1) == k, "expected an input of shape (..., ", k, ")");
  TORCH_CHECK(x_in.scalar_type() == torch::kFloat && x_in.device().is_cpu(), "expected a float32 CPU input");
  torch::Tensor b_keep;
  const float* bp = per_output(bias, n, "bias", b_keep);
  const torch::Tensor x = x_in.reshape({-1, k}).contiguous();
  const int64_t m = x.size(0);
  std::vector<int64_t> shape(x_in.sizes().begin(), x_in.sizes().end());
  shape.back() = n;
  torch::Tensor y = torch::empty({m, n}, x.options());
  if (m == 0) return y.view(shape);
  const int level = static_cast<int>(isa < 0 ? panel_isa() : std::min<int64_t>(isa, panel_isa()));
  const float* xp = x.data_ptr<float>();
  const W* wp = packed.data_ptr<W>();
  float* yp = y.data_ptr<float>();
  // Rows go in balanced groups of at most 6 (12 on AVX-512): 8 rows on AVX2 as 4 + 4, not 6 + 2.
  const int64_t most = level == 2 ? kWideTileRows : kTileRows;
  const int64_t groups = (m + most - 1) / most, base = m / groups, extra = m % groups;
  // With several passes over a panel (7 rows or more: AVX-512 tiles of 7-12 rows make two, 13 rows or more
  // make two tiles; AVX2 makes two tiles), only the first reads it from memory and the others run from L2
  // while memory idles. So when prefetching, every pass also loads an even share of the thread's next
  // panel into L2 (all 49 float32 layers of a 16-row decode step: ~10% faster on AVX-512, 15-30% on AVX2,
  // benchmarks/README.md). An AVX2 tile's k-loops are its four 16-output strips, each reading its own
  // quarter of every k-row: a tile reads the panel once, so only a second tile re-reads it.
  auto tile_passes = [&](int64_t rows) -> int64_t { return level == 2 ? (rows > kTileRows ? 2 : 1) : 4; };
  int64_t passes = 0;
  for (int64_t g = 0; g < groups; ++g) passes += tile_passes(base + (g < extra ? 1 : 0));
  const int64_t lines = k * kPanel * static_cast<int64_t>(sizeof(W)) / 64;
  const bool ahead = (level == 2 ? passes : groups) >= 2 && prefetch > 0;
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t g = 0, r0 = 0, done = 0; g < groups; ++g) {
        const int rows = static_cast<int>(base + (g < extra ? 1 : 0));
        const char* next = ahead && p + 1 < p1 ? reinterpret_cast<const char*>(wp + (p + 1) * k * kPanel) : nullptr;
        const TileArgs<W> a{xp + r0 * k, k, wp + p * k * kPanel, k,
                            scale != nullptr ? scale + p * kPanel : nullptr,
                            bp != nullptr ? bp + p * kPanel : nullptr, yp + r0 * n + p * kPanel, n,
                            std::min<int64_t>(kPanel, n - p * kPanel), prefetch, next, lines, passes * k,
                            done * k};
        done += tile_passes(rows);
        r0 += rows;
#if defined(__x86_64__) && defined(__GNUC__)
        if (level == 2) { Tiles<W>::avx512[rows - 1](a); continue; }
        if (level == 1) { Tiles<W>::avx2[rows - 1](a); continue; }
#endif
        tile_scalar<W>(rows, a);
      }
  });
  return y.view(shape);
}

torch::Tensor panel_linear(const torch::Tensor& x, const torch::Tensor& packed, int64_t n,
                           const c10::optional<torch::Tensor>& bias, int64_t isa, int64_t prefetch) {
  check_panels(packed, torch::kFloat, n);
  return panel_forward<float>(x, packed, n, nullptr, bias, isa, prefetch);
}

torch::Tensor panel_int8_linear(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scales,
                                int64_t n, const c10::optional<torch::Tensor>& bias, int64_t isa, int64_t prefetch) {
  check_panels(packed, torch::kChar, n);
  check_scales(scales, packed.size(0) * kPanel);
  return panel_forward<int8_t>(x, packed, n, scales.data_ptr<float>(), bias, isa, prefetch);
}

class PanelLinear : public LinearKernel {
 public:
  PanelLinear(torch::Tensor packed, int64_t out_features) : packed_(std::move(packed)), n_(out_features) {
    check_panels(packed_, torch::kFloat, n_);
  }

  torch::Tensor forward(const torch::Tensor& x, const c10::optional<torch::Tensor>& bias) const override {
    return panel_forward<float>(x, packed_, n_, nullptr, bias, -1, kPrefetch);
  }

 private:
  torch::Tensor packed_;
  int64_t n_;
};

// Weight-only int8: the weight's int8 panels and its per-output scales, padded to whole panels.
class PanelInt8Linear : public LinearKernel {
 public:
  PanelInt8Linear(torch::Tensor packed, torch::Tensor scales, int64_t out_features)
      : packed_(std::move(packed)), scales_(std::move(scales)), n_(out_features) {
    check_panels(packed_, torch::kChar, n_);
    check_scales(scales_, packed_.size(0) * kPanel);
  }

  torch::Tensor forward(const torch::Tensor& x, const c10::optional<torch::Tensor>& bias) const override {
    return panel_forward<int8_t>(x, packed_, n_, scales_.data_ptr<float>(), bias, -1, kPrefetchInt8);
  }

 private:
  torch::Tensor packed_, scales_;
  int64_t n_;
};


// ---- AmxInt8Linear ------------------------------------------------------------------------------------
// int8 weights times int8 activations on Intel AMX (tile matrix multiply; Sapphire Rapids and later), for
// gptforge/quant.py's kernel "amx". AMX multiplies 16 x 64 int8 tiles into 16 x 16 int32 in one
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
// Weight layout (gptforge.quant.pack_amx): strips of 16 outputs, (ceil(N / 16), Kp / 4, 64) int8 with Kp
// = K rounded up to 64 and zero padding: strip s, k-group g holds w[16 s + j, 4 g + b] at [s, g, 4 j + b],
// which is AMX's B-tile layout, so one strip's 64-k tile is 1 KB of contiguous bytes.

constexpr int64_t kAmxOut = 16;    // outputs per strip (a B tile's columns)
constexpr int64_t kAmxDepth = 64;  // k per tile step (an A tile row's bytes)
constexpr int64_t kAmxRows = 16;   // A rows per tile (8 activation rows, as hi and lo)
constexpr float kLoSteps = 254.0f;  // the lo part's grid: 254 steps per hi step
constexpr int64_t kAmxPrefetch = 4;  // weight tiles (1 KB each) prefetched ahead
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
using bf16 = uint16_t;
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

// ---- exp ----------------------------------------------------------------------------------------------
// exp(z), z clamped to [-104, 89]: n = round(z log2(e)), r = z - n ln2 (two fused steps, ln2 split in two),
// a degree-7 Taylor polynomial in r (|r| <= 0.35: its truncation error is 6e-9, under float32's rounding)
// by fused Horner steps, times 2^n (one rounding). For the GELU, attention's softmax and the screen's
// sampling weights; the AVX-512 and AVX2 code give the scalar reference's bits (tests/test_native.py).
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

// The element type of a KV cache tensor: float32 or bfloat16.
bool is_bf16_cache(const torch::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == torch::kFloat || t.scalar_type() == torch::kBFloat16,
              "the KV cache must be float32 or bfloat16, got ", t.scalar_type());
  return t.scalar_type() == torch::kBFloat16;
}

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

// ---- screen_argmax ----------------------------------------------------------------------------------
// Everything of gptforge/inference.py's ArgmaxScreen after the int8 product, in one call. s (M, N): the
// int8 copy's outputs; err, norm (N): per output |w~ - w| and |w|, at most err_max and norm_max. Output v of
// row r lies within
//   bound = err[v] * a[r] + norm[v] * b[r] + 8u |s[r, v]|,
//   a = 1.25 (|x| + split + rounding), b = 1.25 (split + 2 rounding), rounding = (2K + 16) u |x|,
//   split = sqrt(K) max|x| / (127 * 500) when the int8 product split x on the amx grid, else 0
// (in double from x's row; the derivation is in ArgmaxScreen's docstring) of the layer's float32 output,
// so it is a candidate when s + bound >= floor = max over u of (s - bound) in its row; ``suppress``
// (>= 0) never is one. Per row, two scans of s: its largest value (at v0), then
// every v with s_v >= floor0 - most, where floor0 = s[v0] - bound[v0] <= floor and most >= any bound; the
// exact floor and test run on those few (a candidate has s_v >= floor - bound_v >= floor0 - most). The
// candidates of all rows (ascending) are gathered from the float32 panels into panels of their own and
// multiplied by the panel kernel (each output one fma chain over k wherever its panel sits: the layer's
// bits); each row takes its first largest candidate, as torch.argmax would over the whole row. Returns
// (tokens (M,) int64, the number of candidates); tokens is empty when s holds a non-finite value or
// there are more than max_candidates (the caller then runs the full layer).
constexpr float kRound = 8.0f / 16777216.0f;  // 8 u

// The bound's per-row factors a, b (above) for the rows of x (m, k), in double from each row.
void bound_factors(const float* xp, int64_t m, int64_t k, bool split_inputs, float* a_of, float* b_of) {
  for (int64_t r = 0; r < m; ++r) {
    double sq = 0.0, amax = 0.0;
    for (int64_t t = 0; t < k; ++t) {
      const double v = xp[r * k + t];
      sq += v * v;
      amax = std::max(amax, std::fabs(v));
    }
    const double x_norm = std::sqrt(sq);
    const double rounding = (2.0 * k + 16.0) * x_norm / 16777216.0;
    const double split = split_inputs ? std::sqrt(static_cast<double>(k)) * amax / (127.0 * 500.0) : 0.0;
    a_of[r] = static_cast<float>(1.25 * (x_norm + split + rounding));
    b_of[r] = static_cast<float>(1.25 * (split + 2.0 * rounding));
  }
}

struct RowScan {
  float max, min;
  int64_t at;  // first index of max
  bool finite;
};

RowScan scan_row_scalar(const float* s, int64_t n) {
  RowScan out{s[0], s[0], 0, true};
  float check = 0.0f;
  for (int64_t v = 0; v < n; ++v) {
    if (s[v] > out.max) out.max = s[v], out.at = v;
    out.min = s[v] < out.min ? s[v] : out.min;
    check += s[v] * 0.0f;  // stays 0 unless some value is inf or NaN
  }
  out.finite = check == 0.0f;
  return out;
}

// The end of a vector scan: `out` holds the lanes' max and min, `lanes_finite` their check; values v .. n-1
// are left. Adds those, then finds the first index of the max.
RowScan finish_scan(RowScan out, const float* s, int64_t v, int64_t n, bool lanes_finite) {
  float tail = 0.0f;
  for (; v < n; ++v) {
    out.max = s[v] > out.max ? s[v] : out.max;
    out.min = s[v] < out.min ? s[v] : out.min;
    tail += s[v] * 0.0f;
  }
  // Any NaN makes a sum NaN; an infinity gives NaN too (inf * 0).
  out.finite = tail == 0.0f && lanes_finite;
  if (!out.finite) return out;
  for (v = 0; s[v] != out.max; ++v) {}
  out.at = v;
  return out;
}

// The outputs from `from` on that reach the threshold (a vector collect passes its scalar tail here).
void collect_scalar(const float* s, int64_t n, float threshold, std::vector<int64_t>& out, int64_t from = 0) {
  for (int64_t v = from; v < n; ++v)
    if (s[v] >= threshold) out.push_back(v);
}

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx512f"))) RowScan scan_row_avx512(const float* s, int64_t n) {
  __m512 hi = _mm512_set1_ps(s[0]), lo = hi, check = _mm512_setzero_ps();
  const __m512 zero = _mm512_setzero_ps();
  int64_t v = 0;
  for (; v + 16 <= n; v += 16) {
    const __m512 x = _mm512_loadu_ps(s + v);
    hi = _mm512_max_ps(hi, x);
    lo = _mm512_min_ps(lo, x);
    check = _mm512_add_ps(check, _mm512_mul_ps(x, zero));
  }
  const RowScan lanes{_mm512_reduce_max_ps(hi), _mm512_reduce_min_ps(lo), 0, true};
  return finish_scan(lanes, s, v, n, _mm512_cmp_ps_mask(check, zero, _CMP_EQ_OQ) == 0xFFFF);
}

__attribute__((target("avx512f"))) void collect_avx512(const float* s, int64_t n, float threshold,
                                                        std::vector<int64_t>& out) {
  const __m512 t = _mm512_set1_ps(threshold);
  int64_t v = 0;
  for (; v + 16 <= n; v += 16) {
    __mmask16 hit = _mm512_cmp_ps_mask(_mm512_loadu_ps(s + v), t, _CMP_GE_OQ);
    while (hit) {
      out.push_back(v + __builtin_ctz(hit));
      hit &= hit - 1;
    }
  }
  collect_scalar(s, n, threshold, out, v);
}

// Lanes 0 .. left-1 of 8 set (left may be <= 0 or >= 8).
__attribute__((target("avx2,fma"))) inline __m256i first_lanes(int64_t left) {
  const int32_t l = static_cast<int32_t>(std::min<int64_t>(std::max<int64_t>(left, 0), 8));
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(l), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

__attribute__((target("avx2,fma"))) RowScan scan_row_avx2(const float* s, int64_t n) {
  __m256 hi = _mm256_set1_ps(s[0]), lo = hi, check = _mm256_setzero_ps();
  const __m256 zero = _mm256_setzero_ps();
  int64_t v = 0;
  for (; v + 8 <= n; v += 8) {
    const __m256 x = _mm256_loadu_ps(s + v);
    hi = _mm256_max_ps(hi, x);
    lo = _mm256_min_ps(lo, x);
    check = _mm256_add_ps(check, _mm256_mul_ps(x, zero));
  }
  float his[8], los[8];
  _mm256_storeu_ps(his, hi);
  _mm256_storeu_ps(los, lo);
  RowScan lanes{his[0], los[0], 0, true};
  for (int j = 1; j < 8; ++j) {
    lanes.max = his[j] > lanes.max ? his[j] : lanes.max;
    lanes.min = los[j] < lanes.min ? los[j] : lanes.min;
  }
  return finish_scan(lanes, s, v, n, _mm256_movemask_ps(_mm256_cmp_ps(check, zero, _CMP_EQ_OQ)) == 0xFF);
}

__attribute__((target("avx2,fma"))) void collect_avx2(const float* s, int64_t n, float threshold,
                                                      std::vector<int64_t>& out) {
  const __m256 t = _mm256_set1_ps(threshold);
  int64_t v = 0;
  for (; v + 8 <= n; v += 8) {
    unsigned hit = static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(s + v), t, _CMP_GE_OQ)));
    while (hit) {
      out.push_back(v + __builtin_ctz(hit));
      hit &= hit - 1;
    }
  }
  collect_scalar(s, n, threshold, out, v);
}
#endif

// The row scans' vector code by level (isa: -1 the best this CPU has, else at most that level, as
// panel_isa() counts: 2 AVX-512, 1 AVX2, 0 the scalar code); every level gives the same results.
int vector_level(int64_t isa) {
  return static_cast<int>(isa < 0 ? panel_isa() : std::min<int64_t>(isa, panel_isa()));
}

RowScan scan_row(const float* s, int64_t n, int level) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (level >= 2) return scan_row_avx512(s, n);
  if (level == 1) return scan_row_avx2(s, n);
#endif
  return scan_row_scalar(s, n);
}

void collect(const float* s, int64_t n, float threshold, std::vector<int64_t>& out, int level) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (level >= 2) return collect_avx512(s, n, threshold, out);
  if (level == 1) return collect_avx2(s, n, threshold, out);
#endif
  collect_scalar(s, n, threshold, out);
}

// The arguments screen_argmax and screen_sample share: x (M, K), s (M, N), the float32 panels, err and norm
// (N,), and the optional dense (N, K) weight. Returns M, N, K and whether the dense weight is given.
struct ScreenShape { int64_t m, n, k; bool rows_dense; };
ScreenShape check_screen(const torch::Tensor& x_in, const torch::Tensor& s, const torch::Tensor& err,
                         const torch::Tensor& norm, const torch::Tensor& panels,
                         const c10::optional<torch::Tensor>& dense) {
  TORCH_CHECK(s.dim() == 2 && s.scalar_type() == torch::kFloat && s.is_contiguous() && s.device().is_cpu(),
              "s must be a contiguous float32 CPU (M, N) tensor");
  const int64_t m = s.size(0), n = s.size(1);
  check_panels(panels, torch::kFloat, n);
  const int64_t k = panels.size(1);
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(0) == m && x_in.size(1) == k && x_in.scalar_type() == torch::kFloat &&
                  x_in.is_contiguous() && x_in.device().is_cpu(),
              "x must be a contiguous float32 CPU (", m, ", ", k, ") tensor");
  const bool rows_dense = dense.has_value() && dense->defined();
  if (rows_dense)
    TORCH_CHECK(dense->dim() == 2 && dense->size(0) == n && dense->size(1) == k && dense->is_contiguous() &&
                    dense->scalar_type() == torch::kFloat && dense->device().is_cpu(),
                "dense must be the contiguous float32 (", n, ", ", k, ") weight");
  for (const torch::Tensor* t : {&err, &norm})
    TORCH_CHECK(t->dim() == 1 && t->size(0) == n && t->scalar_type() == torch::kFloat && t->is_contiguous(),
                "err and norm must be contiguous float32 (", n, ")");
  return {m, n, k, rows_dense};
}

// Output v's weights: a dense row (stride 1) or column v % 64 of panel v / 64 (stride 64).
inline std::pair<const float*, int64_t> weight_of(const float* src, bool rows_dense, int64_t v, int64_t k) {
  if (rows_dense) return {src + v * k, 1};
  return {src + (v / kPanel) * k * kPanel + v % kPanel, kPanel};
}

std::tuple<torch::Tensor, int64_t> screen_argmax(const torch::Tensor& x_in, const torch::Tensor& s,
                                                 const torch::Tensor& err, const torch::Tensor& norm,
                                                 double err_max, double norm_max, bool split_inputs,
                                                 int64_t suppress,
                                                 const torch::Tensor& panels,
                                                 const c10::optional<torch::Tensor>& dense,
                                                 int64_t max_candidates, int64_t isa) {
  const ScreenShape shape = check_screen(x_in, s, err, norm, panels, dense);
  const int64_t m = shape.m, n = shape.n, k = shape.k;
  const bool rows_dense = shape.rows_dense;
  const int level = vector_level(isa);
  const float* sp = s.data_ptr<float>();
  const float* ep = err.data_ptr<float>();
  const float* np = norm.data_ptr<float>();
  std::vector<float> a_of(m), b_of(m);
  bound_factors(x_in.data_ptr<float>(), m, k, split_inputs, a_of.data(), b_of.data());
  const float* ap = a_of.data();
  const float* bp = b_of.data();
  constexpr float kInf = std::numeric_limits<float>::infinity();
  auto bound_of = [&](int64_t r, int64_t v) {
    return v == suppress ? kInf : ep[v] * ap[r] + np[v] * bp[r] + kRound * std::fabs(sp[r * n + v]);
  };
  torch::Tensor tokens = torch::empty({0}, torch::kLong);
  int64_t count = 0;
  {
    py::gil_scoped_release release;
    std::vector<std::vector<int64_t>> rows(m);  // each row's candidates, ascending
    std::vector<int64_t> picked;                 // all rows' candidates
    for (int64_t r = 0; r < m; ++r) {
      const float* sr = sp + r * n;
      const RowScan scan = scan_row(sr, n, level);
      if (!scan.finite) return {tokens, 0};
      // floor0 <= floor (suppress: some other output's lower end; with one output, nothing wins anyway).
      float floor = scan.at == suppress ? -kInf : sr[scan.at] - bound_of(r, scan.at);
      const float largest = std::max(std::fabs(scan.max), std::fabs(scan.min));
      const float most = static_cast<float>((err_max * ap[r] + norm_max * bp[r] + kRound * largest) * 1.0001);
      // The scan's threshold, rounded down (in double, then one float step lower) so that no output with
      // s_v >= floor0 - most is left out by the rounding of the subtraction.
      const double below = static_cast<double>(floor) - most - 1e-6 * (std::fabs(floor) + most);
      const float threshold = floor == -kInf ? -kInf : std::nextafter(static_cast<float>(below), -kInf);
      std::vector<int64_t> near;
      collect(sr, n, threshold, near, level);
      for (const int64_t v : near) floor = std::max(floor, sr[v] - bound_of(r, v));
      for (const int64_t v : near)
        if (v != suppress && sr[v] + bound_of(r, v) >= floor) rows[r].push_back(v);
      picked.insert(picked.end(), rows[r].begin(), rows[r].end());
    }
    std::sort(picked.begin(), picked.end());  // the union, ascending
    picked.erase(std::unique(picked.begin(), picked.end()), picked.end());
    count = static_cast<int64_t>(picked.size());
    if (count == 0 || count > max_candidates) return {tokens, count};
    // The candidates' weights as panels of their own (zero-padded): from the dense rows when given (one
    // contiguous row each), else column v % 64 of panel v / 64 (a cache line read per weight).
    const int64_t out_panels = (count + kPanel - 1) / kPanel;
    torch::Tensor own = torch::zeros({out_panels, k, kPanel}, torch::kFloat);
    const float* src = rows_dense ? dense->data_ptr<float>() : panels.data_ptr<float>();
    float* dst = own.data_ptr<float>();
    for (int64_t j = 0; j < count; ++j) {
      const auto [col, stride] = weight_of(src, rows_dense, picked[j], k);
      float* out = dst + (j / kPanel) * k * kPanel + j % kPanel;
      for (int64_t t = 0; t < k; ++t) out[t * kPanel] = col[t * stride];
    }
    const torch::Tensor exact = panel_forward<float>(x_in, own, count, nullptr, c10::nullopt, -1, kPrefetch);
    const float* yp = exact.data_ptr<float>();
    tokens = torch::empty({m}, torch::kLong);
    int64_t* tp = tokens.data_ptr<int64_t>();
    for (int64_t r = 0; r < m; ++r) {
      float best = -kInf;
      int64_t token = rows[r].empty() ? picked[0] : rows[r][0];
      for (const int64_t v : rows[r]) {  // ascending: strict > keeps the first of equal values
        const int64_t j = std::lower_bound(picked.begin(), picked.end(), v) - picked.begin();
        const float y = yp[r * count + j];
        if (y > best) best = y, token = v;
      }
      tp[r] = token;
    }
  }
  return {tokens, count};
}

// ---- gelu_tanh -------------------------------------------------------------------------------------
// GELU in its tanh form (GPT-2's "gelu_new"), 0.5 x (1 + tanh(u)) with u = sqrt(2 / pi) (x + 0.044715 x^3),
// computed as x / (1 + exp(-2u)): the same function (1 + tanh(u) = 2 / (1 + exp(-2u))), without the
// cancellation of 1 + tanh(u) for negative x, exp being exp_scalar's. ATen's vectorized tanh GELU took
// ~70-90 us for 16 rows of 3072 on an Intel Xeon; this ~15. The AVX-512 and AVX2 code and the scalar
// reference do the same operations in the same order: the same bits (tests/test_native.py).
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

// ---- screen_sample ----------------------------------------------------------------------------------
// A draw from softmax(l / T) for each row, where l (M, N) are the float32 outputs of the layer that
// screen_argmax screens, without computing l: rejection sampling from the screen's upper ends. With s the
// int8 outputs and bound as in screen_argmax (|s - l| <= bound), u = s + bound >= l, so
//   w_v = exp((u_v - max u) / T)   (0 for the suppressed output)
// is at least the target weight exp((l_v - max u) / T) of every v. A proposal v is drawn with probability
// w_v / sum w, its exact output l_v computed (one fma chain over k, the layer's bits), and it is accepted with
// probability exp((l_v - max u) / T) / w_v; otherwise the row draws again. An accepted v has probability
// proportional to w_v * exp((l_v - max u) / T) / w_v, i.e. to exp(l_v / T): exactly softmax(l / T), up to
// float rounding as in any softmax. The acceptance rate is sum exp(l / T) / sum exp(u / T) (about 0.9 on
// the demo model at T = 1, lower where bounds are wide against T).
//
// The uniforms come from a splitmix64 stream seeded by seeds[r]: a row's token depends on its own input,
// temperature, suppressed output and seed alone, not on the other rows or the thread count; the AVX-512,
// AVX2 and scalar code compute the same weights and sums bit for bit. Returns (tokens (M,), proposals drawn
// in all); a row's token is -1 when its s holds a non-finite value, no output may be drawn, or max_tries
// proposals were all rejected (the caller then samples it from the full layer).
struct SplitMix64 {
  uint64_t state;
  uint64_t next() {
    uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  double uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }  // [0, 1)
};

constexpr int64_t kSampleBlock = 64;  // weights summed per block; a draw scans blocks, then one block

// The sum of one block's (up to) 64 weights: 16 lanes of 4 adds each in order, then a fixed tree.
inline float block_tree(const float* lane) {
  float h[8];
  for (int j = 0; j < 8; ++j) h[j] = lane[j] + lane[j + 8];
  for (int j = 0; j < 4; ++j) h[j] = h[j] + h[j + 4];
  for (int j = 0; j < 2; ++j) h[j] = h[j] + h[j + 2];
  return h[0] + h[1];
}

// u = s + bound over a row, and its largest value outside `suppress`; false when s is not finite.
bool upper_row_scalar(const float* s, const float* err, const float* norm, float a, float b, int64_t n,
                      int64_t suppress, float* u, float* umax) {
  float check = 0.0f, best = -std::numeric_limits<float>::infinity();
  for (int64_t v = 0; v < n; ++v) {
    u[v] = s[v] + ((err[v] * a + norm[v] * b) + kRound * std::fabs(s[v]));
    check += s[v] * 0.0f;
    if (v != suppress) best = u[v] > best ? u[v] : best;
  }
  *umax = best;
  return check == 0.0f;
}

// w = exp((u - umax) * inv_t) in place (0 at suppress), and the per-block sums.
void weigh_row_scalar(float* w, int64_t n, int64_t suppress, float umax, float inv_t, float* blocks) {
  for (int64_t v = 0; v < n; ++v) w[v] = exp_scalar((w[v] - umax) * inv_t);
  if (suppress >= 0 && suppress < n) w[suppress] = 0.0f;
  for (int64_t b0 = 0; b0 < n; b0 += kSampleBlock) {
    float lane[16];
    for (int j = 0; j < 16; ++j) {
      float acc = b0 + j < n ? w[b0 + j] : 0.0f;
      for (int q = 1; q < 4; ++q) acc = acc + (b0 + 16 * q + j < n ? w[b0 + 16 * q + j] : 0.0f);
      lane[j] = acc;
    }
    blocks[b0 / kSampleBlock] = block_tree(lane);
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx512f"))) bool upper_row_avx512(const float* s, const float* err, const float* norm,
                                                         float a, float b, int64_t n, int64_t suppress, float* u,
                                                         float* umax) {
  const __m512 va = _mm512_set1_ps(a), vb = _mm512_set1_ps(b), round = _mm512_set1_ps(kRound);
  const __m512 zero = _mm512_setzero_ps();
  __m512 best = _mm512_set1_ps(-std::numeric_limits<float>::infinity()), check = zero;
  for (int64_t v = 0; v < n; v += 16) {
    const int64_t left = n - v;
    const __mmask16 mask = left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
    const __m512 sv = _mm512_maskz_loadu_ps(mask, s + v);
    const __m512 bound = _mm512_add_ps(
        _mm512_add_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(mask, err + v), va),
                      _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, norm + v), vb)),
        _mm512_mul_ps(round, _mm512_abs_ps(sv)));
    const __m512 uv = _mm512_add_ps(sv, bound);
    _mm512_mask_storeu_ps(u + v, mask, uv);
    check = _mm512_add_ps(check, _mm512_mul_ps(sv, zero));
    __mmask16 keep = mask;
    if (suppress >= v && suppress < v + 16) keep &= static_cast<__mmask16>(~(1u << (suppress - v)));
    best = _mm512_mask_max_ps(best, keep, best, uv);
  }
  *umax = _mm512_reduce_max_ps(best);
  return _mm512_cmp_ps_mask(check, zero, _CMP_EQ_OQ) == 0xFFFF;
}

__attribute__((target("avx512f"))) void weigh_row_avx512(float* w, int64_t n, int64_t suppress, float umax,
                                                         float inv_t, float* blocks) {
  const __m512 m = _mm512_set1_ps(umax), t = _mm512_set1_ps(inv_t);
  for (int64_t b0 = 0; b0 < n; b0 += kSampleBlock) {
    __m512 acc = _mm512_setzero_ps();
    for (int q = 0; q < 4; ++q) {
      const int64_t v = b0 + 16 * q, left = n - v;
      if (left <= 0) break;
      const __mmask16 mask = left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
      __m512 e = _mm512_maskz_mov_ps(mask, exp_avx512(_mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, w + v), m), t)));
      if (suppress >= v && suppress < v + 16) e = _mm512_mask_mov_ps(e, static_cast<__mmask16>(1u << (suppress - v)), _mm512_setzero_ps());
      _mm512_mask_storeu_ps(w + v, mask, e);
      acc = q == 0 ? e : _mm512_add_ps(acc, e);
    }
    float lane[16];
    _mm512_storeu_ps(lane, acc);
    blocks[b0 / kSampleBlock] = block_tree(lane);
  }
}

// The AVX2 code of upper_row and weigh_row: the same operations on 8 lanes (weigh_row's 16 lanes of a
// block as two vectors), the same bits.
__attribute__((target("avx2,fma"))) bool upper_row_avx2(const float* s, const float* err, const float* norm,
                                                        float a, float b, int64_t n, int64_t suppress, float* u,
                                                        float* umax) {
  const __m256 va = _mm256_set1_ps(a), vb = _mm256_set1_ps(b), round = _mm256_set1_ps(kRound);
  const __m256 zero = _mm256_setzero_ps(), minus_inf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  __m256 best = minus_inf, check = zero;
  for (int64_t v = 0; v < n; v += 8) {
    const __m256i valid = first_lanes(n - v);
    const __m256 sv = _mm256_maskload_ps(s + v, valid);
    const __m256 bound = _mm256_add_ps(
        _mm256_add_ps(_mm256_mul_ps(_mm256_maskload_ps(err + v, valid), va),
                      _mm256_mul_ps(_mm256_maskload_ps(norm + v, valid), vb)),
        _mm256_mul_ps(round, _mm256_andnot_ps(sign, sv)));
    const __m256 uv = _mm256_add_ps(sv, bound);
    _mm256_maskstore_ps(u + v, valid, uv);
    check = _mm256_add_ps(check, _mm256_mul_ps(sv, zero));
    __m256i keep = valid;
    if (suppress >= v && suppress < v + 8)
      keep = _mm256_andnot_si256(_mm256_cmpeq_epi32(lane, _mm256_set1_epi32(static_cast<int32_t>(suppress - v))), keep);
    best = _mm256_max_ps(best, _mm256_blendv_ps(minus_inf, uv, _mm256_castsi256_ps(keep)));
  }
  float lanes[8];
  _mm256_storeu_ps(lanes, best);
  float top = lanes[0];
  for (int j = 1; j < 8; ++j) top = lanes[j] > top ? lanes[j] : top;
  *umax = top;
  return _mm256_movemask_ps(_mm256_cmp_ps(check, zero, _CMP_EQ_OQ)) == 0xFF;
}

__attribute__((target("avx2,fma"))) void weigh_row_avx2(float* w, int64_t n, int64_t suppress, float umax,
                                                        float inv_t, float* blocks) {
  const __m256 m = _mm256_set1_ps(umax), t = _mm256_set1_ps(inv_t);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t b0 = 0; b0 < n; b0 += kSampleBlock) {
    __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int q = 0; q < 8; ++q) {  // q: 16-lane step q / 2, half q % 2
      const int64_t v = b0 + 8 * q, left = n - v;
      if (left <= 0) break;
      const __m256i valid = first_lanes(left);
      __m256 e = _mm256_and_ps(_mm256_castsi256_ps(valid),
                               exp_avx2(_mm256_mul_ps(_mm256_sub_ps(_mm256_maskload_ps(w + v, valid), m), t)));
      if (suppress >= v && suppress < v + 8)
        e = _mm256_andnot_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(lane, _mm256_set1_epi32(static_cast<int32_t>(suppress - v)))), e);
      _mm256_maskstore_ps(w + v, valid, e);
      acc[q % 2] = q < 2 ? e : _mm256_add_ps(acc[q % 2], e);
    }
    float lanes[16];
    _mm256_storeu_ps(lanes, acc[0]);
    _mm256_storeu_ps(lanes + 8, acc[1]);
    blocks[b0 / kSampleBlock] = block_tree(lanes);
  }
}
#endif

std::tuple<torch::Tensor, int64_t> screen_sample(const torch::Tensor& x_in, const torch::Tensor& s,
                                                 const torch::Tensor& err, const torch::Tensor& norm,
                                                 bool split_inputs, const torch::Tensor& suppress,
                                                 const torch::Tensor& panels,
                                                 const c10::optional<torch::Tensor>& dense,
                                                 const torch::Tensor& temperature, const torch::Tensor& seeds,
                                                 int64_t max_tries, int64_t isa) {
  const ScreenShape shape = check_screen(x_in, s, err, norm, panels, dense);
  const int64_t m = shape.m, n = shape.n, k = shape.k;
  const bool rows_dense = shape.rows_dense;
  TORCH_CHECK(temperature.scalar_type() == torch::kDouble && temperature.numel() == m && temperature.is_contiguous(),
              "temperature must be float64 with one value a row");
  TORCH_CHECK(seeds.scalar_type() == torch::kLong && seeds.numel() == m && seeds.is_contiguous(),
              "seeds must be int64 with one value a row");
  TORCH_CHECK(suppress.scalar_type() == torch::kLong && suppress.numel() == m && suppress.is_contiguous(),
              "suppress must be int64 with one value a row (-1: none)");
  const float* xp = x_in.data_ptr<float>();
  const float* sp = s.data_ptr<float>();
  const float* ep = err.data_ptr<float>();
  const float* np = norm.data_ptr<float>();
  const double* tp = temperature.data_ptr<double>();
  const int64_t* seedp = seeds.data_ptr<int64_t>();
  const int64_t* supp = suppress.data_ptr<int64_t>();
  const float* wsrc = rows_dense ? dense->data_ptr<float>() : panels.data_ptr<float>();
  for (int64_t r = 0; r < m; ++r)
    TORCH_CHECK(tp[r] > 0.0 && std::isfinite(tp[r]), "temperature must be a positive finite number");
  torch::Tensor tokens = torch::full({m}, -1, torch::kLong);
  int64_t* out = tokens.data_ptr<int64_t>();
  const int level = vector_level(isa);
  std::atomic<int64_t> drawn{0};
  {
    py::gil_scoped_release release;
    std::vector<float> a_of(m), b_of(m);
    bound_factors(xp, m, k, split_inputs, a_of.data(), b_of.data());
    const int64_t n_blocks = (n + kSampleBlock - 1) / kSampleBlock;
    at::parallel_for(0, m, 1, [&](int64_t r0, int64_t r1) {
      std::vector<float> w(n), blocks(n_blocks);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t sup = supp[r] >= 0 && supp[r] < n ? supp[r] : -1;
        float umax = 0.0f;
        bool finite;
#if defined(__x86_64__) && defined(__GNUC__)
        if (level >= 2)
          finite = upper_row_avx512(sp + r * n, ep, np, a_of[r], b_of[r], n, sup, w.data(), &umax);
        else if (level == 1)
          finite = upper_row_avx2(sp + r * n, ep, np, a_of[r], b_of[r], n, sup, w.data(), &umax);
        else
#endif
          finite = upper_row_scalar(sp + r * n, ep, np, a_of[r], b_of[r], n, sup, w.data(), &umax);
        if (!finite || !std::isfinite(umax)) continue;  // -1: the caller takes the full layer
        const float inv_t = static_cast<float>(1.0 / tp[r]);
#if defined(__x86_64__) && defined(__GNUC__)
        if (level >= 2)
          weigh_row_avx512(w.data(), n, sup, umax, inv_t, blocks.data());
        else if (level == 1)
          weigh_row_avx2(w.data(), n, sup, umax, inv_t, blocks.data());
        else
#endif
          weigh_row_scalar(w.data(), n, sup, umax, inv_t, blocks.data());
        double total = 0.0;
        for (int64_t b = 0; b < n_blocks; ++b) total += blocks[b];
        if (!(total > 0.0)) continue;
        SplitMix64 rng{static_cast<uint64_t>(seedp[r])};
        const float* xr = xp + r * k;
        int64_t tries = 0;
        while (tries < max_tries) {
          ++tries;
          // The proposal: the block where the running sum passes u1 * total, then the output within it.
          const double target = rng.uniform() * total;
          double below = 0.0;
          int64_t b = 0;
          while (b + 1 < n_blocks && below + blocks[b] <= target) below += blocks[b++];
          while (b > 0 && blocks[b] == 0.0f) --b;  // rounding carried the target past the last weight
          const int64_t v0 = b * kSampleBlock, v1 = std::min(n, v0 + kSampleBlock);
          double run = below;
          int64_t v = -1;
          for (int64_t j = v0; j < v1; ++j) {
            if (w[j] == 0.0f) continue;
            v = j;
            run += w[j];
            if (run > target) break;
          }
          if (v < 0) break;  // unreachable: the block's sum is positive
          // The layer's float32 output for v: one fma chain over k in order, as the panel kernel computes it.
          const auto [col, stride] = weight_of(wsrc, rows_dense, v, k);
          float l = 0.0f;
          for (int64_t t = 0; t < k; ++t) l = std::fma(xr[t], col[t * stride], l);
          const double accept = std::exp((static_cast<double>(l) - umax) * static_cast<double>(inv_t)) / w[v];
          if (rng.uniform() < accept) {
            out[r] = v;
            break;
          }
        }
        drawn += tries;
      }
    });
  }
  return {tokens, drawn.load()};
}

// ---- decode_blocks --------------------------------------------------------------------------------------
// The transformer blocks of one decode step (one new token a row, evaluation, no mask) in one call: the
// same ATen ops and the same layer kernels, in the same order, as gptforge.model.gpt.Block.forward, so the
// same bits; what goes away is ~25 torch calls a block from Python (~3 ms a GPT-2 124M step here).
struct DecodeBlock {
  torch::Tensor ln1_w, ln2_w;
  c10::optional<torch::Tensor> ln1_b, ln2_b, qkv_b, proj_b, fc_b, out_b;
  double ln1_eps, ln2_eps;
  const LinearKernel *qkv, *proj, *fc, *out;
  std::string gelu;  // "tanh" or "none" (ATen's), or "native" (gelu_tanh above)
};

c10::optional<torch::Tensor> optional_tensor(const py::handle& h) {
  if (h.is_none()) return c10::nullopt;
  return h.cast<torch::Tensor>();
}

// x (B, 1, C); plan: one 15-tuple a block (gptforge/model/gpt.py, GPT._decode_plan); cache_k, cache_v:
// (n_layer, B, H, max_length, D) or a view of one; length: positions already cached; starts: each row's
// first position (empty: all 0).
torch::Tensor decode_blocks(torch::Tensor x, const py::list& plan, int64_t n_head, const torch::Tensor& cache_k,
                            const torch::Tensor& cache_v, int64_t length, const std::vector<int64_t>& starts) {
  std::vector<DecodeBlock> blocks;
  blocks.reserve(plan.size());
  for (const py::handle& item : plan) {
    const py::tuple t = item.cast<py::tuple>();
    TORCH_CHECK(t.size() == 15, "a decode plan entry has 15 fields");
    DecodeBlock b;
    b.ln1_w = t[0].cast<torch::Tensor>();
    b.ln1_b = optional_tensor(t[1]);
    b.ln1_eps = t[2].cast<double>();
    b.qkv = t[3].cast<const LinearKernel*>();
    b.qkv_b = optional_tensor(t[4]);
    b.proj = t[5].cast<const LinearKernel*>();
    b.proj_b = optional_tensor(t[6]);
    b.ln2_w = t[7].cast<torch::Tensor>();
    b.ln2_b = optional_tensor(t[8]);
    b.ln2_eps = t[9].cast<double>();
    b.fc = t[10].cast<const LinearKernel*>();
    b.fc_b = optional_tensor(t[11]);
    b.out = t[12].cast<const LinearKernel*>();
    b.out_b = optional_tensor(t[13]);
    b.gelu = t[14].cast<std::string>();
    blocks.push_back(std::move(b));
  }
  TORCH_CHECK(x.dim() == 3 && x.size(1) == 1, "decode_blocks takes (B, 1, C)");
  TORCH_CHECK(n_head >= 1 && x.size(2) % n_head == 0, "n_head must divide the width");
  TORCH_CHECK(cache_k.dim() == 5 && cache_v.dim() == 5 && cache_k.size(0) >= static_cast<int64_t>(blocks.size()) &&
                  length >= 0 && length + 1 <= cache_k.size(3), "the KV cache has no room for this step");
  const bool bf16_cache = is_bf16_cache(cache_k);
  TORCH_CHECK(cache_v.scalar_type() == cache_k.scalar_type(), "the cached keys and values must have one dtype");
  for (const torch::Tensor* t : {&cache_k, &cache_v})
    TORCH_CHECK(t->device().is_cpu() && t->stride(4) == 1 &&
                    t->stride(3) == x.size(2) / n_head && t->size(1) == x.size(0) && t->size(2) == n_head &&
                    t->size(4) == x.size(2) / n_head,
                "the KV cache must be (n_layer, B, H, max_length, D) on the CPU, each (row, head) one "
                "contiguous block");
  TORCH_CHECK(starts.empty() || static_cast<int64_t>(starts.size()) == x.size(0), "expected ", x.size(0), " starts");
  for (int64_t s : starts) TORCH_CHECK(s >= 0 && s <= length, "a start outside the ", length + 1, " keys");
  py::gil_scoped_release release;
  const int64_t B = x.size(0), C = x.size(2), D = C / n_head;
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  for (size_t layer = 0; layer < blocks.size(); ++layer) {
    const DecodeBlock& b = blocks[layer];
    // x = x + attn(ln_1(x))
    torch::Tensor h = at::layer_norm(x, {C}, b.ln1_w, b.ln1_b, b.ln1_eps);
    const torch::Tensor qkv = b.qkv->forward(h, b.qkv_b).contiguous();
    TORCH_CHECK(qkv.scalar_type() == torch::kFloat && qkv.size(0) == B && qkv.size(2) == 3 * C,
                "the qkv projection must give float32 (B, 1, 3C)");
    const int64_t l = static_cast<int64_t>(layer);
    const torch::Tensor y = bf16_cache ? attend_step<bf16>(qkv, cache_k, cache_v, l, n_head, length, starts, scale)
                                       : attend_step<float>(qkv, cache_k, cache_v, l, n_head, length, starts, scale);
    x = x + b.proj->forward(y, b.proj_b);
    // x = x + mlp(ln_2(x))
    h = at::layer_norm(x, {C}, b.ln2_w, b.ln2_b, b.ln2_eps);
    torch::Tensor f = b.fc->forward(h, b.fc_b);
    if (b.gelu == "native") {
      f = f.contiguous();
      TORCH_CHECK(f.scalar_type() == torch::kFloat, "the fc projection must give float32");
      gelu_tanh_into(f.data_ptr<float>(), f.data_ptr<float>(), f.numel(), -1);  // a fresh tensor: in place
    } else {
      f = at::gelu(f, b.gelu);
    }
    x = x + b.out->forward(f, b.out_b);
  }
  return x;
}

}  // namespace

// The calls release the GIL, as torch's own ops do: the server's HTTP thread runs while a layer computes.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("ABI") = 9;  // bumped when a signature below changes
  m.attr("PANEL") = kPanel;
  m.attr("AMX_STRIP") = kAmxOut;
  m.attr("AMX_DEPTH") = kAmxDepth;
  py::class_<LinearKernel>(m, "LinearKernel");
  py::class_<Int8Linear, LinearKernel>(m, "Int8Linear")
      .def(py::init<const torch::jit::Object&, int64_t>())
      .def("__call__", &Int8Linear::forward, py::arg("x"), py::arg("bias"),
           py::call_guard<py::gil_scoped_release>());
  py::class_<PackedLinear, LinearKernel>(m, "PackedLinear")
      .def(py::init<torch::Tensor>())
      .def("__call__", &PackedLinear::forward, py::arg("x"), py::arg("bias"),
           py::call_guard<py::gil_scoped_release>());
  py::class_<PanelLinear, LinearKernel>(m, "PanelLinear")
      .def(py::init<torch::Tensor, int64_t>())
      .def("__call__", &PanelLinear::forward, py::arg("x"), py::arg("bias"),
           py::call_guard<py::gil_scoped_release>());
  py::class_<PanelInt8Linear, LinearKernel>(m, "PanelInt8Linear")
      .def(py::init<torch::Tensor, torch::Tensor, int64_t>())
      .def("__call__", &PanelInt8Linear::forward, py::arg("x"), py::arg("bias"),
           py::call_guard<py::gil_scoped_release>());
  m.def("panel_linear", &panel_linear, py::arg("x"), py::arg("packed"), py::arg("out_features"),
        py::arg("bias"), py::arg("isa") = -1, py::arg("prefetch") = kPrefetch,
        py::call_guard<py::gil_scoped_release>());
  m.def("panel_int8_linear", &panel_int8_linear, py::arg("x"), py::arg("packed"), py::arg("scales"),
        py::arg("out_features"), py::arg("bias"), py::arg("isa") = -1, py::arg("prefetch") = kPrefetchInt8,
        py::call_guard<py::gil_scoped_release>());
  m.def("panel_isa", &panel_isa);
  py::class_<AmxInt8Linear, LinearKernel>(m, "AmxInt8Linear")
      .def(py::init<torch::Tensor, torch::Tensor, int64_t, int64_t>())
      .def("__call__", &AmxInt8Linear::forward, py::arg("x"), py::arg("bias"),
           py::call_guard<py::gil_scoped_release>());
  m.def("amx_int8_linear", &amx_int8_linear, py::arg("x"), py::arg("packed"), py::arg("scales"),
        py::arg("out_features"), py::arg("in_features"), py::arg("bias"), py::arg("isa") = -1,
        py::arg("prefetch") = kAmxPrefetch, py::call_guard<py::gil_scoped_release>());
  m.def("amx_isa", &amx_isa);
  m.def("gelu_isa", &gelu_isa);
  m.def("exp_values", &exp_values, py::arg("x"), py::arg("isa") = -1);
  m.def("gelu_tanh", &gelu_tanh, py::arg("x"), py::arg("isa") = -1, py::call_guard<py::gil_scoped_release>());
  m.def("screen_argmax", &screen_argmax, py::arg("x"), py::arg("s"), py::arg("err"), py::arg("norm"),
        py::arg("err_max"), py::arg("norm_max"), py::arg("split_inputs"), py::arg("suppress"),
        py::arg("panels"), py::arg("dense"), py::arg("max_candidates"), py::arg("isa") = -1);
  m.def("screen_sample", &screen_sample, py::arg("x"), py::arg("s"), py::arg("err"), py::arg("norm"),
        py::arg("split_inputs"), py::arg("suppress"), py::arg("panels"), py::arg("dense"), py::arg("temperature"),
        py::arg("seeds"), py::arg("max_tries"), py::arg("isa") = -1);
  // decode_blocks releases the GIL itself, once it has read the plan.
  m.def("decode_blocks", &decode_blocks, py::arg("x"), py::arg("plan"), py::arg("n_head"), py::arg("cache_k"),
        py::arg("cache_v"), py::arg("length"), py::arg("starts"));
  m.def("decode_attention", &decode_attention, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("starts"),
        py::arg("scale"), py::call_guard<py::gil_scoped_release>());
}
