// The argmax screen of a panel-packed LM head: greedy tokens from an int8 copy plus the few candidates'
// exact outputs, and draws by rejection sampling from its bounds.
#include "kernels.h"
#include "exp.h"

namespace gptforge {
namespace {

// ---- screen_argmax ----------------------------------------------------------------------------------
// Everything of gptforge.backends.cpu.ArgmaxScreen after the int8 product, in one call. s (M, N): the
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

}  // namespace

void bind_screen(py::module& m) {
  m.def("screen_argmax", &screen_argmax, py::arg("x"), py::arg("s"), py::arg("err"), py::arg("norm"),
        py::arg("err_max"), py::arg("norm_max"), py::arg("split_inputs"), py::arg("suppress"),
        py::arg("panels"), py::arg("dense"), py::arg("max_candidates"), py::arg("isa") = -1);
  m.def("screen_sample", &screen_sample, py::arg("x"), py::arg("s"), py::arg("err"), py::arg("norm"),
        py::arg("split_inputs"), py::arg("suppress"), py::arg("panels"), py::arg("dense"), py::arg("temperature"),
        py::arg("seeds"), py::arg("max_tries"), py::arg("isa") = -1);
}
}  // namespace gptforge
