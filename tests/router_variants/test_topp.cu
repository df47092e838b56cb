// Device tests of top-p routing: forward and backward against the double reference, with
// weights p (the default, the paper's) and renormalised, determinism, poisoned outputs,
// T = 1 and T off the block size, misaligned workspace, bad input.
// Small-size mode (MOXE_TEST_SMALL, the simulator) keeps every case, E, max_k and top_p (so
// every row shape and both top-k algorithms) with 9 to 37 tokens: E > 32 takes 4 tokens a
// block, so each still spans several blocks, the last partial.
#include <doctest/doctest.h>

#include <algorithm>

#include "backward_check.cuh"
#include "device_check.hpp"
#include "device_utils.cuh"
#include "graph_capture.cuh"
#include "moxe/router/variants/reference.hpp"
#include "moxe/router/variants/topp.cuh"
#include "test_utils.hpp"
#include "variants_problem.hpp"

using moxe::Status;
namespace mt = moxe::test;
namespace mv = moxe::test::variants;
namespace rv = moxe::router::variants;
namespace rvr = moxe::router::variants::reference;

namespace {

/// Whether the reference's top-p selection of token t is within a hair of changing.
bool topp_ambiguous(const std::vector<double>& z, int64_t t, int E, int max_k, double top_p) {
  auto p = mv::softmax_row(z.data() + t * E, E);
  std::sort(p.rbegin(), p.rend());
  std::vector<double> head(p.begin(), p.begin() + std::min(E, max_k + 1));
  if (mv::ambiguous_order(head)) return true;
  double cum = 0;
  for (int j = 0; j < max_k; ++j) {
    cum += p[j];
    if (std::abs(cum - top_p) < mv::kDeviceTieMargin) return true;
  }
  return false;
}

template <class T>
void check_topp(mt::Rng& rng, int64_t T_, int E, int max_k, double top_p, bool renorm) {
  CAPTURE(renorm);
  CAPTURE(T_);
  CAPTURE(E);
  CAPTURE(max_k);
  CAPTURE(top_p);
  const int K = max_k;
  const auto z = mt::round_through<T>(mt::normal_vector<double>(rng, T_ * E, 2.0));
  std::vector<int32_t> idx(T_ * K), count(T_);
  std::vector<double> prob(T_ * K), weight(T_ * K);
  int64_t total = 0;
  REQUIRE(rvr::topp_forward(rv::TopPForwardParams<double, double>{{T_, E, K}, z.data(), top_p, idx.data(), prob.data(),
                                                                  weight.data(), count.data(), &total, renorm}) ==
          Status::ok);
  mt::DeviceBuffer<T> dz(mt::convert_to<T>(z)), dgrad(T_ * E);
  mt::DeviceBuffer<int32_t> didx(T_ * K), dcount(T_);
  mt::DeviceBuffer<float> dprob(T_ * K), dweight(T_ * K);
  mt::DeviceBuffer<int64_t> dtotal(1);
  didx.poison(); dcount.poison(); dprob.poison(); dweight.poison(); dtotal.poison(); dgrad.poison();
  rv::TopPForwardParams<T, float> p{{T_, E, K}, dz.get(), float(top_p), didx.get(), dprob.get(), dweight.get(),
                                    dcount.get(), dtotal.get(), renorm};
  mt::MisalignedWorkspace ws(rv::topp_forward_workspace_size(p));
  REQUIRE(rv::topp_forward(p, ws.get(), ws.bytes(), nullptr) == Status::ok);
  const auto got_idx = didx.download();
  const auto got_count = dcount.download();
  const auto got_weight = dweight.download();
  const auto got_prob = dprob.download();
  int64_t got_sum = 0;
  for (int64_t t = 0; t < T_; ++t) {
    got_sum += got_count[t];
    bool same = got_count[t] == count[t];
    for (int j = 0; j < K && same; ++j) same = got_idx[t * K + j] == idx[t * K + j];
    if (!same) {
      CAPTURE(t);
      CHECK(topp_ambiguous(z, t, E, K, top_p));
      continue;
    }
    for (int j = 0; j < K; ++j) {
      CHECK(std::abs(got_weight[t * K + j] - weight[t * K + j]) <= 1e-5);
      CHECK(std::abs(got_prob[t * K + j] - prob[t * K + j]) <= 1e-5);
    }
  }
  CHECK(dtotal.download()[0] == got_sum);

  // determinism: bitwise the same on a rerun
  REQUIRE(rv::topp_forward(p, ws.get(), ws.bytes(), nullptr) == Status::ok);
  CHECK(mv::bitwise_equal(didx.download(), got_idx));
  CHECK(mv::bitwise_equal(dweight.download(), got_weight));
  // and under graph capture
  dweight.poison();
  dtotal.poison();
  REQUIRE(mv::run_captured([&](cudaStream_t s) { return rv::topp_forward(p, ws.get(), ws.bytes(), s); }) ==
          Status::ok);
  CHECK(mv::bitwise_equal(dweight.download(), got_weight));
  CHECK(dtotal.download()[0] == got_sum);

  // backward from the device's own selection against the reference on the same selection
  const auto dw = mt::uniform_vector<double>(rng, T_ * K);
  auto rp = rv::TopPForwardParams<double, double>{{T_, E, K}, z.data(), top_p, const_cast<int32_t*>(got_idx.data())};
  rp.renormalize = renorm;
  mv::check_backward<rv::TopPBackwardParams>(
      rp, p, dw, dgrad, [](const auto& b) { return rvr::topp_backward(b); },
      [](const auto& b) { return rv::topp_backward(b, nullptr, 0, nullptr); });
}

}  // namespace

TEST_CASE_TEMPLATE("top-p device forward and backward match the reference", T, float, __nv_bfloat16) {
  const auto seed = mt::fresh_seed();
  INFO("seed " << seed);
  mt::Rng rng(seed);
  for (bool renorm : {false, true}) {
    check_topp<T>(rng, mt::size<int64_t>(1000, 37), 64, 8, 0.7, renorm);
    check_topp<T>(rng, mt::size<int64_t>(517, 21), 256, 16, 0.5, renorm);  // threshold top-k path (k > 8)
    check_topp<T>(rng, mt::size<int64_t>(300, 9), 1000, 32, 0.95, renorm);
    check_topp<T>(rng, mt::size<int64_t>(200, 13), 64, 4, 1.0, renorm);
  }
}

// Small sizes only (the functional simulator runs this one): T = 1, T off the block size,
// E = 1, E off the lane layout.
TEST_CASE_TEMPLATE("top-p device, small sizes: forward and backward match the reference", T, float, __nv_bfloat16, __half) {
  const auto seed = mt::fresh_seed();
  INFO("seed " << seed);
  mt::Rng rng(seed);
  for (bool renorm : {false, true}) {
    check_topp<T>(rng, 1, 8, 4, 0.6, renorm);
    check_topp<T>(rng, 1, 1, 1, 0.5, renorm);
    check_topp<T>(rng, 37, 8, 8, 0.9, renorm);
    check_topp<T>(rng, 19, 13, 5, 0.8, renorm);
  }
}

TEST_CASE("top-p device: bad input returns non-ok and writes nothing") {
  mt::DeviceBuffer<float> z(4 * 8), w(4 * 2);
  mt::DeviceBuffer<int32_t> idx(4 * 2);
  w.poison();
  rv::TopPForwardParams<float, float> p{{4, 8, 2}, z.get(), 0.5f, idx.get(), nullptr, w.get()};
  auto bad = p;
  bad.top_p = 0.f;
  CHECK(rv::topp_forward(bad, nullptr, 0, nullptr) == Status::invalid_argument);
  bad = p;
  bad.dims.max_k = 9;
  CHECK(rv::topp_forward(bad, nullptr, 0, nullptr) == Status::invalid_argument);
  bad = p;
  bad.topk_weight = nullptr;
  CHECK(rv::topp_forward(bad, nullptr, 0, nullptr) == Status::invalid_argument);
  bad = p;
  bad.dims.tokens = 0;
  CHECK(rv::topp_forward(bad, nullptr, 0, nullptr) == Status::invalid_argument);
  mt::DeviceBuffer<int64_t> total(1);
  bad = p;
  bad.total_count = total.get();
  REQUIRE(rv::topp_forward_workspace_size(bad) > 0);
  CHECK(rv::topp_forward(bad, nullptr, 0, nullptr) == Status::workspace_too_small);
  MOXE_TEST_CUDA(cudaDeviceSynchronize());
  for (float x : w.download()) CHECK(x != x);
}
