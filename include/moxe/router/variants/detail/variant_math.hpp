// moxe::router::variants: the per-token arithmetic of the routing variants, shared by the
// host references and the device kernels (docs/router_variants.md).
#pragma once

#include <cstdint>

#include "moxe/core/config.hpp"
#include "moxe/core/math.hpp"
#include "moxe/router/detail/gate_math.hpp"

namespace moxe::router::variants::detail {

/// Top-p: how many of the probabilities `sorted` (descending, max_k of them) the token
/// takes: the smallest n whose running sum reaches top_p, at most max_k (always >= 1).
/// The running sum adds in slot order, on the host and on the device alike.
template <class A>
MOXE_HD MOXE_FORCEINLINE int topp_count(const A* sorted, int max_k, A top_p) {
  A cum = A(0);
  for (int j = 0; j < max_k; ++j) {
    cum += sorted[j];
    if (cum >= top_p) return j + 1;
  }
  return max_k;
}

/// Gradient wrt the logit of a chosen expert of w = p / sum(p chosen) with p = softmax(z):
/// w is the softmax of the chosen logits alone, so dz_e = w_e (dw_e - <w, dw>) on the
/// chosen set and 0 elsewhere (the full normaliser cancels).
template <class A>
MOXE_HD MOXE_FORCEINLINE A renormalised_softmax_grad(A w, A dw, A w_dot_dw) {
  return w * (dw - w_dot_dw);
}

/// Sigmoid scoring: d(sum_j w_j dw_j)/dz_i for a chosen i with logit z, w_j = scale * s_j / S
/// (renormalize) or scale * s_j, s = sigmoid(z), S = sum of chosen s. `u_dot_dw` is
/// sum_j (s_j / S) dw_j (unused without renormalisation). sigmoid'(z) from z itself: the
/// chosen experts have the largest logits, where s (1 - s) from a rounded s loses digits.
template <class A>
MOXE_HD MOXE_FORCEINLINE A sigmoid_weight_grad(A z, A dw, A u_dot_dw, A inv_sum, A scale, bool renormalize) {
  const A ds = renormalize ? scale * (dw - u_dot_dw) * inv_sum : scale * dw;
  return ds * math::sigmoid_grad(z);
}

/// Sigmoid scoring: weight of a chosen expert.
template <class A>
MOXE_HD MOXE_FORCEINLINE A sigmoid_weight(A s, A inv_sum, A scale, bool renormalize) {
  return renormalize ? scale * s * inv_sum : scale * s;
}

/// Bias step of auxiliary-loss-free balancing: rate * sign(mean load - load_e), with the
/// sign taken exactly in integers: sign(total - E * load_e).
template <class A>
MOXE_HD MOXE_FORCEINLINE A bias_step(int64_t total, int experts, int64_t load, A rate) {
  const int64_t diff = total - static_cast<int64_t>(experts) * load;
  return diff > 0 ? rate : diff < 0 ? -rate : A(0);
}

/// Group-restricted routing: whether expert e is allowed for a token whose group range is
/// [lo, hi) (empty for an invalid group) with the shared pool [shared_lo, shared_hi).
MOXE_HD MOXE_FORCEINLINE bool expert_allowed(int e, int lo, int hi, int shared_lo, int shared_hi) {
  return (e >= lo && e < hi) || (e >= shared_lo && e < shared_hi);
}

/// The group range of a token: [offsets[g], offsets[g+1]) clamped to [0, E], empty for a
/// group id outside [0, num_groups) or a decreasing pair.
MOXE_HD MOXE_FORCEINLINE void group_range(const int32_t* offsets, int num_groups, int experts, int32_t g, int& lo,
                                          int& hi) {
  lo = hi = 0;
  if (g < 0 || g >= num_groups) return;
  int a = offsets[g], b = offsets[g + 1];
  a = a < 0 ? 0 : a > experts ? experts : a;
  b = b < 0 ? 0 : b > experts ? experts : b;
  if (a < b) {
    lo = a;
    hi = b;
  }
}

/// Group-limited routing over a subset of experts: a group's score from the top-2 of its
/// allowed values (first >= second) and how many it has: first + second, first with one,
/// -inf with none.
template <class A>
MOXE_HD MOXE_FORCEINLINE A allowed_group_score(A first, A second, int allowed) {
  return allowed >= 2 ? first + second : allowed == 1 ? first : -math::infinity<A>();
}

/// One step of a descending radix select: given the histogram of the current digit over
/// the candidates, the digit holding the element of rank `remaining` (1-based, counted
/// from the largest) and that element's rank within the digit (written to
/// remaining_in_digit). Expert choice's per-expert selection on the device.
template <class Count>
MOXE_HD MOXE_FORCEINLINE int radix_select_digit(const Count* hist, int bins, int64_t remaining,
                                                int64_t& remaining_in_digit) {
  int64_t above = 0;
  int d = bins - 1;
  for (; d > 0; --d) {
    if (above + static_cast<int64_t>(hist[d]) >= remaining) break;
    above += static_cast<int64_t>(hist[d]);
  }
  remaining_in_digit = remaining - above;
  return d;
}

}  // namespace moxe::router::variants::detail
