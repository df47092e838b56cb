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

/// Group-restricted expert choice: the pool of an expert that belongs to no group.
inline constexpr int32_t kNoPool = -1;
/// Group-restricted expert choice: the pool of a shared expert (it sees every token).
inline constexpr int32_t kSharedPool = -2;

/// Group-restricted expert choice: the pool of expert e: kSharedPool in the shared range,
/// else the lowest group whose range (group_range) holds e, else kNoPool. With valid
/// (non-decreasing) offsets the group ranges are disjoint and "lowest" never decides.
MOXE_HD MOXE_FORCEINLINE int32_t expert_pool(const int32_t* offsets, int num_groups, int experts, int shared_lo,
                                             int shared_hi, int e) {
  if (e >= shared_lo && e < shared_hi) return kSharedPool;
  for (int g = 0; g < num_groups; ++g) {
    int lo, hi;
    group_range(offsets, num_groups, experts, g, lo, hi);
    if (e >= lo && e < hi) return g;
  }
  return kNoPool;
}

/// Group-restricted expert choice: whether an expert of `pool` may choose a token of
/// `group` (a group id outside the valid range never equals a group pool).
MOXE_HD MOXE_FORCEINLINE bool pool_sees(int32_t pool, int32_t group) {
  return pool == kSharedPool || (pool >= 0 && pool == group);
}

/// Group-restricted expert choice: the tokens each expert of a pool of `pool_experts`
/// experts that sees `pool_tokens` tokens chooses: min(capacity, N) with a given capacity
/// > 0, else ceil(capacity_factor * N * top_k / pool_experts) clamped to [1, N]; 0 when
/// N = 0. Double arithmetic, the same on host and device.
MOXE_HD MOXE_FORCEINLINE int64_t pool_capacity(int64_t pool_tokens, int pool_experts, int64_t capacity,
                                               double capacity_factor, int top_k) {
  if (pool_tokens <= 0 || pool_experts <= 0) return 0;
  if (capacity > 0) return capacity < pool_tokens ? capacity : pool_tokens;
  const double c = capacity_factor * static_cast<double>(pool_tokens) * top_k / static_cast<double>(pool_experts);
  if (!(c < static_cast<double>(pool_tokens))) return pool_tokens;  // also NaN
  int64_t r = static_cast<int64_t>(c);
  if (static_cast<double>(r) < c) ++r;
  return r < 1 ? 1 : r;
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
