// Device tests of moxe::slstm: sequence_forward, sequence_backward and step against the
// host reference (double, on the inputs rounded through T), with fresh random inputs,
// poisoned outputs, misaligned workspaces, bitwise determinism, graph capture, bad input.
#include <doctest/doctest.h>

#include <cstring>
#include <vector>

#include "device_utils.cuh"
#include "moxe/slstm/reference.hpp"
#include "moxe/slstm/sequence.cuh"
#include "moxe/slstm/step.cuh"
#include "slstm_testing.hpp"
#include "test_utils.hpp"

namespace {

namespace sl = moxe::slstm;
using moxe::Status;
using moxe::test::DeviceBuffer;
using moxe::test::backward_params;
using moxe::test::forward_params;
using moxe::test::step_params;

template <class T>
struct Tolerance;
template <>
struct Tolerance<float> {
  static constexpr double fwd = 2e-5, bwd = 2e-4;
};
template <>
struct Tolerance<__nv_bfloat16> {
  static constexpr double fwd = 2e-2, bwd = 5e-2;
};
template <>
struct Tolerance<__half> {
  static constexpr double fwd = 5e-3, bwd = 2e-2;
};

/// One problem: inputs rounded through T (double copies for the reference) and uploaded.
template <class T>
struct Problem {
  sl::Dims d;
  bool init;
  std::vector<double> wx, r, bias, y0, c0, n0, m0, dy, dy_last, dc_last, dn_last;
  DeviceBuffer<T> d_wx, d_r, d_bias, d_dy;
  DeviceBuffer<float> d_y0, d_c0, d_n0, d_m0, d_dy_last, d_dc_last, d_dn_last;

  int64_t units() const { return d.batch * d.heads * d.head_dim; }

  Problem(moxe::test::Rng& rng, sl::Dims dims, bool with_init, double wx_scale = 1.0) : d(dims), init(with_init) {
    const int64_t H = d.heads * d.head_dim, U = units();
    const double r_scale = 1.0 / std::sqrt(static_cast<double>(d.head_dim));
    wx = moxe::test::round_through<T>(moxe::test::uniform_vector<double>(rng, d.seq_len * d.batch * 4 * H, -wx_scale, wx_scale));
    r = moxe::test::round_through<T>(moxe::test::uniform_vector<double>(rng, d.heads * 4 * d.head_dim * d.head_dim, -r_scale, r_scale));
    bias = moxe::test::round_through<T>(moxe::test::uniform_vector<double>(rng, 4 * H, -0.5, 0.5));
    dy = moxe::test::round_through<T>(moxe::test::uniform_vector<double>(rng, d.seq_len * U));
    auto f32 = [](std::vector<double> v) {
      for (double& x : v) x = static_cast<float>(x);
      return v;
    };
    y0 = f32(moxe::test::uniform_vector<double>(rng, U));
    c0 = f32(moxe::test::uniform_vector<double>(rng, U));
    n0 = f32(moxe::test::uniform_vector<double>(rng, U, 0.5, 2.0));
    m0 = f32(moxe::test::uniform_vector<double>(rng, U));
    dy_last = f32(moxe::test::uniform_vector<double>(rng, U));
    dc_last = f32(moxe::test::uniform_vector<double>(rng, U));
    dn_last = f32(moxe::test::uniform_vector<double>(rng, U));
    d_wx = DeviceBuffer<T>(moxe::test::convert_to<T>(wx));
    d_r = DeviceBuffer<T>(moxe::test::convert_to<T>(r));
    d_bias = DeviceBuffer<T>(moxe::test::convert_to<T>(bias));
    d_dy = DeviceBuffer<T>(moxe::test::convert_to<T>(dy));
    d_y0 = DeviceBuffer<float>(moxe::test::convert_to<float>(y0));
    d_c0 = DeviceBuffer<float>(moxe::test::convert_to<float>(c0));
    d_n0 = DeviceBuffer<float>(moxe::test::convert_to<float>(n0));
    d_m0 = DeviceBuffer<float>(moxe::test::convert_to<float>(m0));
    d_dy_last = DeviceBuffer<float>(moxe::test::convert_to<float>(dy_last));
    d_dc_last = DeviceBuffer<float>(moxe::test::convert_to<float>(dc_last));
    d_dn_last = DeviceBuffer<float>(moxe::test::convert_to<float>(dn_last));
  }

  /// The inputs on the device (T, states in float).
  moxe::test::SequenceInputs<T, float> device() const {
    const float* none = nullptr;
    return {d,
            d_wx.get(), d_r.get(), d_bias.get(),
            init ? d_y0.get() : none, init ? d_c0.get() : none, init ? d_n0.get() : none, init ? d_m0.get() : none,
            d_dy.get(), d_dy_last.get(), d_dc_last.get(), d_dn_last.get()};
  }

  /// The same inputs on the host, in double: what the reference runs on.
  moxe::test::SequenceInputs<double, double> host() const {
    const double* none = nullptr;
    return {d,
            wx.data(), r.data(), bias.data(),
            init ? y0.data() : none, init ? c0.data() : none, init ? n0.data() : none, init ? m0.data() : none,
            dy.data(), dy_last.data(), dc_last.data(), dn_last.data()};
  }
};

/// The reference forward of `pb` in double: y and the final states.
struct ReferenceForward {
  std::vector<double> y, yl, cl, nl, ml;
};

template <class T>
ReferenceForward reference_forward(const Problem<T>& pb) {
  const int64_t U = pb.units();
  ReferenceForward r{std::vector<double>(pb.d.seq_len * U), std::vector<double>(U), std::vector<double>(U),
                     std::vector<double>(U), std::vector<double>(U)};
  REQUIRE(sl::reference::forward(forward_params(pb.host(), r.y.data(), r.yl.data(), r.cl.data(), r.nl.data(),
                                                r.ml.data())) == Status::ok);
  return r;
}

/// Device copies (float) of the initial states of `pb`, for decoding steps.
struct DeviceStates {
  DeviceBuffer<float> y, c, n, m;
  template <class T>
  explicit DeviceStates(const Problem<T>& pb)
      : y(moxe::test::convert_to<float>(pb.y0)),
        c(moxe::test::convert_to<float>(pb.c0)),
        n(moxe::test::convert_to<float>(pb.n0)),
        m(moxe::test::convert_to<float>(pb.m0)) {}
};

template <class T>
void check_forward(const Problem<T>& pb, int units_per_block = 0) {
  const int64_t U = pb.units();
  const ReferenceForward ref = reference_forward(pb);

  DeviceBuffer<T> d_y(ref.y.size());
  DeviceBuffer<float> d_yl(U), d_cl(U), d_nl(U), d_ml(U);
  for (auto* b : {&d_yl, &d_cl, &d_nl, &d_ml}) b->poison();
  d_y.poison();
  auto p = forward_params(pb.device(), d_y.get(), d_yl.get(), d_cl.get(), d_nl.get(), d_ml.get());
  p.units_per_block = units_per_block;
  const std::size_t bytes = sl::sequence_forward_workspace_size(p);
  moxe::test::MisalignedWorkspace ws(bytes);
  REQUIRE(sl::sequence_forward(p, ws.get(), ws.bytes(), nullptr) == Status::ok);
  MOXE_TEST_CUDA(cudaDeviceSynchronize());
  const double tol = Tolerance<T>::fwd;
  CHECK(moxe::test::rel_error(moxe::test::convert_to_double(d_y.download()), ref.y) < tol);
  CHECK(moxe::test::rel_error(d_yl.download(), ref.yl) < tol);
  CHECK(moxe::test::rel_error(d_cl.download(), ref.cl) < tol);
  CHECK(moxe::test::rel_error(d_nl.download(), ref.nl) < tol);
  CHECK(moxe::test::rel_error(d_ml.download(), ref.ml) < tol);
}

struct BackwardOut {
  std::vector<double> dwx, dr, dbias, dyi, dci, dni;
};

template <class T>
BackwardOut run_device_backward(const Problem<T>& pb, bool upstream, int units_per_block, std::size_t misalign = 1) {
  const int64_t U = pb.units();
  DeviceBuffer<T> dwx(pb.wx.size()), dr(pb.r.size()), dbias(pb.bias.size());
  DeviceBuffer<float> dyi(U), dci(U), dni(U);
  for (auto* b : {&dwx, &dr, &dbias}) b->poison();
  for (auto* b : {&dyi, &dci, &dni}) b->poison();
  // with no initial states dy_init, dc_init, dn_init are the gradients at the zero states
  sl::BackwardParams<T, float> p =
      backward_params(pb.device(), upstream, dwx.get(), dr.get(), dbias.get(), dyi.get(), dci.get(), dni.get());
  p.fwd.units_per_block = units_per_block;
  const std::size_t bytes = sl::sequence_backward_workspace_size(p);
  moxe::test::MisalignedWorkspace ws(bytes, misalign);
  REQUIRE(sl::sequence_backward(p, ws.get(), ws.bytes(), nullptr) == Status::ok);
  MOXE_TEST_CUDA(cudaDeviceSynchronize());
  BackwardOut o;
  o.dwx = moxe::test::convert_to_double(dwx.download());
  o.dr = moxe::test::convert_to_double(dr.download());
  o.dbias = moxe::test::convert_to_double(dbias.download());
  o.dyi = moxe::test::to_double(dyi.download());
  o.dci = moxe::test::to_double(dci.download());
  o.dni = moxe::test::to_double(dni.download());
  return o;
}

template <class T>
void check_backward(const Problem<T>& pb, bool upstream, int units_per_block = 0) {
  const int64_t U = pb.units();
  std::vector<double> dwx(pb.wx.size()), dr(pb.r.size()), dbias(pb.bias.size()), dyi(U), dci(U), dni(U);
  REQUIRE(sl::reference::backward(backward_params(pb.host(), upstream, dwx.data(), dr.data(), dbias.data(),
                                                 dyi.data(), dci.data(), dni.data())) == Status::ok);
  const BackwardOut o = run_device_backward(pb, upstream, units_per_block);
  const double tol = Tolerance<T>::bwd;
  CHECK(moxe::test::rel_error(o.dwx, dwx) < tol);
  CHECK(moxe::test::rel_error(o.dr, dr) < tol);
  CHECK(moxe::test::rel_error(o.dbias, dbias) < tol);
  CHECK(moxe::test::rel_error(o.dyi, dyi) < tol);
  CHECK(moxe::test::rel_error(o.dci, dci) < tol);
  CHECK(moxe::test::rel_error(o.dni, dni) < tol);
}

struct Shape {
  sl::Dims d;
  bool init;
  int units;  // 0: the launcher's choice
};

// S in {1, 7, 64, 300}; head_dim 16..256; batch not a multiple of the 16-row tile; forced
// multi-block (cooperative) groups via units. {3, 150, 4, 64} with U = 16: 40 groups of 4
// blocks, more than fit at once on an H100 (one block per SM, 132 SMs: 33 groups), so the
// launcher splits it into several cooperative launches.
const Shape kShapes[] = {
    {{1, 3, 2, 16}, true, 0},    {{7, 17, 3, 16}, false, 0},  {{64, 5, 2, 64}, true, 0},
    {{7, 2, 2, 64}, true, 16},   {{300, 17, 1, 32}, true, 0}, {{7, 3, 1, 128}, true, 0},
    {{7, 3, 2, 192}, false, 0},  {{7, 3, 2, 256}, true, 0},   {{64, 1, 1, 256}, true, 0},
    {{3, 150, 4, 64}, true, 16},
};

/// Runs check(problem, units) on a fresh problem of every shape in kShapes.
template <class T, class Check>
void for_each_shape(moxe::test::Rng& rng, Check check) {
  for (const Shape& s : kShapes) {
    CAPTURE(s.d.seq_len);
    CAPTURE(s.d.batch);
    CAPTURE(s.d.heads);
    CAPTURE(s.d.head_dim);
    CAPTURE(s.units);
    const Problem<T> pb(rng, s.d, s.init);
    check(pb, s.units);
  }
}

}  // namespace

TEST_CASE_TEMPLATE("slstm sequence_forward matches the reference", T, float, __nv_bfloat16, __half) {
  const auto seed = moxe::test::fresh_seed();
  INFO("seed " << seed);
  moxe::test::Rng rng(seed);
  for_each_shape<T>(rng, [](const Problem<T>& pb, int units) { check_forward(pb, units); });
  Problem<T> large(rng, sl::Dims{7, 3, 2, 32}, true, 10.0);  // large gate pre-activations
  check_forward(large);
}

TEST_CASE_TEMPLATE("slstm sequence_backward matches the reference", T, float, __nv_bfloat16, __half) {
  const auto seed = moxe::test::fresh_seed();
  INFO("seed " << seed);
  moxe::test::Rng rng(seed);
  for_each_shape<T>(rng, [](const Problem<T>& pb, int units) { check_backward(pb, /*upstream=*/true, units); });
  Problem<T> pb(rng, sl::Dims{7, 5, 2, 32}, true);
  check_backward(pb, /*upstream=*/false);
}

TEST_CASE_TEMPLATE("slstm backward is deterministic", T, float, __nv_bfloat16) {
  moxe::test::Rng rng(moxe::test::fresh_seed());
  Problem<T> pb(rng, sl::Dims{64, 19, 2, 64}, true);
  const BackwardOut a = run_device_backward(pb, true, 16, 1);
  const BackwardOut b = run_device_backward(pb, true, 16, 3);
  const BackwardOut c = run_device_backward(pb, true, 0, 1);  // the split over blocks changes no bit
  auto same = [](const std::vector<double>& x, const std::vector<double>& y) {
    return x.size() == y.size() && std::memcmp(x.data(), y.data(), x.size() * sizeof(double)) == 0;
  };
  CHECK(same(a.dwx, b.dwx));
  CHECK(same(a.dr, b.dr));
  CHECK(same(a.dbias, b.dbias));
  CHECK(same(a.dyi, b.dyi));
  CHECK(same(a.dwx, c.dwx));
  CHECK(same(a.dr, c.dr));
}

TEST_CASE_TEMPLATE("slstm step matches the sequence reference", T, float, __nv_bfloat16) {
  moxe::test::Rng rng(moxe::test::fresh_seed());
  for (int units : {0, 16}) {
    const sl::Dims d{5, 18, 2, 64};
    Problem<T> pb(rng, d, true);
    const ReferenceForward ref = reference_forward(pb);
    DeviceStates st(pb);
    DeviceBuffer<T> y_out(pb.units());
    std::vector<double> y_steps;
    for (int64_t t = 0; t < d.seq_len; ++t) {
      y_out.poison();
      sl::StepParams<T, float> s = step_params(pb.device(), t, st.y.get(), st.c.get(), st.n.get(), st.m.get(), y_out.get());
      s.units_per_block = units;
      CHECK(sl::step_workspace_size(s) == 0);
      REQUIRE(sl::step(s, nullptr, 0, nullptr) == Status::ok);
      const auto yt = moxe::test::convert_to_double(y_out.download());
      y_steps.insert(y_steps.end(), yt.begin(), yt.end());
    }
    const double tol = Tolerance<T>::fwd;
    CHECK(moxe::test::rel_error(y_steps, ref.y) < tol);
    CHECK(moxe::test::rel_error(st.y.download(), ref.yl) < tol);
    CHECK(moxe::test::rel_error(st.c.download(), ref.cl) < tol);
    CHECK(moxe::test::rel_error(st.n.download(), ref.nl) < tol);
    CHECK(moxe::test::rel_error(st.m.download(), ref.ml) < tol);
  }
}

TEST_CASE("slstm step in float with y_out == y (the output is the state)") {
  // With a head split over several blocks, every block reads the whole y state at t = 0
  // while the others write their units of y_out: the launcher must add a group barrier.
  moxe::test::Rng rng(moxe::test::fresh_seed());
  for (int units : {0, 16}) {
    CAPTURE(units);
    const sl::Dims d{6, 18, 2, 64};
    Problem<float> pb(rng, d, true);
    const ReferenceForward ref = reference_forward(pb);
    DeviceStates st(pb);
    std::vector<double> y_steps;
    for (int64_t t = 0; t < d.seq_len; ++t) {
      sl::StepParams<float, float> s = step_params(pb.device(), t, st.y.get(), st.c.get(), st.n.get(), st.m.get(), st.y.get());
      s.units_per_block = units;
      REQUIRE(sl::step(s, nullptr, 0, nullptr) == Status::ok);
      const auto yt = moxe::test::to_double(st.y.download());
      y_steps.insert(y_steps.end(), yt.begin(), yt.end());
    }
    CHECK(moxe::test::rel_error(y_steps, ref.y) < Tolerance<float>::fwd);
    CHECK(moxe::test::rel_error(st.c.download(), ref.cl) < Tolerance<float>::fwd);
    CHECK(moxe::test::rel_error(st.n.download(), ref.nl) < Tolerance<float>::fwd);
    CHECK(moxe::test::rel_error(st.m.download(), ref.ml) < Tolerance<float>::fwd);
  }
}

TEST_CASE("slstm forward under graph capture") {
  moxe::test::Rng rng(moxe::test::fresh_seed());
  for (int units : {0, 16}) {
    Problem<__nv_bfloat16> pb(rng, sl::Dims{7, 3, 2, 64}, true);
    const int64_t U = pb.units();
    DeviceBuffer<__nv_bfloat16> y_direct(7 * U), y_graph(7 * U);
    y_graph.poison();
    auto p = forward_params(pb.device(), y_direct.get(), nullptr, nullptr, nullptr, nullptr);
    p.units_per_block = units;
    REQUIRE(sl::sequence_forward(p, nullptr, 0, nullptr) == Status::ok);
    cudaStream_t stream;
    MOXE_TEST_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    cudaGraph_t graph;
    MOXE_TEST_CUDA(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
    p.y = y_graph.get();
    const Status st = sl::sequence_forward(p, nullptr, 0, stream);
    MOXE_TEST_CUDA(cudaStreamEndCapture(stream, &graph));
    REQUIRE(st == Status::ok);
    cudaGraphExec_t exec;
    MOXE_TEST_CUDA(cudaGraphInstantiate(&exec, graph, 0));
    MOXE_TEST_CUDA(cudaGraphLaunch(exec, stream));
    MOXE_TEST_CUDA(cudaStreamSynchronize(stream));
    const auto a = y_direct.download(), b = y_graph.download();
    CHECK(std::memcmp(a.data(), b.data(), a.size() * sizeof(__nv_bfloat16)) == 0);
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
    cudaStreamDestroy(stream);
  }
}

TEST_CASE("slstm device: bad input launches nothing and writes nothing") {
  moxe::test::Rng rng(moxe::test::fresh_seed());
  Problem<float> pb(rng, sl::Dims{3, 2, 2, 32}, true);
  const int64_t U = pb.units();
  DeviceBuffer<float> y(3 * U), yl(U), cl(U), nl(U), ml(U);
  for (auto* b : {&y, &yl, &cl, &nl, &ml}) b->poison();
  const auto good = forward_params(pb.device(), y.get(), yl.get(), cl.get(), nl.get(), ml.get());
  auto expect_forward = [&](Status want, auto mutate) {
    auto p = good;
    mutate(p);
    CHECK(sl::sequence_forward(p, nullptr, 0, nullptr) == want);
  };
  using FP = sl::ForwardParams<float, float>;
  expect_forward(Status::invalid_argument, [](FP& p) { p.wx = nullptr; });
  expect_forward(Status::invalid_argument, [](FP& p) { p.y = nullptr; });
  expect_forward(Status::invalid_argument, [](FP& p) { p.dims.seq_len = 0; });
  expect_forward(Status::invalid_argument, [](FP& p) { p.dims.batch = -2; });
  expect_forward(Status::invalid_argument, [](FP& p) { p.m_init = nullptr; });  // partial state group
  expect_forward(Status::invalid_argument, [](FP& p) { p.n_last = nullptr; });
  expect_forward(Status::unsupported, [](FP& p) { p.dims.head_dim = 24; });  // not a multiple of 16
  expect_forward(Status::unsupported, [](FP& p) { p.dims.head_dim = 272; });
  expect_forward(Status::unsupported, [](FP& p) { p.dims.heads = 17; });
  expect_forward(Status::unsupported, [](FP& p) { p.units_per_block = 24; });
  MOXE_TEST_CUDA(cudaDeviceSynchronize());
  auto all_poison = [](const std::vector<float>& v) {
    for (float x : v) {
      std::uint32_t bits;
      std::memcpy(&bits, &x, 4);
      if (bits != 0xFFFFFFFFu) return false;
    }
    return true;
  };
  CHECK(all_poison(y.download()));
  CHECK(all_poison(yl.download()));
  CHECK(all_poison(ml.download()));

  DeviceBuffer<float> dwx(pb.wx.size()), dr(pb.r.size()), dbias(pb.bias.size()), dyi(U);
  for (auto* b : {&dwx, &dr, &dbias, &dyi}) b->poison();
  sl::BackwardParams<float, float> b{};
  b.fwd = good;
  b.dy = pb.d_dy.get();
  b.dwx = dwx.get();
  b.dr = dr.get();
  b.dbias = dbias.get();
  const std::size_t bytes = sl::sequence_backward_workspace_size(b);
  REQUIRE(bytes > 0);
  moxe::test::MisalignedWorkspace ws(bytes);
  CHECK(sl::sequence_backward(b, ws.get(), bytes - 1, nullptr) == Status::workspace_too_small);
  CHECK(sl::sequence_backward(b, nullptr, 0, nullptr) == Status::workspace_too_small);
  auto expect_backward = [&](Status want, auto mutate) {
    auto p = b;
    mutate(p);
    CHECK(sl::sequence_backward(p, ws.get(), bytes, nullptr) == want);
  };
  using BP = sl::BackwardParams<float, float>;
  expect_backward(Status::invalid_argument, [](BP& p) { p.dr = nullptr; });
  expect_backward(Status::invalid_argument, [&](BP& p) { p.dy_last = pb.d_dy_last.get(); });  // partial upstream group
  expect_backward(Status::unsupported, [](BP& p) { p.fwd.dims.head_dim = 8; });
  const sl::StepParams<float, float> s =
      step_params(pb.device(), 0, yl.get(), cl.get(), nl.get(), /*m: missing state*/ nullptr, y.get());
  CHECK(sl::step(s, nullptr, 0, nullptr) == Status::invalid_argument);
  MOXE_TEST_CUDA(cudaDeviceSynchronize());
  CHECK(all_poison(dwx.download()));
  CHECK(all_poison(dr.download()));
  CHECK(all_poison(dbias.download()));
  CHECK(all_poison(y.download()));
  CHECK(all_poison(yl.download()));
}
