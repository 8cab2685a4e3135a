// The Python module: the ABI, the layout constants, and each source file's ops and layer kernels.
#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace gptforge;
  m.attr("ABI") = 9;  // bumped when a signature below changes
  m.attr("PANEL") = kPanel;
  m.attr("AMX_STRIP") = kAmxOut;
  m.attr("AMX_DEPTH") = kAmxDepth;
  py::class_<LinearKernel>(m, "LinearKernel");
  bind_glue(m);
  bind_panel(m);
  bind_amx(m);
  bind_attention(m);
  bind_gelu(m);
  bind_screen(m);
  bind_decode(m);
}
