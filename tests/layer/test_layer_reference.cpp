// The host MoxE layer of examples/moxe_layer: the gradients of the whole layer (input and
// every weight tensor) against central finite differences in double, in both expert modes.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "../../examples/moxe_layer/layer_reference.hpp"
#include "test_utils.hpp"

namespace {

using moxe_layer::ExpertMode;
using moxe_layer::LayerCache;
using moxe_layer::LayerConfig;
using moxe_layer::LayerWeights;
using moxe_layer::Vec;

LayerConfig tiny_config(ExpertMode mode) {
  LayerConfig c;
  c.batch = 2;
  c.seq_len = 5;
  c.d_model = 8;
  c.heads = 2;
  c.mlstm_proj_factor = 2;
  c.ffn_hidden = 8;
  c.experts = 4;
  c.top_k = 2;
  c.expert_mode = mode;
  return c;
}

struct Problem {
  LayerConfig cfg;
  LayerWeights w;
  Vec x, dy;
};

Problem make_problem(const LayerConfig& c, moxe::test::Rng& rng) {
  Problem p;
  p.cfg = c;
  p.w = LayerWeights::random(p.cfg, rng.engine());
  const std::size_t n = static_cast<std::size_t>(p.cfg.tokens() * p.cfg.d_model);
  p.x = moxe::test::normal_vector<double>(rng, n);
  p.dy = moxe::test::normal_vector<double>(rng, n);
  return p;
}

double norm(const Vec& v) {
  double s = 0.0;
  for (double x : v) s += x * x;
  return std::sqrt(s);
}

/// Which smooth piece of the loss the forward is on: the top-k selection, and for the
/// thresholded modulations which side of tau each token's difficulty lies.
std::vector<int32_t> regime(const LayerConfig& c, const LayerCache& k) {
  std::vector<int32_t> r = k.topk_idx;
  for (double d : k.difficulty) r.push_back(d > c.tau ? 1 : 0);
  return r;
}

/// Every coordinate of x and of every weight tensor (or, with max_coords, that many random
/// coordinates of each) against finite differences of objective().
void check_gradients(const LayerConfig& config, std::size_t max_coords = SIZE_MAX) {
  const std::uint64_t seed = moxe::test::fresh_seed();
  const std::string mode_name = moxe_layer::to_string(config.expert_mode);
  INFO("seed = " << seed << " (MOXE_TEST_SEED replays it), mode = " << mode_name
                 << ", modulation = " << static_cast<int>(config.modulation) << ", E = " << config.experts
                 << ", k = " << config.top_k);
  moxe::test::Rng rng(seed);
  Problem p = make_problem(config, rng);
  const LayerConfig& c = p.cfg;

  LayerCache cache;
  REQUIRE(moxe_layer::forward(c, p.w, p.x, cache) == moxe::Status::ok);
  CHECK(moxe::test::all_finite(cache.y));
  for (double l : cache.losses) CHECK(std::isfinite(l));
  Vec dx;
  LayerWeights grads;
  REQUIRE(moxe_layer::backward(c, p.w, cache, p.dy, dx, grads) == moxe::Status::ok);
  CHECK(moxe::test::all_finite(dx));

  // J(x, w) with the routing it took; a coordinate whose +-h moves the top-k selection
  // (or a difficulty across tau) sits on a kink of the piecewise-smooth loss: left out.
  const std::vector<int32_t> base_regime = regime(c, cache);
  LayerCache probe;
  auto objective = [&](bool& same_routing) {
    REQUIRE(moxe_layer::forward(c, p.w, p.x, probe) == moxe::Status::ok);
    same_routing = same_routing && regime(c, probe) == base_regime;
    return moxe_layer::objective(c, probe, p.dy);
  };

  // Central differences with Richardson extrapolation, (4 D(h/2) - D(h)) / 3, exact to
  // O(h^4): the layer has regions of high curvature (the mLSTM normaliser |n.q| near zero,
  // norms of nearly constant heads) where plain O(h^2) differences are off by 1e-5.
  const double h = 2e-6;
  int64_t checked_total = 0, skipped_total = 0;
  auto check_tensor = [&](const std::string& name, Vec& value, const Vec& analytic) {
    REQUIRE(value.size() == analytic.size());
    Vec fd(value.size(), 0.0), an(value.size(), 0.0);
    std::vector<std::size_t> coords(value.size());
    for (std::size_t i = 0; i < coords.size(); ++i) coords[i] = i;
    if (coords.size() > max_coords) {
      std::shuffle(coords.begin(), coords.end(), rng.engine());
      coords.resize(max_coords);
    }
    int64_t skipped = 0;
    for (std::size_t i : coords) {
      const double saved = value[i];
      bool same = true;
      auto central = [&](double step) {
        value[i] = saved + step;
        const double jp = objective(same);
        value[i] = saved - step;
        const double jm = objective(same);
        value[i] = saved;
        return (jp - jm) / (2.0 * step);
      };
      const double coarse = central(h), fine = central(h / 2);
      if (!same) {
        ++skipped;
        continue;
      }
      fd[i] = (4.0 * fine - coarse) / 3.0;
      an[i] = analytic[i];
    }
    Vec diff(fd.size());
    for (std::size_t i = 0; i < fd.size(); ++i) diff[i] = an[i] - fd[i];
    // relative to the gradient's size, plus an absolute floor (1e-6 per coordinate, ~100x
    // the rounding noise of the differences) for tensors whose gradient is (near) zero by
    // construction, e.g. the recurrent weights and forget gates of per-token experts
    const double tolerance = 1e-5 * norm(fd) + 1e-6 * std::sqrt(double(coords.size()));
    INFO("tensor " << name << ": |analytic - fd| = " << norm(diff) << ", |fd| = " << norm(fd) << ", tolerance "
                   << tolerance << ", skipped " << skipped << " of " << coords.size());
    CHECK(norm(diff) <= tolerance);
    checked_total += int64_t(coords.size()) - skipped;
    skipped_total += skipped;
  };

  check_tensor("x", p.x, dx);
  std::vector<moxe_layer::NamedTensor> weights = moxe_layer::named_tensors(c, p.w);
  std::vector<moxe_layer::NamedTensor> grad_tensors = moxe_layer::named_tensors(c, grads);
  REQUIRE(weights.size() == grad_tensors.size());
  for (std::size_t i = 0; i < weights.size(); ++i) check_tensor(weights[i].name, *weights[i].value, *grad_tensors[i].value);

  INFO("checked " << checked_total << " coordinates, skipped " << skipped_total << " at routing kinks");
  CHECK(skipped_total * 100 <= checked_total);  // kinks are rare: at most 1%
}

}  // namespace

TEST_CASE("moxe layer (host): output and losses are finite, routing is a valid top-k") {
  const std::uint64_t seed = moxe::test::fresh_seed();
  INFO("seed = " << seed);
  for (ExpertMode mode : {ExpertMode::per_token, ExpertMode::stateful}) {
    moxe::test::Rng rng(seed);
    Problem p = make_problem(tiny_config(mode), rng);
    LayerCache cache;
    REQUIRE(moxe_layer::forward(p.cfg, p.w, p.x, cache) == moxe::Status::ok);
    CHECK(moxe::test::all_finite(cache.y));
    for (double l : cache.losses) {
      CHECK(std::isfinite(l));
      CHECK(l >= -1.0);  // L_g can be negative (it is minimal at balance), the others >= 0
    }
    // every token goes to top_k distinct experts whose weights sum to one
    const int K = p.cfg.top_k;
    for (int64_t t = 0; t < p.cfg.tokens(); ++t) {
      double wsum = 0.0;
      for (int j = 0; j < K; ++j) {
        const int32_t e = cache.topk_idx[t * K + j];
        CHECK(e >= 0);
        CHECK(e < p.cfg.experts);
        for (int j2 = 0; j2 < j; ++j2) CHECK(cache.topk_idx[t * K + j2] != e);
        wsum += cache.topk_weight[t * K + j];
      }
      CHECK(wsum == doctest::Approx(1.0).epsilon(1e-12));
    }
    CHECK(cache.expert_offsets[p.cfg.experts] == p.cfg.tokens() * K);
  }
}

TEST_CASE("moxe layer (host): the expert mode changes the experts' output only through state") {
  // Same weights and input: the mixer and the gate agree exactly; the stateful experts
  // differ (their recurrences carry state across tokens) unless every expert got at most one
  // token per sequence.
  const std::uint64_t seed = moxe::test::fresh_seed();
  INFO("seed = " << seed);
  moxe::test::Rng rng_a(seed), rng_b(seed);
  Problem a = make_problem(tiny_config(ExpertMode::per_token), rng_a);
  Problem b = make_problem(tiny_config(ExpertMode::stateful), rng_b);
  LayerCache ca, cb;
  REQUIRE(moxe_layer::forward(a.cfg, a.w, a.x, ca) == moxe::Status::ok);
  REQUIRE(moxe_layer::forward(b.cfg, b.w, b.x, cb) == moxe::Status::ok);
  CHECK(ca.u == cb.u);
  CHECK(ca.topk_idx == cb.topk_idx);
  for (int i = 0; i < 4; ++i) CHECK(ca.losses[i] == cb.losses[i]);
  CHECK(moxe::test::rel_error(ca.y, cb.y) > 1e-8);
}

TEST_CASE("moxe layer (host): gradients match finite differences, per-token experts") {
  check_gradients(tiny_config(ExpertMode::per_token));
}

TEST_CASE("moxe layer (host): gradients match finite differences, stateful experts") {
  check_gradients(tiny_config(ExpertMode::stateful));
}

TEST_CASE("moxe layer (host): gradients match finite differences, other modulations") {
  using moxe::router::Modulation;
  for (Modulation m : {Modulation::none, Modulation::proportional, Modulation::masked}) {
    LayerConfig c = tiny_config(ExpertMode::per_token);
    c.modulation = m;
    check_gradients(c);
  }
}

TEST_CASE("moxe layer (host): gradients match finite differences, a wider layer (sampled)") {
  // E = 8, top-3, 4 heads, odd sequence length: 12 random coordinates of every tensor
  for (ExpertMode mode : {ExpertMode::per_token, ExpertMode::stateful}) {
    LayerConfig c = tiny_config(mode);
    c.batch = 3;
    c.seq_len = 7;
    c.d_model = 16;
    c.heads = 4;
    c.ffn_hidden = 24;
    c.experts = 8;
    c.top_k = 3;
    check_gradients(c, 12);
  }
}

TEST_CASE("moxe layer (host): gradients match finite differences, shared experts") {
  // always-on experts beside the routed ones: y = x3 + combine + sum_s (f_s(u) - u)
  using moxe_layer::SharedExpertKind;
  auto with_shared = [](ExpertMode mode, int count, SharedExpertKind kind) {
    LayerConfig c = tiny_config(mode);
    c.shared_experts = count;
    c.shared_expert_kind = kind;
    return c;
  };
  SUBCASE("one mLSTM shared expert, per-token") {
    check_gradients(with_shared(ExpertMode::per_token, 1, SharedExpertKind::mlstm));
  }
  SUBCASE("one sLSTM shared expert, stateful") {
    check_gradients(with_shared(ExpertMode::stateful, 1, SharedExpertKind::slstm));
  }
  SUBCASE("two mLSTM shared experts, stateful") {
    check_gradients(with_shared(ExpertMode::stateful, 2, SharedExpertKind::mlstm));
  }
  SUBCASE("two sLSTM shared experts, per-token") {
    check_gradients(with_shared(ExpertMode::per_token, 2, SharedExpertKind::slstm));
  }
}

TEST_CASE("moxe layer (host): shared experts add their residual deltas to the output") {
  // Same routed weights and input with and without a shared expert: the gate, the losses
  // and the routed combine agree exactly; y differs by f_s(u) - u.
  const std::uint64_t seed = moxe::test::fresh_seed();
  INFO("seed = " << seed);
  for (ExpertMode mode : {ExpertMode::per_token, ExpertMode::stateful}) {
    moxe::test::Rng rng(seed);
    LayerConfig with = tiny_config(mode);
    with.shared_experts = 1;
    Problem p = make_problem(with, rng);
    LayerConfig without = with;
    without.shared_experts = 0;
    LayerWeights w0 = p.w;
    w0.shared_mlstm_experts.clear();
    LayerCache ka, kb;
    REQUIRE(moxe_layer::forward(with, p.w, p.x, ka) == moxe::Status::ok);
    REQUIRE(moxe_layer::forward(without, w0, p.x, kb) == moxe::Status::ok);
    CHECK(ka.topk_idx == kb.topk_idx);
    CHECK(ka.combine == kb.combine);
    for (int i = 0; i < 4; ++i) CHECK(ka.losses[i] == kb.losses[i]);
    REQUIRE(ka.shared.size() == 1);
    Vec expected(kb.y.size());
    for (std::size_t i = 0; i < expected.size(); ++i) expected[i] = kb.y[i] + (ka.shared[0].out[i] - ka.u[i]);
    CHECK(moxe::test::rel_error(ka.y, expected) < 1e-14);
    CHECK(moxe::test::rel_error(ka.y, kb.y) > 1e-8);
  }
}
