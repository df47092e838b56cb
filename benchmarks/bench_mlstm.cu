// mLSTM chunkwise benchmarks: forward, and forward + backward, in bf16 (float states).
//   BM_mlstm_chunkwise_forward/{S}           B*S = 65536 tokens, NH 16, DQK 128, DV 256
//   BM_mlstm_chunkwise_forward_backward/{S}  the same shapes
//   BM_mlstm_chunkwise_forward_backward_tape/{S}  the forward keeps a tape (ForwardParams::tape)
//                                            that the backward reads: no gate scan and state
//                                            walk in the backward
//   BM_mlstm_step/{B}                        one decoding step, NH 16, DQK 128, DV 256
// S in {512, 2048, 8192, 65536} at a fixed 65536 tokens (S = 8192 is B = 8).
//
// Counters: FLOP/s counts the chunkwise algorithm's matrix products (causal halves counted
// as half, see chunkwise_flops); bytes/s counts the minimal traffic: every input read once
// and every output written once, states not included (none are read or written here).
#include <cuda_bf16.h>

#include <cstdint>
#include <vector>

#include "harness.cuh"
#include "moxe/mlstm/chunkwise.cuh"
#include "moxe/mlstm/step.cuh"

namespace {

using moxe::bench::DeviceMemory;
using moxe::bench::EventTimer;
using T = __nv_bfloat16;

constexpr int64_t kTokens = 65536, kHeads = 16, kDqk = 128, kDv = 256;
constexpr int kChunk = 128;  // triton_xl_chunk's default: like for like (NOTES section 1)

/// FLOPs of one forward per (head, token): intra-chunk Q K^T and P V (causal: half of L x L),
/// inter-chunk Q C_prev, and the chunk state update K^T V.
double forward_flops_per_head_token(double L, double dk, double dv) {
  return L * dk + L * dv + 2 * dk * dv + 2 * dk * dv;
}
/// FLOPs of one backward per (head, token): the forward's states and scores recomputed
/// (Q K^T, K^T V), dP = dH V^T, dq (dS K, C dH), dk (dS^T Q, dC V), dv (P^T dH, dC^T K) and
/// the state gradient Q^T dH.
double backward_flops_per_head_token(double L, double dk, double dv) {
  const double recompute = L * dk + 2 * dk * dv;
  const double intra = L * dv + L * dk + L * dk + L * dv;
  const double inter = 2 * dk * dv * 4;
  return recompute + intra + inter;
}
double chunkwise_flops(int64_t tokens, bool backward) {
  const double per = forward_flops_per_head_token(kChunk, kDqk, kDv) +
                     (backward ? backward_flops_per_head_token(kChunk, kDqk, kDv) : 0.0);
  return per * double(tokens) * double(kHeads);
}
/// Minimal bytes: forward reads q, k, v, igate, fgate and writes h; the backward also reads
/// dh and writes dq, dk, dv, digate, dfgate (and reads the inputs again).
double minimal_bytes(int64_t tokens, bool backward) {
  const double ht = double(tokens) * double(kHeads) * sizeof(T);
  const double fwd = ht * (2 * kDqk + kDv + 2) + ht * kDv;
  const double bwd = ht * (2 * kDqk + kDv + 2) + ht * kDv + ht * (2 * kDqk + kDv + 2);
  return backward ? fwd + bwd : fwd;
}

__global__ void fill_bf16(T* p, std::size_t n, uint32_t seed, float scale, float offset) {
  for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < n;
       i += std::size_t(gridDim.x) * blockDim.x) {
    uint32_t x = static_cast<uint32_t>(i) * 2654435761u ^ seed;
    x ^= x >> 15;
    x *= 2246822519u;
    x ^= x >> 13;
    const float u = (x & 0xFFFFFF) / float(0x1000000) * 2.f - 1.f;  // [-1, 1)
    p[i] = __float2bfloat16_rn(offset + scale * u);
  }
}

/// One set of inputs (rotated past L2); the outputs are shared by all sets.
struct Inputs {
  DeviceMemory q, k, v, ig, fg, dh;
};

Inputs make_inputs(int64_t tokens, int index) {
  const std::size_t qk = std::size_t(tokens) * kHeads * kDqk, vv = std::size_t(tokens) * kHeads * kDv;
  const std::size_t g = std::size_t(tokens) * kHeads;
  Inputs s;
  s.q = DeviceMemory(qk * sizeof(T));
  s.k = DeviceMemory(qk * sizeof(T));
  s.v = DeviceMemory(vv * sizeof(T));
  s.ig = DeviceMemory(g * sizeof(T));
  s.fg = DeviceMemory(g * sizeof(T));
  s.dh = DeviceMemory(vv * sizeof(T));
  const uint32_t seed = 977u * static_cast<uint32_t>(index + 1);
  fill_bf16<<<1024, 256>>>(s.q.as<T>(), qk, seed + 1, 1.f, 0.f);
  fill_bf16<<<1024, 256>>>(s.k.as<T>(), qk, seed + 2, 1.f, 0.f);
  fill_bf16<<<1024, 256>>>(s.v.as<T>(), vv, seed + 3, 1.f, 0.f);
  fill_bf16<<<1024, 256>>>(s.ig.as<T>(), g, seed + 4, 3.f, 0.f);
  fill_bf16<<<1024, 256>>>(s.fg.as<T>(), g, seed + 5, 2.f, 3.f);  // forget gates mostly open
  fill_bf16<<<1024, 256>>>(s.dh.as<T>(), vv, seed + 6, 1.f, 0.f);
  MOXE_BENCH_CUDA(cudaGetLastError());
  return s;
}

void run_chunkwise(benchmark::State& state, bool backward, bool taped = false) {
  const int64_t S = state.range(0);
  const int64_t B = kTokens / S;
  const std::size_t qk = std::size_t(kTokens) * kHeads * kDqk, vv = std::size_t(kTokens) * kHeads * kDv;
  const std::size_t g = std::size_t(kTokens) * kHeads;
  const std::size_t set_bytes = (2 * qk + 2 * vv + 2 * g) * sizeof(T);
  moxe::bench::Rotation<Inputs> inputs(set_bytes, [&](int i) { return make_inputs(kTokens, i); }, 4);
  DeviceMemory h(vv * sizeof(T)), dq(qk * sizeof(T)), dk(qk * sizeof(T)), dv(vv * sizeof(T)),
      di(g * sizeof(T)), df(g * sizeof(T));

  auto params = [&](const Inputs& in) {
    moxe::mlstm::BackwardParams<T, float> p;
    p.fwd.dims = moxe::mlstm::Dims{B, kHeads, S, kDqk, kDv};
    p.fwd.q = in.q.as<T>();
    p.fwd.k = in.k.as<T>();
    p.fwd.v = in.v.as<T>();
    p.fwd.igate = in.ig.as<T>();
    p.fwd.fgate = in.fg.as<T>();
    p.fwd.h = h.as<T>();
    p.fwd.chunk_size = kChunk;
    p.dh = in.dh.as<T>();
    p.dq = dq.as<T>();
    p.dk = dk.as<T>();
    p.dv = dv.as<T>();
    p.digate = di.as<T>();
    p.dfgate = df.as<T>();
    return p;
  };
  auto probe = params(inputs.next());
  DeviceMemory tape(taped ? moxe::mlstm::chunkwise_tape_size(probe.fwd) : 0);
  probe.fwd.tape = tape.as<void>();
  probe.fwd.tape_bytes = tape.bytes();
  const std::size_t fbytes = moxe::mlstm::chunkwise_forward_workspace_size(probe.fwd);
  const std::size_t bbytes = backward ? moxe::mlstm::chunkwise_backward_workspace_size(probe) : 0;
  DeviceMemory workspace(fbytes > bbytes ? fbytes : bbytes);
  state.counters["workspace_MiB"] = double(workspace.bytes()) / (1 << 20);
  state.counters["tape_MiB"] = double(tape.bytes()) / (1 << 20);

  cudaStream_t stream;
  MOXE_BENCH_CUDA(cudaStreamCreate(&stream));
  MOXE_BENCH_CUDA(cudaDeviceSynchronize());
  EventTimer timer;
  for (auto _ : state) {
    auto p = params(inputs.next());
    p.fwd.tape = probe.fwd.tape;
    p.fwd.tape_bytes = probe.fwd.tape_bytes;
    timer.start(stream);
    moxe::Status st = moxe::mlstm::chunkwise_forward(p.fwd, workspace.as<void>(), workspace.bytes(), stream);
    if (st == moxe::Status::ok && backward)
      st = moxe::mlstm::chunkwise_backward(p, workspace.as<void>(), workspace.bytes(), stream);
    const double seconds = timer.stop_seconds(stream);
    if (st != moxe::Status::ok) {
      state.SkipWithError(moxe::to_string(st));
      break;
    }
    state.SetIterationTime(seconds);
  }
  moxe::bench::set_counters(state, minimal_bytes(kTokens, backward), chunkwise_flops(kTokens, backward));
  MOXE_BENCH_CUDA(cudaStreamDestroy(stream));
}

/// S in {512, 2048, 8192, 65536} at a fixed 65536 tokens, event-timed, in milliseconds.
void sequence_lengths(benchmark::internal::Benchmark* b) {
  b->ArgName("S");
  for (int64_t S : {512, 2048, 8192, 65536}) b->Arg(S);
  b->UseManualTime()->Unit(benchmark::kMillisecond);
}

void BM_mlstm_chunkwise_forward(benchmark::State& state) { run_chunkwise(state, false); }
void BM_mlstm_chunkwise_forward_backward(benchmark::State& state) { run_chunkwise(state, true); }
void BM_mlstm_chunkwise_forward_backward_tape(benchmark::State& state) { run_chunkwise(state, true, true); }

BENCHMARK(BM_mlstm_chunkwise_forward)->Apply(sequence_lengths);
BENCHMARK(BM_mlstm_chunkwise_forward_backward)->Apply(sequence_lengths);
BENCHMARK(BM_mlstm_chunkwise_forward_backward_tape)->Apply(sequence_lengths);

/// One decoding step: every state is read and written once (C dominates), q, k, v and the
/// gates read, h written. FLOPs: the rank-1 update of C and C^T q (2 DQK DV each).
void BM_mlstm_step(benchmark::State& state) {
  const int64_t batch = state.range(0);
  const std::size_t slots = std::size_t(batch) * kHeads;
  const std::size_t state_bytes = slots * (kDqk * kDv + kDqk + 1) * sizeof(float);
  const std::size_t io_bytes = slots * (2 * kDqk + 2 * kDv + 2) * sizeof(T);
  struct Set {
    DeviceMemory q, k, v, ig, fg, c, n, m, h;
  };
  moxe::bench::Rotation<Set> sets(state_bytes + io_bytes, [&](int i) {
    Set s;
    s.q = DeviceMemory(slots * kDqk * sizeof(T));
    s.k = DeviceMemory(slots * kDqk * sizeof(T));
    s.v = DeviceMemory(slots * kDv * sizeof(T));
    s.ig = DeviceMemory(slots * sizeof(T));
    s.fg = DeviceMemory(slots * sizeof(T));
    s.c = DeviceMemory(slots * kDqk * kDv * sizeof(float));
    s.n = DeviceMemory(slots * kDqk * sizeof(float));
    s.m = DeviceMemory(slots * sizeof(float));
    s.h = DeviceMemory(slots * kDv * sizeof(T));
    const uint32_t seed = 131u * static_cast<uint32_t>(i + 1);
    fill_bf16<<<1024, 256>>>(s.q.as<T>(), slots * kDqk, seed + 1, 1.f, 0.f);
    fill_bf16<<<1024, 256>>>(s.k.as<T>(), slots * kDqk, seed + 2, 1.f, 0.f);
    fill_bf16<<<1024, 256>>>(s.v.as<T>(), slots * kDv, seed + 3, 1.f, 0.f);
    fill_bf16<<<1024, 256>>>(s.ig.as<T>(), slots, seed + 4, 3.f, 0.f);
    fill_bf16<<<1024, 256>>>(s.fg.as<T>(), slots, seed + 5, 2.f, 3.f);
    // states start cleared; one untimed step below makes them non-zero (never time zeros)
    MOXE_BENCH_CUDA(cudaMemset(s.c.as<void>(), 0, s.c.bytes()));
    MOXE_BENCH_CUDA(cudaMemset(s.n.as<void>(), 0, s.n.bytes()));
    MOXE_BENCH_CUDA(cudaMemset(s.m.as<void>(), 0, s.m.bytes()));
    MOXE_BENCH_CUDA(cudaGetLastError());
    return s;
  });
  auto params = [&](Set& s) {
    moxe::mlstm::StepParams<T, float> p{};
    p.batch = batch;
    p.heads = kHeads;
    p.dqk = kDqk;
    p.dv = kDv;
    p.q = s.q.as<T>();
    p.k = s.k.as<T>();
    p.v = s.v.as<T>();
    p.igate = s.ig.as<T>();
    p.fgate = s.fg.as<T>();
    p.c = s.c.as<float>();
    p.n = s.n.as<float>();
    p.m = s.m.as<float>();
    p.h = s.h.as<T>();
    return p;
  };
  cudaStream_t stream;
  MOXE_BENCH_CUDA(cudaStreamCreate(&stream));
  for (std::size_t i = 0; i < sets.size(); ++i) {  // one step from zero: states become non-zero
    Set& s = sets.next();
    if (moxe::mlstm::step(params(s), nullptr, 0, stream) != moxe::Status::ok) {
      state.SkipWithError("step failed");
      return;
    }
  }
  MOXE_BENCH_CUDA(cudaStreamSynchronize(stream));
  EventTimer timer;
  for (auto _ : state) {
    const auto p = params(sets.next());
    timer.start(stream);
    const moxe::Status st = moxe::mlstm::step(p, nullptr, 0, stream);
    const double seconds = timer.stop_seconds(stream);
    if (st != moxe::Status::ok) {
      state.SkipWithError(moxe::to_string(st));
      break;
    }
    state.SetIterationTime(seconds);
  }
  moxe::bench::set_counters(state, 2.0 * state_bytes + io_bytes, 4.0 * slots * kDqk * kDv);
  MOXE_BENCH_CUDA(cudaStreamDestroy(stream));
}
BENCHMARK(BM_mlstm_step)->ArgName("B")->Arg(1)->Arg(8)->Arg(64)->Arg(256)->UseManualTime()->Unit(benchmark::kMicrosecond);

}  // namespace

MOXE_BENCHMARK_MAIN();
