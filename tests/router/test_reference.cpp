// Host tests of the router references: the fused gate (forward against a naive
// implementation, backward against finite differences for every modulation kind and a
// range of E), the pieces (softmax + entropy, top-k with and without group limits), and
// argument checking.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>

#include "moxe/router/reference.hpp"
#include "router_problem.hpp"
#include "test_utils.hpp"

using moxe::Status;
using moxe::router::Modulation;
namespace mt = moxe::test;
namespace rr = moxe::router::reference;

namespace {

const Modulation kAllModulations[] = {Modulation::none, Modulation::standard, Modulation::proportional,
                                      Modulation::masked};

const char* name(Modulation m) {
  switch (m) {
    case Modulation::none: return "none";
    case Modulation::standard: return "standard";
    case Modulation::proportional: return "proportional";
    case Modulation::masked: return "masked";
  }
  return "?";
}

void check_gate_gradient(mt::Rng& rng, int64_t tokens, int experts, int mlstm_experts, int top_k, Modulation m,
                         bool head, size_t max_coords) {
  CAPTURE(tokens);
  CAPTURE(experts);
  CAPTURE(mlstm_experts);
  CAPTURE(top_k);
  const std::string modulation = name(m);
  CAPTURE(modulation);
  CAPTURE(head);
  mt::GateProblem g(rng, tokens, experts, mlstm_experts, top_k, m, head);
  REQUIRE(g.forward() == Status::ok);
  while (g.near_tie()) {  // redraw: finite differences across a selection change are meaningless
    g = mt::GateProblem(rng, tokens, experts, mlstm_experts, top_k, m, head);
    REQUIRE(g.forward() == Status::ok);
  }
  std::vector<double> dz(tokens * experts, NAN), da(tokens, NAN);
  auto b = g.backward_params(dz, da);
  REQUIRE(rr::gate_backward(b) == Status::ok);
  REQUIRE(mt::all_finite(dz));

  auto f = [&] { return g.objective(); };
  // central differences at h = 1e-6: ~1e-7 noise
  CHECK(mt::sampled_gradient_error(rng, f, g.logits, dz, max_coords) < 1e-5);
  if (head) {
    REQUIRE(mt::all_finite(da));
    const auto fda = mt::finite_difference(f, g.difficulty_logit);
    CHECK(mt::rel_error(da, fda) < 1e-5);
  }
}

}  // namespace

TEST_CASE("gate reference forward matches a naive implementation of the definition") {
  mt::Rng rng(mt::fresh_seed());
  for (Modulation m : kAllModulations)
    for (int E : {2, 8, 64}) {
      const std::string modulation = name(m);
      CAPTURE(modulation);
      CAPTURE(E);
      mt::GateProblem g(rng, 7, E, E / 2, std::min(E, 2), m);
      REQUIRE(g.forward() == Status::ok);
      mt::NaiveGate naive(g);
      CHECK(mt::rel_error(g.probs, naive.probs) < 1e-12);
      CHECK(mt::rel_error(g.lse, naive.lse) < 1e-12);
      CHECK(mt::rel_error(g.entropy, naive.entropy) < 1e-12);
      CHECK(mt::rel_error(g.difficulty, naive.difficulty) < 1e-12);
      for (int i = 0; i < 4; ++i) CHECK(g.losses[i] == doctest::Approx(naive.losses[i]).epsilon(1e-10));
    }
}

TEST_CASE("gate reference properties: sums, order, ties, counts") {
  mt::Rng rng(mt::fresh_seed());
  for (int E : {2, 4, 8, 64, 256, 1000}) {
    const int K = std::min(E, 8);
    mt::GateProblem g(rng, 5, E, E / 2, K, Modulation::standard);
    REQUIRE(g.forward() == Status::ok);
    int64_t routed = 0;
    for (int e = 0; e < E; ++e) routed += g.expert_counts[e];
    CHECK(routed == 5 * K);
    for (int t = 0; t < 5; ++t) {
      double ps = 0, ws = 0;
      for (int e = 0; e < E; ++e) ps += g.probs[t * E + e];
      for (int k = 0; k < K; ++k) {
        ws += g.topk_weight[t * K + k];
        CHECK(g.topk_prob[t * K + k] == g.probs[t * E + g.topk_idx[t * K + k]]);
        if (k > 0) CHECK(g.topk_prob[t * K + k] <= g.topk_prob[t * K + k - 1]);
      }
      CHECK(ps == doctest::Approx(1.0).epsilon(1e-12));
      CHECK(ws == doctest::Approx(1.0).epsilon(1e-12));
      CHECK(g.entropy[t] >= 0.0);
      CHECK(g.entropy[t] <= 1.0 + 1e-12);
    }
  }
  SUBCASE("ties go to the lower index") {
    mt::GateProblem g(rng, 3, 16, 8, 5, Modulation::none, false);
    std::fill(g.logits.begin(), g.logits.end(), 0.25);
    REQUIRE(g.forward() == Status::ok);
    for (int t = 0; t < 3; ++t)
      for (int k = 0; k < 5; ++k) CHECK(g.topk_idx[t * 5 + k] == k);
    CHECK(g.entropy[0] == doctest::Approx(1.0).epsilon(1e-12));  // uniform: normalised entropy 1
    // with a positive shift the mLSTM group wins, still lowest index first
    g.head = true;
    g.modulation = Modulation::standard;
    std::fill(g.difficulty_logit.begin(), g.difficulty_logit.end(), 2.0);
    REQUIRE(g.forward() == Status::ok);
    for (int k = 0; k < 5; ++k) CHECK(g.topk_idx[k] == k);
    // ties that straddle: logits equal except expert 9 highest
    std::fill(g.logits.begin(), g.logits.end(), 0.0);
    g.head = false;
    g.logits[9] = 1.0;
    REQUIRE(g.forward() == Status::ok);
    CHECK(g.topk_idx[0] == 9);
    for (int k = 1; k < 5; ++k) CHECK(g.topk_idx[k] == k - 1);
  }
  SUBCASE("a NaN or +inf logit still routes each token to K distinct experts in range") {
    // the probabilities of such a row are NaN; the selection must stay well defined (the
    // device kernels index shared histograms with it)
    mt::GateProblem g(rng, 3, 12, 6, 4, Modulation::standard);
    g.logits[0] = NAN;
    g.logits[12 + 5] = INFINITY;
    REQUIRE(g.forward() == Status::ok);
    for (int t = 0; t < 3; ++t) {
      std::vector<int32_t> sel(g.topk_idx.begin() + t * 4, g.topk_idx.begin() + (t + 1) * 4);
      for (int32_t e : sel) CHECK((e >= 0 && e < 12));
      std::sort(sel.begin(), sel.end());
      CHECK(std::adjacent_find(sel.begin(), sel.end()) == sel.end());
    }
    int64_t routed = 0;
    for (int e = 0; e < 12; ++e) routed += g.expert_counts[e];
    CHECK(routed == 3 * 4);
  }
  SUBCASE("no difficulty head: d = 0, s = 0, L_d = 0") {
    mt::GateProblem g(rng, 4, 8, 4, 2, Modulation::standard, false);
    REQUIRE(g.forward() == Status::ok);
    CHECK(g.losses[2] == 0.0);
    for (double d : g.difficulty) CHECK(d == 0.0);
  }
}

TEST_CASE("gate reference backward equals finite differences: every modulation, small E") {
  mt::Rng rng(mt::fresh_seed());
  INFO("seed via MOXE_TEST_SEED");
  for (Modulation m : kAllModulations)
    for (bool head : {true, false}) {
      if (!head && m != Modulation::standard) continue;
      check_gate_gradient(rng, 6, 2, 1, 1, m, head, 1000);
      check_gate_gradient(rng, 6, 4, 2, 2, m, head, 1000);
      check_gate_gradient(rng, 5, 8, 4, 3, m, head, 1000);
      check_gate_gradient(rng, 5, 8, 3, 8, m, head, 1000);  // uneven groups, k = E
    }
}

TEST_CASE("gate reference backward equals finite differences: large E, extreme groups") {
  mt::Rng rng(mt::fresh_seed());
  check_gate_gradient(rng, 4, 64, 32, 8, Modulation::standard, true, 160);
  check_gate_gradient(rng, 3, 64, 0, 32, Modulation::proportional, true, 120);   // E_m = 0
  check_gate_gradient(rng, 3, 64, 64, 2, Modulation::masked, true, 120);         // E_m = E
  check_gate_gradient(rng, 2, 256, 128, 8, Modulation::standard, true, 60);
  check_gate_gradient(rng, 2, 1000, 500, 32, Modulation::proportional, true, 40);
  check_gate_gradient(rng, 1, 1000, 333, 2, Modulation::masked, true, 40);       // T = 1
  check_gate_gradient(rng, 3, 1, 0, 1, Modulation::standard, true, 10);          // E = 1: H = 0
  check_gate_gradient(rng, 3, 1, 1, 1, Modulation::proportional, true, 10);
}

TEST_CASE("gate reference: loss coefficients from memory replace the scalars") {
  mt::Rng rng(mt::fresh_seed());
  for (double c_g : {0.01, 0.0}) {
    CAPTURE(c_g);
    mt::GateProblem g(rng, 9, 8, 4, 2, Modulation::standard);
    g.c_g = c_g;
    REQUIRE(g.forward() == Status::ok);
    std::vector<double> dz(g.logits.size()), da(std::size_t(g.dims.tokens)), dz2(dz.size()), da2(da.size());
    REQUIRE(rr::gate_backward(g.backward_params(dz, da)) == Status::ok);
    const double coefficients[4] = {g.c_z, g.c_lb, g.c_d, g.c_g};
    auto b = g.backward_params(dz2, da2);
    b.c_z = b.c_lb = b.c_d = b.c_g = std::nan("");  // ignored when loss_grad is set
    b.loss_grad = coefficients;
    REQUIRE(rr::gate_backward(b) == Status::ok);
    CHECK(dz2 == dz);
    CHECK(da2 == da);
  }
}

TEST_CASE("gate reference: the forward's totals, and the backward from them") {
  mt::Rng rng(mt::fresh_seed());
  for (int E : {1, 8, 64}) {
    CAPTURE(E);
    const int K = E < 2 ? 1 : 2;
    mt::GateProblem g(rng, 13, E, E / 2, K, Modulation::standard);
    g.totals.assign(E + 4, NAN);
    REQUIRE(g.forward() == Status::ok);
    // the totals are the sums the losses come from
    const double T = double(g.dims.tokens), slots = T * K;
    double routed = 0, lb = 0;
    for (int e = 0; e < E; ++e) {
      double load = 0;
      for (int64_t i = 0; i < g.dims.tokens * K; ++i)
        if (g.topk_idx[i] == e) load += g.topk_prob[i];
      CHECK(g.totals[e] == doctest::Approx(load).epsilon(1e-12));
      routed += g.totals[e];
      lb += E * (g.totals[e] / slots - 1.0 / E) * (g.totals[e] / slots - 1.0 / E) / E;
    }
    CHECK(routed == doctest::Approx(std::accumulate(g.topk_prob.begin(), g.topk_prob.end(), 0.0)).epsilon(1e-12));
    CHECK(g.losses[0] == doctest::Approx(g.totals[E] / T).epsilon(1e-12));
    CHECK(g.losses[1] == doctest::Approx(lb).epsilon(1e-9));
    CHECK(g.losses[2] == doctest::Approx(g.totals[E + 1] / T).epsilon(1e-12));
    CHECK(g.totals[E + 2] + g.totals[E + 3] == doctest::Approx(T).epsilon(1e-12));  // the masses sum to 1 a token
    // the backward from the totals equals the one that recomputes them
    std::vector<double> dz(g.logits.size()), da(std::size_t(g.dims.tokens)), dz2(dz.size()), da2(da.size());
    REQUIRE(rr::gate_backward(g.backward_params(dz, da)) == Status::ok);
    const std::vector<double> totals = g.totals;
    g.totals.clear();
    REQUIRE(rr::gate_backward(g.backward_params(dz2, da2)) == Status::ok);
    CHECK(mt::rel_error(dz, dz2) < 1e-13);
    CHECK(mt::rel_error(da, da2) < 1e-13);
    if (E == 1) continue;  // one expert: dz = 0 whatever the totals
    // and it reads them: other totals give another gradient
    g.totals = totals;
    g.totals[E + 2] *= 1.5;
    g.totals[0] *= 2;
    REQUIRE(rr::gate_backward(g.backward_params(dz2, da2)) == Status::ok);
    CHECK(mt::rel_error(dz, dz2) > 1e-6);
  }
}

TEST_CASE("gate reference rejects bad input and writes nothing") {
  mt::Rng rng(mt::fresh_seed());
  mt::GateProblem g(rng, 3, 8, 4, 2, Modulation::standard);
  auto expect_rejected = [&](moxe::router::GateForwardParams<double, double> p) {
    g.allocate();
    CHECK(rr::gate_forward(p) == Status::invalid_argument);
    CHECK(std::all_of(g.probs.begin(), g.probs.end(), [](double x) { return std::isnan(x); }));
    CHECK(std::isnan(g.losses[0]));
    CHECK(g.topk_idx[0] == -7);
    CHECK(g.expert_counts[0] == -7);
  };
  auto p = g.forward_params();
  auto q = p; q.dims.top_k = 9; expect_rejected(q);
  q = p; q.dims.top_k = 0; expect_rejected(q);
  q = p; q.dims.mlstm_experts = 9; expect_rejected(q);
  q = p; q.dims.mlstm_experts = -1; expect_rejected(q);
  q = p; q.dims.tokens = 0; expect_rejected(q);
  q = p; q.dims.experts = 0; expect_rejected(q);
  q = p; q.logits = nullptr; expect_rejected(q);
  q = p; q.topk_idx = nullptr; expect_rejected(q);
  q = p; q.losses = nullptr; expect_rejected(q);
  q = p; q.logits_stride = 5; expect_rejected(q);
  std::vector<double> dz(24, NAN), da(3, NAN);
  auto b = g.backward_params(dz, da);
  b.ddifficulty_logit = nullptr;
  CHECK(rr::gate_backward(b) == Status::invalid_argument);
  CHECK(std::isnan(dz[0]));
}

TEST_CASE("gate reference: strided logits with the difficulty as column E of the same matrix") {
  mt::Rng rng(mt::fresh_seed());
  mt::GateProblem g(rng, 5, 8, 4, 2, Modulation::standard);
  REQUIRE(g.forward() == Status::ok);
  const auto probs = g.probs;
  const auto losses = g.losses;
  std::vector<double> packed(5 * 9);
  for (int t = 0; t < 5; ++t) {
    for (int e = 0; e < 8; ++e) packed[t * 9 + e] = g.logits[t * 8 + e];
    packed[t * 9 + 8] = g.difficulty_logit[t];
  }
  g.allocate();
  auto p = g.forward_params();
  p.logits = packed.data();
  p.logits_stride = 9;
  p.difficulty_logit = packed.data() + 8;
  p.difficulty_stride = 9;
  REQUIRE(rr::gate_forward(p) == Status::ok);
  CHECK(mt::rel_error(g.probs, probs) == 0.0);
  CHECK(mt::rel_error(g.losses, losses) == 0.0);
}

TEST_CASE("softmax + entropy reference: values and gradient") {
  mt::Rng rng(mt::fresh_seed());
  for (int E : {1, 2, 8, 64, 1000}) {
    CAPTURE(E);
    const int T = E > 100 ? 2 : 4;
    auto z = mt::normal_vector<double>(rng, T * E, 1.5);
    std::vector<double> probs(T * E), lse(T), ent(T);
    moxe::router::SoftmaxEntropyParams<double, double> p{{T, E}, z.data(), probs.data(), lse.data(), ent.data()};
    REQUIRE(rr::softmax_entropy_forward(p) == Status::ok);
    for (int t = 0; t < T; ++t) {
      double s = 0, h = 0, se = 0;
      for (int e = 0; e < E; ++e) se += std::exp(z[t * E + e]);
      for (int e = 0; e < E; ++e) {
        const double q = std::exp(z[t * E + e]) / se;
        s += probs[t * E + e];
        h -= q * std::log(std::max(q, 1e-6));
      }
      CHECK(s == doctest::Approx(1.0));
      CHECK(lse[t] == doctest::Approx(std::log(se)).epsilon(1e-12));
      CHECK(ent[t] == doctest::Approx(E > 1 ? h / std::log(double(E)) : 0.0).epsilon(1e-12));
    }
    const auto dp = mt::uniform_vector<double>(rng, T * E), dl = mt::uniform_vector<double>(rng, T),
               dh = mt::uniform_vector<double>(rng, T);
    std::vector<double> dz(T * E);
    moxe::router::SoftmaxEntropyBackwardParams<double, double> b{p, dp.data(), dl.data(), dh.data(), dz.data()};
    REQUIRE(rr::softmax_entropy_backward(b) == Status::ok);
    auto f = [&] {
      rr::softmax_entropy_forward(p);
      return mt::dot(probs, dp) + mt::dot(lse, dl) + mt::dot(ent, dh);
    };
    CHECK(mt::sampled_gradient_error(rng, f, z, dz, 64) < 1e-5);
  }
}

TEST_CASE("top-k reference: order, ties, group-limited routing, gradient") {
  mt::Rng rng(mt::fresh_seed());
  SUBCASE("plain top-k matches a stable sort, gradient matches finite differences") {
    for (int E : {2, 4, 8, 64, 256, 1000})
      for (int K : {1, 2, 8, 32}) {
        if (K > E) continue;
        CAPTURE(E);
        CAPTURE(K);
        const int T = 3;
        // distinct grid values plus small noise: every gap is at least ~0.9 / (E + 1), so a
        // finite difference never crosses a selection change
        std::vector<double> s(T * E);
        for (int t = 0; t < T; ++t) {
          std::vector<int> perm(E);
          std::iota(perm.begin(), perm.end(), 0);
          std::shuffle(perm.begin(), perm.end(), rng.engine());
          for (int e = 0; e < E; ++e) s[t * E + e] = (perm[e] + 1 + rng.uniform(0, 0.1)) / (E + 1);
        }
        std::vector<int32_t> idx(T * K);
        std::vector<double> val(T * K), w(T * K);
        moxe::router::TopKParams<double, double> p{{T, E, K}, s.data(), idx.data(), val.data(), w.data()};
        REQUIRE(rr::topk_forward(p) == Status::ok);
        for (int t = 0; t < T; ++t) {
          std::vector<int> order(E);
          std::iota(order.begin(), order.end(), 0);
          std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return s[t * E + a] > s[t * E + b]; });
          double ws = 0;
          for (int k = 0; k < K; ++k) {
            CHECK(idx[t * K + k] == order[k]);
            ws += w[t * K + k];
          }
          CHECK(ws == doctest::Approx(1.0));
        }
        const auto dw = mt::uniform_vector<double>(rng, T * K), dv = mt::uniform_vector<double>(rng, T * K);
        std::vector<double> ds(T * E, NAN);
        moxe::router::TopKBackwardParams<double, double> b{p, dw.data(), dv.data(), ds.data()};
        REQUIRE(rr::topk_backward(b) == Status::ok);
        auto f = [&] {
          rr::topk_forward(p);
          return mt::dot(w, dw) + mt::dot(val, dv);
        };
        CHECK(mt::sampled_gradient_error(rng, f, s, ds, 64) < 1e-6);
      }
  }
  SUBCASE("backward skips slots outside [0, E): the weights renormalise over the routed slots") {
    const int T = 3, E = 7, K = 4;
    auto s = mt::uniform_vector<double>(rng, T * E, 0.1, 1.0);
    // token 0: slot 1 not routed (-1); token 1: a corrupt slot (E + 3) and -1; token 2: all valid
    const std::vector<int32_t> idx = {4, -1, 0, 6, 2, E + 3, -1, 5, 1, 3, 0, 6};
    const auto dw = mt::uniform_vector<double>(rng, T * K), dv = mt::uniform_vector<double>(rng, T * K);
    std::vector<int32_t> idx_copy = idx;
    moxe::router::TopKParams<double, double> p{{T, E, K}, s.data(), idx_copy.data()};
    std::vector<double> ds(T * E, NAN);
    moxe::router::TopKBackwardParams<double, double> b{p, dw.data(), dv.data(), ds.data()};
    REQUIRE(rr::topk_backward(b) == Status::ok);
    // the function it differentiates: w_k = s_{idx_k} / sum over routed slots, value_k = s_{idx_k}
    auto f = [&] {
      double total = 0;
      for (int t = 0; t < T; ++t) {
        double sum = 0;
        for (int k = 0; k < K; ++k)
          if (idx[t * K + k] >= 0 && idx[t * K + k] < E) sum += s[t * E + idx[t * K + k]];
        for (int k = 0; k < K; ++k) {
          const int e = idx[t * K + k];
          if (e < 0 || e >= E) continue;
          total += s[t * E + e] / sum * dw[t * K + k] + s[t * E + e] * dv[t * K + k];
        }
      }
      return total;
    };
    CHECK(mt::gradient_error(f, s, ds) < 1e-7);
    CHECK(idx_copy == idx);
  }
  SUBCASE("ties to the lower index") {
    std::vector<double> s(2 * 10, 0.5);
    s[10 + 7] = 0.9;
    std::vector<int32_t> idx(2 * 4);
    moxe::router::TopKParams<double, double> p{{2, 10, 4}, s.data(), idx.data()};
    REQUIRE(rr::topk_forward(p) == Status::ok);
    CHECK(idx == std::vector<int32_t>{0, 1, 2, 3, 7, 0, 1, 2});
  }
  SUBCASE("NaN ranks as -inf: below every number, ties to the lower index") {
    // a NaN first in the row must not stick as the best (it would hide 0.3 and 0.1)
    std::vector<double> s = {NAN, 0.1, NAN, 0.3, -INFINITY, -2.0};
    std::vector<int32_t> idx(5);
    std::vector<double> val(5);
    moxe::router::TopKParams<double, double> p{{1, 6, 5}, s.data(), idx.data(), val.data()};
    REQUIRE(rr::topk_forward(p) == Status::ok);
    CHECK(idx == std::vector<int32_t>{3, 1, 5, 0, 2});
    CHECK(val[3] == -INFINITY);
  }
  SUBCASE("group-limited routing keeps the groups with the largest top-2 sums") {
    // 4 groups of 3. Group 0 has the single best expert but a weak second; group 2 wins on
    // the top-2 sum; group 1 second; topk_groups = 2 excludes expert 0 despite its score.
    std::vector<double> s = {0.95, 0.01, 0.01, 0.5, 0.47, 0.1, 0.6, 0.55, 0.2, 0.3, 0.2, 0.1};
    std::vector<int32_t> idx(3);
    std::vector<double> w(3);
    moxe::router::TopKParams<double, double> p{{1, 12, 3, 4, 2}, s.data(), idx.data(), nullptr, w.data()};
    REQUIRE(rr::topk_forward(p) == Status::ok);
    CHECK(idx == std::vector<int32_t>{6, 7, 3});
    p.dims.topk_groups = 4;  // all groups: plain top-k
    REQUIRE(rr::topk_forward(p) == Status::ok);
    CHECK(idx == std::vector<int32_t>{0, 6, 7});
    p.dims = {1, 12, 3, 12, 3};  // one-expert groups: the group score is the expert's own
    REQUIRE(rr::topk_forward(p) == Status::ok);
    CHECK(idx == std::vector<int32_t>{0, 6, 7});
  }
  SUBCASE("bad arguments") {
    std::vector<double> s(12, 0.1);
    std::vector<int32_t> idx(12, -3);
    moxe::router::TopKParams<double, double> p{{1, 12, 13}, s.data(), idx.data()};
    CHECK(rr::topk_forward(p) == Status::invalid_argument);
    p.dims = {1, 12, 7, 4, 2};  // 2 groups of 3 cannot hold 7
    CHECK(rr::topk_forward(p) == Status::invalid_argument);
    p.dims = {1, 12, 2, 5, 2};  // 12 % 5 != 0
    CHECK(rr::topk_forward(p) == Status::invalid_argument);
    CHECK(idx[0] == -3);
  }
}

TEST_CASE("gate reference in float agrees with double (the arithmetic the kernels run)") {
  const auto seed = mt::fresh_seed();
  INFO("seed " << seed);
  mt::Rng rng(seed);
  for (bool large_difficulty : {false, true})
  for (int E : {4, 64, 1000}) {
    CAPTURE(E);
    CAPTURE(large_difficulty);
    const int K = std::min(E, 8);
    mt::GateProblem g(rng, 6, E, E / 2, K, Modulation::standard);
    // d = sigmoid(a) near 1, where sigmoid'(a) from the rounded d, d (1 - d), loses digits
    // (~1e-3 relative at a = 10, ~50% at 16): the backward takes it from a
    if (large_difficulty)
      for (double& a : g.difficulty_logit) a = double(float(rng.uniform(10.0, 18.0)));
    REQUIRE(g.forward() == Status::ok);
    std::vector<double> dz(g.logits.size()), da(6);
    REQUIRE(rr::gate_backward(g.backward_params(dz, da)) == Status::ok);
    // the same problem in float
    const std::vector<float> z(g.logits.begin(), g.logits.end()), a(g.difficulty_logit.begin(), g.difficulty_logit.end()),
        dw(g.dweight.begin(), g.dweight.end());
    std::vector<float> probs(z.size()), lse(6), ent(6), diff(6), tp(6 * K), tw(6 * K), losses(4), fdz(z.size()), fda(6);
    std::vector<int32_t> idx(6 * K), counts(E);
    moxe::router::GateForwardParams<float, float> p{};
    p.dims = g.dims;
    p.logits = z.data();
    p.difficulty_logit = a.data();
    p.modulation = Modulation::standard;
    p.gamma = 0.8f;
    p.tau = 0.5f;
    p.probs = probs.data();
    p.lse = lse.data();
    p.entropy = ent.data();
    p.difficulty = diff.data();
    p.topk_idx = idx.data();
    p.topk_prob = tp.data();
    p.topk_weight = tw.data();
    p.expert_counts = counts.data();
    p.losses = losses.data();
    REQUIRE(rr::gate_forward(p) == Status::ok);
    CHECK(idx == g.topk_idx);
    CHECK(mt::rel_error(probs, g.probs) < 1e-5);
    CHECK(mt::rel_error(losses, g.losses) < 1e-4);
    moxe::router::GateBackwardParams<float, float> b{p, dw.data(), 0.3f, 0.7f, 0.5f, 0.9f, fdz.data(), fda.data()};
    REQUIRE(rr::gate_backward(b) == Status::ok);
    CHECK(mt::rel_error(fdz, dz) < 1e-4);
    CHECK(mt::rel_error(fda, da) < 1e-4);
  }
}
