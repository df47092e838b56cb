// Host tests of the per-token mLSTM (every position a length-1 sequence from the zero
// state): its closed form against the recurrent reference at seq_len 1, forward and
// backward, both branches of the stabiliser and of the normaliser, extreme gates (also in
// float against double), and its checks.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "mlstm_testing.hpp"
#include "moxe/mlstm/per_token.hpp"
#include "moxe/mlstm/reference.hpp"
#include "test_utils.hpp"

namespace mlstm = moxe::mlstm;
namespace mt = moxe::test;
using moxe::Status;

namespace {

struct Case {
  int64_t batch, heads, seq, dqk, dv;
  int64_t rows() const { return batch * heads * seq; }
};

struct Data {
  std::vector<double> q, k, v, ig, fg, dh;
};

/// Random inputs; `small_rows` rows get a tiny q, so that |n.q| < exp(-m) there (the
/// normaliser's other branch); the gates span both branches of the stabiliser.
Data draw(mt::Rng& rng, const Case& c) {
  Data d;
  d.q = mt::normal_vector<double>(rng, c.rows() * c.dqk);
  d.k = mt::normal_vector<double>(rng, c.rows() * c.dqk);
  d.v = mt::normal_vector<double>(rng, c.rows() * c.dv);
  d.ig = mt::uniform_vector<double>(rng, c.rows(), -6.0, 4.0);
  d.fg = mt::uniform_vector<double>(rng, c.rows(), -4.0, 6.0);
  d.dh = mt::normal_vector<double>(rng, c.rows() * c.dv);
  for (int64_t r = 0; r < c.rows(); r += 3)
    for (int64_t j = 0; j < c.dqk; ++j) d.q[r * c.dqk + j] *= 1e-4;
  return d;
}

mlstm::ForwardParams<double, double> params(const Case& c, Data& d, std::vector<double>& h) {
  mlstm::ForwardParams<double, double> p{};
  p.dims = mlstm::Dims{c.batch, c.heads, c.seq, c.dqk, c.dv};
  p.q = d.q.data();
  p.k = d.k.data();
  p.v = d.v.data();
  p.igate = d.ig.data();
  p.fgate = d.fg.data();
  p.h = h.data();
  return p;
}

struct Grads {
  std::vector<double> dq, dk, dv, di, df;
  explicit Grads(const Case& c)
      : dq(mt::poisoned<double>(c.rows() * c.dqk)),
        dk(mt::poisoned<double>(c.rows() * c.dqk)),
        dv(mt::poisoned<double>(c.rows() * c.dv)),
        di(mt::poisoned<double>(c.rows())),
        df(mt::poisoned<double>(c.rows())) {}
  mlstm::BackwardParams<double, double> params(const mlstm::ForwardParams<double, double>& f, const Data& d) {
    mlstm::BackwardParams<double, double> b{};
    b.fwd = f;
    b.dh = d.dh.data();
    b.dq = dq.data();
    b.dk = dk.data();
    b.dv = dv.data();
    b.digate = di.data();
    b.dfgate = df.data();
    return b;
  }
};

}  // namespace

TEST_CASE("per-token mLSTM equals the recurrence at seq_len 1, forward and backward") {
  const auto seed = mt::fresh_seed();
  INFO("seed " << seed);
  mt::Rng rng(seed);
  const Case cases[] = {{1, 1, 1, 1, 1}, {2, 3, 5, 16, 16}, {3, 2, 4, 33, 40}, {1, 4, 7, 3, 5}, {2, 1, 9, 128, 64}};
  for (const Case& c : cases) {
    CAPTURE(c.rows());
    CAPTURE(c.dqk);
    CAPTURE(c.dv);
    for (int variant = 0; variant < 3; ++variant) {
      const double qk_scale = variant == 1 ? 0.3 : 0.0;
      const bool extreme = variant == 2;
      CAPTURE(extreme);
      Data d = draw(rng, c);
      if (extreme) mt::apply_extreme_rows(rng, d.ig, d.fg);
      std::vector<double> h = mt::poisoned<double>(c.rows() * c.dv), h_ref(h.size());
      auto p = params(c, d, h);
      p.qk_scale = qk_scale;
      REQUIRE(mlstm::reference::per_token_forward(p) == Status::ok);
      // the recurrent reference over the same memory seen as rows x (1 head, 1 step)
      auto pr = p;
      pr.dims = mlstm::Dims{c.rows(), 1, 1, c.dqk, c.dv};
      pr.h = h_ref.data();
      REQUIRE(mlstm::reference::forward(pr) == Status::ok);
      CHECK(mt::rel_error(h, h_ref) < 1e-13);

      Grads g(c), g_ref(c);
      REQUIRE(mlstm::reference::per_token_backward(g.params(p, d)) == Status::ok);
      REQUIRE(mlstm::reference::backward(g_ref.params(pr, d)) == Status::ok);
      // On the |n.q| branch the recurrence's backward gets the gradient of n.q (eps / den^2)
      // as a difference of two terms ~|n.q| / eps larger; the per-token path computes it
      // directly. So dq, dk and the gates agree to the reference's cancellation, ~1e-10.
      CHECK(mt::rel_error(g.dq, g_ref.dq) < 1e-9);
      CHECK(mt::rel_error(g.dk, g_ref.dk) < 1e-9);
      CHECK(mt::rel_error(g.dv, g_ref.dv) < 1e-12);
      CHECK(mt::rel_error(g.di, g_ref.di) < 1e-9);
      // dfgate: a difference of terms the size of digate (mt::dfgate_error)
      CHECK(mt::dfgate_error(g.df, g_ref.df, g_ref.di) < 1e-9);
    }
  }
}

TEST_CASE("per-token mLSTM in float at extreme gates: finite, and equal to double to rounding") {
  const auto seed = mt::fresh_seed();
  INFO("seed " << seed);
  mt::Rng rng(seed);
  const Case c{2, 3, 14, 24, 20};
  Data d = draw(rng, c);
  // q of ordinary size on every row: at m ~ 100 a tiny q (draw()'s every third row) takes
  // the |n.q| branch with n.q ~ 1e-4 ~ 100 eps, where the float rounding of the dot
  // product itself, not the cell, sets the error of the large eps / den^2 gradient
  d.q = mt::normal_vector<double>(rng, c.rows() * c.dqk);
  mt::apply_extreme_rows(rng, d.ig, d.fg);
  for (auto* v : {&d.q, &d.k, &d.v, &d.ig, &d.fg, &d.dh})
    for (double& x : *v) x = double(float(x));
  std::vector<double> h = mt::poisoned<double>(c.rows() * c.dv);
  const auto p = params(c, d, h);
  REQUIRE(mlstm::reference::per_token_forward(p) == Status::ok);
  Grads g(c);
  REQUIRE(mlstm::reference::per_token_backward(g.params(p, d)) == Status::ok);

  auto f32 = [](const std::vector<double>& v) { return std::vector<float>(v.begin(), v.end()); };
  const auto q = f32(d.q), k = f32(d.k), v = f32(d.v), ig = f32(d.ig), fg = f32(d.fg), dh = f32(d.dh);
  std::vector<float> hf = mt::poisoned<float>(h.size()), dq = mt::poisoned<float>(g.dq.size()),
                     dk = mt::poisoned<float>(g.dk.size()), dv = mt::poisoned<float>(g.dv.size()),
                     di = mt::poisoned<float>(g.di.size()), df = mt::poisoned<float>(g.df.size());
  mlstm::ForwardParams<float, float> pf{};
  pf.dims = p.dims;
  pf.q = q.data(), pf.k = k.data(), pf.v = v.data(), pf.igate = ig.data(), pf.fgate = fg.data(), pf.h = hf.data();
  REQUIRE(mlstm::reference::per_token_forward(pf) == Status::ok);
  mlstm::BackwardParams<float, float> bf{};
  bf.fwd = pf;
  bf.dh = dh.data();
  bf.dq = dq.data(), bf.dk = dk.data(), bf.dv = dv.data(), bf.digate = di.data(), bf.dfgate = df.data();
  REQUIRE(mlstm::reference::per_token_backward(bf) == Status::ok);
  for (const auto* x : {&hf, &dq, &dk, &dv, &di, &df}) CHECK(mt::all_finite(*x));
  CHECK(mt::rel_error(hf, h) < 1e-5);
  CHECK(mt::rel_error(dq, g.dq) < 1e-5);
  CHECK(mt::rel_error(dk, g.dk) < 1e-5);
  CHECK(mt::rel_error(dv, g.dv) < 1e-5);
  CHECK(mt::rel_error(di, g.di) < 1e-5);
  CHECK(mt::dfgate_error(mt::to_double(df), g.df, g.di) < 1e-5);
  // the limits at infinite gates: the derivative of a gate at +-inf is 0
  for (int64_t r = 0; r < c.rows(); ++r) {
    CAPTURE(r);
    if (std::isinf(d.fg[r])) CHECK(df[r] == 0.f);
    if (std::isinf(d.ig[r])) CHECK(di[r] == 0.f);
  }
}

TEST_CASE("per-token mLSTM: both normaliser branches and both stabiliser branches occur") {
  // the comparison above is only as strong as the branches it visits
  mt::Rng rng(mt::fresh_seed());
  const Case c{4, 2, 8, 16, 16};
  const Data d = draw(rng, c);
  int floor_branch = 0, dot_branch = 0, m_from_f = 0, m_from_i = 0;
  for (int64_t r = 0; r < c.rows(); ++r) {
    double s = 0;
    for (int64_t j = 0; j < c.dqk; ++j) s += d.q[r * c.dqk + j] * d.k[r * c.dqk + j] / std::sqrt(double(c.dqk));
    const auto f = mlstm::detail::per_token_scalars(d.ig[r], d.fg[r], s, 1e-6);
    (std::fabs(f.nq) < std::exp(-f.gate.m) ? floor_branch : dot_branch)++;
    (f.gate.m_from_decay ? m_from_f : m_from_i)++;
  }
  CHECK(floor_branch > 0);
  CHECK(dot_branch > 0);
  CHECK(m_from_f > 0);
  CHECK(m_from_i > 0);
}

TEST_CASE("per-token mLSTM rejects states and segments, and bad arguments, writing nothing") {
  mt::Rng rng(mt::fresh_seed());
  const Case c{1, 2, 3, 4, 4};
  Data d = draw(rng, c);
  std::vector<double> h = mt::poisoned<double>(c.rows() * c.dv);
  std::vector<double> state(c.heads * c.dqk * c.dv, 0.0), nstate(c.heads * c.dqk, 0.0), mstate(c.heads, 0.0);
  const int64_t offsets[2] = {0, c.seq};
  auto check_untouched = [&] {
    for (double x : h) CHECK(std::isnan(x));
  };
  auto p = params(c, d, h);
  auto with_init = p;
  with_init.c_init = state.data();
  with_init.n_init = nstate.data();
  with_init.m_init = mstate.data();
  CHECK(mlstm::reference::per_token_forward(with_init) == Status::unsupported);
  auto with_last = p;
  with_last.c_last = state.data();
  with_last.n_last = nstate.data();
  with_last.m_last = mstate.data();
  CHECK(mlstm::reference::per_token_forward(with_last) == Status::unsupported);
  auto with_segments = p;
  with_segments.segment_offsets = offsets;
  with_segments.num_segments = 1;
  CHECK(mlstm::reference::per_token_forward(with_segments) == Status::unsupported);
  auto no_h = p;
  no_h.h = nullptr;
  CHECK(mlstm::reference::per_token_forward(no_h) == Status::invalid_argument);
  auto bad_dims = p;
  bad_dims.dims.dqk = 0;
  CHECK(mlstm::reference::per_token_forward(bad_dims) == Status::invalid_argument);
  for (double eps : {0.0, -1e-6, std::nan(""), std::numeric_limits<double>::infinity()}) {
    auto bad_eps = p;
    bad_eps.eps = eps;
    CHECK(mlstm::reference::per_token_forward(bad_eps) == Status::invalid_argument);
  }
  check_untouched();

  Grads g(c);
  auto b = g.params(p, d);
  b.dc_last = state.data();
  b.dn_last = nstate.data();
  b.dm_last = mstate.data();
  CHECK(mlstm::reference::per_token_backward(b) == Status::unsupported);
  auto b2 = g.params(p, d);
  b2.dq = nullptr;
  CHECK(mlstm::reference::per_token_backward(b2) == Status::invalid_argument);
  auto b3 = g.params(p, d);
  b3.fwd.eps = 0.0;
  CHECK(mlstm::reference::per_token_backward(b3) == Status::invalid_argument);
  for (double x : g.dv) CHECK(std::isnan(x));
}
