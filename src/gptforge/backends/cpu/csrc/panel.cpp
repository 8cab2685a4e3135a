// The panel kernel: float32 and int8 weights in panels of 64 outputs, batch-invariant by construction.
#include "kernels.h"

namespace gptforge {
namespace {

// ---- PanelLinear, PanelInt8Linear ------------------------------------------------------------------
// The same panel layout and tiles for float32 weights and for int8 weights with one float32 scale per
// output (weight-only int8: activations stay float32). An int8 weight is widened to float32 in registers
// (exact), so every output is acc = fma chain of x[k] * w[k] over k in order; then, for int8, acc * scale;
// then + bias: two separate roundings in every code path.
constexpr int64_t kTileRows = 6;  // rows per register tile
constexpr int64_t kWideTileRows = 12;  // rows per tile on AVX-512 (see tile_avx512)

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

}  // namespace

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

namespace {

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

}  // namespace

template torch::Tensor panel_forward<float>(const torch::Tensor&, const torch::Tensor&, int64_t, const float*,
                                            const c10::optional<torch::Tensor>&, int64_t, int64_t);

void bind_panel(py::module& m) {
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
}
}  // namespace gptforge
