// Device tests of moxe::slstm::per_token_forward / per_token_backward: against the host
// implementation in double (inputs rounded through T), unit counts below and above a
// block, more positions than dbias chunks, size 1; gate pre-activations up to 20 with
// d raw_o, d raw_z checked entry by entry; poisoned outputs; bad arguments. MOXE_TEST_SMALL
// (the GPU simulator) shrinks only the largest shape (H above a block: 300 units).
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "device_utils.cuh"
#include "moxe/slstm/per_token.cuh"
#include "sequence_problem.cuh"
#include "slstm_testing.hpp"
#include "test_utils.hpp"

namespace sl = moxe::slstm;
namespace mt = moxe::test;
using moxe::Status;

namespace {

template <class T>
double tolerance() {
  return std::is_same_v<T, float> ? 1e-5 : (std::is_same_v<T, __half> ? 2e-3 : 1e-2);
}

/// The device against the host implementation on one shape; with `extreme`, gate
/// pre-activations up to 20 in magnitude on the grid where wx + bias is exact in float, and
/// d raw_z, d raw_o checked entry by entry (sequence_problem.cuh: GateGradTolerance).
template <class T>
void check_case(mt::Rng& rng, const sl::Dims& d, bool extreme = false) {
  CAPTURE(d.seq_len);
  CAPTURE(d.batch);
  CAPTURE(d.heads);
  CAPTURE(d.head_dim);
  CAPTURE(extreme);
  const int64_t H = sl::hidden(d), positions = d.seq_len * d.batch;
  const auto wx = mt::round_through<T>(
      extreme ? mt::on_preactivation_grid(mt::uniform_vector<double>(rng, positions * 4 * H, -20.0, 20.0))
              : mt::normal_vector<double>(rng, positions * 4 * H, 2.0));
  const auto r = mt::round_through<T>(mt::normal_vector<double>(rng, d.heads * 4 * d.head_dim * d.head_dim));
  const auto bias =
      mt::round_through<T>(extreme ? mt::on_preactivation_grid(mt::uniform_vector<double>(rng, 4 * H, -0.5, 0.5))
                                   : mt::normal_vector<double>(rng, 4 * H, 0.5));
  const auto dy = mt::round_through<T>(mt::normal_vector<double>(rng, positions * H));
  mt::DeviceBuffer<T> d_wx(mt::convert_to<T>(wx)), d_r(mt::convert_to<T>(r)), d_bias(mt::convert_to<T>(bias)),
      d_dy(mt::convert_to<T>(dy)), d_y(positions * H), d_dwx(positions * 4 * H), d_dr(r.size()), d_dbias(4 * H);
  for (auto* b : {&d_y, &d_dwx, &d_dr, &d_dbias}) b->poison();

  mt::SequenceInputs<T, float> in{};
  in.dims = d;
  in.wx = d_wx.get();
  in.r = d_r.get();
  in.bias = d_bias.get();
  in.dy = d_dy.get();
  const auto f = mt::forward_params(in, d_y.get(), nullptr, nullptr, nullptr, nullptr);
  REQUIRE(sl::per_token_forward(f, nullptr, 0, nullptr) == Status::ok);
  const auto b =
      mt::backward_params(in, false, d_dwx.get(), d_dr.get(), d_dbias.get(), nullptr, nullptr, nullptr, nullptr);
  mt::MisalignedWorkspace ws(sl::per_token_backward_workspace_size(b));
  REQUIRE(sl::per_token_backward(b, ws.get(), ws.bytes(), nullptr) == Status::ok);

  mt::SequenceInputs<double, double> hin{};
  hin.dims = d;
  hin.wx = wx.data();
  hin.r = r.data();
  hin.bias = bias.data();
  hin.dy = dy.data();
  std::vector<double> y(positions * H), dwx(positions * 4 * H), dr(r.size()), dbias(4 * H);
  REQUIRE(sl::reference::per_token_forward(mt::forward_params(hin, y.data(), nullptr, nullptr, nullptr, nullptr)) ==
          Status::ok);
  REQUIRE(sl::reference::per_token_backward(
              mt::backward_params(hin, false, dwx.data(), dr.data(), dbias.data(), nullptr, nullptr, nullptr,
                                  nullptr)) == Status::ok);
  const double tol = tolerance<T>();
  CHECK(mt::rel_error(mt::convert_to_double(d_y.download()), y) < tol);
  CHECK(mt::rel_error(mt::convert_to_double(d_dwx.download()), dwx) < tol);
  CHECK(mt::rel_error(mt::convert_to_double(d_dbias.download()), dbias) < tol);
  for (double v : mt::convert_to_double(d_dr.download())) CHECK(v == 0.0);
  if (extreme) {
    using Tol = mt::GateGradTolerance<T>;
    const auto out = mt::convert_to_double(d_dwx.download());
    const double ez = mt::worst_gate_error(out, dwx, positions, H, 2, Tol::floor);
    const double eo = mt::worst_gate_error(out, dwx, positions, H, 3, Tol::floor);
    MESSAGE("worst entry error, d raw_z " << ez << ", d raw_o " << eo << " (bound " << Tol::rel << ")");
    CHECK(ez < Tol::rel);
    CHECK(eo < Tol::rel);
  }
}

}  // namespace

TEST_CASE_TEMPLATE("per-token sLSTM on the device matches the host implementation", T, float, __half,
                   __nv_bfloat16) {
  mt::Rng rng(mt::fresh_seed());
  // size 1; H below a block of threads; more positions than dbias chunks (256); H past a
  // block (full: 1024 units, 4096 positions; small mode: 300 units, a second block in x)
  const std::vector<sl::Dims> shapes =
      mt::sizes<sl::Dims>({{1, 1, 1, 1}, {3, 5, 3, 20}, {3, 300, 2, 16}, {1, 4096, 8, 128}},
                          {{1, 1, 1, 1}, {3, 5, 3, 20}, {3, 300, 2, 16}, {2, 5, 3, 100}});
  for (const sl::Dims& d : shapes) check_case<T>(rng, d);
}

TEST_CASE_TEMPLATE("per-token sLSTM on the device at large |o|, |z|: d raw_o and d raw_z entry by entry", T, float,
                   __half, __nv_bfloat16) {
  // sigmoid'(o) and tanh'(z) from the raw gates: from a rounded sigmoid(o) or tanh(z) they
  // keep no digit in float once those round to 1 (o >= 17, |z| >= 10)
  mt::Rng rng(mt::fresh_seed());
  check_case<T>(rng, sl::Dims{2, 40, 2, 48}, /*extreme=*/true);
}

TEST_CASE("per-token sLSTM on the device: states, a small workspace and bad arguments launch nothing") {
  mt::Rng rng(mt::fresh_seed());
  const sl::Dims d{2, 3, 2, 16};
  const int64_t H = sl::hidden(d), positions = d.seq_len * d.batch;
  mt::DeviceBuffer<float> wx(mt::convert_to<float>(mt::normal_vector<double>(rng, positions * 4 * H))),
      r(d.heads * 4 * d.head_dim * d.head_dim), bias(4 * H), dy(positions * H), y(positions * H),
      dwx(positions * 4 * H), dr(r.size()), dbias(4 * H), state(d.batch * H);
  for (auto* b : {&y, &dwx, &dr, &dbias}) b->poison();
  mt::SequenceInputs<float, float> in{};
  in.dims = d;
  in.wx = wx.get();
  in.r = r.get();
  in.bias = bias.get();
  in.dy = dy.get();
  CHECK(sl::per_token_forward(mt::forward_params(in, y.get(), state.get(), state.get(), state.get(), state.get()),
                              nullptr, 0, nullptr) == Status::unsupported);
  CHECK(sl::per_token_forward(mt::forward_params(in, nullptr, nullptr, nullptr, nullptr, nullptr), nullptr, 0,
                              nullptr) == Status::invalid_argument);
  const auto b = mt::backward_params(in, false, dwx.get(), dr.get(), dbias.get(), nullptr, nullptr, nullptr, nullptr);
  const std::size_t need = sl::per_token_backward_workspace_size(b);
  REQUIRE(need > 0);
  mt::DeviceBuffer<unsigned char> small(need - 1);
  CHECK(sl::per_token_backward(b, small.get(), need - 1, nullptr) == Status::workspace_too_small);
  MOXE_TEST_CUDA(cudaDeviceSynchronize());
  for (float v : y.download()) CHECK(std::isnan(v));
  for (float v : dwx.download()) CHECK(std::isnan(v));
  for (float v : dr.download()) CHECK(std::isnan(v));
}
