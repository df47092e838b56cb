// Device tests of the routing losses: values and gradients against the references,
// determinism, bad arguments.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <type_traits>
#include <vector>

#include "device_utils.cuh"
#include "loss_routing.hpp"
#include "moxe/loss/balance.cuh"
#include "moxe/loss/reference.hpp"
#include "test_utils.hpp"

using moxe::Status;
namespace mt = moxe::test;
namespace lr = moxe::loss::reference;
using moxe::test::Routing;

namespace {

template <class F>
Status run(std::size_t bytes, F&& f) {
  mt::MisalignedWorkspace ws(bytes);
  return f(ws.get(), ws.bytes());
}

/// How far a float group-balance loss may be from the double reference. L = sum_g m_g
/// log(G m_g) is second order in m_g - 1/G near balance (it can be ~1e-5 and less), but the
/// rounding of the masses enters it at first order, with weight dL/dm_g = log(G m_g) + 1: an
/// absolute error of about 2^-24 x sum_g m_g |log(G m_g) + 1| even from correctly rounded
/// masses, far above a relative tolerance of such an L. So: `rel` x |L| for the logarithms and
/// the sum, plus what a relative error `mass_rel` of each mass (the tolerance the masses are
/// held to) propagates to at first order.
double group_loss_tolerance(double loss, const std::vector<double>& mass, double rel, double mass_rel) {
  const double groups = static_cast<double>(mass.size());
  double first_order = 0;
  for (double m : mass) first_order += m * std::fabs(std::log(groups * m + moxe::loss::detail::kGroupLossEps) + 1);
  return rel * std::fabs(loss) + mass_rel * first_order;
}

}  // namespace

TEST_CASE_TEMPLATE("z-loss device matches the reference", T, float, __nv_bfloat16, __half) {
  mt::Rng rng(mt::fresh_seed());
  // 9000 (small: 8193) > 1024 blocks x 8 warps: the forward's grid strides and its scalar
  // sum loops. Small mode keeps T = 1, E = 2 and the lane loop's ragged passes (E = 64, 1000)
  // at 37 tokens, drops the large products, and strides the forward's grid in float only (the
  // element type changes only the loads) and without the backward there (one warp per token,
  // its grid strides only past 2^19 tokens).
  const auto token_counts = std::is_same_v<T, float> ? mt::sizes<int64_t>({1, 333, 5000, 9000}, {1, 37, 8193})
                                                      : mt::sizes<int64_t>({1, 333, 5000, 9000}, {1, 37});
  for (int64_t tokens : token_counts)
    for (int E : {2, 64, 1000}) {
      if (tokens * E > mt::size<int64_t>(5000000, 40000)) continue;  // keep the host side small
      const auto z = mt::round_through<T>(mt::normal_vector<double>(rng, tokens * E, 2.0));
      double want = 0;
      moxe::loss::ZLossParams<double, double> rp{{tokens, E}, z.data(), &want};
      REQUIRE(lr::z_loss(rp) == Status::ok);
      std::vector<double> gwant(z.size());
      REQUIRE(lr::z_loss_backward(moxe::loss::ZLossBackwardParams<double, double>{rp, 0.5, gwant.data()}) == Status::ok);
      mt::DeviceBuffer<T> dz(mt::convert_to<T>(z)), dg(z.size());
      mt::DeviceBuffer<float> loss(1);
      loss.poison();
      moxe::loss::ZLossParams<T, float> p{{tokens, E}, dz.get(), loss.get()};
      REQUIRE(run(moxe::loss::z_loss_workspace_size(p), [&](void* w, std::size_t b) {
                return moxe::loss::z_loss(p, w, b, nullptr);
              }) == Status::ok);
      CHECK(loss.download()[0] == doctest::Approx(want).epsilon(1e-5));
      if (mt::small_sizes() && tokens > 8192) continue;
      moxe::loss::ZLossBackwardParams<T, float> bp{p, 0.5f, dg.get()};
      dg.poison();
      REQUIRE(moxe::loss::z_loss_backward(bp, nullptr, 0, nullptr) == Status::ok);
      CHECK(mt::rel_error(mt::convert_to_double(dg.download()), gwant) < (std::is_same_v<T, float> ? 1e-5 : 1e-2));
    }
}

TEST_CASE("balance losses on the device match the references") {
  mt::Rng rng(mt::fresh_seed());
  // 20000 (small: 16385) tokens: more than the stage-one block caps (1024 blocks of 8 tokens,
  // 256 blocks of 64 tokens), so grids stride and blocks take more rows; small mode keeps every
  // E at 1 and 77 tokens and the capped grids at E = 2.
  for (int64_t tokens : mt::sizes<int64_t>({1, 77, 20000}, {1, 77, 16385}))
    for (int E : {2, 8, 64, 256, 1000}) {
      if (tokens * E > mt::size<int64_t>(5000000, 80000)) continue;  // keep the host side small
      const int K = std::min(E, 4);
      CAPTURE(tokens);
      CAPTURE(E);
      Routing r(rng, tokens, E, K);
      const auto probs = mt::round_through<float>(r.probs);
      mt::DeviceBuffer<float> dprobs(mt::convert_to<float>(probs)), loss(1), grad(probs.size()), load(E);
      mt::DeviceBuffer<int32_t> didx(r.idx);
      const moxe::loss::Dims dims{tokens, E, K};
      std::vector<double> gwant(probs.size());
      double want = 0;

      // MoxE load balance
      std::vector<double> lwant(E);
      moxe::loss::LoadBalanceParams<double> lb_ref{dims, probs.data(), r.idx.data(), &want, lwant.data()};
      REQUIRE(lr::load_balance(lb_ref) == Status::ok);
      REQUIRE(lr::load_balance_backward(moxe::loss::LoadBalanceBackwardParams<double>{lb_ref, 1.5, gwant.data()}) ==
              Status::ok);
      moxe::loss::LoadBalanceParams<float> lb{dims, dprobs.get(), didx.get(), loss.get(), load.get()};
      loss.poison();
      REQUIRE(run(moxe::loss::load_balance_workspace_size(lb), [&](void* w, std::size_t b) {
                return moxe::loss::load_balance(lb, w, b, nullptr);
              }) == Status::ok);
      CHECK(loss.download()[0] == doctest::Approx(want).epsilon(1e-4).scale(1e-7));
      CHECK(mt::rel_error(load.download(), lwant) < 1e-5);
      moxe::loss::LoadBalanceBackwardParams<float> lbb{lb, 1.5f, grad.get()};
      grad.poison();
      REQUIRE(run(moxe::loss::load_balance_backward_workspace_size(lbb), [&](void* w, std::size_t b) {
                return moxe::loss::load_balance_backward(lbb, w, b, nullptr);
              }) == Status::ok);
      CHECK(mt::rel_error(grad.download(), gwant) < 1e-4);

      // Switch load balance
      moxe::loss::SwitchLoadBalanceParams<double> sw_ref{dims, probs.data(), r.idx.data(), &want};
      REQUIRE(lr::switch_load_balance(sw_ref) == Status::ok);
      REQUIRE(lr::switch_load_balance_backward(
                  moxe::loss::SwitchLoadBalanceBackwardParams<double>{sw_ref, 0.7, gwant.data()}) == Status::ok);
      moxe::loss::SwitchLoadBalanceParams<float> sw{dims, dprobs.get(), didx.get(), loss.get()};
      loss.poison();
      REQUIRE(run(moxe::loss::switch_load_balance_workspace_size(sw), [&](void* w, std::size_t b) {
                return moxe::loss::switch_load_balance(sw, w, b, nullptr);
              }) == Status::ok);
      CHECK(loss.download()[0] == doctest::Approx(want).epsilon(1e-5));
      moxe::loss::SwitchLoadBalanceBackwardParams<float> swb{sw, 0.7f, grad.get()};
      grad.poison();
      REQUIRE(run(moxe::loss::switch_load_balance_backward_workspace_size(swb), [&](void* w, std::size_t b) {
                return moxe::loss::switch_load_balance_backward(swb, w, b, nullptr);
              }) == Status::ok);
      CHECK(mt::rel_error(grad.download(), gwant) < 1e-5);

      // group balance over uneven groups
      std::vector<int32_t> offsets = {0, 1, E / 3 + 1, E};
      if (E == 2) offsets = {0, 1, 2};
      const int G = static_cast<int>(offsets.size()) - 1;
      mt::DeviceBuffer<int32_t> doffsets(offsets);
      std::vector<double> mwant(G);
      moxe::loss::GroupBalanceParams<double> gb_ref{dims, G, offsets.data(), probs.data(), &want, mwant.data()};
      REQUIRE(lr::group_balance(gb_ref) == Status::ok);
      REQUIRE(lr::group_balance_backward(moxe::loss::GroupBalanceBackwardParams<double>{gb_ref, 0.3, gwant.data()}) ==
              Status::ok);
      mt::DeviceBuffer<float> mass(G);
      moxe::loss::GroupBalanceParams<float> gb{dims, G, doffsets.get(), dprobs.get(), loss.get(), mass.get()};
      loss.poison();
      REQUIRE(run(moxe::loss::group_balance_workspace_size(gb), [&](void* w, std::size_t b) {
                return moxe::loss::group_balance(gb, w, b, nullptr);
              }) == Status::ok);
      // the masses are held to 1e-5 (next check); their rounding reaches the loss at first order
      CHECK(std::fabs(loss.download()[0] - want) <= group_loss_tolerance(want, mwant, 1e-4, 1e-5));
      CHECK(mt::rel_error(mass.download(), mwant) < 1e-5);
      moxe::loss::GroupBalanceBackwardParams<float> gbb{gb, 0.3f, grad.get()};
      grad.poison();
      REQUIRE(run(moxe::loss::group_balance_backward_workspace_size(gbb), [&](void* w, std::size_t b) {
                return moxe::loss::group_balance_backward(gbb, w, b, nullptr);
              }) == Status::ok);
      CHECK(mt::rel_error(grad.download(), gwant) < 1e-5);
    }
}

TEST_CASE("difficulty loss device matches the reference; runs are bitwise equal") {
  mt::Rng rng(mt::fresh_seed());
  // 100003 (small: 65537) tokens: more than 256 partial blocks, so the final sum loops
  for (int64_t tokens : mt::sizes<int64_t>({1, 255, 100003}, {1, 255, 65537})) {
    const auto d = mt::round_through<float>(mt::uniform_vector<double>(rng, tokens, 0, 1));
    const auto h = mt::round_through<float>(mt::uniform_vector<double>(rng, tokens, 0, 1));
    double want = 0;
    moxe::loss::DifficultyLossParams<double> rp{tokens, d.data(), h.data(), &want};
    REQUIRE(lr::difficulty_loss(rp) == Status::ok);
    std::vector<double> gd(tokens), gh(tokens);
    REQUIRE(lr::difficulty_loss_backward(
                moxe::loss::DifficultyLossBackwardParams<double>{rp, 2.0, gd.data(), gh.data()}) == Status::ok);
    mt::DeviceBuffer<float> dd(mt::convert_to<float>(d)), dh(mt::convert_to<float>(h)), loss(1), g1(tokens), g2(tokens);
    moxe::loss::DifficultyLossParams<float> p{tokens, dd.get(), dh.get(), loss.get()};
    float first = 0;
    for (int run_index = 0; run_index < 2; ++run_index) {
      loss.poison();
      REQUIRE(run(moxe::loss::difficulty_loss_workspace_size(p), [&](void* w, std::size_t b) {
                return moxe::loss::difficulty_loss(p, w, b, nullptr);
              }) == Status::ok);
      const float got = loss.download()[0];
      if (run_index == 0) first = got;
      else CHECK(std::memcmp(&first, &got, sizeof(float)) == 0);
    }
    CHECK(first == doctest::Approx(want).epsilon(1e-5));
    moxe::loss::DifficultyLossBackwardParams<float> b{p, 2.f, g1.get(), g2.get()};
    REQUIRE(moxe::loss::difficulty_loss_backward(b, nullptr, 0, nullptr) == Status::ok);
    CHECK(mt::rel_error(g1.download(), gd) < 1e-6);
    CHECK(mt::rel_error(g2.download(), gh) < 1e-6);
  }
}

TEST_CASE("device losses reject bad input and a small workspace") {
  mt::DeviceBuffer<float> probs(16), loss(1);
  mt::DeviceBuffer<int32_t> idx(8);
  loss.poison();
  moxe::loss::LoadBalanceParams<float> p{{4, 4, 5}, probs.get(), idx.get(), loss.get()};
  CHECK(moxe::loss::load_balance(p, nullptr, 0, nullptr) == Status::invalid_argument);
  p.dims = {4, 4, 2};
  const std::size_t bytes = moxe::loss::load_balance_workspace_size(p);
  mt::MisalignedWorkspace ws(bytes);
  CHECK(moxe::loss::load_balance(p, ws.get(), bytes / 2, nullptr) == Status::workspace_too_small);
  p.loss = nullptr;
  CHECK(moxe::loss::load_balance(p, ws.get(), bytes, nullptr) == Status::invalid_argument);
  MOXE_TEST_CUDA(cudaDeviceSynchronize());
  CHECK(std::isnan(loss.download()[0]));
}

TEST_CASE("device losses: -1 and corrupt slots skipped, upstream gradient read from device memory") {
  mt::Rng rng(mt::fresh_seed());
  const int64_t tokens = 45;
  const int E = 9, K = 3;
  Routing r(rng, tokens, E, K);
  for (int64_t t = 0; t < tokens; t += 4) r.idx[t * K + t % K] = -1;
  for (int64_t t = 1; t < tokens; t += 7) r.idx[t * K + (t + 1) % K] = (t % 2) ? E : -123456;
  const auto probs = mt::round_through<float>(r.probs);
  mt::DeviceBuffer<float> dprobs(mt::convert_to<float>(probs)), loss(1), grad(probs.size());
  mt::DeviceBuffer<float> upstream(std::vector<float>{-0.625f});
  mt::DeviceBuffer<int32_t> didx(r.idx);
  const moxe::loss::Dims dims{tokens, E, K};
  std::vector<double> gwant(probs.size());
  double want = 0;

  moxe::loss::LoadBalanceParams<double> lb_ref{dims, probs.data(), r.idx.data(), &want};
  REQUIRE(lr::load_balance(lb_ref) == Status::ok);
  REQUIRE(lr::load_balance_backward(moxe::loss::LoadBalanceBackwardParams<double>{lb_ref, -0.625, gwant.data()}) ==
          Status::ok);
  moxe::loss::LoadBalanceParams<float> lb{dims, dprobs.get(), didx.get(), loss.get()};
  loss.poison();
  REQUIRE(run(moxe::loss::load_balance_workspace_size(lb), [&](void* w, std::size_t b) {
            return moxe::loss::load_balance(lb, w, b, nullptr);
          }) == Status::ok);
  CHECK(loss.download()[0] == doctest::Approx(want).epsilon(1e-5));
  moxe::loss::LoadBalanceBackwardParams<float> lbb{lb, 99.f, grad.get()};
  lbb.loss_grad = upstream.get();  // replaces the 99
  grad.poison();
  REQUIRE(run(moxe::loss::load_balance_backward_workspace_size(lbb), [&](void* w, std::size_t b) {
            return moxe::loss::load_balance_backward(lbb, w, b, nullptr);
          }) == Status::ok);
  CHECK(mt::rel_error(grad.download(), gwant) < 1e-5);

  moxe::loss::SwitchLoadBalanceParams<double> sw_ref{dims, probs.data(), r.idx.data(), &want};
  REQUIRE(lr::switch_load_balance(sw_ref) == Status::ok);
  REQUIRE(lr::switch_load_balance_backward(
              moxe::loss::SwitchLoadBalanceBackwardParams<double>{sw_ref, -0.625, gwant.data()}) == Status::ok);
  moxe::loss::SwitchLoadBalanceParams<float> sw{dims, dprobs.get(), didx.get(), loss.get()};
  loss.poison();
  REQUIRE(run(moxe::loss::switch_load_balance_workspace_size(sw), [&](void* w, std::size_t b) {
            return moxe::loss::switch_load_balance(sw, w, b, nullptr);
          }) == Status::ok);
  CHECK(loss.download()[0] == doctest::Approx(want).epsilon(1e-5));
  moxe::loss::SwitchLoadBalanceBackwardParams<float> swb{sw, 99.f, grad.get()};
  swb.loss_grad = upstream.get();
  grad.poison();
  REQUIRE(run(moxe::loss::switch_load_balance_backward_workspace_size(swb), [&](void* w, std::size_t b) {
            return moxe::loss::switch_load_balance_backward(swb, w, b, nullptr);
          }) == Status::ok);
  CHECK(mt::rel_error(grad.download(), gwant) < 1e-5);

  // z-loss and difficulty loss with the upstream gradient in device memory
  const auto z = mt::round_through<float>(mt::normal_vector<double>(rng, tokens * E));
  moxe::loss::ZLossParams<double, double> z_ref{{tokens, E}, z.data(), &want};
  REQUIRE(lr::z_loss_backward(moxe::loss::ZLossBackwardParams<double, double>{z_ref, -0.625, gwant.data()}) ==
          Status::ok);
  mt::DeviceBuffer<float> dz(mt::convert_to<float>(z));
  moxe::loss::ZLossBackwardParams<float> zb{{{tokens, E}, dz.get(), loss.get()}, 99.f, grad.get()};
  zb.loss_grad = upstream.get();
  grad.poison();
  REQUIRE(moxe::loss::z_loss_backward(zb, nullptr, 0, nullptr) == Status::ok);
  CHECK(mt::rel_error(grad.download(), gwant) < 1e-5);
  const auto d = mt::round_through<float>(mt::uniform_vector<double>(rng, tokens, 0, 1));
  const auto h = mt::round_through<float>(mt::uniform_vector<double>(rng, tokens, 0, 1));
  std::vector<double> gd(tokens);
  moxe::loss::DifficultyLossParams<double> d_ref{tokens, d.data(), h.data(), &want};
  REQUIRE(lr::difficulty_loss_backward(moxe::loss::DifficultyLossBackwardParams<double>{d_ref, -0.625, gd.data()}) ==
          Status::ok);
  mt::DeviceBuffer<float> dd(mt::convert_to<float>(d)), dh(mt::convert_to<float>(h)), gdd(tokens);
  moxe::loss::DifficultyLossBackwardParams<float> db{{tokens, dd.get(), dh.get(), loss.get()}, 99.f, gdd.get()};
  db.loss_grad = upstream.get();
  gdd.poison();
  REQUIRE(moxe::loss::difficulty_loss_backward(db, nullptr, 0, nullptr) == Status::ok);
  CHECK(mt::rel_error(gdd.download(), gd) < 1e-6);
}

TEST_CASE("group balance on the device reads corrupt offsets as their clamped running maximum") {
  mt::Rng rng(mt::fresh_seed());
  const int64_t tokens = 13;
  const int E = 8;
  Routing r(rng, tokens, E, 1);
  const auto probs = mt::round_through<float>(r.probs);
  mt::DeviceBuffer<float> dprobs(mt::convert_to<float>(probs)), loss(1), grad(probs.size());
  mt::DeviceBuffer<float> upstream(std::vector<float>{0.75f});
  // what the device reads (running maximum of the offsets clamped to [0, E]) is a valid
  // partition whenever it starts at 0 and ends at E: the reference of that partition is
  // the expected result
  const std::vector<std::pair<std::vector<int32_t>, std::vector<int32_t>>> cases = {
      {{0, 5, 3, 8}, {0, 5, 5, 8}},        // a decreasing offset: an empty group
      {{-3, 2, 100}, {0, 2, 8}},           // out of range: clamped
      {{0, 7, -1, 8}, {0, 7, 7, 8}},       // negative in the middle
      {{0, 9, 9, 9, 8}, {0, 8, 8, 8, 8}},  // past the end: empty trailing groups
  };
  for (const auto& [corrupt, effective] : cases) {
    const int G = static_cast<int>(corrupt.size()) - 1;
    CAPTURE(G);
    double want = 0;
    std::vector<double> mwant(G), gwant(probs.size());
    moxe::loss::GroupBalanceParams<double> ref{{tokens, E}, G, effective.data(), probs.data(), &want, mwant.data()};
    REQUIRE(lr::group_balance(ref) == Status::ok);
    REQUIRE(lr::group_balance_backward(moxe::loss::GroupBalanceBackwardParams<double>{ref, 0.75, gwant.data()}) ==
            Status::ok);
    mt::DeviceBuffer<int32_t> doffsets(corrupt);
    mt::DeviceBuffer<float> mass(G);
    mass.poison();
    loss.poison();
    moxe::loss::GroupBalanceParams<float> gb{{tokens, E}, G, doffsets.get(), dprobs.get(), loss.get(), mass.get()};
    REQUIRE(run(moxe::loss::group_balance_workspace_size(gb), [&](void* w, std::size_t b) {
              return moxe::loss::group_balance(gb, w, b, nullptr);
            }) == Status::ok);
    CHECK(std::fabs(loss.download()[0] - want) <= group_loss_tolerance(want, mwant, 1e-5, 1e-6));
    CHECK(mt::rel_error(mass.download(), mwant) < 1e-6);
    moxe::loss::GroupBalanceBackwardParams<float> gbb{gb, 99.f, grad.get()};
    gbb.loss_grad = upstream.get();
    grad.poison();
    REQUIRE(run(moxe::loss::group_balance_backward_workspace_size(gbb), [&](void* w, std::size_t b) {
              return moxe::loss::group_balance_backward(gbb, w, b, nullptr);
            }) == Status::ok);
    CHECK(mt::rel_error(grad.download(), gwant) < 1e-5);
  }
  // offsets that do not start at 0: experts before the first offset are in no group (no
  // mass, zero gradient)
  const std::vector<int32_t> late = {3, 5, 8};
  mt::DeviceBuffer<int32_t> doffsets(late);
  mt::DeviceBuffer<float> mass(2);
  moxe::loss::GroupBalanceParams<float> gb{{tokens, E}, 2, doffsets.get(), dprobs.get(), loss.get(), mass.get()};
  moxe::loss::GroupBalanceBackwardParams<float> gbb{gb, 1.f, grad.get()};
  grad.poison();
  REQUIRE(run(moxe::loss::group_balance_backward_workspace_size(gbb), [&](void* w, std::size_t b) {
            return moxe::loss::group_balance_backward(gbb, w, b, nullptr);
          }) == Status::ok);
  const auto g = grad.download();
  for (int64_t t = 0; t < tokens; ++t)
    for (int e = 0; e < 3; ++e) CHECK(g[t * E + e] == 0.f);
  double m0 = 0;
  for (int64_t t = 0; t < tokens; ++t) m0 += probs[t * E + 3] + probs[t * E + 4];
  m0 /= tokens;
  const double g0 = std::log(2 * m0 + 1e-8) + 2 * m0 / (2 * m0 + 1e-8);
  CHECK(g[3] == doctest::Approx(g0 / tokens).epsilon(1e-5));
}
