// Device tests of moxe::mlstm::per_token_forward / per_token_backward: against the host
// implementation in double (inputs rounded through T) at head dims below, at and above a
// warp, size 1 included; extreme gates; poisoned outputs; determinism; bad arguments launch
// nothing. Small-size mode (MOXE_TEST_SMALL) keeps every head dim at fewer rows.
#include <doctest/doctest.h>

#include <algorithm>
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

/// Half the spacing of T's subnormals: the absolute rounding of an output stored in T below
/// T's normal range, where the relative tolerance does not hold (half: 2^-25; the eps / den^2
/// gradients of dq and dk on the |n.q| branch are ~1e-7 and land there).
template <class T>
double subnormal_rounding() {
  return std::is_same_v<T, float> ? 0x1p-150 : (std::is_same_v<T, __half> ? 0x1p-25 : 0x1p-134);
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

/// Per output element, what a float evaluation of the exact math cannot avoid (docs/mlstm.md,
/// "Tests"): the spread of the double math over s = k . qs and g = dh . v moved by the float
/// dot products' error bound (mt::dot_rounding_bound), plus T's subnormal rounding.
struct Allowance {
  std::vector<double> h, dq, dk, dv, di, df;
};

template <class T>
Allowance float_allowance(const DeviceCase<T>& d, double eps) {
  const Case& cs = d.c;
  const double scale = 1.0 / std::sqrt(double(cs.dqk));
  const double sub = subnormal_rounding<T>();
  Allowance a;
  a.h.resize(cs.rows() * cs.dv);
  a.dv.resize(cs.rows() * cs.dv);
  a.dq.resize(cs.rows() * cs.dqk);
  a.dk.resize(cs.rows() * cs.dqk);
  a.di.resize(cs.rows());
  a.df.resize(cs.rows());
  for (int64_t r = 0; r < cs.rows(); ++r) {
    double s = 0, s_abs = 0, g = 0, g_abs = 0;
    for (int64_t j = 0; j < cs.dqk; ++j) {
      const double t = d.q[r * cs.dqk + j] * scale * d.k[r * cs.dqk + j];
      s += t;
      s_abs += std::abs(t);
    }
    for (int64_t e = 0; e < cs.dv; ++e) {
      const double t = d.dh[r * cs.dv + e] * d.v[r * cs.dv + e];
      g += t;
      g_abs += std::abs(t);
    }
    // s also rounds once more when scaled
    const double s_err = mt::dot_rounding_bound(cs.dqk, s_abs) + 0x1p-24 * std::abs(s);
    const double g_err = mt::dot_rounding_bound(cs.dv, g_abs);
    const auto at = mlstm::detail::per_token_grad<double>(d.ig[r], d.fg[r], s, g, eps);
    double h_scale = 0, ds = 0, di = 0, df = 0;
    for (double s1 : {s - s_err, s + s_err}) {
      for (double g1 : {g - g_err, g + g_err}) {
        const auto x = mlstm::detail::per_token_grad<double>(d.ig[r], d.fg[r], s1, g1, eps);
        h_scale = std::max(h_scale, std::abs(x.h_scale - at.h_scale));
        ds = std::max(ds, std::abs(x.ds - at.ds));
        di = std::max(di, std::abs(x.digate - at.digate));
        df = std::max(df, std::abs(x.dfgate - at.dfgate));
      }
    }
    for (int64_t e = 0; e < cs.dv; ++e) {
      a.h[r * cs.dv + e] = h_scale * std::abs(d.v[r * cs.dv + e]) + sub;
      a.dv[r * cs.dv + e] = h_scale * std::abs(d.dh[r * cs.dv + e]) + sub;
    }
    for (int64_t j = 0; j < cs.dqk; ++j) {
      a.dq[r * cs.dqk + j] = ds * scale * std::abs(d.k[r * cs.dqk + j]) + sub;
      a.dk[r * cs.dqk + j] = ds * scale * std::abs(d.q[r * cs.dqk + j]) + sub;
    }
    a.di[r] = di + sub;
    a.df[r] = df + sub;
  }
  return a;
}

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

  // ||device - reference|| <= tol ||reference|| + ||allowance|| (float_allowance)
  const double tol = tolerance<T>();
  const Allowance a = float_allowance(d, p.eps);
  auto got = [](const mt::DeviceBuffer<T>& x) { return mt::convert_to_double(x.download()); };
  CHECK(mt::error_norm(got(d.h), h) <= tol * mt::l2_norm(h) + mt::l2_norm(a.h));
  CHECK(mt::error_norm(got(d.dq), dq) <= tol * mt::l2_norm(dq) + mt::l2_norm(a.dq));
  CHECK(mt::error_norm(got(d.dk), dk) <= tol * mt::l2_norm(dk) + mt::l2_norm(a.dk));
  CHECK(mt::error_norm(got(d.dv), dv) <= tol * mt::l2_norm(dv) + mt::l2_norm(a.dv));
  CHECK(mt::error_norm(got(d.di), di) <= tol * mt::l2_norm(di) + mt::l2_norm(a.di));
  // dfgate: a difference of terms the size of digate, on digate's scale (mt::dfgate_error);
  // both are 0 where m follows igate on the |n.q| branch
  CHECK(mt::error_norm(got(d.df), df) <= tol * std::hypot(mt::l2_norm(df), mt::l2_norm(di)) + mt::l2_norm(a.df));
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
