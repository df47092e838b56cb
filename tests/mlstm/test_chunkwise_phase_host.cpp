// Host tests of the phase design of the chunkwise mLSTM algorithm (chunkwise_phase_host.hpp,
// the functors the device runs until the fused kernels replace them): forward, final states
// and the exact backward equal the recurrent reference in
// double, for chunk sizes 16..128, sequence lengths that are not multiples of the chunk,
// large gates, initial states, upstream state gradients and variable-length segments; and
// at extreme gates (resets, absent inputs, m far below and above float's range), in double
// and in float.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "mlstm_testing.hpp"
#include "moxe/mlstm/chunkwise_phase_host.hpp"
#include "moxe/mlstm/reference.hpp"
#include "test_utils.hpp"

namespace mm = moxe::mlstm;
using moxe::Status;
using moxe::test::rel_error;

namespace {

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

template <bool kTiled = mm::detail::kChunkwiseTiled>
void check_case(const Case& cs, moxe::test::Rng& rng) {
  const Data d = make_data(cs, rng);
  INFO("S=" << cs.seq_len << " L=" << cs.chunk_size << " B=" << cs.batch << " init=" << cs.init_states
            << " segments=" << cs.offsets.size());
  const auto ref = run_forward(d, [](const auto& p) { return mm::reference::forward(p); });
  const auto got = run_forward(d, [](const auto& p) { return mm::chunkwise_phase_host::forward<double, double, kTiled>(p); });
  CHECK(rel_error(got.h, ref.h) < kGradTol);  // h divides by |n.q|, which can be small
  CHECK(rel_error(got.c, ref.c) < kTol);
  CHECK(rel_error(got.n, ref.n) < kTol);
  CHECK(rel_error(got.m, ref.m) < kTol);

  const auto gref = run_backward(d, [](const auto& p) { return mm::reference::backward(p); });
  const auto ggot =
      run_backward(d, [](const auto& p) { return mm::chunkwise_phase_host::backward<double, double, kTiled>(p); });
  const double grad_tol = kGradTol * cs.tol_scale;
  const double scale = norm(gref.dq) + norm(gref.dk) + norm(gref.dv) + norm(gref.di) + norm(gref.df);
  CHECK(grad_error(ggot.dq, gref.dq, scale) < grad_tol);
  CHECK(grad_error(ggot.dk, gref.dk, scale) < grad_tol);
  CHECK(grad_error(ggot.dv, gref.dv, scale) < grad_tol);
  CHECK(grad_error(ggot.di, gref.di, scale) < grad_tol);
  CHECK(grad_error(ggot.df, gref.df, scale) < grad_tol);
  if (cs.init_states) {
    CHECK(grad_error(ggot.dc0, gref.dc0, scale) < grad_tol);
    CHECK(grad_error(ggot.dn0, gref.dn0, scale) < grad_tol);
    CHECK(grad_error(ggot.dm0, gref.dm0, scale) < grad_tol);
  }
}

/// The chunkwise host path in float (the device's arithmetic for float inputs, fp32 FMAs)
/// against the recurrent reference in double on the same float inputs: norm-wise within
/// what float rounding of the definition allows.
void check_case_float(const Case& cs, moxe::test::Rng& rng) {
  Data d = make_data(cs, rng);
  round_to_float(d);
  const DataOf<float> f = in_float(d);
  INFO("float: S=" << cs.seq_len << " L=" << cs.chunk_size << " init=" << cs.init_states
                   << " gates=" << std::string(moxe::test::name(cs.extreme)));
  const auto ref = run_forward(d, [](const auto& p) { return mm::reference::forward(p); });
  auto got = run_forward(f, [](const auto& p) { return mm::chunkwise_phase_host::forward(p); });
  CHECK(rel_error(got.h, ref.h) < 2e-5 * cs.tol_scale);
  CHECK(rel_error(got.m, ref.m) < 1e-6);
  // (C, n) are stabilised by m, whose float rounding at |m| ~ 200 is ~1e-5: compare the
  // memories they stand for, C exp(m), in the reference's scale
  for (int64_t slot = 0; slot < d.slots; ++slot) {
    const double shift = std::exp(got.m[slot] - ref.m[slot]);
    for (int64_t i = 0; i < cs.dqk * cs.dv; ++i) got.c[slot * cs.dqk * cs.dv + i] *= shift;
    for (int64_t i = 0; i < cs.dqk; ++i) got.n[slot * cs.dqk + i] *= shift;
  }
  CHECK(rel_error(got.c, ref.c) < 2e-5 * cs.tol_scale);
  CHECK(rel_error(got.n, ref.n) < 2e-5 * cs.tol_scale);
  const auto gref = run_backward(d, [](const auto& p) { return mm::reference::backward(p); });
  const auto ggot = run_backward(f, [](const auto& p) { return mm::chunkwise_phase_host::backward(p); });
  const double scale = norm(gref.dq) + norm(gref.dk) + norm(gref.dv) + norm(gref.di) + norm(gref.df);
  const double tol = 1e-4 * cs.tol_scale;
  CHECK(grad_error(ggot.dq, gref.dq, scale) < tol);
  CHECK(grad_error(ggot.dk, gref.dk, scale) < tol);
  CHECK(grad_error(ggot.dv, gref.dv, scale) < tol);
  CHECK(grad_error(ggot.di, gref.di, scale) < tol);
  CHECK(grad_error(ggot.df, gref.df, scale) < tol);
  if (cs.init_states) {
    CHECK(grad_error(ggot.dc0, gref.dc0, scale) < tol);
    CHECK(grad_error(ggot.dn0, gref.dn0, scale) < tol);
    CHECK(grad_error(ggot.dm0, gref.dm0, scale) < tol);
  }
}

}  // namespace

TEST_CASE("chunkwise phase host == reference at extreme gates: resets, no input, m far below / above float's range") {
  const auto seed = moxe::test::fresh_seed();
  INFO("seed " << seed);
  moxe::test::Rng rng(seed);
  using moxe::test::ExtremeGates;
  for (ExtremeGates x : {ExtremeGates::resets, ExtremeGates::low_m, ExtremeGates::high_m}) {
    for (int chunk : {16, 32}) {
      for (bool no_source : {false, true}) {
        if (no_source && x != ExtremeGates::resets) continue;
        CAPTURE(no_source);
        Case cs;
        cs.seq_len = 75;  // a partial last chunk
        cs.chunk_size = chunk;
        cs.batch = 2;
        cs.init_states = true;
        cs.upstream = true;
        cs.extreme = x;
        cs.no_source = no_source;
        check_case(cs, rng);
        check_case<false>(cs, rng);
        check_case_float(cs, rng);
      }
    }
  }
}

TEST_CASE("chunkwise phase host == recurrent reference: chunk sizes x sequence lengths") {
  const auto seed = moxe::test::fresh_seed();
  INFO("seed " << seed);
  moxe::test::Rng rng(seed);
  for (int chunk : {16, 32, 64, 128}) {
    for (int64_t s : {1, 7, 16, 33, 100, 200}) {
      Case cs;
      cs.seq_len = s;
      cs.chunk_size = chunk;
      cs.batch = 2;
      check_case(cs, rng);
    }
  }
}

TEST_CASE("chunkwise phase host == reference: large gates, initial states, upstream gradients") {
  const auto seed = moxe::test::fresh_seed();
  INFO("seed " << seed);
  moxe::test::Rng rng(seed);
  for (int chunk : {16, 64}) {
    for (int64_t s : {1, 33, 100}) {
      Case cs;
      cs.seq_len = s;
      cs.chunk_size = chunk;
      cs.igate_range = 12.0;
      cs.tol_scale = 10.0;
      cs.init_states = true;
      cs.upstream = true;
      cs.dqk = 16;
      cs.dv = 16;
      check_case(cs, rng);
    }
  }
}

TEST_CASE("chunkwise phase host == reference: variable-length segments") {
  const auto seed = moxe::test::fresh_seed();
  INFO("seed " << seed);
  moxe::test::Rng rng(seed);
  for (int chunk : {16, 32}) {
    for (bool init : {false, true}) {
      Case cs;
      cs.seq_len = 70;
      cs.offsets = {0, 1, 18, 18, 50, 51, 70};  // lengths 1, 17, 0, 32, 1, 19
      cs.chunk_size = chunk;
      cs.init_states = init;
      cs.upstream = init;
      cs.igate_range = 8.0;
      check_case(cs, rng);
    }
  }
}

/// Segment offsets whose lengths cycle through chunk + 1 (two chunks, the second of one
/// position), 1, 0 and 2 * chunk: many short units, so the chunk table holds far more
/// entries than ceil(S / chunk) and nearly reaches its bound ceil(S / chunk) + segments.
std::vector<int64_t> many_segments(int chunk, int repeats) {
  std::vector<int64_t> offsets = {0};
  for (int r = 0; r < repeats; ++r)
    for (int64_t len : {int64_t(chunk) + 1, int64_t(1), int64_t(0), int64_t(2 * chunk)})
      offsets.push_back(offsets.back() + len);
  return offsets;
}

TEST_CASE("chunkwise phase host == reference: many segments (the chunk table near its bound)") {
  const auto seed = moxe::test::fresh_seed();
  INFO("seed " << seed);
  moxe::test::Rng rng(seed);
  for (int chunk : {16, 32}) {
    for (bool tiled : {true, false}) {
      Case cs;
      cs.offsets = many_segments(chunk, 6);
      cs.seq_len = cs.offsets.back();
      cs.chunk_size = chunk;
      cs.init_states = true;
      cs.upstream = true;
      const int64_t used = 6 * (2 + 1 + 0 + 2);
      const int64_t bound = (cs.seq_len + chunk - 1) / chunk + int64_t(cs.offsets.size()) - 1;
      CHECK(used <= bound);
      CHECK(used > (cs.seq_len + chunk - 1) / chunk);  // more chunks than without segments
      if (tiled) {
        check_case<true>(cs, rng);
      } else {
        check_case<false>(cs, rng);
      }
    }
  }
}

TEST_CASE("chunkwise phase host, both variants of the matrix products (tile products, per element)") {
  const auto seed = moxe::test::fresh_seed();
  INFO("seed " << seed);
  moxe::test::Rng rng(seed);
  for (int chunk : {16, 32}) {
    for (int64_t s : {1, 40}) {
      Case cs;
      cs.seq_len = s;
      cs.chunk_size = chunk;
      cs.init_states = true;
      cs.upstream = true;
      cs.dqk = 20;  // not multiples of the 16-wide tiles
      cs.dv = 13;
      check_case<true>(cs, rng);
      check_case<false>(cs, rng);
    }
  }
  Case seg;
  seg.seq_len = 50;
  seg.offsets = {0, 1, 20, 20, 50};
  check_case<true>(seg, rng);
  check_case<false>(seg, rng);
}

TEST_CASE("chunkwise phase host: batch_per_pass runs the batch in passes, same bits, smaller workspace") {
  const auto seed = moxe::test::fresh_seed();
  INFO("seed " << seed);
  moxe::test::Rng rng(seed);
  Case cs;
  cs.batch = 5;
  cs.seq_len = 37;
  cs.init_states = true;
  cs.upstream = true;
  const Data d = make_data(cs, rng);
  const auto whole = run_forward(d, [](const auto& p) { return mm::chunkwise_phase_host::forward(p); });
  const auto gwhole = run_backward(d, [](const auto& p) { return mm::chunkwise_phase_host::backward(p); });
  auto p0 = forward_params(d);
  std::size_t previous = mm::chunkwise_phase_host::forward_workspace_size(p0);
  for (int64_t per_pass : {3, 2, 1}) {  // 3 + 2, 2 + 2 + 1, five passes of one
    CAPTURE(per_pass);
    const auto sliced = run_forward(d, [per_pass](const auto& p) {
      auto s = p;
      s.batch_per_pass = per_pass;
      return mm::chunkwise_phase_host::forward(s);
    });
    CHECK(sliced.h == whole.h);
    CHECK(sliced.c == whole.c);
    CHECK(sliced.n == whole.n);
    CHECK(sliced.m == whole.m);
    const auto gsliced = run_backward(d, [per_pass](const auto& p) {
      auto s = p;
      s.fwd.batch_per_pass = per_pass;
      return mm::chunkwise_phase_host::backward(s);
    });
    CHECK(gsliced.dq == gwhole.dq);
    CHECK(gsliced.dk == gwhole.dk);
    CHECK(gsliced.dv == gwhole.dv);
    CHECK(gsliced.di == gwhole.di);
    CHECK(gsliced.df == gwhole.df);
    CHECK(gsliced.dc0 == gwhole.dc0);
    CHECK(gsliced.dn0 == gwhole.dn0);
    CHECK(gsliced.dm0 == gwhole.dm0);
    auto p = p0;
    p.batch_per_pass = per_pass;
    const std::size_t bytes = mm::chunkwise_phase_host::forward_workspace_size(p);
    CHECK(bytes < previous);
    previous = bytes;
  }
  auto bad = p0;
  std::vector<double> h = moxe::test::poisoned<double>(whole.h.size());
  bad.h = h.data();
  REQUIRE(mm::chunkwise_phase_host::forward(bad) == Status::ok);
  h = moxe::test::poisoned<double>(whole.h.size());
  bad.batch_per_pass = -1;
  CHECK(mm::chunkwise_phase_host::forward(bad) == Status::invalid_argument);
  for (double x : h) CHECK(std::isnan(x));
}

TEST_CASE("chunkwise phase host == reference: stabiliser ties go to the decay (earliest source)") {
  const auto seed = moxe::test::fresh_seed();
  INFO("seed " << seed);
  moxe::test::Rng rng(seed);
  for (int chunk : {16, 32}) {
    Case cs;
    cs.seq_len = 45;
    cs.chunk_size = chunk;
    cs.init_states = true;
    cs.upstream = true;
    Data d = make_data(cs, rng);
    // i_t = logsigmoid(f_t) + m_{t-1} exactly at every third step (t = 0 included): the max
    // of the recurrence ties, and the gradient must take the decay branch.
    for (int64_t slot = 0; slot < d.slots; ++slot) {
      double m = d.m0[slot];
      for (int64_t t = 0; t < cs.seq_len; ++t) {
        const int64_t r = slot * cs.seq_len + t;
        if (t % 3 == 0) d.ig[r] = moxe::math::logsigmoid(d.fg[r]) + m;
        m = mm::detail::gate_step(d.ig[r], d.fg[r], m).m;
      }
    }
    const auto gref = run_backward(d, [](const auto& p) { return mm::reference::backward(p); });
    const auto ggot = run_backward(d, [](const auto& p) { return mm::chunkwise_phase_host::backward(p); });
    const double scale = norm(gref.dq) + norm(gref.dk) + norm(gref.dv) + norm(gref.di) + norm(gref.df);
    CHECK(grad_error(ggot.di, gref.di, scale) < kGradTol);
    CHECK(grad_error(ggot.df, gref.df, scale) < kGradTol);
    CHECK(grad_error(ggot.dm0, gref.dm0, scale) < kGradTol);
    const auto ref = run_forward(d, [](const auto& p) { return mm::reference::forward(p); });
    const auto got = run_forward(d, [](const auto& p) { return mm::chunkwise_phase_host::forward(p); });
    CHECK(got.m == ref.m);  // the stabiliser is the recurrence's, bit for bit
  }
}

TEST_CASE("chunkwise phase host: bad input returns a status and writes nothing") {
  moxe::test::Rng rng(1);
  Case cs;
  const Data d = make_data(cs, rng);
  std::vector<double> h(cs.heads * cs.seq_len * cs.dv, 7.0);
  auto p = forward_params(d);
  p.h = h.data();
  for (int chunk : {0, 8, 24, 144, -16}) {
    auto bad = p;
    bad.chunk_size = chunk;
    CHECK(mm::chunkwise_phase_host::forward(bad) == Status::invalid_argument);
  }
  auto bad = p;
  bad.q = nullptr;
  CHECK(mm::chunkwise_phase_host::forward(bad) == Status::invalid_argument);
  for (double eps : {0.0, std::nan("")}) {  // eps = 0: 0 / 0 where n.q = 0 and exp(-m) underflows
    bad = p;
    bad.eps = eps;
    CHECK(mm::chunkwise_phase_host::forward(bad) == Status::invalid_argument);
  }
  std::vector<double> partial(cs.heads * cs.dqk * cs.dv, 0.0);
  bad = p;
  bad.c_init = partial.data();
  CHECK(mm::chunkwise_phase_host::forward(bad) == Status::invalid_argument);
  const std::vector<int64_t> offsets = {0, 3, 5};  // does not end at seq_len
  bad = p;
  bad.segment_offsets = offsets.data();
  bad.num_segments = 2;
  CHECK(mm::chunkwise_phase_host::forward(bad) == Status::invalid_argument);
  for (double x : h) CHECK(x == 7.0);
}

TEST_CASE("chunkwise phase host in float: dfgate before a reset takes nothing from the rows after it") {
  // A reset (fgate = -inf) at row 20 of a 32-row chunk: no decay sum of a row after it holds
  // a forget gate at or before it, so those rows' terms cancel exactly in the definition.
  // With dh small before the reset and large after, any rounding of that cancellation
  // would swamp the small gradients before it: check them element by element.
  moxe::test::Rng rng(moxe::test::fresh_seed());
  Case cs;
  cs.batch = 1;
  cs.heads = 1;
  cs.seq_len = 32;
  cs.dqk = 16;
  cs.dv = 16;
  cs.chunk_size = 32;
  Data d = make_data(cs, rng);
  const int64_t reset = 20;
  d.fg[reset] = -std::numeric_limits<double>::infinity();
  for (int64_t t = 0; t < cs.seq_len; ++t)
    for (int64_t j = 0; j < cs.dv; ++j) d.dh[t * cs.dv + j] *= t < reset ? 1e-3 : 1e3;
  round_to_float(d);
  const DataOf<float> f = in_float(d);
  const auto gref = run_backward(d, [](const auto& p) { return mm::reference::backward(p); });
  const auto ggot = run_backward(f, [](const auto& p) { return mm::chunkwise_phase_host::backward(p); });
  CHECK(gref.df[reset] == 0.0);
  CHECK(std::abs(ggot.df[reset]) <= 1e-30);
  double largest = 0;
  for (int64_t t = 0; t < reset; ++t) largest = std::max(largest, std::abs(gref.df[t]));
  for (int64_t t = 0; t < reset; ++t) {
    CAPTURE(t);
    CHECK(std::abs(ggot.df[t] - gref.df[t]) <= 1e-4 * largest);
  }
}
