// moxe::router: shapes and parameter structs of the entropy-aware router (docs/router.md).
//
// Layouts (row-major): logits [T, E] (row stride logits_stride, 0: E), difficulty_logit
// [T] (stride difficulty_stride, 0: 1), probs [T, E], lse/entropy/difficulty [T],
// topk_idx/topk_prob/topk_weight [T, K], expert_counts [E], losses [4] = L_z, L_lb, L_d, L_g.
#pragma once

#include <cstdint>

#include "moxe/core/config.hpp"
#include "moxe/core/status.hpp"

namespace moxe::router {

/// How the difficulty d = sigmoid(a) shifts the logits of the two expert groups.
enum class Modulation { none, standard, proportional, masked };

/// Device limits of the launchers (the references take any size).
inline constexpr int kMaxExperts = 1024;
inline constexpr int kMaxTopK = 32;

struct GateDims {
  int64_t tokens;
  int experts, mlstm_experts, top_k;
};

template <class T, class Acc = float>
struct GateForwardParams {
  GateDims dims;
  const T* logits;                        // [T, E] unbiased router logits z
  const T* difficulty_logit = nullptr;    // [T] pre-activation a; null: d = 0, s = 0, L_d = 0
  Modulation modulation = Modulation::standard;
  Acc gamma = Acc(1), tau = Acc(0.5);
  Acc* probs = nullptr;                   // [T, E] p = softmax(zc)      (optional)
  Acc* lse = nullptr;                     // [T] logsumexp(zc)           (optional)
  Acc* entropy = nullptr;                 // [T] normalised H of softmax(z) (optional)
  Acc* difficulty = nullptr;              // [T] d                       (optional)
  int32_t* topk_idx = nullptr;            // [T, K] required
  Acc* topk_prob = nullptr;               // [T, K] p before renormalisation, required
  Acc* topk_weight = nullptr;             // [T, K] renormalised weights, required
  int32_t* expert_counts = nullptr;       // [E] routed (t, k) slots per expert, required
  Acc* losses = nullptr;                  // [4] L_z, L_lb, L_d, L_g, required
  int64_t logits_stride = 0;              // elements between rows of logits; 0: experts
  int64_t difficulty_stride = 0;          // elements between tokens of difficulty_logit; 0: 1
  /// [E + 4] the forward's batch sums (optional): per expert e the routed probability sum
  /// sum of p_t,e over the (t, k) routed to e (T K u_e), then sum_t lse_t^2,
  /// sum_t (d_t - H_t)^2, sum_t mass_m,t, sum_t mass_s,t (T P_m, T P_s). The forward writes
  /// them when set; the backward (GateBackwardParams::fwd) reads them when set instead of
  /// recomputing u_e, P_m, P_s (one read of the logits and two launches fewer).
  Acc* totals = nullptr;
};

template <class T, class Acc = float>
struct GateBackwardParams {
  GateForwardParams<T, Acc> fwd;  // inputs and saved topk_idx, topk_prob (others unused)
  const Acc* dweight = nullptr;   // [T, K] gradient of topk_weight; null: zero
  Acc c_z = 0, c_lb = 0, c_d = 0, c_g = 0;
  T* dlogits = nullptr;           // [T, E] contiguous (row stride E), required
  T* ddifficulty_logit = nullptr; // [T] contiguous; required when fwd.difficulty_logit is set
  /// [4] the coefficients (c_z, c_lb, c_d, c_g) in memory the kernels read (device memory
  /// for the launchers, host memory for the reference); when set, it replaces the four
  /// scalars. For autograd: the upstream gradient of the losses tensor stays on the device,
  /// so the backward needs no host sync.
  const Acc* loss_grad = nullptr;
};

/// The four coefficients of a gate backward: *loss_grad when given, else the scalars.
/// (MOXE_HD: the kernels read them once each.)
template <class Acc>
struct LossCoefficients {
  Acc c_z, c_lb, c_d, c_g;
};

template <class T, class Acc>
MOXE_HD inline LossCoefficients<Acc> loss_coefficients(const GateBackwardParams<T, Acc>& b) {
  if (b.loss_grad != nullptr) return {b.loss_grad[0], b.loss_grad[1], b.loss_grad[2], b.loss_grad[3]};
  return {b.c_z, b.c_lb, b.c_d, b.c_g};
}

/// Row stride of the logits in elements.
inline int64_t logits_row_stride(const GateDims& d, int64_t stride) { return stride > 0 ? stride : d.experts; }
inline int64_t difficulty_step(int64_t stride) { return stride > 0 ? stride : 1; }

/// Sizes and modulation checks shared by every gate entry point.
inline Status validate_dims(const GateDims& d) {
  MOXE_REQUIRE(d.tokens > 0 && d.experts > 0);
  MOXE_REQUIRE(d.top_k >= 1 && d.top_k <= d.experts);
  MOXE_REQUIRE(d.mlstm_experts >= 0 && d.mlstm_experts <= d.experts);
  return Status::ok;
}

template <class T, class Acc>
Status validate(const GateForwardParams<T, Acc>& p, bool need_outputs = true) {
  MOXE_RETURN_IF_ERROR(validate_dims(p.dims));
  MOXE_REQUIRE(p.logits != nullptr);
  MOXE_REQUIRE(p.logits_stride == 0 || p.logits_stride >= p.dims.experts);
  MOXE_REQUIRE(p.difficulty_stride >= 0);
  MOXE_REQUIRE(p.modulation == Modulation::none || p.modulation == Modulation::standard ||
               p.modulation == Modulation::proportional || p.modulation == Modulation::masked);
  if (need_outputs) MOXE_REQUIRE(p.topk_idx && p.topk_prob && p.topk_weight && p.expert_counts && p.losses);
  return Status::ok;
}

template <class T, class Acc>
Status validate(const GateBackwardParams<T, Acc>& p) {
  MOXE_RETURN_IF_ERROR(validate(p.fwd, /*need_outputs=*/false));
  MOXE_REQUIRE(p.fwd.topk_idx && p.fwd.topk_prob && p.dlogits);
  MOXE_REQUIRE(p.fwd.difficulty_logit == nullptr || p.ddifficulty_logit != nullptr);
  return Status::ok;
}

// ---- the pieces on their own ---------------------------------------------------------

struct RowDims {
  int64_t tokens;
  int experts;
};

/// p = softmax(z), lse = logsumexp(z), entropy = -sum p log(max(p, 1e-6)) / log E.
template <class T, class Acc = float>
struct SoftmaxEntropyParams {
  RowDims dims;
  const T* logits;               // [T, E]
  Acc* probs = nullptr;          // [T, E] (optional)
  Acc* lse = nullptr;            // [T]    (optional)
  Acc* entropy = nullptr;        // [T]    (optional)
};

/// dlogits from the gradients of any of the three outputs (null: zero).
template <class T, class Acc = float>
struct SoftmaxEntropyBackwardParams {
  SoftmaxEntropyParams<T, Acc> fwd;  // logits used; outputs unused
  const Acc* dprobs = nullptr;       // [T, E]
  const Acc* dlse = nullptr;         // [T]
  const Acc* dentropy = nullptr;     // [T]
  T* dlogits = nullptr;              // [T, E], required
};

template <class T, class Acc>
Status validate(const SoftmaxEntropyParams<T, Acc>& p) {
  MOXE_REQUIRE(p.dims.tokens > 0 && p.dims.experts > 0 && p.logits != nullptr);
  return Status::ok;
}

template <class T, class Acc>
Status validate(const SoftmaxEntropyBackwardParams<T, Acc>& p) {
  MOXE_RETURN_IF_ERROR(validate(p.fwd));
  MOXE_REQUIRE(p.dlogits != nullptr);
  return Status::ok;
}

/// Top-k of scores per token, optionally group-limited (DeepSeek-V3): the experts form
/// n_groups equal contiguous groups, a group's score is the sum of its top-2 scores (its
/// top-1 when a group holds one expert), the topk_groups best groups (ties: lower group)
/// are kept and the top-k is taken among their experts. Ties go to the lower index.
struct TopKDims {
  int64_t tokens;
  int experts, top_k;
  int n_groups = 1, topk_groups = 1;
};

template <class T, class Acc = float>
struct TopKParams {
  TopKDims dims;
  const T* scores;                  // [T, E]
  int32_t* topk_idx = nullptr;      // [T, K] required, in descending score order
  Acc* topk_value = nullptr;        // [T, K] selected scores (optional)
  Acc* topk_weight = nullptr;       // [T, K] (optional) value / sum(values), or value
  bool renormalize = true;
};

/// dscores [T, E] (zero outside the selection) from dweight and/or dvalue.
template <class T, class Acc = float>
struct TopKBackwardParams {
  TopKParams<T, Acc> fwd;          // scores and the saved topk_idx
  const Acc* dweight = nullptr;    // [T, K] (null: zero)
  const Acc* dvalue = nullptr;     // [T, K] (null: zero)
  T* dscores = nullptr;            // [T, E], required
};

inline Status validate_dims(const TopKDims& d) {
  MOXE_REQUIRE(d.tokens > 0 && d.experts > 0);
  MOXE_REQUIRE(d.top_k >= 1 && d.top_k <= d.experts);
  MOXE_REQUIRE(d.n_groups >= 1 && d.experts % d.n_groups == 0);
  MOXE_REQUIRE(d.topk_groups >= 1 && d.topk_groups <= d.n_groups);
  MOXE_REQUIRE(static_cast<int64_t>(d.topk_groups) * (d.experts / d.n_groups) >= d.top_k);
  return Status::ok;
}

template <class T, class Acc>
Status validate(const TopKParams<T, Acc>& p, bool need_outputs = true) {
  MOXE_RETURN_IF_ERROR(validate_dims(p.dims));
  MOXE_REQUIRE(p.scores != nullptr);
  if (need_outputs) MOXE_REQUIRE(p.topk_idx != nullptr);
  return Status::ok;
}

template <class T, class Acc>
Status validate(const TopKBackwardParams<T, Acc>& p) {
  MOXE_RETURN_IF_ERROR(validate(p.fwd, false));
  MOXE_REQUIRE(p.fwd.topk_idx != nullptr && p.dscores != nullptr);
  return Status::ok;
}

}  // namespace moxe::router
