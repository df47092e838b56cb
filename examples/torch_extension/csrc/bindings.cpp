// moxe_torch._C: the Python module. The operators live in one .cu file per family (ops.h);
// this file only names them. Autograd wiring is in moxe_torch/__init__.py.
#include <torch/extension.h>

#include "ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  using namespace moxe_torch;
  m.doc() = "moxe: MoxE-layer CUDA kernels (mLSTM, sLSTM, entropy-aware gate, dispatch) for PyTorch";

  m.def("mlstm_chunkwise_forward", &mlstm_chunkwise_forward, py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("igate"), py::arg("fgate"), py::arg("c_init"), py::arg("n_init"), py::arg("m_init"),
        py::arg("segment_offsets"), py::arg("qk_scale"), py::arg("eps"), py::arg("chunk_size"),
        py::arg("return_last_states"), py::arg("batch_per_pass") = 0, py::arg("keep_tape") = false);
  m.def("mlstm_chunkwise_backward", &mlstm_chunkwise_backward, py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("igate"), py::arg("fgate"), py::arg("c_init"), py::arg("n_init"), py::arg("m_init"),
        py::arg("segment_offsets"), py::arg("dh"), py::arg("dc_last"), py::arg("dn_last"), py::arg("dm_last"),
        py::arg("qk_scale"), py::arg("eps"), py::arg("chunk_size"), py::arg("init_grads"),
        py::arg("batch_per_pass") = 0, py::arg("tape") = py::none());

  m.def("slstm_sequence_forward", &slstm_sequence_forward, py::arg("wx"), py::arg("r"), py::arg("bias"),
        py::arg("y_init"), py::arg("c_init"), py::arg("n_init"), py::arg("m_init"), py::arg("return_last_states"),
        py::arg("units_per_block"));
  m.def("slstm_sequence_backward", &slstm_sequence_backward, py::arg("wx"), py::arg("r"), py::arg("bias"),
        py::arg("y_init"), py::arg("c_init"), py::arg("n_init"), py::arg("m_init"), py::arg("dy"),
        py::arg("dy_last"), py::arg("dc_last"), py::arg("dn_last"), py::arg("dm_last"), py::arg("init_grads"),
        py::arg("units_per_block"));

  m.def("gate_forward", &gate_forward, py::arg("logits"), py::arg("difficulty_logit"), py::arg("mlstm_experts"),
        py::arg("top_k"), py::arg("modulation"), py::arg("gamma"), py::arg("tau"));
  m.def("gate_backward", &gate_backward, py::arg("logits"), py::arg("difficulty_logit"), py::arg("topk_idx"),
        py::arg("topk_prob"), py::arg("dweight"), py::arg("c_z"), py::arg("c_lb"), py::arg("c_d"), py::arg("c_g"),
        py::arg("dlosses"), py::arg("mlstm_experts"), py::arg("modulation"), py::arg("gamma"), py::arg("tau"));

  m.def("routing_map", &routing_map, py::arg("topk_idx"), py::arg("experts"), py::arg("capacity"),
        py::arg("align"));
  m.def("permute", &permute, py::arg("x"), py::arg("row_map"), py::arg("expert_offsets"), py::arg("experts"),
        py::arg("align"));
  m.def("permute_backward", &permute_backward, py::arg("dxp"), py::arg("row_map"), py::arg("experts"),
        py::arg("align"));
  m.def("unpermute", &unpermute, py::arg("yp"), py::arg("row_map"), py::arg("weight"), py::arg("experts"),
        py::arg("align"));
  m.def("unpermute_backward", &unpermute_backward, py::arg("yp"), py::arg("row_map"), py::arg("weight"),
        py::arg("dy"), py::arg("expert_offsets"), py::arg("experts"), py::arg("align"));
}
