// Device tests of group-restricted routing: forward and backward (renormalised and plain)
// against the double reference, never outside the allowed experts, determinism, poisoned
// outputs, T = 1 and T off the block size, bad input.
// Small-size mode (MOXE_TEST_SMALL, the simulator) keeps every case (E, k, groups, shared
// pool, group limit: every row shape and both top-k algorithms) with 9 to 37 tokens: E > 32
// takes 4 tokens a block, so each still spans several blocks, the last partial.
#include <doctest/doctest.h>

#include <algorithm>

#include "backward_check.cuh"
#include "device_check.hpp"
#include "device_utils.cuh"
#include "graph_capture.cuh"
#include "moxe/router/variants/group_restricted.cuh"
#include "moxe/router/variants/reference.hpp"
#include "test_utils.hpp"
#include "variants_problem.hpp"

using moxe::Status;
namespace mt = moxe::test;
namespace mv = moxe::test::variants;
namespace rv = moxe::router::variants;
namespace rvr = moxe::router::variants::reference;

namespace {

template <class T>
void check_group_restricted(mt::Rng& rng, int64_t T_, int E, int K, std::vector<int32_t> offsets, int sb, int se,
                            bool renorm, int n_groups = 1, int topk_groups = 1) {
  CAPTURE(T_);
  CAPTURE(E);
  CAPTURE(K);
  CAPTURE(renorm);
  CAPTURE(n_groups);
  mv::GroupRestrictedProblem prob(rng, T_, E, K, offsets, sb, se, renorm, 2.0);
  prob.dims.n_groups = n_groups;
  prob.dims.topk_groups = topk_groups;
  prob.logits = mt::round_through<T>(prob.logits);
  if (T_ > 3) prob.group_id[3] = -5;  // invalid group: the shared pool only
  REQUIRE(prob.forward() == Status::ok);
  const int G = prob.dims.num_groups;
  mt::DeviceBuffer<T> dz(mt::convert_to<T>(prob.logits)), dgrad(T_ * E);
  mt::DeviceBuffer<int32_t> dgid(prob.group_id), doff(prob.group_offsets), didx(T_ * K);
  mt::DeviceBuffer<float> dprob(T_ * K), dweight(T_ * K);
  didx.poison(); dprob.poison(); dweight.poison(); dgrad.poison();
  rv::GroupRestrictedForwardParams<T, float> p{prob.dims, dz.get(), dgid.get(), doff.get(), renorm,
                                               didx.get(), dprob.get(), dweight.get()};
  REQUIRE(rv::group_restricted_forward(p, nullptr, 0, nullptr) == Status::ok);
  const auto got_idx = didx.download();
  const auto got_weight = dweight.download();
  for (int64_t t = 0; t < T_; ++t) {
    const auto allowed = prob.allowed(t);
    std::vector<double> za;
    for (int e = 0; e < E; ++e)
      if (allowed[e]) za.push_back(prob.logits[t * E + e]);
    bool same = true;
    std::vector<int> groups_used;
    for (int j = 0; j < K; ++j) {
      const int32_t e = got_idx[t * K + j];
      CHECK((e == -1 || (e >= 0 && e < E && allowed[e])));
      if (e >= 0 && std::find(groups_used.begin(), groups_used.end(), e / (E / n_groups)) == groups_used.end())
        groups_used.push_back(e / (E / n_groups));
      same = same && e == prob.topk_idx[t * K + j];
    }
    CHECK(int(groups_used.size()) <= topk_groups);
    if (!same) {
      CAPTURE(t);
      CHECK((mv::ambiguous_order(za) || mv::ambiguous_order(prob.group_scores(t))));
      continue;
    }
    for (int j = 0; j < K; ++j) CHECK(std::abs(got_weight[t * K + j] - prob.topk_weight[t * K + j]) <= 1e-5);
  }
  (void)G;
  REQUIRE(rv::group_restricted_forward(p, nullptr, 0, nullptr) == Status::ok);
  CHECK(mv::bitwise_equal(didx.download(), got_idx));
  CHECK(mv::bitwise_equal(dweight.download(), got_weight));
  dweight.poison();
  REQUIRE(mv::run_captured([&](cudaStream_t s) { return rv::group_restricted_forward(p, nullptr, 0, s); }) ==
          Status::ok);
  CHECK(mv::bitwise_equal(dweight.download(), got_weight));

  const auto rp = prob.params();
  std::copy(got_idx.begin(), got_idx.end(), prob.topk_idx.begin());
  mv::check_backward<rv::GroupRestrictedBackwardParams>(
      rp, p, prob.dweight, dgrad, [](const auto& b) { return rvr::group_restricted_backward(b); },
      [](const auto& b) { return rv::group_restricted_backward(b, nullptr, 0, nullptr); });
}

}  // namespace

TEST_CASE_TEMPLATE("group-restricted device forward and backward match the reference", T, float, __nv_bfloat16) {
  const auto seed = mt::fresh_seed();
  INFO("seed " << seed);
  mt::Rng rng(seed);
  const auto tokens = [](int64_t full, int64_t small) { return mt::size(full, small); };
  for (bool renorm : {true, false}) {
    check_group_restricted<T>(rng, tokens(1000, 37), 64, 8, {0, 16, 32, 48}, 48, 64, renorm);
    check_group_restricted<T>(rng, tokens(333, 21), 256, 12, {0, 100, 200}, 200, 256, renorm);  // threshold (k > 8)
    check_group_restricted<T>(rng, tokens(129, 29), 64, 6, {0, 3, 60}, 0, 0, renorm);            // group smaller than k
    check_group_restricted<T>(rng, tokens(77, 9), 1024, 32, {0, 512, 1024}, 0, 16, renorm);
    check_group_restricted<T>(rng, tokens(500, 37), 64, 6, {0, 24, 48}, 48, 64, renorm, 8, 3);  // with the group limit
    check_group_restricted<T>(rng, tokens(300, 21), 256, 12, {0, 96, 192}, 192, 256, renorm, 8, 4);
  }
}

// Small sizes only (the functional simulator runs this one).
TEST_CASE_TEMPLATE("group-restricted device, small sizes: forward and backward match the reference", T, float,
                   __nv_bfloat16, __half) {
  const auto seed = mt::fresh_seed();
  INFO("seed " << seed);
  mt::Rng rng(seed);
  for (bool renorm : {true, false}) {
    check_group_restricted<T>(rng, 1, 8, 2, {0, 4, 8}, 0, 0, renorm);
    check_group_restricted<T>(rng, 37, 8, 3, {0, 2, 6}, 6, 8, renorm);
    check_group_restricted<T>(rng, 21, 12, 4, {0, 4, 8, 12}, 0, 0, renorm, 3, 2);
  }
}

TEST_CASE("group-restricted device: bad input returns non-ok and writes nothing") {
  mt::DeviceBuffer<float> z(4 * 8), w(4 * 2);
  mt::DeviceBuffer<int32_t> idx(4 * 2), gid(4), off(3);
  w.poison();
  rv::GroupRestrictedForwardParams<float, float> p{{4, 8, 2, 2}, z.get(), gid.get(), off.get(), true, idx.get(),
                                                   nullptr, w.get()};
  auto bad = p;
  bad.dims.shared_end = 9;
  CHECK(rv::group_restricted_forward(bad, nullptr, 0, nullptr) == Status::invalid_argument);
  bad = p;
  bad.group_offsets = nullptr;
  CHECK(rv::group_restricted_forward(bad, nullptr, 0, nullptr) == Status::invalid_argument);
  bad = p;
  bad.dims.top_k = 9;
  CHECK(rv::group_restricted_forward(bad, nullptr, 0, nullptr) == Status::invalid_argument);
  bad = p;
  bad.dims.n_groups = 3;
  CHECK(rv::group_restricted_forward(bad, nullptr, 0, nullptr) == Status::invalid_argument);
  bad = p;
  bad.dims.num_groups = 0;
  CHECK(rv::group_restricted_forward(bad, nullptr, 0, nullptr) == Status::invalid_argument);
  MOXE_TEST_CUDA(cudaDeviceSynchronize());
  for (float x : w.download()) CHECK(x != x);
}
