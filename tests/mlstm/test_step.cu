// Device tests of moxe::mlstm::step: against reference::step in double (inputs rounded
// through T), over several consecutive steps, at extreme gates and states, poisoned outputs,
// determinism, graph capture, and input validation. Small-size mode (MOXE_TEST_SMALL) keeps
// every head-dim layout at fewer slots.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "device_utils.cuh"
#include "mlstm_testing.hpp"
#include "moxe/mlstm/reference.hpp"
#include "moxe/mlstm/step.cuh"
#include "test_utils.hpp"

namespace mlstm = moxe::mlstm;
using moxe::Status;
using moxe::test::DeviceBuffer;
using moxe::test::dot_rounding_bound;
using moxe::test::StepInputs;
using moxe::test::step_params;
using Shape = moxe::test::StepShape;

namespace {

/// One step's inputs, already rounded through T.
template <class T>
StepInputs make_inputs(moxe::test::Rng& rng, const Shape& s) {
  StepInputs in;
  in.q = moxe::test::round_through<T>(moxe::test::uniform_vector<double>(rng, s.slots() * s.dqk));
  in.k = moxe::test::round_through<T>(moxe::test::uniform_vector<double>(rng, s.slots() * s.dqk));
  in.v = moxe::test::round_through<T>(moxe::test::uniform_vector<double>(rng, s.slots() * s.dv));
  in.igate = moxe::test::round_through<T>(moxe::test::uniform_vector<double>(rng, s.slots(), -3, 3));
  in.fgate = moxe::test::round_through<T>(moxe::test::uniform_vector<double>(rng, s.slots(), -3, 5));
  return in;
}

/// Device buffers of one step's inputs and output.
template <class T>
struct DeviceStep {
  DeviceBuffer<T> q, k, v, igate, fgate, h;
  DeviceStep(const StepInputs& in, const Shape& s)
      : q(moxe::test::convert_to<T>(in.q)),
        k(moxe::test::convert_to<T>(in.k)),
        v(moxe::test::convert_to<T>(in.v)),
        igate(moxe::test::convert_to<T>(in.igate)),
        fgate(moxe::test::convert_to<T>(in.fgate)),
        h(s.slots() * s.dv) {}
};

std::vector<float> to_float_vector(const std::vector<double>& v) { return std::vector<float>(v.begin(), v.end()); }

template <class T>
double h_tolerance() {
  return std::is_same_v<T, float> ? 2e-5 : 1e-2;
}

/// Per element of h, what a float evaluation cannot avoid (docs/mlstm.md, "Tests"), to first
/// order: h = num / den, den = max(|n . qs|, exp(-m)) + eps, where the device forms n . qs and
/// num = C^T qs from its own float states (got_c, got_n, moved to the reference's m) as float
/// sums (dot_rounding_bound), and its m, off by dm, moves h by eps dm / den.
std::vector<double> h_allowance(const Shape& s, const StepInputs& in, const std::vector<double>& c,
                                const std::vector<double>& n, const std::vector<double>& m,
                                const std::vector<double>& got_c, const std::vector<double>& got_n,
                                const std::vector<double>& got_m, const std::vector<double>& h, double eps) {
  const double scale = 1.0 / std::sqrt(double(s.dqk));
  std::vector<double> allow(h.size(), 0.0);
  for (int64_t slot = 0; slot < s.slots(); ++slot) {
    if (std::isinf(m[slot])) continue;  // no source: the zero state, h = 0 exactly
    double nq = 0, dnq = 0;
    for (int64_t a = 0; a < s.dqk; ++a) {
      const double qs = in.q[slot * s.dqk + a] * scale, na = n[slot * s.dqk + a];
      nq += na * qs;
      dnq += std::abs(qs) * (std::abs(got_n[slot * s.dqk + a] - na) + dot_rounding_bound(s.dqk, std::abs(na)));
    }
    const double den = std::max(std::abs(nq), std::exp(-m[slot])) + eps;
    const double dm = std::abs(got_m[slot] - m[slot]);
    for (int64_t e = 0; e < s.dv; ++e) {
      double dnum = 0;
      for (int64_t a = 0; a < s.dqk; ++a) {
        const int64_t i = (slot * s.dqk + a) * s.dv + e;
        const double qs = in.q[slot * s.dqk + a] * scale;
        dnum += std::abs(qs) * (std::abs(got_c[i] - c[i]) + dot_rounding_bound(s.dqk, std::abs(c[i])));
      }
      const double he = std::abs(h[slot * s.dv + e]);
      allow[slot * s.dv + e] = (dnum + he * (dnq + eps * dm)) / den;
    }
  }
  return allow;
}

}  // namespace

TEST_CASE_TEMPLATE("mlstm step matches the reference over consecutive steps", T, float, __half, __nv_bfloat16) {
  const auto seed = moxe::test::fresh_seed();
  INFO("seed " << seed);
  moxe::test::Rng rng(seed);
  // small: every layout of the kernel's threads over C (DV = 16: 16 row groups; 48 and 112:
  // idle threads past the last group; 256: one group) and both row loops (4 rows in flight
  // and the rest), the largest head dims, fewer slots
  const auto shapes =
      moxe::test::sizes<Shape>({{1, 1, 16, 16}, {3, 5, 128, 256}, {2, 3, 64, 48}, {7, 1, 256, 256}, {5, 3, 32, 112}},
                               {{1, 1, 16, 16}, {1, 2, 128, 256}, {2, 3, 64, 48}, {1, 1, 256, 256}, {2, 1, 32, 112}});
  for (const Shape& s : shapes) {
    CAPTURE(s.batch);
    CAPTURE(s.heads);
    CAPTURE(s.dqk);
    CAPTURE(s.dv);
    // states: random, m in [-1, 1] (the normaliser stays away from 0)
    std::vector<double> c = moxe::test::uniform_vector<double>(rng, s.slots() * s.dqk * s.dv);
    std::vector<double> n = moxe::test::uniform_vector<double>(rng, s.slots() * s.dqk);
    std::vector<double> m = moxe::test::uniform_vector<double>(rng, s.slots());
    c = moxe::test::to_double(to_float_vector(c));  // the device starts from the same floats
    n = moxe::test::to_double(to_float_vector(n));
    m = moxe::test::to_double(to_float_vector(m));
    DeviceBuffer<float> dc(to_float_vector(c)), dn(to_float_vector(n)), dm(to_float_vector(m));

    cudaStream_t stream;
    MOXE_TEST_CUDA(cudaStreamCreate(&stream));
    for (int t = 0; t < 4; ++t) {
      CAPTURE(t);
      const StepInputs in = make_inputs<T>(rng, s);
      DeviceStep<T> dev(in, s);
      dev.h.poison();

      mlstm::StepParams<T> p = step_params(s, dev, dc.get(), dn.get(), dm.get(), dev.h.get());
      p.qk_scale = t == 2 ? 0.3f : 0.f;
      CHECK(mlstm::step_workspace_size(p) == 0);
      REQUIRE(mlstm::step(p, nullptr, 0, stream) == Status::ok);
      MOXE_TEST_CUDA(cudaStreamSynchronize(stream));

      std::vector<double> h(s.slots() * s.dv);
      mlstm::StepParams<double, double> r = step_params(s, in, c.data(), n.data(), m.data(), h.data());
      r.qk_scale = t == 2 ? 0.3 : 0.0;
      REQUIRE(mlstm::reference::step(r) == Status::ok);

      CHECK(moxe::test::rel_error(moxe::test::convert_to_double(dev.h.download()), h) < h_tolerance<T>());
      CHECK(moxe::test::rel_error(dc.download(), c) < 1e-5);
      CHECK(moxe::test::rel_error(dn.download(), n) < 1e-5);
      CHECK(moxe::test::log_rel_error(dm.download(), m) < 1e-6);  // (a single m near 0: absolute)
    }
    MOXE_TEST_CUDA(cudaStreamDestroy(stream));
  }
}

TEST_CASE_TEMPLATE("mlstm step at extreme gates and states matches the reference", T, float, __nv_bfloat16) {
  // states with exp(-m) beyond float's range (m ~ -100), ordinary, and below it (m ~ 100);
  // gates with resets, absent inputs, no decay, igate ~ 100 and no source at all
  // (moxe::test::apply_extreme_rows), the pattern moved by a slot every step
  const auto seed = moxe::test::fresh_seed();
  INFO("seed " << seed);
  moxe::test::Rng rng(seed);
  const Shape s{2, 7, 16, 32};
  constexpr double kMUlp = 0x1p-17;  // float's ulp in [64, 128)
  std::vector<double> c = moxe::test::uniform_vector<double>(rng, s.slots() * s.dqk * s.dv);
  std::vector<double> n = moxe::test::uniform_vector<double>(rng, s.slots() * s.dqk);
  std::vector<double> m(s.slots());
  for (int64_t slot = 0; slot < s.slots(); ++slot) {
    const double centre = slot % 3 == 0 ? -100.0 : slot % 3 == 1 ? 0.0 : 100.0;
    m[slot] = rng.uniform(centre - 1.0, centre + 1.0);
  }
  c = moxe::test::to_double(to_float_vector(c));
  n = moxe::test::to_double(to_float_vector(n));
  m = moxe::test::to_double(to_float_vector(m));
  DeviceBuffer<float> dc(to_float_vector(c)), dn(to_float_vector(n)), dm(to_float_vector(m));
  for (int t = 0; t < 4; ++t) {
    CAPTURE(t);
    StepInputs in = make_inputs<T>(rng, s);
    moxe::test::apply_extreme_rows(rng, in.igate, in.fgate);
    std::rotate(in.igate.begin(), in.igate.begin() + t, in.igate.end());
    std::rotate(in.fgate.begin(), in.fgate.begin() + t, in.fgate.end());
    in.igate = moxe::test::round_through<T>(in.igate);
    in.fgate = moxe::test::round_through<T>(in.fgate);
    DeviceStep<T> dev(in, s);
    dev.h.poison();
    const mlstm::StepParams<T> p = step_params(s, dev, dc.get(), dn.get(), dm.get(), dev.h.get());
    REQUIRE(mlstm::step(p, nullptr, 0, nullptr) == Status::ok);
    std::vector<double> h(s.slots() * s.dv);
    REQUIRE(mlstm::reference::step(step_params(s, in, c.data(), n.data(), m.data(), h.data())) == Status::ok);

    const auto got_h = moxe::test::convert_to_double(dev.h.download());
    CHECK(moxe::test::all_finite(got_h));
    // the states against the reference's as the memories they stand for, C exp(m): the
    // float m rounds by ~4e-6 at |m| ~ 100, a shift common to C and n
    auto got_c = moxe::test::to_double(dc.download()), got_n = moxe::test::to_double(dn.download());
    const auto got_m = moxe::test::to_double(dm.download());
    for (int64_t slot = 0; slot < s.slots(); ++slot) {
      CAPTURE(slot);
      if (std::isinf(m[slot])) {
        CHECK(got_m[slot] == m[slot]);
        continue;
      }
      // m is float: each step may round it by half an ulp of an |m| < 256 in its history
      CHECK(std::abs(got_m[slot] - m[slot]) <= (t + 1) * kMUlp);
      const double shift = std::exp(got_m[slot] - m[slot]);
      for (int64_t i = 0; i < s.dqk * s.dv; ++i) got_c[slot * s.dqk * s.dv + i] *= shift;
      for (int64_t i = 0; i < s.dqk; ++i) got_n[slot * s.dqk + i] *= shift;
    }
    CHECK(moxe::test::rel_error(got_c, c) < 1e-5);
    CHECK(moxe::test::rel_error(got_n, n) < 1e-5);
    // h within T's tolerance plus what float evaluation cannot avoid (h_allowance)
    const auto allow = h_allowance(s, in, c, n, m, got_c, got_n, got_m, h, double(p.eps));
    CHECK(moxe::test::error_norm(got_h, h) <= h_tolerance<T>() * moxe::test::l2_norm(h) + moxe::test::l2_norm(allow));
  }
}

TEST_CASE("mlstm step is deterministic and can be captured in a graph") {
  const auto seed = moxe::test::fresh_seed();
  INFO("seed " << seed);
  moxe::test::Rng rng(seed);
  const Shape s{3, 4, 64, 96};
  const StepInputs in = make_inputs<__nv_bfloat16>(rng, s);
  const auto c0 = to_float_vector(moxe::test::uniform_vector<double>(rng, s.slots() * s.dqk * s.dv));
  const auto n0 = to_float_vector(moxe::test::uniform_vector<double>(rng, s.slots() * s.dqk));
  const auto m0 = to_float_vector(moxe::test::uniform_vector<double>(rng, s.slots()));

  cudaStream_t stream;
  MOXE_TEST_CUDA(cudaStreamCreate(&stream));
  DeviceStep<__nv_bfloat16> dev(in, s);
  auto run = [&](bool capture) {
    DeviceBuffer<float> dc(c0), dn(n0), dm(m0);
    dev.h.poison();
    const mlstm::StepParams<__nv_bfloat16> p = step_params(s, dev, dc.get(), dn.get(), dm.get(), dev.h.get());
    if (capture) {
      cudaGraph_t graph;
      cudaGraphExec_t exec;
      MOXE_TEST_CUDA(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
      const Status st = mlstm::step(p, nullptr, 0, stream);
      MOXE_TEST_CUDA(cudaStreamEndCapture(stream, &graph));
      REQUIRE(st == Status::ok);
      MOXE_TEST_CUDA(cudaGraphInstantiate(&exec, graph, 0));
      MOXE_TEST_CUDA(cudaGraphLaunch(exec, stream));
      MOXE_TEST_CUDA(cudaStreamSynchronize(stream));
      MOXE_TEST_CUDA(cudaGraphExecDestroy(exec));
      MOXE_TEST_CUDA(cudaGraphDestroy(graph));
    } else {
      REQUIRE(mlstm::step(p, nullptr, 0, stream) == Status::ok);
      MOXE_TEST_CUDA(cudaStreamSynchronize(stream));
    }
    std::vector<double> out = moxe::test::convert_to_double(dev.h.download());
    for (float x : dc.download()) out.push_back(x);
    for (float x : dn.download()) out.push_back(x);
    for (float x : dm.download()) out.push_back(x);
    return out;
  };
  const auto first = run(false);
  const auto second = run(false);
  const auto graphed = run(true);
  CHECK(moxe::test::all_finite(first));
  CHECK(first == second);  // bitwise
  CHECK(first == graphed);
  MOXE_TEST_CUDA(cudaStreamDestroy(stream));
}

TEST_CASE("mlstm step rejects bad input and launches nothing") {
  moxe::test::Rng rng(moxe::test::fresh_seed());
  const Shape s{2, 2, 32, 32};
  const StepInputs in = make_inputs<float>(rng, s);
  DeviceStep<float> dev(in, s);
  const auto c0 = to_float_vector(moxe::test::uniform_vector<double>(rng, s.slots() * s.dqk * s.dv));
  DeviceBuffer<float> dc(c0), dn(s.slots() * s.dqk), dm(s.slots());
  dn.fill_bytes(0);
  dm.fill_bytes(0);
  dev.h.poison();
  const mlstm::StepParams<float> p = step_params(s, dev, dc.get(), dn.get(), dm.get(), dev.h.get());

  auto expect = [&](Status want, auto mutate) {
    auto bad = p;
    mutate(bad);
    CHECK(mlstm::step(bad, nullptr, 0, nullptr) == want);
  };
  using P = mlstm::StepParams<float>;
  expect(Status::invalid_argument, [](P& b) { b.q = nullptr; });
  expect(Status::invalid_argument, [](P& b) { b.c = nullptr; });
  expect(Status::invalid_argument, [](P& b) { b.m = nullptr; });
  expect(Status::invalid_argument, [](P& b) { b.h = nullptr; });
  expect(Status::invalid_argument, [](P& b) { b.batch = 0; });
  expect(Status::invalid_argument, [](P& b) { b.heads = -1; });
  expect(Status::invalid_argument, [](P& b) { b.eps = -1.f; });
  expect(Status::invalid_argument, [](P& b) { b.eps = 0.f; });
  expect(Status::invalid_argument, [](P& b) { b.eps = std::nanf(""); });
  expect(Status::unsupported, [](P& b) { b.dqk = 24; });
  expect(Status::unsupported, [](P& b) { b.dv = 8; });
  expect(Status::unsupported, [](P& b) { b.dqk = 272; });
  expect(Status::unsupported, [](P& b) { b.dv = 512; });
  MOXE_TEST_CUDA(cudaDeviceSynchronize());
  const auto h = dev.h.download();
  for (float x : h) CHECK(std::isnan(x));
  CHECK(dc.download() == c0);
  for (float x : dm.download()) CHECK(x == 0.f);
}
