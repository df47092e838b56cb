// The problems the host tests of the chunkwise mLSTM share (test_chunkwise_phase_host.cpp,
// test_chunkwise_fused_host.cpp): a case's sizes and options, its random inputs (double,
// and rounded to float), the forward and backward runs of any host implementation into
// plain vectors, and the error measures against the recurrent reference.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "mlstm_testing.hpp"
#include "moxe/mlstm/params.hpp"
#include "moxe/mlstm/reference.hpp"
#include "test_utils.hpp"

namespace moxe::test::chunkwise_host_cases {

namespace mm = moxe::mlstm;
using moxe::Status;
using moxe::test::rel_error;

constexpr double kTol = 1e-12;      // forward: the final states
constexpr double kGradTol = 1e-11;  // backward: longer chains of cancelling terms

struct Case {
  int64_t batch = 1, heads = 2, seq_len = 7, dqk = 8, dv = 6;
  int chunk_size = 16;
  bool init_states = false;
  bool upstream = false;  // dc_last / dn_last / dm_last
  double igate_range = 3.0;
  double tol_scale = 1.0;  // large gates: exp() of larger arguments, more rounding to compare
  std::vector<int64_t> offsets;  // empty: no segments
  moxe::test::ExtremeGates extreme = moxe::test::ExtremeGates::none;  // (without segments)
  bool no_source = false;  // with resets: positions with igate = fgate = -inf too
};

template <class A>
struct DataOf {
  Case cs;
  int64_t slots = 0;
  std::vector<A> q, k, v, ig, fg, c0, n0, m0, dh, dcl, dnl, dml;
};
using Data = DataOf<double>;

/// The same inputs in float (exactly, when they were drawn on float's grid).
DataOf<float> in_float(const Data& d) {
  auto f = [](const std::vector<double>& v) { return std::vector<float>(v.begin(), v.end()); };
  DataOf<float> r;
  r.cs = d.cs;
  r.slots = d.slots;
  r.q = f(d.q), r.k = f(d.k), r.v = f(d.v), r.ig = f(d.ig), r.fg = f(d.fg);
  r.c0 = f(d.c0), r.n0 = f(d.n0), r.m0 = f(d.m0);
  r.dh = f(d.dh), r.dcl = f(d.dcl), r.dnl = f(d.dnl), r.dml = f(d.dml);
  return r;
}

/// Rounds every input to float's grid (in place), so the float path sees the same numbers.
void round_to_float(Data& d) {
  for (auto* v : {&d.q, &d.k, &d.v, &d.ig, &d.fg, &d.c0, &d.n0, &d.m0, &d.dh, &d.dcl, &d.dnl, &d.dml})
    for (double& x : *v) x = static_cast<double>(static_cast<float>(x));
}

Data make_data(const Case& cs, moxe::test::Rng& rng) {
  Data d;
  d.cs = cs;
  const int64_t rows = cs.batch * cs.heads * cs.seq_len;
  const int64_t units = cs.offsets.empty() ? cs.batch : static_cast<int64_t>(cs.offsets.size()) - 1;
  d.slots = units * cs.heads;
  d.q = moxe::test::normal_vector<double>(rng, rows * cs.dqk);
  d.k = moxe::test::normal_vector<double>(rng, rows * cs.dqk);
  d.v = moxe::test::normal_vector<double>(rng, rows * cs.dv);
  d.ig = moxe::test::uniform_vector<double>(rng, rows, -cs.igate_range, cs.igate_range);
  d.fg = moxe::test::uniform_vector<double>(rng, rows, -2.0, 6.0);
  d.dh = moxe::test::normal_vector<double>(rng, rows * cs.dv);
  if (cs.init_states) {
    d.c0 = moxe::test::normal_vector<double>(rng, d.slots * cs.dqk * cs.dv, 0.5);
    d.n0 = moxe::test::uniform_vector<double>(rng, d.slots * cs.dqk, -1.0, 1.0);
    d.m0 = moxe::test::uniform_vector<double>(rng, d.slots, -2.0, 2.0);
  }
  if (cs.upstream) {
    d.dcl = moxe::test::normal_vector<double>(rng, d.slots * cs.dqk * cs.dv);
    d.dnl = moxe::test::normal_vector<double>(rng, d.slots * cs.dqk);
    d.dml = moxe::test::normal_vector<double>(rng, d.slots);
  }
  if (cs.extreme != moxe::test::ExtremeGates::none) {
    REQUIRE(cs.offsets.empty());
    moxe::test::apply_extreme_gates(cs.extreme, rng, cs.batch * cs.heads, cs.seq_len, d.ig, d.fg, cs.no_source);
    if (cs.extreme == moxe::test::ExtremeGates::high_m) {
      // m ~ 100: h = num / (|n.qs| + eps); q, k >= 0 keep n.qs away from 0 (well-conditioned)
      for (auto* v : {&d.q, &d.k})
        for (double& x : *v) x = std::abs(x);
    }
  }
  return d;
}

template <class A>
mm::ForwardParams<A, A> forward_params(const DataOf<A>& d) {
  mm::ForwardParams<A, A> p;
  p.dims = mm::Dims{d.cs.batch, d.cs.heads, d.cs.seq_len, d.cs.dqk, d.cs.dv};
  p.q = d.q.data();
  p.k = d.k.data();
  p.v = d.v.data();
  p.igate = d.ig.data();
  p.fgate = d.fg.data();
  if (d.cs.init_states) {
    p.c_init = d.c0.data();
    p.n_init = d.n0.data();
    p.m_init = d.m0.data();
  }
  p.chunk_size = d.cs.chunk_size;
  if (!d.cs.offsets.empty()) {
    p.segment_offsets = d.cs.offsets.data();
    p.num_segments = static_cast<int64_t>(d.cs.offsets.size()) - 1;
  }
  return p;
}

struct ForwardOut {
  std::vector<double> h, c, n, m;
};

/// fn(ForwardParams<A, A>) on the inputs d, outputs poisoned first; returned in double.
template <class A, class Fn>
ForwardOut run_forward(const DataOf<A>& d, Fn fn) {
  const int64_t rows = d.cs.batch * d.cs.heads * d.cs.seq_len;
  std::vector<A> h = moxe::test::poisoned<A>(rows * d.cs.dv);
  std::vector<A> c = moxe::test::poisoned<A>(d.slots * d.cs.dqk * d.cs.dv);
  std::vector<A> n = moxe::test::poisoned<A>(d.slots * d.cs.dqk);
  std::vector<A> m = moxe::test::poisoned<A>(d.slots);
  auto p = forward_params(d);
  p.h = h.data();
  p.c_last = c.data();
  p.n_last = n.data();
  p.m_last = m.data();
  REQUIRE(fn(p) == Status::ok);
  using moxe::test::to_double;
  return ForwardOut{to_double(h), to_double(c), to_double(n), to_double(m)};
}

struct BackwardOut {
  std::vector<double> dq, dk, dv, di, df, dc0, dn0, dm0;
};

template <class A, class Fn>
BackwardOut run_backward(const DataOf<A>& d, Fn fn) {
  const int64_t rows = d.cs.batch * d.cs.heads * d.cs.seq_len;
  DataOf<A> o;  // the gradients, in the input slots of the same names
  o.q = moxe::test::poisoned<A>(rows * d.cs.dqk);
  o.k = moxe::test::poisoned<A>(rows * d.cs.dqk);
  o.v = moxe::test::poisoned<A>(rows * d.cs.dv);
  o.ig = moxe::test::poisoned<A>(rows);
  o.fg = moxe::test::poisoned<A>(rows);
  mm::BackwardParams<A, A> p;
  p.fwd = forward_params(d);
  p.dh = d.dh.data();
  if (d.cs.upstream) {
    p.dc_last = d.dcl.data();
    p.dn_last = d.dnl.data();
    p.dm_last = d.dml.data();
  }
  p.dq = o.q.data();
  p.dk = o.k.data();
  p.dv = o.v.data();
  p.digate = o.ig.data();
  p.dfgate = o.fg.data();
  if (d.cs.init_states) {
    o.c0 = moxe::test::poisoned<A>(d.slots * d.cs.dqk * d.cs.dv);
    o.n0 = moxe::test::poisoned<A>(d.slots * d.cs.dqk);
    o.m0 = moxe::test::poisoned<A>(d.slots);
    p.dc_init = o.c0.data();
    p.dn_init = o.n0.data();
    p.dm_init = o.m0.data();
  }
  REQUIRE(fn(p) == Status::ok);
  using moxe::test::to_double;
  return BackwardOut{to_double(o.q),  to_double(o.k),  to_double(o.v),  to_double(o.ig),
                     to_double(o.fg), to_double(o.c0), to_double(o.n0), to_double(o.m0)};
}

double norm(const std::vector<double>& v) {
  double s = 0.0;
  for (double x : v) s += x * x;
  return std::sqrt(s);
}

/// ||out - ref|| / max(||ref||, 1e-2 * scale), scale = the norms of all gradients together.
/// A gradient can be exactly 0 or of the size of eps while its terms are not (dfgate at
/// t = 1 when m_1 = i_1; dq when |n.q| dominates the normaliser); the chunkwise and the
/// recurrent forms then both return rounding noise of the size of the cancelling terms, and
/// an element-relative measure would compare noise with noise.
double grad_error(const std::vector<double>& out, const std::vector<double>& ref, double scale) {
  double num = 0.0;
  for (std::size_t i = 0; i < out.size(); ++i) {
    if (!std::isfinite(out[i])) return std::numeric_limits<double>::infinity();
    num += (out[i] - ref[i]) * (out[i] - ref[i]);
  }
  const double den = std::max(norm(ref), 1e-2 * scale);
  return den > 0.0 ? std::sqrt(num) / den : std::sqrt(num);
}

}  // namespace moxe::test::chunkwise_host_cases
