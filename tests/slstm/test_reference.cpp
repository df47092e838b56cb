// Host tests of moxe::slstm: the reference against a naive loop written here, its backward
// against central finite differences in double, the device decomposition (plan, tiling,
// exchange and reduction order) emulated on the host against the reference, bad input.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <array>
#include <cstring>
#include <vector>

#include "moxe/slstm/detail/plan.hpp"
#include "moxe/slstm/reference.hpp"
#include "slstm_emulation.hpp"
#include "slstm_testing.hpp"
#include "test_utils.hpp"

namespace {

namespace sl = moxe::slstm;
using moxe::Status;

/// All tensors of one problem, in double (or float): inputs and every output.
template <class T>
struct Problem {
  sl::Dims dims;
  std::vector<T> wx, r, bias;
  std::vector<T> y_init, c_init, n_init, m_init;
  std::vector<T> dy, dy_last, dc_last, dn_last, dm_last;
  int64_t units() const { return dims.batch * dims.heads * dims.head_dim; }
};

template <class T>
Problem<T> make_problem(moxe::test::Rng& rng, sl::Dims d, bool with_init, double wx_scale = 1.0) {
  Problem<T> p;
  p.dims = d;
  const int64_t H = d.heads * d.head_dim, U = d.batch * H;
  p.wx = moxe::test::uniform_vector<T>(rng, d.seq_len * d.batch * 4 * H, -wx_scale, wx_scale);
  p.r = moxe::test::uniform_vector<T>(rng, d.heads * 4 * d.head_dim * d.head_dim, -0.5, 0.5);
  p.bias = moxe::test::uniform_vector<T>(rng, 4 * H, -0.5, 0.5);
  if (with_init) {
    p.y_init = moxe::test::uniform_vector<T>(rng, U, -1, 1);
    p.c_init = moxe::test::uniform_vector<T>(rng, U, -1, 1);
    p.n_init = moxe::test::uniform_vector<T>(rng, U, 0.5, 2.0);  // n > 0: away from the n == 0 branch
    p.m_init = moxe::test::uniform_vector<T>(rng, U, -1, 1);
  }
  p.dy = moxe::test::uniform_vector<T>(rng, d.seq_len * U, -1, 1);
  p.dy_last = moxe::test::uniform_vector<T>(rng, U, -1, 1);
  p.dc_last = moxe::test::uniform_vector<T>(rng, U, -1, 1);
  p.dn_last = moxe::test::uniform_vector<T>(rng, U, -1, 1);
  p.dm_last = moxe::test::uniform_vector<T>(rng, U, -1, 1);
  return p;
}

template <class T>
const T* ptr_or_null(const std::vector<T>& v) {
  return v.empty() ? nullptr : v.data();
}

/// The problem's inputs as pointers (no initial states when it has none).
template <class T>
moxe::test::SequenceInputs<T, T> inputs_of(const Problem<T>& p) {
  return {p.dims,
          p.wx.data(), p.r.data(), p.bias.data(),
          ptr_or_null(p.y_init), ptr_or_null(p.c_init), ptr_or_null(p.n_init), ptr_or_null(p.m_init),
          p.dy.data(), p.dy_last.data(), p.dc_last.data(), p.dn_last.data(), p.dm_last.data()};
}

/// The problem in float: every tensor rounded.
Problem<float> to_float_problem(const Problem<double>& pd) {
  auto cv = [](const std::vector<double>& v) { return std::vector<float>(v.begin(), v.end()); };
  Problem<float> pf;
  pf.dims = pd.dims;
  pf.wx = cv(pd.wx), pf.r = cv(pd.r), pf.bias = cv(pd.bias);
  pf.y_init = cv(pd.y_init), pf.c_init = cv(pd.c_init), pf.n_init = cv(pd.n_init), pf.m_init = cv(pd.m_init);
  pf.dy = cv(pd.dy), pf.dy_last = cv(pd.dy_last), pf.dc_last = cv(pd.dc_last), pf.dn_last = cv(pd.dn_last);
  pf.dm_last = cv(pd.dm_last);
  return pf;
}

/// The problem in double with every value rounded through float: what the float run sees.
Problem<double> rounded_to_float(const Problem<double>& pd) {
  auto rt = [](std::vector<double> v) {
    for (double& x : v) x = static_cast<float>(x);
    return v;
  };
  Problem<double> p = pd;
  p.wx = rt(p.wx), p.r = rt(p.r), p.bias = rt(p.bias);
  p.y_init = rt(p.y_init), p.c_init = rt(p.c_init), p.n_init = rt(p.n_init), p.m_init = rt(p.m_init);
  p.dy = rt(p.dy), p.dy_last = rt(p.dy_last), p.dc_last = rt(p.dc_last), p.dn_last = rt(p.dn_last);
  p.dm_last = rt(p.dm_last);
  return p;
}

struct Outputs {
  std::vector<double> y, y_last, c_last, n_last, m_last;
};

template <class T>
Outputs run_forward(const Problem<T>& p) {
  Outputs o;
  o.y.assign(p.dims.seq_len * p.units(), 0);
  o.y_last.assign(p.units(), 0);
  o.c_last = o.n_last = o.m_last = o.y_last;
  std::vector<T> y(o.y.size()), yl(p.units()), cl(p.units()), nl(p.units()), ml(p.units());
  const sl::ForwardParams<T, T> f =
      moxe::test::forward_params(inputs_of(p), y.data(), yl.data(), cl.data(), nl.data(), ml.data());
  REQUIRE(sl::reference::forward(f) == Status::ok);
  o.y.assign(y.begin(), y.end());
  o.y_last.assign(yl.begin(), yl.end());
  o.c_last.assign(cl.begin(), cl.end());
  o.n_last.assign(nl.begin(), nl.end());
  o.m_last.assign(ml.begin(), ml.end());
  return o;
}

/// The definition, written out directly (no shared code with the library).
Outputs naive_forward(const Problem<double>& p) {
  const int64_t S = p.dims.seq_len, B = p.dims.batch, NH = p.dims.heads, DH = p.dims.head_dim;
  const int64_t U = B * NH * DH;
  std::vector<double> y(U, 0), c(U, 0), n(U, 0), m(U, 0);
  if (!p.y_init.empty()) y = p.y_init, c = p.c_init, n = p.n_init, m = p.m_init;
  Outputs o;
  o.y.assign(S * U, 0);
  for (int64_t t = 0; t < S; ++t) {
    std::vector<double> y_new(U);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < NH; ++h)
        for (int64_t j = 0; j < DH; ++j) {
          double raw[4];
          for (int g = 0; g < 4; ++g) {
            double s = p.wx[(((t * B + b) * 4 + g) * NH + h) * DH + j] + p.bias[(g * NH + h) * DH + j];
            for (int64_t d = 0; d < DH; ++d) s += p.r[((h * 4 + g) * DH + j) * DH + d] * y[(b * NH + h) * DH + d];
            raw[g] = s;
          }
          const int64_t u = (b * NH + h) * DH + j;
          const double lsf = -std::log1p(std::exp(-raw[1]));
          const double mt = n[u] == 0 ? raw[0] : std::max(raw[0], lsf + m[u]);
          const double ig = std::exp(raw[0] - mt), fg = std::exp(lsf + m[u] - mt);
          c[u] = fg * c[u] + ig * std::tanh(raw[2]);
          n[u] = fg * n[u] + ig;
          m[u] = mt;
          y_new[u] = c[u] / n[u] / (1 + std::exp(-raw[3]));
          o.y[t * U + u] = y_new[u];
        }
    y = y_new;
  }
  o.y_last = y, o.c_last = c, o.n_last = n, o.m_last = m;
  return o;
}

struct Grads {
  std::vector<double> dwx, dr, dbias, dy_init, dc_init, dn_init, dm_init;
};

template <class T>
Grads run_backward(const Problem<T>& p, bool upstream) {
  const int64_t U = p.units();
  std::vector<T> dwx(p.wx.size()), dr(p.r.size()), dbias(p.bias.size()), dyi(U), dci(U), dni(U), dmi(U);
  const bool init = !p.y_init.empty();  // initial-state gradients only with initial states
  T* none = nullptr;
  const sl::BackwardParams<T, T> b = moxe::test::backward_params(
      inputs_of(p), upstream, dwx.data(), dr.data(), dbias.data(), init ? dyi.data() : none,
      init ? dci.data() : none, init ? dni.data() : none, init ? dmi.data() : none);
  REQUIRE(sl::reference::backward(b) == Status::ok);
  Grads g;
  g.dwx.assign(dwx.begin(), dwx.end());
  g.dr.assign(dr.begin(), dr.end());
  g.dbias.assign(dbias.begin(), dbias.end());
  g.dy_init.assign(dyi.begin(), dyi.end());
  g.dc_init.assign(dci.begin(), dci.end());
  g.dn_init.assign(dni.begin(), dni.end());
  g.dm_init.assign(dmi.begin(), dmi.end());
  return g;
}

/// The scalar the backward differentiates: <y, dy> (+ <final states, upstream>).
double loss(const Problem<double>& p, bool upstream) {
  const Outputs o = run_forward(p);
  double l = moxe::test::dot(o.y, p.dy);
  if (upstream)
    l += moxe::test::dot(o.y_last, p.dy_last) + moxe::test::dot(o.c_last, p.dc_last) +
         moxe::test::dot(o.n_last, p.dn_last) + moxe::test::dot(o.m_last, p.dm_last);
  return l;
}

void check_gradients(Problem<double>& p, bool upstream, double tol) {
  const Grads g = run_backward(p, upstream);
  auto f = [&] { return loss(p, upstream); };
  CHECK(moxe::test::gradient_error(f, p.wx, g.dwx) < tol);
  CHECK(moxe::test::gradient_error(f, p.r, g.dr) < tol);
  CHECK(moxe::test::gradient_error(f, p.bias, g.dbias) < tol);
  if (!p.y_init.empty()) {
    CHECK(moxe::test::gradient_error(f, p.y_init, g.dy_init) < tol);
    CHECK(moxe::test::gradient_error(f, p.c_init, g.dc_init) < tol);
    CHECK(moxe::test::gradient_error(f, p.n_init, g.dn_init) < tol);
    CHECK(moxe::test::gradient_error(f, p.m_init, g.dm_init) < tol);
  }
}

}  // namespace

TEST_CASE("slstm reference forward matches the definition") {
  const auto seed = moxe::test::fresh_seed();
  INFO("seed " << seed);
  moxe::test::Rng rng(seed);
  for (int64_t S : {1, 7, 20})
    for (bool init : {false, true})
      for (double scale : {1.0, 12.0}) {
        const sl::Dims d{S, 3, 2, 5};
        const auto p = make_problem<double>(rng, d, init, scale);
        const Outputs got = run_forward(p), want = naive_forward(p);
        CHECK(moxe::test::rel_error(got.y, want.y) < 1e-13);
        CHECK(moxe::test::rel_error(got.c_last, want.c_last) < 1e-13);
        CHECK(moxe::test::rel_error(got.n_last, want.n_last) < 1e-13);
        CHECK(moxe::test::rel_error(got.m_last, want.m_last) < 1e-13);
        CHECK(moxe::test::rel_error(got.y_last, want.y_last) < 1e-13);
      }
}

TEST_CASE("slstm reference forward writes the tape: raw gates and states of every step") {
  // Layout check: step t of the tape, fed through the cell from step t-1's states (the
  // initial ones at t = 0), gives step t's states and y_t; the last step's states are the
  // final ones. Same y and final states as without the tape.
  const auto seed = moxe::test::fresh_seed();
  INFO("seed " << seed);
  moxe::test::Rng rng(seed);
  namespace dt = sl::detail;
  for (bool init : {false, true}) {
    const sl::Dims d{5, 3, 2, 4};
    const auto p = make_problem<double>(rng, d, init);
    const int64_t U = p.units(), B = d.batch, NH = d.heads, DH = d.head_dim;
    const sl::TapeElements te = sl::tape_elements(d);
    REQUIRE(te.gates == 4 * d.seq_len * U);
    REQUIRE(te.state == d.seq_len * U);
    std::vector<double> y(d.seq_len * U), yl(U), cl(U), nl(U), ml(U);
    std::vector<double> tg(te.gates, 7.0), tc(te.state, 7.0), tn(te.state, 7.0), tm(te.state, 7.0);
    auto f = moxe::test::forward_params(inputs_of(p), y.data(), yl.data(), cl.data(), nl.data(), ml.data());
    f.tape_gates = tg.data();
    f.tape_c = tc.data();
    f.tape_n = tn.data();
    f.tape_m = tm.data();
    REQUIRE(sl::reference::forward(f) == Status::ok);
    const Outputs plain = run_forward(p);
    CHECK(y == plain.y);
    CHECK(cl == plain.c_last);
    CHECK(ml == plain.m_last);
    for (int64_t t = 0; t < d.seq_len; ++t)
      for (int64_t b = 0; b < B; ++b)
        for (int64_t h = 0; h < NH; ++h)
          for (int64_t j = 0; j < DH; ++j) {
            const int64_t u0 = dt::unit_index(0, b, h, j, B, NH, DH), u = t * U + u0;
            double c0 = 0, n0 = 0, m0 = 0;
            if (t > 0) {
              c0 = tc[u - U], n0 = tn[u - U], m0 = tm[u - U];
            } else if (init) {
              c0 = p.c_init[u0], n0 = p.n_init[u0], m0 = p.m_init[u0];
            }
            double raw[4];
            for (int g = 0; g < 4; ++g) raw[g] = tg[dt::gate_index(t, b, g, h, j, B, NH, DH)];
            const auto o = dt::cell_forward(dt::GatesRaw<double>{raw[0], raw[1], raw[2], raw[3]}, c0, n0, m0);
            CHECK(o.c == tc[u]);
            CHECK(o.n == tn[u]);
            CHECK(o.m == tm[u]);
            CHECK(o.y == y[u]);
            if (t == d.seq_len - 1) {
              CHECK(tc[u] == cl[u0]);
              CHECK(tn[u] == nl[u0]);
              CHECK(tm[u] == ml[u0]);
            }
          }
    // the backward reads no tape (it replays in Acc): given one, the same gradients
    std::vector<double> dwx_a(p.wx.size()), dr_a(p.r.size()), db_a(p.bias.size());
    std::vector<double> dwx_b = dwx_a, dr_b = dr_a, db_b = db_a;
    auto bp = moxe::test::backward_params(inputs_of(p), true, dwx_a.data(), dr_a.data(), db_a.data(), nullptr,
                                          nullptr, nullptr, nullptr);
    REQUIRE(sl::reference::backward(bp) == Status::ok);
    bp.fwd = f;
    bp.dwx = dwx_b.data(), bp.dr = dr_b.data(), bp.dbias = db_b.data();
    REQUIRE(sl::reference::backward(bp) == Status::ok);
    CHECK(dwx_a == dwx_b);
    CHECK(dr_a == dr_b);
    CHECK(db_a == db_b);
  }
}

TEST_CASE("slstm reference in float agrees with double") {
  moxe::test::Rng rng(moxe::test::fresh_seed());
  const sl::Dims d{9, 2, 2, 16};
  const auto pd = make_problem<double>(rng, d, true);
  const Problem<float> pf = to_float_problem(pd);
  const Problem<double> pr = rounded_to_float(pd);  // the float-rounded inputs in double
  CHECK(moxe::test::rel_error(run_forward(pf).y, run_forward(pr).y) < 1e-5);
  const Grads gf = run_backward(pf, true), gd = run_backward(pr, true);
  CHECK(moxe::test::rel_error(gf.dwx, gd.dwx) < 1e-5);
  CHECK(moxe::test::rel_error(gf.dr, gd.dr) < 1e-5);
  CHECK(moxe::test::rel_error(gf.dbias, gd.dbias) < 1e-5);
  CHECK(moxe::test::rel_error(gf.dy_init, gd.dy_init) < 1e-5);
}

TEST_CASE("slstm reference backward matches finite differences") {
  const auto seed = moxe::test::fresh_seed();
  INFO("seed " << seed);
  moxe::test::Rng rng(seed);
  for (int64_t S : {1, 7}) {
    for (bool init : {false, true}) {
      for (bool upstream : {false, true}) {
        for (double scale : {1.0, 8.0}) {  // 8: large gate pre-activations, the max switches
          CAPTURE(S);
          CAPTURE(init);
          CAPTURE(upstream);
          CAPTURE(scale);
          auto p = make_problem<double>(rng, sl::Dims{S, 2, 2, 3}, init, scale);
          check_gradients(p, upstream, 1e-6);
        }
      }
    }
  }
}

namespace {

/// Steps [t0, t0 + len) of `p` as a problem of their own, from the given initial states
/// (empty: none), with p's dy for those steps; the upstream gradients are set by the caller.
Problem<double> steps_of(const Problem<double>& p, int64_t t0, int64_t len, const Outputs* before) {
  const int64_t gate_step = p.dims.batch * 4 * p.dims.heads * p.dims.head_dim, unit_step = p.units();
  Problem<double> q = p;
  q.dims.seq_len = len;
  q.wx.assign(p.wx.begin() + t0 * gate_step, p.wx.begin() + (t0 + len) * gate_step);
  q.dy.assign(p.dy.begin() + t0 * unit_step, p.dy.begin() + (t0 + len) * unit_step);
  if (before) {
    q.y_init = before->y_last, q.c_init = before->c_last;
    q.n_init = before->n_last, q.m_init = before->m_last;
  }
  return q;
}

/// The sequence `p` run as chained calls of the given lengths: each forward starts from the
/// final states of the one before, each backward takes the initial-state gradients of the
/// one after as its upstream (the last one p's upstream). y, the final states, dwx (steps
/// side by side) and the sums of dr and dbias, and the first call's initial-state gradients.
struct Chained {
  Outputs out;
  Grads grads;
};

Chained run_chained(const Problem<double>& p, const std::vector<int64_t>& lengths, bool carry_dm = true) {
  std::vector<Problem<double>> parts;
  std::vector<Outputs> outs;
  int64_t t0 = 0;
  for (int64_t len : lengths) {
    parts.push_back(steps_of(p, t0, len, outs.empty() ? nullptr : &outs.back()));
    outs.push_back(run_forward(parts.back()));
    t0 += len;
  }
  REQUIRE(t0 == p.dims.seq_len);
  Chained ch;
  ch.out = outs.back();
  ch.out.y.clear();
  for (const Outputs& o : outs) ch.out.y.insert(ch.out.y.end(), o.y.begin(), o.y.end());
  ch.grads.dr.assign(p.r.size(), 0.0);
  ch.grads.dbias.assign(p.bias.size(), 0.0);
  std::vector<std::vector<double>> dwx(parts.size());
  for (std::size_t k = parts.size(); k-- > 0;) {
    Problem<double>& part = parts[k];
    if (k + 1 < parts.size()) {  // upstream: the next call's initial-state gradients
      const Grads& next = ch.grads;
      part.dy_last = next.dy_init, part.dc_last = next.dc_init, part.dn_last = next.dn_init;
      part.dm_last = carry_dm ? next.dm_init : std::vector<double>(p.units(), 0.0);
    }
    const Grads g = run_backward(part, /*upstream=*/true);
    dwx[k] = g.dwx;
    for (std::size_t i = 0; i < g.dr.size(); ++i) ch.grads.dr[i] += g.dr[i];
    for (std::size_t i = 0; i < g.dbias.size(); ++i) ch.grads.dbias[i] += g.dbias[i];
    ch.grads.dy_init = g.dy_init, ch.grads.dc_init = g.dc_init, ch.grads.dn_init = g.dn_init;
    ch.grads.dm_init = g.dm_init;
  }
  for (const auto& d : dwx) ch.grads.dwx.insert(ch.grads.dwx.end(), d.begin(), d.end());
  return ch;
}

}  // namespace

TEST_CASE("slstm reference: a sequence run as chained calls equals it run whole") {
  // truncated BPTT with carried states: forward states and every gradient, with random
  // upstream gradients of the final states (y, c, n, m)
  const auto seed = moxe::test::fresh_seed();
  INFO("seed " << seed);
  moxe::test::Rng rng(seed);
  const std::vector<std::vector<int64_t>> splits = {{3, 3}, {1, 5}, {2, 2, 2}, {5, 1}, {1, 1, 1, 1, 1, 1}};
  for (const auto& lengths : splits) {
    for (bool init : {false, true}) {
      for (double scale : {1.0, 8.0}) {
        CAPTURE(lengths.size());
        CAPTURE(lengths[0]);
        CAPTURE(init);
        CAPTURE(scale);
        const auto p = make_problem<double>(rng, sl::Dims{6, 3, 2, 4}, init, scale);
        const Outputs whole = run_forward(p);
        const Grads gwhole = run_backward(p, /*upstream=*/true);
        const Chained ch = run_chained(p, lengths);
        CHECK(moxe::test::rel_error(ch.out.y, whole.y) < 1e-14);
        CHECK(moxe::test::rel_error(ch.out.y_last, whole.y_last) < 1e-14);
        CHECK(moxe::test::rel_error(ch.out.c_last, whole.c_last) < 1e-14);
        CHECK(moxe::test::rel_error(ch.out.n_last, whole.n_last) < 1e-14);
        CHECK(moxe::test::rel_error(ch.out.m_last, whole.m_last) < 1e-14);
        CHECK(moxe::test::rel_error(ch.grads.dwx, gwhole.dwx) < 1e-13);
        CHECK(moxe::test::rel_error(ch.grads.dr, gwhole.dr) < 1e-13);
        CHECK(moxe::test::rel_error(ch.grads.dbias, gwhole.dbias) < 1e-13);
        if (init) {
          CHECK(moxe::test::rel_error(ch.grads.dy_init, gwhole.dy_init) < 1e-13);
          CHECK(moxe::test::rel_error(ch.grads.dc_init, gwhole.dc_init) < 1e-13);
          CHECK(moxe::test::rel_error(ch.grads.dn_init, gwhole.dn_init) < 1e-13);
          CHECK(moxe::test::rel_error(ch.grads.dm_init, gwhole.dm_init) < 1e-13);
        }
        // without the m gradient at the boundaries the chained gradient is another one
        const Chained no_dm = run_chained(p, lengths, /*carry_dm=*/false);
        CHECK(moxe::test::rel_error(no_dm.grads.dwx, gwhole.dwx) > 1e-6);
      }
    }
  }
}

TEST_CASE("slstm reference: gauge-consistent upstream gradients") {
  // (c, n, m) -> (c e^d, n e^d, m - d) leaves the sLSTM's true state, hence y, unchanged.
  // A loss that is invariant to it has dm = dc.c + dn.n per unit; with such upstream
  // gradients of the final states the backward's initial-state gradients satisfy the same
  // identity (the carried m gradient never routes anything through the max: its branch
  // does not matter), so chained calls of gauge-invariant losses stay gauge-consistent.
  const auto seed = moxe::test::fresh_seed();
  INFO("seed " << seed);
  moxe::test::Rng rng(seed);
  for (double scale : {1.0, 8.0}) {
    CAPTURE(scale);
    auto p = make_problem<double>(rng, sl::Dims{7, 3, 2, 4}, true, scale);
    const Outputs o = run_forward(p);
    for (int64_t u = 0; u < p.units(); ++u) p.dm_last[u] = p.dc_last[u] * o.c_last[u] + p.dn_last[u] * o.n_last[u];
    const Grads g = run_backward(p, /*upstream=*/true);
    std::vector<double> gauge(p.units());
    for (int64_t u = 0; u < p.units(); ++u) gauge[u] = g.dc_init[u] * p.c_init[u] + g.dn_init[u] * p.n_init[u];
    CHECK(moxe::test::rel_error(g.dm_init, gauge) < 1e-12);
    // and y does not move under a gauge transform of the initial states
    auto shifted = p;
    const double delta = 0.3;
    for (int64_t u = 0; u < p.units(); ++u) {
      shifted.c_init[u] *= std::exp(delta);
      shifted.n_init[u] *= std::exp(delta);
      shifted.m_init[u] -= delta;
    }
    CHECK(moxe::test::rel_error(run_forward(shifted).y, o.y) < 1e-13);
  }
}

TEST_CASE("slstm reference: initial-state gradients at the zero state") {
  // without initial states the gradients are those at y0 = c0 = n0 = m0 = 0 (n0 on its
  // n == 0 branch): y0, c0 and m0 checked against finite differences of explicit zero
  // states (on the n == 0 branch m0 does not enter: dm_init = 0), with upstream gradients
  const auto seed = moxe::test::fresh_seed();
  INFO("seed " << seed);
  moxe::test::Rng rng(seed);
  auto p = make_problem<double>(rng, sl::Dims{5, 2, 2, 3}, false);
  const Grads g = [&] {
    const int64_t U = p.units();
    std::vector<double> dwx(p.wx.size()), dr(p.r.size()), dbias(p.bias.size()), dyi(U, 9.0), dci(U, 9.0),
        dni(U, 9.0), dmi(U, 9.0);
    const sl::BackwardParams<double, double> b =
        moxe::test::backward_params(inputs_of(p), /*upstream=*/true, dwx.data(), dr.data(), dbias.data(), dyi.data(),
                                    dci.data(), dni.data(), dmi.data());
    REQUIRE(sl::reference::backward(b) == Status::ok);
    return Grads{dwx, dr, dbias, dyi, dci, dni, dmi};
  }();
  const int64_t U = p.units();
  p.y_init.assign(U, 0.0), p.c_init.assign(U, 0.0), p.n_init.assign(U, 0.0), p.m_init.assign(U, 0.0);
  auto f = [&] { return loss(p, true); };
  CHECK(moxe::test::gradient_error(f, p.y_init, g.dy_init) < 1e-6);
  CHECK(moxe::test::gradient_error(f, p.c_init, g.dc_init) < 1e-6);
  CHECK(moxe::test::gradient_error(f, p.m_init, g.dm_init) < 1e-6);
  for (double v : g.dm_init) CHECK(v == 0.0);
  CHECK(moxe::test::all_finite(g.dn_init));
}

TEST_CASE("slstm cell backward: the max and the n == 0 branch") {
  namespace dt = moxe::slstm::detail;
  // a unit where the max selects logsigmoid(f) + m0 and one where it selects i, each
  // checked in every input (raw gates and previous state) by finite differences
  const dt::GatesRaw<double> cases[] = {{-3.0, 4.0, 0.3, -0.2}, {2.5, -1.0, -0.7, 0.9}};
  for (const auto& g0 : cases) {
    for (double n0 : {0.0, 0.8}) {
      const double c0 = 0.4, m0 = 1.1, dy = 0.7, dc = -0.3, dn = 0.45, dm = 0.2;
      std::vector<double> x = {g0.i, g0.f, g0.z, g0.o, c0, n0, m0};
      auto f = [&] {
        const dt::CellOut<double> o = dt::cell_forward(dt::GatesRaw<double>{x[0], x[1], x[2], x[3]}, x[4], x[5], x[6]);
        return dy * o.y + dc * o.c + dn * o.n + dm * o.m;
      };
      const dt::CellGrad<double> gd = dt::cell_backward(g0, c0, n0, m0, dy, dc, dn, dm);
      std::vector<double> analytic = {gd.d.i, gd.d.f, gd.d.z, gd.d.o, gd.dc0, gd.dn0, gd.dm0};
      if (n0 == 0.0) {  // n0 == 0 is a branch point: leave n0 out of the difference check
        std::vector<double> xs = {g0.i, g0.f, g0.z, g0.o, c0};
        auto fs = [&] {
          const dt::CellOut<double> o = dt::cell_forward(dt::GatesRaw<double>{xs[0], xs[1], xs[2], xs[3]}, xs[4], 0.0, m0);
          return dy * o.y + dc * o.c + dn * o.n + dm * o.m;
        };
        analytic.resize(5);
        CHECK(moxe::test::gradient_error(fs, xs, analytic) < 1e-7);
      } else {
        CHECK(moxe::test::gradient_error(f, x, analytic) < 1e-7);
      }
    }
  }
  // a tie selects i: the whole dm reaches i (and none reaches m0 through the max)
  const double m0 = 0.0, f_raw = 2.0;
  const double tie_i = moxe::math::logsigmoid(f_raw) + m0;
  const dt::CellGrad<double> tie = dt::cell_backward(dt::GatesRaw<double>{tie_i, f_raw, 0.1, 0.1}, 0.5, 1.0, m0,
                                                     0.0, 0.0, 0.0, 1.0);
  CHECK(tie.d.i == 1.0);
  CHECK(tie.dm0 == 0.0);
  const dt::CellGrad<double> below = dt::cell_backward(dt::GatesRaw<double>{tie_i - 1e-3, f_raw, 0.1, 0.1}, 0.5,
                                                       1.0, m0, 0.0, 0.0, 0.0, 1.0);
  CHECK(below.d.i == 0.0);
  CHECK(below.dm0 == 1.0);
}

TEST_CASE("slstm cell backward in float at large |o|, |z| agrees with double to rounding") {
  // d raw_o = dy c/n sigmoid'(o), d raw_z = dc' ig tanh'(z): in float, og (1 - og) and
  // 1 - tanh(z)^2 from the rounded og, tanh(z) keep no digit once they round to 1 (o ~ 17,
  // |z| ~ 9); from the raw gates each factor is exact to rounding. With every term of c and
  // of dc' of one sign (c0 and z of one sign; dy, dc > 0) nothing cancels: a handful of
  // float roundings (2^-24 each) and expf's few ulps, ~1e-6 relative at most.
  namespace dt = moxe::slstm::detail;
  constexpr double kTolerance = 2e-6;
  auto rel = [](double a, double b) { return b == 0.0 ? std::abs(a) : std::abs(a - b) / std::abs(b); };
  double worst_o = 0, worst_z = 0;
  for (double o : {-20.0, -9.0, 0.0, 0.5, 5.0, 9.0, 12.0, 16.0, 17.0, 20.0}) {
    for (double z : {-20.0, -12.0, -9.0, -5.0, -0.25, 0.25, 5.0, 9.0, 12.0, 16.0, 20.0}) {
      for (bool zero_state : {true, false}) {
        CAPTURE(o);
        CAPTURE(z);
        CAPTURE(zero_state);
        const float i = 0.375f, f = 1.25f, m0 = 0.125f, dy = 0.875f;
        const float c0 = zero_state ? 0.f : (z < 0 ? -0.75f : 0.75f), n0 = zero_state ? 0.f : 1.5f;
        const float dc = zero_state ? 0.f : 0.5f;
        const dt::CellGrad<float> gf = dt::cell_backward(
            dt::GatesRaw<float>{i, f, static_cast<float>(z), static_cast<float>(o)}, c0, n0, m0, dy, dc, 0.f, 0.f);
        const dt::CellGrad<double> gd =
            dt::cell_backward(dt::GatesRaw<double>{i, f, z, o}, double(c0), double(n0), double(m0), double(dy),
                              double(dc), 0.0, 0.0);
        REQUIRE(gd.d.o != 0.0);
        REQUIRE(gd.d.z != 0.0);
        const double eo = rel(gf.d.o, gd.d.o), ez = rel(gf.d.z, gd.d.z);
        CHECK(eo < kTolerance);
        CHECK(ez < kTolerance);
        worst_o = std::max(worst_o, eo);
        worst_z = std::max(worst_z, ez);
      }
    }
  }
  MESSAGE("float cell_backward vs double, worst relative error: d raw_o " << worst_o << ", d raw_z " << worst_z);
}

TEST_CASE("slstm cell from the zero state at an input gate far below the forget gate: finite, as the per-token form") {
  // From the zero state m = i and fg = exp(logsigmoid(f) + m0 - i): at i = -100, f = 0 that
  // is e^99 (inf in float). The state contributes nothing (c0 = n0 = 0), so y = sigmoid(o)
  // tanh(z), every gate gradient is finite and dm0 = 0; inf * 0 made all of them NaN.
  namespace dt = moxe::slstm::detail;
  for (double i : {-100.0, -1000.0}) {
    CAPTURE(i);
    const float z = 0.5f, o = 0.25f;
    const dt::CellOut<float> of = dt::cell_forward(dt::GatesRaw<float>{float(i), 0.f, z, o}, 0.f, 0.f, 0.f);
    CHECK(of.y == doctest::Approx(moxe::math::sigmoid(0.25) * std::tanh(0.5)).epsilon(1e-6));
    CHECK(of.n == 1.f);
    const dt::CellGrad<float> gf = dt::cell_backward(dt::GatesRaw<float>{float(i), 0.f, z, o}, 0.f, 0.f, 0.f, 0.75f,
                                                     0.5f, -0.25f, 0.125f);
    const dt::CellGrad<double> gd =
        dt::cell_backward(dt::GatesRaw<double>{i, 0.0, z, o}, 0.0, 0.0, 0.0, 0.75, 0.5, -0.25, 0.125);
    for (auto [a, b] : {std::pair{gf.d.i, gd.d.i}, {gf.d.f, gd.d.f}, {gf.d.z, gd.d.z}, {gf.d.o, gd.d.o}}) {
      CHECK(std::isfinite(a));
      CHECK(a == doctest::Approx(b).epsilon(1e-6).scale(1e-12));
    }
    CHECK(gf.dm0 == 0.f);
  }
}

namespace {

namespace dt = moxe::slstm::detail;

template <class A>
bool bitwise_equal(const std::vector<A>& a, const std::vector<A>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(A)) == 0);
}

}  // namespace

TEST_CASE("slstm device decomposition, emulated on the host, matches the reference") {
  const auto seed = moxe::test::fresh_seed();
  INFO("seed " << seed);
  moxe::test::Rng rng(seed);
  struct Case {
    sl::Dims d;
    bool init;
  };
  for (const Case& cs : {Case{{1, 3, 2, 16}, true}, Case{{7, 17, 1, 32}, false}, Case{{5, 2, 3, 48}, true},
                         Case{{300, 1, 1, 16}, true}}) {
    CAPTURE(cs.d.seq_len);
    CAPTURE(cs.d.batch);
    CAPTURE(cs.d.head_dim);
    const Problem<double> pd = rounded_to_float(make_problem<double>(rng, cs.d, cs.init));
    const Problem<float> pf = to_float_problem(pd);
    const Outputs want = run_forward(pd);
    const Grads gwant = run_backward(pd, true);
    moxe::test::SlstmEmulation first;
    bool have_first = false;
    for (int units = 16; units <= cs.d.head_dim; units += 16) {
      if (cs.d.head_dim % units != 0) continue;
      CAPTURE(units);
      const moxe::test::SlstmEmulation e =
          moxe::test::emulate_slstm_device(inputs_of(pf), units, [](float x) { return x; });
      CHECK(moxe::test::rel_error(e.y, want.y) < 1e-5);
      CHECK(moxe::test::rel_error(e.c_last, want.c_last) < 1e-5);
      CHECK(moxe::test::rel_error(e.n_last, want.n_last) < 1e-5);
      CHECK(moxe::test::rel_error(e.y_last, want.y_last) < 1e-5);
      CHECK(moxe::test::rel_error(e.dwx, gwant.dwx) < 1e-4);
      CHECK(moxe::test::rel_error(e.dr, gwant.dr) < 1e-4);
      CHECK(moxe::test::rel_error(e.dbias, gwant.dbias) < 1e-4);
      if (cs.init) {
        CHECK(moxe::test::rel_error(e.dy_init, gwant.dy_init) < 1e-4);
        CHECK(moxe::test::rel_error(e.dc_init, gwant.dc_init) < 1e-4);
        CHECK(moxe::test::rel_error(e.dn_init, gwant.dn_init) < 1e-4);
        CHECK(moxe::test::rel_error(e.dm_init, gwant.dm_init) < 1e-4);
      }
      if (!have_first) {
        first = e;
        have_first = true;
      } else {  // the split over blocks does not change a single bit
        CHECK(bitwise_equal(e.y, first.y));
        CHECK(bitwise_equal(e.dwx, first.dwx));
        CHECK(bitwise_equal(e.dr, first.dr));
      }
    }
  }
}

TEST_CASE("slstm launch plan: units, shared memory, dr split") {
  constexpr std::size_t kH100 = 227 * 1024;
  for (int64_t dh = 16; dh <= 256; dh += 16) {
    for (int elem : {2, 4}) {
      const bool tc = elem == 2;
      for (bool backward : {false, true}) {
        CAPTURE(dh);
        CAPTURE(elem);
        CAPTURE(backward);
        const int u = dt::choose_units(dh, elem, tc, backward, kH100, 0);
        REQUIRE(u > 0);
        CHECK(u % 16 == 0);
        CHECK(dh % u == 0);
        CHECK(u <= dt::kMaxUnits);
        const std::size_t bytes = backward ? dt::backward_smem(dh, u, elem, tc).bytes : dt::forward_smem(dh, u, elem, tc).bytes;
        CHECK(bytes <= kH100);
        // WMMA: 16-byte rows for 16-bit operands, 16-aligned offsets
        if (tc) {
          const auto f = dt::forward_smem(dh, u, elem, tc);
          const auto b = dt::backward_smem(dh, u, elem, tc);
          CHECK((f.ldr * elem) % 16 == 0);
          CHECK((b.ldk * elem) % 16 == 0);
          CHECK(f.ldg % 4 == 0);
          CHECK(b.ldo % 4 == 0);
          CHECK(f.y_off % 128 == 0);
          CHECK(b.dg_off % 128 == 0);
        }
        // an explicit request is honoured only when valid
        CHECK(dt::choose_units(dh, elem, tc, backward, kH100, 16) == 16);
        CHECK(dt::choose_units(dh, elem, tc, backward, kH100, 24) == 0);
      }
    }
  }
  CHECK(dt::choose_units(256, 2, true, false, kH100, 0) == 64);
  CHECK(dt::choose_units(128, 2, true, false, kH100, 0) == 128);
  CHECK(dt::device_supports(16, 256));
  CHECK(!dt::device_supports(17, 64));
  CHECK(!dt::device_supports(4, 8));
  CHECK(!dt::device_supports(4, 264));
  CHECK(!dt::device_supports(4, 72 + 1));
  for (int64_t S : {1, 7, 64, 300, 1024})
    for (int64_t B : {1, 3, 16, 256})
      for (int64_t dh : {16, 64, 256}) {
        const dt::DrSplit s = dt::dr_split(S, B, 4, dh);
        CHECK(s.chunks >= 1);
        CHECK(s.chunk_len % dt::kDrTileK == 0);
        CHECK(s.chunks * s.chunk_len >= S * B);           // covers K
        CHECK((s.chunks - 1) * s.chunk_len < S * B);      // no empty chunk
      }
  CHECK(dt::num_groups(17, 3) == 6);
  // the overlap test behind the forward's y / y_init barrier (step() with y_out == y)
  std::vector<float> buf(64);
  CHECK(dt::ranges_overlap(buf.data(), 16 * sizeof(float), buf.data(), 16 * sizeof(float)));
  CHECK(dt::ranges_overlap(buf.data(), 16 * sizeof(float), buf.data() + 15, sizeof(float)));
  CHECK(!dt::ranges_overlap(buf.data(), 16 * sizeof(float), buf.data() + 16, 16 * sizeof(float)));
  CHECK(!dt::ranges_overlap(buf.data() + 16, 16 * sizeof(float), buf.data(), 16 * sizeof(float)));
  CHECK(!dt::ranges_overlap(nullptr, 16, buf.data(), 16));
  CHECK(!dt::ranges_overlap(buf.data(), 0, buf.data(), 16));
}

TEST_CASE("slstm reference: bad input writes nothing") {
  moxe::test::Rng rng(moxe::test::fresh_seed());
  auto p = make_problem<double>(rng, sl::Dims{3, 2, 2, 4}, true);
  std::vector<double> y(3 * p.units(), 7.0), yl(p.units(), 7.0), cl = yl, nl = yl, ml = yl;
  sl::ForwardParams<double, double> f{};
  f.dims = p.dims;
  f.wx = p.wx.data();
  f.r = p.r.data();
  f.bias = p.bias.data();
  f.y = y.data();
  auto untouched = [&] {
    for (double v : y)
      if (v != 7.0) return false;
    for (double v : yl)
      if (v != 7.0) return false;
    return true;
  };
  auto expect_forward_rejected = [&](auto mutate) {
    auto g = f;
    mutate(g);
    CHECK(sl::reference::forward(g) == Status::invalid_argument);
  };
  using FP = sl::ForwardParams<double, double>;
  expect_forward_rejected([](FP& g) { g.wx = nullptr; });
  expect_forward_rejected([](FP& g) { g.y = nullptr; });
  for (int field = 0; field < 4; ++field) {
    expect_forward_rejected([field](FP& g) {
      int64_t* dims[] = {&g.dims.seq_len, &g.dims.batch, &g.dims.heads, &g.dims.head_dim};
      *dims[field] = field % 2 ? 0 : -1;
    });
  }
  expect_forward_rejected([&](FP& g) {  // partial initial-state group
    g.y_init = p.y_init.data();
    g.c_init = p.c_init.data();
  });
  expect_forward_rejected([&](FP& g) {  // partial final-state group
    g.y_last = yl.data();
    g.c_last = cl.data();
    g.n_last = nl.data();
  });
  std::vector<double> tape(7 * 3 * p.units(), 7.0);  // gates, c, n, m
  double* const tg = tape.data();
  double *const tc = tg + 4 * 3 * p.units(), *const tn = tc + 3 * p.units(), *const tm = tn + 3 * p.units();
  expect_forward_rejected([&](FP& g) { g.tape_gates = tg; });  // partial tape
  expect_forward_rejected([&](FP& g) {  // the tape without tape_m
    g.tape_gates = tg;
    g.tape_c = tc;
    g.tape_n = tn;
  });
  CHECK(untouched());
  for (double v : tape) CHECK(v == 7.0);

  std::vector<double> dwx(p.wx.size(), 7.0), dr(p.r.size(), 7.0), dbias(p.bias.size(), 7.0), dyi(p.units(), 7.0);
  sl::BackwardParams<double, double> b{};
  b.fwd = f;
  b.fwd.y = nullptr;  // the backward does not need y
  b.dy = p.dy.data();
  b.dwx = dwx.data();
  b.dr = dr.data();
  b.dbias = dbias.data();
  auto expect_backward_rejected = [&](auto mutate) {
    auto g = b;
    mutate(g);
    CHECK(sl::reference::backward(g) == Status::invalid_argument);
  };
  using BP = sl::BackwardParams<double, double>;
  expect_backward_rejected([](BP& g) { g.dr = nullptr; });
  expect_backward_rejected([](BP& g) { g.dy = nullptr; });
  expect_backward_rejected([&](BP& g) { g.dy_last = p.dy_last.data(); });  // partial upstream group
  expect_backward_rejected([&](BP& g) {  // the upstream group without dm_last
    g.dy_last = p.dy_last.data();
    g.dc_last = p.dc_last.data();
    g.dn_last = p.dn_last.data();
  });
  expect_backward_rejected([&](BP& g) {  // partial initial-state gradient group
    g.dy_init = dyi.data();
    g.dc_init = dyi.data();
  });
  expect_backward_rejected([&](BP& g) {  // the initial-state gradients without dm_init
    g.dy_init = dyi.data();
    g.dc_init = dyi.data();
    g.dn_init = dyi.data();
  });
  expect_backward_rejected([&](BP& g) { g.fwd.tape_m = tm; });  // partial tape
  expect_backward_rejected([&](BP& g) {  // a whole tape without the forward's y
    g.fwd.tape_gates = tg;
    g.fwd.tape_c = tc;
    g.fwd.tape_n = tn;
    g.fwd.tape_m = tm;
  });
  for (double v : dwx) CHECK(v == 7.0);
  for (double v : dr) CHECK(v == 7.0);
  CHECK(sl::reference::backward(b) == Status::ok);  // and the good call works
}

TEST_CASE("slstm reference step: S steps in place equal the sequence") {
  moxe::test::Rng rng(moxe::test::fresh_seed());
  const sl::Dims d{6, 3, 2, 8};
  const auto p = make_problem<double>(rng, d, true);
  const Outputs want = run_forward(p);
  std::vector<double> y = p.y_init, c = p.c_init, n = p.n_init, m = p.m_init;
  std::vector<double> y_out(p.units()), y_all;
  for (int64_t t = 0; t < d.seq_len; ++t) {
    const sl::StepParams<double, double> s =
        moxe::test::step_params(inputs_of(p), t, y.data(), c.data(), n.data(), m.data(), y_out.data());
    REQUIRE(sl::reference::step(s) == Status::ok);
    y_all.insert(y_all.end(), y_out.begin(), y_out.end());
  }
  CHECK(moxe::test::rel_error(y_all, want.y) < 1e-14);
  CHECK(moxe::test::rel_error(y, want.y_last) < 1e-14);
  CHECK(moxe::test::rel_error(c, want.c_last) < 1e-14);
  CHECK(moxe::test::rel_error(n, want.n_last) < 1e-14);
  CHECK(moxe::test::rel_error(m, want.m_last) < 1e-14);
  const sl::StepParams<double, double> bad = moxe::test::step_params(
      inputs_of(p), 0, y.data(), c.data(), n.data(), /*m: missing*/ nullptr, y_out.data());
  const std::vector<double> before = y;
  CHECK(sl::reference::step(bad) == Status::invalid_argument);
  CHECK(y == before);
}
