// gptforge's native CPU kernels: what every source file of the extension shares.
//
// gptforge's native CPU kernels: the per-layer glue of the decode step, moved out of Python.
//
// Built on first use by gptforge/backends/cpu/build.py with torch.utils.cpp_extension (a C++ compiler and
// ninja are needed; without them gptforge uses the equivalent Python code). At decode sizes a layer's
// matrix product is short, and what surrounds it from Python costs as much again: each torch op called
// from Python pays 5-10 us of argument parsing and dispatch on this class of CPU, and the int8 layer
// needs ~14 of them. Here each layer is one call.
//
// Int8Linear:   the fbgemm weight-only int8 product of backends/quant.py (_fbgemm_linear), the same
//               arithmetic in the same order: per-row step = max|x| / 63, t = x / step, q1 = round(t),
//               q2 = round((t - q1) * 126), rows [q1; q2; pin] through fbgemm's dynamic linear,
//               y = (out1 + out2 / 126) * step + bias. Built with -ffp-contract=off, so the compiler
//               fuses no multiply-adds; the one std::fma is where torch's add(alpha=) fuses too.
// PanelLinear:  gptforge's own float32 product for the prepacked layers (backends/cpu/linear.py), made
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
// PanelInt8Linear: the same kernel on int8 panels with one float32 scale per output (backends/quant.py,
//               kernel "panel"): weights widened to float32 in registers (exact), activations not rounded.
// AmxInt8Linear: int8 weights times int8 activations on Intel AMX tiles (backends/quant.py, kernel "amx"):
//               each activation row split into two int8 parts on a per-row grid (~16 bits), exact int32
//               sums, one float epilogue; batch-invariant by construction (see its section below).
// PackedLinear: oneDNN's prepacked inner product (mkldnn::_linear_pointwise), called through the C++
//               dispatcher instead of Python's torch.ops; used where PanelLinear has no vector code.
//
// The sources, by concern: glue.cpp (fbgemm and oneDNN layers), panel.cpp (the panel matmul), amx.cpp
// (AMX int8), attention.cpp (decode attention), exp.h + gelu.cpp (the vector exp, GELU), screen.cpp (the
// argmax screen and its rejection sampling), decode.cpp (the fused decode step), bindings.cpp (the Python
// module). Each file keeps its helpers to itself (an anonymous namespace); what another file calls is
// declared here.
#pragma once

// torch's tensor API and its pybind11 casters, not <torch/extension.h>: that one also brings the whole C++
// frontend (modules, optimizers), which nothing here uses and which every source file would parse again.
#include <torch/types.h>
#include <torch/csrc/utils/pybind.h>
#include <pybind11/stl.h>
#include <ATen/Parallel.h>

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

namespace gptforge {

// Round half to even for |v| < 2^22 in the default rounding mode, like torch.round; unlike
// std::nearbyint it vectorizes without SSE4.1.
inline float round_even(float v) {
  constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23: the sum's last bit is the units place
  return (v + kMagic) - kMagic;          // not folded away: no -ffast-math
}

// What every layer kernel below is, so that decode_blocks can run a block's layers without Python.
class LinearKernel {
 public:
  virtual ~LinearKernel() = default;
  virtual torch::Tensor forward(const torch::Tensor& x, const c10::optional<torch::Tensor>& bias) const = 0;
};

// Panel layout (panel.cpp): outputs per panel, k-rows of weights prefetched ahead.
constexpr int64_t kPanel = 64;    // outputs per panel
constexpr int64_t kPrefetch = 32; // k-rows of weights prefetched ahead (float32: 8 KB)
constexpr int64_t kPrefetchInt8 = 2 * kPrefetch;  // int8 rows are a quarter as long: 4 KB ahead
// AMX layout (amx.cpp).
constexpr int64_t kAmxOut = 16;    // outputs per strip (a B tile's columns)
constexpr int64_t kAmxDepth = 64;  // k per tile step (an A tile row's bytes)
constexpr int64_t kAmxPrefetch = 4;  // weight tiles (1 KB each) prefetched ahead

// panel.cpp
int64_t panel_isa();
void check_panels(const torch::Tensor& packed, c10::ScalarType dtype, int64_t n);
void check_scales(const torch::Tensor& scales, int64_t outputs);
const float* per_output(const c10::optional<torch::Tensor>& t, int64_t n, const char* what, torch::Tensor& keep);
template <typename W>
torch::Tensor panel_forward(const torch::Tensor& x_in, const torch::Tensor& packed, int64_t n,
                            const float* scale, const c10::optional<torch::Tensor>& bias, int64_t isa,
                            int64_t prefetch);
extern template torch::Tensor panel_forward<float>(const torch::Tensor&, const torch::Tensor&, int64_t, const float*,
                                                   const c10::optional<torch::Tensor>&, int64_t, int64_t);

// attention.cpp
using bf16 = uint16_t;  // a bfloat16 KV cache's values: the upper half of a float32
bool is_bf16_cache(const torch::Tensor& t);
template <typename T>
torch::Tensor attend_step(const torch::Tensor& qkv, const torch::Tensor& cache_k, const torch::Tensor& cache_v,
                          int64_t layer, int64_t n_head, int64_t length, const std::vector<int64_t>& starts,
                          double scale);
extern template torch::Tensor attend_step<float>(const torch::Tensor&, const torch::Tensor&, const torch::Tensor&,
                                                 int64_t, int64_t, int64_t, const std::vector<int64_t>&, double);
extern template torch::Tensor attend_step<bf16>(const torch::Tensor&, const torch::Tensor&, const torch::Tensor&,
                                                int64_t, int64_t, int64_t, const std::vector<int64_t>&, double);

// gelu.cpp
void gelu_tanh_into(const float* x, float* y, int64_t count, int64_t isa);

// Each file's part of the Python module (bindings.cpp calls them).
void bind_glue(py::module& m);
void bind_panel(py::module& m);
void bind_amx(py::module& m);
void bind_attention(py::module& m);
void bind_gelu(py::module& m);
void bind_screen(py::module& m);
void bind_decode(py::module& m);

}  // namespace gptforge
