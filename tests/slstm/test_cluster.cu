// Device tests of the sLSTM cluster path (ForwardParams::cluster_size, sm_90): on a device
// of compute capability 9.0 or more, the forward and the backward against the double
// reference for every element type at the split-head shapes (B 1, 4, 9; DH 64, 128, 256;
// S 1, 7, 33; clusters of 2, 4 and 8 where head_dim / cluster_size is a whole 16-unit
// slice), and bit for bit against the split path at units_per_block = head_dim /
// cluster_size (the same products, the same rounding of y and dgates through T: only the
// exchange differs), tape, final states and every gradient included; the in-place float
// step; graph capture. Below 9.0 (the GPU simulator is sm_80-like) a valid cluster_size is
// unsupported and writes nothing; bad cluster sizes are rejected on every device.
#include <doctest/doctest.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
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

/// The forward inputs of one SequenceProblem, uploaded.
template <class T>
struct Problem : moxe::test::SequenceProblem<T> {
  using Base = moxe::test::SequenceProblem<T>;
  DeviceBuffer<T> d_wx, d_r, d_bias, d_dy;
  DeviceBuffer<float> d_y0, d_c0, d_n0, d_m0, d_dy_last, d_dc_last, d_dn_last, d_dm_last;

  Problem(moxe::test::Rng& rng, sl::Dims dims, bool with_init)
      : Base(rng, dims, with_init),
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

  moxe::test::SequenceInputs<T, float> device() const {
    const float* none = nullptr;
    const bool init = this->init;
    return {this->d,
            d_wx.get(), d_r.get(), d_bias.get(),
            init ? d_y0.get() : none, init ? d_c0.get() : none, init ? d_n0.get() : none, init ? d_m0.get() : none,
            d_dy.get(), d_dy_last.get(), d_dc_last.get(), d_dn_last.get(), d_dm_last.get()};
  }
};

int compute_capability_major() {
  int device = 0, major = 0;
  MOXE_TEST_CUDA(cudaGetDevice(&device));
  MOXE_TEST_CUDA(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  return major;
}

std::size_t optin_smem() {
  int device = 0, optin = 0;
  MOXE_TEST_CUDA(cudaGetDevice(&device));
  MOXE_TEST_CUDA(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return static_cast<std::size_t>(optin);
}

template <class T>
bool all_poison(const std::vector<T>& v) {
  const auto* bytes = reinterpret_cast<const unsigned char*>(v.data());
  for (std::size_t i = 0; i < v.size() * sizeof(T); ++i)
    if (bytes[i] != 0xFF) return false;
  return true;
}

template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

/// out[blockIdx.x] = the CTA's rank in its cluster as the hardware numbers it (sm_90).
template <int = 0>
__global__ void cluster_rank_kernel(int* out) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  unsigned rank;
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(rank));
  if (threadIdx.x == 0) out[blockIdx.x] = static_cast<int>(rank);
#else
  (void)out;
#endif
}

/// One device forward's outputs (poisoned before the run), and its status.
template <class T>
struct ForwardRun {
  Status status = Status::ok;
  std::vector<T> y;
  std::vector<float> yl, cl, nl, ml, tape;
};

/// The device forward of `pb` with `units` per block and `cluster` CTAs per cluster (0: the
/// split path), with the tape when `tape`.
template <class T>
ForwardRun<T> run_forward(const Problem<T>& pb, int units, int cluster, bool tape) {
  const int64_t U = pb.units(), S = pb.d.seq_len;
  DeviceBuffer<T> y(S * U);
  DeviceBuffer<float> yl(U), cl(U), nl(U), ml(U), tp(7 * S * U);
  for (auto* b : {&yl, &cl, &nl, &ml, &tp}) b->poison();
  y.poison();
  auto p = forward_params(pb.device(), y.get(), yl.get(), cl.get(), nl.get(), ml.get());
  p.units_per_block = units;
  p.cluster_size = cluster;
  if (tape) {
    const sl::TapeElements e = sl::tape_elements(pb.d);
    p.tape_gates = tp.get();
    p.tape_c = tp.get() + e.gates;
    p.tape_n = p.tape_c + e.state;
    p.tape_m = p.tape_n + e.state;
  }
  ForwardRun<T> r;
  r.status = sl::sequence_forward(p, nullptr, 0, nullptr);
  MOXE_TEST_CUDA(cudaDeviceSynchronize());
  r.y = y.download();
  r.yl = yl.download();
  r.cl = cl.download();
  r.nl = nl.download();
  r.ml = ml.download();
  r.tape = tp.download();
  return r;
}

/// One device backward's gradients (T and float buffers poisoned before the run), and its
/// status.
template <class T>
struct BackwardRun {
  Status status = Status::ok;
  std::vector<T> dwx, dr, dbias;
  std::vector<float> dyi, dci, dni, dmi;
};

/// The device backward of `pb` (with the upstream gradients of the final states, the
/// initial-state gradients, the forward replayed) at `units` and `cluster` (0: split path).
template <class T>
BackwardRun<T> run_backward(const Problem<T>& pb, int units, int cluster) {
  const int64_t U = pb.units(), H = sl::hidden(pb.d), DH = pb.d.head_dim;
  DeviceBuffer<T> dwx(pb.d.seq_len * pb.d.batch * 4 * H), dr(pb.d.heads * 4 * DH * DH), dbias(4 * H);
  DeviceBuffer<float> dyi(U), dci(U), dni(U), dmi(U);
  for (auto* b : {&dwx, &dr, &dbias}) b->poison();
  for (auto* b : {&dyi, &dci, &dni, &dmi}) b->poison();
  sl::BackwardParams<T, float> p =
      backward_params(pb.device(), true, dwx.get(), dr.get(), dbias.get(), dyi.get(), dci.get(), dni.get(), dmi.get());
  p.fwd.units_per_block = units;
  p.fwd.cluster_size = cluster;
  const std::size_t bytes = sl::sequence_backward_workspace_size(p);
  moxe::test::MisalignedWorkspace ws(bytes);
  BackwardRun<T> r;
  r.status = sl::sequence_backward(p, ws.get(), ws.bytes(), nullptr);
  MOXE_TEST_CUDA(cudaDeviceSynchronize());
  r.dwx = dwx.download();
  r.dr = dr.download();
  r.dbias = dbias.download();
  r.dyi = dyi.download();
  r.dci = dci.download();
  r.dni = dni.download();
  r.dmi = dmi.download();
  return r;
}

}  // namespace

TEST_CASE("slstm cluster (sm_90): launch_cluster, and the hardware's rank is cluster_block's") {
  if (compute_capability_major() < 9) {
    MESSAGE("cluster launch: device below compute capability 9.0, not run");
    return;
  }
  for (int cs : {2, 4, 8}) {
    CAPTURE(cs);
    int clusters = 0;
    REQUIRE(moxe::max_active_clusters(cluster_rank_kernel<>, static_cast<unsigned>(cs), 32, 0, &clusters) ==
            Status::ok);
    CHECK(clusters > 0);
    const int blocks = 5 * cs;
    DeviceBuffer<int> out(static_cast<std::size_t>(blocks));
    out.poison();
    REQUIRE(moxe::launch_cluster(cluster_rank_kernel<>, dim3(static_cast<unsigned>(blocks)), 32, 0, nullptr,
                                 static_cast<unsigned>(cs), out.get()) == Status::ok);
    MOXE_TEST_CUDA(cudaDeviceSynchronize());
    const std::vector<int> rank = out.download();
    bool same = true;
    for (int b = 0; b < blocks; ++b) same = same && rank[b] == sl::detail::cluster_block(b, cs).rank;
    CHECK(same);
  }
}

TEST_CASE_TEMPLATE("slstm cluster forward (sm_90): the reference, and the split path bit for bit", T, float,
                   __nv_bfloat16, __half) {
  if (compute_capability_major() < 9) {
    MESSAGE("cluster forward: device below compute capability 9.0, not run (the unsupported case checks it)");
    return;
  }
  const auto seed = moxe::test::fresh_seed();
  INFO("seed " << seed);
  moxe::test::Rng rng(seed);
  const std::size_t optin = optin_smem();
  const double tol = moxe::test::SlstmTolerance<T>::fwd;
  int ran = 0, too_large = 0;
  for (int64_t S : {1, 7, 33}) {
    for (int64_t B : {1, 4, 9, 16, 33}) {  // 16: a full tile; 33: three tiles, the last of one row
      for (int64_t DH : {64, 96, 128, 192, 256}) {  // 96, 192: units of 48, 96 (non-power-of-two slices)
        for (int cs : {2, 4, 8}) {
          const int units = sl::detail::cluster_units(DH, cs);
          if (units == 0) continue;  // DH 64 over 8 CTAs: 8 units, not a whole tile
          CAPTURE(S);
          CAPTURE(B);
          CAPTURE(DH);
          CAPTURE(cs);
          const sl::Dims d{S, B, 2, DH};
          const bool init = (S + B) % 2 == 1, tape = S == 7;
          const Problem<T> pb(rng, d, init);
          const ForwardRun<T> c = run_forward(pb, 0, cs, tape);
          const std::size_t smem = sl::detail::forward_cluster_smem(DH, units, static_cast<int>(sizeof(T)),
                                                                    sl::detail::uses_tensor_cores_v<T>)
                                       .bytes;
          if (smem > optin) {  // e.g. bf16 DH 256 over 2 CTAs: a 128-unit r slice of 270 KB
            CHECK(c.status == Status::unsupported);
            CHECK(all_poison(c.y));
            CHECK(all_poison(c.yl));
            ++too_large;
            continue;
          }
          REQUIRE(c.status == Status::ok);
          ++ran;
          std::vector<double> y(S * pb.units()), yl(pb.units()), cl(pb.units()), nl(pb.units()), ml(pb.units());
          REQUIRE(sl::reference::forward(
                      forward_params(pb.host(), y.data(), yl.data(), cl.data(), nl.data(), ml.data())) == Status::ok);
          CHECK(moxe::test::rel_error(moxe::test::convert_to_double(c.y), y) < tol);
          CHECK(moxe::test::rel_error(moxe::test::to_double(c.yl), yl) < tol);
          CHECK(moxe::test::rel_error(moxe::test::to_double(c.cl), cl) < tol);
          CHECK(moxe::test::rel_error(moxe::test::to_double(c.nl), nl) < tol);
          CHECK(moxe::test::rel_error(moxe::test::to_double(c.ml), ml) < tol);
          // the split path at the same units: the same bits (y, final states, tape)
          const ForwardRun<T> s = run_forward(pb, units, 0, tape);
          REQUIRE(s.status == Status::ok);
          CHECK(same_bits(c.y, s.y));
          CHECK(same_bits(c.yl, s.yl));
          CHECK(same_bits(c.cl, s.cl));
          CHECK(same_bits(c.nl, s.nl));
          CHECK(same_bits(c.ml, s.ml));
          CHECK(same_bits(c.tape, s.tape));
          if (!tape) CHECK(all_poison(c.tape));
        }
      }
    }
  }
  MESSAGE(ran << " cluster runs, " << too_large << " shapes beyond the shared memory (unsupported)");
  CHECK(ran > 0);
}

TEST_CASE_TEMPLATE("slstm cluster backward (sm_90): the reference, and the split path bit for bit", T, float,
                   __nv_bfloat16, __half) {
  if (compute_capability_major() < 9) {
    MESSAGE("cluster backward: device below compute capability 9.0, not run (the unsupported case checks it)");
    return;
  }
  const auto seed = moxe::test::fresh_seed();
  INFO("seed " << seed);
  moxe::test::Rng rng(seed);
  const std::size_t optin = optin_smem();
  const double tol = moxe::test::SlstmTolerance<T>::bwd;
  constexpr int kElem = static_cast<int>(sizeof(T));
  constexpr bool kTC = sl::detail::uses_tensor_cores_v<T>;
  int ran = 0, too_large = 0;
  for (int64_t S : {1, 7, 33}) {
    for (int64_t B : {1, 4, 9, 16, 33}) {  // 16: a full tile; 33: three tiles, the last of one row
      for (int64_t DH : {64, 96, 128, 192, 256}) {  // 96, 192: units of 48, 96 (non-power-of-two slices)
        for (int cs : {2, 4, 8}) {
          const int units = sl::detail::cluster_units(DH, cs);
          if (units == 0) continue;
          CAPTURE(S);
          CAPTURE(B);
          CAPTURE(DH);
          CAPTURE(cs);
          const Problem<T> pb(rng, sl::Dims{S, B, 2, DH}, (S + B) % 2 == 1);
          const BackwardRun<T> c = run_backward(pb, 0, cs);
          // the replay (forward) and the backward kernel must both fit
          const std::size_t smem = std::max(sl::detail::forward_cluster_smem(DH, units, kElem, kTC).bytes,
                                            sl::detail::backward_cluster_smem(DH, units, kElem, kTC).bytes);
          if (smem > optin) {
            CHECK(c.status == Status::unsupported);
            CHECK(all_poison(c.dwx));
            CHECK(all_poison(c.dr));
            CHECK(all_poison(c.dyi));
            ++too_large;
            continue;
          }
          REQUIRE(c.status == Status::ok);
          ++ran;
          const moxe::test::ReferenceGradients ref = moxe::test::reference_gradients(pb, true);
          CHECK(moxe::test::rel_error(moxe::test::convert_to_double(c.dwx), ref.dwx) < tol);
          CHECK(moxe::test::rel_error(moxe::test::convert_to_double(c.dr), ref.dr) < tol);
          CHECK(moxe::test::rel_error(moxe::test::convert_to_double(c.dbias), ref.dbias) < tol);
          CHECK(moxe::test::rel_error(moxe::test::to_double(c.dyi), ref.dyi) < tol);
          CHECK(moxe::test::rel_error(moxe::test::to_double(c.dci), ref.dci) < tol);
          CHECK(moxe::test::rel_error(moxe::test::to_double(c.dni), ref.dni) < tol);
          CHECK(moxe::test::rel_error(moxe::test::to_double(c.dmi), ref.dmi) < tol);
          const BackwardRun<T> s = run_backward(pb, units, 0);
          REQUIRE(s.status == Status::ok);
          CHECK(same_bits(c.dwx, s.dwx));
          CHECK(same_bits(c.dr, s.dr));
          CHECK(same_bits(c.dbias, s.dbias));
          CHECK(same_bits(c.dyi, s.dyi));
          CHECK(same_bits(c.dci, s.dci));
          CHECK(same_bits(c.dni, s.dni));
          CHECK(same_bits(c.dmi, s.dmi));
        }
      }
    }
  }
  MESSAGE(ran << " cluster runs, " << too_large << " shapes beyond the shared memory (unsupported)");
  CHECK(ran > 0);
}

TEST_CASE("slstm cluster step (sm_90): in place with y_out == y equals the split path's, and graph capture") {
  if (compute_capability_major() < 9) {
    MESSAGE("cluster step: device below compute capability 9.0, not run");
    return;
  }
  const auto seed = moxe::test::fresh_seed();
  INFO("seed " << seed);
  moxe::test::Rng rng(seed);
  // in place: every CTA reads the whole y state at t = 0 while its peers write their units
  // of y_out == y; the launcher adds a cluster barrier between the two
  const sl::Dims d{4, 9, 2, 64};
  const Problem<float> pb(rng, d, true);
  std::vector<std::vector<float>> finals[2];
  for (int cluster : {0, 2}) {
    CAPTURE(cluster);
    DeviceBuffer<float> y(moxe::test::convert_to<float>(pb.y0)), c(moxe::test::convert_to<float>(pb.c0)),
        n(moxe::test::convert_to<float>(pb.n0)), m(moxe::test::convert_to<float>(pb.m0));
    for (int64_t t = 0; t < d.seq_len; ++t) {
      sl::StepParams<float, float> s = step_params(pb.device(), t, y.get(), c.get(), n.get(), m.get(), y.get());
      s.units_per_block = 32;
      s.cluster_size = cluster;
      REQUIRE(sl::step(s, nullptr, 0, nullptr) == Status::ok);
    }
    finals[cluster != 0] = {y.download(), c.download(), n.download(), m.download()};
  }
  for (int i = 0; i < 4; ++i) CHECK(same_bits(finals[0][i], finals[1][i]));

  // the cluster launch captured into a graph gives the direct launch's bits
  const Problem<__nv_bfloat16> pg(rng, sl::Dims{7, 3, 2, 128}, true);
  DeviceBuffer<__nv_bfloat16> y_direct(7 * pg.units()), y_graph(7 * pg.units());
  y_graph.poison();
  auto p = forward_params(pg.device(), y_direct.get(), nullptr, nullptr, nullptr, nullptr);
  p.cluster_size = 4;
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
  CHECK(same_bits(y_direct.download(), y_graph.download()));
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(stream);
}

TEST_CASE_TEMPLATE("slstm cluster: bad cluster sizes, and below sm_90 any, launch nothing and write nothing", T, float,
                   __nv_bfloat16, __half) {
  const auto seed = moxe::test::fresh_seed();
  INFO("seed " << seed);
  moxe::test::Rng rng(seed);
  const sl::Dims d{3, 2, 2, 64};  // DH 64: clusters of 2 (32 units) and 4 (16 units) are valid
  const Problem<T> pb(rng, d, true);
  const int64_t U = pb.units();
  DeviceBuffer<T> y(3 * U);
  DeviceBuffer<float> yl(U), cl(U), nl(U), ml(U), tape(7 * 3 * U);
  for (auto* b : {&yl, &cl, &nl, &ml, &tape}) b->poison();
  y.poison();
  const auto good = forward_params(pb.device(), y.get(), yl.get(), cl.get(), nl.get(), ml.get());
  auto expect_forward = [&](Status want, int cluster, int units, bool with_tape) {
    CAPTURE(cluster);
    CAPTURE(units);
    CAPTURE(with_tape);
    auto p = good;
    p.cluster_size = cluster;
    p.units_per_block = units;
    if (with_tape) {
      p.tape_gates = tape.get();
      p.tape_c = tape.get() + 4 * 3 * U;
      p.tape_n = p.tape_c + 3 * U;
      p.tape_m = p.tape_n + 3 * U;
    }
    CHECK(sl::sequence_forward(p, nullptr, 0, nullptr) == want);
  };
  expect_forward(Status::invalid_argument, -1, 0, false);
  for (int cluster : {1, 3, 5, 16}) expect_forward(Status::unsupported, cluster, 0, false);
  expect_forward(Status::unsupported, 8, 0, false);   // 8 units per CTA: not a whole tile
  expect_forward(Status::unsupported, 2, 16, false);  // units_per_block disagrees (2 CTAs: 32)
  if (compute_capability_major() < 9) {
    for (int cluster : {2, 4}) {
      expect_forward(Status::unsupported, cluster, 0, false);
      expect_forward(Status::unsupported, cluster, 0, true);
      expect_forward(Status::unsupported, cluster, 64 / cluster, false);
    }
  }
  // the decoding step: states in place, read and (had it run) written
  DeviceBuffer<float> sy(moxe::test::convert_to<float>(pb.y0)), sc(moxe::test::convert_to<float>(pb.c0)),
      sn(moxe::test::convert_to<float>(pb.n0)), sm(moxe::test::convert_to<float>(pb.m0));
  DeviceBuffer<T> y_out(U);
  y_out.poison();
  auto expect_step = [&](Status want, int cluster) {
    CAPTURE(cluster);
    sl::StepParams<T, float> s = step_params(pb.device(), 0, sy.get(), sc.get(), sn.get(), sm.get(), y_out.get());
    s.cluster_size = cluster;
    CHECK(sl::step(s, nullptr, 0, nullptr) == want);
  };
  expect_step(Status::invalid_argument, -4);
  expect_step(Status::unsupported, 3);
  if (compute_capability_major() < 9) expect_step(Status::unsupported, 2);
  // the backward (its replay and its recurrent kernel run as clusters)
  DeviceBuffer<T> dwx(pb.wx.size()), dr(pb.r.size()), dbias(pb.bias.size());
  DeviceBuffer<float> dyi(U), dci(U), dni(U), dmi(U);
  for (auto* b : {&dwx, &dr, &dbias}) b->poison();
  for (auto* b : {&dyi, &dci, &dni, &dmi}) b->poison();
  sl::BackwardParams<T, float> bp =
      backward_params(pb.device(), true, dwx.get(), dr.get(), dbias.get(), dyi.get(), dci.get(), dni.get(), dmi.get());
  const std::size_t bytes = sl::sequence_backward_workspace_size(bp);
  moxe::test::MisalignedWorkspace ws(bytes);
  auto expect_backward = [&](Status want, int cluster) {
    CAPTURE(cluster);
    auto b = bp;
    b.fwd.cluster_size = cluster;
    CHECK(sl::sequence_backward(b, ws.get(), ws.bytes(), nullptr) == want);
  };
  expect_backward(Status::invalid_argument, -2);
  expect_backward(Status::unsupported, 3);
  expect_backward(Status::unsupported, 8);
  if (compute_capability_major() < 9) {
    expect_backward(Status::unsupported, 2);
    expect_backward(Status::unsupported, 4);
  }
  MOXE_TEST_CUDA(cudaDeviceSynchronize());
  CHECK(all_poison(dwx.download()));
  CHECK(all_poison(dr.download()));
  CHECK(all_poison(dbias.download()));
  CHECK(all_poison(dyi.download()));
  CHECK(all_poison(dmi.download()));
  CHECK(all_poison(y.download()));
  CHECK(all_poison(yl.download()));
  CHECK(all_poison(cl.download()));
  CHECK(all_poison(nl.download()));
  CHECK(all_poison(ml.download()));
  CHECK(all_poison(tape.download()));
  CHECK(all_poison(y_out.download()));
  CHECK(same_bits(sy.download(), moxe::test::convert_to<float>(pb.y0)));
  CHECK(same_bits(sc.download(), moxe::test::convert_to<float>(pb.c0)));
  CHECK(same_bits(sn.download(), moxe::test::convert_to<float>(pb.n0)));
  CHECK(same_bits(sm.download(), moxe::test::convert_to<float>(pb.m0)));
}
