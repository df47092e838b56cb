// moxe::router::reference: host references of the router (any T/Acc, double all through
// for the double checks). Host C++ only; the per-token arithmetic is the MOXE_HD code in
// detail/gate_math.hpp that the kernels run too.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "moxe/core/math.hpp"
#include "moxe/core/status.hpp"
#include "moxe/loss/detail/balance_math.hpp"
#include "moxe/router/detail/gate_math.hpp"
#include "moxe/router/params.hpp"

namespace moxe::router::reference {

namespace detail {

/// Top-k of row[0, E) among allowed experts (allowed may be empty: all), descending, ties
/// to the lower index. NaN ranks as -inf (rank_value), as in the kernels. With fewer than k
/// allowed experts the remaining slots get -1 (as the device's group top-k).
template <class A>
void select_topk(const A* row, int experts, int k, const std::vector<char>& allowed, int32_t* idx_out) {
  std::vector<char> taken(experts, 0);
  for (int j = 0; j < k; ++j) {
    int best = -1;
    for (int e = 0; e < experts; ++e) {
      if (taken[e] || (!allowed.empty() && !allowed[e])) continue;
      if (best < 0 || router::detail::ranks_before(router::detail::rank_value(row[e]), e,
                                                   router::detail::rank_value(row[best]), best))
        best = e;
    }
    if (best < 0) {
      std::fill(idx_out + j, idx_out + k, -1);
      return;
    }
    taken[best] = 1;
    idx_out[j] = best;
  }
}

/// Group-limited routing mask (DeepSeek-V3): keep the topk_groups groups of largest score.
template <class A>
std::vector<char> group_mask(const A* row, const TopKDims& d) {
  if (d.n_groups <= 1 || d.topk_groups >= d.n_groups) return {};
  const int size = d.experts / d.n_groups;
  std::vector<A> score(d.n_groups);
  for (int g = 0; g < d.n_groups; ++g) {
    router::detail::Top2<A> t2;
    for (int e = g * size; e < (g + 1) * size; ++e) t2.add(row[e]);
    score[g] = t2.group_score(size);
  }
  std::vector<int32_t> groups(d.topk_groups);
  select_topk(score.data(), d.n_groups, d.topk_groups, std::vector<char>{}, groups.data());
  std::vector<char> allowed(d.experts, 0);
  for (int32_t g : groups)
    for (int e = g * size; e < (g + 1) * size; ++e) allowed[e] = 1;
  return allowed;
}

/// One token's forward quantities (recomputed identically by forward and backward).
template <class A>
struct TokenState {
  A d = A(0), s = A(0), h = A(0);
  router::detail::TokenSoftmax<A> sm{};
  router::detail::GroupScales<A> scale{};
};

/// Fills z with the token's logits minus their max (exp(z[e]) * inv_sum = q_e).
template <class T, class Acc>
TokenState<Acc> token_state(const GateForwardParams<T, Acc>& p, int64_t t, std::vector<Acc>& z) {
  namespace rd = router::detail;
  const int E = p.dims.experts, Em = p.dims.mlstm_experts;
  const T* row = p.logits + t * logits_row_stride(p.dims, p.logits_stride);
  TokenState<Acc> st;
  if (p.difficulty_logit != nullptr) {
    st.d = math::sigmoid(static_cast<Acc>(p.difficulty_logit[t * difficulty_step(p.difficulty_stride)]));
    st.s = rd::modulation_shift(p.modulation, p.gamma, p.tau, st.d);
  }
  // two passes as on the device: the max, then one exponential per expert
  Acc max = -math::infinity<Acc>();
  for (int e = 0; e < E; ++e) max = math::max(max, static_cast<Acc>(row[e]));
  Acc sum_m = 0, sum_s = 0;
  for (int e = 0; e < E; ++e) {
    z[e] = static_cast<Acc>(row[e]) - max;
    (e < Em ? sum_m : sum_s) += math::exp(z[e]);
  }
  st.sm = rd::token_softmax(max, sum_m, sum_s, st.s);
  st.scale = rd::group_scales(st.sm, st.s);
  Acc h = Acc(0);
  for (int e = 0; e < E; ++e) h += rd::entropy_term_log(math::exp(z[e]) * st.sm.inv_sum, z[e] - st.sm.log_sum);
  st.h = h * rd::inv_log_experts<Acc>(E);
  return st;
}

}  // namespace detail

/// The fused gate forward (see docs/router.md): probs, lse, entropy, difficulty, top-k,
/// counts and the four losses.
template <class T, class Acc>
Status gate_forward(const GateForwardParams<T, Acc>& p) {
  namespace rd = router::detail;
  namespace ld = loss::detail;
  MOXE_RETURN_IF_ERROR(validate(p));
  const int64_t T_ = p.dims.tokens;
  const int E = p.dims.experts, Em = p.dims.mlstm_experts, K = p.dims.top_k;
  std::vector<Acc> z(E), prob(E), load(E, Acc(0));
  std::vector<int32_t> counts(E, 0), idx(K);
  Acc sum_z = 0, sum_d = 0, sum_m = 0, sum_s = 0;
  for (int64_t t = 0; t < T_; ++t) {
    const auto st = detail::token_state(p, t, z);
    for (int e = 0; e < E; ++e) prob[e] = math::exp(z[e]) * st.sm.inv_sum * (e < Em ? st.scale.mlstm : st.scale.slstm);
    detail::select_topk(prob.data(), E, K, std::vector<char>{}, idx.data());
    Acc total = 0;
    for (int j = 0; j < K; ++j) total += prob[idx[j]];
    for (int j = 0; j < K; ++j) {
      const int e = idx[j];
      p.topk_idx[t * K + j] = e;
      p.topk_prob[t * K + j] = prob[e];
      p.topk_weight[t * K + j] = prob[e] / total;
      load[e] += prob[e];
      counts[e] += 1;
    }
    if (p.probs)
      for (int e = 0; e < E; ++e) p.probs[t * E + e] = prob[e];
    if (p.lse) p.lse[t] = st.sm.lse;
    if (p.entropy) p.entropy[t] = st.h;
    if (p.difficulty) p.difficulty[t] = st.d;
    sum_z += ld::z_loss_term(st.sm.lse);
    if (p.difficulty_logit) sum_d += ld::difficulty_loss_term(st.d, st.h);
    sum_m += st.sm.mass_m;
    sum_s += st.sm.mass_s;
  }
  const Acc inv_t = Acc(1) / static_cast<Acc>(T_);
  const Acc slots = static_cast<Acc>(T_) * static_cast<Acc>(K);
  Acc lb = 0;
  for (int e = 0; e < E; ++e) {
    lb += ld::load_balance_term(load[e] / slots, static_cast<Acc>(E));
    p.expert_counts[e] = counts[e];
  }
  p.losses[0] = sum_z * inv_t;
  p.losses[1] = lb;
  p.losses[2] = sum_d * inv_t;
  p.losses[3] = ld::group_loss_term(sum_m * inv_t, Acc(2)) + ld::group_loss_term(sum_s * inv_t, Acc(2));
  if (p.totals) {
    for (int e = 0; e < E; ++e) p.totals[e] = load[e];
    p.totals[E] = sum_z;
    p.totals[E + 1] = sum_d;
    p.totals[E + 2] = sum_m;
    p.totals[E + 3] = sum_s;
  }
  return Status::ok;
}

/// The exact gradient of sum(w * dw) + c_z L_z + c_lb L_lb + c_d L_d + c_g L_g with respect
/// to the logits and the difficulty pre-activation.
template <class T, class Acc>
Status gate_backward(const GateBackwardParams<T, Acc>& b) {
  namespace rd = router::detail;
  namespace ld = loss::detail;
  MOXE_RETURN_IF_ERROR(validate(b));
  const auto& p = b.fwd;
  const int64_t T_ = p.dims.tokens;
  const int E = p.dims.experts, Em = p.dims.mlstm_experts, K = p.dims.top_k;
  const bool head = p.difficulty_logit != nullptr;
  const LossCoefficients<Acc> co = loss_coefficients(b);
  std::vector<Acc> z(E), load(E, Acc(0)), routed(E, Acc(0));
  // batch quantities: the forward's totals when given, else u_e from the saved top-k and
  // P_m, P_s recomputed from the logits; slots outside [0, E) (-1: not routed) add to no
  // load and get no gradient (as the kernels)
  auto routed_slot = [E](int32_t e) { return e >= 0 && e < E; };
  if (p.totals) {
    for (int e = 0; e < E; ++e) load[e] = p.totals[e];
  } else {
    for (int64_t i = 0; i < T_ * K; ++i)
      if (routed_slot(p.topk_idx[i])) load[p.topk_idx[i]] += p.topk_prob[i];
  }
  const Acc slots = static_cast<Acc>(T_) * static_cast<Acc>(K);
  for (int e = 0; e < E; ++e) load[e] /= slots;
  Acc sum_m = 0, sum_s = 0;
  if (p.totals) {
    sum_m = p.totals[E + 2];
    sum_s = p.totals[E + 3];
  } else if (co.c_g != Acc(0)) {
    for (int64_t t = 0; t < T_; ++t) {
      const auto st = detail::token_state(p, t, z);
      sum_m += st.sm.mass_m;
      sum_s += st.sm.mass_s;
    }
  }
  const Acc inv_t = Acc(1) / static_cast<Acc>(T_);
  const auto sc = rd::gate_backward_scalars(co.c_z, co.c_g, co.c_d, sum_m * inv_t, sum_s * inv_t, T_);
  const Acc inv_log = rd::inv_log_experts<Acc>(E);
  for (int64_t t = 0; t < T_; ++t) {
    const auto st = detail::token_state(p, t, z);
    const Acc* prob_k = p.topk_prob + t * K;
    const int32_t* idx_k = p.topk_idx + t * K;
    Acc total = 0, w_dot = 0;
    for (int j = 0; j < K; ++j) total += prob_k[j];
    const Acc inv_total = Acc(1) / total;
    for (int j = 0; j < K; ++j) w_dot += b.dweight ? prob_k[j] * inv_total * b.dweight[t * K + j] : Acc(0);
    Acc p_dot_gp = st.sm.mass_m * sc.g_m + st.sm.mass_s * sc.g_s, routed_signed = 0;
    for (int j = 0; j < K; ++j) {
      const int e = idx_k[j];
      if (!routed_slot(e)) continue;
      const Acc dw = b.dweight ? b.dweight[t * K + j] : Acc(0);
      const Acc r = rd::renorm_grad(dw, w_dot, inv_total) +
                    co.c_lb * ld::load_balance_grad(load[e], static_cast<Acc>(E), slots);
      routed[e] = r;
      p_dot_gp += prob_k[j] * r;
      routed_signed += (e < Em ? prob_k[j] : -prob_k[j]) * r;
    }
    const Acc g_lse = sc.g_z * st.sm.lse;
    // entropy path of L_d: H depends on z through q = softmax(z)
    const Acc g_h = head ? -sc.g_d * ld::difficulty_loss_grad(st.d, st.h, static_cast<Acc>(T_)) * inv_log : Acc(0);
    Acc q_dot_hq = 0;
    if (head)
      for (int e = 0; e < E; ++e) {
        const Acc q = math::exp(z[e]) * st.sm.inv_sum;
        q_dot_hq += q * g_h * rd::entropy_term_grad_log(q, z[e] - st.sm.log_sum);
      }
    T* out = b.dlogits + t * E;
    for (int e = 0; e < E; ++e) {
      const bool in_m = e < Em;
      const Acc q = math::exp(z[e]) * st.sm.inv_sum;
      const Acc pe = q * (in_m ? st.scale.mlstm : st.scale.slstm);
      Acc g = rd::softmax_grad(pe, (in_m ? sc.g_m : sc.g_s) + routed[e], p_dot_gp, g_lse);
      if (head) g += q * (g_h * rd::entropy_term_grad_log(q, z[e] - st.sm.log_sum) - q_dot_hq);
      out[e] = static_cast<T>(g);
    }
    for (int j = 0; j < K; ++j)
      if (routed_slot(idx_k[j])) routed[idx_k[j]] = Acc(0);
    if (head) {
      const Acc ds = rd::shift_grad(st.sm.mass_m, st.sm.mass_s, sc.g_m, sc.g_s, p_dot_gp, g_lse, routed_signed);
      const Acc dd = sc.g_d * ld::difficulty_loss_grad(st.d, st.h, static_cast<Acc>(T_)) +
                     ds * rd::modulation_shift_grad(p.modulation, p.gamma, p.tau, st.d);
      const Acc a = static_cast<Acc>(p.difficulty_logit[t * difficulty_step(p.difficulty_stride)]);
      b.ddifficulty_logit[t] = static_cast<T>(dd * math::sigmoid_grad(a));  // from a: exact for large a
    }
  }
  return Status::ok;
}

// ---- softmax + entropy ------------------------------------------------------------------

template <class T, class Acc>
Status softmax_entropy_forward(const SoftmaxEntropyParams<T, Acc>& p) {
  namespace rd = router::detail;
  MOXE_RETURN_IF_ERROR(validate(p));
  const int E = p.dims.experts;
  const Acc inv_log = rd::inv_log_experts<Acc>(E);
  for (int64_t t = 0; t < p.dims.tokens; ++t) {
    const T* row = p.logits + t * E;
    math::MaxSum<Acc> ms;
    for (int e = 0; e < E; ++e) ms.add(static_cast<Acc>(row[e]));
    const Acc lse = ms.log_sum_exp();
    Acc h = 0;
    for (int e = 0; e < E; ++e) {
      const Acc log_q = static_cast<Acc>(row[e]) - lse;
      const Acc q = math::exp(log_q);
      h += rd::entropy_term_log(q, log_q);
      if (p.probs) p.probs[t * E + e] = q;
    }
    if (p.lse) p.lse[t] = lse;
    if (p.entropy) p.entropy[t] = h * inv_log;
  }
  return Status::ok;
}

template <class T, class Acc>
Status softmax_entropy_backward(const SoftmaxEntropyBackwardParams<T, Acc>& b) {
  namespace rd = router::detail;
  MOXE_RETURN_IF_ERROR(validate(b));
  const int E = b.fwd.dims.experts;
  const Acc inv_log = rd::inv_log_experts<Acc>(E);
  std::vector<Acc> q(E), g(E);
  for (int64_t t = 0; t < b.fwd.dims.tokens; ++t) {
    const T* row = b.fwd.logits + t * E;
    math::MaxSum<Acc> ms;
    for (int e = 0; e < E; ++e) ms.add(static_cast<Acc>(row[e]));
    const Acc lse = ms.log_sum_exp();
    const Acc dh = b.dentropy ? b.dentropy[t] * inv_log : Acc(0);
    const Acc dlse = b.dlse ? b.dlse[t] : Acc(0);
    Acc dot = 0;
    for (int e = 0; e < E; ++e) {
      const Acc log_q = static_cast<Acc>(row[e]) - lse;
      q[e] = math::exp(log_q);
      g[e] = (b.dprobs ? b.dprobs[t * E + e] : Acc(0)) + dh * rd::entropy_term_grad_log(q[e], log_q);
      dot += q[e] * g[e];
    }
    for (int e = 0; e < E; ++e) b.dlogits[t * E + e] = static_cast<T>(rd::softmax_grad(q[e], g[e], dot, dlse));
  }
  return Status::ok;
}

// ---- top-k --------------------------------------------------------------------------------

template <class T, class Acc>
Status topk_forward(const TopKParams<T, Acc>& p) {
  MOXE_RETURN_IF_ERROR(validate(p));
  const int E = p.dims.experts, K = p.dims.top_k;
  std::vector<Acc> row(E);
  for (int64_t t = 0; t < p.dims.tokens; ++t) {
    // NaN scores rank (and are reported) as -inf, as on the device
    for (int e = 0; e < E; ++e) row[e] = router::detail::rank_value(static_cast<Acc>(p.scores[t * E + e]));
    int32_t* idx = p.topk_idx + t * K;
    detail::select_topk(row.data(), E, K, detail::group_mask(row.data(), p.dims), idx);
    Acc total = 0;
    for (int j = 0; j < K; ++j) total += row[idx[j]];
    for (int j = 0; j < K; ++j) {
      if (p.topk_value) p.topk_value[t * K + j] = row[idx[j]];
      if (p.topk_weight) p.topk_weight[t * K + j] = p.renormalize ? row[idx[j]] / total : row[idx[j]];
    }
  }
  return Status::ok;
}

template <class T, class Acc>
Status topk_backward(const TopKBackwardParams<T, Acc>& b) {
  MOXE_RETURN_IF_ERROR(validate(b));
  const auto& p = b.fwd;
  const int E = p.dims.experts, K = p.dims.top_k;
  for (int64_t t = 0; t < p.dims.tokens; ++t) {
    const int32_t* idx = p.topk_idx + t * K;
    T* out = b.dscores + t * E;
    for (int e = 0; e < E; ++e) out[e] = static_cast<T>(Acc(0));
    // slots outside [0, E) (-1: not routed) are skipped; the renormalisation is over the
    // routed slots
    auto routed = [&](int j) { return idx[j] >= 0 && idx[j] < E; };
    Acc total = 0, w_dot = 0;
    for (int j = 0; j < K; ++j)
      if (routed(j)) total += static_cast<Acc>(p.scores[t * E + idx[j]]);
    const Acc inv_total = Acc(1) / total;
    if (b.dweight)
      for (int j = 0; j < K; ++j)
        if (routed(j)) w_dot += static_cast<Acc>(p.scores[t * E + idx[j]]) * inv_total * b.dweight[t * K + j];
    for (int j = 0; j < K; ++j) {
      if (!routed(j)) continue;
      const Acc dw = b.dweight ? b.dweight[t * K + j] : Acc(0);
      Acc g = p.renormalize ? router::detail::renorm_grad(dw, w_dot, inv_total) : dw;
      if (b.dvalue) g += b.dvalue[t * K + j];
      out[idx[j]] = static_cast<T>(g);
    }
  }
  return Status::ok;
}

}  // namespace moxe::router::reference
