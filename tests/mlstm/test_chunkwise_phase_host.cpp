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

#include "chunkwise_host_cases.hpp"
#include "mlstm_testing.hpp"
#include "moxe/mlstm/chunkwise_phase_host.hpp"
#include "moxe/mlstm/reference.hpp"
#include "test_utils.hpp"

namespace mm = moxe::mlstm;
using moxe::Status;
using moxe::test::rel_error;

namespace {

using namespace moxe::test::chunkwise_host_cases;

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
  CHECK(moxe::test::log_rel_error(got.m, ref.m) < 1e-6);
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
