// Device tests of the router pieces on their own: softmax + entropy and top-k (plain and
// group-limited, both top-k algorithms), forward and backward against the references, in
// float, bf16 and half.
// Small-size mode (MOXE_TEST_SMALL, the simulator) keeps every case, E, k, row shape, both
// top-k algorithms, T = 1 and the multi-block grids, with 13 tokens where E >= 256 and a
// many-block softmax of 700 tokens in place of 70000.
#include <doctest/doctest.h>

#include <algorithm>
#include <cstring>
#include <numeric>

#include "device_utils.cuh"
#include "moxe/router/entropy.cuh"
#include "moxe/router/reference.hpp"
#include "moxe/router/topk.cuh"
#include "test_utils.hpp"

using moxe::Status;
namespace mt = moxe::test;
namespace rr = moxe::router::reference;

namespace {

template <class T>
double tolerance() { return std::is_same_v<T, float> ? 2e-5 : 1e-2; }

template <class T>
void check_softmax_entropy(mt::Rng& rng, int64_t T_, int E) {
  CAPTURE(T_);
  CAPTURE(E);
  const auto z = mt::round_through<T>(mt::normal_vector<double>(rng, T_ * E, 2.0));
  std::vector<double> probs(T_ * E), lse(T_), ent(T_);
  moxe::router::SoftmaxEntropyParams<double, double> rp{{T_, E}, z.data(), probs.data(), lse.data(), ent.data()};
  REQUIRE(rr::softmax_entropy_forward(rp) == Status::ok);
  mt::DeviceBuffer<T> dz(mt::convert_to<T>(z)), dgrad(T_ * E);
  mt::DeviceBuffer<float> dprobs(T_ * E), dlse(T_), dent(T_);
  dprobs.poison(); dlse.poison(); dent.poison(); dgrad.poison();
  moxe::router::SoftmaxEntropyParams<T, float> p{{T_, E}, dz.get(), dprobs.get(), dlse.get(), dent.get()};
  REQUIRE(moxe::router::softmax_entropy_forward(p, nullptr, 0, nullptr) == Status::ok);
  CHECK(mt::rel_error(dprobs.download(), probs) < 1e-5);
  CHECK(mt::rel_error(dlse.download(), lse) < 1e-5);
  CHECK(mt::rel_error(dent.download(), ent) < 1e-5);

  const auto gp = mt::uniform_vector<double>(rng, T_ * E), gl = mt::uniform_vector<double>(rng, T_),
             gh = mt::uniform_vector<double>(rng, T_);
  std::vector<double> want(T_ * E);
  REQUIRE(rr::softmax_entropy_backward(moxe::router::SoftmaxEntropyBackwardParams<double, double>{
              rp, gp.data(), gl.data(), gh.data(), want.data()}) == Status::ok);
  mt::DeviceBuffer<float> bgp(mt::convert_to<float>(gp)), bgl(mt::convert_to<float>(gl)), bgh(mt::convert_to<float>(gh));
  moxe::router::SoftmaxEntropyBackwardParams<T, float> b{p, bgp.get(), bgl.get(), bgh.get(), dgrad.get()};
  REQUIRE(moxe::router::softmax_entropy_backward(b, nullptr, 0, nullptr) == Status::ok);
  CHECK(mt::rel_error(mt::convert_to_double(dgrad.download()), want) < tolerance<T>());
}

template <class T>
void check_topk(mt::Rng& rng, int64_t T_, int E, int K, int n_groups = 1, int topk_groups = 1, bool renorm = true) {
  CAPTURE(T_);
  CAPTURE(E);
  CAPTURE(K);
  CAPTURE(n_groups);
  CAPTURE(topk_groups);
  // scores on the bf16 grid (exact ties happen and must go to the lower index), then on T's
  // (half: bf16's values below half's normal range lose bits; the reference sees the same)
  const auto s =
      mt::round_through<T>(mt::round_through<__nv_bfloat16>(mt::uniform_vector<double>(rng, T_ * E, 0.0, 1.0)));
  const moxe::router::TopKDims dims{T_, E, K, n_groups, topk_groups};
  std::vector<int32_t> idx(T_ * K);
  std::vector<double> val(T_ * K), w(T_ * K);
  moxe::router::TopKParams<double, double> rp{dims, s.data(), idx.data(), val.data(), w.data(), renorm};
  REQUIRE(rr::topk_forward(rp) == Status::ok);
  mt::DeviceBuffer<T> ds(mt::convert_to<T>(s)), dgrad(T_ * E);
  mt::DeviceBuffer<int32_t> didx(T_ * K);
  mt::DeviceBuffer<float> dval(T_ * K), dw(T_ * K);
  didx.poison(); dval.poison(); dw.poison(); dgrad.poison();
  moxe::router::TopKParams<T, float> p{dims, ds.get(), didx.get(), dval.get(), dw.get(), renorm};
  REQUIRE(moxe::router::topk_forward(p, nullptr, 0, nullptr) == Status::ok);
  CHECK(didx.download() == idx);
  CHECK(mt::rel_error(dval.download(), val) < 1e-7);
  CHECK(mt::rel_error(dw.download(), w) < 1e-6);

  const auto gw = mt::uniform_vector<double>(rng, T_ * K), gv = mt::uniform_vector<double>(rng, T_ * K);
  std::vector<double> want(T_ * E);
  REQUIRE(rr::topk_backward(moxe::router::TopKBackwardParams<double, double>{rp, gw.data(), gv.data(), want.data()}) ==
          Status::ok);
  mt::DeviceBuffer<float> bgw(mt::convert_to<float>(gw)), bgv(mt::convert_to<float>(gv));
  moxe::router::TopKBackwardParams<T, float> b{p, bgw.get(), bgv.get(), dgrad.get()};
  REQUIRE(moxe::router::topk_backward(b, nullptr, 0, nullptr) == Status::ok);
  CHECK(mt::rel_error(mt::convert_to_double(dgrad.download()), want) < tolerance<T>());
}

}  // namespace

TEST_CASE_TEMPLATE("softmax + entropy device matches the reference", T, float, __nv_bfloat16, __half) {
  mt::Rng rng(mt::fresh_seed());
  // small mode: E >= 256 takes 8 tokens a block, so 13 tokens still give 2 blocks, the last partial
  for (int E : {1, 2, 4, 8, 30, 64, 256, 1000})
    check_softmax_entropy<T>(rng, E >= 256 ? mt::size<int64_t>(77, 13) : 77, E);
  check_softmax_entropy<T>(rng, 1, 64);
  // many blocks (64 tokens each at E = 8); the grid-stride loop starts past 2^16 blocks
  // (4.2M tokens), which neither size reaches
  check_softmax_entropy<T>(rng, mt::size<int64_t>(70000, 700), 8);
}

TEST_CASE("softmax device: equal logits get the same bits on every lane of a token") {
  // A token's lanes all-reduce their (max, sum) states by butterfly, each lane merging the
  // same two states in the opposite role to its partner: the merge must give the same bits
  // either way (an fma-contracted a.sum * ra + b.sum * rb does not), or the lanes end with
  // different lse, equal logits get different probabilities, and a selection breaks their
  // tie by rounding noise instead of by index. Here one logit of each lane (elements 0 to
  // lanes - 1) is the same, the others random.
  mt::Rng rng(mt::fresh_seed());
  for (int E : {8, 30, 64, 256, 1000}) {
    CAPTURE(E);
    const int64_t T_ = 32;
    const int lanes = moxe::router::detail::row_lanes(E);
    auto z = mt::round_through<__nv_bfloat16>(mt::normal_vector<double>(rng, T_ * E, 2.0));
    for (int64_t t = 0; t < T_; ++t) std::fill(z.begin() + t * E, z.begin() + t * E + lanes, z[t * E]);
    mt::DeviceBuffer<float> dz(mt::convert_to<float>(z)), dprobs(T_ * E);
    dprobs.poison();
    moxe::router::SoftmaxEntropyParams<float, float> p{{T_, E}, dz.get(), dprobs.get()};
    REQUIRE(moxe::router::softmax_entropy_forward(p, nullptr, 0, nullptr) == Status::ok);
    const auto probs = dprobs.download();
    int split_tokens = 0;
    for (int64_t t = 0; t < T_; ++t)
      for (int e = 1; e < lanes; ++e)
        if (std::memcmp(&probs[t * E], &probs[t * E + e], sizeof(float)) != 0) {
          ++split_tokens;
          break;
        }
    CHECK(split_tokens == 0);
  }
}

TEST_CASE_TEMPLATE("top-k device matches the reference: both algorithms, any E and k", T, float, __nv_bfloat16, __half) {
  mt::Rng rng(mt::fresh_seed());
  for (int E : {2, 4, 8, 30, 64, 256, 1000})
    for (int K : {1, 2, 8, 9, 32}) {
      if (K > E) continue;
      // small mode: E >= 256 takes 4 tokens a block, so 13 tokens still give 4 blocks, the last partial
      check_topk<T>(rng, E >= 256 ? mt::size<int64_t>(53, 13) : 53, E, K);
    }
  check_topk<T>(rng, 1, 64, 4);
  check_topk<T>(rng, 41, 64, 6, 8, 3);      // DeepSeek-V3 style: 8 groups, keep 3
  check_topk<T>(rng, 41, 256, 8, 8, 4);
  check_topk<T>(rng, 41, 256, 16, 8, 4);    // threshold algorithm with group limits
  check_topk<T>(rng, 41, 12, 3, 12, 5);     // one-expert groups
  check_topk<T>(rng, 41, 64, 4, 1, 1, false);
}

TEST_CASE_TEMPLATE("top-k device backward skips -1 and corrupt slots, as the reference", T, float, __nv_bfloat16,
                   __half) {
  mt::Rng rng(mt::fresh_seed());
  for (int E : {5, 64, 300}) {
    CAPTURE(E);
    const int64_t T_ = 37;
    const int K = 4;
    const auto s = mt::round_through<T>(mt::uniform_vector<double>(rng, T_ * E, 0.1, 1.0));
    std::vector<int32_t> idx(T_ * K);
    for (int64_t t = 0; t < T_; ++t) {
      std::vector<int> order(E);
      std::iota(order.begin(), order.end(), 0);
      std::shuffle(order.begin(), order.end(), rng.engine());
      for (int k = 0; k < K; ++k) idx[t * K + k] = order[k];
      // every third token loses a slot (-1), every fifth gets a corrupt one (far out of range)
      if (t % 3 == 0) idx[t * K + t % K] = -1;
      if (t % 5 == 0) idx[t * K + (t + 1) % K] = (t % 2) ? E + 1000000 : -1000000;
    }
    const auto gw = mt::uniform_vector<double>(rng, T_ * K), gv = mt::uniform_vector<double>(rng, T_ * K);
    moxe::router::TopKParams<double, double> rp{{T_, E, K}, s.data(), idx.data()};
    std::vector<double> want(T_ * E);
    REQUIRE(rr::topk_backward(moxe::router::TopKBackwardParams<double, double>{rp, gw.data(), gv.data(), want.data()}) ==
            Status::ok);
    mt::DeviceBuffer<T> ds(mt::convert_to<T>(s)), dgrad(T_ * E);
    mt::DeviceBuffer<int32_t> didx(idx);
    mt::DeviceBuffer<float> bgw(mt::convert_to<float>(gw)), bgv(mt::convert_to<float>(gv));
    dgrad.poison();
    moxe::router::TopKParams<T, float> p{{T_, E, K}, ds.get(), didx.get()};
    moxe::router::TopKBackwardParams<T, float> b{p, bgw.get(), bgv.get(), dgrad.get()};
    REQUIRE(moxe::router::topk_backward(b, nullptr, 0, nullptr) == Status::ok);
    CHECK(mt::rel_error(mt::convert_to_double(dgrad.download()), want) < tolerance<T>());
  }
}

TEST_CASE("top-k device: exact ties go to the lower index in both algorithms") {
  for (int K : {4, 20}) {
    std::vector<float> s(3 * 40, 0.5f);
    s[40 + 33] = 0.75f;
    mt::DeviceBuffer<float> ds(s);
    mt::DeviceBuffer<int32_t> didx(3 * K);
    moxe::router::TopKParams<float, float> p{{3, 40, K}, ds.get(), didx.get()};
    REQUIRE(moxe::router::topk_forward(p, nullptr, 0, nullptr) == Status::ok);
    const auto idx = didx.download();
    for (int k = 0; k < K; ++k) {
      CHECK(idx[k] == k);
      CHECK(idx[K + k] == (k == 0 ? 33 : k - 1));
    }
  }
}

TEST_CASE("top-k device: NaN scores rank as -inf in both algorithms, as in the reference") {
  for (int E : {8, 40})
    for (int K : {4, 8, 20}) {
      if (K > E) continue;
      CAPTURE(E);
      CAPTURE(K);
      std::vector<float> s(2 * E);
      for (int e = 0; e < E; ++e) {
        s[e] = e % 3 == 0 ? NAN : 0.01f * float(e);  // NaN first: it must not stick as the best
        s[E + e] = NAN;                              // all NaN: the lowest indices
      }
      mt::DeviceBuffer<float> ds(s);
      mt::DeviceBuffer<int32_t> didx(2 * K);
      moxe::router::TopKParams<float, float> p{{2, E, K}, ds.get(), didx.get()};
      REQUIRE(moxe::router::topk_forward(p, nullptr, 0, nullptr) == Status::ok);
      std::vector<int32_t> ref(2 * K);
      moxe::router::TopKParams<float, float> h{{2, E, K}, s.data(), ref.data()};
      REQUIRE(moxe::router::reference::topk_forward(h) == Status::ok);
      CHECK(didx.download() == ref);
    }
}

TEST_CASE("router pieces: bad arguments") {
  mt::DeviceBuffer<float> s(40);
  mt::DeviceBuffer<int32_t> idx(40);
  idx.poison();
  moxe::router::TopKParams<float, float> p{{1, 40, 33}, s.get(), idx.get()};
  CHECK(moxe::router::topk_forward(p, nullptr, 0, nullptr) == Status::unsupported);  // k <= E but k > 32
  p.dims = {1, 40, 41};
  CHECK(moxe::router::topk_forward(p, nullptr, 0, nullptr) == Status::invalid_argument);
  p.dims = {1, 2048, 2};
  CHECK(moxe::router::topk_forward(p, nullptr, 0, nullptr) == Status::unsupported);
  MOXE_TEST_CUDA(cudaDeviceSynchronize());
  CHECK(idx.download()[0] == -1);
  moxe::router::SoftmaxEntropyParams<float, float> q{{0, 40}, s.get()};
  CHECK(moxe::router::softmax_entropy_forward(q, nullptr, 0, nullptr) == Status::invalid_argument);
}
