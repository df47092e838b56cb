// Host tests of the loss references: values against the definitions, gradients against
// finite differences, uneven groups, argument checks.
#include <doctest/doctest.h>

#include <cmath>
#include <numeric>

#include "loss_routing.hpp"
#include "moxe/loss/reference.hpp"
#include "test_utils.hpp"

using moxe::Status;
namespace mt = moxe::test;
namespace lr = moxe::loss::reference;
using moxe::test::Routing;

TEST_CASE("z-loss: value and gradient") {
  mt::Rng rng(mt::fresh_seed());
  for (int E : {2, 8, 64, 1000}) {
    const int T = E > 100 ? 2 : 5;
    auto z = mt::normal_vector<double>(rng, T * E, 2.0);
    double loss = NAN;
    moxe::loss::ZLossParams<double, double> p{{T, E}, z.data(), &loss};
    REQUIRE(lr::z_loss(p) == Status::ok);
    double want = 0;
    for (int t = 0; t < T; ++t) {
      double s = 0;
      for (int e = 0; e < E; ++e) s += std::exp(z[t * E + e]);
      want += std::log(s) * std::log(s) / T;
    }
    CHECK(loss == doctest::Approx(want).epsilon(1e-12));
    std::vector<double> dz(T * E);
    REQUIRE(lr::z_loss_backward(moxe::loss::ZLossBackwardParams<double, double>{p, 0.7, dz.data()}) == Status::ok);
    auto f = [&] { lr::z_loss(p); return 0.7 * loss; };
    if (E <= 64) CHECK(mt::gradient_error(f, z, dz) < 1e-7);
  }
}

TEST_CASE("MoxE load balance: value and gradient") {
  mt::Rng rng(mt::fresh_seed());
  for (int E : {2, 4, 8, 64}) {
    const int K = std::min(E, 3), T = 6;
    Routing r(rng, T, E, K);
    double loss = NAN;
    std::vector<double> load(E);
    moxe::loss::LoadBalanceParams<double> p{{T, E, K}, r.probs.data(), r.idx.data(), &loss, load.data()};
    REQUIRE(lr::load_balance(p) == Status::ok);
    double want = 0, total = 0;
    for (int e = 0; e < E; ++e) {
      double u = 0;
      for (int t = 0; t < T; ++t)
        for (int k = 0; k < K; ++k)
          if (r.idx[t * K + k] == e) u += r.probs[t * E + e];
      u /= T * K;
      CHECK(load[e] == doctest::Approx(u));
      total += u;
      want += (u - 1.0 / E) * (u - 1.0 / E);
    }
    CHECK(loss == doctest::Approx(want).epsilon(1e-12));
    std::vector<double> dp(T * E);
    REQUIRE(lr::load_balance_backward(moxe::loss::LoadBalanceBackwardParams<double>{p, 1.3, dp.data()}) == Status::ok);
    auto f = [&] { lr::load_balance(p); return 1.3 * loss; };
    CHECK(mt::gradient_error(f, r.probs, dp) < 1e-7);
  }
}

TEST_CASE("Switch load balance: value and gradient") {
  mt::Rng rng(mt::fresh_seed());
  for (int E : {2, 8, 64}) {
    const int K = std::min(E, 2), T = 7;
    Routing r(rng, T, E, K);
    double loss = NAN;
    moxe::loss::SwitchLoadBalanceParams<double> p{{T, E, K}, r.probs.data(), r.idx.data(), &loss};
    REQUIRE(lr::switch_load_balance(p) == Status::ok);
    double want = 0;
    for (int e = 0; e < E; ++e) {
      double f = 0, P = 0;
      for (int i = 0; i < T * K; ++i) f += r.idx[i] == e;
      for (int t = 0; t < T; ++t) P += r.probs[t * E + e];
      want += E * (f / (T * K)) * (P / T);
    }
    CHECK(loss == doctest::Approx(want).epsilon(1e-12));
    std::vector<double> dp(T * E);
    REQUIRE(lr::switch_load_balance_backward(moxe::loss::SwitchLoadBalanceBackwardParams<double>{p, 0.4, dp.data()}) ==
            Status::ok);
    auto f = [&] { lr::switch_load_balance(p); return 0.4 * loss; };
    CHECK(mt::gradient_error(f, r.probs, dp) < 1e-7);
  }
}

TEST_CASE("group balance (KL to uniform) over uneven groups: value and gradient") {
  mt::Rng rng(mt::fresh_seed());
  const int T = 5, E = 11;
  Routing r(rng, T, E, 1);
  for (std::vector<int32_t> offsets : {std::vector<int32_t>{0, 5, 11}, std::vector<int32_t>{0, 1, 4, 4, 11},
                                       std::vector<int32_t>{0, 11}}) {
    const int G = static_cast<int>(offsets.size()) - 1;
    double loss = NAN;
    std::vector<double> mass(G);
    moxe::loss::GroupBalanceParams<double> p{{T, E}, G, offsets.data(), r.probs.data(), &loss, mass.data()};
    REQUIRE(lr::group_balance(p) == Status::ok);
    double want = 0;
    for (int g = 0; g < G; ++g) {
      double P = 0;
      for (int t = 0; t < T; ++t)
        for (int e = offsets[g]; e < offsets[g + 1]; ++e) P += r.probs[t * E + e];
      P /= T;
      CHECK(mass[g] == doctest::Approx(P));
      want += P * std::log(G * P + 1e-8);
    }
    CHECK(loss == doctest::Approx(want).epsilon(1e-12));
    std::vector<double> dp(T * E);
    REQUIRE(lr::group_balance_backward(moxe::loss::GroupBalanceBackwardParams<double>{p, 0.9, dp.data()}) == Status::ok);
    auto f = [&] { lr::group_balance(p); return 0.9 * loss; };
    CHECK(mt::gradient_error(f, r.probs, dp) < 1e-7);
  }
  std::vector<int32_t> bad = {0, 6, 5, 11};
  double loss = NAN;
  moxe::loss::GroupBalanceParams<double> p{{T, E}, 3, bad.data(), r.probs.data(), &loss};
  CHECK(lr::group_balance(p) == Status::invalid_argument);
  CHECK(std::isnan(loss));
}

TEST_CASE("difficulty loss: value and gradient") {
  mt::Rng rng(mt::fresh_seed());
  const int T = 9;
  auto d = mt::uniform_vector<double>(rng, T, 0, 1), h = mt::uniform_vector<double>(rng, T, 0, 1);
  double loss = NAN;
  moxe::loss::DifficultyLossParams<double> p{T, d.data(), h.data(), &loss};
  REQUIRE(lr::difficulty_loss(p) == Status::ok);
  double want = 0;
  for (int t = 0; t < T; ++t) want += (d[t] - h[t]) * (d[t] - h[t]) / T;
  CHECK(loss == doctest::Approx(want).epsilon(1e-12));
  std::vector<double> gd(T), gh(T);
  REQUIRE(lr::difficulty_loss_backward(moxe::loss::DifficultyLossBackwardParams<double>{p, 2.0, gd.data(), gh.data()}) ==
          Status::ok);
  auto f = [&] { lr::difficulty_loss(p); return 2.0 * loss; };
  CHECK(mt::gradient_error(f, d, gd) < 1e-7);
  CHECK(mt::gradient_error(f, h, gh) < 1e-7);
}

TEST_CASE("loss references reject bad input") {
  std::vector<double> probs(8, 0.25);
  std::vector<int32_t> idx(2, 0);
  double loss = NAN;
  moxe::loss::LoadBalanceParams<double> p{{2, 4, 5}, probs.data(), idx.data(), &loss};
  CHECK(lr::load_balance(p) == Status::invalid_argument);
  p.dims = {0, 4, 1};
  CHECK(lr::load_balance(p) == Status::invalid_argument);
  p.dims = {2, 4, 1};
  p.loss = nullptr;
  CHECK(lr::load_balance(p) == Status::invalid_argument);
  CHECK(std::isnan(loss));
  moxe::loss::ZLossParams<double, double> z{{2, 0}, probs.data(), &loss};
  CHECK(lr::z_loss(z) == Status::invalid_argument);
}

TEST_CASE("-1 and out-of-range slots are skipped by the routed losses") {
  mt::Rng rng(mt::fresh_seed());
  const int T = 6, E = 5, K = 3;
  Routing r(rng, T, E, K);
  // drop some slots: -1 (not routed) and corrupt values outside [0, E)
  r.idx[1] = -1;
  r.idx[4] = E;
  r.idx[9] = -7;
  std::vector<int32_t> kept = r.idx;
  double loss = NAN;
  std::vector<double> load(E);
  moxe::loss::LoadBalanceParams<double> p{{T, E, K}, r.probs.data(), kept.data(), &loss, load.data()};
  REQUIRE(lr::load_balance(p) == Status::ok);
  double want = 0;
  for (int e = 0; e < E; ++e) {
    double u = 0;
    for (int i = 0; i < T * K; ++i)
      if (kept[i] == e) u += r.probs[(i / K) * E + e];
    u /= T * K;  // the slots keep their share of the denominator
    CHECK(load[e] == doctest::Approx(u));
    want += (u - 1.0 / E) * (u - 1.0 / E);
  }
  CHECK(loss == doctest::Approx(want).epsilon(1e-12));
  std::vector<double> dp(T * E);
  REQUIRE(lr::load_balance_backward(moxe::loss::LoadBalanceBackwardParams<double>{p, 0.8, dp.data()}) == Status::ok);
  auto f = [&] { lr::load_balance(p); return 0.8 * loss; };
  CHECK(mt::gradient_error(f, r.probs, dp) < 1e-7);

  moxe::loss::SwitchLoadBalanceParams<double> s{{T, E, K}, r.probs.data(), kept.data(), &loss};
  REQUIRE(lr::switch_load_balance(s) == Status::ok);
  double swant = 0;
  for (int e = 0; e < E; ++e) {
    double fe = 0, P = 0;
    for (int i = 0; i < T * K; ++i) fe += kept[i] == e;
    for (int t = 0; t < T; ++t) P += r.probs[t * E + e];
    swant += E * (fe / (T * K)) * (P / T);
  }
  CHECK(loss == doctest::Approx(swant).epsilon(1e-12));
}

TEST_CASE("loss backwards read the upstream gradient from memory when loss_grad is set") {
  mt::Rng rng(mt::fresh_seed());
  const int T = 4, E = 6, K = 2;
  Routing r(rng, T, E, K);
  auto z = mt::normal_vector<double>(rng, T * E);
  auto d = mt::uniform_vector<double>(rng, T, 0, 1), h = mt::uniform_vector<double>(rng, T, 0, 1);
  std::vector<int32_t> offsets = {0, 2, 6};
  double loss = 0, upstream = -1.7;
  std::vector<double> by_scalar(T * E), by_pointer(T * E), d2(T), h2(T);
  auto same = [&](auto params, auto backward) {
    params.dloss = upstream;
    params.loss_grad = nullptr;
    REQUIRE(backward(params) == Status::ok);
    const auto first = by_scalar = by_pointer;
    params.dloss = 123.0;  // ignored
    params.loss_grad = &upstream;
    REQUIRE(backward(params) == Status::ok);
    CHECK(by_pointer == first);
  };
  moxe::loss::ZLossParams<double, double> zp{{T, E}, z.data(), &loss};
  same(moxe::loss::ZLossBackwardParams<double, double>{zp, 0, by_pointer.data()},
       [](const auto& b) { return lr::z_loss_backward(b); });
  moxe::loss::LoadBalanceParams<double> lp{{T, E, K}, r.probs.data(), r.idx.data(), &loss};
  same(moxe::loss::LoadBalanceBackwardParams<double>{lp, 0, by_pointer.data()},
       [](const auto& b) { return lr::load_balance_backward(b); });
  moxe::loss::SwitchLoadBalanceParams<double> sp{{T, E, K}, r.probs.data(), r.idx.data(), &loss};
  same(moxe::loss::SwitchLoadBalanceBackwardParams<double>{sp, 0, by_pointer.data()},
       [](const auto& b) { return lr::switch_load_balance_backward(b); });
  moxe::loss::GroupBalanceParams<double> gp{{T, E}, 2, offsets.data(), r.probs.data(), &loss};
  same(moxe::loss::GroupBalanceBackwardParams<double>{gp, 0, by_pointer.data()},
       [](const auto& b) { return lr::group_balance_backward(b); });
  moxe::loss::DifficultyLossParams<double> dp{T, d.data(), h.data(), &loss};
  by_pointer.assign(T, 0.0);
  same(moxe::loss::DifficultyLossBackwardParams<double>{dp, 0, by_pointer.data()},
       [](const auto& b) { return lr::difficulty_loss_backward(b); });
}
