// Device tests of group-restricted expert choice (MoMa): the layout (expert_offsets)
// exactly the reference's, the scores against the double reference, the selection checked
// exactly against a host top-C over the device's own float scores among the tokens each
// expert's pool sees (ties to the lower token), rows past the total untouched, the backward
// against the reference, both scores (sigmoid, softmax), determinism, graph capture,
// poisoned outputs, misaligned workspaces, T = 1, T off the block sizes, empty groups,
// groups without tokens, more experts than tokens, group ids out of range, bad input.
// Small-size mode (MOXE_TEST_SMALL, the simulator): the small cases whole; of the large
// ones, for both scores, E > 32 at 9 tokens, T > 512 at 2 and 3 experts, and the backward
// alone at E = 256 and 1024. The select runs one 512-thread block per expert (~4e5
// simulated instructions at any T), so the forward at E = 256 and 1024 runs on GPUs only
// (E = 1024's score tile, 131 KB of shared memory a block, is also more than the simulated
// GPU's 99 KB).
#include <doctest/doctest.h>

#include <algorithm>
#include <numeric>

#include "backward_check.cuh"
#include "device_check.hpp"
#include "device_utils.cuh"
#include "graph_capture.cuh"
#include "moxe/router/variants/group_expert_choice.cuh"
#include "moxe/router/variants/reference.hpp"
#include "test_utils.hpp"
#include "variants_problem.hpp"

using moxe::Status;
namespace mt = moxe::test;
namespace mv = moxe::test::variants;
namespace rv = moxe::router::variants;
namespace rvr = moxe::router::variants::reference;

namespace {

/// Sizes, groups and capacity rule of one case; first_groups overrides the first group ids.
struct Spec {
  int64_t T;
  int E;
  std::vector<int32_t> offsets;
  int sb, se;
  int64_t capacity;
  double factor;
  int top_k;
  std::vector<int32_t> first_groups;
  bool all_equal = false;
};

template <class T>
void check_gec(mt::Rng& rng, const Spec& c, rv::ChoiceScore score) {
  CAPTURE(c.T);
  CAPTURE(c.E);
  CAPTURE(c.capacity);
  CAPTURE(int(score));
  const int64_t T_ = c.T;
  const int E = c.E;
  mv::GroupExpertChoiceProblem prob(rng, T_, E, c.offsets, c.sb, c.se, score, c.capacity, c.factor, c.top_k, 2.0);
  for (size_t i = 0; i < c.first_groups.size() && int64_t(i) < T_; ++i) prob.group_id[i] = c.first_groups[i];
  if (c.all_equal) std::fill(prob.logits.begin(), prob.logits.end(), 0.5);
  prob.logits = mt::round_through<T>(prob.logits);
  REQUIRE(prob.forward() == Status::ok);
  const int64_t rows = prob.max_rows();
  const auto pool = prob.pools();

  mt::DeviceBuffer<T> dz(mt::convert_to<T>(prob.logits)), dgrad(T_ * E);
  mt::DeviceBuffer<int32_t> dgid(prob.group_id), doff(prob.group_offsets), dtokens(rows), dper(T_);
  mt::DeviceBuffer<float> dscores(T_ * E), dew(rows), dtw(T_ * E);
  mt::DeviceBuffer<int64_t> dmap(T_ * E), doffsets(E + 1);
  dscores.poison(); dew.poison(); dtw.poison(); dtokens.poison(); dper.poison(); dmap.poison(); doffsets.poison();
  dgrad.poison();
  const rv::GroupExpertChoiceForwardParams<T, float> p{
      prob.dims, dz.get(),  dgid.get(), doff.get(),     score,         dscores.get(),
      dtokens.get(), dew.get(), dmap.get(), dtw.get(), doffsets.get(), dper.get()};
  mt::MisalignedWorkspace ws(rv::group_expert_choice_forward_workspace_size(p));
  REQUIRE(rv::group_expert_choice_forward(p, ws.get(), ws.bytes(), nullptr) == Status::ok);

  const auto off = doffsets.download();
  REQUIRE(off == prob.expert_offsets);  // the layout is integer: exactly the reference's
  const auto s = dscores.download();
  CHECK(mt::rel_error(s, prob.scores) < 1e-5);
  const auto tokens = dtokens.download();
  const auto ew = dew.download();
  const auto map = dmap.download();
  const auto tw = dtw.download();
  const auto per = dper.download();
  auto sees = [&](int e, int64_t t) { return rv::detail::pool_sees(pool[e], prob.group_id[t]); };
  std::vector<int32_t> per_want(T_, 0);
  std::vector<int64_t> cand;
  for (int e = 0; e < E; ++e) {
    CAPTURE(e);
    cand.clear();
    for (int64_t t = 0; t < T_; ++t)
      if (sees(e, t)) cand.push_back(t);
    const std::vector<int64_t> in_order = cand;
    std::stable_sort(cand.begin(), cand.end(), [&](int64_t a, int64_t b) { return s[a * E + e] > s[b * E + e]; });
    const int64_t base = off[e], C = off[e + 1] - base;
    REQUIRE(C <= int64_t(cand.size()));
    std::sort(cand.begin(), cand.begin() + C);
    for (int64_t j = 0; j < C; ++j) {
      REQUIRE(tokens[base + j] == cand[j]);
      const int64_t t = cand[j];
      CHECK(ew[base + j] == s[t * E + e]);
      CHECK(map[t * E + e] == base + j);
      CHECK(tw[t * E + e] == s[t * E + e]);
      per_want[t] += 1;
    }
    if (c.all_equal)  // every score ties: the pool's first C tokens
      for (int64_t j = 0; j < C; ++j) CHECK(tokens[base + j] == in_order[j]);
  }
  const int64_t total = off[E];
  REQUIRE(total <= rows);
  for (int64_t r = total; r < rows; ++r) {  // past the total: untouched
    CHECK(tokens[r] == -1);
    CHECK(ew[r] != ew[r]);
  }
  int64_t chosen = 0;
  for (int64_t t = 0; t < T_; ++t)
    for (int e = 0; e < E; ++e) {
      const int64_t i = t * E + e;
      chosen += map[i] >= 0;
      if (map[i] < 0) CHECK(tw[i] == 0.f);
      if (!sees(e, t)) CHECK(s[i] == 0.f);
    }
  CHECK(chosen == total);
  CHECK(per == per_want);

  // determinism: bitwise the same on a rerun, and under graph capture
  REQUIRE(rv::group_expert_choice_forward(p, ws.get(), ws.bytes(), nullptr) == Status::ok);
  CHECK(mv::bitwise_equal(dtokens.download(), tokens));
  CHECK(mv::bitwise_equal(dmap.download(), map));
  CHECK(mv::bitwise_equal(dtw.download(), tw));
  dmap.poison();
  dtw.poison();
  doffsets.poison();
  REQUIRE(mv::run_captured([&](cudaStream_t st) {
            return rv::group_expert_choice_forward(p, ws.get(), ws.bytes(), st);
          }) == Status::ok);
  CHECK(mv::bitwise_equal(dmap.download(), map));
  CHECK(mv::bitwise_equal(dtw.download(), tw));
  CHECK(mv::bitwise_equal(doffsets.download(), off));

  // backward from the device's own selection against the reference on the same selection
  const auto rp = prob.params();
  std::copy(map.begin(), map.end(), prob.row_map.begin());
  const rv::GroupExpertChoiceBackwardParams<T, float> sizing{p};
  mt::MisalignedWorkspace bws(rv::group_expert_choice_backward_workspace_size(sizing));
  CHECK((score == rv::ChoiceScore::sigmoid) == (bws.bytes() == 0));
  mv::check_backward<rv::GroupExpertChoiceBackwardParams>(
      rp, p, prob.dweight, dgrad, [](const auto& b) { return rvr::group_expert_choice_backward(b); },
      [&](const auto& b) { return rv::group_expert_choice_backward(b, bws.get(), bws.bytes(), nullptr); });
}

/// The backward alone, from the reference's selection: its row shapes at large E without
/// the forward's one select block per expert (small mode).
template <class T>
void check_gec_backward(mt::Rng& rng, const Spec& c, rv::ChoiceScore score) {
  CAPTURE(c.T);
  CAPTURE(c.E);
  CAPTURE(int(score));
  const int64_t T_ = c.T;
  const int E = c.E;
  mv::GroupExpertChoiceProblem prob(rng, T_, E, c.offsets, c.sb, c.se, score, c.capacity, c.factor, c.top_k, 2.0);
  for (size_t i = 0; i < c.first_groups.size() && int64_t(i) < T_; ++i) prob.group_id[i] = c.first_groups[i];
  prob.logits = mt::round_through<T>(prob.logits);
  REQUIRE(prob.forward() == Status::ok);
  const auto map = prob.row_map;
  mt::DeviceBuffer<T> dz(mt::convert_to<T>(prob.logits)), dgrad(T_ * E);
  mt::DeviceBuffer<int32_t> dgid(prob.group_id), doff(prob.group_offsets);
  mt::DeviceBuffer<int64_t> dmap(map);
  dgrad.poison();
  rv::GroupExpertChoiceForwardParams<T, float> p{prob.dims, dz.get(), dgid.get(), doff.get(), score};
  p.row_map = dmap.get();
  const auto rp = prob.params();
  std::copy(map.begin(), map.end(), prob.row_map.begin());
  const rv::GroupExpertChoiceBackwardParams<T, float> sizing{p};
  mt::MisalignedWorkspace bws(rv::group_expert_choice_backward_workspace_size(sizing));
  mv::check_backward<rv::GroupExpertChoiceBackwardParams>(
      rp, p, prob.dweight, dgrad, [](const auto& b) { return rvr::group_expert_choice_backward(b); },
      [&](const auto& b) { return rv::group_expert_choice_backward(b, bws.get(), bws.bytes(), nullptr); });
}

/// The small cases: the simulator runs them.
const std::vector<Spec>& small_specs() {
  static const std::vector<Spec> specs{
      {1, 3, {0, 3}, 0, 0, 0, 1.0, 1, {}},                                 // T = 1: each expert takes it
      {1, 1, {0, 1}, 0, 0, 0, 1.0, 1, {}},                                 // T = E = 1
      {37, 6, {0, 2, 4}, 4, 6, 0, 1.0, 1, {-1, 2, 9}},                     // MoMa + shared; ids out of range
      {19, 7, {0, 3, 3, 5}, 0, 0, 4, 1.0, 1, {-1, 0, 1, 0, 1, 0, 1}},      // group 1 owns no expert;
                                                                           // 5, 6 in no pool; no shared
      {5, 8, {0, 6, 8}, 0, 0, 0, 1.5, 2, {1, 0, 1, 1, 0}},                 // 6 experts, 2 tokens
      {33, 1, {0, 1}, 0, 0, 0, 2.0, 1, {}},                                // E = 1
      {40, 4, {0, 2, 4}, 0, 0, 3, 1.0, 1, {}, /*all_equal=*/true},          // ties to the lower token
      {29, 5, {0, 2, 5}, 0, 5, 0, 1.0, 1, {}},                             // shared overlaps every group
  };
  return specs;
}

}  // namespace

TEST_CASE_TEMPLATE("group expert choice device, small sizes: forward and backward match the reference", T, float,
                   __nv_bfloat16, __half) {
  const auto seed = mt::fresh_seed();
  INFO("seed " << seed);
  mt::Rng rng(seed);
  for (auto score : {rv::ChoiceScore::sigmoid, rv::ChoiceScore::softmax})
    for (const Spec& c : small_specs()) check_gec<T>(rng, c, score);
}

TEST_CASE_TEMPLATE("group expert choice device forward and backward match the reference", T, float, __nv_bfloat16) {
  const auto seed = mt::fresh_seed();
  INFO("seed " << seed);
  mt::Rng rng(seed);
  if (mt::small_sizes()) {
    for (auto score : {rv::ChoiceScore::sigmoid, rv::ChoiceScore::softmax}) {
      // E > 32: several experts per lane in the score pass, the backward's 32-lane rows
      check_gec<T>(rng, {9, 33, {0, 16, 32}, 32, 33, 0, 1.25, 2, {}}, score);
      // C > 512: the select's compaction goes on past its first 512 tokens (the shared
      // expert sees all 600), with the rank of the ties carried over in the all-equal one
      check_gec<T>(rng, {600, 3, {0, 1, 2}, 2, 3, 530, 1.0, 1, {}}, score);
      check_gec<T>(rng, {600, 2, {0, 2}, 0, 2, 550, 1.0, 1, {}, /*all_equal=*/true}, score);
      // the backward's row shapes of E = 256 and 1024
      check_gec_backward<T>(rng, {9, 256, {0, 100, 200, 256}, 0, 0, 0, 1.0, 8, {-1, 5}}, score);
      check_gec_backward<T>(rng, {5, 1024, {0, 512, 1000}, 1000, 1024, 3, 1.0, 1, {}}, score);
    }
    return;
  }
  for (auto score : {rv::ChoiceScore::sigmoid, rv::ChoiceScore::softmax}) {
    check_gec<T>(rng, {1500, 64, {0, 24, 48}, 48, 64, 0, 1.25, 2, {}}, score);  // T off 512
    check_gec<T>(rng, {1000, 256, {0, 100, 200, 256}, 0, 0, 0, 1.0, 8, {-1, 5}}, score);
    check_gec<T>(rng, {700, 32, {0, 16, 32}, 0, 0, 100, 1.0, 1, {}, true}, score);
    check_gec<T>(rng, {300, 1024, {0, 512, 1000}, 1000, 1024, 3, 1.0, 1, {}}, score);
  }
}

TEST_CASE("group expert choice device: bad input returns non-ok and writes nothing") {
  mt::DeviceBuffer<float> z(4 * 8), tw(4 * 8), dz(4 * 8), dw(4 * 8);
  mt::DeviceBuffer<int32_t> gid(std::vector<int32_t>{0, 1, 0, 1}), off(std::vector<int32_t>{0, 4, 8}), tokens(64);
  mt::DeviceBuffer<int64_t> map(4 * 8), offsets(9);
  tw.poison();
  offsets.poison();
  dz.poison();
  rv::GroupExpertChoiceForwardParams<float, float> p{{4, 8, 2}, z.get(), gid.get(), off.get()};
  p.expert_tokens = tokens.get();
  p.row_map = map.get();
  p.token_weight = tw.get();
  p.expert_offsets = offsets.get();
  const std::size_t bytes = rv::group_expert_choice_forward_workspace_size(p);
  REQUIRE(bytes > 0);
  mt::DeviceBuffer<unsigned char> ws(bytes);
  auto bad = p;
  bad.dims.capacity = -1;
  CHECK(rv::group_expert_choice_forward(bad, ws.get(), bytes, nullptr) == Status::invalid_argument);
  bad = p;
  bad.dims.capacity_factor = 0.0;
  CHECK(rv::group_expert_choice_forward(bad, ws.get(), bytes, nullptr) == Status::invalid_argument);
  bad = p;
  bad.expert_offsets = nullptr;
  CHECK(rv::group_expert_choice_forward(bad, ws.get(), bytes, nullptr) == Status::invalid_argument);
  bad = p;
  bad.group_offsets = nullptr;
  CHECK(rv::group_expert_choice_forward(bad, ws.get(), bytes, nullptr) == Status::invalid_argument);
  bad = p;
  bad.dims.shared_end = 9;
  CHECK(rv::group_expert_choice_forward(bad, ws.get(), bytes, nullptr) == Status::invalid_argument);
  CHECK(rv::group_expert_choice_forward(p, ws.get(), bytes - 1 - 255, nullptr) == Status::workspace_too_small);
  CHECK(rv::group_expert_choice_forward(p, nullptr, 0, nullptr) == Status::workspace_too_small);
  bad = p;
  bad.dims.num_groups = rv::kMaxChoiceGroups + 1;
  CHECK(rv::group_expert_choice_forward_workspace_size(bad) == 0);
  CHECK(rv::group_expert_choice_forward(bad, ws.get(), bytes, nullptr) == Status::unsupported);
  bad = p;
  bad.dims.experts = 1025;
  CHECK(rv::group_expert_choice_forward(bad, nullptr, 0, nullptr) == Status::unsupported);
  rv::GroupExpertChoiceBackwardParams<float, float> b{p, dw.get(), dz.get()};
  b.fwd.score = rv::ChoiceScore::softmax;
  REQUIRE(rv::group_expert_choice_backward_workspace_size(b) > 0);
  CHECK(rv::group_expert_choice_backward(b, nullptr, 0, nullptr) == Status::workspace_too_small);
  b.dweight = nullptr;
  CHECK(rv::group_expert_choice_backward(b, nullptr, 0, nullptr) == Status::invalid_argument);
  MOXE_TEST_CUDA(cudaDeviceSynchronize());
  for (float x : tw.download()) CHECK(x != x);
  for (float x : dz.download()) CHECK(x != x);
  for (int64_t x : offsets.download()) CHECK(x == -1);
}
