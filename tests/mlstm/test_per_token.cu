// Device tests of moxe::mlstm::per_token_forward / per_token_backward: against the host
// implementation in double (inputs rounded through T) at head dims below, at and above a
// warp, size 1 included; extreme gates; poisoned outputs; determinism; bad arguments launch
// nothing. Small-size mode (MOXE_TEST_SMALL) keeps every head dim at fewer rows.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "device_utils.cuh"
#include "mlstm_testing.hpp"
#include "moxe/mlstm/per_token.cuh"
#include "test_utils.hpp"

namespace mlstm = moxe::mlstm;
namespace mt = moxe::test;
using moxe::Status;

namespace {

struct Case {
  int64_t batch, heads, seq, dqk, dv;
  int64_t rows() const { return batch * heads * seq; }
};

template <class T>
double tolerance() {
  return std::is_same_v<T, float> ? 1e-5 : (std::is_same_v<T, __half> ? 2e-3 : 1e-2);
}

template <class T>
struct DeviceCase {
  Case c;
  std::vector<double> q, k, v, ig, fg, dh;  // rounded through T
  mt::DeviceBuffer<T> dq_in, dk_in, dv_in, dig_in, dfg_in, ddh_in, h, dq, dk, dv, di, df;

  /// extreme: gates at the edges of the domain (mt::apply_extreme_rows) on most rows
  DeviceCase(mt::Rng& rng, const Case& cs, bool extreme = false)
      : c(cs),
        q(mt::round_through<T>(mt::normal_vector<double>(rng, cs.rows() * cs.dqk))),
        k(mt::round_through<T>(mt::normal_vector<double>(rng, cs.rows() * cs.dqk))),
        v(mt::round_through<T>(mt::normal_vector<double>(rng, cs.rows() * cs.dv))),
        ig(mt::round_through<T>(mt::uniform_vector<double>(rng, cs.rows(), -6.0, 4.0))),
        fg(mt::round_through<T>(mt::uniform_vector<double>(rng, cs.rows(), -4.0, 6.0))),
        dh(mt::round_through<T>(mt::normal_vector<double>(rng, cs.rows() * cs.dv))),
        dq_in(mt::convert_to<T>(q)),
        dk_in(mt::convert_to<T>(k)),
        dv_in(mt::convert_to<T>(v)),
        dig_in(mt::convert_to<T>(ig)),
        dfg_in(mt::convert_to<T>(fg)),
        ddh_in(mt::convert_to<T>(dh)),
        h(cs.rows() * cs.dv),
        dq(cs.rows() * cs.dqk),
        dk(cs.rows() * cs.dqk),
        dv(cs.rows() * cs.dv),
        di(cs.rows()),
        df(cs.rows()) {
    if (extreme) {
      mt::apply_extreme_rows(rng, ig, fg);
      ig = mt::round_through<T>(ig);
      fg = mt::round_through<T>(fg);
      dig_in.upload(mt::convert_to<T>(ig));
      dfg_in.upload(mt::convert_to<T>(fg));
    }
    poison();
  }
  void poison() {
    h.poison(); dq.poison(); dk.poison(); dv.poison(); di.poison(); df.poison();
  }
  mlstm::ForwardParams<T, float> fwd() const {
    mlstm::ForwardParams<T, float> p{};
    p.dims = mlstm::Dims{c.batch, c.heads, c.seq, c.dqk, c.dv};
    p.q = dq_in.get();
    p.k = dk_in.get();
    p.v = dv_in.get();
    p.igate = dig_in.get();
    p.fgate = dfg_in.get();
    p.h = h.get();
    return p;
  }
  mlstm::BackwardParams<T, float> bwd() const {
    mlstm::BackwardParams<T, float> b{};
    b.fwd = fwd();
    b.dh = ddh_in.get();
    b.dq = dq.get();
    b.dk = dk.get();
    b.dv = dv.get();
    b.digate = di.get();
    b.dfgate = df.get();
    return b;
  }
};

template <class T>
void check_case(mt::Rng& rng, const Case& cs, bool extreme = false) {
  CAPTURE(cs.rows());
  CAPTURE(cs.dqk);
  CAPTURE(cs.dv);
  CAPTURE(extreme);
  DeviceCase<T> d(rng, cs, extreme);
  REQUIRE(mlstm::per_token_forward(d.fwd(), nullptr, 0, nullptr) == Status::ok);
  REQUIRE(mlstm::per_token_backward(d.bwd(), nullptr, 0, nullptr) == Status::ok);

  // the host implementation in double on the same (rounded) inputs
  std::vector<double> h(cs.rows() * cs.dv), dq(cs.rows() * cs.dqk), dk(dq.size()), dv(h.size()), di(cs.rows()),
      df(cs.rows());
  mlstm::ForwardParams<double, double> p{};
  p.dims = mlstm::Dims{cs.batch, cs.heads, cs.seq, cs.dqk, cs.dv};
  p.q = d.q.data();
  p.k = d.k.data();
  p.v = d.v.data();
  p.igate = d.ig.data();
  p.fgate = d.fg.data();
  p.h = h.data();
  REQUIRE(mlstm::reference::per_token_forward(p) == Status::ok);
  mlstm::BackwardParams<double, double> b{};
  b.fwd = p;
  b.dh = d.dh.data();
  b.dq = dq.data();
  b.dk = dk.data();
  b.dv = dv.data();
  b.digate = di.data();
  b.dfgate = df.data();
  REQUIRE(mlstm::reference::per_token_backward(b) == Status::ok);

  const double tol = tolerance<T>();
  CHECK(mt::rel_error(mt::convert_to_double(d.h.download()), h) < tol);
  CHECK(mt::rel_error(mt::convert_to_double(d.dq.download()), dq) < tol);
  CHECK(mt::rel_error(mt::convert_to_double(d.dk.download()), dk) < tol);
  CHECK(mt::rel_error(mt::convert_to_double(d.dv.download()), dv) < tol);
  CHECK(mt::rel_error(mt::convert_to_double(d.di.download()), di) < tol);
  // dfgate: a difference of terms the size of digate (mt::dfgate_error)
  CHECK(mt::dfgate_error(mt::convert_to_double(d.df.download()), df, di) < tol);
  if (extreme) {  // the derivative of a gate at +-inf is 0 (the limit)
    const auto got_di = mt::convert_to_double(d.di.download()), got_df = mt::convert_to_double(d.df.download());
    for (int64_t r = 0; r < cs.rows(); ++r) {
      if (std::isinf(d.fg[r])) CHECK(got_df[r] == 0.0);
      if (std::isinf(d.ig[r])) CHECK(got_di[r] == 0.0);
    }
  }
}

}  // namespace

TEST_CASE_TEMPLATE("per-token mLSTM on the device matches the host implementation", T, float, __half,
                   __nv_bfloat16) {
  mt::Rng rng(mt::fresh_seed());
  // small: the same head dims at fewer rows, still many blocks (8 rows each)
  const auto cases = mt::sizes<Case>({{1, 1, 1, 1, 1}, {2, 3, 5, 16, 16}, {3, 2, 7, 33, 40}, {1, 1, 1000, 128, 128},
                                      {5, 4, 3, 256, 96}, {4096, 8, 1, 128, 128}},
                                     {{1, 1, 1, 1, 1}, {2, 3, 5, 16, 16}, {3, 2, 7, 33, 40}, {1, 1, 100, 128, 128},
                                      {5, 4, 3, 256, 96}, {37, 2, 1, 128, 128}});
  for (const Case& c : cases) check_case<T>(rng, c);
}

TEST_CASE_TEMPLATE("per-token mLSTM on the device at extreme gates (exp(-m) beyond float's range, infinite gates)",
                   T, float, __half, __nv_bfloat16) {
  const auto seed = mt::fresh_seed();
  INFO("seed " << seed);
  mt::Rng rng(seed);
  const Case cases[] = {{1, 1, 14, 1, 1}, {2, 3, 7, 16, 16}, {1, 2, 35, 40, 33}};
  for (const Case& c : cases) check_case<T>(rng, c, /*extreme=*/true);
}

TEST_CASE("per-token mLSTM on the device: two runs give the same bits") {
  mt::Rng rng(mt::fresh_seed());
  DeviceCase<__nv_bfloat16> d(rng, Case{7, 3, 11, 48, 80});
  REQUIRE(mlstm::per_token_forward(d.fwd(), nullptr, 0, nullptr) == Status::ok);
  REQUIRE(mlstm::per_token_backward(d.bwd(), nullptr, 0, nullptr) == Status::ok);
  const auto h = d.h.download();
  const auto dq = d.dq.download();
  const auto df = d.df.download();
  d.poison();
  REQUIRE(mlstm::per_token_forward(d.fwd(), nullptr, 0, nullptr) == Status::ok);
  REQUIRE(mlstm::per_token_backward(d.bwd(), nullptr, 0, nullptr) == Status::ok);
  CHECK(std::memcmp(h.data(), d.h.download().data(), h.size() * sizeof(h[0])) == 0);
  CHECK(std::memcmp(dq.data(), d.dq.download().data(), dq.size() * sizeof(dq[0])) == 0);
  CHECK(std::memcmp(df.data(), d.df.download().data(), df.size() * sizeof(df[0])) == 0);
}

TEST_CASE("per-token mLSTM on the device: states, segments and bad arguments launch nothing") {
  mt::Rng rng(mt::fresh_seed());
  DeviceCase<float> d(rng, Case{1, 2, 3, 16, 16});
  mt::DeviceBuffer<float> state(2 * 16 * 16), nstate(2 * 16), mstate(2);
  auto with_init = d.fwd();
  with_init.c_init = state.get();
  with_init.n_init = nstate.get();
  with_init.m_init = mstate.get();
  CHECK(mlstm::per_token_forward(with_init, nullptr, 0, nullptr) == Status::unsupported);
  auto no_q = d.fwd();
  no_q.q = nullptr;
  CHECK(mlstm::per_token_forward(no_q, nullptr, 0, nullptr) == Status::invalid_argument);
  auto b = d.bwd();
  b.dm_last = mstate.get();
  b.dc_last = state.get();
  b.dn_last = nstate.get();
  CHECK(mlstm::per_token_backward(b, nullptr, 0, nullptr) == Status::unsupported);
  MOXE_TEST_CUDA(cudaDeviceSynchronize());
  for (float x : d.h.download()) CHECK(std::isnan(x));
  for (float x : d.dq.download()) CHECK(std::isnan(x));
}
