// The fbgemm int8 layer and the oneDNN float32 layer, each one C++ call (gptforge.backends.quant,
// gptforge.backends.cpu.linear).
#include "kernels.h"
#include <ATen/native/quantized/PackedParams.h>
#include <torch/csrc/jit/api/object.h>

namespace gptforge {
namespace {

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

class Int8Linear : public LinearKernel {
 public:
  Int8Linear(const torch::jit::Object& packed, int64_t in_features)
      : packed_(c10::IValue(packed._ivalue()).toCustomClass<LinearPackedParamsBase>()), k_(in_features) {
    TORCH_CHECK(in_features >= 2, "in_features must be at least 2");
  }

  // Any (..., K) input, as rows: what gptforge.backends.quant.Int8Linear.forward does around this call.
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

}  // namespace

void bind_glue(py::module& m) {
  py::class_<Int8Linear, LinearKernel>(m, "Int8Linear")
      .def(py::init<const torch::jit::Object&, int64_t>())
      .def("__call__", &Int8Linear::forward, py::arg("x"), py::arg("bias"),
           py::call_guard<py::gil_scoped_release>());
  py::class_<PackedLinear, LinearKernel>(m, "PackedLinear")
      .def(py::init<torch::Tensor>())
      .def("__call__", &PackedLinear::forward, py::arg("x"), py::arg("bias"),
           py::call_guard<py::gil_scoped_release>());
}
}  // namespace gptforge
