// moxe::loss::reference: host references of the routing losses (any T/Acc; host C++ only).
#pragma once

#include <cstdint>
#include <vector>

#include "moxe/core/math.hpp"
#include "moxe/core/status.hpp"
#include "moxe/loss/detail/balance_math.hpp"
#include "moxe/loss/params.hpp"

namespace moxe::loss::reference {

namespace detail {
template <class T, class Acc>
Acc row_lse(const T* row, int experts) {
  math::MaxSum<Acc> ms;
  for (int e = 0; e < experts; ++e) ms.add(static_cast<Acc>(row[e]));
  return ms.log_sum_exp();
}

/// u_e = (sum of probs over the routed (t, k) of e) / (T K).
template <class Acc>
std::vector<Acc> routed_load(const Dims& d, const Acc* probs, const int32_t* topk_idx) {
  std::vector<Acc> u(d.experts, Acc(0));
  for (int64_t t = 0; t < d.tokens; ++t)
    for (int k = 0; k < d.top_k; ++k) {
      const int e = topk_idx[t * d.top_k + k];
      if (e >= 0 && e < d.experts) u[e] += probs[t * d.experts + e];  // -1: not routed
    }
  const Acc slots = static_cast<Acc>(d.tokens) * static_cast<Acc>(d.top_k);
  for (auto& x : u) x /= slots;
  return u;
}

/// f_e = (routed slots of e) / (T K).
template <class Acc>
std::vector<Acc> routed_fraction(const Dims& d, const int32_t* topk_idx) {
  std::vector<int64_t> c(d.experts, 0);
  for (int64_t i = 0; i < d.tokens * d.top_k; ++i)
    if (topk_idx[i] >= 0 && topk_idx[i] < d.experts) c[topk_idx[i]] += 1;
  std::vector<Acc> f(d.experts);
  const Acc slots = static_cast<Acc>(d.tokens) * static_cast<Acc>(d.top_k);
  for (int e = 0; e < d.experts; ++e) f[e] = static_cast<Acc>(c[e]) / slots;
  return f;
}

template <class Acc>
std::vector<Acc> group_mass(const GroupBalanceParams<Acc>& p) {
  std::vector<Acc> m(p.num_groups, Acc(0));
  for (int64_t t = 0; t < p.dims.tokens; ++t)
    for (int g = 0; g < p.num_groups; ++g)
      for (int e = p.group_offsets[g]; e < p.group_offsets[g + 1]; ++e) m[g] += p.probs[t * p.dims.experts + e];
  for (auto& x : m) x /= static_cast<Acc>(p.dims.tokens);
  return m;
}

template <class Acc>
Status check_offsets(const GroupBalanceParams<Acc>& p) {
  MOXE_REQUIRE(p.group_offsets[0] == 0 && p.group_offsets[p.num_groups] == p.dims.experts);
  for (int g = 0; g < p.num_groups; ++g) MOXE_REQUIRE(p.group_offsets[g] <= p.group_offsets[g + 1]);
  return Status::ok;
}
}  // namespace detail

template <class T, class Acc>
Status z_loss(const ZLossParams<T, Acc>& p) {
  MOXE_RETURN_IF_ERROR(validate(p));
  Acc s = 0;
  for (int64_t t = 0; t < p.dims.tokens; ++t)
    s += loss::detail::z_loss_term(detail::row_lse<T, Acc>(p.logits + t * p.dims.experts, p.dims.experts));
  p.loss[0] = s / static_cast<Acc>(p.dims.tokens);
  return Status::ok;
}

template <class T, class Acc>
Status z_loss_backward(const ZLossBackwardParams<T, Acc>& b) {
  MOXE_RETURN_IF_ERROR(validate(b));
  const Acc upstream = loss::detail::upstream_gradient(b.loss_grad, b.dloss);
  const int E = b.fwd.dims.experts;
  for (int64_t t = 0; t < b.fwd.dims.tokens; ++t) {
    const T* row = b.fwd.logits + t * E;
    const Acc lse = detail::row_lse<T, Acc>(row, E);
    const Acc g = upstream * Acc(2) * lse / static_cast<Acc>(b.fwd.dims.tokens);
    for (int e = 0; e < E; ++e) b.dlogits[t * E + e] = static_cast<T>(g * math::exp(static_cast<Acc>(row[e]) - lse));
  }
  return Status::ok;
}

template <class Acc>
Status load_balance(const LoadBalanceParams<Acc>& p) {
  MOXE_RETURN_IF_ERROR(validate(p));
  const auto u = detail::routed_load(p.dims, p.probs, p.topk_idx);
  Acc l = 0;
  for (int e = 0; e < p.dims.experts; ++e) {
    l += loss::detail::load_balance_term(u[e], static_cast<Acc>(p.dims.experts));
    if (p.load) p.load[e] = u[e];
  }
  p.loss[0] = l;
  return Status::ok;
}

template <class Acc>
Status load_balance_backward(const LoadBalanceBackwardParams<Acc>& b) {
  MOXE_RETURN_IF_ERROR(validate(b));
  const Acc upstream = loss::detail::upstream_gradient(b.loss_grad, b.dloss);
  const auto& d = b.fwd.dims;
  const auto u = detail::routed_load(d, b.fwd.probs, b.fwd.topk_idx);
  const Acc slots = static_cast<Acc>(d.tokens) * static_cast<Acc>(d.top_k);
  for (int64_t i = 0; i < d.tokens * d.experts; ++i) b.dprobs[i] = Acc(0);
  for (int64_t t = 0; t < d.tokens; ++t)
    for (int k = 0; k < d.top_k; ++k) {
      const int e = b.fwd.topk_idx[t * d.top_k + k];
      if (e < 0 || e >= d.experts) continue;
      b.dprobs[t * d.experts + e] += upstream * loss::detail::load_balance_grad(u[e], static_cast<Acc>(d.experts), slots);
    }
  return Status::ok;
}

template <class Acc>
Status switch_load_balance(const SwitchLoadBalanceParams<Acc>& p) {
  MOXE_RETURN_IF_ERROR(validate(p));
  const auto& d = p.dims;
  const auto f = detail::routed_fraction<Acc>(d, p.topk_idx);
  Acc l = 0;
  for (int e = 0; e < d.experts; ++e) {
    Acc col = 0;
    for (int64_t t = 0; t < d.tokens; ++t) col += p.probs[t * d.experts + e];
    l += f[e] * col / static_cast<Acc>(d.tokens);
  }
  p.loss[0] = static_cast<Acc>(d.experts) * l;
  return Status::ok;
}

template <class Acc>
Status switch_load_balance_backward(const SwitchLoadBalanceBackwardParams<Acc>& b) {
  MOXE_RETURN_IF_ERROR(validate(b));
  const Acc upstream = loss::detail::upstream_gradient(b.loss_grad, b.dloss);
  const auto& d = b.fwd.dims;
  const auto f = detail::routed_fraction<Acc>(d, b.fwd.topk_idx);
  const Acc scale = upstream * static_cast<Acc>(d.experts) / static_cast<Acc>(d.tokens);
  for (int64_t t = 0; t < d.tokens; ++t)
    for (int e = 0; e < d.experts; ++e) b.dprobs[t * d.experts + e] = scale * f[e];
  return Status::ok;
}

template <class Acc>
Status group_balance(const GroupBalanceParams<Acc>& p) {
  MOXE_RETURN_IF_ERROR(validate(p));
  MOXE_RETURN_IF_ERROR(detail::check_offsets(p));
  const auto m = detail::group_mass(p);
  Acc l = 0;
  for (int g = 0; g < p.num_groups; ++g) {
    l += loss::detail::group_loss_term(m[g], static_cast<Acc>(p.num_groups));
    if (p.group_mass) p.group_mass[g] = m[g];
  }
  p.loss[0] = l;
  return Status::ok;
}

template <class Acc>
Status group_balance_backward(const GroupBalanceBackwardParams<Acc>& b) {
  MOXE_RETURN_IF_ERROR(validate(b));
  const Acc upstream = loss::detail::upstream_gradient(b.loss_grad, b.dloss);
  MOXE_RETURN_IF_ERROR(detail::check_offsets(b.fwd));
  const auto& p = b.fwd;
  const auto m = detail::group_mass(p);
  for (int g = 0; g < p.num_groups; ++g) {
    const Acc grad = upstream * loss::detail::group_loss_term_grad(m[g], static_cast<Acc>(p.num_groups)) /
                     static_cast<Acc>(p.dims.tokens);
    for (int64_t t = 0; t < p.dims.tokens; ++t)
      for (int e = p.group_offsets[g]; e < p.group_offsets[g + 1]; ++e) b.dprobs[t * p.dims.experts + e] = grad;
  }
  return Status::ok;
}

template <class Acc>
Status difficulty_loss(const DifficultyLossParams<Acc>& p) {
  MOXE_RETURN_IF_ERROR(validate(p));
  Acc s = 0;
  for (int64_t t = 0; t < p.tokens; ++t) s += loss::detail::difficulty_loss_term(p.difficulty[t], p.entropy[t]);
  p.loss[0] = s / static_cast<Acc>(p.tokens);
  return Status::ok;
}

template <class Acc>
Status difficulty_loss_backward(const DifficultyLossBackwardParams<Acc>& b) {
  MOXE_RETURN_IF_ERROR(validate(b));
  const Acc upstream = loss::detail::upstream_gradient(b.loss_grad, b.dloss);
  const auto& p = b.fwd;
  for (int64_t t = 0; t < p.tokens; ++t) {
    const Acc g = upstream * loss::detail::difficulty_loss_grad(p.difficulty[t], p.entropy[t], static_cast<Acc>(p.tokens));
    if (b.ddifficulty) b.ddifficulty[t] = g;
    if (b.dentropy) b.dentropy[t] = -g;
  }
  return Status::ok;
}

}  // namespace moxe::loss::reference
