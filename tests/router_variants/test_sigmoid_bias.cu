// Device tests of sigmoid scoring with a selection bias: forward (plain and group-limited)
// and backward against the double reference, per-expert counts, the bias update,
// determinism, poisoned outputs, T = 1 and T off the block size, bad input. Small-size mode
// (MOXE_TEST_SMALL) keeps every shape of E and k at fewer tokens.
#include <doctest/doctest.h>

#include <algorithm>

#include "backward_check.cuh"
#include "device_check.hpp"
#include "device_utils.cuh"
#include "graph_capture.cuh"
#include "moxe/router/variants/reference.hpp"
#include "moxe/router/variants/sigmoid_bias.cuh"
#include "test_utils.hpp"
#include "variants_problem.hpp"

using moxe::Status;
namespace mt = moxe::test;
namespace mv = moxe::test::variants;
namespace rv = moxe::router::variants;
namespace rvr = moxe::router::variants::reference;

namespace {

/// large_logits: logits uniform in [-4, 20] and no bias, so the chosen ones (the largest)
/// sit where sigmoid'(z) from the rounded s = sigmoid(z) has lost its digits (half: where
/// e^-z is past half's range too, the stored gradient is 0 or subnormal, checked as such).
template <class T>
void check_sigmoid_bias(mt::Rng& rng, int64_t T_, int E, int K, int G, int TG, bool renorm, bool large_logits = false) {
  CAPTURE(T_);
  CAPTURE(E);
  CAPTURE(K);
  CAPTURE(G);
  CAPTURE(renorm);
  CAPTURE(large_logits);
  mv::SigmoidBiasProblem prob(rng, T_, E, K, G, TG, renorm, 2.0);
  if (large_logits) {
    prob.logits = mt::uniform_vector<double>(rng, T_ * E, -4.0, 20.0);
    prob.bias.assign(E, 0.0);
  }
  prob.logits = mt::round_through<T>(prob.logits);
  prob.bias = mt::round_through<float>(prob.bias);
  REQUIRE(prob.forward() == Status::ok);
  mt::DeviceBuffer<T> dz(mt::convert_to<T>(prob.logits)), dgrad(T_ * E);
  mt::DeviceBuffer<float> dbias(mt::convert_to<float>(prob.bias)), dscore(T_ * K), dweight(T_ * K);
  mt::DeviceBuffer<int32_t> didx(T_ * K), dcounts(E);
  didx.poison(); dscore.poison(); dweight.poison(); dcounts.poison(); dgrad.poison();
  rv::SigmoidBiasForwardParams<T, float> p{prob.dims,   dz.get(),     dbias.get(),     float(prob.routed_scaling),
                                           renorm,      didx.get(),   dscore.get(),    dweight.get(),
                                           dcounts.get()};
  mt::MisalignedWorkspace ws(rv::sigmoid_bias_forward_workspace_size(p));
  REQUIRE(rv::sigmoid_bias_forward(p, ws.get(), ws.bytes(), nullptr) == Status::ok);
  const auto got_idx = didx.download();
  const auto got_weight = dweight.download();
  const auto got_counts = dcounts.download();
  std::vector<int32_t> counts(E, 0);
  for (int64_t t = 0; t < T_; ++t) {
    bool same = true;
    for (int j = 0; j < K; ++j) {
      const int32_t e = got_idx[t * K + j];
      REQUIRE((e >= 0 && e < E));
      counts[e] += 1;
      same = same && e == prob.topk_idx[t * K + j];
    }
    if (!same) {
      CAPTURE(t);
      const auto sel = prob.keys(t);
      CHECK((mv::ambiguous_order(sel) || mv::ambiguous_order(prob.group_scores(sel))));
      continue;
    }
    for (int j = 0; j < K; ++j) CHECK(std::abs(got_weight[t * K + j] - prob.topk_weight[t * K + j]) <= 3e-5);
  }
  CHECK(got_counts == counts);
  REQUIRE(rv::sigmoid_bias_forward(p, ws.get(), ws.bytes(), nullptr) == Status::ok);
  CHECK(mv::bitwise_equal(didx.download(), got_idx));
  CHECK(mv::bitwise_equal(dweight.download(), got_weight));
  dcounts.poison();
  REQUIRE(mv::run_captured([&](cudaStream_t s) { return rv::sigmoid_bias_forward(p, ws.get(), ws.bytes(), s); }) ==
          Status::ok);
  CHECK(dcounts.download() == got_counts);

  const auto rp = prob.params();
  std::copy(got_idx.begin(), got_idx.end(), prob.topk_idx.begin());
  mv::check_backward<rv::SigmoidBiasBackwardParams>(
      rp, p, prob.dweight, dgrad, [](const auto& b) { return rvr::sigmoid_bias_backward(b); },
      [](const auto& b) { return rv::sigmoid_bias_backward(b, nullptr, 0, nullptr); });

  // the bias step from the device counts, against the reference on the same counts
  std::vector<double> bias_want = prob.bias;
  REQUIRE(rvr::bias_update(rv::BiasUpdateParams<double>{E, got_counts.data(), bias_want.data(), 1e-3}) == Status::ok);
  REQUIRE(rv::bias_update(rv::BiasUpdateParams<float>{E, dcounts.get(), dbias.get(), 1e-3f}, nullptr, 0, nullptr) ==
          Status::ok);
  CHECK(mt::rel_error(dbias.download(), bias_want) < 1e-6);
}

}  // namespace

TEST_CASE_TEMPLATE("sigmoid-bias device forward and backward match the reference", T, float, __nv_bfloat16, __half) {
  const auto seed = mt::fresh_seed();
  INFO("seed " << seed);
  mt::Rng rng(seed);
  // small: every row shape and selection path (4, 8 and 32 lanes; rounds and threshold
  // top-k; group limits) at fewer tokens, still several blocks and off the block size
  for (bool renorm : {true, false}) {
    check_sigmoid_bias<T>(rng, 1, 8, 2, 1, 1, renorm);
    check_sigmoid_bias<T>(rng, 37, 16, 4, 4, 2, renorm);
    check_sigmoid_bias<T>(rng, mt::size<int64_t>(1000, 21), 64, 8, 8, 4, renorm);
    check_sigmoid_bias<T>(rng, mt::size<int64_t>(1000, 21), 256, 8, 8, 4, renorm);  // DeepSeek-V3's shape
    check_sigmoid_bias<T>(rng, mt::size<int64_t>(333, 9), 256, 16, 1, 1, renorm);  // threshold top-k (k > 8)
    check_sigmoid_bias<T>(rng, mt::size<int64_t>(70, 5), 1024, 32, 16, 8, renorm);
  }
}

TEST_CASE_TEMPLATE("sigmoid-bias device backward at large logits (sigmoid' from z)", T, float, __nv_bfloat16, __half) {
  const auto seed = mt::fresh_seed();
  INFO("seed " << seed);
  mt::Rng rng(seed);
  for (bool renorm : {true, false}) {
    check_sigmoid_bias<T>(rng, 37, 16, 4, 1, 1, renorm, /*large_logits=*/true);
    check_sigmoid_bias<T>(rng, mt::size<int64_t>(100, 9), 128, 8, 8, 4, renorm, /*large_logits=*/true);
  }
}

TEST_CASE("sigmoid-bias device: bad input returns non-ok and writes nothing") {
  mt::DeviceBuffer<float> z(4 * 8), w(4 * 2), bias(8);
  mt::DeviceBuffer<int32_t> idx(4 * 2), counts(8);
  w.poison();
  bias.poison();
  rv::SigmoidBiasForwardParams<float, float> p{{4, 8, 2}, z.get(), nullptr, 1.f, true, idx.get(), nullptr, w.get()};
  auto bad = p;
  bad.dims.n_groups = 3;
  CHECK(rv::sigmoid_bias_forward(bad, nullptr, 0, nullptr) == Status::invalid_argument);
  bad = p;
  bad.dims.top_k = 0;
  CHECK(rv::sigmoid_bias_forward(bad, nullptr, 0, nullptr) == Status::invalid_argument);
  bad = p;
  bad.expert_counts = counts.get();
  CHECK(rv::sigmoid_bias_forward(bad, nullptr, 0, nullptr) == Status::workspace_too_small);
  bad = p;
  bad.dims.experts = 2048;
  bad.dims.top_k = 2;
  CHECK(rv::sigmoid_bias_forward(bad, nullptr, 0, nullptr) == Status::unsupported);
  CHECK(rv::bias_update(rv::BiasUpdateParams<float>{0, counts.get(), bias.get()}, nullptr, 0, nullptr) ==
        Status::invalid_argument);
  MOXE_TEST_CUDA(cudaDeviceSynchronize());
  for (float x : w.download()) CHECK(x != x);
  for (float x : bias.download()) CHECK(x != x);
}
