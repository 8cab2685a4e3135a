// The fused decode step: every block of one decode step in one call.
#include "kernels.h"

namespace gptforge {
namespace {

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

// x (B, 1, C); plan: one 15-tuple a block (gptforge.backends.cpu.layers, FusedDecodeBlocks); cache_k, cache_v:
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

void bind_decode(py::module& m) {
  // decode_blocks releases the GIL itself, once it has read the plan.
  m.def("decode_blocks", &decode_blocks, py::arg("x"), py::arg("plan"), py::arg("n_head"), py::arg("cache_k"),
        py::arg("cache_v"), py::arg("length"), py::arg("starts"));
}
}  // namespace gptforge
