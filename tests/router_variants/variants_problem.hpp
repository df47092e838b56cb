// Shared host fixtures of the routing-variant tests: one problem per variant in double
// (inputs, outputs of the last forward, the scalar objective sum(weight * dweight) that a
// gradient check differentiates) and a guard that redraws inputs near a selection change.
#pragma once

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "moxe/router/variants/reference.hpp"
#include "test_utils.hpp"

namespace moxe::test::variants {

namespace rv = moxe::router::variants;
namespace rvr = moxe::router::variants::reference;

/// Gap below which a selection is considered too close to flip under a finite difference.
inline constexpr double kTieMargin = 1e-4;

/// True when some pair among the values is closer than the margin (sorted descending).
inline bool has_close_pair(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  for (size_t i = 1; i < v.size(); ++i)
    if (v[i] - v[i - 1] < kTieMargin) return true;
  return false;
}

inline std::vector<double> softmax_row(const double* z, int E) {
  double m = z[0];
  for (int e = 1; e < E; ++e) m = std::max(m, z[e]);
  std::vector<double> p(E);
  double s = 0;
  for (int e = 0; e < E; ++e) s += (p[e] = std::exp(z[e] - m));
  for (auto& x : p) x /= s;
  return p;
}

struct TopPProblem {
  rv::TopPDims dims;
  double top_p;
  bool renormalize = false;
  std::vector<double> logits, dweight, topk_prob, topk_weight;
  std::vector<int32_t> topk_idx, expert_count;
  int64_t total = 0;

  TopPProblem(Rng& rng, int64_t T, int E, int max_k, double p, bool renorm = false, double scale = 1.5)
      : dims{T, E, max_k}, top_p(p), renormalize(renorm) {
    logits = normal_vector<double>(rng, T * E, scale);
    dweight = uniform_vector<double>(rng, T * max_k);
  }
  rv::TopPForwardParams<double, double> params() {
    topk_idx.assign(dims.tokens * dims.max_k, 0);
    topk_prob.assign(topk_idx.size(), 0);
    topk_weight.assign(topk_idx.size(), 0);
    expert_count.assign(dims.tokens, 0);
    rv::TopPForwardParams<double, double> p{dims, logits.data(), top_p, topk_idx.data(), topk_prob.data(),
                                            topk_weight.data(), expert_count.data(), &total};
    p.renormalize = renormalize;
    return p;
  }
  Status forward() { return rvr::topp_forward(params()); }
  double objective() {
    forward();
    return dot(topk_weight, dweight);
  }
  /// Near a tie of probabilities or a cumulative sum near top_p.
  bool near_tie() const {
    const int E = dims.experts;
    for (int64_t t = 0; t < dims.tokens; ++t) {
      auto p = softmax_row(logits.data() + t * E, E);
      if (has_close_pair(p)) return true;
      std::sort(p.rbegin(), p.rend());
      double cum = 0;
      for (int j = 0; j < dims.max_k; ++j) {
        cum += p[j];
        if (std::abs(cum - top_p) < kTieMargin) return true;
      }
    }
    return false;
  }
};

struct ExpertChoiceProblem {
  rv::ExpertChoiceDims dims;
  std::vector<double> logits, dweight, scores, expert_weights, token_weight;
  std::vector<int32_t> expert_tokens, experts_per_token;
  std::vector<int64_t> row_map, expert_offsets;

  ExpertChoiceProblem(Rng& rng, int64_t T, int E, int64_t C, double scale = 1.5) : dims{T, E, C} {
    logits = normal_vector<double>(rng, T * E, scale);
    dweight = uniform_vector<double>(rng, T * E);
  }
  int64_t capacity() const { return rv::effective_capacity(dims); }
  rv::ExpertChoiceForwardParams<double, double> params() {
    const int64_t T = dims.tokens, C = capacity();
    const int E = dims.experts;
    scores.assign(T * E, 0);
    expert_tokens.assign(E * C, 0);
    expert_weights.assign(E * C, 0);
    row_map.assign(T * E, 0);
    token_weight.assign(T * E, 0);
    expert_offsets.assign(E + 1, 0);
    experts_per_token.assign(T, 0);
    return {dims,           logits.data(),        scores.data(),       expert_tokens.data(), expert_weights.data(),
            row_map.data(), token_weight.data(), expert_offsets.data(), experts_per_token.data()};
  }
  Status forward() { return rvr::expert_choice_forward(params()); }
  double objective() {
    forward();
    return dot(token_weight, dweight);
  }
  /// The C-th and (C+1)-th scores of some expert are close.
  bool near_tie() const {
    const int E = dims.experts;
    const int64_t T = dims.tokens, C = capacity();
    if (C >= T) return false;
    std::vector<double> col(T);
    for (int e = 0; e < E; ++e) {
      for (int64_t t = 0; t < T; ++t) col[t] = softmax_row(logits.data() + t * E, E)[e];
      std::sort(col.rbegin(), col.rend());
      if (col[C - 1] - col[C] < kTieMargin) return true;
    }
    return false;
  }
};

struct GroupRestrictedProblem {
  rv::GroupRestrictedDims dims;
  bool renormalize = true;
  std::vector<double> logits, dweight, topk_prob, topk_weight;
  std::vector<int32_t> group_id, group_offsets, topk_idx;

  GroupRestrictedProblem(Rng& rng, int64_t T, int E, int K, std::vector<int32_t> offsets, int shared_begin,
                         int shared_end, bool renorm = true, double scale = 1.5)
      : dims{T, E, K, static_cast<int>(offsets.size()) - 1, shared_begin, shared_end},
        renormalize(renorm),
        group_offsets(std::move(offsets)) {
    logits = normal_vector<double>(rng, T * E, scale);
    dweight = uniform_vector<double>(rng, T * K);
    group_id.resize(T);
    for (auto& g : group_id) g = static_cast<int32_t>(rng.integer(0, dims.num_groups - 1));
  }
  rv::GroupRestrictedForwardParams<double, double> params() {
    topk_idx.assign(dims.tokens * dims.top_k, 0);
    topk_prob.assign(topk_idx.size(), 0);
    topk_weight.assign(topk_idx.size(), 0);
    return {dims,        logits.data(),   group_id.data(),  group_offsets.data(), renormalize,
            topk_idx.data(), topk_prob.data(), topk_weight.data()};
  }
  Status forward() { return rvr::group_restricted_forward(params()); }
  double objective() {
    forward();
    return dot(topk_weight, dweight);
  }
  std::vector<char> allowed(int64_t t) const {
    return rvr::detail::allowed_experts(dims, group_offsets.data(), group_id[t]);
  }
  /// The group limit's scores of token t's groups that hold an allowed expert.
  std::vector<double> group_scores(int64_t t) const {
    const int E = dims.experts, size = E / dims.n_groups;
    const auto a = allowed(t);
    std::vector<double> p(E), scores;
    rvr::detail::masked_softmax(logits.data() + t * E, E, a, p.data());
    for (int g = 0; g < dims.n_groups; ++g) {
      moxe::router::detail::Top2<double> t2;
      int count = 0;
      for (int e = g * size; e < (g + 1) * size; ++e)
        if (a[e]) {
          t2.add(p[e]);
          ++count;
        }
      if (count > 0) scores.push_back(moxe::router::variants::detail::allowed_group_score(t2.first, t2.second, count));
    }
    return scores;
  }
  bool near_tie() const {
    const int E = dims.experts;
    for (int64_t t = 0; t < dims.tokens; ++t) {
      const auto a = allowed(t);
      std::vector<double> z;
      for (int e = 0; e < E; ++e)
        if (a[e]) z.push_back(logits[t * E + e]);
      if (has_close_pair(z)) return true;  // softmax is monotone: logit gaps suffice
      if (dims.n_groups > 1 && dims.topk_groups < dims.n_groups && has_close_pair(group_scores(t))) return true;
    }
    return false;
  }
};

struct GroupExpertChoiceProblem {
  rv::GroupExpertChoiceDims dims;
  rv::ChoiceScore score;
  std::vector<double> logits, dweight, scores, expert_weights, token_weight;
  std::vector<int32_t> group_id, group_offsets, expert_tokens, experts_per_token;
  std::vector<int64_t> row_map, expert_offsets;

  /// Group ids drawn uniformly from [0, num_groups) (callers overwrite some).
  GroupExpertChoiceProblem(Rng& rng, int64_t T, int E, std::vector<int32_t> offsets, int shared_begin, int shared_end,
                           rv::ChoiceScore s, int64_t capacity = 0, double capacity_factor = 1.0, int top_k = 1,
                           double scale = 1.5)
      : dims{T, E, static_cast<int>(offsets.size()) - 1, shared_begin, shared_end, capacity, capacity_factor, top_k},
        score(s),
        group_offsets(std::move(offsets)) {
    logits = normal_vector<double>(rng, T * E, scale);
    dweight = uniform_vector<double>(rng, T * E);
    group_id.resize(T);
    for (auto& g : group_id) g = static_cast<int32_t>(rng.integer(0, dims.num_groups - 1));
  }
  int64_t max_rows() const { return rv::group_expert_choice_max_rows(dims); }
  rv::GroupExpertChoiceForwardParams<double, double> params() {
    const int64_t T = dims.tokens;
    const int E = dims.experts;
    scores.assign(T * E, 0);
    expert_tokens.assign(max_rows(), -1);
    expert_weights.assign(max_rows(), 0);
    row_map.assign(T * E, 0);
    token_weight.assign(T * E, 0);
    expert_offsets.assign(E + 1, 0);
    experts_per_token.assign(T, 0);
    return {dims,          logits.data(),        group_id.data(),       group_offsets.data(),
            score,         scores.data(),        expert_tokens.data(),  expert_weights.data(),
            row_map.data(), token_weight.data(), expert_offsets.data(), experts_per_token.data()};
  }
  Status forward() { return rvr::group_expert_choice_forward(params()); }
  double objective() {
    forward();
    return dot(token_weight, dweight);
  }
  std::vector<int32_t> pools() const {
    return rvr::detail::group_choice_layout(dims, group_id.data(), group_offsets.data()).pool;
  }
  /// Expert e's candidates (the tokens its pool sees) in the reference's selection order.
  std::vector<int64_t> ranked_candidates(int e) const {
    const auto pool = pools();
    std::vector<int64_t> c;
    for (int64_t t = 0; t < dims.tokens; ++t)
      if (moxe::router::variants::detail::pool_sees(pool[e], group_id[t])) c.push_back(t);
    std::stable_sort(c.begin(), c.end(), [&](int64_t a, int64_t b) {
      return scores[a * dims.experts + e] > scores[b * dims.experts + e];
    });
    return c;
  }
  /// Some expert's C-th and (C+1)-th candidate scores are close (after a forward).
  bool near_tie() {
    forward();
    for (int e = 0; e < dims.experts; ++e) {
      const auto c = ranked_candidates(e);
      const int64_t C = expert_offsets[e + 1] - expert_offsets[e];
      if (C > 0 && C < int64_t(c.size()) &&
          scores[c[C - 1] * dims.experts + e] - scores[c[C] * dims.experts + e] < kTieMargin)
        return true;
    }
    return false;
  }
};

struct SigmoidBiasProblem {
  rv::SigmoidBiasDims dims;
  double routed_scaling = 2.5;
  bool renormalize = true;
  std::vector<double> logits, bias, dweight, topk_score, topk_weight;
  std::vector<int32_t> topk_idx, expert_counts;

  SigmoidBiasProblem(Rng& rng, int64_t T, int E, int K, int n_groups = 1, int topk_groups = 1, bool renorm = true,
                     double scale = 1.5)
      : dims{T, E, K, n_groups, topk_groups}, renormalize(renorm) {
    logits = normal_vector<double>(rng, T * E, scale);
    bias = uniform_vector<double>(rng, E, -0.2, 0.2);
    dweight = uniform_vector<double>(rng, T * K);
  }
  rv::SigmoidBiasForwardParams<double, double> params() {
    topk_idx.assign(dims.tokens * dims.top_k, 0);
    topk_score.assign(topk_idx.size(), 0);
    topk_weight.assign(topk_idx.size(), 0);
    expert_counts.assign(dims.experts, 0);
    return {dims,           logits.data(),     bias.data(),        routed_scaling,      renormalize,
            topk_idx.data(), topk_score.data(), topk_weight.data(), expert_counts.data()};
  }
  Status forward() { return rvr::sigmoid_bias_forward(params()); }
  double objective() {
    forward();
    return dot(topk_weight, dweight);
  }
  /// Selection scores s + bias of token t.
  std::vector<double> keys(int64_t t) const {
    const int E = dims.experts;
    std::vector<double> sel(E);
    for (int e = 0; e < E; ++e) sel[e] = 1.0 / (1.0 + std::exp(-logits[t * E + e])) + bias[e];
    return sel;
  }
  /// The group limit's scores (top-2 sums) of the selection scores.
  std::vector<double> group_scores(const std::vector<double>& sel) const {
    const int G = dims.n_groups, size = dims.experts / G;
    std::vector<double> gs(G);
    for (int g = 0; g < G; ++g) {
      moxe::router::detail::Top2<double> t2;
      for (int e = g * size; e < (g + 1) * size; ++e) t2.add(sel[e]);
      gs[g] = t2.group_score(size);
    }
    return gs;
  }
  /// Close selection scores s + bias, or close group scores.
  bool near_tie() const {
    for (int64_t t = 0; t < dims.tokens; ++t) {
      const auto sel = keys(t);
      if (has_close_pair(sel)) return true;
      if (dims.n_groups > 1 && has_close_pair(group_scores(sel))) return true;
    }
    return false;
  }
};

/// Redraw a problem until no selection is near a change.
template <class P, class Make>
P draw_away_from_ties(Make make) {
  P p = make();
  for (int i = 0; i < 1000 && p.near_tie(); ++i) p = make();
  return p;
}

}  // namespace moxe::test::variants
