// Device tests of expert-choice routing: scores against the double reference, the
// selection checked exactly against a host top-C over the device's own float scores
// (min(C, T) tokens per expert, ties to the lower token), the row map and weights,
// backward against the reference, determinism, poisoned outputs, T = 1, T off the block
// sizes, C >= T, all-equal scores, misaligned workspace, bad input.
// Small-size mode (MOXE_TEST_SMALL, the simulator): the small-sizes case whole; of the large
// one, E > 32 at 9 tokens, T > 512 at 2 and 3 experts, and the backward alone at E = 256
// and 1024. The select runs one 512-thread block per expert (~4e5 simulated instructions at
// any T), so the forward at E = 256 and 1024 runs on GPUs only (E = 1024's score tile, 131 KB
// of shared memory a block, is also more than the simulated GPU's 99 KB).
#include <doctest/doctest.h>

#include <algorithm>
#include <numeric>

#include "backward_check.cuh"
#include "device_check.hpp"
#include "device_utils.cuh"
#include "graph_capture.cuh"
#include "moxe/router/variants/expert_choice.cuh"
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
void check_expert_choice(mt::Rng& rng, int64_t T_, int E, int64_t C, bool all_equal = false) {
  CAPTURE(T_);
  CAPTURE(E);
  CAPTURE(C);
  mv::ExpertChoiceProblem prob(rng, T_, E, C, 2.0);
  if (all_equal) std::fill(prob.logits.begin(), prob.logits.end(), 0.5);
  prob.logits = mt::round_through<T>(prob.logits);
  REQUIRE(prob.forward() == Status::ok);
  const int64_t Ce = prob.capacity();
  mt::DeviceBuffer<T> dz(mt::convert_to<T>(prob.logits)), dgrad(T_ * E);
  mt::DeviceBuffer<float> dscores(T_ * E), dew(E * Ce), dtw(T_ * E);
  mt::DeviceBuffer<int32_t> dtokens(E * Ce), dper(T_);
  mt::DeviceBuffer<int64_t> dmap(T_ * E), doff(E + 1);
  dscores.poison(); dew.poison(); dtw.poison(); dtokens.poison(); dper.poison(); dmap.poison(); doff.poison();
  dgrad.poison();
  rv::ExpertChoiceForwardParams<T, float> p{prob.dims,  dz.get(),   dscores.get(), dtokens.get(), dew.get(),
                                            dmap.get(), dtw.get(), doff.get(),    dper.get()};
  mt::MisalignedWorkspace ws(rv::expert_choice_forward_workspace_size(p));
  REQUIRE(rv::expert_choice_forward(p, ws.get(), ws.bytes(), nullptr) == Status::ok);
  const auto s = dscores.download();
  CHECK(mt::rel_error(s, prob.scores) < 1e-5);
  const auto tokens = dtokens.download();
  const auto ew = dew.download();
  const auto map = dmap.download();
  const auto tw = dtw.download();
  const auto off = doff.download();
  const auto per = dper.download();
  std::vector<int32_t> per_want(T_, 0);
  std::vector<int64_t> order(T_);
  for (int e = 0; e < E; ++e) {
    CHECK(off[e] == e * Ce);
    std::iota(order.begin(), order.end(), int64_t(0));
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return s[a * E + e] > s[b * E + e]; });
    std::sort(order.begin(), order.begin() + Ce);
    for (int64_t j = 0; j < Ce; ++j) {
      REQUIRE(tokens[e * Ce + j] == order[j]);
      const int64_t t = order[j];
      CHECK(ew[e * Ce + j] == s[t * E + e]);
      CHECK(map[t * E + e] == e * Ce + j);
      CHECK(tw[t * E + e] == s[t * E + e]);
      per_want[t] += 1;
    }
  }
  CHECK(off[E] == E * Ce);
  int64_t chosen = 0;
  for (int64_t i = 0; i < T_ * E; ++i) {
    chosen += map[i] >= 0;
    if (map[i] < 0) CHECK(tw[i] == 0.f);
  }
  CHECK(chosen == E * Ce);
  CHECK(per == per_want);
  if (all_equal)
    for (int e = 0; e < E; ++e)
      for (int64_t j = 0; j < Ce; ++j) CHECK(tokens[e * Ce + j] == j);

  REQUIRE(rv::expert_choice_forward(p, ws.get(), ws.bytes(), nullptr) == Status::ok);
  CHECK(mv::bitwise_equal(dtokens.download(), tokens));
  CHECK(mv::bitwise_equal(dmap.download(), map));
  CHECK(mv::bitwise_equal(dtw.download(), tw));
  dmap.poison();
  dtw.poison();
  REQUIRE(mv::run_captured([&](cudaStream_t st) { return rv::expert_choice_forward(p, ws.get(), ws.bytes(), st); }) ==
          Status::ok);
  CHECK(mv::bitwise_equal(dmap.download(), map));
  CHECK(mv::bitwise_equal(dtw.download(), tw));

  const auto rp = prob.params();
  std::copy(map.begin(), map.end(), prob.row_map.begin());
  mv::check_backward<rv::ExpertChoiceBackwardParams>(
      rp, p, prob.dweight, dgrad, [](const auto& b) { return rvr::expert_choice_backward(b); },
      [](const auto& b) { return rv::expert_choice_backward(b, nullptr, 0, nullptr); });
}

/// The backward alone, from the reference's selection: its row shapes at large E without
/// the forward's one select block per expert (small mode).
template <class T>
void check_expert_choice_backward(mt::Rng& rng, int64_t T_, int E, int64_t C) {
  CAPTURE(T_);
  CAPTURE(E);
  CAPTURE(C);
  mv::ExpertChoiceProblem prob(rng, T_, E, C, 2.0);
  prob.logits = mt::round_through<T>(prob.logits);
  REQUIRE(prob.forward() == Status::ok);
  const auto map = prob.row_map;
  mt::DeviceBuffer<T> dz(mt::convert_to<T>(prob.logits)), dgrad(T_ * E);
  mt::DeviceBuffer<int64_t> dmap(map);
  dgrad.poison();
  rv::ExpertChoiceForwardParams<T, float> p{prob.dims, dz.get()};
  p.row_map = dmap.get();
  const auto rp = prob.params();
  std::copy(map.begin(), map.end(), prob.row_map.begin());
  mv::check_backward<rv::ExpertChoiceBackwardParams>(
      rp, p, prob.dweight, dgrad, [](const auto& b) { return rvr::expert_choice_backward(b); },
      [](const auto& b) { return rv::expert_choice_backward(b, nullptr, 0, nullptr); });
}

}  // namespace

TEST_CASE_TEMPLATE("expert-choice device forward and backward match the reference", T, float, __nv_bfloat16) {
  const auto seed = mt::fresh_seed();
  INFO("seed " << seed);
  mt::Rng rng(seed);
  if (mt::small_sizes()) {
    // E > 32: several experts per lane in the score pass, the backward's 32-lane rows
    check_expert_choice<T>(rng, 9, 33, rv::expert_choice_capacity(9, 33, 1.25, 2));
    // C > 512: the select's compaction goes on past its first 512 tokens, with the rank of
    // the ties carried over in the all-equal one
    check_expert_choice<T>(rng, 600, 3, 530);
    check_expert_choice<T>(rng, 600, 2, 550, /*all_equal=*/true);
    // the backward's row shapes of E = 256 and 1024
    check_expert_choice_backward<T>(rng, 9, 256, 3);
    check_expert_choice_backward<T>(rng, 5, 1024, 3);
    return;
  }
  check_expert_choice<T>(rng, 1000, 64, rv::expert_choice_capacity(1000, 64, 1.25, 2));
  check_expert_choice<T>(rng, 1500, 256, rv::expert_choice_capacity(1500, 256, 1.0, 8));  // T off 512
  check_expert_choice<T>(rng, 700, 32, 100, /*all_equal=*/true);
  check_expert_choice<T>(rng, 100, 1024, 3);
}

// Small sizes only (the functional simulator runs this one).
TEST_CASE_TEMPLATE("expert-choice device, small sizes: forward and backward match the reference", T, float,
                   __nv_bfloat16, __half) {
  const auto seed = mt::fresh_seed();
  INFO("seed " << seed);
  mt::Rng rng(seed);
  check_expert_choice<T>(rng, 1, 4, 1);
  check_expert_choice<T>(rng, 37, 8, 9);
  check_expert_choice<T>(rng, 20, 16, 50);  // C >= T
  check_expert_choice<T>(rng, 45, 4, 7, /*all_equal=*/true);
}

TEST_CASE("expert-choice device: bad input returns non-ok and writes nothing") {
  mt::DeviceBuffer<float> z(4 * 8), tw(4 * 8);
  mt::DeviceBuffer<int32_t> tokens(8 * 2);
  mt::DeviceBuffer<int64_t> map(4 * 8);
  tw.poison();
  rv::ExpertChoiceForwardParams<float, float> p{{4, 8, 2}, z.get(), nullptr, tokens.get(), nullptr, map.get(),
                                                tw.get()};
  const std::size_t bytes = rv::expert_choice_forward_workspace_size(p);
  mt::DeviceBuffer<unsigned char> ws(bytes);
  auto bad = p;
  bad.dims.capacity = 0;
  CHECK(rv::expert_choice_forward(bad, ws.get(), bytes, nullptr) == Status::invalid_argument);
  bad = p;
  bad.token_weight = nullptr;
  CHECK(rv::expert_choice_forward(bad, ws.get(), bytes, nullptr) == Status::invalid_argument);
  CHECK(rv::expert_choice_forward(p, ws.get(), bytes - 1 - 255, nullptr) == Status::workspace_too_small);
  CHECK(rv::expert_choice_forward(p, nullptr, 0, nullptr) == Status::workspace_too_small);
  bad = p;
  bad.dims.experts = 1025;
  CHECK(rv::expert_choice_forward(bad, nullptr, 0, nullptr) == Status::unsupported);
  MOXE_TEST_CUDA(cudaDeviceSynchronize());
  for (float x : tw.download()) CHECK(x != x);
}
