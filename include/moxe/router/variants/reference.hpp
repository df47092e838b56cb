// moxe::router::variants::reference: host references of the routing variants (any T/Acc,
// double all through for the double checks). Host C++ only; the per-token arithmetic is
// the MOXE_HD code in detail/variant_math.hpp and router/detail/gate_math.hpp that the
// kernels run too, and the selection reuses moxe::router::reference's top-k.
#pragma once

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <vector>

#include "moxe/core/math.hpp"
#include "moxe/core/status.hpp"
#include "moxe/router/detail/gate_math.hpp"
#include "moxe/router/reference.hpp"
#include "moxe/router/variants/detail/variant_math.hpp"
#include "moxe/router/variants/params.hpp"

namespace moxe::router::variants::reference {

namespace detail {

/// p = softmax of row over the allowed experts (allowed empty: all); 0 elsewhere.
template <class T, class Acc>
void masked_softmax(const T* row, int experts, const std::vector<char>& allowed, Acc* p) {
  math::MaxSum<Acc> ms;
  for (int e = 0; e < experts; ++e)
    if (allowed.empty() || allowed[e]) ms.add(static_cast<Acc>(row[e]));
  const Acc lse = ms.log_sum_exp();
  for (int e = 0; e < experts; ++e)
    p[e] = (allowed.empty() || allowed[e]) ? math::exp(static_cast<Acc>(row[e]) - lse) : Acc(0);
}

/// Whether slot index e is a routed expert: slots outside [0, E) (-1: not chosen, or
/// corrupt) are skipped, as the kernels skip them.
inline bool routed(int32_t e, int experts) { return e >= 0 && e < experts; }

/// The chosen slots of a [T, K] row (routed ones), their weights recomputed as p / sum p.
template <class Acc>
Acc chosen_sum(const Acc* p, const int32_t* idx, int k, int experts) {
  Acc s = 0;
  for (int j = 0; j < k; ++j)
    if (routed(idx[j], experts)) s += p[idx[j]];
  return s;
}

/// dz (row of E, zeroed first) of sum_j w_j dw_j with w = p / sum(p chosen).
template <class T, class Acc>
void renormalised_backward(const Acc* p, const int32_t* idx, const Acc* dw, int k, int experts, T* dz) {
  namespace vd = variants::detail;
  for (int e = 0; e < experts; ++e) dz[e] = static_cast<T>(Acc(0));
  const Acc inv = Acc(1) / chosen_sum(p, idx, k, experts);
  Acc w_dot = 0;
  for (int j = 0; j < k; ++j)
    if (routed(idx[j], experts)) w_dot += p[idx[j]] * inv * dw[j];
  for (int j = 0; j < k; ++j)
    if (routed(idx[j], experts))
      dz[idx[j]] = static_cast<T>(vd::renormalised_softmax_grad(p[idx[j]] * inv, dw[j], w_dot));
}

/// dz (row of E) of sum_j w_j dw_j with w = p (the chosen probabilities themselves), p the
/// softmax over the allowed experts (allowed empty: all): dz = p (gp - <p, gp>) on the
/// allowed experts, 0 elsewhere, gp = dw on the chosen.
template <class T, class Acc>
void chosen_softmax_backward(const Acc* p, const int32_t* idx, const Acc* dw, int k, int experts,
                             const std::vector<char>& allowed, T* dz) {
  std::vector<Acc> gp(experts, Acc(0));
  Acc dot = 0;
  for (int j = 0; j < k; ++j)
    if (routed(idx[j], experts)) {
      gp[idx[j]] = dw[j];
      dot += p[idx[j]] * dw[j];
    }
  for (int e = 0; e < experts; ++e)
    dz[e] = static_cast<T>((allowed.empty() || allowed[e]) ? router::detail::softmax_grad(p[e], gp[e], dot, Acc(0))
                                                            : Acc(0));
}

/// experts_per_token[t] = the number of experts that chose token t (row_map[t, e] >= 0).
template <class Count>
void count_experts_per_token(const int64_t* row_map, int64_t tokens, int experts, Count* experts_per_token) {
  for (int64_t t = 0; t < tokens; ++t) {
    Count n = 0;
    for (int e = 0; e < experts; ++e) n += row_map[t * experts + e] >= 0;
    experts_per_token[t] = n;
  }
}

}  // namespace detail

// ---- top-p ------------------------------------------------------------------------------

template <class T, class Acc>
Status topp_forward(const TopPForwardParams<T, Acc>& p) {
  MOXE_RETURN_IF_ERROR(validate(p));
  const int E = p.dims.experts, K = p.dims.max_k;
  std::vector<Acc> prob(E), sorted(K);
  std::vector<int32_t> idx(K);
  int64_t total = 0;
  for (int64_t t = 0; t < p.dims.tokens; ++t) {
    detail::masked_softmax(p.logits + t * E, E, {}, prob.data());
    router::reference::detail::select_topk(prob.data(), E, K, std::vector<char>{}, idx.data());
    for (int j = 0; j < K; ++j) sorted[j] = prob[idx[j]];
    const int n = variants::detail::topp_count(sorted.data(), K, p.top_p);
    Acc sum = 0;
    for (int j = 0; j < n; ++j) sum += sorted[j];
    for (int j = 0; j < K; ++j) {
      const bool used = j < n;
      p.topk_idx[t * K + j] = used ? idx[j] : -1;
      if (p.topk_prob) p.topk_prob[t * K + j] = used ? sorted[j] : Acc(0);
      p.topk_weight[t * K + j] = used ? (p.renormalize ? sorted[j] / sum : sorted[j]) : Acc(0);
    }
    if (p.expert_count) p.expert_count[t] = n;
    total += n;
  }
  if (p.total_count) *p.total_count = total;
  return Status::ok;
}

template <class T, class Acc>
Status topp_backward(const TopPBackwardParams<T, Acc>& b) {
  MOXE_RETURN_IF_ERROR(validate(b));
  const int E = b.fwd.dims.experts, K = b.fwd.dims.max_k;
  std::vector<Acc> prob(E);
  for (int64_t t = 0; t < b.fwd.dims.tokens; ++t) {
    detail::masked_softmax(b.fwd.logits + t * E, E, {}, prob.data());
    if (b.fwd.renormalize)
      detail::renormalised_backward(prob.data(), b.fwd.topk_idx + t * K, b.dweight + t * K, K, E, b.dlogits + t * E);
    else
      detail::chosen_softmax_backward(prob.data(), b.fwd.topk_idx + t * K, b.dweight + t * K, K, E, {},
                                      b.dlogits + t * E);
  }
  return Status::ok;
}

// ---- expert choice ------------------------------------------------------------------------

template <class T, class Acc>
Status expert_choice_forward(const ExpertChoiceForwardParams<T, Acc>& p) {
  MOXE_RETURN_IF_ERROR(validate(p));
  const int64_t T_ = p.dims.tokens, C = effective_capacity(p.dims);
  const int E = p.dims.experts;
  std::vector<Acc> s(T_ * E);
  for (int64_t t = 0; t < T_; ++t) detail::masked_softmax(p.logits + t * E, E, {}, s.data() + t * E);
  for (int64_t i = 0; i < T_ * E; ++i) {
    p.row_map[i] = -1;
    p.token_weight[i] = Acc(0);
    if (p.scores) p.scores[i] = s[i];
  }
  std::vector<int64_t> order(T_);
  for (int e = 0; e < E; ++e) {
    std::iota(order.begin(), order.end(), int64_t(0));
    std::partial_sort(order.begin(), order.begin() + C, order.end(), [&](int64_t a, int64_t b) {
      const Acc va = s[a * E + e], vb = s[b * E + e];
      return va > vb || (va == vb && a < b);
    });
    std::sort(order.begin(), order.begin() + C);  // the expert's list in token order
    for (int64_t j = 0; j < C; ++j) {
      const int64_t t = order[j];
      p.expert_tokens[e * C + j] = static_cast<int32_t>(t);
      if (p.expert_weights) p.expert_weights[e * C + j] = s[t * E + e];
      p.row_map[t * E + e] = e * C + j;
      p.token_weight[t * E + e] = s[t * E + e];
    }
    if (p.expert_offsets) p.expert_offsets[e] = e * C;
  }
  if (p.expert_offsets) p.expert_offsets[E] = E * C;
  if (p.experts_per_token) detail::count_experts_per_token(p.row_map, T_, E, p.experts_per_token);
  return Status::ok;
}

template <class T, class Acc>
Status expert_choice_backward(const ExpertChoiceBackwardParams<T, Acc>& b) {
  MOXE_RETURN_IF_ERROR(validate(b));
  const int E = b.fwd.dims.experts;
  std::vector<Acc> s(E), gp(E);
  for (int64_t t = 0; t < b.fwd.dims.tokens; ++t) {
    detail::masked_softmax(b.fwd.logits + t * E, E, {}, s.data());
    Acc dot = 0;
    for (int e = 0; e < E; ++e) {
      gp[e] = b.fwd.row_map[t * E + e] >= 0 ? b.dweight[t * E + e] : Acc(0);
      dot += s[e] * gp[e];
    }
    for (int e = 0; e < E; ++e)
      b.dlogits[t * E + e] = static_cast<T>(router::detail::softmax_grad(s[e], gp[e], dot, Acc(0)));
  }
  return Status::ok;
}

// ---- group-restricted expert choice ---------------------------------------------------------

namespace detail {

/// Each expert's pool (expert_pool) and its rows [offsets[e], offsets[e+1]) (pool_capacity
/// from the tokens and experts of its pool): the layout the device makes too.
struct GroupChoiceLayout {
  std::vector<int32_t> pool;
  std::vector<int64_t> offsets;
};

inline GroupChoiceLayout group_choice_layout(const GroupExpertChoiceDims& d, const int32_t* group_id,
                                             const int32_t* group_offsets) {
  namespace vd = variants::detail;
  const int E = d.experts, G = d.num_groups;
  GroupChoiceLayout l{std::vector<int32_t>(E), std::vector<int64_t>(E + 1, 0)};
  std::vector<int64_t> group_tokens(G, 0);
  std::vector<int> group_experts(G, 0);
  int shared_experts = 0;
  for (int64_t t = 0; t < d.tokens; ++t)
    if (group_id[t] >= 0 && group_id[t] < G) ++group_tokens[group_id[t]];
  for (int e = 0; e < E; ++e) {
    l.pool[e] = vd::expert_pool(group_offsets, G, E, d.shared_begin, d.shared_end, e);
    if (l.pool[e] == vd::kSharedPool) ++shared_experts;
    if (l.pool[e] >= 0) ++group_experts[l.pool[e]];
  }
  for (int e = 0; e < E; ++e) {
    const int32_t pool = l.pool[e];
    const int64_t n = pool == vd::kSharedPool ? d.tokens : pool >= 0 ? group_tokens[pool] : 0;
    const int experts = pool == vd::kSharedPool ? shared_experts : pool >= 0 ? group_experts[pool] : 0;
    l.offsets[e + 1] = l.offsets[e] + vd::pool_capacity(n, experts, d.capacity, d.capacity_factor, d.top_k);
  }
  return l;
}

/// Token t's scores: s = sigmoid(z) or the softmax of z over the experts whose pool sees
/// the token (seen), 0 for the others; seen is filled too.
template <class T, class Acc>
void choice_scores(const T* row, int experts, ChoiceScore score, const std::vector<int32_t>& pool, int32_t group,
                   std::vector<char>& seen, Acc* s) {
  bool any = false;
  for (int e = 0; e < experts; ++e) {
    seen[e] = variants::detail::pool_sees(pool[e], group) ? 1 : 0;
    any = any || seen[e];
  }
  if (score == ChoiceScore::softmax && any) {
    masked_softmax(row, experts, seen, s);
    return;
  }
  for (int e = 0; e < experts; ++e)
    s[e] = seen[e] ? math::sigmoid(static_cast<Acc>(row[e])) : Acc(0);
}

/// Selection order of expert choice: larger score first (NaN as -inf), then lower token.
template <class Acc>
bool chosen_before(Acc a, int64_t ta, Acc b, int64_t tb) {
  const Acc ka = a != a ? -math::infinity<Acc>() : a, kb = b != b ? -math::infinity<Acc>() : b;
  return ka > kb || (ka == kb && ta < tb);
}

}  // namespace detail

template <class T, class Acc>
Status group_expert_choice_forward(const GroupExpertChoiceForwardParams<T, Acc>& p) {
  MOXE_RETURN_IF_ERROR(validate(p));
  MOXE_RETURN_IF_ERROR(validate_group_offsets(p.group_offsets, p.dims.num_groups, p.dims.experts));
  const int64_t T_ = p.dims.tokens;
  const int E = p.dims.experts;
  const auto layout = detail::group_choice_layout(p.dims, p.group_id, p.group_offsets);
  std::vector<Acc> s(T_ * E);
  std::vector<char> seen(T_ * E), row_seen(E);
  for (int64_t t = 0; t < T_; ++t) {
    detail::choice_scores(p.logits + t * E, E, p.score, layout.pool, p.group_id[t], row_seen, s.data() + t * E);
    std::copy(row_seen.begin(), row_seen.end(), seen.begin() + t * E);
  }
  for (int64_t i = 0; i < T_ * E; ++i) {
    p.row_map[i] = -1;
    p.token_weight[i] = Acc(0);
    if (p.scores) p.scores[i] = s[i];
  }
  std::vector<int64_t> candidates;
  for (int e = 0; e < E; ++e) {
    const int64_t base = layout.offsets[e], C = layout.offsets[e + 1] - base;
    candidates.clear();
    for (int64_t t = 0; t < T_; ++t)
      if (seen[t * E + e]) candidates.push_back(t);
    std::partial_sort(candidates.begin(), candidates.begin() + C, candidates.end(), [&](int64_t a, int64_t b) {
      return detail::chosen_before(s[a * E + e], a, s[b * E + e], b);
    });
    std::sort(candidates.begin(), candidates.begin() + C);  // the expert's list in token order
    for (int64_t j = 0; j < C; ++j) {
      const int64_t t = candidates[j];
      p.expert_tokens[base + j] = static_cast<int32_t>(t);
      if (p.expert_weights) p.expert_weights[base + j] = s[t * E + e];
      p.row_map[t * E + e] = base + j;
      p.token_weight[t * E + e] = s[t * E + e];
    }
  }
  std::copy(layout.offsets.begin(), layout.offsets.end(), p.expert_offsets);
  if (p.experts_per_token) detail::count_experts_per_token(p.row_map, T_, E, p.experts_per_token);
  return Status::ok;
}

template <class T, class Acc>
Status group_expert_choice_backward(const GroupExpertChoiceBackwardParams<T, Acc>& b) {
  MOXE_RETURN_IF_ERROR(validate(b));
  const auto& p = b.fwd;
  MOXE_RETURN_IF_ERROR(validate_group_offsets(p.group_offsets, p.dims.num_groups, p.dims.experts));
  const int E = p.dims.experts;
  const auto layout = detail::group_choice_layout(p.dims, p.group_id, p.group_offsets);
  std::vector<Acc> s(E), gp(E);
  std::vector<char> seen(E);
  for (int64_t t = 0; t < p.dims.tokens; ++t) {
    detail::choice_scores(p.logits + t * E, E, p.score, layout.pool, p.group_id[t], seen, s.data());
    const int64_t* chosen = p.row_map + t * E;
    const Acc* dw = b.dweight + t * E;
    T* dz = b.dlogits + t * E;
    if (p.score == ChoiceScore::sigmoid) {  // each pair on its own: the row map alone decides
      for (int e = 0; e < E; ++e) {  // sigmoid'(z) from z: exact for the large logits chosen
        const Acc ds = math::sigmoid_grad(static_cast<Acc>(p.logits[t * E + e]));
        dz[e] = static_cast<T>(chosen[e] >= 0 ? dw[e] * ds : Acc(0));
      }
      continue;
    }
    Acc dot = 0;
    for (int e = 0; e < E; ++e) {
      gp[e] = seen[e] && chosen[e] >= 0 ? dw[e] : Acc(0);
      dot += s[e] * gp[e];
    }
    for (int e = 0; e < E; ++e)
      dz[e] = static_cast<T>(seen[e] ? router::detail::softmax_grad(s[e], gp[e], dot, Acc(0)) : Acc(0));
  }
  return Status::ok;
}

// ---- group-restricted ---------------------------------------------------------------------

namespace detail {
inline std::vector<char> allowed_experts(const GroupRestrictedDims& d, const int32_t* offsets, int32_t g) {
  int lo, hi;
  variants::detail::group_range(offsets, d.num_groups, d.experts, g, lo, hi);
  std::vector<char> a(d.experts);
  for (int e = 0; e < d.experts; ++e)
    a[e] = variants::detail::expert_allowed(e, lo, hi, d.shared_begin, d.shared_end) ? 1 : 0;
  return a;
}
/// The allowed experts left by the group limit (all of `allowed` without one).
template <class Acc>
std::vector<char> limit_groups(const GroupRestrictedDims& d, const Acc* prob, const std::vector<char>& allowed) {
  if (d.n_groups <= 1 || d.topk_groups >= d.n_groups) return allowed;
  const int size = d.experts / d.n_groups;
  std::vector<Acc> score(d.n_groups);
  for (int g = 0; g < d.n_groups; ++g) {
    router::detail::Top2<Acc> t2;
    int count = 0;
    for (int e = g * size; e < (g + 1) * size; ++e)
      if (allowed[e]) {
        t2.add(prob[e]);
        ++count;
      }
    score[g] = variants::detail::allowed_group_score(t2.first, t2.second, count);
  }
  std::vector<int32_t> kept(d.topk_groups);
  router::reference::detail::select_topk(score.data(), d.n_groups, d.topk_groups, std::vector<char>{}, kept.data());
  std::vector<char> out(d.experts, 0);
  for (int32_t g : kept)
    for (int e = g * size; e < (g + 1) * size; ++e) out[e] = allowed[e];
  return out;
}

}  // namespace detail

template <class T, class Acc>
Status group_restricted_forward(const GroupRestrictedForwardParams<T, Acc>& p) {
  MOXE_RETURN_IF_ERROR(validate(p));
  MOXE_RETURN_IF_ERROR(validate_group_offsets(p.group_offsets, p.dims.num_groups, p.dims.experts));
  const int E = p.dims.experts, K = p.dims.top_k;
  std::vector<Acc> prob(E);
  std::vector<int32_t> idx(K);
  for (int64_t t = 0; t < p.dims.tokens; ++t) {
    const auto allowed = detail::allowed_experts(p.dims, p.group_offsets, p.group_id[t]);
    const int n_allowed = static_cast<int>(std::count(allowed.begin(), allowed.end(), char(1)));
    if (n_allowed > 0) detail::masked_softmax(p.logits + t * E, E, allowed, prob.data());
    const auto selectable = detail::limit_groups(p.dims, prob.data(), allowed);
    const int n = std::min(K, static_cast<int>(std::count(selectable.begin(), selectable.end(), char(1))));
    if (n > 0) router::reference::detail::select_topk(prob.data(), E, n, selectable, idx.data());
    Acc sum = 0;
    for (int j = 0; j < n; ++j) sum += prob[idx[j]];
    for (int j = 0; j < K; ++j) {
      const bool used = j < n;
      p.topk_idx[t * K + j] = used ? idx[j] : -1;
      if (p.topk_prob) p.topk_prob[t * K + j] = used ? prob[idx[j]] : Acc(0);
      p.topk_weight[t * K + j] = used ? (p.renormalize ? prob[idx[j]] / sum : prob[idx[j]]) : Acc(0);
    }
  }
  return Status::ok;
}

template <class T, class Acc>
Status group_restricted_backward(const GroupRestrictedBackwardParams<T, Acc>& b) {
  MOXE_RETURN_IF_ERROR(validate(b));
  const auto& p = b.fwd;
  MOXE_RETURN_IF_ERROR(validate_group_offsets(p.group_offsets, p.dims.num_groups, p.dims.experts));
  const int E = p.dims.experts, K = p.dims.top_k;
  std::vector<Acc> prob(E);
  for (int64_t t = 0; t < p.dims.tokens; ++t) {
    const auto allowed = detail::allowed_experts(p.dims, p.group_offsets, p.group_id[t]);
    const int32_t* idx = p.topk_idx + t * K;
    const Acc* dw = b.dweight + t * K;
    T* dz = b.dlogits + t * E;
    if (std::count(allowed.begin(), allowed.end(), char(1)) == 0) {
      for (int e = 0; e < E; ++e) dz[e] = static_cast<T>(Acc(0));
      continue;
    }
    detail::masked_softmax(p.logits + t * E, E, allowed, prob.data());
    if (p.renormalize)
      detail::renormalised_backward(prob.data(), idx, dw, K, E, dz);
    else
      detail::chosen_softmax_backward(prob.data(), idx, dw, K, E, allowed, dz);
  }
  return Status::ok;
}

// ---- sigmoid with selection bias ----------------------------------------------------------

template <class T, class Acc>
Status sigmoid_bias_forward(const SigmoidBiasForwardParams<T, Acc>& p) {
  namespace vd = variants::detail;
  MOXE_RETURN_IF_ERROR(validate(p));
  const int E = p.dims.experts, K = p.dims.top_k;
  const TopKDims tk{p.dims.tokens, E, K, p.dims.n_groups, p.dims.topk_groups};
  std::vector<Acc> s(E), sel(E);
  std::vector<int32_t> idx(K), counts(E, 0);
  for (int64_t t = 0; t < p.dims.tokens; ++t) {
    for (int e = 0; e < E; ++e) {
      s[e] = math::sigmoid(static_cast<Acc>(p.logits[t * E + e]));
      sel[e] = s[e] + (p.bias ? p.bias[e] : Acc(0));
    }
    router::reference::detail::select_topk(sel.data(), E, K, router::reference::detail::group_mask(sel.data(), tk),
                                           idx.data());
    Acc sum = 0;
    for (int j = 0; j < K; ++j) sum += s[idx[j]];
    const Acc inv = Acc(1) / sum;
    for (int j = 0; j < K; ++j) {
      p.topk_idx[t * K + j] = idx[j];
      if (p.topk_score) p.topk_score[t * K + j] = s[idx[j]];
      p.topk_weight[t * K + j] = vd::sigmoid_weight(s[idx[j]], inv, p.routed_scaling, p.renormalize);
      counts[idx[j]] += 1;
    }
  }
  if (p.expert_counts)
    for (int e = 0; e < E; ++e) p.expert_counts[e] = counts[e];
  return Status::ok;
}

template <class T, class Acc>
Status sigmoid_bias_backward(const SigmoidBiasBackwardParams<T, Acc>& b) {
  namespace vd = variants::detail;
  MOXE_RETURN_IF_ERROR(validate(b));
  const auto& p = b.fwd;
  const int E = p.dims.experts, K = p.dims.top_k;
  for (int64_t t = 0; t < p.dims.tokens; ++t) {
    const int32_t* idx = p.topk_idx + t * K;
    const Acc* dw = b.dweight + t * K;
    T* dz = b.dlogits + t * E;
    for (int e = 0; e < E; ++e) dz[e] = static_cast<T>(Acc(0));
    Acc sum = 0;
    for (int j = 0; j < K; ++j)
      if (detail::routed(idx[j], E)) sum += math::sigmoid(static_cast<Acc>(p.logits[t * E + idx[j]]));
    const Acc inv = Acc(1) / sum;
    Acc u_dot = 0;
    for (int j = 0; j < K; ++j)
      if (detail::routed(idx[j], E)) u_dot += math::sigmoid(static_cast<Acc>(p.logits[t * E + idx[j]])) * inv * dw[j];
    for (int j = 0; j < K; ++j) {
      if (!detail::routed(idx[j], E)) continue;
      const Acc z = static_cast<Acc>(p.logits[t * E + idx[j]]);
      dz[idx[j]] = static_cast<T>(vd::sigmoid_weight_grad(z, dw[j], u_dot, inv, p.routed_scaling, p.renormalize));
    }
  }
  return Status::ok;
}

template <class Acc>
Status bias_update(const BiasUpdateParams<Acc>& p) {
  MOXE_RETURN_IF_ERROR(validate(p));
  int64_t total = 0;
  for (int e = 0; e < p.experts; ++e) total += p.expert_counts[e];
  for (int e = 0; e < p.experts; ++e) p.bias[e] += variants::detail::bias_step(total, p.experts, int64_t(p.expert_counts[e]), p.rate);
  return Status::ok;
}

}  // namespace moxe::router::variants::reference
