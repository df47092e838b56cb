// Device tests of the chunkwise mLSTM (chunkwise.cuh) against the recurrent reference in
// double: forward with final states, backward with state gradients, partial last chunks,
// head dims 16..256, segments, extreme gates, a misaligned workspace, bad input,
// determinism and graph capture. Inputs are drawn fresh each run; outputs are poisoned before every launch.
// Small-size mode (MOXE_TEST_SMALL, the simulator) keeps every case, dtype and code path at
// shorter sequences and narrower heads: S = 1, partial last chunks over several chunks at
// every chunk size, the largest head dims, ragged and empty segments, initial and final
// states and their gradients, batch passes, the extreme gates (see each case).
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "device_utils.cuh"
#include "mlstm_testing.hpp"
#include "moxe/mlstm/chunkwise.cuh"
#include "moxe/mlstm/reference.hpp"
#include "test_utils.hpp"

namespace mm = moxe::mlstm;
using moxe::Status;
using moxe::test::DeviceBuffer;

namespace {

template <class T>
struct Tolerance;
// fwd, grad: the tolerances of well-conditioned inputs.
// conditioning: where the inputs are ill-conditioned, the device may be off by this many
// times the error of the recurrent reference evaluated in float (a different summation
// order in fp32; the phase design multiplies half and bf16 in 3xTF32, about fp32 accuracy;
// the fused design per ForwardParams::precision).
// branch_margin: inputs are redrawn while any step lies this close (relative) to the
// normaliser's switch |n.q| = exp(-m), where the exact gradient jumps: a device rounding
// could take the other branch than the double reference.
// grad_fast: the gradients' tolerance under Precision::fast (the default), where the
// intermediate operands (P, dS, C, dC') are rounded to T before their products: the host
// twin's measured error against the double reference is up to 6.8e-3 for bf16 (1.1e-2 at
// extreme gates) and 6.7e-4 for half (docs/mlstm.md "Fused device backward"); `accurate`
// meets grad.
template <>
struct Tolerance<float> {
  static constexpr double fwd = 2e-5, grad = 1e-4, grad_fast = 1e-4, conditioning = 30.0, branch_margin = 1e-3;
};
template <>
struct Tolerance<__half> {
  static constexpr double fwd = 5e-3, grad = 1e-2, grad_fast = 1e-2, conditioning = 100.0, branch_margin = 2e-2;
};
template <>
struct Tolerance<__nv_bfloat16> {
  static constexpr double fwd = 1e-2, grad = 2e-2, grad_fast = 3e-2, conditioning = 100.0, branch_margin = 2e-2;
};

struct Case {
  int64_t batch = 1, heads = 2, seq_len = 7, dqk = 16, dv = 16;
  int chunk_size = 16;
  bool init_states = false, upstream = false;
  double igate_range = 3.0;
  double tol_scale = 1.0;  // large gates: float rounding of the definition itself grows (the
                           // recurrent reference in float is off by up to ~5e-5 there)
  std::vector<int64_t> offsets;
  moxe::test::ExtremeGates extreme = moxe::test::ExtremeGates::none;  // (without segments)
  bool no_source = false;  // with resets: positions with igate = fgate = -inf too
  moxe::Precision precision = moxe::Precision::fast;  // ForwardParams::precision (half, bf16)
};

/// Host inputs in double (already rounded through T where the device reads T).
struct Inputs {
  Case cs;
  int64_t rows = 0, slots = 0;
  std::vector<double> q, k, v, ig, fg, dh, c0, n0, m0, dcl, dnl, dml;
};

/// Whether any step of any slot lies within `margin` of the normaliser's branch switch
/// (|n.q| = exp(-m)) or near a tie of the stabiliser's max: there the exact gradient is
/// discontinuous, and float and double may legitimately take different branches.
bool near_branch_switch(const Inputs& in, double margin) {
  const Case& cs = in.cs;
  const int64_t H = cs.heads;
  const double scale = 1.0 / std::sqrt(double(cs.dqk));
  std::vector<double> n(cs.dqk);
  for (int64_t slot = 0; slot < in.slots; ++slot) {
    const int64_t u = slot / H, h = slot % H;
    int64_t begin = slot * cs.seq_len, len = cs.seq_len;
    if (!cs.offsets.empty()) {
      begin = h * cs.seq_len + cs.offsets[u];
      len = cs.offsets[u + 1] - cs.offsets[u];
    }
    for (int64_t a = 0; a < cs.dqk; ++a) n[a] = cs.init_states ? in.n0[slot * cs.dqk + a] : 0.0;
    double m = cs.init_states ? in.m0[slot] : 0.0;
    for (int64_t t = 0; t < len; ++t) {
      const int64_t r = begin + t;
      const auto g = mm::detail::gate_step(in.ig[r], in.fg[r], m);
      if (std::abs(g.log_f + m - in.ig[r]) < 1e-4 * (1.0 + std::abs(in.ig[r]))) return true;
      double nq = 0.0;
      for (int64_t a = 0; a < cs.dqk; ++a) {
        n[a] = g.f_scale * n[a] + g.i_scale * in.k[r * cs.dqk + a];
        nq += n[a] * in.q[r * cs.dqk + a] * scale;
      }
      m = g.m;
      const double floor = std::exp(-m);
      if (std::abs(std::abs(nq) - floor) < margin * floor) return true;
    }
  }
  return false;
}

template <class T>
Inputs make_inputs_once(const Case& cs, moxe::test::Rng& rng);

/// Fresh inputs, redrawn while they lie near a branch switch of the gradient.
template <class T>
Inputs make_inputs(const Case& cs, moxe::test::Rng& rng) {
  Inputs in = make_inputs_once<T>(cs, rng);
  for (int attempt = 0; attempt < 100 && near_branch_switch(in, Tolerance<T>::branch_margin); ++attempt)
    in = make_inputs_once<T>(cs, rng);
  return in;
}

template <class T>
Inputs make_inputs_once(const Case& cs, moxe::test::Rng& rng) {
  using moxe::test::round_through;
  Inputs in;
  in.cs = cs;
  in.rows = cs.batch * cs.heads * cs.seq_len;
  in.slots = (cs.offsets.empty() ? cs.batch : int64_t(cs.offsets.size()) - 1) * cs.heads;
  in.q = round_through<T>(moxe::test::normal_vector<double>(rng, in.rows * cs.dqk));
  in.k = round_through<T>(moxe::test::normal_vector<double>(rng, in.rows * cs.dqk));
  in.v = round_through<T>(moxe::test::normal_vector<double>(rng, in.rows * cs.dv));
  in.ig = moxe::test::uniform_vector<double>(rng, in.rows, -cs.igate_range, cs.igate_range);
  in.fg = moxe::test::uniform_vector<double>(rng, in.rows, -2.0, 6.0);
  if (cs.extreme != moxe::test::ExtremeGates::none) {
    moxe::test::apply_extreme_gates(cs.extreme, rng, cs.batch * cs.heads, cs.seq_len, in.ig, in.fg, cs.no_source);
    if (cs.extreme == moxe::test::ExtremeGates::high_m) {
      // m ~ 100: h = num / (|n.qs| + eps); q, k >= 0 keep n.qs away from 0
      for (auto* v : {&in.q, &in.k})
        for (double& x : *v) x = std::abs(x);
    }
  }
  in.ig = round_through<T>(in.ig);
  in.fg = round_through<T>(in.fg);
  in.dh = round_through<T>(moxe::test::normal_vector<double>(rng, in.rows * cs.dv));
  auto as_float = [](std::vector<double> v) {
    for (double& x : v) x = static_cast<double>(static_cast<float>(x));
    return v;
  };
  if (cs.init_states) {
    in.c0 = as_float(moxe::test::normal_vector<double>(rng, in.slots * cs.dqk * cs.dv, 0.5));
    in.n0 = as_float(moxe::test::uniform_vector<double>(rng, in.slots * cs.dqk, -1.0, 1.0));
    in.m0 = as_float(moxe::test::uniform_vector<double>(rng, in.slots, -2.0, 2.0));
  }
  if (cs.upstream) {
    in.dcl = as_float(moxe::test::normal_vector<double>(rng, in.slots * cs.dqk * cs.dv));
    in.dnl = as_float(moxe::test::normal_vector<double>(rng, in.slots * cs.dqk));
    in.dml = as_float(moxe::test::normal_vector<double>(rng, in.slots));
  }
  return in;
}

struct Results {
  std::vector<double> h, c, n, m;                      // forward
  std::vector<double> dq, dk, dv, di, df, dc0, dn0, dm0;  // backward
};

// ---- reference (host, double; and in float, to measure the conditioning) ----------------

template <class A>
std::vector<A> as(const std::vector<double>& v) {
  return std::vector<A>(v.begin(), v.end());
}

/// The recurrent reference evaluated in A (double: the exact answer; float: how much the
/// definition itself loses to float rounding on these inputs).
template <class A>
Results reference_in(const Inputs& in) {
  const Case& cs = in.cs;
  const auto q = as<A>(in.q), k = as<A>(in.k), v = as<A>(in.v), ig = as<A>(in.ig), fg = as<A>(in.fg);
  const auto dh = as<A>(in.dh), c0 = as<A>(in.c0), n0 = as<A>(in.n0), m0 = as<A>(in.m0);
  const auto dcl = as<A>(in.dcl), dnl = as<A>(in.dnl), dml = as<A>(in.dml);
  mm::ForwardParams<A, A> p;
  p.dims = mm::Dims{cs.batch, cs.heads, cs.seq_len, cs.dqk, cs.dv};
  p.q = q.data();
  p.k = k.data();
  p.v = v.data();
  p.igate = ig.data();
  p.fgate = fg.data();
  if (cs.init_states) {
    p.c_init = c0.data();
    p.n_init = n0.data();
    p.m_init = m0.data();
  }
  if (!cs.offsets.empty()) {
    p.segment_offsets = cs.offsets.data();
    p.num_segments = int64_t(cs.offsets.size()) - 1;
  }
  std::vector<A> h(in.rows * cs.dv), c(in.slots * cs.dqk * cs.dv), n(in.slots * cs.dqk), m(in.slots);
  p.h = h.data();
  p.c_last = c.data();
  p.n_last = n.data();
  p.m_last = m.data();
  REQUIRE(mm::reference::forward(p) == Status::ok);


  mm::BackwardParams<A, A> b;
  b.fwd = p;
  b.dh = dh.data();
  if (cs.upstream) {
    b.dc_last = dcl.data();
    b.dn_last = dnl.data();
    b.dm_last = dml.data();
  }
  std::vector<A> dq(in.rows * cs.dqk), dk(in.rows * cs.dqk), dv(in.rows * cs.dv), di(in.rows), df(in.rows);
  std::vector<A> dc0, dn0, dm0;
  b.dq = dq.data();
  b.dk = dk.data();
  b.dv = dv.data();
  b.digate = di.data();
  b.dfgate = df.data();
  if (cs.init_states) {
    dc0.resize(c.size());
    dn0.resize(n.size());
    dm0.resize(m.size());
    b.dc_init = dc0.data();
    b.dn_init = dn0.data();
    b.dm_init = dm0.data();
  }
  REQUIRE(mm::reference::backward(b) == Status::ok);

  auto d = [](const std::vector<A>& x) { return std::vector<double>(x.begin(), x.end()); };
  Results r;
  r.h = d(h);
  r.c = d(c);
  r.n = d(n);
  r.m = d(m);
  r.dq = d(dq);
  r.dk = d(dk);
  r.dv = d(dv);
  r.di = d(di);
  r.df = d(df);
  r.dc0 = d(dc0);
  r.dn0 = d(dn0);
  r.dm0 = d(dm0);
  return r;
}

using ResultsField = std::vector<double> Results::*;

struct Reference {
  Results exact;     // double
  Results in_float;  // the same definition in float
};

template <class T>
Reference reference(const Inputs& in) {
  return Reference{reference_in<double>(in), reference_in<float>(in)};
}

// ---- device --------------------------------------------------------------------------------

template <class T>
struct Device {
  Case cs;
  DeviceBuffer<T> q, k, v, ig, fg, dh, h, dq, dk, dv, di, df;
  DeviceBuffer<float> c0, n0, m0, dcl, dnl, dml, c, n, m, dc0, dn0, dm0;
  DeviceBuffer<int64_t> offsets;
  int64_t batch_per_pass = 0;  // ForwardParams::batch_per_pass

  explicit Device(const Inputs& in) : cs(in.cs) {
    using moxe::test::convert_to;
    q = DeviceBuffer<T>(convert_to<T>(in.q));
    k = DeviceBuffer<T>(convert_to<T>(in.k));
    v = DeviceBuffer<T>(convert_to<T>(in.v));
    ig = DeviceBuffer<T>(convert_to<T>(in.ig));
    fg = DeviceBuffer<T>(convert_to<T>(in.fg));
    dh = DeviceBuffer<T>(convert_to<T>(in.dh));
    h = DeviceBuffer<T>(in.rows * cs.dv);
    dq = DeviceBuffer<T>(in.rows * cs.dqk);
    dk = DeviceBuffer<T>(in.rows * cs.dqk);
    dv = DeviceBuffer<T>(in.rows * cs.dv);
    di = DeviceBuffer<T>(in.rows);
    df = DeviceBuffer<T>(in.rows);
    c = DeviceBuffer<float>(in.slots * cs.dqk * cs.dv);
    n = DeviceBuffer<float>(in.slots * cs.dqk);
    m = DeviceBuffer<float>(in.slots);
    if (cs.init_states) {
      c0 = DeviceBuffer<float>(convert_to<float>(in.c0));
      n0 = DeviceBuffer<float>(convert_to<float>(in.n0));
      m0 = DeviceBuffer<float>(convert_to<float>(in.m0));
      dc0 = DeviceBuffer<float>(c.size());
      dn0 = DeviceBuffer<float>(n.size());
      dm0 = DeviceBuffer<float>(m.size());
    }
    if (cs.upstream) {
      dcl = DeviceBuffer<float>(convert_to<float>(in.dcl));
      dnl = DeviceBuffer<float>(convert_to<float>(in.dnl));
      dml = DeviceBuffer<float>(convert_to<float>(in.dml));
    }
    if (!cs.offsets.empty()) offsets = DeviceBuffer<int64_t>(cs.offsets);
  }

  mm::ForwardParams<T, float> forward_params() const {
    mm::ForwardParams<T, float> p;
    p.dims = mm::Dims{cs.batch, cs.heads, cs.seq_len, cs.dqk, cs.dv};
    p.q = q.get();
    p.k = k.get();
    p.v = v.get();
    p.igate = ig.get();
    p.fgate = fg.get();
    p.precision = cs.precision;
    if (cs.init_states) {
      p.c_init = c0.get();
      p.n_init = n0.get();
      p.m_init = m0.get();
    }
    p.h = h.get();
    p.c_last = c.get();
    p.n_last = n.get();
    p.m_last = m.get();
    p.chunk_size = cs.chunk_size;
    p.batch_per_pass = batch_per_pass;
    if (!cs.offsets.empty()) {
      p.segment_offsets = offsets.get();
      p.num_segments = int64_t(cs.offsets.size()) - 1;
    }
    return p;
  }

  mm::BackwardParams<T, float> backward_params() const {
    mm::BackwardParams<T, float> b;
    b.fwd = forward_params();
    b.fwd.h = nullptr;
    b.fwd.c_last = b.fwd.n_last = nullptr;
    b.fwd.m_last = nullptr;
    b.dh = dh.get();
    if (cs.upstream) {
      b.dc_last = dcl.get();
      b.dn_last = dnl.get();
      b.dm_last = dml.get();
    }
    b.dq = dq.get();
    b.dk = dk.get();
    b.dv = dv.get();
    b.digate = di.get();
    b.dfgate = df.get();
    if (cs.init_states) {
      b.dc_init = dc0.get();
      b.dn_init = dn0.get();
      b.dm_init = dm0.get();
    }
    return b;
  }

  void poison() {
    for (auto* b : {&h, &dq, &dk, &dv, &di, &df}) b->poison();
    for (auto* b : {&c, &n, &m, &dc0, &dn0, &dm0}) b->poison();
  }

  /// Forward and backward with freshly allocated (or given misaligned) workspaces.
  Results run(bool misaligned = false) {
    poison();
    const auto fp = forward_params();
    const auto bp = backward_params();
    const std::size_t fbytes = mm::chunkwise_forward_workspace_size(fp);
    const std::size_t bbytes = mm::chunkwise_backward_workspace_size(bp);
    Status fs, bs;
    if (misaligned) {
      moxe::test::MisalignedWorkspace fws(fbytes), bws(bbytes);
      fs = mm::chunkwise_forward(fp, fws.get(), fws.bytes(), nullptr);
      bs = mm::chunkwise_backward(bp, bws.get(), bws.bytes(), nullptr);
      MOXE_TEST_CUDA(cudaDeviceSynchronize());
    } else {
      DeviceBuffer<unsigned char> fws(fbytes), bws(bbytes);
      fws.fill_bytes(0xA5);
      bws.fill_bytes(0xA5);
      fs = mm::chunkwise_forward(fp, fws.get(), fbytes, nullptr);
      bs = mm::chunkwise_backward(bp, bws.get(), bbytes, nullptr);
      MOXE_TEST_CUDA(cudaDeviceSynchronize());
    }
    REQUIRE(fs == Status::ok);
    REQUIRE(bs == Status::ok);
    return download();
  }

  /// Forward and backward through one variant of the chunk products (kTiled: the tile
  /// products the launchers use; else the per-element fallback, MOXE_MLSTM_CHUNKWISE_SIMPLE).
  template <bool kTiled>
  Results run_variant() {
    poison();
    const auto fp = forward_params();
    const auto bp = backward_params();
    DeviceBuffer<unsigned char> fws(mm::detail::phase_forward_workspace_size(fp));
    DeviceBuffer<unsigned char> bws(mm::detail::phase_backward_workspace_size(bp));
    REQUIRE(mm::detail::chunkwise_forward_variant<kTiled>(fp, fws.get(), fws.size(), nullptr) == Status::ok);
    REQUIRE(mm::detail::chunkwise_backward_variant<kTiled>(bp, bws.get(), bws.size(), nullptr) == Status::ok);
    MOXE_TEST_CUDA(cudaDeviceSynchronize());
    return download();
  }

  Results download() const {
    using moxe::test::convert_to_double;
    Results r;
    r.h = convert_to_double(h.download());
    r.c = convert_to_double(c.download());
    r.n = convert_to_double(n.download());
    r.m = convert_to_double(m.download());
    r.dq = convert_to_double(dq.download());
    r.dk = convert_to_double(dk.download());
    r.dv = convert_to_double(dv.download());
    r.di = convert_to_double(di.download());
    r.df = convert_to_double(df.download());
    if (cs.init_states) {
      r.dc0 = convert_to_double(dc0.download());
      r.dn0 = convert_to_double(dn0.download());
      r.dm0 = convert_to_double(dm0.download());
    }
    return r;
  }
};

double norm(const std::vector<double>& v) {
  double s = 0.0;
  for (double x : v) s += x * x;
  return std::sqrt(s);
}

/// ||out - ref|| / max(||ref||, 1e-2 * scale): a gradient can be (near) zero while the
/// terms that make it are not (see test_chunkwise_phase_host.cpp); scale = all gradients' norms.
double grad_error(const std::vector<double>& out, const std::vector<double>& ref, double scale) {
  if (out.size() != ref.size()) return std::numeric_limits<double>::infinity();
  double num = 0.0;
  for (std::size_t i = 0; i < out.size(); ++i) {
    if (!std::isfinite(out[i])) return std::numeric_limits<double>::infinity();
    num += (out[i] - ref[i]) * (out[i] - ref[i]);
  }
  const double den = std::max(norm(ref), 1e-2 * scale);
  return den > 0.0 ? std::sqrt(num) / den : std::sqrt(num);
}

/// The device against the exact reference, within the type's tolerance or, where the
/// inputs are ill-conditioned (|n.q| a small difference of large terms, large gates), within
/// Tolerance<T>::conditioning times the error the recurrent definition itself makes in
/// float on the same inputs.
template <class T>
void check_against_reference(const Results& got, const Reference& ref, const Case& cs) {
  using moxe::test::rel_error;
  const Results& x = ref.exact;
  const Results& f = ref.in_float;
  const double grad = cs.precision == moxe::Precision::fast ? Tolerance<T>::grad_fast : Tolerance<T>::grad;
  const double ft = Tolerance<T>::fwd * cs.tol_scale, gt = grad * cs.tol_scale;
  auto fwd_tol = [&](const std::vector<double>& fl, const std::vector<double>& ex) {
    return std::max(ft, Tolerance<T>::conditioning * rel_error(fl, ex));
  };
  CHECK(rel_error(got.h, x.h) < fwd_tol(f.h, x.h));
  CHECK(rel_error(got.c, x.c) < fwd_tol(f.c, x.c));
  CHECK(rel_error(got.n, x.n) < fwd_tol(f.n, x.n));
  CHECK(rel_error(got.m, x.m) < fwd_tol(f.m, x.m));
  const double scale = norm(x.dq) + norm(x.dk) + norm(x.dv) + norm(x.di) + norm(x.df);
  auto grad_tol = [&](ResultsField field) {
    return std::max(gt, Tolerance<T>::conditioning * grad_error(f.*field, x.*field, scale));
  };
  CHECK(grad_error(got.dq, x.dq, scale) < grad_tol(&Results::dq));
  CHECK(grad_error(got.dk, x.dk, scale) < grad_tol(&Results::dk));
  CHECK(grad_error(got.dv, x.dv, scale) < grad_tol(&Results::dv));
  CHECK(grad_error(got.di, x.di, scale) < grad_tol(&Results::di));
  CHECK(grad_error(got.df, x.df, scale) < grad_tol(&Results::df));
  if (cs.init_states) {
    CHECK(grad_error(got.dc0, x.dc0, scale) < grad_tol(&Results::dc0));
    CHECK(grad_error(got.dn0, x.dn0, scale) < grad_tol(&Results::dn0));
    CHECK(grad_error(got.dm0, x.dm0, scale) < grad_tol(&Results::dm0));
  }
}

/// The case under its precision; with `both`, half and bf16 run again under the other one.
template <class T>
void run_case(const Case& cs, moxe::test::Rng& rng, bool both = false) {
  INFO("B=" << cs.batch << " NH=" << cs.heads << " S=" << cs.seq_len << " DQK=" << cs.dqk << " DV=" << cs.dv
            << " L=" << cs.chunk_size << " init=" << cs.init_states << " segments=" << cs.offsets.size());
  const Inputs in = make_inputs<T>(cs, rng);
  const Reference ref = reference<T>(in);
  Device<T> dev(in);
  {
    INFO((cs.precision == moxe::Precision::fast ? "fast" : "accurate"));
    check_against_reference<T>(dev.run(), ref, cs);
  }
  if (both && !std::is_same_v<T, float>) {
    Case other = cs;
    other.precision = cs.precision == moxe::Precision::fast ? moxe::Precision::accurate : moxe::Precision::fast;
    INFO((other.precision == moxe::Precision::fast ? "fast" : "accurate"));
    dev.cs.precision = other.precision;
    check_against_reference<T>(dev.run(), ref, other);
  }
}

/// A case of these shapes; `init` gives it both initial states and upstream state gradients.
Case shaped(int64_t b, int64_t nh, int64_t s, int64_t dqk, int64_t dv, int chunk, bool init) {
  Case c;
  c.batch = b;
  c.heads = nh;
  c.seq_len = s;
  c.dqk = dqk;
  c.dv = dv;
  c.chunk_size = chunk;
  c.init_states = init;
  c.upstream = init;
  return c;
}

/// The main sweep. Small-size mode (MOXE_TEST_SMALL, the simulator) keeps its edge cases:
/// S = 1 with two batch entries, S = 7 with initial states, S not a multiple of the chunk
/// over several chunks at every chunk size (16, 32, 64, 128), depths of more than one tile
/// (DQK >= 32, chunks >= 32), the largest head dims one at a time (DV 256: 17 column tiles of
/// C' = [C | n]; DQK 256: 16 row tiles) and DQK != DV; shorter sequences and narrower heads.
std::vector<Case> cases() {
  if (moxe::test::small_sizes())
    return {
        shaped(2, 2, 1, 16, 16, 16, false),    // S = 1
        shaped(1, 2, 7, 16, 16, 16, true),     // S = 7, initial states
        shaped(2, 1, 70, 16, 16, 64, false),   // S not a multiple of the chunk (64 + 6)
        shaped(1, 2, 35, 32, 48, 32, true),    // 32 + 3
        shaped(1, 1, 17, 16, 256, 16, true),   // the largest DV, 16 + 1
        shaped(1, 1, 17, 256, 16, 16, true),   // the largest DQK
        shaped(1, 1, 130, 16, 16, 128, false), // the largest chunk, 128 + 2
    };
  return {
      shaped(2, 2, 1, 16, 16, 16, false),    // S = 1
      shaped(1, 2, 7, 16, 16, 16, true),     // S = 7, initial states
      shaped(2, 1, 100, 64, 64, 64, false),  // S not a multiple of the chunk
      shaped(1, 2, 45, 64, 64, 32, true),
      shaped(1, 1, 33, 128, 256, 16, true),  // the largest head dims
      shaped(1, 1, 130, 16, 32, 128, false),
  };
}

/// The fields every run writes (n and dn0 aside), for bitwise and poison checks.
constexpr ResultsField kWrittenFields[] = {
    &Results::h,  &Results::c,  &Results::m,  &Results::dq,  &Results::dk,
    &Results::dv, &Results::di, &Results::df, &Results::dc0, &Results::dm0};

}  // namespace

TEST_CASE_TEMPLATE("chunkwise device == recurrent reference", T, float, __nv_bfloat16, __half) {
  const auto seed = moxe::test::fresh_seed();
  INFO("seed " << seed);
  moxe::test::Rng rng(seed);
  for (const Case& cs : cases()) run_case<T>(cs, rng, /*both=*/true);
}

TEST_CASE_TEMPLATE("chunkwise device: large gates", T, float, __nv_bfloat16) {
  const auto seed = moxe::test::fresh_seed();
  INFO("seed " << seed);
  moxe::test::Rng rng(seed);
  // small: three chunks of 16 (full: 80 steps in chunks of 32)
  Case cs = moxe::test::small_sizes() ? shaped(1, 2, 40, 32, 16, 16, true) : shaped(1, 2, 80, 32, 48, 32, true);
  cs.igate_range = 12.0;
  cs.tol_scale = 20.0;
  run_case<T>(cs, rng);
}

TEST_CASE_TEMPLATE("chunkwise device: extreme gates (resets, no input, exp(-m) beyond float's range)", T, float,
                   __nv_bfloat16) {
  const auto seed = moxe::test::fresh_seed();
  INFO("seed " << seed);
  moxe::test::Rng rng(seed);
  using moxe::test::ExtremeGates;
  for (ExtremeGates x : {ExtremeGates::resets, ExtremeGates::low_m, ExtremeGates::high_m}) {
    INFO("gates " << std::string(moxe::test::name(x)));
    // S = 40 in every mode: low_m needs ~20 steps after len / 3 to take exp(-m) past float
    Case cs = shaped(1, 2, 40, 16, 16, 16, true);
    cs.extreme = x;
    cs.no_source = x == ExtremeGates::resets;
    run_case<T>(cs, rng);
  }
}

TEST_CASE_TEMPLATE("chunkwise device: segments == reference and == segments one by one", T, float,
                   __nv_bfloat16) {
  const auto seed = moxe::test::fresh_seed();
  INFO("seed " << seed);
  moxe::test::Rng rng(seed);
  for (bool init : {false, true}) {
    // lengths 1, 17, 0, 39, 33; small: 1, 17, 0, 23 (length 1, a partial second chunk, an
    // empty segment, one of two chunks)
    const bool small = moxe::test::small_sizes();
    Case cs = shaped(1, 2, small ? 41 : 90, 32, 16, 16, init);
    cs.offsets = small ? std::vector<int64_t>{0, 1, 18, 18, 41} : std::vector<int64_t>{0, 1, 18, 18, 57, 90};
    const Inputs in = make_inputs<T>(cs, rng);
    const Reference ref = reference<T>(in);
    Device<T> dev(in);
    const Results got = dev.run();
    check_against_reference<T>(got, ref, cs);

    // each segment alone (batch 1, no offsets) gives the same numbers
    const int64_t segments = int64_t(cs.offsets.size()) - 1, H = cs.heads;
    for (int64_t s = 0; s < segments; ++s) {
      const int64_t begin = cs.offsets[s], len = cs.offsets[s + 1] - begin;
      if (len == 0) {
        if (init) {  // an empty segment passes its states through
          for (int64_t h = 0; h < H; ++h) CHECK(got.m[s * H + h] == doctest::Approx(in.m0[s * H + h]));
        }
        continue;
      }
      Case one = cs;
      one.offsets.clear();
      one.seq_len = len;
      Inputs part;
      part.cs = one;
      part.rows = H * len;
      part.slots = H;
      auto rows_of = [&](const std::vector<double>& src, int64_t width) {
        std::vector<double> out;
        for (int64_t h = 0; h < H; ++h)
          out.insert(out.end(), src.begin() + (h * cs.seq_len + begin) * width,
                     src.begin() + (h * cs.seq_len + begin + len) * width);
        return out;
      };
      auto slots_of = [&](const std::vector<double>& src, int64_t width) {
        if (src.empty()) return src;
        return std::vector<double>(src.begin() + s * H * width, src.begin() + (s + 1) * H * width);
      };
      part.q = rows_of(in.q, cs.dqk);
      part.k = rows_of(in.k, cs.dqk);
      part.v = rows_of(in.v, cs.dv);
      part.ig = rows_of(in.ig, 1);
      part.fg = rows_of(in.fg, 1);
      part.dh = rows_of(in.dh, cs.dv);
      part.c0 = slots_of(in.c0, cs.dqk * cs.dv);
      part.n0 = slots_of(in.n0, cs.dqk);
      part.m0 = slots_of(in.m0, 1);
      part.dcl = slots_of(in.dcl, cs.dqk * cs.dv);
      part.dnl = slots_of(in.dnl, cs.dqk);
      part.dml = slots_of(in.dml, 1);
      Device<T> dev_one(part);
      const Results alone = dev_one.run();
      using moxe::test::rel_error;
      constexpr double kSame = 1e-6;  // same arithmetic; allow for contraction differences
      CHECK(rel_error(rows_of(got.h, cs.dv), alone.h) < kSame);
      CHECK(rel_error(slots_of(got.c, cs.dqk * cs.dv), alone.c) < kSame);
      CHECK(rel_error(slots_of(got.m, 1), alone.m) < kSame);
      CHECK(rel_error(rows_of(got.dq, cs.dqk), alone.dq) < kSame);
      CHECK(rel_error(rows_of(got.dk, cs.dqk), alone.dk) < kSame);
      CHECK(rel_error(rows_of(got.dv, cs.dv), alone.dv) < kSame);
      CHECK(rel_error(rows_of(got.di, 1), alone.di) < kSame);
      CHECK(rel_error(rows_of(got.df, 1), alone.df) < kSame);
      if (init) CHECK(rel_error(slots_of(got.dm0, 1), alone.dm0) < kSame);
    }
  }
}

// float only: with bf16's wider margin around the normaliser's branch switch, inputs this
// long (1500 steps) nearly always have a step near it (the table logic is the same for all T)
TEST_CASE_TEMPLATE("chunkwise device: a sequence run as chained calls == the reference run whole", T, float,
                   __nv_bfloat16) {
  // truncated BPTT with carried states: each call starts from the final (C, n, m) of the one
  // before and takes the next one's (dC, dn, dm)_init as its upstream; the calls' pieces put
  // side by side are checked against the recurrent reference of the whole sequence
  const auto seed = moxe::test::fresh_seed();
  INFO("seed " << seed);
  moxe::test::Rng rng(seed);
  struct Split {
    Case cs;
    std::vector<int64_t> lengths;
  };
  const Split splits[] = {
      {shaped(1, 2, 7, 16, 16, 16, true), {3, 4}},
      {shaped(2, 1, 40, 16, 32, 16, false), {17, 1, 22}},  // calls across and inside chunks
  };
  for (const Split& sp : splits) {
    Case cs = sp.cs;
    cs.upstream = true;
    // each call rounds its own outputs and hands the next its states (forward) or its
    // initial-state gradients (backward): the chain's bound is the sum of the calls' bounds
    // (bf16 fast: dm_init 3.3e-2 over two calls, seed 4186500370260727191; a call alone 3e-2)
    cs.tol_scale = static_cast<double>(sp.lengths.size());
    INFO("B=" << cs.batch << " NH=" << cs.heads << " S=" << cs.seq_len << " calls=" << sp.lengths.size()
              << " init=" << cs.init_states);
    const Inputs in = make_inputs<T>(cs, rng);
    const Reference ref = reference<T>(in);
    const int64_t slots = in.slots, S = cs.seq_len;
    auto steps_of = [&](const std::vector<double>& x, int64_t width, int64_t t0, int64_t len) {
      std::vector<double> out;
      for (int64_t s = 0; s < slots; ++s)
        out.insert(out.end(), x.begin() + (s * S + t0) * width, x.begin() + (s * S + t0 + len) * width);
      return out;
    };
    auto place = [&](std::vector<double>& x, const std::vector<double>& part, int64_t width, int64_t t0, int64_t len) {
      for (int64_t s = 0; s < slots; ++s)
        std::copy(part.begin() + s * len * width, part.begin() + (s + 1) * len * width,
                  x.begin() + (s * S + t0) * width);
    };
    // the calls' inputs, and their forward in order (the backward of a call needs its
    // successor's initial-state gradients, so every call runs again below)
    std::vector<Inputs> parts;
    std::vector<Results> fwd;
    int64_t t0 = 0;
    for (int64_t len : sp.lengths) {
      Inputs p = in;
      p.cs.seq_len = len;
      p.rows = slots * len;
      p.q = steps_of(in.q, cs.dqk, t0, len);
      p.k = steps_of(in.k, cs.dqk, t0, len);
      p.v = steps_of(in.v, cs.dv, t0, len);
      p.ig = steps_of(in.ig, 1, t0, len);
      p.fg = steps_of(in.fg, 1, t0, len);
      p.dh = steps_of(in.dh, cs.dv, t0, len);
      if (!fwd.empty()) {
        p.cs.init_states = true;
        p.c0 = fwd.back().c, p.n0 = fwd.back().n, p.m0 = fwd.back().m;
      }
      Device<T> dev(p);
      fwd.push_back(dev.run());
      parts.push_back(p);
      t0 += len;
    }
    Results got = ref.exact;  // every field overwritten below
    got.c = fwd.back().c, got.n = fwd.back().n, got.m = fwd.back().m;
    for (std::size_t k = parts.size(); k-- > 0;) {
      Inputs& p = parts[k];
      int64_t tk = 0;
      for (std::size_t j = 0; j < k; ++j) tk += sp.lengths[j];
      const int64_t len = sp.lengths[k];
      Results g = fwd[k];
      if (k + 1 < parts.size()) {  // upstream: the next call's initial-state gradients
        p.dcl = got.dc0, p.dnl = got.dn0, p.dml = got.dm0;
        Device<T> dev(p);
        g = dev.run();
      }
      place(got.h, g.h, cs.dv, tk, len);
      place(got.dq, g.dq, cs.dqk, tk, len);
      place(got.dk, g.dk, cs.dqk, tk, len);
      place(got.dv, g.dv, cs.dv, tk, len);
      place(got.di, g.di, 1, tk, len);
      place(got.df, g.df, 1, tk, len);
      got.dc0 = g.dc0, got.dn0 = g.dn0, got.dm0 = g.dm0;
    }
    check_against_reference<T>(got, ref, cs);
  }
}

TEST_CASE("chunkwise device: many segments (the device chunk table near its bound)") {
  const auto seed = moxe::test::fresh_seed();
  INFO("seed " << seed);
  moxe::test::Rng rng(seed);
  Case cs = shaped(1, 2, 0, 16, 32, 16, true);  // seq_len: the segments' total, below
  // lengths cycle through 17 (two chunks), 1, 0 and 32: S = 750, 60 segments, 75 chunks in
  // a table bounded by ceil(S / 16) + 60 = 107, against 47 chunks without segments (small:
  // 3 cycles, S = 150, 12 segments, 15 chunks of a bound of 22: the same proportions)
  cs.offsets = {0};
  const int cycles = moxe::test::size(15, 3);
  for (int r = 0; r < cycles; ++r)
    for (int64_t len : {17, 1, 0, 32}) cs.offsets.push_back(cs.offsets.back() + len);
  cs.seq_len = cs.offsets.back();
  run_case<float>(cs, rng);
}

TEST_CASE_TEMPLATE("chunkwise device: the per-element fallback == reference", T, float, __nv_bfloat16) {
  const auto seed = moxe::test::fresh_seed();
  INFO("seed " << seed);
  moxe::test::Rng rng(seed);
  const Case cs = shaped(1, 2, moxe::test::size(45, 20), 32, 16, 16, true);  // 3 chunks; small: 2
  const Inputs in = make_inputs<T>(cs, rng);
  const Reference ref = reference<T>(in);
  Device<T> dev(in);
  check_against_reference<T>(dev.template run_variant<false>(), ref, cs);
  check_against_reference<T>(dev.template run_variant<true>(), ref, cs);
}

TEST_CASE("chunkwise device: misaligned workspace, determinism") {
  const auto seed = moxe::test::fresh_seed();
  INFO("seed " << seed);
  moxe::test::Rng rng(seed);
  const Case cs = moxe::test::small_sizes() ? shaped(2, 2, 20, 32, 16, 16, true) : shaped(2, 2, 50, 32, 32, 16, true);
  const Inputs in = make_inputs<__nv_bfloat16>(cs, rng);
  const Reference ref = reference<__nv_bfloat16>(in);
  Device<__nv_bfloat16> dev(in);
  const Results a = dev.run(/*misaligned=*/true);
  check_against_reference<__nv_bfloat16>(a, ref, cs);
  const Results b = dev.run(/*misaligned=*/false);
  // bitwise equal run to run
  for (auto field : kWrittenFields) CHECK(a.*field == b.*field);
}

TEST_CASE("chunkwise device: batch_per_pass gives the same bits in passes") {
  moxe::test::Rng rng(moxe::test::fresh_seed());
  // small: 3 entries, so that passes of 2 end with a shorter one (as 5 in passes of 2)
  const Case cs = moxe::test::small_sizes() ? shaped(3, 1, 20, 16, 32, 16, true) : shaped(5, 2, 45, 32, 48, 16, true);
  const Inputs in = make_inputs<__nv_bfloat16>(cs, rng);
  Device<__nv_bfloat16> dev(in);
  const Results whole = dev.run();
  for (int64_t per_pass : {2, 1}) {
    CAPTURE(per_pass);
    dev.batch_per_pass = per_pass;
    const Results passes = dev.run(/*misaligned=*/true);
    for (auto field : kWrittenFields) CHECK(passes.*field == whole.*field);
  }
}

TEST_CASE("chunkwise device: graph capture replays the same results") {
  moxe::test::Rng rng(moxe::test::fresh_seed());
  const Case cs = moxe::test::small_sizes() ? shaped(1, 1, 20, 16, 16, 16, false) : shaped(1, 2, 40, 16, 32, 32, false);
  const Inputs in = make_inputs<float>(cs, rng);
  Device<float> dev(in);
  const Results direct = dev.run();
  dev.poison();
  const auto fp = dev.forward_params();
  const auto bp = dev.backward_params();
  DeviceBuffer<unsigned char> fws(mm::chunkwise_forward_workspace_size(fp));
  DeviceBuffer<unsigned char> bws(mm::chunkwise_backward_workspace_size(bp));
  cudaStream_t stream;
  MOXE_TEST_CUDA(cudaStreamCreate(&stream));
  cudaGraph_t graph;
  MOXE_TEST_CUDA(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
  const Status fs = mm::chunkwise_forward(fp, fws.get(), fws.size(), stream);
  const Status bs = mm::chunkwise_backward(bp, bws.get(), bws.size(), stream);
  MOXE_TEST_CUDA(cudaStreamEndCapture(stream, &graph));
  REQUIRE(fs == Status::ok);
  REQUIRE(bs == Status::ok);
  cudaGraphExec_t exec;
  MOXE_TEST_CUDA(cudaGraphInstantiate(&exec, graph, 0));
  MOXE_TEST_CUDA(cudaGraphLaunch(exec, stream));
  MOXE_TEST_CUDA(cudaStreamSynchronize(stream));
  const Results replay = dev.download();
  CHECK(replay.h == direct.h);
  CHECK(replay.c == direct.c);
  CHECK(replay.dq == direct.dq);
  CHECK(replay.df == direct.df);
  MOXE_TEST_CUDA(cudaGraphExecDestroy(exec));
  MOXE_TEST_CUDA(cudaGraphDestroy(graph));
  MOXE_TEST_CUDA(cudaStreamDestroy(stream));
}

TEST_CASE("chunkwise device: bad input returns a status, launches nothing, writes nothing") {
  moxe::test::Rng rng(7);
  const Case cs = shaped(1, 2, 7, 16, 16, 16, true);
  const Inputs in = make_inputs<float>(cs, rng);
  Device<float> dev(in);
  dev.poison();
  const auto fp = dev.forward_params();
  const auto bp = dev.backward_params();
  const std::size_t fbytes = mm::chunkwise_forward_workspace_size(fp);
  const std::size_t bbytes = mm::chunkwise_backward_workspace_size(bp);
  REQUIRE(fbytes > 0);
  DeviceBuffer<unsigned char> ws(std::max(fbytes, bbytes));
  auto fwd = [&](const mm::ForwardParams<float, float>& p) {
    return mm::chunkwise_forward(p, ws.get(), fbytes, nullptr);
  };
  auto bwd = [&](const mm::BackwardParams<float, float>& p) {
    return mm::chunkwise_backward(p, ws.get(), bbytes, nullptr);
  };

  auto p = fp;
  p.q = nullptr;
  CHECK(fwd(p) == Status::invalid_argument);
  p = fp;
  p.h = nullptr;
  CHECK(fwd(p) == Status::invalid_argument);
  for (int chunk : {0, 8, 24, 144}) {
    p = fp;
    p.chunk_size = chunk;
    CHECK(fwd(p) == Status::invalid_argument);
  }
  p = fp;
  p.dims.seq_len = 0;
  CHECK(fwd(p) == Status::invalid_argument);
  p = fp;
  p.n_init = nullptr;  // partial initial states
  CHECK(fwd(p) == Status::invalid_argument);
  p = fp;
  p.dims.dqk = 24;
  CHECK(fwd(p) == Status::unsupported);
  p = fp;
  p.dims.dv = 272;
  CHECK(fwd(p) == Status::unsupported);
  p = fp;
  p.num_segments = 2;  // no offsets
  CHECK(fwd(p) == Status::invalid_argument);
  for (float eps : {0.f, std::nanf("")}) {  // eps = 0: 0 / 0 where n.q = 0 and exp(-m) underflows
    p = fp;
    p.eps = eps;
    CHECK(fwd(p) == Status::invalid_argument);
  }
  CHECK(mm::chunkwise_forward(fp, ws.get(), fbytes - 1, nullptr) == Status::workspace_too_small);
  CHECK(mm::chunkwise_forward(fp, nullptr, 0, nullptr) == Status::workspace_too_small);

  auto b = bp;
  b.dq = nullptr;
  CHECK(bwd(b) == Status::invalid_argument);
  b = bp;
  b.dh = nullptr;
  CHECK(bwd(b) == Status::invalid_argument);
  b = bp;
  b.dn_last = nullptr;
  CHECK(bwd(b) == Status::invalid_argument);
  b = bp;
  b.fwd.chunk_size = 200;
  CHECK(bwd(b) == Status::invalid_argument);
  b = bp;
  b.fwd.eps = 0.f;
  CHECK(bwd(b) == Status::invalid_argument);
  b = bp;
  b.fwd.dims.dv = 20;
  CHECK(bwd(b) == Status::unsupported);
  CHECK(mm::chunkwise_backward(bp, ws.get(), bbytes - 1, nullptr) == Status::workspace_too_small);

  MOXE_TEST_CUDA(cudaDeviceSynchronize());
  const Results r = dev.download();
  for (auto field : kWrittenFields)
    for (double x : r.*field) CHECK(std::isnan(x));
}
