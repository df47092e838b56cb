// Host tests of the mLSTM reference: forward against a naive loop written from the
// definition, backward against central finite differences (double) for every input,
// variable-length segments, the decoding step, extreme gates (infinite, and m far outside
// float's range: finite differences in double, float against double), and input validation.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "mlstm_testing.hpp"
#include "moxe/mlstm/params.hpp"
#include "moxe/mlstm/reference.hpp"
#include "test_utils.hpp"

namespace mlstm = moxe::mlstm;
using moxe::Status;
using moxe::test::Rng;

namespace {

/// Value ranges of a random problem: they select the regime (large gates, either branch of
/// the normaliser).
struct Ranges {
  double gate = 3.0;           // igate, fgate uniform in [-gate, gate]
  double igate_shift = 0.0;    // added to igate
  double q_lo = -1.0, q_hi = 1.0;  // q range
  double k_lo = -1.0, k_hi = 1.0;  // k range
  double m_lo = -1.0, m_hi = 1.0;  // m_init range
};

struct Problem {
  mlstm::Dims dims{};
  std::vector<double> q, k, v, igate, fgate;
  bool with_init = false;
  std::vector<double> c0, n0, m0;
  std::vector<int64_t> offsets;  // empty: no segments
  double qk_scale = 0.0, eps = 1e-6;

  int64_t num_segments() const { return offsets.empty() ? 0 : int64_t(offsets.size()) - 1; }
  int64_t slots() const { return mlstm::state_slots(dims, num_segments()); }
  std::size_t tokens() const { return std::size_t(dims.batch * dims.heads * dims.seq_len); }
};

Problem make_problem(Rng& rng, mlstm::Dims dims, bool with_init, const Ranges& r = {},
                     std::vector<int64_t> offsets = {}) {
  Problem p;
  p.dims = dims;
  p.offsets = std::move(offsets);
  const std::size_t rows = p.tokens();
  p.q = moxe::test::uniform_vector<double>(rng, rows * dims.dqk, r.q_lo, r.q_hi);
  p.k = moxe::test::uniform_vector<double>(rng, rows * dims.dqk, r.k_lo, r.k_hi);
  p.v = moxe::test::uniform_vector<double>(rng, rows * dims.dv);
  p.igate = moxe::test::uniform_vector<double>(rng, rows, -r.gate, r.gate);
  for (double& x : p.igate) x += r.igate_shift;
  p.fgate = moxe::test::uniform_vector<double>(rng, rows, -r.gate, r.gate);
  p.with_init = with_init;
  if (with_init) {
    const std::size_t slots = std::size_t(p.slots());
    p.c0 = moxe::test::uniform_vector<double>(rng, slots * dims.dqk * dims.dv);
    p.n0 = moxe::test::uniform_vector<double>(rng, slots * dims.dqk);
    p.m0 = moxe::test::uniform_vector<double>(rng, slots, r.m_lo, r.m_hi);
  }
  return p;
}

struct Outputs {
  std::vector<double> h, c, n, m;
};

Outputs make_outputs(const Problem& p) {
  const std::size_t slots = std::size_t(p.slots());
  Outputs o;
  o.h = moxe::test::poisoned<double>(p.tokens() * p.dims.dv);
  o.c = moxe::test::poisoned<double>(slots * p.dims.dqk * p.dims.dv);
  o.n = moxe::test::poisoned<double>(slots * p.dims.dqk);
  o.m = moxe::test::poisoned<double>(slots);
  return o;
}

mlstm::ForwardParams<double, double> forward_params(const Problem& p, Outputs& o) {
  mlstm::ForwardParams<double, double> f;
  f.dims = p.dims;
  f.q = p.q.data();
  f.k = p.k.data();
  f.v = p.v.data();
  f.igate = p.igate.data();
  f.fgate = p.fgate.data();
  if (p.with_init) {
    f.c_init = p.c0.data();
    f.n_init = p.n0.data();
    f.m_init = p.m0.data();
  }
  f.h = o.h.data();
  f.c_last = o.c.data();
  f.n_last = o.n.data();
  f.m_last = o.m.data();
  f.qk_scale = p.qk_scale;
  f.eps = p.eps;
  if (!p.offsets.empty()) {
    f.segment_offsets = p.offsets.data();
    f.num_segments = p.num_segments();
  }
  return f;
}

Outputs run_forward(const Problem& p) {
  Outputs o = make_outputs(p);
  REQUIRE(mlstm::reference::forward(forward_params(p, o)) == Status::ok);
  return o;
}

/// The definition, written out directly (no shared code with the library), plus a count of
/// which side of max(|n.qs|, exp(-m)) each step took.
struct Naive {
  Outputs out;
  std::vector<double> m_row;  // m after each row's step
  int dot_branch = 0, floor_branch = 0;
  double min_den = std::numeric_limits<double>::infinity();  // smallest max(|n.qs|, exp(-m))
  double min_kink = std::numeric_limits<double>::infinity();  // closest approach to a max tie
};

Naive naive_forward(const Problem& p) {
  const auto& d = p.dims;
  const int64_t DQK = d.dqk, DV = d.dv, S = d.seq_len, NH = d.heads;
  const double scale = p.qk_scale != 0.0 ? p.qk_scale : 1.0 / std::sqrt(double(DQK));
  Naive r;
  r.out.h.assign(p.tokens() * DV, 0.0);
  for (int64_t s = 0; s < p.slots(); ++s) {
    int64_t begin = s * S, len = S;
    if (!p.offsets.empty()) {
      const int64_t seg = s / NH, head = s % NH;
      begin = head * S + p.offsets[seg];
      len = p.offsets[seg + 1] - p.offsets[seg];
    }
    std::vector<double> C(DQK * DV, 0.0), n(DQK, 0.0);
    double m = 0.0;
    if (p.with_init) {
      std::copy_n(p.c0.begin() + s * DQK * DV, DQK * DV, C.begin());
      std::copy_n(p.n0.begin() + s * DQK, DQK, n.begin());
      m = p.m0[s];
    }
    for (int64_t t = begin; t < begin + len; ++t) {
      const double lf = std::log(1.0 / (1.0 + std::exp(-p.fgate[t])));
      const double m_new = std::max(lf + m, p.igate[t]);
      r.min_kink = std::min(r.min_kink, std::abs(lf + m - p.igate[t]));
      const double fs = std::exp(lf + m - m_new), is = std::exp(p.igate[t] - m_new);
      for (int64_t a = 0; a < DQK; ++a) {
        n[a] = fs * n[a] + is * p.k[t * DQK + a];
        for (int64_t j = 0; j < DV; ++j)
          C[a * DV + j] = fs * C[a * DV + j] + is * p.k[t * DQK + a] * p.v[t * DV + j];
      }
      m = m_new;
      r.m_row.resize(p.tokens());
      r.m_row[t] = m;
      double dot = 0.0;
      for (int64_t a = 0; a < DQK; ++a) dot += n[a] * p.q[t * DQK + a] * scale;
      const double floor = std::exp(-m);
      (std::abs(dot) >= floor ? r.dot_branch : r.floor_branch) += 1;
      r.min_den = std::min(r.min_den, std::max(std::abs(dot), floor));
      r.min_kink = std::min(r.min_kink, std::abs(std::abs(dot) - floor));
      const double den = std::max(std::abs(dot), floor) + p.eps;
      for (int64_t j = 0; j < DV; ++j) {
        double num = 0.0;
        for (int64_t a = 0; a < DQK; ++a) num += C[a * DV + j] * p.q[t * DQK + a] * scale;
        r.out.h[t * DV + j] = num / den;
      }
    }
    r.out.c.insert(r.out.c.end(), C.begin(), C.end());
    r.out.n.insert(r.out.n.end(), n.begin(), n.end());
    r.out.m.push_back(m);
  }
  return r;
}

/// A random problem that finite differences can check: the normaliser stays away from its
/// pole (h ~ 1/max(|n.qs|, exp(-m)), steep when both are small) and no max is within a
/// few steps of a tie (a difference straddling the kink mixes both sides). Redraws until
/// both hold.
template <class Make>
Problem well_conditioned(Make make) {
  auto ok = [](const Problem& p) {
    const Naive n = naive_forward(p);
    return n.min_den >= 0.05 && n.min_kink >= 1e-3;
  };
  Problem p = make();
  int tries = 0;
  for (; tries < 1000 && !ok(p); ++tries) p = make();
  REQUIRE(tries < 1000);
  return p;
}

/// Upstream gradients: dh and the final-state cotangents.
struct Cotangents {
  std::vector<double> dh, dc, dn, dm;
};

Cotangents make_cotangents(Rng& rng, const Problem& p) {
  const std::size_t slots = std::size_t(p.slots());
  Cotangents c;
  c.dh = moxe::test::uniform_vector<double>(rng, p.tokens() * p.dims.dv);
  c.dc = moxe::test::uniform_vector<double>(rng, slots * p.dims.dqk * p.dims.dv);
  c.dn = moxe::test::uniform_vector<double>(rng, slots * p.dims.dqk);
  c.dm = moxe::test::uniform_vector<double>(rng, slots);
  return c;
}

struct Grads {
  std::vector<double> dq, dk, dv, di, df, dc0, dn0, dm0;
};

/// Gradient outputs of `p`, poisoned so that anything not written stays NaN.
Grads poisoned_grads(const Problem& p) {
  const std::size_t slots = std::size_t(p.slots());
  Grads g;
  g.dq = moxe::test::poisoned<double>(p.q.size());
  g.dk = moxe::test::poisoned<double>(p.k.size());
  g.dv = moxe::test::poisoned<double>(p.v.size());
  g.di = moxe::test::poisoned<double>(p.igate.size());
  g.df = moxe::test::poisoned<double>(p.fgate.size());
  g.dc0 = moxe::test::poisoned<double>(slots * p.dims.dqk * p.dims.dv);
  g.dn0 = moxe::test::poisoned<double>(slots * p.dims.dqk);
  g.dm0 = moxe::test::poisoned<double>(slots);
  return g;
}

/// Points the gradient outputs of `b` at `g`; the initial-state ones only when asked.
void set_grad_outputs(mlstm::BackwardParams<double, double>& b, Grads& g, bool with_init) {
  b.dq = g.dq.data();
  b.dk = g.dk.data();
  b.dv = g.dv.data();
  b.digate = g.di.data();
  b.dfgate = g.df.data();
  if (with_init) {
    b.dc_init = g.dc0.data();
    b.dn_init = g.dn0.data();
    b.dm_init = g.dm0.data();
  }
}

Grads run_backward(const Problem& p, const Cotangents& ct, bool with_last_grads = true) {
  Outputs unused = make_outputs(p);
  Grads g = poisoned_grads(p);
  mlstm::BackwardParams<double, double> b;
  b.fwd = forward_params(p, unused);
  b.fwd.h = nullptr;
  b.fwd.c_last = b.fwd.n_last = b.fwd.m_last = nullptr;
  b.dh = ct.dh.data();
  if (with_last_grads) {
    b.dc_last = ct.dc.data();
    b.dn_last = ct.dn.data();
    b.dm_last = ct.dm.data();
  }
  set_grad_outputs(b, g, p.with_init);
  REQUIRE(mlstm::reference::backward(b) == Status::ok);
  return g;
}

/// <h, dh> + <C_S, dC> + <n_S, dn> + <m_S, dm>: the scalar whose gradient backward() gives.
double loss(const Problem& p, const Cotangents& ct, bool with_last_grads = true) {
  const Outputs o = run_forward(p);
  double l = moxe::test::dot(o.h, ct.dh);
  if (with_last_grads) l += moxe::test::dot(o.c, ct.dc) + moxe::test::dot(o.n, ct.dn) + moxe::test::dot(o.m, ct.dm);
  return l;
}

double norm(const std::vector<double>& v) { return std::sqrt(moxe::test::dot(v, v)); }

/// Backward against finite differences for every input.
void check_gradients(Problem& p, const Cotangents& ct, bool with_last_grads = true) {
  const Grads g = run_backward(p, ct, with_last_grads);
  auto f = [&] { return loss(p, ct, with_last_grads); };
  auto check = [&](const char* name, std::vector<double>& x, const std::vector<double>& analytic) {
    // Richardson-extrapolated central differences (error O(h^4)): h ~ 1/den is steep where
    // den is small, and plain differences converge slowly there.
    const std::vector<double> fd_h = moxe::test::finite_difference(f, x, 1e-5);
    const std::vector<double> fd_h2 = moxe::test::finite_difference(f, x, 5e-6);
    std::vector<double> fd(fd_h.size()), diff(fd_h.size());
    for (std::size_t i = 0; i < fd.size(); ++i) {
      fd[i] = (4.0 * fd_h2[i] - fd_h[i]) / 3.0;
      diff[i] = analytic[i] - fd[i];
    }
    // Relative error, unless the gradient itself is at the finite-difference noise floor
    // (e.g. dn_init after strong forgetting): then the absolute error against the loss scale.
    const double err = moxe::test::rel_error(analytic, fd);
    const double abs_err = norm(diff);
    const double noise = 1e-8 * std::max(1.0, std::abs(f()));
    INFO(std::string(name) << ": gradient error " << err << ", absolute " << abs_err);
    CHECK((err < 1e-6 || abs_err < noise));
  };
  check("q", p.q, g.dq);
  check("k", p.k, g.dk);
  check("v", p.v, g.dv);
  check("igate", p.igate, g.di);
  check("fgate", p.fgate, g.df);
  if (p.with_init) {
    check("c_init", p.c0, g.dc0);
    check("n_init", p.n0, g.dn0);
    check("m_init", p.m0, g.dm0);
  } else {
    CHECK(std::isnan(g.dc0[0]));  // not requested: not written
  }
}

template <class V>
bool all_nan(const V& v) {
  return std::all_of(v.begin(), v.end(), [](double x) { return std::isnan(x); });
}

}  // namespace

TEST_CASE("mlstm reference forward equals the naive recurrent loop") {
  const auto seed = moxe::test::fresh_seed();
  INFO("seed " << seed);
  Rng rng(seed);
  struct Case {
    mlstm::Dims dims;
    bool init;
    Ranges r;
  };
  Ranges big;
  big.gate = 12.0;
  const Case cases[] = {
      {{1, 1, 1, 4, 3}, false, {}}, {{2, 3, 7, 5, 4}, true, {}},  {{1, 2, 33, 8, 6}, true, big},
      {{3, 1, 7, 2, 9}, false, big}, {{1, 1, 1, 1, 1}, true, {}}, {{2, 2, 20, 16, 16}, true, {}},
  };
  for (const Case& c : cases) {
    CAPTURE(c.dims.batch);
    CAPTURE(c.dims.seq_len);
    CAPTURE(c.dims.dqk);
    CAPTURE(c.dims.dv);
    Problem p = make_problem(rng, c.dims, c.init, c.r);
    p.qk_scale = c.dims.dqk == 5 ? 0.37 : 0.0;  // an explicit scale, and the default
    const Outputs o = run_forward(p);
    const Naive n = naive_forward(p);
    CHECK(moxe::test::rel_error(o.h, n.out.h) < 1e-11);
    CHECK(moxe::test::rel_error(o.c, n.out.c) < 1e-11);
    CHECK(moxe::test::rel_error(o.n, n.out.n) < 1e-11);
    CHECK(moxe::test::rel_error(o.m, n.out.m) < 1e-11);
  }
}

TEST_CASE("mlstm reference in float follows the double one") {
  const auto seed = moxe::test::fresh_seed();
  INFO("seed " << seed);
  Rng rng(seed);
  const Problem p = well_conditioned([&] { return make_problem(rng, {2, 2, 17, 8, 8}, true); });
  const Outputs ref = run_forward(p);
  auto f32 = [](const std::vector<double>& v) { return std::vector<float>(v.begin(), v.end()); };
  const auto q = f32(p.q), k = f32(p.k), v = f32(p.v), ig = f32(p.igate), fg = f32(p.fgate);
  const auto c0 = f32(p.c0), n0 = f32(p.n0), m0 = f32(p.m0);
  std::vector<float> h(ref.h.size()), c(ref.c.size()), n(ref.n.size()), m(ref.m.size());
  mlstm::ForwardParams<float> f;
  f.dims = p.dims;
  f.q = q.data(); f.k = k.data(); f.v = v.data(); f.igate = ig.data(); f.fgate = fg.data();
  f.c_init = c0.data(); f.n_init = n0.data(); f.m_init = m0.data();
  f.h = h.data(); f.c_last = c.data(); f.n_last = n.data(); f.m_last = m.data();
  REQUIRE(mlstm::reference::forward(f) == Status::ok);
  CHECK(moxe::test::rel_error(h, ref.h) < 1e-5);
  CHECK(moxe::test::rel_error(c, ref.c) < 1e-5);
  CHECK(moxe::test::log_rel_error(m, ref.m) < 1e-6);

  // backward in float
  const Cotangents ct = make_cotangents(rng, p);
  const Grads g = run_backward(p, ct);
  const auto dh = f32(ct.dh), dcl = f32(ct.dc), dnl = f32(ct.dn), dml = f32(ct.dm);
  std::vector<float> dq(q.size()), dk(k.size()), dv(v.size()), di(ig.size()), df(fg.size());
  std::vector<float> dc0(c0.size()), dn0(n0.size()), dm0(m0.size());
  mlstm::BackwardParams<float> b;
  b.fwd = f;
  b.dh = dh.data();
  b.dc_last = dcl.data(); b.dn_last = dnl.data(); b.dm_last = dml.data();
  b.dq = dq.data(); b.dk = dk.data(); b.dv = dv.data(); b.digate = di.data(); b.dfgate = df.data();
  b.dc_init = dc0.data(); b.dn_init = dn0.data(); b.dm_init = dm0.data();
  REQUIRE(mlstm::reference::backward(b) == Status::ok);
  CHECK(moxe::test::rel_error(dq, g.dq) < 1e-4);
  CHECK(moxe::test::rel_error(dk, g.dk) < 1e-4);
  CHECK(moxe::test::rel_error(dv, g.dv) < 1e-4);
  CHECK(moxe::test::rel_error(di, g.di) < 1e-4);
  CHECK(moxe::test::rel_error(df, g.df) < 1e-4);
  CHECK(moxe::test::rel_error(dc0, g.dc0) < 1e-4);
  CHECK(moxe::test::rel_error(dm0, g.dm0) < 1e-4);
}

namespace {

std::vector<float> f32(const std::vector<double>& v) { return std::vector<float>(v.begin(), v.end()); }

/// The errors of the reference evaluated in float against the reference in double, on the
/// same (float-representable) inputs: forward outputs and every gradient.
struct FloatErrors {
  double h, c, n, m, dq, dk, dv, di, df, dc0, dn0, dm0;
  bool finite;
};

FloatErrors float_vs_double(const Problem& p, const Cotangents& ct) {
  const Outputs ref = run_forward(p);
  const Grads g = run_backward(p, ct);
  const auto q = f32(p.q), k = f32(p.k), v = f32(p.v), ig = f32(p.igate), fg = f32(p.fgate);
  const auto c0 = f32(p.c0), n0 = f32(p.n0), m0 = f32(p.m0);
  std::vector<float> h(ref.h.size()), c(ref.c.size()), n(ref.n.size()), m(ref.m.size());
  mlstm::ForwardParams<float> f;
  f.dims = p.dims;
  f.q = q.data(); f.k = k.data(); f.v = v.data(); f.igate = ig.data(); f.fgate = fg.data();
  if (p.with_init) {
    f.c_init = c0.data(); f.n_init = n0.data(); f.m_init = m0.data();
  }
  f.h = h.data(); f.c_last = c.data(); f.n_last = n.data(); f.m_last = m.data();
  REQUIRE(mlstm::reference::forward(f) == Status::ok);
  const auto dh = f32(ct.dh), dcl = f32(ct.dc), dnl = f32(ct.dn), dml = f32(ct.dm);
  std::vector<float> dq(q.size()), dk(k.size()), dv(v.size()), di(ig.size()), df(fg.size());
  std::vector<float> dc0(c0.size()), dn0(n0.size()), dm0(m0.size());
  mlstm::BackwardParams<float> b;
  b.fwd = f;
  b.dh = dh.data();
  b.dc_last = dcl.data(); b.dn_last = dnl.data(); b.dm_last = dml.data();
  b.dq = dq.data(); b.dk = dk.data(); b.dv = dv.data(); b.digate = di.data(); b.dfgate = df.data();
  if (p.with_init) {
    b.dc_init = dc0.data(); b.dn_init = dn0.data(); b.dm_init = dm0.data();
  }
  REQUIRE(mlstm::reference::backward(b) == Status::ok);
  using moxe::test::rel_error;
  FloatErrors e;
  e.h = rel_error(h, ref.h);
  e.c = rel_error(c, ref.c);
  e.n = rel_error(n, ref.n);
  e.m = rel_error(m, ref.m);
  e.dq = rel_error(dq, g.dq);
  e.dk = rel_error(dk, g.dk);
  e.dv = rel_error(dv, g.dv);
  e.di = rel_error(di, g.di);
  e.df = moxe::test::dfgate_error(moxe::test::to_double(df), g.df, g.di);
  e.dc0 = p.with_init ? rel_error(dc0, g.dc0) : 0.0;
  e.dn0 = p.with_init ? rel_error(dn0, g.dn0) : 0.0;
  e.dm0 = p.with_init ? rel_error(dm0, g.dm0) : 0.0;
  e.finite = moxe::test::all_finite(h) && moxe::test::all_finite(c) && moxe::test::all_finite(n) &&
             moxe::test::all_finite(dq) && moxe::test::all_finite(dk) && moxe::test::all_finite(dv) &&
             moxe::test::all_finite(di) && moxe::test::all_finite(df) && moxe::test::all_finite(dc0) &&
             moxe::test::all_finite(dn0) && moxe::test::all_finite(dm0);
  return e;
}

/// Multiplies each row of dh by max(1, exp(-m)) of its step, so that every row's h (of size
/// exp(m) on the floor branch) weighs ~1 in the loss, tiny as it may be.
void scale_dh_by_floor(Cotangents& ct, const Problem& p) {
  const Naive n = naive_forward(p);
  for (std::size_t row = 0; row < p.tokens(); ++row)
    for (int64_t j = 0; j < p.dims.dv; ++j) ct.dh[row * p.dims.dv + j] *= std::max(1.0, std::exp(-n.m_row[row]));
}

/// A problem whose gates follow `x` (moxe::test::apply_extreme_gates) on every slot. With
/// m ~ 100 the normaliser is |n.qs|: q and k positive keep it away from 0.
Problem extreme_problem(Rng& rng, mlstm::Dims dims, bool with_init, moxe::test::ExtremeGates x) {
  Ranges r;
  if (x == moxe::test::ExtremeGates::high_m) r.q_lo = r.k_lo = 0.2;
  Problem p = make_problem(rng, dims, with_init, r);
  moxe::test::apply_extreme_gates(x, rng, dims.batch * dims.heads, dims.seq_len, p.igate, p.fgate);
  return p;
}

}  // namespace

TEST_CASE("mlstm reference at extreme gates equals finite differences (double)") {
  const auto seed = moxe::test::fresh_seed();
  INFO("seed " << seed);
  Rng rng(seed);
  using moxe::test::ExtremeGates;
  for (ExtremeGates x : {ExtremeGates::resets, ExtremeGates::low_m, ExtremeGates::high_m}) {
    for (bool init : {false, true}) {
      INFO("gates " << std::string(moxe::test::name(x)) << " init " << init);
      Problem p = well_conditioned([&] { return extreme_problem(rng, {1, 2, 40, 3, 4}, init, x); });
      const Naive n = naive_forward(p);
      if (x == ExtremeGates::low_m) CHECK(*std::min_element(n.m_row.begin(), n.m_row.end()) < -100.0);
      if (x == ExtremeGates::high_m) CHECK(*std::max_element(n.m_row.begin(), n.m_row.end()) > 95.0);
      CHECK(moxe::test::rel_error(run_forward(p).h, n.out.h) < 1e-11);
      Cotangents ct = make_cotangents(rng, p);
      scale_dh_by_floor(ct, p);  // the rows of tiny h count too
      check_gradients(p, ct);
    }
  }
}

TEST_CASE("mlstm reference: fgate = -inf is the hard reset of a very negative fgate") {
  const auto seed = moxe::test::fresh_seed();
  INFO("seed " << seed);
  Rng rng(seed);
  Problem p = extreme_problem(rng, {1, 2, 40, 3, 4}, true, moxe::test::ExtremeGates::resets);
  Problem finite = p;  // -inf -> -800: sigmoid(-800) underflows, the same recurrence
  for (double& f : finite.fgate)
    if (f == -std::numeric_limits<double>::infinity()) f = -800.0;
  for (double& i : finite.igate)
    if (i == -std::numeric_limits<double>::infinity()) i = -1e4;
  for (double& f : finite.fgate)
    if (f == std::numeric_limits<double>::infinity()) f = 800.0;
  const Outputs a = run_forward(p), b = run_forward(finite);
  CHECK(a.h == b.h);
  CHECK(a.c == b.c);
  CHECK(a.m == b.m);
  const Cotangents ct = make_cotangents(rng, p);
  const Grads ga = run_backward(p, ct), gb = run_backward(finite, ct);
  CHECK(ga.dq == gb.dq);
  CHECK(ga.dk == gb.dk);
  CHECK(ga.di == gb.di);
  CHECK(ga.df == gb.df);
  CHECK(ga.dm0 == gb.dm0);
  for (std::size_t r = 0; r < p.fgate.size(); ++r) {
    CAPTURE(r);
    // the limits: the gradient of a reset (or of no decay) vanishes like exp(-|f|), that of
    // an absent input like exp(i)
    if (std::abs(p.fgate[r]) >= 1e30) CHECK(ga.df[r] == 0.0);
    if (std::isinf(p.igate[r])) CHECK(ga.di[r] == 0.0);
  }
}

TEST_CASE("mlstm reference: a step with no source (igate = fgate = -inf) gives the zero state") {
  Rng rng(moxe::test::fresh_seed());
  const double inf = std::numeric_limits<double>::infinity();
  // two steps, the second without a source: C, n = 0, m = -inf, h = 0
  Problem p = make_problem(rng, {1, 2, 2, 3, 4}, true);
  for (int64_t head = 0; head < 2; ++head) {
    p.igate[head * 2 + 1] = -inf;
    p.fgate[head * 2 + 1] = -inf;
  }
  const Outputs o = run_forward(p);
  for (double x : o.c) CHECK(x == 0.0);
  for (double x : o.n) CHECK(x == 0.0);
  for (double x : o.m) CHECK(x == -inf);
  for (int64_t head = 0; head < 2; ++head)
    for (int64_t j = 0; j < 4; ++j) CHECK(o.h[(head * 2 + 1) * 4 + j] == 0.0);
  // a sequence that starts so (the initial states forgotten) and goes on
  Problem q = make_problem(rng, {1, 2, 5, 3, 4}, true);
  for (int64_t head = 0; head < 2; ++head) {
    q.igate[head * 5] = -inf;
    q.fgate[head * 5] = -inf;
  }
  const Outputs full = run_forward(q);
  CHECK(moxe::test::all_finite(full.h));
  CHECK(moxe::test::all_finite(full.c));
  const Grads g = run_backward(q, make_cotangents(rng, q));
  for (const auto* v : {&g.dq, &g.dk, &g.dv, &g.di, &g.df, &g.dm0}) CHECK(moxe::test::all_finite(*v));
  CHECK(g.dc0 == std::vector<double>(g.dc0.size(), 0.0));  // nothing of C_0 survives
  CHECK(g.dn0 == std::vector<double>(g.dn0.size(), 0.0));
}

TEST_CASE("mlstm reference in float at extreme gates follows the double one") {
  const auto seed = moxe::test::fresh_seed();
  INFO("seed " << seed);
  Rng rng(seed);
  using moxe::test::ExtremeGates;
  for (ExtremeGates x : {ExtremeGates::resets, ExtremeGates::low_m, ExtremeGates::high_m}) {
    INFO("gates " << std::string(moxe::test::name(x)));
    Problem p = well_conditioned([&] { return extreme_problem(rng, {2, 2, 60, 8, 8}, true, x); });
    for (auto* v : {&p.q, &p.k, &p.v, &p.igate, &p.fgate, &p.c0, &p.n0, &p.m0})
      for (double& e : *v) e = double(float(e));
    const Cotangents ct = make_cotangents(rng, p);
    const FloatErrors e = float_vs_double(p, ct);
    CHECK(e.finite);
    // low_m: h is exp(m) small (subnormal, then 0, in float): norm-wise the rows of ordinary
    // m carry it. high_m: m ~ 100 has a float ulp of 8e-6, each decay step rounds by that.
    const double fwd_tol = x == ExtremeGates::high_m ? 1e-4 : 1e-5;
    CHECK(e.h < fwd_tol);
    CHECK(e.c < fwd_tol);
    CHECK(e.n < fwd_tol);
    CHECK(e.m < 1e-6);
    for (double err : {e.dq, e.dk, e.dv, e.di, e.df, e.dc0, e.dn0, e.dm0}) CHECK(err < 1e-4);
  }
  INFO("exp(-m) near float's limit, dh scaled so that every row's h counts");
  Problem p = well_conditioned([&] { return make_problem(rng, {1, 2, 9, 8, 8}, true); });
  for (double& m : p.m0) m = double(float(rng.uniform(-81.0, -79.0)));  // exp(-m) ~ 1e35
  for (double& i : p.igate) i = double(float(i - 80.0));
  for (auto* v : {&p.q, &p.k, &p.v, &p.fgate, &p.c0, &p.n0}) for (double& e : *v) e = double(float(e));
  Cotangents ct = make_cotangents(rng, p);
  scale_dh_by_floor(ct, p);
  for (double& x : ct.dh) x = double(float(x));
  const FloatErrors e = float_vs_double(p, ct);
  CHECK(e.finite);
  for (double err : {e.h, e.c, e.n, e.m}) CHECK(err < 1e-5);
  for (double err : {e.dq, e.dk, e.dv, e.di, e.df, e.dc0, e.dn0, e.dm0}) CHECK(err < 1e-4);
}

TEST_CASE("mlstm reference backward equals finite differences for every input") {
  const auto seed = moxe::test::fresh_seed();
  INFO("seed " << seed);
  Rng rng(seed);

  Ranges plain;
  Ranges big_gates;  // |i|, |f| up to 12
  big_gates.gate = 12.0;
  Ranges floor_side;  // exp(-m) wins: tiny q, m kept near or below 0
  floor_side.q_lo = -1e-3;
  floor_side.q_hi = 1e-3;
  floor_side.igate_shift = -2.0;
  floor_side.m_lo = -3.0;
  floor_side.m_hi = -0.5;
  // |n.qs| wins: large m (exp(-m) tiny); q and k keep n.qs away from 0 (where h and the
  // finite differences blow up), with a positive and with a negative sign.
  Ranges dot_side;
  dot_side.igate_shift = 8.0;
  dot_side.m_lo = 6.0;
  dot_side.m_hi = 9.0;
  dot_side.k_lo = 0.2;
  dot_side.q_lo = 0.2;
  Ranges dot_side_negative = dot_side;
  dot_side_negative.q_lo = -1.0;
  dot_side_negative.q_hi = -0.2;
  Ranges long_seq;  // m drifts low over 50 steps: the normaliser stays well conditioned
  long_seq.igate_shift = -3.0;

  struct Case {
    const char* name;
    mlstm::Dims dims;
    bool init;
    Ranges r;
    int want_floor, want_dot;  // 1: that branch must be taken somewhere
  };
  const Case cases[] = {
      {"S=1 no init", {2, 2, 1, 3, 4}, false, plain, 0, 0},
      {"S=1 init", {1, 2, 1, 4, 3}, true, plain, 0, 0},
      {"S=7 init", {2, 2, 7, 3, 4}, true, plain, 0, 0},
      {"S=7 no init", {1, 3, 7, 4, 2}, false, plain, 0, 0},
      {"S=7 large gates", {2, 2, 7, 3, 3}, true, big_gates, 0, 0},
      {"S=7 large gates no init", {1, 2, 7, 3, 3}, false, big_gates, 0, 0},
      {"floor branch", {1, 2, 7, 3, 4}, true, floor_side, 1, 0},
      {"dot branch, n.qs > 0", {1, 2, 7, 3, 4}, true, dot_side, 0, 1},
      {"dot branch, n.qs < 0", {1, 2, 7, 3, 4}, true, dot_side_negative, 0, 1},
      {"S=50 (partial checkpoint block)", {1, 1, 50, 2, 3}, true, long_seq, 0, 0},
  };
  for (const Case& c : cases) {
    INFO("case " << std::string(c.name));
    Problem p = well_conditioned([&] { return make_problem(rng, c.dims, c.init, c.r); });
    const Naive n = naive_forward(p);
    if (c.want_floor) CHECK(n.floor_branch > 0);
    if (c.want_dot) CHECK(n.dot_branch > 0);
    const Cotangents ct = make_cotangents(rng, p);
    check_gradients(p, ct);
  }
}

TEST_CASE("mlstm reference backward: both normaliser branches in one sequence") {
  const auto seed = moxe::test::fresh_seed();
  INFO("seed " << seed);
  Rng rng(seed);
  // q alternates between tiny (exp(-m) wins) and large (|n.qs| wins) rows.
  Problem p = well_conditioned([&] {
    Problem r = make_problem(rng, {1, 2, 12, 3, 3}, true);
    for (std::size_t row = 0; row < r.tokens(); ++row)
      for (int64_t a = 0; a < 3; ++a) r.q[row * 3 + a] *= (row % 2 == 0) ? 1e-3 : 20.0;
    for (double& m : r.m0) m = rng.uniform(-0.5, 0.5);
    return r;
  });
  const Naive n = naive_forward(p);
  CHECK(n.floor_branch > 0);
  CHECK(n.dot_branch > 0);
  const Cotangents ct = make_cotangents(rng, p);
  check_gradients(p, ct);
  INFO("without final-state cotangents");
  check_gradients(p, ct, /*with_last_grads=*/false);
}

TEST_CASE("mlstm reference: a tie in the stabiliser sends the gradient to the decay branch") {
  // m_0 = 0 and logsigmoid(f) = i makes lf + m_0 == i exactly: m_1 takes the first argument.
  Problem p;
  p.dims = {1, 1, 1, 2, 2};
  p.fgate = {0.0};
  p.igate = {std::log(0.5)};
  p.q = {0.3, -0.2};
  p.k = {0.5, 0.7};
  p.v = {1.0, -1.0};
  Cotangents ct;
  ct.dh = {0.0, 0.0};
  ct.dc.assign(4, 0.0);
  ct.dn.assign(2, 0.0);
  ct.dm = {1.0};  // d m_1: goes wholly to fgate (and m_0), none to igate
  const Grads g = run_backward(p, ct);
  CHECK(g.di[0] == 0.0);
  CHECK(g.df[0] == doctest::Approx(moxe::math::logsigmoid_grad(0.0)));
}

namespace {

/// Steps [t0, t0 + len) of every (batch, head) sequence of a [B*NH, S, width] tensor.
std::vector<double> steps_of(const std::vector<double>& x, int64_t slots, int64_t S, int64_t width, int64_t t0,
                             int64_t len) {
  std::vector<double> part;
  for (int64_t s = 0; s < slots; ++s)
    part.insert(part.end(), x.begin() + (s * S + t0) * width, x.begin() + (s * S + t0 + len) * width);
  return part;
}

/// The inverse of steps_of: `part` written back into x.
void place_steps(std::vector<double>& x, const std::vector<double>& part, int64_t slots, int64_t S, int64_t width,
                 int64_t t0, int64_t len) {
  for (int64_t s = 0; s < slots; ++s)
    std::copy(part.begin() + s * len * width, part.begin() + (s + 1) * len * width, x.begin() + (s * S + t0) * width);
}

}  // namespace

TEST_CASE("mlstm reference: a sequence run as chained calls equals it run whole") {
  // truncated BPTT with carried states: each call starts from the final (C, n, m) of the
  // one before, and takes the next one's (dC, dn, dm)_init as its upstream; random upstream
  // gradients of the final states
  const auto seed = moxe::test::fresh_seed();
  INFO("seed " << seed);
  Rng rng(seed);
  Ranges big_gates;
  big_gates.gate = 8.0;
  const std::vector<std::vector<int64_t>> splits = {{3, 3}, {1, 5}, {2, 2, 2}, {5, 1}};
  for (const auto& lengths : splits) {
    for (bool init : {false, true}) {
      for (const Ranges& r : {Ranges{}, big_gates}) {
        CAPTURE(lengths.size());
        CAPTURE(lengths[0]);
        CAPTURE(init);
        CAPTURE(r.gate);
        const mlstm::Dims dims{2, 2, 6, 3, 4};
        const int64_t slots = dims.batch * dims.heads, S = dims.seq_len;
        const Problem p = make_problem(rng, dims, init, r);
        const Cotangents ct = make_cotangents(rng, p);
        const Outputs whole = run_forward(p);
        const Grads gwhole = run_backward(p, ct);

        std::vector<Problem> parts;
        std::vector<Outputs> outs;
        int64_t t0 = 0;
        for (int64_t len : lengths) {
          Problem q = p;
          q.dims.seq_len = len;
          q.q = steps_of(p.q, slots, S, dims.dqk, t0, len);
          q.k = steps_of(p.k, slots, S, dims.dqk, t0, len);
          q.v = steps_of(p.v, slots, S, dims.dv, t0, len);
          q.igate = steps_of(p.igate, slots, S, 1, t0, len);
          q.fgate = steps_of(p.fgate, slots, S, 1, t0, len);
          if (!outs.empty()) {
            q.with_init = true;
            q.c0 = outs.back().c, q.n0 = outs.back().n, q.m0 = outs.back().m;
          }
          parts.push_back(q);
          outs.push_back(run_forward(q));
          t0 += len;
        }
        std::vector<double> h(whole.h.size());
        for (std::size_t k = 0, t = 0; k < parts.size(); t += std::size_t(lengths[k]), ++k)
          place_steps(h, outs[k].h, slots, S, dims.dv, int64_t(t), lengths[k]);
        CHECK(moxe::test::rel_error(h, whole.h) < 1e-13);
        CHECK(moxe::test::rel_error(outs.back().c, whole.c) < 1e-13);
        CHECK(moxe::test::rel_error(outs.back().n, whole.n) < 1e-13);
        CHECK(moxe::test::rel_error(outs.back().m, whole.m) < 1e-13);

        Grads chained = gwhole;  // every entry overwritten below
        Grads next;
        for (std::size_t k = parts.size(); k-- > 0;) {
          const int64_t len = lengths[k];
          int64_t tk = 0;
          for (std::size_t j = 0; j < k; ++j) tk += lengths[j];
          Cotangents ck;
          ck.dh = steps_of(ct.dh, slots, S, dims.dv, tk, len);
          if (k + 1 == parts.size()) {
            ck.dc = ct.dc, ck.dn = ct.dn, ck.dm = ct.dm;
          } else {
            ck.dc = next.dc0, ck.dn = next.dn0, ck.dm = next.dm0;
          }
          next = run_backward(parts[k], ck);
          place_steps(chained.dq, next.dq, slots, S, dims.dqk, tk, len);
          place_steps(chained.dk, next.dk, slots, S, dims.dqk, tk, len);
          place_steps(chained.dv, next.dv, slots, S, dims.dv, tk, len);
          place_steps(chained.di, next.di, slots, S, 1, tk, len);
          place_steps(chained.df, next.df, slots, S, 1, tk, len);
        }
        CHECK(moxe::test::rel_error(chained.dq, gwhole.dq) < 1e-12);
        CHECK(moxe::test::rel_error(chained.dk, gwhole.dk) < 1e-12);
        CHECK(moxe::test::rel_error(chained.dv, gwhole.dv) < 1e-12);
        CHECK(moxe::test::rel_error(chained.di, gwhole.di) < 1e-12);
        CHECK(moxe::test::rel_error(chained.df, gwhole.df) < 1e-12);
        if (init) {
          CHECK(moxe::test::rel_error(next.dc0, gwhole.dc0) < 1e-12);
          CHECK(moxe::test::rel_error(next.dn0, gwhole.dn0) < 1e-12);
          CHECK(moxe::test::rel_error(next.dm0, gwhole.dm0) < 1e-12);
        }
      }
    }
  }
}

TEST_CASE("mlstm reference varlen segments equal each segment run alone") {
  const auto seed = moxe::test::fresh_seed();
  INFO("seed " << seed);
  Rng rng(seed);
  const std::vector<int64_t> offsets = {0, 3, 3, 8, 9, 13};  // one empty segment
  const int64_t NH = 2, S = 13, DQK = 3, DV = 4, segs = int64_t(offsets.size()) - 1;
  for (bool init : {true, false}) {
    CAPTURE(init);
    Problem packed =
        well_conditioned([&] { return make_problem(rng, {1, NH, S, DQK, DV}, init, {}, offsets); });
    const Outputs po = run_forward(packed);
    const Cotangents pct = make_cotangents(rng, packed);
    const Grads pg = run_backward(packed, pct);
    CHECK(moxe::test::rel_error(po.h, naive_forward(packed).out.h) < 1e-11);

    for (int64_t seg = 0; seg < segs; ++seg) {
      CAPTURE(seg);
      const int64_t b = offsets[seg], len = offsets[seg + 1] - offsets[seg];
      for (int64_t h = 0; h < NH; ++h) {
        const int64_t st = seg * NH + h;
        if (len == 0) {  // final state = initial state, gradients pass straight through
          if (init) {
            for (int64_t i = 0; i < DQK * DV; ++i) {
              CHECK(po.c[st * DQK * DV + i] == packed.c0[st * DQK * DV + i]);
              CHECK(pg.dc0[st * DQK * DV + i] == pct.dc[st * DQK * DV + i]);
            }
            CHECK(po.m[st] == packed.m0[st]);
            CHECK(pg.dm0[st] == pct.dm[st]);
          } else {
            CHECK(po.m[st] == 0.0);
            CHECK(po.c[st * DQK * DV] == 0.0);
          }
          continue;
        }
        Problem one;
        one.dims = {1, 1, len, DQK, DV};
        const int64_t row = h * S + b;
        auto slice = [](const std::vector<double>& v, int64_t from, int64_t count) {
          return std::vector<double>(v.begin() + from, v.begin() + from + count);
        };
        one.q = slice(packed.q, row * DQK, len * DQK);
        one.k = slice(packed.k, row * DQK, len * DQK);
        one.v = slice(packed.v, row * DV, len * DV);
        one.igate = slice(packed.igate, row, len);
        one.fgate = slice(packed.fgate, row, len);
        one.with_init = init;
        if (init) {
          one.c0 = slice(packed.c0, st * DQK * DV, DQK * DV);
          one.n0 = slice(packed.n0, st * DQK, DQK);
          one.m0 = slice(packed.m0, st, 1);
        }
        const Outputs oo = run_forward(one);
        CHECK(oo.h == slice(po.h, row * DV, len * DV));
        CHECK(oo.c == slice(po.c, st * DQK * DV, DQK * DV));
        CHECK(oo.n == slice(po.n, st * DQK, DQK));
        CHECK(oo.m == slice(po.m, st, 1));
        Cotangents oct;
        oct.dh = slice(pct.dh, row * DV, len * DV);
        oct.dc = slice(pct.dc, st * DQK * DV, DQK * DV);
        oct.dn = slice(pct.dn, st * DQK, DQK);
        oct.dm = slice(pct.dm, st, 1);
        const Grads og = run_backward(one, oct);
        CHECK(og.dq == slice(pg.dq, row * DQK, len * DQK));
        CHECK(og.dk == slice(pg.dk, row * DQK, len * DQK));
        CHECK(og.dv == slice(pg.dv, row * DV, len * DV));
        CHECK(og.di == slice(pg.di, row, len));
        CHECK(og.df == slice(pg.df, row, len));
        if (init) {
          CHECK(og.dc0 == slice(pg.dc0, st * DQK * DV, DQK * DV));
          CHECK(og.dn0 == slice(pg.dn0, st * DQK, DQK));
          CHECK(og.dm0 == slice(pg.dm0, st, 1));
        }
      }
    }
    INFO("packed backward against finite differences");
    check_gradients(packed, pct);
  }
}

TEST_CASE("mlstm reference step equals forward with S = 1 from the same states") {
  const auto seed = moxe::test::fresh_seed();
  INFO("seed " << seed);
  Rng rng(seed);
  const int64_t B = 3, NH = 2, DQK = 5, DV = 7;
  Problem p = make_problem(rng, {B, NH, 1, DQK, DV}, true);
  p.qk_scale = 0.25;
  const Outputs fo = run_forward(p);

  std::vector<double> c = p.c0, n = p.n0, m = p.m0;
  std::vector<double> h = moxe::test::poisoned<double>(B * NH * DV);
  const moxe::test::StepShape shape{B, NH, DQK, DV};
  mlstm::StepParams<double, double> s = moxe::test::step_params(shape, p, c.data(), n.data(), m.data(), h.data());
  s.qk_scale = 0.25;
  REQUIRE(mlstm::reference::step(s) == Status::ok);
  CHECK(h == fo.h);
  CHECK(c == fo.c);
  CHECK(n == fo.n);
  CHECK(m == fo.m);

  // several steps equal one forward over the sequence
  const int64_t S = 5;
  Problem seq = make_problem(rng, {B, NH, S, DQK, DV}, true);
  const Outputs so = run_forward(seq);
  c = seq.c0;
  n = seq.n0;
  m = seq.m0;
  moxe::test::StepInputs in;  // token t of every slot
  in.q.resize(B * NH * DQK);
  in.k.resize(B * NH * DQK);
  in.v.resize(B * NH * DV);
  in.igate.resize(B * NH);
  in.fgate.resize(B * NH);
  s = moxe::test::step_params(shape, in, c.data(), n.data(), m.data(), h.data());
  for (int64_t t = 0; t < S; ++t) {
    for (int64_t sl = 0; sl < B * NH; ++sl) {
      const int64_t row = sl * S + t;
      std::copy_n(seq.q.begin() + row * DQK, DQK, in.q.begin() + sl * DQK);
      std::copy_n(seq.k.begin() + row * DQK, DQK, in.k.begin() + sl * DQK);
      std::copy_n(seq.v.begin() + row * DV, DV, in.v.begin() + sl * DV);
      in.igate[sl] = seq.igate[row];
      in.fgate[sl] = seq.fgate[row];
    }
    REQUIRE(mlstm::reference::step(s) == Status::ok);
    for (int64_t sl = 0; sl < B * NH; ++sl)
      for (int64_t j = 0; j < DV; ++j) CHECK(h[sl * DV + j] == so.h[(sl * S + t) * DV + j]);
  }
  CHECK(c == so.c);
  CHECK(n == so.n);
  CHECK(m == so.m);
}

TEST_CASE("mlstm reference rejects bad input and writes nothing") {
  Rng rng(moxe::test::fresh_seed());
  const std::vector<int64_t> offsets = {0, 2, 5};
  Problem p = make_problem(rng, {1, 2, 5, 3, 4}, true, {}, offsets);
  const Cotangents ct = make_cotangents(rng, p);

  auto expect_forward_rejected = [&](auto mutate) {
    Outputs o = make_outputs(p);
    std::vector<int64_t> off = p.offsets;
    auto f = forward_params(p, o);
    f.segment_offsets = off.data();
    mutate(f, off);
    CHECK(mlstm::reference::forward(f) == Status::invalid_argument);
    CHECK(all_nan(o.h));
    CHECK(all_nan(o.c));
    CHECK(all_nan(o.n));
    CHECK(all_nan(o.m));
  };
  using FP = mlstm::ForwardParams<double, double>;
  using Off = std::vector<int64_t>;
  expect_forward_rejected([](FP& f, Off&) { f.q = nullptr; });
  expect_forward_rejected([](FP& f, Off&) { f.fgate = nullptr; });
  expect_forward_rejected([](FP& f, Off&) { f.h = nullptr; });
  expect_forward_rejected([](FP& f, Off&) { f.dims.seq_len = 0; });
  expect_forward_rejected([](FP& f, Off&) { f.dims.dv = -1; });
  expect_forward_rejected([](FP& f, Off&) { f.n_init = nullptr; });  // not all or none
  expect_forward_rejected([](FP& f, Off&) { f.m_last = nullptr; });
  expect_forward_rejected([](FP& f, Off&) { f.eps = -1.0; });
  expect_forward_rejected([](FP& f, Off&) { f.eps = 0.0; });  // 0 / 0 where n.q = 0 and exp(-m) underflows
  expect_forward_rejected([](FP& f, Off&) { f.eps = std::nan(""); });
  expect_forward_rejected([](FP& f, Off&) { f.eps = std::numeric_limits<double>::infinity(); });
  expect_forward_rejected([](FP& f, Off&) { f.qk_scale = std::nan(""); });
  expect_forward_rejected([](FP& f, Off& o) { o[0] = 1; });          // must start at 0
  expect_forward_rejected([](FP& f, Off& o) { o = {0, 4, 3}; f.segment_offsets = o.data(); });
  expect_forward_rejected([](FP& f, Off& o) { o[2] = 4; });          // must end at S
  expect_forward_rejected([](FP& f, Off&) { f.num_segments = 0; });
  expect_forward_rejected([](FP& f, Off&) { f.segment_offsets = nullptr; });
  expect_forward_rejected([](FP& f, Off&) { f.dims.batch = 2; });    // varlen needs batch 1
  expect_forward_rejected([](FP& f, Off&) { f.tape_bytes = 64; });   // a tape size without a tape

  auto expect_backward_rejected = [&](auto mutate) {
    Grads g = poisoned_grads(p);
    Outputs unused = make_outputs(p);
    mlstm::BackwardParams<double, double> b;
    b.fwd = forward_params(p, unused);
    b.dh = ct.dh.data();
    set_grad_outputs(b, g, /*with_init=*/true);
    std::vector<int64_t> off = p.offsets;
    b.fwd.segment_offsets = off.data();
    mutate(b, off);
    CHECK(mlstm::reference::backward(b) == Status::invalid_argument);
    CHECK(all_nan(g.dq));
    CHECK(all_nan(g.dk));
    CHECK(all_nan(g.dv));
    CHECK(all_nan(g.di));
    CHECK(all_nan(g.df));
    CHECK(all_nan(g.dc0));
    CHECK(all_nan(g.dm0));
  };
  using BP = mlstm::BackwardParams<double, double>;
  expect_backward_rejected([](BP& b, Off&) { b.dh = nullptr; });
  expect_backward_rejected([](BP& b, Off&) { b.dfgate = nullptr; });
  expect_backward_rejected([](BP& b, Off&) { b.fwd.k = nullptr; });
  expect_backward_rejected([&](BP& b, Off&) { b.dc_last = ct.dc.data(); });  // not all or none
  expect_backward_rejected([](BP& b, Off&) { b.dn_init = nullptr; });
  expect_backward_rejected([](BP& b, Off&) {  // dC0 without C0
    b.fwd.c_init = nullptr;
    b.fwd.n_init = nullptr;
    b.fwd.m_init = nullptr;
  });
  expect_backward_rejected([](BP& b, Off&) { b.fwd.eps = 0.0; });
  expect_backward_rejected([](BP& b, Off&) { b.fwd.eps = std::nan(""); });
  expect_backward_rejected([](BP& b, Off& o) { o[1] = 6; });
  expect_backward_rejected([](BP& b, Off& o) { o[2] = 6; });

  // step
  std::vector<double> c = p.c0, n = p.n0, m = p.m0;
  std::vector<double> h = moxe::test::poisoned<double>(2 * 4);
  const mlstm::StepParams<double, double> s =
      moxe::test::step_params(moxe::test::StepShape{1, 2, 3, 4}, p, c.data(), n.data(), m.data(), h.data());
  auto expect_step_rejected = [&](auto mutate) {
    auto bad = s;
    mutate(bad);
    CHECK(mlstm::reference::step(bad) == Status::invalid_argument);
    CHECK(all_nan(h));
    CHECK(c == p.c0);
    CHECK(m == p.m0);
  };
  using SP = mlstm::StepParams<double, double>;
  expect_step_rejected([](SP& b) { b.c = nullptr; });
  expect_step_rejected([](SP& b) { b.m = nullptr; });
  expect_step_rejected([](SP& b) { b.h = nullptr; });
  expect_step_rejected([](SP& b) { b.v = nullptr; });
  expect_step_rejected([](SP& b) { b.heads = 0; });
  expect_step_rejected([](SP& b) { b.qk_scale = -1; });
  expect_step_rejected([](SP& b) { b.eps = 0.0; });
  expect_step_rejected([](SP& b) { b.eps = std::nan(""); });
  CHECK(mlstm::reference::step(s) == Status::ok);
  CHECK(moxe::test::all_finite(h));
}
