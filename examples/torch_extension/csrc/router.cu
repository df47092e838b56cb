// moxe_torch: the fused entropy-aware gate, forward and backward (include/moxe/router/gate.cuh).
#include "common.cuh"
#include "moxe/router/gate.cuh"

namespace moxe_torch {

namespace {

/// logits [T, E] with unit stride along E (a column slice of a wider GEMM output is fine)
/// and difficulty_logit [T] with any positive stride (e.g. column E of that output).
struct GateInputs {
  int64_t tokens, experts;
  int64_t logits_stride, difficulty_stride;
};

GateInputs check_gate_inputs(const at::Tensor& logits, const OptTensor& difficulty_logit, int64_t mlstm_experts,
                             int64_t modulation) {
  TORCH_CHECK(logits.dim() == 2, "logits must be [T, E], got ", logits.sizes());
  TORCH_CHECK(logits.is_cuda(), "logits must be a CUDA tensor");
  const GateInputs g{logits.size(0), logits.size(1), logits.size(0) > 1 ? logits.stride(0) : 0,
                     difficulty_logit.has_value() && logits.size(0) > 1 ? difficulty_logit->stride(0) : 0};
  TORCH_CHECK(g.experts == 1 || logits.stride(1) == 1, "logits must have unit stride along experts");
  TORCH_CHECK(g.tokens == 1 || g.logits_stride >= g.experts, "logits rows must not overlap (row stride ",
              g.logits_stride, " < ", g.experts, ")");
  TORCH_CHECK(g.experts <= INT32_MAX, "too many experts");
  if (difficulty_logit.has_value()) {
    const at::Tensor& a = *difficulty_logit;
    TORCH_CHECK(a.is_cuda() && a.device() == logits.device(), "difficulty_logit must be on ", logits.device());
    TORCH_CHECK(a.scalar_type() == logits.scalar_type(), "difficulty_logit must be ", logits.scalar_type(),
                ", got ", a.scalar_type());
    check_shape(a, "difficulty_logit", {g.tokens});
    TORCH_CHECK(g.tokens == 1 || g.difficulty_stride >= 1, "difficulty_logit must have a positive stride");
  }
  TORCH_CHECK(mlstm_experts >= 0 && mlstm_experts <= g.experts, "mlstm_experts must be in [0, ", g.experts,
              "], got ", mlstm_experts);
  TORCH_CHECK(modulation >= 0 && modulation <= 3,
              "modulation must be 0 (none), 1 (standard), 2 (proportional) or 3 (masked), got ", modulation);
  return g;
}

template <class T>
moxe::router::GateForwardParams<T, float> gate_params(const GateInputs& g, const at::Tensor& logits,
                                                      const OptTensor& difficulty_logit, int64_t mlstm_experts,
                                                      int64_t top_k, int64_t modulation, double gamma, double tau) {
  moxe::router::GateForwardParams<T, float> p{};
  p.dims = moxe::router::GateDims{g.tokens, static_cast<int>(g.experts), static_cast<int>(mlstm_experts),
                                  static_cast<int>(top_k)};
  p.logits = ptr<const T>(logits);
  p.difficulty_logit = ptr<const T>(difficulty_logit);
  p.modulation = static_cast<moxe::router::Modulation>(modulation);
  p.gamma = static_cast<float>(gamma);
  p.tau = static_cast<float>(tau);
  p.logits_stride = g.logits_stride;
  p.difficulty_stride = g.difficulty_stride;
  return p;
}

}  // namespace

std::vector<at::Tensor> gate_forward(const at::Tensor& logits, const OptTensor& difficulty_logit,
                                     int64_t mlstm_experts, int64_t top_k, int64_t modulation, double gamma,
                                     double tau) {
  const GateInputs g = check_gate_inputs(logits, difficulty_logit, mlstm_experts, modulation);
  TORCH_CHECK(top_k >= 1 && top_k <= g.experts, "top_k must be in [1, ", g.experts, "], got ", top_k);
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto f32 = logits.options().dtype(at::kFloat);
  const auto i32 = logits.options().dtype(at::kInt);
  at::Tensor probs = at::empty({g.tokens, g.experts}, f32);
  at::Tensor lse = at::empty({g.tokens}, f32), entropy = at::empty({g.tokens}, f32);
  // without the difficulty head d = 0: zeros rather than relying on the launcher to write them
  at::Tensor difficulty = difficulty_logit.has_value() ? at::empty({g.tokens}, f32) : at::zeros({g.tokens}, f32);
  at::Tensor topk_idx = at::empty({g.tokens, top_k}, i32);
  at::Tensor topk_prob = at::empty({g.tokens, top_k}, f32), topk_weight = at::empty({g.tokens, top_k}, f32);
  at::Tensor expert_counts = at::empty({g.experts}, i32);
  at::Tensor losses = at::empty({4}, f32);
  dispatch_element(logits.scalar_type(), "gate_forward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    auto p = gate_params<T>(g, logits, difficulty_logit, mlstm_experts, top_k, modulation, gamma, tau);
    p.probs = ptr<float>(probs);
    p.lse = ptr<float>(lse);
    p.entropy = ptr<float>(entropy);
    p.difficulty = difficulty_logit.has_value() ? ptr<float>(difficulty) : nullptr;
    p.topk_idx = ptr<int32_t>(topk_idx);
    p.topk_prob = ptr<float>(topk_prob);
    p.topk_weight = ptr<float>(topk_weight);
    p.expert_counts = ptr<int32_t>(expert_counts);
    p.losses = ptr<float>(losses);
    const Workspace ws = make_workspace(moxe::router::gate_forward_workspace_size(p), logits);
    check_status(moxe::router::gate_forward(p, ws.ptr(), ws.bytes(), current_stream()), "router::gate_forward");
  });
  return {probs, lse, entropy, difficulty, topk_idx, topk_prob, topk_weight, expert_counts, losses};
}

std::vector<at::Tensor> gate_backward(const at::Tensor& logits, const OptTensor& difficulty_logit,
                                      const at::Tensor& topk_idx, const at::Tensor& topk_prob,
                                      const OptTensor& dweight, double c_z, double c_lb, double c_d, double c_g,
                                      const OptTensor& dlosses, int64_t mlstm_experts, int64_t modulation,
                                      double gamma, double tau) {
  const GateInputs g = check_gate_inputs(logits, difficulty_logit, mlstm_experts, modulation);
  TORCH_CHECK(topk_idx.dim() == 2, "topk_idx must be [T, K], got ", topk_idx.sizes());
  const int64_t top_k = topk_idx.size(1);
  check_tensor(topk_idx, "topk_idx", at::kInt, logits, {g.tokens, top_k});
  check_tensor(topk_prob, "topk_prob", at::kFloat, logits, {g.tokens, top_k});
  check_optional(dweight, "dweight", at::kFloat, logits, {g.tokens, top_k});
  check_optional(dlosses, "dlosses", at::kFloat, logits, {4});
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor dlogits = at::empty({g.tokens, g.experts}, logits.options());
  at::Tensor ddifficulty = empty_if(difficulty_logit.has_value(), {g.tokens}, logits.options());
  dispatch_element(logits.scalar_type(), "gate_backward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    moxe::router::GateBackwardParams<T, float> b{};
    b.fwd = gate_params<T>(g, logits, difficulty_logit, mlstm_experts, top_k, modulation, gamma, tau);
    b.fwd.topk_idx = ptr<int32_t>(topk_idx);
    b.fwd.topk_prob = ptr<float>(topk_prob);
    b.dweight = ptr<const float>(dweight);
    b.c_z = static_cast<float>(c_z);
    b.c_lb = static_cast<float>(c_lb);
    b.c_d = static_cast<float>(c_d);
    b.c_g = static_cast<float>(c_g);
    b.loss_grad = ptr<const float>(dlosses);  // read on the device: no host sync
    b.dlogits = ptr<T>(dlogits);
    b.ddifficulty_logit = difficulty_logit.has_value() ? ptr<T>(ddifficulty) : nullptr;
    const Workspace ws = make_workspace(moxe::router::gate_backward_workspace_size(b), logits);
    check_status(moxe::router::gate_backward(b, ws.ptr(), ws.bytes(), current_stream()), "router::gate_backward");
  });
  return {dlogits, ddifficulty};
}

}  // namespace moxe_torch
