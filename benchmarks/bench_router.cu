// Router benchmarks: the fused gate (forward, backward) against the same computation
// composed from separate kernels (conditioned softmax + entropy, top-k, loss reductions),
// T = 65536 tokens, bf16 logits, E in {4, 8, 64, 256}, k in {1, 2, 8}. The gate is memory
// bound: bytes/s and frac_copy_bw (with MOXE_COPY_BW_GBPS set) are the figures to read.
#include <cuda_bf16.h>

#include <algorithm>
#include <vector>

#include "harness.cuh"
#include "moxe/router/gate.cuh"
#include "moxe/router/topk.cuh"

namespace {

using moxe::bench::DeviceMemory;
using moxe::bench::EventTimer;
using Bf16 = __nv_bfloat16;
using moxe::router::Modulation;

constexpr int64_t kTokens = 65536;

__global__ void fill_logits(Bf16* p, int64_t n, uint32_t seed) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    uint32_t x = static_cast<uint32_t>(i) * 2654435761u ^ seed;
    x ^= x >> 15;
    x *= 2246822519u;
    x ^= x >> 13;
    p[i] = __float2bfloat16(static_cast<float>(x & 0xffffu) / 65536.f * 6.f - 3.f);
  }
}

/// One problem: inputs, saved outputs, gradients, workspace.
struct GateSet {
  int experts, top_k;
  DeviceMemory logits, difficulty_logit, probs, lse, entropy, difficulty, topk_idx, topk_prob, topk_weight, counts,
      losses, dweight, dlogits, ddifficulty, workspace;
  GateSet(int e, int k, int seed)
      : experts(e),
        top_k(k),
        logits(kTokens * e * sizeof(Bf16)),
        difficulty_logit(kTokens * sizeof(Bf16)),
        probs(kTokens * e * sizeof(float)),
        lse(kTokens * sizeof(float)),
        entropy(kTokens * sizeof(float)),
        difficulty(kTokens * sizeof(float)),
        topk_idx(kTokens * k * sizeof(int32_t)),
        topk_prob(kTokens * k * sizeof(float)),
        topk_weight(kTokens * k * sizeof(float)),
        counts(e * sizeof(int32_t)),
        losses(4 * sizeof(float)),
        dweight(kTokens * k * sizeof(float)),
        dlogits(kTokens * e * sizeof(Bf16)),
        ddifficulty(kTokens * sizeof(Bf16)) {
    fill_logits<<<1024, 256>>>(logits.as<Bf16>(), kTokens * e, 17u + seed);
    fill_logits<<<256, 256>>>(difficulty_logit.as<Bf16>(), kTokens, 91u + seed);
    MOXE_BENCH_CUDA(cudaMemset(dweight.as<void>(), 0x3c, dweight.bytes()));  // ~0.01 each
    const std::size_t ws = std::max(moxe::router::gate_forward_workspace_size(fwd()),
                                    moxe::router::gate_backward_workspace_size(bwd()));
    workspace = DeviceMemory(std::max<std::size_t>(ws, (4 + e) * sizeof(float)));  // the composed form's sums too
    MOXE_BENCH_CUDA(cudaDeviceSynchronize());
  }
  moxe::router::GateForwardParams<Bf16, float> fwd() const {
    moxe::router::GateForwardParams<Bf16, float> p{};
    p.dims = {kTokens, experts, experts / 2, top_k};
    p.logits = logits.as<Bf16>();
    p.difficulty_logit = difficulty_logit.as<Bf16>();
    p.modulation = Modulation::standard;
    p.gamma = 1.f;
    p.tau = 0.5f;
    p.probs = probs.as<float>();
    p.lse = lse.as<float>();
    p.entropy = entropy.as<float>();
    p.difficulty = difficulty.as<float>();
    p.topk_idx = topk_idx.as<int32_t>();
    p.topk_prob = topk_prob.as<float>();
    p.topk_weight = topk_weight.as<float>();
    p.expert_counts = counts.as<int32_t>();
    p.losses = losses.as<float>();
    return p;
  }
  moxe::router::GateBackwardParams<Bf16, float> bwd() const {
    moxe::router::GateBackwardParams<Bf16, float> b{};
    b.fwd = fwd();
    b.dweight = dweight.as<float>();
    b.c_z = 1e-3f;
    b.c_lb = 1e-2f;
    b.c_d = 1e-2f;
    b.c_g = 1e-2f;
    b.dlogits = dlogits.as<Bf16>();
    b.ddifficulty_logit = ddifficulty.as<Bf16>();
    return b;
  }
};

double forward_bytes(int e, int k) {
  return double(kTokens) * (e * (2.0 + 4.0) + 2.0 + 3 * 4.0 + k * 12.0);
}
double backward_bytes(int e, int k, bool mass_pass) {
  return double(kTokens) * (e * 2.0 * (mass_pass ? 2 : 1) + e * 2.0 + 2.0 * 2 + k * 12.0 * 2);
}

// ---- the composed baseline: separate kernels, written plainly ---------------------------------

/// Conditioned softmax, lse, entropy, difficulty: one warp per token.
__global__ void composed_softmax(const Bf16* logits, const Bf16* dlogit, int64_t tokens, int experts, int em,
                                 float gamma, float* probs, float* lse_out, float* ent_out, float* d_out) {
  const int lane = threadIdx.x % 32;
  const int64_t t = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / 32;
  if (t >= tokens) return;
  const float d = moxe::math::sigmoid(__bfloat162float(dlogit[t]));
  const float s = gamma * d;
  moxe::math::MaxSum<float> c, q;
  for (int e = lane; e < experts; e += 32) {
    const float z = __bfloat162float(logits[t * experts + e]);
    c.add(e < em ? z + s : z - s);
    q.add(z);
  }
  const float lse = moxe::warp_merge(c).log_sum_exp(), lq = moxe::warp_merge(q).log_sum_exp();
  float h = 0.f;
  for (int e = lane; e < experts; e += 32) {
    const float z = __bfloat162float(logits[t * experts + e]);
    probs[t * experts + e] = expf((e < em ? z + s : z - s) - lse);
    h += moxe::router::detail::entropy_term(expf(z - lq));
  }
  h = moxe::warp_sum(h) / logf(float(experts));
  if (lane == 0) {
    lse_out[t] = lse;
    ent_out[t] = h;
    d_out[t] = d;
  }
}

/// Loss sums with float atomics (a baseline, not deterministic): lse^2, (d - H)^2, masses, loads.
__global__ void composed_loss_sums(const float* probs, const float* lse, const float* ent, const float* d,
                                   const int32_t* idx, const float* prob_k, int64_t tokens, int experts, int em, int k,
                                   float* sums /* [4 + E] */) {
  const int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (t >= tokens) return;
  float m = 0.f, s = 0.f;
  for (int e = 0; e < experts; ++e) (e < em ? m : s) += probs[t * experts + e];
  atomicAdd(&sums[0], lse[t] * lse[t]);
  atomicAdd(&sums[1], (d[t] - ent[t]) * (d[t] - ent[t]));
  atomicAdd(&sums[2], m);
  atomicAdd(&sums[3], s);
  for (int j = 0; j < k; ++j) atomicAdd(&sums[4 + idx[t * k + j]], prob_k[t * k + j]);
}

/// Backward from the saved probs: one warp per token.
__global__ void composed_backward(const Bf16* logits, const Bf16* dlogit, const float* probs, const float* lse,
                                  const float* ent, const int32_t* idx, const float* prob_k, const float* dw,
                                  const float* sums, int64_t tokens, int experts, int em, int k, float gamma,
                                  Bf16* dz, Bf16* da) {
  const int lane = threadIdx.x % 32;
  const int64_t t = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / 32;
  if (t >= tokens) return;
  const float inv_t = 1.f / float(tokens), slots = float(tokens) * k;
  const float gm = 1e-2f * moxe::loss::detail::group_loss_term_grad(sums[2] * inv_t, 2.f) * inv_t;
  const float gs = 1e-2f * moxe::loss::detail::group_loss_term_grad(sums[3] * inv_t, 2.f) * inv_t;
  float total = 0.f, wdot = 0.f;
  for (int j = 0; j < k; ++j) total += prob_k[t * k + j];
  for (int j = 0; j < k; ++j) wdot += prob_k[t * k + j] / total * dw[t * k + j];
  const float d = moxe::math::sigmoid(__bfloat162float(dlogit[t]));
  float pdot = 0.f, mass_m = 0.f, mass_s = 0.f, qdot = 0.f;
  moxe::math::MaxSum<float> q;
  for (int e = lane; e < experts; e += 32) {
    const float p = probs[t * experts + e];
    float g = e < em ? gm : gs;
    for (int j = 0; j < k; ++j)
      if (idx[t * k + j] == e)
        g += (dw[t * k + j] - wdot) / total + 1e-2f * moxe::loss::detail::load_balance_grad(sums[4 + e] / slots, float(experts), slots);
    pdot += p * g;
    (e < em ? mass_m : mass_s) += p;
    q.add(__bfloat162float(logits[t * experts + e]));
  }
  pdot = moxe::warp_sum(pdot);
  const float lq = moxe::warp_merge(q).log_sum_exp();
  const float gh = -1e-2f * 2.f * (d - ent[t]) * inv_t / logf(float(experts));
  for (int e = lane; e < experts; e += 32) {
    const float qe = expf(__bfloat162float(logits[t * experts + e]) - lq);
    qdot += qe * gh * moxe::router::detail::entropy_term_grad(qe);
  }
  qdot = moxe::warp_sum(qdot);
  float ds = 0.f;
  for (int e = lane; e < experts; e += 32) {
    const float p = probs[t * experts + e];
    float g = e < em ? gm : gs;
    for (int j = 0; j < k; ++j)
      if (idx[t * k + j] == e)
        g += (dw[t * k + j] - wdot) / total + 1e-2f * moxe::loss::detail::load_balance_grad(sums[4 + e] / slots, float(experts), slots);
    const float dzc = p * (g - pdot + 2e-3f * inv_t * lse[t]);
    ds += e < em ? dzc : -dzc;
    const float qe = expf(__bfloat162float(logits[t * experts + e]) - lq);
    dz[t * experts + e] = __float2bfloat16(dzc + qe * (gh * moxe::router::detail::entropy_term_grad(qe) - qdot));
  }
  ds = moxe::warp_sum(ds);
  if (lane == 0) da[t] = __float2bfloat16((1e-2f * 2.f * (d - ent[t]) * inv_t + ds * gamma) * d * (1.f - d));
}

std::vector<GateSet> make_sets(int e, int k) {
  std::vector<GateSet> sets;
  const double per_set = double(kTokens) * e * 6.0;
  const int n = static_cast<int>(std::min(8.0, std::max(2.0, 3.0 * moxe::bench::l2_bytes() / per_set)));
  for (int i = 0; i < n; ++i) sets.emplace_back(e, k, i);
  return sets;
}

bool valid_shape(benchmark::State& state, int e, int k) {
  if (k > e) {
    state.SkipWithError("k > E");
    return false;
  }
  return true;
}

void BM_gate_forward_fused(benchmark::State& state) {
  const int e = int(state.range(0)), k = int(state.range(1));
  if (!valid_shape(state, e, k)) return;
  auto sets = make_sets(e, k);
  cudaStream_t stream;
  MOXE_BENCH_CUDA(cudaStreamCreate(&stream));
  EventTimer timer;
  std::size_t i = 0;
  for (auto _ : state) {
    GateSet& s = sets[i++ % sets.size()];
    timer.start(stream);
    if (moxe::router::gate_forward(s.fwd(), s.workspace.as<void>(), s.workspace.bytes(), stream) != moxe::Status::ok)
      state.SkipWithError("gate_forward failed");
    state.SetIterationTime(timer.stop_seconds(stream));
  }
  moxe::bench::set_counters(state, forward_bytes(e, k), 0);
  MOXE_BENCH_CUDA(cudaStreamDestroy(stream));
}

void BM_gate_forward_composed(benchmark::State& state) {
  const int e = int(state.range(0)), k = int(state.range(1));
  if (!valid_shape(state, e, k)) return;
  auto sets = make_sets(e, k);
  cudaStream_t stream;
  MOXE_BENCH_CUDA(cudaStreamCreate(&stream));
  EventTimer timer;
  std::size_t i = 0;
  for (auto _ : state) {
    GateSet& s = sets[i++ % sets.size()];
    const auto p = s.fwd();
    float* sums = s.workspace.as<float>();
    timer.start(stream);
    composed_softmax<<<(kTokens * 32 + 255) / 256, 256, 0, stream>>>(p.logits, p.difficulty_logit, kTokens, e, e / 2,
                                                                       1.f, p.probs, p.lse, p.entropy, p.difficulty);
    moxe::router::TopKParams<float, float> tk{{kTokens, e, k}, p.probs, p.topk_idx, p.topk_prob, p.topk_weight};
    if (moxe::router::topk_forward(tk, nullptr, 0, stream) != moxe::Status::ok) state.SkipWithError("topk failed");
    MOXE_BENCH_CUDA(cudaMemsetAsync(sums, 0, (4 + e) * sizeof(float), stream));
    composed_loss_sums<<<(kTokens + 255) / 256, 256, 0, stream>>>(p.probs, p.lse, p.entropy, p.difficulty, p.topk_idx,
                                                                  p.topk_prob, kTokens, e, e / 2, k, sums);
    state.SetIterationTime(timer.stop_seconds(stream));
  }
  moxe::bench::set_counters(state, forward_bytes(e, k), 0);
  MOXE_BENCH_CUDA(cudaStreamDestroy(stream));
}

void BM_gate_backward_fused(benchmark::State& state) {
  const int e = int(state.range(0)), k = int(state.range(1));
  if (!valid_shape(state, e, k)) return;
  auto sets = make_sets(e, k);
  for (auto& s : sets)
    if (moxe::router::gate_forward(s.fwd(), s.workspace.as<void>(), s.workspace.bytes(), nullptr) != moxe::Status::ok)
      state.SkipWithError("gate_forward failed");
  cudaStream_t stream;
  MOXE_BENCH_CUDA(cudaStreamCreate(&stream));
  EventTimer timer;
  std::size_t i = 0;
  for (auto _ : state) {
    GateSet& s = sets[i++ % sets.size()];
    timer.start(stream);
    if (moxe::router::gate_backward(s.bwd(), s.workspace.as<void>(), s.workspace.bytes(), stream) != moxe::Status::ok)
      state.SkipWithError("gate_backward failed");
    state.SetIterationTime(timer.stop_seconds(stream));
  }
  moxe::bench::set_counters(state, backward_bytes(e, k, true), 0);
  MOXE_BENCH_CUDA(cudaStreamDestroy(stream));
}

void BM_gate_backward_composed(benchmark::State& state) {
  const int e = int(state.range(0)), k = int(state.range(1));
  if (!valid_shape(state, e, k)) return;
  auto sets = make_sets(e, k);
  for (auto& s : sets)
    if (moxe::router::gate_forward(s.fwd(), s.workspace.as<void>(), s.workspace.bytes(), nullptr) != moxe::Status::ok)
      state.SkipWithError("gate_forward failed");
  cudaStream_t stream;
  MOXE_BENCH_CUDA(cudaStreamCreate(&stream));
  EventTimer timer;
  std::size_t i = 0;
  for (auto _ : state) {
    GateSet& s = sets[i++ % sets.size()];
    const auto b = s.bwd();
    const auto& p = b.fwd;
    float* sums = s.workspace.as<float>();
    timer.start(stream);
    MOXE_BENCH_CUDA(cudaMemsetAsync(sums, 0, (4 + e) * sizeof(float), stream));
    composed_loss_sums<<<(kTokens + 255) / 256, 256, 0, stream>>>(p.probs, p.lse, p.entropy, p.difficulty, p.topk_idx,
                                                                  p.topk_prob, kTokens, e, e / 2, k, sums);
    composed_backward<<<(kTokens * 32 + 255) / 256, 256, 0, stream>>>(
        p.logits, p.difficulty_logit, p.probs, p.lse, p.entropy, p.topk_idx, p.topk_prob, b.dweight, sums, kTokens, e,
        e / 2, k, 1.f, b.dlogits, b.ddifficulty_logit);
    state.SetIterationTime(timer.stop_seconds(stream));
  }
  // what the composed form moves: probs twice, logits twice, the rest as the fused one
  moxe::bench::set_counters(state, double(kTokens) * (e * (4.0 * 2 + 2.0 * 2 + 2.0) + 4 * 4.0 + k * 12.0 * 2), 0);
  MOXE_BENCH_CUDA(cudaStreamDestroy(stream));
}

void shapes(benchmark::internal::Benchmark* b) {
  for (int e : {4, 8, 64, 256})
    for (int k : {1, 2, 8})
      if (k <= e) b->Args({e, k});
  b->ArgNames({"E", "k"});
  b->UseManualTime();
  b->Unit(benchmark::kMicrosecond);
}

BENCHMARK(BM_gate_forward_fused)->Apply(shapes);
BENCHMARK(BM_gate_forward_composed)->Apply(shapes);
BENCHMARK(BM_gate_backward_fused)->Apply(shapes);
BENCHMARK(BM_gate_backward_composed)->Apply(shapes);

}  // namespace

MOXE_BENCHMARK_MAIN();
