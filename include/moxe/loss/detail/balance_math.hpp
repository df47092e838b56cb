// moxe::loss: the scalar terms of the balance losses and their derivatives, shared by the
// host references, the device kernels and the fused router gate (see docs/loss.md).
#pragma once

#include "moxe/core/config.hpp"
#include "moxe/core/math.hpp"

namespace moxe::loss::detail {

/// The upstream gradient of a loss: *loss_grad when given (device memory for the launchers,
/// so an autograd backward needs no host sync), else the scalar.
template <class A>
MOXE_HD MOXE_FORCEINLINE A upstream_gradient(const A* loss_grad, A dloss) {
  return loss_grad != nullptr ? *loss_grad : dloss;
}

/// A group offset read from memory the host cannot check, clamped to [0, experts].
MOXE_HD MOXE_FORCEINLINE int clamp_offset(int offset, int experts) {
  return offset < 0 ? 0 : offset > experts ? experts : offset;
}

/// eps inside the group-balance logarithm: P log(G P + eps).
inline constexpr double kGroupLossEps = 1e-8;

/// z-loss summand of one token: lse^2 (the loss is the mean over tokens).
template <class A>
MOXE_HD MOXE_FORCEINLINE A z_loss_term(A lse) { return lse * lse; }

/// Group-balance summand of one group with mean probability P among G groups:
/// P log(G P + eps) (G = 2 gives the MoxE L_g).
template <class A>
MOXE_HD MOXE_FORCEINLINE A group_loss_term(A p, A groups) {
  return p * math::log(groups * p + A(kGroupLossEps));
}

/// d/dP [P log(G P + eps)] = log(G P + eps) + G P / (G P + eps).
template <class A>
MOXE_HD MOXE_FORCEINLINE A group_loss_term_grad(A p, A groups) {
  const A x = groups * p + A(kGroupLossEps);
  return math::log(x) + groups * p / x;
}

/// MoxE load-balance summand of one expert: (u_e - 1/E)^2 (L_lb = E * mean_e = sum_e).
template <class A>
MOXE_HD MOXE_FORCEINLINE A load_balance_term(A u, A experts) {
  const A diff = u - A(1) / experts;
  return diff * diff;
}

/// d L_lb / d p_te for a routed (t, k) slot of expert e: 2 (u_e - 1/E) / (T K).
template <class A>
MOXE_HD MOXE_FORCEINLINE A load_balance_grad(A u, A experts, A routed_slots) {
  return A(2) * (u - A(1) / experts) / routed_slots;
}

/// Difficulty-loss summand of one token: (d - H)^2.
template <class A>
MOXE_HD MOXE_FORCEINLINE A difficulty_loss_term(A d, A h) {
  const A diff = d - h;
  return diff * diff;
}

/// d/dd of mean_t (d_t - H_t)^2 for one token: 2 (d - H) / T (d/dH is its negative).
template <class A>
MOXE_HD MOXE_FORCEINLINE A difficulty_loss_grad(A d, A h, A tokens) {
  return A(2) * (d - h) / tokens;
}

}  // namespace moxe::loss::detail
