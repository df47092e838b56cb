// moxe::loss: parameter structs of the routing losses (docs/loss.md). Each loss is a
// scalar; the backward takes its upstream gradient, either `dloss` (a host scalar) or
// `loss_grad` (a pointer to it, device memory for the launchers, host memory for the
// references; when set it replaces dloss, so an autograd backward whose upstream gradient
// lives on the device needs no host sync), and writes the gradient of dloss * L with
// respect to the inputs.
//
// Layouts: logits [T, E] (T element type), probs [T, E] (Acc), topk_idx [T, K] int32 with
// distinct experts per token, difficulty and entropy [T] (Acc).
#pragma once

#include <cstdint>

#include "moxe/core/config.hpp"
#include "moxe/core/status.hpp"

namespace moxe::loss {

struct Dims {
  int64_t tokens;
  int experts;
  int top_k = 1;
};

/// L_z = mean_t logsumexp(z_t)^2.
template <class T, class Acc = float>
struct ZLossParams {
  Dims dims;
  const T* logits;
  Acc* loss;              // [1]
};
template <class T, class Acc = float>
struct ZLossBackwardParams {
  ZLossParams<T, Acc> fwd;  // logits used
  Acc dloss;
  T* dlogits;               // [T, E]
  const Acc* loss_grad = nullptr;  // [1] upstream gradient in memory; replaces dloss when set
};

/// MoxE load balance: u_e = (sum of probs[t, e] over the (t, k) routed to e) / (T K),
/// L_lb = E * mean_e (u_e - 1/E)^2.
template <class Acc = float>
struct LoadBalanceParams {
  Dims dims;
  const Acc* probs;
  const int32_t* topk_idx;
  Acc* loss;               // [1]
  Acc* load = nullptr;     // [E] u_e (optional)
};
template <class Acc = float>
struct LoadBalanceBackwardParams {
  LoadBalanceParams<Acc> fwd;  // probs, topk_idx used
  Acc dloss;
  Acc* dprobs;                 // [T, E]
  const Acc* loss_grad = nullptr;  // [1] upstream gradient in memory; replaces dloss when set
};

/// Switch load balance: L = E * sum_e f_e P_e, f_e = (routed (t, k) slots of e) / (T K)
/// (the top-1 token fraction when K = 1), P_e = mean_t probs[t, e]. f is a constant.
template <class Acc = float>
struct SwitchLoadBalanceParams {
  Dims dims;
  const Acc* probs;
  const int32_t* topk_idx;
  Acc* loss;               // [1]
};
template <class Acc = float>
struct SwitchLoadBalanceBackwardParams {
  SwitchLoadBalanceParams<Acc> fwd;
  Acc dloss;
  Acc* dprobs;             // [T, E]
  const Acc* loss_grad = nullptr;  // [1] upstream gradient in memory; replaces dloss when set
};

/// Group balance (KL to uniform over G groups, MoxE's L_g when G = 2):
/// P_g = mean_t sum_{e in group g} probs[t, e], L = sum_g P_g log(G P_g + 1e-8).
/// Group g holds experts [group_offsets[g], group_offsets[g+1]): any sizes, offsets
/// non-decreasing from 0 to E (device memory for the launchers, host for the reference).
template <class Acc = float>
struct GroupBalanceParams {
  Dims dims;
  int num_groups;
  const int32_t* group_offsets;  // [G + 1]
  const Acc* probs;
  Acc* loss;                     // [1]
  Acc* group_mass = nullptr;     // [G] P_g (optional)
};
template <class Acc = float>
struct GroupBalanceBackwardParams {
  GroupBalanceParams<Acc> fwd;
  Acc dloss;
  Acc* dprobs;                   // [T, E]
  const Acc* loss_grad = nullptr;  // [1] upstream gradient in memory; replaces dloss when set
};

/// Difficulty loss L_d = mean_t (d_t - H_t)^2.
template <class Acc = float>
struct DifficultyLossParams {
  int64_t tokens;
  const Acc* difficulty;
  const Acc* entropy;
  Acc* loss;               // [1]
};
template <class Acc = float>
struct DifficultyLossBackwardParams {
  DifficultyLossParams<Acc> fwd;
  Acc dloss;
  Acc* ddifficulty = nullptr;  // [T] (optional)
  Acc* dentropy = nullptr;     // [T] (optional)
  const Acc* loss_grad = nullptr;  // [1] upstream gradient in memory; replaces dloss when set
};

inline Status validate_dims(const Dims& d, bool routed) {
  MOXE_REQUIRE(d.tokens > 0 && d.experts > 0);
  if (routed) MOXE_REQUIRE(d.top_k >= 1 && d.top_k <= d.experts);
  return Status::ok;
}

template <class T, class Acc>
Status validate(const ZLossParams<T, Acc>& p, bool need_loss = true) {
  MOXE_RETURN_IF_ERROR(validate_dims(p.dims, false));
  MOXE_REQUIRE(p.logits && (!need_loss || p.loss));
  return Status::ok;
}
template <class T, class Acc>
Status validate(const ZLossBackwardParams<T, Acc>& p) {
  MOXE_RETURN_IF_ERROR(validate(p.fwd, false));
  MOXE_REQUIRE(p.dlogits != nullptr);
  return Status::ok;
}

template <class Acc>
Status validate(const LoadBalanceParams<Acc>& p, bool need_loss = true) {
  MOXE_RETURN_IF_ERROR(validate_dims(p.dims, true));
  MOXE_REQUIRE(p.probs && p.topk_idx && (!need_loss || p.loss));
  return Status::ok;
}
template <class Acc>
Status validate(const LoadBalanceBackwardParams<Acc>& p) {
  MOXE_RETURN_IF_ERROR(validate(p.fwd, false));
  MOXE_REQUIRE(p.dprobs != nullptr);
  return Status::ok;
}

template <class Acc>
Status validate(const SwitchLoadBalanceParams<Acc>& p, bool need_loss = true) {
  MOXE_RETURN_IF_ERROR(validate_dims(p.dims, true));
  MOXE_REQUIRE(p.probs && p.topk_idx && (!need_loss || p.loss));
  return Status::ok;
}
template <class Acc>
Status validate(const SwitchLoadBalanceBackwardParams<Acc>& p) {
  MOXE_RETURN_IF_ERROR(validate(p.fwd, false));
  MOXE_REQUIRE(p.dprobs != nullptr);
  return Status::ok;
}

template <class Acc>
Status validate(const GroupBalanceParams<Acc>& p, bool need_loss = true) {
  MOXE_RETURN_IF_ERROR(validate_dims(p.dims, false));
  MOXE_REQUIRE(p.num_groups >= 1 && p.num_groups <= p.dims.experts);
  MOXE_REQUIRE(p.group_offsets && p.probs && (!need_loss || p.loss));
  return Status::ok;
}
template <class Acc>
Status validate(const GroupBalanceBackwardParams<Acc>& p) {
  MOXE_RETURN_IF_ERROR(validate(p.fwd, false));
  MOXE_REQUIRE(p.dprobs != nullptr);
  return Status::ok;
}

template <class Acc>
Status validate(const DifficultyLossParams<Acc>& p, bool need_loss = true) {
  MOXE_REQUIRE(p.tokens > 0 && p.difficulty && p.entropy && (!need_loss || p.loss));
  return Status::ok;
}
template <class Acc>
Status validate(const DifficultyLossBackwardParams<Acc>& p) {
  MOXE_RETURN_IF_ERROR(validate(p.fwd, false));
  MOXE_REQUIRE(p.ddifficulty || p.dentropy);
  return Status::ok;
}

}  // namespace moxe::loss
