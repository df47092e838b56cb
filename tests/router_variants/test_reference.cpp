// Host tests of the routing-variant references: every gradient against central finite
// differences (double, inputs redrawn away from selection changes), the defining
// properties of each selection rule, dispatch compatibility, and argument checking.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <cstring>
#include <set>

#include "moxe/dispatch/reference.hpp"
#include "test_utils.hpp"
#include "variants_problem.hpp"

using moxe::Status;
namespace mt = moxe::test;
namespace mv = moxe::test::variants;
namespace rv = moxe::router::variants;
namespace rvr = moxe::router::variants::reference;

namespace {

constexpr double kFdTolerance = 1e-6;  // central differences at h = 1e-6 on O(1) values

/// ||analytic - fd|| / max(||fd||, 1): relative for O(1) gradients, absolute for the
/// vanishing ones (k = 1 with renormalisation: the weight is a constant up to rounding).
template <class P>
double fd_error(P& prob, const std::vector<double>& analytic) {
  auto f = [&] { return prob.objective(); };
  const auto fd = mt::finite_difference(f, prob.logits);
  double num = 0, den = 0;
  for (size_t i = 0; i < fd.size(); ++i) {
    num += (analytic[i] - fd[i]) * (analytic[i] - fd[i]);
    den += fd[i] * fd[i];
  }
  return std::sqrt(num) / std::max(std::sqrt(den), 1.0);
}

}  // namespace

// ---- top-p ------------------------------------------------------------------------------

TEST_CASE("top-p reference: gradient equals finite differences, weights p and renormalised") {
  const auto seed = mt::fresh_seed();
  INFO("seed " << seed);
  mt::Rng rng(seed);
  struct Case { int64_t T; int E, max_k; double p; };
  for (bool renorm : {false, true}) {
    CAPTURE(renorm);
    for (const Case c : {Case{5, 4, 4, 0.7}, Case{6, 8, 3, 0.5}, Case{4, 16, 8, 0.9}, Case{3, 33, 5, 0.3},
                         Case{1, 2, 1, 1.0}, Case{4, 8, 8, 1.0}, Case{1, 1, 1, 0.5}}) {
      CAPTURE(c.E);
      CAPTURE(c.max_k);
      CAPTURE(c.p);
      auto prob = mv::draw_away_from_ties<mv::TopPProblem>(
          [&] { return mv::TopPProblem(rng, c.T, c.E, c.max_k, c.p, renorm); });
      REQUIRE(prob.forward() == Status::ok);
      std::vector<double> dz(c.T * c.E, NAN);
      rv::TopPBackwardParams<double, double> b{prob.params(), prob.dweight.data(), dz.data()};
      REQUIRE(prob.forward() == Status::ok);
      REQUIRE(rvr::topp_backward(b) == Status::ok);
      REQUIRE(mt::all_finite(dz));
      CHECK(fd_error(prob, dz) < kFdTolerance);
    }
  }
}

TEST_CASE("top-p reference: the chosen set is minimal, reaches p, and is capped") {
  mt::Rng rng(mt::fresh_seed());
  for (bool renorm : {false, true})
    for (double top_p : {0.1, 0.5, 0.8, 0.95, 1.0})
      for (int E : {1, 2, 8, 64, 257}) {
        CAPTURE(renorm);
        const int max_k = std::min(E, 6);
        mv::TopPProblem prob(rng, 9, E, max_k, top_p, renorm, 2.0);
        REQUIRE(prob.forward() == Status::ok);
        int64_t total = 0;
        for (int64_t t = 0; t < 9; ++t) {
          auto sorted = mv::softmax_row(prob.logits.data() + t * E, E);
          std::sort(sorted.rbegin(), sorted.rend());
          const int n = prob.expert_count[t];
          total += n;
          REQUIRE(n >= 1);
          REQUIRE(n <= max_k);
          double cum = 0, wsum = 0;
          for (int j = 0; j < max_k; ++j) {
            const int32_t e = prob.topk_idx[t * max_k + j];
            if (j < n) {
              REQUIRE(e >= 0);
              CHECK(prob.topk_prob[t * max_k + j] == doctest::Approx(sorted[j]).epsilon(1e-12));
              cum += prob.topk_prob[t * max_k + j];
              wsum += prob.topk_weight[t * max_k + j];
              if (!renorm) CHECK(prob.topk_weight[t * max_k + j] == prob.topk_prob[t * max_k + j]);
              if (j + 1 < n) CHECK(cum < top_p);  // minimal: no shorter prefix reaches p
            } else {
              CHECK(e == -1);
              CHECK(prob.topk_weight[t * max_k + j] == 0.0);
              CHECK(prob.topk_prob[t * max_k + j] == 0.0);
            }
          }
          CHECK((cum >= top_p || n == max_k));
          CHECK(wsum == doctest::Approx(renorm ? 1.0 : cum).epsilon(1e-12));
        }
        CHECK(prob.total == total);
      }
  SUBCASE("ties go to the lower index; weights are p unless renormalised") {
    mv::TopPProblem prob(rng, 2, 8, 8, 0.3);
    std::fill(prob.logits.begin(), prob.logits.end(), 0.5);
    REQUIRE(prob.forward() == Status::ok);
    // p = 1/8 each: three experts reach 0.3 (0.375), lowest indices first
    CHECK(prob.expert_count[0] == 3);
    for (int j = 0; j < 3; ++j) {
      CHECK(prob.topk_idx[j] == j);
      CHECK(prob.topk_weight[j] == doctest::Approx(0.125).epsilon(1e-14));
    }
    CHECK(prob.topk_idx[3] == -1);
    prob.renormalize = true;
    REQUIRE(prob.forward() == Status::ok);
    for (int j = 0; j < 3; ++j) CHECK(prob.topk_weight[j] == doctest::Approx(1.0 / 3).epsilon(1e-14));
  }
  SUBCASE("the default follows the paper: weights are the raw probabilities") {
    const rv::TopPForwardParams<double, double> defaults{};
    CHECK_FALSE(defaults.renormalize);
  }
}

// ---- expert choice ------------------------------------------------------------------------

TEST_CASE("expert-choice reference: gradient equals finite differences") {
  const auto seed = mt::fresh_seed();
  INFO("seed " << seed);
  mt::Rng rng(seed);
  struct Case { int64_t T; int E; int64_t C; };
  for (const Case c : {Case{8, 4, 2}, Case{12, 8, 3}, Case{5, 3, 5}, Case{7, 16, 1}, Case{1, 4, 1}, Case{6, 2, 9}}) {
    CAPTURE(c.T);
    CAPTURE(c.E);
    CAPTURE(c.C);
    auto prob = mv::draw_away_from_ties<mv::ExpertChoiceProblem>(
        [&] { return mv::ExpertChoiceProblem(rng, c.T, c.E, c.C); });
    REQUIRE(prob.forward() == Status::ok);
    std::vector<double> dz(c.T * c.E, NAN);
    rv::ExpertChoiceBackwardParams<double, double> b{prob.params(), prob.dweight.data(), dz.data()};
    REQUIRE(prob.forward() == Status::ok);
    REQUIRE(rvr::expert_choice_backward(b) == Status::ok);
    REQUIRE(mt::all_finite(dz));
    CHECK(fd_error(prob, dz) < kFdTolerance);
  }
}

TEST_CASE("expert-choice reference: min(C, T) tokens per expert, top by score, ties to the lower token") {
  mt::Rng rng(mt::fresh_seed());
  for (int64_t T : {1, 5, 40})
    for (int E : {1, 4, 16})
      for (double cf : {0.5, 1.0, 2.0, 100.0}) {
        const int64_t C = rv::expert_choice_capacity(T, E, cf, 2);
        CAPTURE(T);
        CAPTURE(E);
        CAPTURE(C);
        mv::ExpertChoiceProblem prob(rng, T, E, C);
        // bf16-like grid: exact ties happen
        for (auto& z : prob.logits) z = std::round(z * 4) / 4;
        REQUIRE(prob.forward() == Status::ok);
        const int64_t Ce = std::min(C, T);
        REQUIRE(prob.capacity() == Ce);
        std::vector<int> per_token(T, 0);
        for (int e = 0; e < E; ++e) {
          CHECK(prob.expert_offsets[e] == e * Ce);
          std::vector<int64_t> all(T);
          std::iota(all.begin(), all.end(), int64_t(0));
          std::stable_sort(all.begin(), all.end(), [&](int64_t a, int64_t b) {
            return prob.scores[a * E + e] > prob.scores[b * E + e];
          });
          std::vector<int64_t> want(all.begin(), all.begin() + Ce);
          std::sort(want.begin(), want.end());
          for (int64_t j = 0; j < Ce; ++j) {
            const int32_t t = prob.expert_tokens[e * Ce + j];
            CHECK(t == want[j]);
            if (j > 0) CHECK(t > prob.expert_tokens[e * Ce + j - 1]);
            CHECK(prob.row_map[t * E + e] == e * Ce + j);
            CHECK(prob.expert_weights[e * Ce + j] == prob.scores[t * E + e]);
            CHECK(prob.token_weight[t * E + e] == prob.scores[t * E + e]);
            per_token[t] += 1;
          }
        }
        CHECK(prob.expert_offsets[E] == E * Ce);
        int64_t chosen = 0;
        for (int64_t i = 0; i < T * E; ++i) {
          chosen += prob.row_map[i] >= 0;
          if (prob.row_map[i] < 0) CHECK(prob.token_weight[i] == 0.0);
        }
        CHECK(chosen == E * Ce);
        for (int64_t t = 0; t < T; ++t) CHECK(prob.experts_per_token[t] == per_token[t]);
      }
  SUBCASE("all equal: every expert takes tokens 0..C-1") {
    mv::ExpertChoiceProblem prob(rng, 10, 4, 3);
    std::fill(prob.logits.begin(), prob.logits.end(), 1.0);
    REQUIRE(prob.forward() == Status::ok);
    for (int e = 0; e < 4; ++e)
      for (int j = 0; j < 3; ++j) CHECK(prob.expert_tokens[e * 3 + j] == j);
  }
}

TEST_CASE("expert-choice reference: the row map feeds dispatch unpermute with top_k = E") {
  mt::Rng rng(mt::fresh_seed());
  const int64_t T = 11, C = 4;
  const int E = 6, H = 5;
  mv::ExpertChoiceProblem prob(rng, T, E, C);
  REQUIRE(prob.forward() == Status::ok);
  const auto yp = mt::normal_vector<double>(rng, E * C * H);
  moxe::dispatch::Dims dd{T, H, E, E};
  std::vector<double> y(T * H, NAN);
  moxe::dispatch::UnpermuteParams<double, double> up{dd, yp.data(), prob.row_map.data(), prob.token_weight.data(),
                                                     y.data()};
  REQUIRE(moxe::dispatch::reference::unpermute(up) == Status::ok);
  std::vector<double> want(T * H, 0.0);
  for (int e = 0; e < E; ++e)
    for (int64_t j = 0; j < C; ++j) {
      const int32_t t = prob.expert_tokens[e * C + j];
      for (int h = 0; h < H; ++h) want[t * H + h] += prob.expert_weights[e * C + j] * yp[(e * C + j) * H + h];
    }
  CHECK(mt::rel_error(y, want) < 1e-12);
}

// ---- group-restricted expert choice ---------------------------------------------------------

namespace {

using GecProblem = mv::GroupExpertChoiceProblem;

/// A group-restricted expert-choice case: sizes, groups, capacity rule, and the group ids
/// of the first tokens (the rest drawn at random).
struct GecCase {
  int64_t T;
  int E;
  std::vector<int32_t> offsets;
  int sb, se;
  int64_t capacity;
  double factor;
  int top_k;
  std::vector<int32_t> first_groups;
};

GecProblem make_gec(mt::Rng& rng, const GecCase& c, rv::ChoiceScore score) {
  GecProblem p(rng, c.T, c.E, c.offsets, c.sb, c.se, score, c.capacity, c.factor, c.top_k);
  for (size_t i = 0; i < c.first_groups.size() && int64_t(i) < c.T; ++i) p.group_id[i] = c.first_groups[i];
  return p;
}

const std::vector<GecCase>& gec_cases() {
  static const std::vector<GecCase> cases{
      {9, 6, {0, 2, 4}, 4, 6, 0, 1.0, 1, {}},                  // two groups and a shared pool (MoMa + shared)
      {8, 7, {0, 3, 3, 5}, 0, 0, 2, 1.0, 1, {}},               // group 1 owns no expert; experts 5, 6 in no pool
      {5, 8, {0, 6, 8}, 0, 0, 0, 1.5, 2, {1, 0, 1, 1, 0}},      // group 0: 6 experts, 2 tokens
      {1, 3, {0, 3}, 0, 0, 0, 1.0, 1, {}},                     // one token
      {7, 5, {0, 2, 4}, 4, 5, 0, 1.0, 2, {-1, 0, 7, 0, 0, 0, 0}},  // no group / bad ids; group 1 has no token
  };
  return cases;
}

}  // namespace

TEST_CASE("group expert choice reference: gradient equals finite differences") {
  const auto seed = mt::fresh_seed();
  INFO("seed " << seed);
  mt::Rng rng(seed);
  for (auto score : {rv::ChoiceScore::sigmoid, rv::ChoiceScore::softmax})
    for (const GecCase& c : gec_cases()) {
      CAPTURE(int(score));
      CAPTURE(c.T);
      CAPTURE(c.E);
      auto prob = mv::draw_away_from_ties<GecProblem>([&] { return make_gec(rng, c, score); });
      REQUIRE(prob.forward() == Status::ok);
      std::vector<double> dz(c.T * c.E, NAN);
      rv::GroupExpertChoiceBackwardParams<double, double> b{prob.params(), prob.dweight.data(), dz.data()};
      REQUIRE(prob.forward() == Status::ok);
      REQUIRE(rvr::group_expert_choice_backward(b) == Status::ok);
      REQUIRE(mt::all_finite(dz));
      CHECK(fd_error(prob, dz) < kFdTolerance);
    }
}

namespace {

/// The capacity rule written out independently of detail::pool_capacity.
int64_t expected_capacity(int64_t n, int experts, const rv::GroupExpertChoiceDims& d) {
  if (n == 0 || experts == 0) return 0;
  if (d.capacity > 0) return std::min(d.capacity, n);
  const double c = std::ceil(d.capacity_factor * double(n) * d.top_k / double(experts));
  return std::min<int64_t>(n, std::max<int64_t>(1, static_cast<int64_t>(c)));
}

/// Every defining property of a forward's outputs, from the inputs alone.
void check_gec_properties(GecProblem& prob) {
  const auto& d = prob.dims;
  const int64_t T = d.tokens;
  const int E = d.experts, G = d.num_groups;
  // pools: shared first, else the group whose range holds e (ranges are disjoint here)
  std::vector<int32_t> pool(E, -1);
  std::vector<int> pool_experts(G + 1, 0);
  std::vector<int64_t> pool_tokens(G + 1, 0);
  for (int e = 0; e < E; ++e) {
    if (e >= d.shared_begin && e < d.shared_end) pool[e] = G;
    else
      for (int g = 0; g < G; ++g)
        if (e >= prob.group_offsets[g] && e < prob.group_offsets[g + 1]) pool[e] = g;
    if (pool[e] >= 0) ++pool_experts[pool[e]];
  }
  for (int64_t t = 0; t < T; ++t)
    if (prob.group_id[t] >= 0 && prob.group_id[t] < G) ++pool_tokens[prob.group_id[t]];
  pool_tokens[G] = T;
  auto sees = [&](int e, int64_t t) {
    return pool[e] == G || (pool[e] >= 0 && pool[e] == prob.group_id[t]);
  };
  CHECK(prob.expert_offsets[0] == 0);
  std::vector<int> per_token(T, 0);
  for (int e = 0; e < E; ++e) {
    CAPTURE(e);
    const int64_t C = pool[e] < 0 ? 0 : expected_capacity(pool_tokens[pool[e]], pool_experts[pool[e]], d);
    const int64_t base = prob.expert_offsets[e];
    REQUIRE(prob.expert_offsets[e + 1] - base == C);
    std::vector<int64_t> cand;
    for (int64_t t = 0; t < T; ++t)
      if (sees(e, t)) cand.push_back(t);
    std::stable_sort(cand.begin(), cand.end(),
                     [&](int64_t a, int64_t b) { return prob.scores[a * E + e] > prob.scores[b * E + e]; });
    std::vector<int64_t> want(cand.begin(), cand.begin() + C);
    std::sort(want.begin(), want.end());
    for (int64_t j = 0; j < C; ++j) {
      const int32_t t = prob.expert_tokens[base + j];
      CHECK(t == want[j]);
      CHECK(prob.row_map[t * E + e] == base + j);
      CHECK(prob.expert_weights[base + j] == prob.scores[t * E + e]);
      CHECK(prob.token_weight[t * E + e] == prob.scores[t * E + e]);
      per_token[t] += 1;
    }
  }
  const int64_t total = prob.expert_offsets[E];
  CHECK(total <= prob.max_rows());
  for (int64_t r = total; r < prob.max_rows(); ++r) CHECK(prob.expert_tokens[r] == -1);  // untouched
  int64_t chosen = 0;
  for (int64_t t = 0; t < T; ++t) {
    double seen_sum = 0;
    bool any_seen = false;
    for (int e = 0; e < E; ++e) {
      const int64_t i = t * E + e;
      chosen += prob.row_map[i] >= 0;
      if (prob.row_map[i] < 0) CHECK(prob.token_weight[i] == 0.0);
      if (prob.row_map[i] >= 0) CHECK(sees(e, t));  // out-of-group tokens: shared experts only
      if (!sees(e, t)) CHECK(prob.scores[i] == 0.0);
      seen_sum += prob.scores[i];
      any_seen = any_seen || sees(e, t);
    }
    if (prob.score == rv::ChoiceScore::softmax && any_seen) CHECK(seen_sum == doctest::Approx(1.0).epsilon(1e-12));
    CHECK(prob.experts_per_token[t] == per_token[t]);
  }
  CHECK(chosen == total);
}

}  // namespace

TEST_CASE("group expert choice reference: pools, capacities, top-C among the pool's tokens, ties") {
  const auto seed = mt::fresh_seed();
  INFO("seed " << seed);
  mt::Rng rng(seed);
  for (int trial = 0; trial < 300; ++trial) {
    const int64_t T = rng.integer(1, 40);
    const int E = static_cast<int>(rng.integer(1, 12));
    const int G = static_cast<int>(rng.integer(1, 4));
    std::vector<int32_t> offsets(G + 1);
    for (auto& o : offsets) o = static_cast<int32_t>(rng.integer(0, E));
    std::sort(offsets.begin(), offsets.end());
    int sb = static_cast<int>(rng.integer(0, E)), se = static_cast<int>(rng.integer(0, E));
    if (sb > se) std::swap(sb, se);
    if (trial % 3 == 0) sb = se = 0;
    const bool fixed = trial % 2 == 0;
    const auto score = trial % 4 < 2 ? rv::ChoiceScore::sigmoid : rv::ChoiceScore::softmax;
    GecProblem prob(rng, T, E, offsets, sb, se, score, fixed ? rng.integer(1, 8) : 0, rng.uniform(0.2, 3.0),
                    static_cast<int>(rng.integer(1, 3)));
    for (auto& g : prob.group_id) g = static_cast<int32_t>(rng.integer(-1, G));  // G and -1: no group
    for (auto& z : prob.logits) z = std::round(z * 4) / 4;                        // exact ties happen
    CAPTURE(trial);
    CAPTURE(T);
    CAPTURE(E);
    CAPTURE(G);
    REQUIRE(prob.forward() == Status::ok);
    check_gec_properties(prob);
  }
  SUBCASE("MoMa's rule: each expert takes its group's mean load; the shared pool all tokens'") {
    // 6 text tokens (group 0), 4 image tokens (group 1); 2 experts each; 2 shared experts
    GecProblem prob(rng, 10, 6, {0, 2, 4}, 4, 6, rv::ChoiceScore::sigmoid);
    prob.group_id = {0, 1, 0, 0, 1, 0, 1, 0, 1, 0};
    REQUIRE(prob.forward() == Status::ok);
    CHECK(prob.expert_offsets == std::vector<int64_t>{0, 3, 6, 8, 10, 15, 20});
    check_gec_properties(prob);
  }
  SUBCASE("all equal scores: each expert takes its first tokens") {
    GecProblem prob(rng, 9, 4, {0, 2, 4}, 0, 0, rv::ChoiceScore::softmax, 2);
    std::fill(prob.logits.begin(), prob.logits.end(), 0.25);
    prob.group_id = {1, 0, 0, 1, 1, 0, 1, 0, 0};
    REQUIRE(prob.forward() == Status::ok);
    CHECK(prob.expert_tokens[0] == 1);
    CHECK(prob.expert_tokens[1] == 2);
    CHECK(prob.expert_tokens[4] == 0);
    CHECK(prob.expert_tokens[5] == 3);
  }
  SUBCASE("without a shared pool, tokens outside every group are chosen by nobody") {
    GecProblem prob(rng, 6, 4, {0, 2, 4}, 0, 0, rv::ChoiceScore::sigmoid, 6);
    prob.group_id = {0, -3, 1, 2, 1, 0};
    REQUIRE(prob.forward() == Status::ok);
    for (int e = 0; e < 4; ++e) {
      CHECK(prob.row_map[1 * 4 + e] == -1);
      CHECK(prob.row_map[3 * 4 + e] == -1);
    }
    CHECK(prob.experts_per_token[1] == 0);
    CHECK(prob.experts_per_token[0] == 2);
  }
}

TEST_CASE("group expert choice reference: one group of every expert is plain expert choice") {
  const auto seed = mt::fresh_seed();
  INFO("seed " << seed);
  mt::Rng rng(seed);
  for (bool as_shared : {false, true}) {
    const int64_t T = 23, C = 5;
    const int E = 6;
    GecProblem prob(rng, T, E, as_shared ? std::vector<int32_t>{0, 0, 0} : std::vector<int32_t>{0, E},
                    as_shared ? 0 : 0, as_shared ? E : 0, rv::ChoiceScore::softmax, C);
    if (as_shared)
      for (auto& g : prob.group_id) g = static_cast<int32_t>(rng.integer(-2, 3));
    REQUIRE(prob.forward() == Status::ok);
    mv::ExpertChoiceProblem ec(rng, T, E, C);
    ec.logits = prob.logits;
    REQUIRE(ec.forward() == Status::ok);
    CHECK(std::vector<int32_t>(prob.expert_tokens.begin(), prob.expert_tokens.begin() + E * C) == ec.expert_tokens);
    CHECK(prob.row_map == ec.row_map);
    CHECK(prob.token_weight == ec.token_weight);
    CHECK(prob.scores == ec.scores);
    CHECK(prob.expert_offsets == ec.expert_offsets);
  }
}

// ---- group-restricted -----------------------------------------------------------------------

TEST_CASE("group-restricted reference: gradient equals finite differences") {
  const auto seed = mt::fresh_seed();
  INFO("seed " << seed);
  mt::Rng rng(seed);
  for (bool renorm : {true, false}) {
    CAPTURE(renorm);
    struct Case { int64_t T; int E, K; std::vector<int32_t> offsets; int sb, se; };
    for (const Case& c : {Case{6, 8, 2, {0, 3, 6}, 6, 8}, Case{5, 12, 3, {0, 4, 8, 12}, 0, 0},
                          Case{5, 10, 4, {2, 4, 10}, 0, 2}, Case{4, 6, 5, {0, 2, 6}, 0, 0}}) {
      CAPTURE(c.E);
      CAPTURE(c.K);
      auto prob = mv::draw_away_from_ties<mv::GroupRestrictedProblem>(
          [&] { return mv::GroupRestrictedProblem(rng, c.T, c.E, c.K, c.offsets, c.sb, c.se, renorm); });
      REQUIRE(prob.forward() == Status::ok);
      std::vector<double> dz(c.T * c.E, NAN);
      rv::GroupRestrictedBackwardParams<double, double> b{prob.params(), prob.dweight.data(), dz.data()};
      REQUIRE(prob.forward() == Status::ok);
      REQUIRE(rvr::group_restricted_backward(b) == Status::ok);
      REQUIRE(mt::all_finite(dz));
      CHECK(fd_error(prob, dz) < kFdTolerance);
    }
  }
}

TEST_CASE("group-restricted reference with the DeepSeek-V3 group limit: gradient and properties") {
  const auto seed = mt::fresh_seed();
  INFO("seed " << seed);
  mt::Rng rng(seed);
  for (bool renorm : {true, false}) {
    CAPTURE(renorm);
    auto make = [&] {
      mv::GroupRestrictedProblem p(rng, 6, 16, 3, {0, 6, 12}, 12, 16, renorm);
      p.dims.n_groups = 4;  // groups of 4: [0,4) [4,8) [8,12) [12,16)
      p.dims.topk_groups = 2;
      return p;
    };
    auto prob = mv::draw_away_from_ties<mv::GroupRestrictedProblem>(make);
    REQUIRE(prob.forward() == Status::ok);
    for (int64_t t = 0; t < 6; ++t) {
      const auto a = prob.allowed(t);
      std::set<int> groups;
      for (int j = 0; j < 3; ++j) {
        const int e = prob.topk_idx[t * 3 + j];
        if (e < 0) continue;
        CHECK(a[e]);
        groups.insert(e / 4);
      }
      CHECK(groups.size() <= 2);
    }
    std::vector<double> dz(6 * 16, NAN);
    rv::GroupRestrictedBackwardParams<double, double> b{prob.params(), prob.dweight.data(), dz.data()};
    REQUIRE(prob.forward() == Status::ok);
    REQUIRE(rvr::group_restricted_backward(b) == Status::ok);
    CHECK(fd_error(prob, dz) < kFdTolerance);
  }
  SUBCASE("a group with one allowed expert scores that expert; groups with none never win") {
    // group 0 allowed [3, 5): one expert (3) in limit group [0,4), one (4) in [4,8)
    mv::GroupRestrictedProblem p(rng, 1, 8, 2, {3, 5}, 0, 0);
    p.dims.n_groups = 2;
    p.dims.topk_groups = 1;
    p.group_id[0] = 0;
    p.logits = {0, 0, 0, 2.0, 1.0, 0, 0, 0};
    REQUIRE(p.forward() == Status::ok);
    CHECK(p.topk_idx[0] == 3);  // group [0,4) scores p_3 > p_4
    CHECK(p.topk_idx[1] == -1);
  }
}

TEST_CASE("group-restricted reference: never outside the allowed experts") {
  mt::Rng rng(mt::fresh_seed());
  mv::GroupRestrictedProblem prob(rng, 64, 24, 4, {0, 8, 10, 20}, 20, 24);
  prob.group_id[0] = -1;  // invalid group: shared pool only
  prob.group_id[1] = 3;
  REQUIRE(prob.forward() == Status::ok);
  for (int64_t t = 0; t < 64; ++t) {
    const auto a = prob.allowed(t);
    const int n_allowed = static_cast<int>(std::count(a.begin(), a.end(), char(1)));
    double wsum = 0, prev = 2.0;
    for (int j = 0; j < 4; ++j) {
      const int32_t e = prob.topk_idx[t * 4 + j];
      if (j < std::min(4, n_allowed)) {
        REQUIRE(e >= 0);
        CHECK(a[e]);
        CHECK(prob.topk_prob[t * 4 + j] <= prev);
        prev = prob.topk_prob[t * 4 + j];
        wsum += prob.topk_weight[t * 4 + j];
      } else {
        CHECK(e == -1);
        CHECK(prob.topk_weight[t * 4 + j] == 0.0);
      }
    }
    CHECK(wsum == doctest::Approx(1.0).epsilon(1e-12));
    if (prob.group_id[t] < 0 || prob.group_id[t] >= 3)
      for (int j = 0; j < 4; ++j) CHECK(prob.topk_idx[t * 4 + j] >= 20);
  }
  SUBCASE("masked softmax: allowed probabilities sum to one, ties to the lower index") {
    std::fill(prob.logits.begin(), prob.logits.end(), 0.0);
    prob.group_id.assign(64, 1);  // [8, 10) plus [20, 24): 6 experts
    REQUIRE(prob.forward() == Status::ok);
    CHECK(prob.topk_idx[0] == 8);
    CHECK(prob.topk_idx[1] == 9);
    CHECK(prob.topk_idx[2] == 20);
    CHECK(prob.topk_idx[3] == 21);
    CHECK(prob.topk_prob[0] == doctest::Approx(1.0 / 6).epsilon(1e-12));
  }
}

// ---- sigmoid with bias ------------------------------------------------------------------------

TEST_CASE("sigmoid-bias reference: gradient equals finite differences") {
  const auto seed = mt::fresh_seed();
  INFO("seed " << seed);
  mt::Rng rng(seed);
  for (bool renorm : {true, false}) {
    CAPTURE(renorm);
    struct Case { int64_t T; int E, K, G, TG; };
    for (const Case c : {Case{6, 8, 2, 1, 1}, Case{5, 16, 4, 4, 2}, Case{4, 12, 1, 3, 1}, Case{5, 6, 6, 1, 1},
                         Case{3, 32, 8, 8, 4}}) {
      CAPTURE(c.E);
      CAPTURE(c.K);
      CAPTURE(c.G);
      auto prob = mv::draw_away_from_ties<mv::SigmoidBiasProblem>(
          [&] { return mv::SigmoidBiasProblem(rng, c.T, c.E, c.K, c.G, c.TG, renorm); });
      REQUIRE(prob.forward() == Status::ok);
      std::vector<double> dz(c.T * c.E, NAN);
      rv::SigmoidBiasBackwardParams<double, double> b{prob.params(), prob.dweight.data(), dz.data()};
      REQUIRE(prob.forward() == Status::ok);
      REQUIRE(rvr::sigmoid_bias_backward(b) == Status::ok);
      REQUIRE(mt::all_finite(dz));
      CHECK(fd_error(prob, dz) < kFdTolerance);
    }
  }
}

TEST_CASE("sigmoid-bias reference: the bias steers selection only; weights; group limit; counts") {
  mt::Rng rng(mt::fresh_seed());
  mv::SigmoidBiasProblem prob(rng, 50, 16, 4, 4, 2);
  REQUIRE(prob.forward() == Status::ok);
  std::vector<int32_t> counts(16, 0);
  for (int64_t t = 0; t < 50; ++t) {
    double wsum = 0;
    std::set<int> groups;
    for (int j = 0; j < 4; ++j) {
      const int e = prob.topk_idx[t * 4 + j];
      const double s = 1.0 / (1.0 + std::exp(-prob.logits[t * 16 + e]));
      CHECK(prob.topk_score[t * 4 + j] == doctest::Approx(s).epsilon(1e-14));  // no bias in the score
      wsum += prob.topk_weight[t * 4 + j];
      groups.insert(e / 4);
      counts[e] += 1;
    }
    CHECK(groups.size() <= 2);
    CHECK(wsum == doctest::Approx(prob.routed_scaling).epsilon(1e-12));
  }
  CHECK(counts == prob.expert_counts);
  SUBCASE("a large bias forces an expert in, without changing its weight formula") {
    mv::SigmoidBiasProblem q(rng, 8, 8, 2);
    std::fill(q.bias.begin(), q.bias.end(), 0.0);
    q.bias[5] = 10.0;
    REQUIRE(q.forward() == Status::ok);
    for (int64_t t = 0; t < 8; ++t) {
      CHECK(q.topk_idx[t * 2] == 5);
      const double s0 = q.topk_score[t * 2], s1 = q.topk_score[t * 2 + 1];
      CHECK(q.topk_weight[t * 2] == doctest::Approx(q.routed_scaling * s0 / (s0 + s1)).epsilon(1e-12));
    }
  }
  SUBCASE("bias update: sign of mean load minus load, exact") {
    std::vector<int32_t> c{4, 1, 2, 1};  // mean 2
    std::vector<double> bias{0.0, 0.5, -0.5, 1.0};
    rv::BiasUpdateParams<double> u{4, c.data(), bias.data(), 0.25};
    REQUIRE(rvr::bias_update(u) == Status::ok);
    CHECK(bias == std::vector<double>{-0.25, 0.75, -0.5, 1.25});
  }
}

// ---- shared per-token arithmetic --------------------------------------------------------------

TEST_CASE("variant math: top-p count and group ranges") {
  namespace vd = moxe::router::variants::detail;
  const double p[] = {0.5, 0.3, 0.1, 0.1};
  CHECK(vd::topp_count(p, 4, 0.5) == 1);
  CHECK(vd::topp_count(p, 4, 0.51) == 2);
  CHECK(vd::topp_count(p, 4, 0.8) == 2);
  CHECK(vd::topp_count(p, 2, 0.99) == 2);
  CHECK(vd::topp_count(p, 4, 1.0) == 4);
  const int32_t off[] = {0, 3, 3, 9};
  int lo, hi;
  vd::group_range(off, 3, 8, 2, lo, hi);
  CHECK((lo == 3 && hi == 8));
  vd::group_range(off, 3, 8, 1, lo, hi);
  CHECK(lo == hi);
  vd::group_range(off, 3, 8, 3, lo, hi);
  CHECK(lo == hi);
  CHECK(vd::bias_step<double>(8, 4, 2, 1.0) == 0.0);
  CHECK(vd::bias_step<double>(9, 4, 2, 1.0) == 1.0);
}

// ---- bad input -------------------------------------------------------------------------------

TEST_CASE("variant references: bad input returns a non-ok status and writes nothing") {
  mt::Rng rng(mt::fresh_seed());
  {
    mv::TopPProblem prob(rng, 3, 4, 2, 0.5);
    auto p = prob.params();
    mt::poison(prob.topk_weight);
    for (double bad : {0.0, -0.1, 1.5, std::numeric_limits<double>::quiet_NaN()}) {
      p.top_p = bad;
      CHECK(rvr::topp_forward(p) == Status::invalid_argument);
    }
    p.top_p = 0.5;
    p.dims.max_k = 5;
    CHECK(rvr::topp_forward(p) == Status::invalid_argument);
    p.dims.max_k = 2;
    p.logits = nullptr;
    CHECK(rvr::topp_forward(p) == Status::invalid_argument);
    CHECK(std::all_of(prob.topk_weight.begin(), prob.topk_weight.end(), [](double x) { return std::isnan(x); }));
  }
  {
    mv::ExpertChoiceProblem prob(rng, 3, 4, 2);
    auto p = prob.params();
    mt::poison(prob.token_weight);
    p.dims.capacity = 0;
    CHECK(rvr::expert_choice_forward(p) == Status::invalid_argument);
    p.dims.capacity = 2;
    p.row_map = nullptr;
    CHECK(rvr::expert_choice_forward(p) == Status::invalid_argument);
    CHECK(std::isnan(prob.token_weight[0]));
  }
  {
    mv::GroupRestrictedProblem prob(rng, 3, 8, 2, {0, 4, 8}, 0, 0);
    auto p = prob.params();
    mt::poison(prob.topk_weight);
    p.dims.n_groups = 3;  // 8 % 3 != 0
    CHECK(rvr::group_restricted_forward(p) == Status::invalid_argument);
    p.dims.n_groups = 2;
    p.dims.topk_groups = 3;
    CHECK(rvr::group_restricted_forward(p) == Status::invalid_argument);
    p.dims.n_groups = p.dims.topk_groups = 1;
    prob.group_offsets = {0, 5, 4};  // decreasing
    p.group_offsets = prob.group_offsets.data();
    CHECK(rvr::group_restricted_forward(p) == Status::invalid_argument);
    prob.group_offsets = {0, 4, 9};  // past E
    CHECK(rvr::group_restricted_forward(p) == Status::invalid_argument);
    prob.group_offsets = {0, 4, 8};
    p.dims.shared_end = 9;
    CHECK(rvr::group_restricted_forward(p) == Status::invalid_argument);
    CHECK(std::isnan(prob.topk_weight[0]));
  }
  {
    GecProblem prob(rng, 3, 4, {0, 2, 4}, 0, 0, rv::ChoiceScore::sigmoid);
    auto p = prob.params();
    mt::poison(prob.token_weight);
    auto bad = p;
    bad.dims.capacity = -1;
    CHECK(rvr::group_expert_choice_forward(bad) == Status::invalid_argument);
    for (double f : {0.0, -1.0, std::numeric_limits<double>::quiet_NaN(), std::numeric_limits<double>::infinity()}) {
      bad = p;
      bad.dims.capacity_factor = f;
      CHECK(rvr::group_expert_choice_forward(bad) == Status::invalid_argument);
    }
    bad = p;
    bad.dims.capacity_factor = 0.0;
    bad.dims.capacity = 2;  // a given capacity: the factor is not used
    CHECK(rvr::group_expert_choice_forward(bad) == Status::ok);
    mt::poison(prob.token_weight);
    bad = p;
    bad.dims.top_k = 0;
    CHECK(rvr::group_expert_choice_forward(bad) == Status::invalid_argument);
    bad = p;
    bad.dims.shared_end = 5;
    CHECK(rvr::group_expert_choice_forward(bad) == Status::invalid_argument);
    bad = p;
    bad.expert_offsets = nullptr;
    CHECK(rvr::group_expert_choice_forward(bad) == Status::invalid_argument);
    bad = p;
    bad.group_id = nullptr;
    CHECK(rvr::group_expert_choice_forward(bad) == Status::invalid_argument);
    bad = p;
    bad.score = static_cast<rv::ChoiceScore>(7);
    CHECK(rvr::group_expert_choice_forward(bad) == Status::invalid_argument);
    prob.group_offsets = {0, 3, 2};  // decreasing
    CHECK(rvr::group_expert_choice_forward(p) == Status::invalid_argument);
    prob.group_offsets = {0, 2, 5};  // past E
    CHECK(rvr::group_expert_choice_forward(p) == Status::invalid_argument);
    CHECK(std::all_of(prob.token_weight.begin(), prob.token_weight.end(), [](double x) { return std::isnan(x); }));
    std::vector<double> dz(12, NAN);
    rv::GroupExpertChoiceBackwardParams<double, double> b{p, prob.dweight.data(), dz.data()};
    b.fwd.row_map = nullptr;
    CHECK(rvr::group_expert_choice_backward(b) == Status::invalid_argument);
    CHECK(std::isnan(dz[0]));
  }
  {
    mv::SigmoidBiasProblem prob(rng, 3, 8, 2, 4, 1);
    auto p = prob.params();
    mt::poison(prob.topk_weight);
    p.dims.top_k = 3;  // one group of 2 cannot hold 3
    CHECK(rvr::sigmoid_bias_forward(p) == Status::invalid_argument);
    p.dims.top_k = 2;
    p.dims.n_groups = 3;  // 8 % 3 != 0
    CHECK(rvr::sigmoid_bias_forward(p) == Status::invalid_argument);
    CHECK(std::isnan(prob.topk_weight[0]));
    rv::BiasUpdateParams<double> u{0, nullptr, nullptr};
    CHECK(rvr::bias_update(u) == Status::invalid_argument);
  }
}

// ---- float references agree with the double ones --------------------------------------------

TEST_CASE("variant references in float agree with double") {
  mt::Rng rng(mt::fresh_seed());
  const int64_t T = 16;
  const int E = 12, K = 3;
  const auto zd = mt::normal_vector<double>(rng, T * E, 1.5);
  const std::vector<float> zf(zd.begin(), zd.end());
  const auto zr = std::vector<double>(zf.begin(), zf.end());  // the float inputs, in double
  {
    std::vector<int32_t> id(T * K), ifl(T * K);
    std::vector<double> wd(T * K);
    std::vector<float> wf(T * K);
    REQUIRE(rvr::topp_forward(rv::TopPForwardParams<double, double>{{T, E, K}, zr.data(), 0.6, id.data(), nullptr,
                                                                    wd.data()}) == Status::ok);
    REQUIRE(rvr::topp_forward(rv::TopPForwardParams<float, float>{{T, E, K}, zf.data(), 0.6f, ifl.data(), nullptr,
                                                                  wf.data()}) == Status::ok);
    CHECK(mt::rel_error(wf, wd) < 1e-5);
    std::vector<float> dzf(T * E);
    const std::vector<float> dw(T * K, 0.5f);
    REQUIRE(rvr::topp_backward(rv::TopPBackwardParams<float, float>{
                {{T, E, K}, zf.data(), 0.6f, ifl.data()}, dw.data(), dzf.data()}) == Status::ok);
    CHECK(mt::all_finite(dzf));
  }
  for (auto score : {rv::ChoiceScore::sigmoid, rv::ChoiceScore::softmax}) {
    const std::vector<int32_t> gid{0, 1, 1, 0, 2, 0, 1, 1, 0, 0, 1, -1, 0, 1, 0, 1}, off{0, 5, 9};
    rv::GroupExpertChoiceDims d{T, E, 2, 9, 12};
    const int64_t rows = rv::group_expert_choice_max_rows(d);
    std::vector<int32_t> td(rows, -1), tf(rows, -1);
    std::vector<int64_t> md(T * E), mf(T * E), od(E + 1), of(E + 1);
    std::vector<double> wd(T * E);
    std::vector<float> wf(T * E);
    REQUIRE(rvr::group_expert_choice_forward(rv::GroupExpertChoiceForwardParams<double, double>{
                d, zr.data(), gid.data(), off.data(), score, nullptr, td.data(), nullptr, md.data(), wd.data(),
                od.data()}) == Status::ok);
    REQUIRE(rvr::group_expert_choice_forward(rv::GroupExpertChoiceForwardParams<float, float>{
                d, zf.data(), gid.data(), off.data(), score, nullptr, tf.data(), nullptr, mf.data(), wf.data(),
                of.data()}) == Status::ok);
    CHECK(od == of);
    CHECK(mt::rel_error(wf, wd) < 1e-5);
  }
  {
    std::vector<int32_t> id(T * K), ifl(T * K), cd(E), cf(E);
    std::vector<double> wd(T * K), bd(E, 0.0);
    std::vector<float> wf(T * K), bf(E, 0.f);
    REQUIRE(rvr::sigmoid_bias_forward(rv::SigmoidBiasForwardParams<double, double>{
                {T, E, K, 3, 2}, zr.data(), bd.data(), 2.0, true, id.data(), nullptr, wd.data(), cd.data()}) ==
            Status::ok);
    REQUIRE(rvr::sigmoid_bias_forward(rv::SigmoidBiasForwardParams<float, float>{
                {T, E, K, 3, 2}, zf.data(), bf.data(), 2.f, true, ifl.data(), nullptr, wf.data(), cf.data()}) ==
            Status::ok);
    CHECK(mt::rel_error(wf, wd) < 1e-5);
    CHECK(cd == cf);
  }
}

TEST_CASE("sigmoid-bias reference in float at large logits agrees with double") {
  // The chosen experts have the largest logits, where sigmoid'(z) = s (1 - s) from a rounded
  // s loses digits (z = 10: ~1e-3 relative, z = 16: ~50%); the backward takes it from z.
  const auto seed = mt::fresh_seed();
  INFO("seed " << seed);
  mt::Rng rng(seed);
  const int64_t T = 24;
  for (bool renorm : {true, false}) {
    for (const int E : {16, 128}) {
      CAPTURE(renorm);
      CAPTURE(E);
      const int K = 8;
      std::vector<double> zr = mt::uniform_vector<double>(rng, T * E, -4.0, 20.0);
      for (double& z : zr) z = double(float(z));
      const std::vector<float> zf(zr.begin(), zr.end());
      const std::vector<double> bias(E, 0.0), dw = mt::uniform_vector<double>(rng, T * K);
      const std::vector<float> biasf(E, 0.f), dwf(dw.begin(), dw.end());
      std::vector<int32_t> id(T * K), ifl(T * K);
      std::vector<double> wd(T * K), dzd(T * E);
      std::vector<float> wf(T * K), dzf(T * E);
      const rv::SigmoidBiasDims dims{T, E, K, 1, 1};
      const rv::SigmoidBiasForwardParams<double, double> pd{dims, zr.data(), bias.data(), 2.5, renorm, id.data(),
                                                            nullptr, wd.data()};
      const rv::SigmoidBiasForwardParams<float, float> pf{dims, zf.data(), biasf.data(), 2.5f, renorm, ifl.data(),
                                                          nullptr, wf.data()};
      REQUIRE(rvr::sigmoid_bias_forward(pd) == Status::ok);
      REQUIRE(rvr::sigmoid_bias_forward(pf) == Status::ok);
      // the backward of the double selection in both (float's s = 1 ties reorder it)
      auto pf_same = pf;
      pf_same.topk_idx = id.data();
      REQUIRE(rvr::sigmoid_bias_backward(rv::SigmoidBiasBackwardParams<double, double>{pd, dw.data(), dzd.data()}) ==
              Status::ok);
      REQUIRE(rvr::sigmoid_bias_backward(rv::SigmoidBiasBackwardParams<float, float>{pf_same, dwf.data(), dzf.data()}) ==
              Status::ok);
      CHECK(mt::rel_error(dzf, dzd) < 1e-5);
    }
  }
}

TEST_CASE("group expert choice reference in float at large logits: sigmoid scores' gradient to rounding") {
  // Experts choose their largest logits, where sigmoid'(z) = s (1 - s) from a rounded s
  // loses digits (z = 10: ~5e-4 relative, none from z = 17); the backward takes it from z.
  // dz = dw sigmoid'(z) on a chosen pair: a product of two factors exact to rounding, so
  // each entry is checked on its own (the norm would hide the largest logits' entries).
  const auto seed = mt::fresh_seed();
  INFO("seed " << seed);
  mt::Rng rng(seed);
  const int64_t T = 24;
  const int E = 16;
  std::vector<double> zr = mt::uniform_vector<double>(rng, T * E, -4.0, 24.0);
  for (double& z : zr) z = double(float(z));
  const std::vector<float> zf(zr.begin(), zr.end());
  std::vector<double> dw = mt::uniform_vector<double>(rng, T * E, 0.5, 1.0);
  for (double& x : dw) x = double(float(x));
  const std::vector<float> dwf(dw.begin(), dw.end());
  std::vector<int32_t> gid(T);
  for (int64_t t = 0; t < T; ++t) gid[t] = static_cast<int32_t>(t % 2);
  const std::vector<int32_t> off{0, 6, 12};
  const rv::GroupExpertChoiceDims d{T, E, 2, 12, 16};
  const int64_t rows = rv::group_expert_choice_max_rows(d);
  std::vector<int32_t> tokens(rows, -1);
  std::vector<int64_t> row_map(T * E), offsets(E + 1);
  std::vector<double> weight(T * E), dzd(T * E);
  std::vector<float> dzf(T * E);
  const rv::GroupExpertChoiceForwardParams<double, double> pd{
      d, zr.data(), gid.data(), off.data(), rv::ChoiceScore::sigmoid, nullptr, tokens.data(), nullptr,
      row_map.data(), weight.data(), offsets.data()};
  REQUIRE(rvr::group_expert_choice_forward(pd) == Status::ok);
  // the float backward on the double selection (float's s = 1 ties would reorder it)
  const rv::GroupExpertChoiceForwardParams<float, float> pf{
      d, zf.data(), gid.data(), off.data(), rv::ChoiceScore::sigmoid, nullptr, nullptr, nullptr,
      row_map.data(), nullptr, nullptr};
  REQUIRE(rvr::group_expert_choice_backward(rv::GroupExpertChoiceBackwardParams<double, double>{
              pd, dw.data(), dzd.data()}) == Status::ok);
  REQUIRE(rvr::group_expert_choice_backward(rv::GroupExpertChoiceBackwardParams<float, float>{
              pf, dwf.data(), dzf.data()}) == Status::ok);
  int chosen_large = 0;
  double worst = 0;
  for (int64_t i = 0; i < T * E; ++i) {
    if (row_map[i] < 0) {
      CHECK(dzf[i] == 0.f);
      continue;
    }
    chosen_large += zr[i] >= 17.0;
    CAPTURE(zr[i]);
    REQUIRE(dzd[i] > 0.0);
    const double e = std::abs(double(dzf[i]) - dzd[i]) / dzd[i];
    CHECK(e < 1e-6);
    worst = std::max(worst, e);
  }
  CHECK(chosen_large > 0);  // the case reaches the logits where s rounds to 1 in float
  MESSAGE("group expert choice, sigmoid, float vs double: worst relative error of dz " << worst);
}

// ---- expert choice's device selection algorithm, on the host ----------------------------------

namespace {

/// The device's order-preserving key (router::detail::float_key), on the host.
uint32_t host_float_key(float x) {
  if (x != x) x = -std::numeric_limits<float>::infinity();
  uint32_t b;
  std::memcpy(&b, &x, sizeof(b));
  if (b == 0x80000000u) b = 0u;
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

/// detail::select_key on the host: a negative score (a token the expert may not choose)
/// keys 0, below every score.
uint32_t host_select_key(float x) { return x < 0.f ? 0u : host_float_key(x); }

/// The kernel's 4-pass 8-bit radix select and stable compaction (detail::select_column),
/// sequentially.
std::vector<int64_t> radix_top(const std::vector<float>& col, int64_t C) {
  uint32_t prefix = 0, mask = 0;
  int64_t remaining = C;
  for (int shift = 24; shift >= 0; shift -= 8) {
    std::vector<int32_t> hist(256, 0);
    for (float x : col) {
      const uint32_t k = host_select_key(x);
      if ((k & mask) == prefix) ++hist[(k >> shift) & 255u];
    }
    int64_t in_digit = 0;
    const int d = moxe::router::variants::detail::radix_select_digit(hist.data(), 256, remaining, in_digit);
    prefix |= uint32_t(d) << shift;
    mask |= 255u << shift;
    remaining = in_digit;
  }
  std::vector<int64_t> out;
  int64_t eq_seen = 0;
  for (int64_t t = 0; t < int64_t(col.size()); ++t) {
    const uint32_t k = host_select_key(col[t]);
    const bool eq = k == prefix;
    if (k != 0u && (k > prefix || (eq && eq_seen < remaining))) out.push_back(t);
    eq_seen += eq;
  }
  return out;
}

}  // namespace

TEST_CASE("expert choice: the radix select + stable compaction equals a stable top-C") {
  mt::Rng rng(mt::fresh_seed());
  for (int trial = 0; trial < 400; ++trial) {
    const int64_t T = rng.integer(1, 300);
    std::vector<float> col(T);
    const int levels = static_cast<int>(rng.integer(1, 50));  // few levels: many exact ties
    for (auto& x : col) x = static_cast<float>(rng.integer(0, levels)) / float(levels) * (trial % 2 ? 1.f : 1e-30f);
    if (trial % 7 == 0) col[0] = -0.f;
    // from trial 200 on: tokens the expert may not choose (group-restricted expert choice)
    if (trial >= 200)
      for (auto& x : col)
        if (rng.uniform(0, 1) < 0.4) x = -1.f;
    std::vector<int64_t> order;
    for (int64_t t = 0; t < T; ++t)
      if (!(col[t] < 0.f)) order.push_back(t);
    if (order.empty()) continue;
    const int64_t C = rng.integer(1, int64_t(order.size()));
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return col[a] > col[b]; });
    std::vector<int64_t> want(order.begin(), order.begin() + C);
    std::sort(want.begin(), want.end());
    CAPTURE(T);
    CAPTURE(C);
    CHECK(radix_top(col, C) == want);
  }
}
