// Device tests of moxe::slstm: sequence_forward, sequence_backward and step against the
// host reference (double, on the inputs rounded through T), with fresh random inputs,
// poisoned outputs, misaligned workspaces, bitwise determinism, graph capture, bad input,
// and the backward's gate derivatives at large pre-activations entry by entry. With
// MOXE_TEST_SMALL (the GPU simulator) every case runs its small shapes, which keep the
// paths named in each case (sequence_problem.cuh: slstm_shapes).
#include <doctest/doctest.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "device_utils.cuh"
#include "moxe/slstm/reference.hpp"
#include "moxe/slstm/sequence.cuh"
#include "moxe/slstm/step.cuh"
#include "sequence_problem.cuh"
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
using Tolerance = moxe::test::SlstmTolerance<T>;

/// One problem (sequence_problem.cuh: inputs rounded through T, gauge-consistent upstream
/// gradients), uploaded.
template <class T>
struct Problem : moxe::test::SequenceProblem<T> {
  using Base = moxe::test::SequenceProblem<T>;
  DeviceBuffer<T> d_wx, d_r, d_bias, d_dy;
  DeviceBuffer<float> d_y0, d_c0, d_n0, d_m0, d_dy_last, d_dc_last, d_dn_last, d_dm_last;

  Problem(moxe::test::Rng& rng, sl::Dims dims, bool with_init, double wx_scale = 1.0)
      : Base(rng, dims, with_init, wx_scale),
        d_wx(moxe::test::convert_to<T>(this->wx)),
        d_r(moxe::test::convert_to<T>(this->r)),
        d_bias(moxe::test::convert_to<T>(this->bias)),
        d_dy(moxe::test::convert_to<T>(this->dy)),
        d_y0(moxe::test::convert_to<float>(this->y0)),
        d_c0(moxe::test::convert_to<float>(this->c0)),
        d_n0(moxe::test::convert_to<float>(this->n0)),
        d_m0(moxe::test::convert_to<float>(this->m0)),
        d_dy_last(moxe::test::convert_to<float>(this->dy_last)),
        d_dc_last(moxe::test::convert_to<float>(this->dc_last)),
        d_dn_last(moxe::test::convert_to<float>(this->dn_last)),
        d_dm_last(moxe::test::convert_to<float>(this->dm_last)) {}

  /// The inputs on the device (T, states in float).
  moxe::test::SequenceInputs<T, float> device() const {
    const float* none = nullptr;
    const bool init = this->init;
    return {this->d,
            d_wx.get(), d_r.get(), d_bias.get(),
            init ? d_y0.get() : none, init ? d_c0.get() : none, init ? d_n0.get() : none, init ? d_m0.get() : none,
            d_dy.get(), d_dy_last.get(), d_dc_last.get(), d_dn_last.get(), d_dm_last.get()};
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

/// How the launchers cut the problem: units per block and groups per launch (0: theirs).
struct Launch {
  int units = 0;
  int64_t max_groups_per_launch = 0;
};

template <class T, class Acc>
void apply(const Launch& l, sl::ForwardParams<T, Acc>& p) {
  p.units_per_block = l.units;
  p.max_groups_per_launch = l.max_groups_per_launch;
}

/// The device forward of `in`: y and the final states (written into poisoned buffers).
struct ForwardOut {
  std::vector<double> y, yl, cl, nl, ml;
};

template <class T>
ForwardOut run_device_forward(const moxe::test::SequenceInputs<T, float>& in, const Launch& launch) {
  const int64_t U = in.dims.batch * sl::hidden(in.dims);
  DeviceBuffer<T> d_y(in.dims.seq_len * U);
  DeviceBuffer<float> d_yl(U), d_cl(U), d_nl(U), d_ml(U);
  for (auto* b : {&d_yl, &d_cl, &d_nl, &d_ml}) b->poison();
  d_y.poison();
  auto p = forward_params(in, d_y.get(), d_yl.get(), d_cl.get(), d_nl.get(), d_ml.get());
  apply(launch, p);
  const std::size_t bytes = sl::sequence_forward_workspace_size(p);
  moxe::test::MisalignedWorkspace ws(bytes);
  REQUIRE(sl::sequence_forward(p, ws.get(), ws.bytes(), nullptr) == Status::ok);
  MOXE_TEST_CUDA(cudaDeviceSynchronize());
  return {moxe::test::convert_to_double(d_y.download()), moxe::test::to_double(d_yl.download()),
          moxe::test::to_double(d_cl.download()), moxe::test::to_double(d_nl.download()),
          moxe::test::to_double(d_ml.download())};
}

template <class T>
void check_forward(const Problem<T>& pb, const Launch& launch = {}) {
  const ReferenceForward ref = reference_forward(pb);
  const ForwardOut o = run_device_forward(pb.device(), launch);
  const double tol = Tolerance<T>::fwd;
  CHECK(moxe::test::rel_error(o.y, ref.y) < tol);
  CHECK(moxe::test::rel_error(o.yl, ref.yl) < tol);
  CHECK(moxe::test::rel_error(o.cl, ref.cl) < tol);
  CHECK(moxe::test::rel_error(o.nl, ref.nl) < tol);
  CHECK(moxe::test::rel_error(o.ml, ref.ml) < tol);
}

using BackwardOut = moxe::test::ReferenceGradients;  // the same gradients, from the device

/// The device backward of `in` (every gradient, from poisoned buffers; with no initial
/// states dy_init, dc_init, dn_init, dm_init are the gradients at the zero states).
template <class T>
BackwardOut run_device_backward(const moxe::test::SequenceInputs<T, float>& in, bool upstream, const Launch& launch,
                                std::size_t misalign = 1) {
  const int64_t U = in.dims.batch * sl::hidden(in.dims), H = sl::hidden(in.dims);
  const int64_t DH = in.dims.head_dim;
  DeviceBuffer<T> dwx(in.dims.seq_len * in.dims.batch * 4 * H), dr(in.dims.heads * 4 * DH * DH), dbias(4 * H);
  DeviceBuffer<float> dyi(U), dci(U), dni(U), dmi(U);
  for (auto* b : {&dwx, &dr, &dbias}) b->poison();
  for (auto* b : {&dyi, &dci, &dni, &dmi}) b->poison();
  sl::BackwardParams<T, float> p = backward_params(in, upstream, dwx.get(), dr.get(), dbias.get(), dyi.get(),
                                                   dci.get(), dni.get(), dmi.get());
  apply(launch, p.fwd);
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
  o.dmi = moxe::test::to_double(dmi.download());
  return o;
}

template <class T>
BackwardOut run_device_backward(const Problem<T>& pb, bool upstream, const Launch& launch, std::size_t misalign = 1) {
  return run_device_backward(pb.device(), upstream, launch, misalign);
}

template <class T>
void check_backward(const Problem<T>& pb, bool upstream, const Launch& launch = {}) {
  const BackwardOut ref = moxe::test::reference_gradients(pb, upstream);
  const BackwardOut o = run_device_backward(pb, upstream, launch);
  const double tol = Tolerance<T>::bwd;
  CHECK(moxe::test::rel_error(o.dwx, ref.dwx) < tol);
  CHECK(moxe::test::rel_error(o.dr, ref.dr) < tol);
  CHECK(moxe::test::rel_error(o.dbias, ref.dbias) < tol);
  CHECK(moxe::test::rel_error(o.dyi, ref.dyi) < tol);
  CHECK(moxe::test::rel_error(o.dci, ref.dci) < tol);
  CHECK(moxe::test::rel_error(o.dni, ref.dni) < tol);
  CHECK(moxe::test::rel_error(o.dmi, ref.dmi) < tol);
}

template <class T>
const char* type_name() {
  if constexpr (std::is_same_v<T, float>) return "float";
  if constexpr (std::is_same_v<T, __half>) return "half";
  return "bf16";
}

/// The shared memory the backward's block needs at `units` (0: the smallest plan, U = 16) when
/// the device's opt-in limit is below it, else 0. Float at head_dim 256 needs ~130 KB: an
/// H100 has 227 KB, GPUs (and the simulated GPU) with ~100 KB do not fit it; the launcher
/// must then return unsupported.
template <class T>
std::size_t backward_smem_beyond_device(int64_t head_dim, int units) {
  int device = 0, optin = 0;
  MOXE_TEST_CUDA(cudaGetDevice(&device));
  MOXE_TEST_CUDA(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  const int u = units != 0 ? units : 16;
  const std::size_t bytes =
      sl::detail::backward_smem(head_dim, u, static_cast<int>(sizeof(T)), sl::detail::uses_tensor_cores_v<T>).bytes;
  return bytes > static_cast<std::size_t>(optin) ? bytes : 0;
}

/// Runs check(problem, launch) on a fresh problem of every shape of slstm_shapes().
template <class T, class Check>
void for_each_shape(moxe::test::Rng& rng, Check check) {
  for (const moxe::test::SlstmShape& s : moxe::test::slstm_shapes()) {
    CAPTURE(s.d.seq_len);
    CAPTURE(s.d.batch);
    CAPTURE(s.d.heads);
    CAPTURE(s.d.head_dim);
    CAPTURE(s.units);
    CAPTURE(s.max_groups_per_launch);
    const Problem<T> pb(rng, s.d, s.init);
    check(pb, Launch{s.units, s.max_groups_per_launch});
  }
}

}  // namespace

TEST_CASE_TEMPLATE("slstm sequence_forward matches the reference", T, float, __nv_bfloat16, __half) {
  const auto seed = moxe::test::fresh_seed();
  INFO("seed " << seed);
  moxe::test::Rng rng(seed);
  for_each_shape<T>(rng, [](const Problem<T>& pb, const Launch& launch) { check_forward(pb, launch); });
  Problem<T> large(rng, sl::Dims{7, 3, 2, 32}, true, 10.0);  // large gate pre-activations
  check_forward(large);
}

TEST_CASE_TEMPLATE("slstm sequence_backward matches the reference", T, float, __nv_bfloat16, __half) {
  // tests/slstm/check_sequence_emulated.cu runs these problems (same seed, same draws)
  // through a host emulation of the kernels' arithmetic in T
  const auto seed = moxe::test::fresh_seed();
  INFO("seed " << seed);
  moxe::test::Rng rng(seed);
  for_each_shape<T>(rng, [](const Problem<T>& pb, const Launch& launch) {
    if (const std::size_t need = backward_smem_beyond_device<T>(pb.d.head_dim, launch.units)) {
      // no plan fits this device: the launcher says so, with nothing launched
      DeviceBuffer<T> dwx(pb.wx.size()), dr(pb.r.size()), dbias(pb.bias.size());
      const auto p = backward_params(pb.device(), true, dwx.get(), dr.get(), dbias.get(), nullptr, nullptr, nullptr,
                                     nullptr);
      moxe::test::MisalignedWorkspace ws(sl::sequence_backward_workspace_size(p));
      CHECK(sl::sequence_backward(p, ws.get(), ws.bytes(), nullptr) == Status::unsupported);
      const std::string why = "slstm sequence_backward<" + std::string(type_name<T>()) +
                              "> at head_dim " + std::to_string(pb.d.head_dim) + ": a block needs " +
                              std::to_string(need / 1024) +
                              " KB of shared memory, more than this device's opt-in limit (an H100 has 227 KB); "
                              "checked to return unsupported";
      if (!moxe::test::skip_on_simulator(why.c_str())) MESSAGE(why);
      return;
    }
    check_backward(pb, /*upstream=*/true, launch);
  });
  Problem<T> pb(rng, sl::Dims{7, 5, 2, 32}, true);
  check_backward(pb, /*upstream=*/false);
}

TEST_CASE_TEMPLATE("slstm sequence_backward at large |o|, |z|: d raw_o and d raw_z entry by entry", T, float,
                   __nv_bfloat16, __half) {
  // One step from the zero state (no initial states, no upstream): the backward kernels'
  // cell at gate pre-activations up to 20 in magnitude, where sigmoid'(o) from a rounded
  // sigmoid(o), and tanh'(z) from a rounded tanh(z), keep no digit in float
  // (sequence_problem.cuh: on_preactivation_grid, GateGradTolerance). Two batch tiles.
  const auto seed = moxe::test::fresh_seed();
  INFO("seed " << seed);
  moxe::test::Rng rng(seed);
  Problem<T> pb(rng, sl::Dims{1, 17, 2, 16}, false, 20.0);
  pb.wx = moxe::test::round_through<T>(moxe::test::on_preactivation_grid(pb.wx));
  pb.bias = moxe::test::round_through<T>(moxe::test::on_preactivation_grid(pb.bias));
  pb.d_wx.upload(moxe::test::convert_to<T>(pb.wx));
  pb.d_bias.upload(moxe::test::convert_to<T>(pb.bias));
  const BackwardOut ref = moxe::test::reference_gradients(pb, /*upstream=*/false);
  const BackwardOut o = run_device_backward(pb, /*upstream=*/false, Launch{});
  const int64_t positions = pb.d.seq_len * pb.d.batch, H = sl::hidden(pb.d);
  using Tol = moxe::test::GateGradTolerance<T>;
  const double ez = moxe::test::worst_gate_error(o.dwx, ref.dwx, positions, H, 2, Tol::floor);
  const double eo = moxe::test::worst_gate_error(o.dwx, ref.dwx, positions, H, 3, Tol::floor);
  MESSAGE("worst entry error, d raw_z " << ez << ", d raw_o " << eo << " (bound " << Tol::rel << ")");
  CHECK(ez < Tol::rel);
  CHECK(eo < Tol::rel);
  CHECK(moxe::test::rel_error(o.dwx, ref.dwx) < Tolerance<T>::bwd);
  CHECK(moxe::test::rel_error(o.dbias, ref.dbias) < Tolerance<T>::bwd);
}

TEST_CASE_TEMPLATE("slstm device: a sequence run as chained calls equals it run whole", T, float, __nv_bfloat16,
                   __half) {
  // Truncated BPTT with carried states. The forward of the second call starts from the
  // float states the first one ends in, and each call's backward takes the next call's
  // initial-state gradients as its upstream: the same arithmetic as the whole run, so y,
  // the states, dwx and the initial-state gradients agree bit for bit; dr and dbias are
  // sums over the calls (and the later calls' dr reads y_init in float where the whole
  // run reads y in T), equal up to rounding. Random upstream gradients of the final states:
  // whole and chained take the same branch of every max, so no gauge is needed here.
  const auto seed = moxe::test::fresh_seed();
  INFO("seed " << seed);
  moxe::test::Rng rng(seed);
  struct Case {
    sl::Dims d;
    bool init;
    std::vector<int64_t> lengths;
    Launch launch;
  };
  const std::vector<Case> cases = {
      {{6, 3, 2, 16}, true, {3, 3}, {}},
      {{6, 17, 1, 32}, false, {1, 5}, {0, 1}},
      {{5, 2, 2, 64}, true, {2, 1, 2}, {16, 1}},
  };
  for (const Case& cs : cases) {
    CAPTURE(cs.d.seq_len);
    CAPTURE(cs.d.batch);
    CAPTURE(cs.d.head_dim);
    CAPTURE(cs.lengths.size());
    CAPTURE(cs.launch.units);
    Problem<T> pb(rng, cs.d, cs.init);
    moxe::test::Rng urng(rng.integer(0, 1 << 30));  // random upstream, not gauge-consistent
    const std::vector<float> dm_random = moxe::test::uniform_vector<float>(urng, pb.units());
    pb.d_dm_last.upload(dm_random);
    const ForwardOut whole = run_device_forward(pb.device(), cs.launch);
    const BackwardOut gwhole = run_device_backward(pb.device(), /*upstream=*/true, cs.launch);

    // the calls, forward in order
    const int64_t U = pb.units(), gate_step = cs.d.batch * 4 * sl::hidden(cs.d);
    std::vector<moxe::test::SequenceInputs<T, float>> parts;
    std::vector<ForwardOut> outs;
    std::vector<std::array<DeviceBuffer<float>, 4>> states;  // each call's final y, c, n, m
    int64_t t0 = 0;
    for (int64_t len : cs.lengths) {
      moxe::test::SequenceInputs<T, float> in = pb.device();
      in.dims.seq_len = len;
      in.wx += t0 * gate_step;
      in.dy += t0 * U;
      if (!states.empty()) {
        in.y_init = states.back()[0].get();
        in.c_init = states.back()[1].get();
        in.n_init = states.back()[2].get();
        in.m_init = states.back()[3].get();
      }
      outs.push_back(run_device_forward(in, cs.launch));
      const ForwardOut& o = outs.back();
      states.push_back({DeviceBuffer<float>(moxe::test::convert_to<float>(o.yl)),
                        DeviceBuffer<float>(moxe::test::convert_to<float>(o.cl)),
                        DeviceBuffer<float>(moxe::test::convert_to<float>(o.nl)),
                        DeviceBuffer<float>(moxe::test::convert_to<float>(o.ml))});
      parts.push_back(in);
      t0 += len;
    }
    std::vector<double> y;
    for (const ForwardOut& o : outs) y.insert(y.end(), o.y.begin(), o.y.end());
    CHECK(y == whole.y);
    CHECK(outs.back().yl == whole.yl);
    CHECK(outs.back().cl == whole.cl);
    CHECK(outs.back().nl == whole.nl);
    CHECK(outs.back().ml == whole.ml);

    // the calls, backward in reverse; the upstream of each is the next one's dy/dc/dn/dm_init
    std::vector<double> dwx(gwhole.dwx.size()), dr(gwhole.dr.size(), 0.0), dbias(gwhole.dbias.size(), 0.0);
    BackwardOut first;
    std::array<DeviceBuffer<float>, 4> upstream;
    for (std::size_t k = parts.size(); k-- > 0;) {
      moxe::test::SequenceInputs<T, float> in = parts[k];
      if (k + 1 < parts.size()) {
        in.dy_last = upstream[0].get();
        in.dc_last = upstream[1].get();
        in.dn_last = upstream[2].get();
        in.dm_last = upstream[3].get();
      }
      const BackwardOut g = run_device_backward(in, /*upstream=*/true, cs.launch);
      const int64_t offset = (in.wx - pb.device().wx);
      std::copy(g.dwx.begin(), g.dwx.end(), dwx.begin() + offset);
      for (std::size_t i = 0; i < dr.size(); ++i) dr[i] += g.dr[i];
      for (std::size_t i = 0; i < dbias.size(); ++i) dbias[i] += g.dbias[i];
      upstream = {DeviceBuffer<float>(moxe::test::convert_to<float>(g.dyi)),
                  DeviceBuffer<float>(moxe::test::convert_to<float>(g.dci)),
                  DeviceBuffer<float>(moxe::test::convert_to<float>(g.dni)),
                  DeviceBuffer<float>(moxe::test::convert_to<float>(g.dmi))};
      if (k == 0) first = g;
    }
    CHECK(dwx == gwhole.dwx);
    CHECK(first.dyi == gwhole.dyi);
    CHECK(first.dci == gwhole.dci);
    CHECK(first.dni == gwhole.dni);
    CHECK(first.dmi == gwhole.dmi);
    CHECK(moxe::test::rel_error(dr, gwhole.dr) < Tolerance<T>::fwd);
    CHECK(moxe::test::rel_error(dbias, gwhole.dbias) < Tolerance<T>::fwd);
  }
}

TEST_CASE_TEMPLATE("slstm backward is deterministic", T, float, __nv_bfloat16) {
  // small mode: S = 3, DH = 32 (U = 16: two cooperative blocks per group), still two batch
  // tiles (two groups, so one group per launch means two launches) and misaligned workspaces
  const auto seed = moxe::test::fresh_seed();
  INFO("seed " << seed);
  moxe::test::Rng rng(seed);
  Problem<T> pb(rng, moxe::test::small_sizes() ? sl::Dims{3, 17, 1, 32} : sl::Dims{64, 19, 2, 64}, true);
  const BackwardOut a = run_device_backward(pb, true, Launch{16, 0}, 1);
  const BackwardOut b = run_device_backward(pb, true, Launch{16, 0}, 3);
  const BackwardOut c = run_device_backward(pb, true, Launch{0, 0}, 1);  // the split over blocks changes no bit
  const BackwardOut d = run_device_backward(pb, true, Launch{0, 1}, 1);  // nor the groups per launch
  auto same = [](const std::vector<double>& x, const std::vector<double>& y) {
    return x.size() == y.size() && std::memcmp(x.data(), y.data(), x.size() * sizeof(double)) == 0;
  };
  CHECK(same(a.dwx, b.dwx));
  CHECK(same(a.dr, b.dr));
  CHECK(same(a.dbias, b.dbias));
  CHECK(same(a.dyi, b.dyi));
  CHECK(same(a.dmi, b.dmi));
  CHECK(same(a.dwx, c.dwx));
  CHECK(same(a.dr, c.dr));
  CHECK(same(a.dwx, d.dwx));
  CHECK(same(a.dr, d.dr));
  CHECK(same(a.dmi, d.dmi));
}

TEST_CASE_TEMPLATE("slstm backward with the training forward's tape equals it without, bit for bit", T, float,
                   __nv_bfloat16, __half) {
  // The forward writes the tape (raw gates, states of every step) when given; the backward
  // then reads it and fwd.y instead of replaying the forward. Same bits as without the tape
  // (the replay is the same kernel), the tape as the reference's in double, the tape and y
  // left as they were, a smaller workspace. One block per group, several cooperative blocks
  // (U = 16) and several launches; with and without initial states and upstream gradients.
  const auto seed = moxe::test::fresh_seed();
  INFO("seed " << seed);
  moxe::test::Rng rng(seed);
  struct Case {
    sl::Dims d;
    bool init, upstream;
    Launch launch;
  };
  const std::vector<Case> cases = {
      {{4, 3, 2, 16}, false, false, {}},
      {{3, 17, 1, 32}, true, true, {16, 1}},
      {{1, 2, 1, 64}, true, true, {0, 0}},
  };
  auto same = [](const auto& x, const auto& y) {
    return x.size() == y.size() && std::memcmp(x.data(), y.data(), x.size() * sizeof(x[0])) == 0;
  };
  for (const Case& cs : cases) {
    CAPTURE(cs.d.seq_len);
    CAPTURE(cs.d.batch);
    CAPTURE(cs.d.head_dim);
    CAPTURE(cs.launch.units);
    CAPTURE(cs.launch.max_groups_per_launch);
    const Problem<T> pb(rng, cs.d, cs.init);
    const int64_t U = pb.units();
    const sl::TapeElements te = sl::tape_elements(cs.d);
    REQUIRE(te.gates == cs.d.seq_len * 4 * U);
    REQUIRE(te.state == cs.d.seq_len * U);

    // the training forward, with the tape, into poisoned buffers; y and the final states as
    // without the tape
    DeviceBuffer<T> y(cs.d.seq_len * U);
    DeviceBuffer<float> yl(U), cl(U), nl(U), ml(U), tg(te.gates), tc(te.state), tn(te.state), tm(te.state);
    for (auto* b : {&yl, &cl, &nl, &ml, &tg, &tc, &tn, &tm}) b->poison();
    y.poison();
    auto fp = forward_params(pb.device(), y.get(), yl.get(), cl.get(), nl.get(), ml.get());
    apply(cs.launch, fp);
    fp.tape_gates = tg.get();
    fp.tape_c = tc.get();
    fp.tape_n = tn.get();
    fp.tape_m = tm.get();
    REQUIRE(sl::sequence_forward_workspace_size(fp) == 0);
    REQUIRE(sl::sequence_forward(fp, nullptr, 0, nullptr) == Status::ok);
    MOXE_TEST_CUDA(cudaDeviceSynchronize());
    const ForwardOut plain = run_device_forward(pb.device(), cs.launch);
    CHECK(moxe::test::convert_to_double(y.download()) == plain.y);
    CHECK(moxe::test::to_double(yl.download()) == plain.yl);
    CHECK(moxe::test::to_double(cl.download()) == plain.cl);
    CHECK(moxe::test::to_double(nl.download()) == plain.nl);
    CHECK(moxe::test::to_double(ml.download()) == plain.ml);

    // the tape against the reference forward's in double (same layout)
    {
      std::vector<double> ry(cs.d.seq_len * U), rg(te.gates), rc(te.state), rn(te.state), rm(te.state);
      auto rp = forward_params(pb.host(), ry.data(), nullptr, nullptr, nullptr, nullptr);
      rp.tape_gates = rg.data();
      rp.tape_c = rc.data();
      rp.tape_n = rn.data();
      rp.tape_m = rm.data();
      REQUIRE(sl::reference::forward(rp) == Status::ok);
      const double tol = Tolerance<T>::fwd;
      CHECK(moxe::test::rel_error(moxe::test::to_double(tg.download()), rg) < tol);
      CHECK(moxe::test::rel_error(moxe::test::to_double(tc.download()), rc) < tol);
      CHECK(moxe::test::rel_error(moxe::test::to_double(tn.download()), rn) < tol);
      CHECK(moxe::test::rel_error(moxe::test::to_double(tm.download()), rm) < tol);
    }
    const auto tape_before = std::array<std::vector<float>, 4>{tg.download(), tc.download(), tn.download(),
                                                                 tm.download()};
    const auto y_before = y.download();

    // the backward from the tape, into poisoned buffers
    const int64_t H = sl::hidden(cs.d), DH = cs.d.head_dim;
    DeviceBuffer<T> dwx(cs.d.seq_len * cs.d.batch * 4 * H), dr(cs.d.heads * 4 * DH * DH), dbias(4 * H);
    DeviceBuffer<float> dyi(U), dci(U), dni(U), dmi(U);
    for (auto* b : {&dwx, &dr, &dbias}) b->poison();
    for (auto* b : {&dyi, &dci, &dni, &dmi}) b->poison();
    sl::BackwardParams<T, float> bp = backward_params(pb.device(), cs.upstream, dwx.get(), dr.get(), dbias.get(),
                                                      dyi.get(), dci.get(), dni.get(), dmi.get());
    const std::size_t replay_bytes = sl::sequence_backward_workspace_size(bp);
    bp.fwd = fp;
    const std::size_t bytes = sl::sequence_backward_workspace_size(bp);
    CHECK(bytes < replay_bytes);
    moxe::test::MisalignedWorkspace ws(bytes, 3);
    REQUIRE(sl::sequence_backward(bp, ws.get(), ws.bytes(), nullptr) == Status::ok);
    MOXE_TEST_CUDA(cudaDeviceSynchronize());
    BackwardOut o;
    o.dwx = moxe::test::convert_to_double(dwx.download());
    o.dr = moxe::test::convert_to_double(dr.download());
    o.dbias = moxe::test::convert_to_double(dbias.download());
    o.dyi = moxe::test::to_double(dyi.download());
    o.dci = moxe::test::to_double(dci.download());
    o.dni = moxe::test::to_double(dni.download());
    o.dmi = moxe::test::to_double(dmi.download());

    const BackwardOut replayed = run_device_backward(pb, cs.upstream, cs.launch, 1);
    CHECK(same(o.dwx, replayed.dwx));
    CHECK(same(o.dr, replayed.dr));
    CHECK(same(o.dbias, replayed.dbias));
    CHECK(same(o.dyi, replayed.dyi));
    CHECK(same(o.dci, replayed.dci));
    CHECK(same(o.dni, replayed.dni));
    CHECK(same(o.dmi, replayed.dmi));
    const BackwardOut ref = moxe::test::reference_gradients(pb, cs.upstream);
    const double tol = Tolerance<T>::bwd;
    CHECK(moxe::test::rel_error(o.dwx, ref.dwx) < tol);
    CHECK(moxe::test::rel_error(o.dr, ref.dr) < tol);
    CHECK(moxe::test::rel_error(o.dbias, ref.dbias) < tol);
    CHECK(moxe::test::rel_error(o.dyi, ref.dyi) < tol);
    CHECK(moxe::test::rel_error(o.dmi, ref.dmi) < tol);
    // the backward reads the tape and y, and writes neither
    CHECK(same(tg.download(), tape_before[0]));
    CHECK(same(tc.download(), tape_before[1]));
    CHECK(same(tn.download(), tape_before[2]));
    CHECK(same(tm.download(), tape_before[3]));
    CHECK(same(y.download(), y_before));
  }
}

TEST_CASE_TEMPLATE("slstm device: a batch tile of at most 8 rows (the narrow product) equals the same rows of a full tile",
                   T, __nv_bfloat16, __half) {
  // With B <= 8 rows in a tile the tensor-core product runs mma m16n8k16 with the rows as N
  // (recurrent.cuh, block_product_narrow); a full tile runs WMMA 16x16x16. Rows 0..3 of a
  // batch of 20 (first tile full) and the same 4 rows as a batch of their own: the same
  // MMA instruction (HMMA.16816) per output and k-step, so y, the final states, the tape,
  // dwx and the initial-state gradients agree bit for bit. One block per group and two
  // cooperative blocks.
  const auto seed = moxe::test::fresh_seed();
  INFO("seed " << seed);
  moxe::test::Rng rng(seed);
  const sl::Dims full{3, 20, 1, 32};
  const int64_t rows = 4, H = sl::hidden(full), S = full.seq_len;
  Problem<T> wide(rng, full, true);
  Problem<T> narrow(rng, sl::Dims{S, rows, full.heads, full.head_dim}, true);
  // rows [0, rows) of [S, B, X] (per_row = X elements per row)
  auto slice = [&](const std::vector<double>& v, int64_t steps, int64_t per_row) {
    std::vector<double> out(steps * rows * per_row);
    for (int64_t t = 0; t < steps; ++t)
      for (int64_t i = 0; i < rows * per_row; ++i) out[t * rows * per_row + i] = v[t * full.batch * per_row + i];
    return out;
  };
  narrow.wx = slice(wide.wx, S, 4 * H);
  narrow.r = wide.r;
  narrow.bias = wide.bias;
  narrow.dy = slice(wide.dy, S, H);
  narrow.y0 = slice(wide.y0, 1, H);
  narrow.c0 = slice(wide.c0, 1, H);
  narrow.n0 = slice(wide.n0, 1, H);
  narrow.m0 = slice(wide.m0, 1, H);
  narrow.dy_last = slice(wide.dy_last, 1, H);
  narrow.dc_last = slice(wide.dc_last, 1, H);
  narrow.dn_last = slice(wide.dn_last, 1, H);
  narrow.dm_last = slice(wide.dm_last, 1, H);
  narrow.d_wx.upload(moxe::test::convert_to<T>(narrow.wx));
  narrow.d_r.upload(moxe::test::convert_to<T>(narrow.r));
  narrow.d_bias.upload(moxe::test::convert_to<T>(narrow.bias));
  narrow.d_dy.upload(moxe::test::convert_to<T>(narrow.dy));
  narrow.d_y0.upload(moxe::test::convert_to<float>(narrow.y0));
  narrow.d_c0.upload(moxe::test::convert_to<float>(narrow.c0));
  narrow.d_n0.upload(moxe::test::convert_to<float>(narrow.n0));
  narrow.d_m0.upload(moxe::test::convert_to<float>(narrow.m0));
  narrow.d_dy_last.upload(moxe::test::convert_to<float>(narrow.dy_last));
  narrow.d_dc_last.upload(moxe::test::convert_to<float>(narrow.dc_last));
  narrow.d_dn_last.upload(moxe::test::convert_to<float>(narrow.dn_last));
  narrow.d_dm_last.upload(moxe::test::convert_to<float>(narrow.dm_last));

  struct Run {
    std::vector<double> y, yl, ml, tape_gates, tape_c;
  };
  auto forward_with_tape = [](const Problem<T>& pb, const Launch& launch) {
    const int64_t U = pb.units();
    const sl::TapeElements te = sl::tape_elements(pb.d);
    DeviceBuffer<T> y(pb.d.seq_len * U);
    DeviceBuffer<float> yl(U), cl(U), nl(U), ml(U), tg(te.gates), tc(te.state), tn(te.state), tm(te.state);
    auto p = forward_params(pb.device(), y.get(), yl.get(), cl.get(), nl.get(), ml.get());
    apply(launch, p);
    p.tape_gates = tg.get();
    p.tape_c = tc.get();
    p.tape_n = tn.get();
    p.tape_m = tm.get();
    REQUIRE(sl::sequence_forward(p, nullptr, 0, nullptr) == Status::ok);
    MOXE_TEST_CUDA(cudaDeviceSynchronize());
    return Run{moxe::test::convert_to_double(y.download()), moxe::test::to_double(yl.download()),
               moxe::test::to_double(ml.download()), moxe::test::to_double(tg.download()),
               moxe::test::to_double(tc.download())};
  };
  // The simulator's WMMA accumulates half products in half (docs/simulator.md), its mma in
  // float: there half agrees to rounding only
  const bool exact = !(std::is_same_v<T, __half> && moxe::test::on_simulator());
  if (!exact) MESSAGE("half on the simulator: its WMMA accumulates in half; compared to rounding, not bitwise");
  auto agree = [exact](const std::vector<double>& a, const std::vector<double>& b, double tol) {
    return exact ? a == b : moxe::test::rel_error(a, b) < tol;
  };
  const double fwd = Tolerance<T>::fwd, bwd = Tolerance<T>::bwd;
  for (const Launch launch : {Launch{0, 0}, Launch{16, 0}}) {
    CAPTURE(launch.units);
    const Run w = forward_with_tape(wide, launch), n = forward_with_tape(narrow, launch);
    CHECK(agree(slice(w.y, S, H), n.y, fwd));
    CHECK(agree(slice(w.yl, 1, H), n.yl, fwd));
    CHECK(agree(slice(w.ml, 1, H), n.ml, fwd));
    CHECK(agree(slice(w.tape_gates, S, 4 * H), n.tape_gates, fwd));
    CHECK(agree(slice(w.tape_c, S, H), n.tape_c, fwd));
    const BackwardOut gw = run_device_backward(wide, true, launch), gn = run_device_backward(narrow, true, launch);
    CHECK(agree(slice(gw.dwx, S, 4 * H), gn.dwx, bwd));
    CHECK(agree(slice(gw.dyi, 1, H), gn.dyi, bwd));
    CHECK(agree(slice(gw.dci, 1, H), gn.dci, bwd));
    CHECK(agree(slice(gw.dmi, 1, H), gn.dmi, bwd));
    // and the narrow run against the reference
    const BackwardOut ref = moxe::test::reference_gradients(narrow, true);
    CHECK(moxe::test::rel_error(gn.dwx, ref.dwx) < Tolerance<T>::bwd);
    CHECK(moxe::test::rel_error(gn.dyi, ref.dyi) < Tolerance<T>::bwd);
  }
}

TEST_CASE_TEMPLATE("slstm step matches the sequence reference", T, float, __nv_bfloat16) {
  const auto seed = moxe::test::fresh_seed();
  INFO("seed " << seed);
  moxe::test::Rng rng(seed);
  for (int units : {0, 16}) {  // 16: a head over several cooperative blocks
    CAPTURE(units);
    // small mode: S = 3, one head of 32 (two blocks at U = 16), a batch past one tile
    const sl::Dims d = moxe::test::small_sizes() ? sl::Dims{3, 17, 1, 32} : sl::Dims{5, 18, 2, 64};
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
  const auto seed = moxe::test::fresh_seed();
  INFO("seed " << seed);
  moxe::test::Rng rng(seed);
  for (int units : {0, 16}) {
    CAPTURE(units);
    // small mode: S = 3, one head of 32: U = 16 still splits it over two blocks (the barrier)
    const sl::Dims d = moxe::test::small_sizes() ? sl::Dims{3, 17, 1, 32} : sl::Dims{6, 18, 2, 64};
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
  const auto seed = moxe::test::fresh_seed();
  INFO("seed " << seed);
  moxe::test::Rng rng(seed);
  for (int units : {0, 16}) {  // 16: the cooperative launch of a head split over blocks, captured
    CAPTURE(units);
    // small mode: S = 3, one head of 32 (U = 16: two blocks per group)
    const sl::Dims d = moxe::test::small_sizes() ? sl::Dims{3, 3, 1, 32} : sl::Dims{7, 3, 2, 64};
    Problem<__nv_bfloat16> pb(rng, d, true);
    const int64_t U = pb.units();
    DeviceBuffer<__nv_bfloat16> y_direct(d.seq_len * U), y_graph(d.seq_len * U);
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
  const auto seed = moxe::test::fresh_seed();
  INFO("seed " << seed);
  moxe::test::Rng rng(seed);
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
  expect_forward(Status::invalid_argument, [](FP& p) { p.max_groups_per_launch = -1; });
  DeviceBuffer<float> tape(7 * 3 * U);  // a whole tape: gates, c, n, m
  tape.poison();
  float* const tg = tape.get();
  float *const tc = tg + 4 * 3 * U, *const tn = tc + 3 * U, *const tm = tn + 3 * U;
  expect_forward(Status::invalid_argument, [&](FP& p) { p.tape_gates = tg; });  // partial tape
  expect_forward(Status::invalid_argument, [&](FP& p) {  // the tape without tape_m
    p.tape_gates = tg;
    p.tape_c = tc;
    p.tape_n = tn;
  });
  expect_forward(Status::invalid_argument, [&](FP& p) {  // a whole tape, but bad sizes
    p.tape_gates = tg;
    p.tape_c = tc;
    p.tape_n = tn;
    p.tape_m = tm;
    p.dims.seq_len = 0;
  });
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
  expect_backward(Status::invalid_argument, [&](BP& p) {  // the upstream group without dm_last
    p.dy_last = pb.d_dy_last.get();
    p.dc_last = pb.d_dc_last.get();
    p.dn_last = pb.d_dn_last.get();
  });
  expect_backward(Status::invalid_argument, [&](BP& p) {  // the initial-state gradients without dm_init
    p.dy_init = dyi.get();
    p.dc_init = dyi.get();
    p.dn_init = dyi.get();
  });
  expect_backward(Status::unsupported, [](BP& p) { p.fwd.dims.head_dim = 8; });
  expect_backward(Status::invalid_argument, [&](BP& p) {  // partial tape
    p.fwd.tape_c = tc;
    p.fwd.tape_n = tn;
    p.fwd.tape_m = tm;
  });
  expect_backward(Status::invalid_argument, [&](BP& p) {  // a whole tape without the forward's y
    p.fwd.y = nullptr;
    p.fwd.tape_gates = tg;
    p.fwd.tape_c = tc;
    p.fwd.tape_n = tn;
    p.fwd.tape_m = tm;
  });
  const sl::StepParams<float, float> s =
      step_params(pb.device(), 0, yl.get(), cl.get(), nl.get(), /*m: missing state*/ nullptr, y.get());
  CHECK(sl::step(s, nullptr, 0, nullptr) == Status::invalid_argument);
  MOXE_TEST_CUDA(cudaDeviceSynchronize());
  CHECK(all_poison(dwx.download()));
  CHECK(all_poison(dr.download()));
  CHECK(all_poison(dbias.download()));
  CHECK(all_poison(y.download()));
  CHECK(all_poison(yl.download()));
  CHECK(all_poison(tape.download()));
}
