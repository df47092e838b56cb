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
#include "router_inputs.cuh"

namespace {

using moxe::bench::DeviceMemory;
using Bf16 = __nv_bfloat16;

constexpr int64_t kTokens = 65536;

/// One problem: the gate's buffers, its optional outputs, workspace.
struct GateSet : moxe::bench::GateBuffers {
  DeviceMemory probs, lse, entropy, difficulty, totals, workspace;
  GateSet(int e, int k, int seed)
      : GateBuffers(kTokens, e, k, seed),
        probs(kTokens * e * sizeof(float)),
        lse(kTokens * sizeof(float)),
        entropy(kTokens * sizeof(float)),
        difficulty(kTokens * sizeof(float)),
        totals((e + 4) * sizeof(float)) {
    auto recompute = bwd();
    recompute.fwd.totals = nullptr;
    const std::size_t ws = std::max(moxe::router::gate_forward_workspace_size(fwd()),
                                    moxe::router::gate_backward_workspace_size(recompute));
    workspace = DeviceMemory(std::max<std::size_t>(ws, (4 + e) * sizeof(float)));  // the composed form's sums too
    MOXE_BENCH_CUDA(cudaDeviceSynchronize());
  }
  moxe::router::GateForwardParams<Bf16, float> fwd() const {
    auto p = gate_forward();
    p.probs = probs.as<float>();
    p.lse = lse.as<float>();
    p.entropy = entropy.as<float>();
    p.difficulty = difficulty.as<float>();
    p.totals = totals.as<float>();  // the backward takes u, P_m, P_s from them: one launch, one read of the logits
    return p;
  }
  moxe::router::GateBackwardParams<Bf16, float> bwd() const {
    auto b = gate_backward();
    b.fwd = fwd();
    return b;
  }
};

double forward_bytes(int e, int k) {
  return double(kTokens) * (e * (2.0 + 4.0) + 2.0 + 3 * 4.0 + k * 12.0);
}
/// recompute: without the forward's totals (a second read of the logits and of the saved top-k)
double backward_bytes(int e, int k, bool recompute) {
  return double(kTokens) * (e * 2.0 * (recompute ? 2 : 1) + e * 2.0 + 2.0 * 2 + k * (recompute ? 20.0 : 12.0));
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
  // gradient wrt p_e: the group loss, and for a routed e its weight and load-balance terms
  auto grad_p = [&](int e) {
    float g = e < em ? gm : gs;
    for (int j = 0; j < k; ++j)
      if (idx[t * k + j] == e)
        g += (dw[t * k + j] - wdot) / total + 1e-2f * moxe::loss::detail::load_balance_grad(sums[4 + e] / slots, float(experts), slots);
    return g;
  };
  float pdot = 0.f, mass_m = 0.f, mass_s = 0.f, qdot = 0.f;
  moxe::math::MaxSum<float> q;
  for (int e = lane; e < experts; e += 32) {
    const float p = probs[t * experts + e];
    pdot += p * grad_p(e);
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
    const float dzc = p * (grad_p(e) - pdot + 2e-3f * inv_t * lse[t]);
    ds += e < em ? dzc : -dzc;
    const float qe = expf(__bfloat162float(logits[t * experts + e]) - lq);
    dz[t * experts + e] = __float2bfloat16(dzc + qe * (gh * moxe::router::detail::entropy_term_grad(qe) - qdot));
  }
  ds = moxe::warp_sum(ds);
  if (lane == 0) da[t] = __float2bfloat16((1e-2f * 2.f * (d - ent[t]) * inv_t + ds * gamma) * d * (1.f - d));
}

/// The rotating sets of the benchmark's (E, k), with the gate's forward run on them when
/// a backward reads its outputs; none (the benchmark skipped) where k > E or it fails.
std::vector<GateSet> sets_for(benchmark::State& state, bool run_forward) {
  const int e = int(state.range(0)), k = int(state.range(1));
  if (k > e) {
    state.SkipWithError("k > E");
    return {};
  }
  std::vector<GateSet> sets;
  const double per_set = double(kTokens) * e * 6.0;
  const int n = static_cast<int>(std::min(8.0, std::max(2.0, 3.0 * moxe::bench::l2_bytes() / per_set)));
  for (int i = 0; i < n; ++i) sets.emplace_back(e, k, i);
  for (auto& s : sets)
    if (run_forward &&
        moxe::router::gate_forward(s.fwd(), s.workspace.as<void>(), s.workspace.bytes(), nullptr) != moxe::Status::ok) {
      state.SkipWithError("gate_forward failed");
      return {};
    }
  return sets;
}

void BM_gate_forward_fused(benchmark::State& state) {
  const int e = int(state.range(0)), k = int(state.range(1));
  auto sets = sets_for(state, /*run_forward=*/false);
  if (sets.empty()) return;
  moxe::bench::time_rotating(state, sets, forward_bytes(e, k), [](GateSet& s, cudaStream_t stream) {
    return moxe::router::gate_forward(s.fwd(), s.workspace.as<void>(), s.workspace.bytes(), stream);
  });
}

void BM_gate_forward_composed(benchmark::State& state) {
  const int e = int(state.range(0)), k = int(state.range(1));
  auto sets = sets_for(state, /*run_forward=*/false);
  if (sets.empty()) return;
  moxe::bench::time_rotating(state, sets, forward_bytes(e, k), [e, k](GateSet& s, cudaStream_t stream) {
    const auto p = s.fwd();
    float* sums = s.workspace.as<float>();
    composed_softmax<<<(kTokens * 32 + 255) / 256, 256, 0, stream>>>(p.logits, p.difficulty_logit, kTokens, e, e / 2,
                                                                       1.f, p.probs, p.lse, p.entropy, p.difficulty);
    moxe::router::TopKParams<float, float> tk{{kTokens, e, k}, p.probs, p.topk_idx, p.topk_prob, p.topk_weight};
    const moxe::Status topk = moxe::router::topk_forward(tk, nullptr, 0, stream);
    MOXE_BENCH_CUDA(cudaMemsetAsync(sums, 0, (4 + e) * sizeof(float), stream));
    composed_loss_sums<<<(kTokens + 255) / 256, 256, 0, stream>>>(p.probs, p.lse, p.entropy, p.difficulty, p.topk_idx,
                                                                  p.topk_prob, kTokens, e, e / 2, k, sums);
    return topk;
  });
}

void BM_gate_backward_fused(benchmark::State& state) {
  const int e = int(state.range(0)), k = int(state.range(1));
  auto sets = sets_for(state, /*run_forward=*/true);
  if (sets.empty()) return;
  moxe::bench::time_rotating(state, sets, backward_bytes(e, k, false), [](GateSet& s, cudaStream_t stream) {
    return moxe::router::gate_backward(s.bwd(), s.workspace.as<void>(), s.workspace.bytes(), stream);
  });
}

/// The backward without the forward's totals: it sums u, P_m, P_s again (3 launches).
void BM_gate_backward_fused_recompute(benchmark::State& state) {
  const int e = int(state.range(0)), k = int(state.range(1));
  auto sets = sets_for(state, /*run_forward=*/true);
  if (sets.empty()) return;
  moxe::bench::time_rotating(state, sets, backward_bytes(e, k, true), [](GateSet& s, cudaStream_t stream) {
    auto b = s.bwd();
    b.fwd.totals = nullptr;
    return moxe::router::gate_backward(b, s.workspace.as<void>(), s.workspace.bytes(), stream);
  });
}

void BM_gate_backward_composed(benchmark::State& state) {
  const int e = int(state.range(0)), k = int(state.range(1));
  auto sets = sets_for(state, /*run_forward=*/true);
  if (sets.empty()) return;
  // what the composed form moves: probs twice, logits twice, the rest as the fused one
  const double bytes = double(kTokens) * (e * (4.0 * 2 + 2.0 * 2 + 2.0) + 4 * 4.0 + k * 12.0 * 2);
  moxe::bench::time_rotating(state, sets, bytes, [e, k](GateSet& s, cudaStream_t stream) {
    const auto b = s.bwd();
    const auto& p = b.fwd;
    float* sums = s.workspace.as<float>();
    MOXE_BENCH_CUDA(cudaMemsetAsync(sums, 0, (4 + e) * sizeof(float), stream));
    composed_loss_sums<<<(kTokens + 255) / 256, 256, 0, stream>>>(p.probs, p.lse, p.entropy, p.difficulty, p.topk_idx,
                                                                  p.topk_prob, kTokens, e, e / 2, k, sums);
    composed_backward<<<(kTokens * 32 + 255) / 256, 256, 0, stream>>>(
        p.logits, p.difficulty_logit, p.probs, p.lse, p.entropy, p.topk_idx, p.topk_prob, b.dweight, sums, kTokens, e,
        e / 2, k, 1.f, b.dlogits, b.ddifficulty_logit);
    return moxe::Status::ok;
  });
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
BENCHMARK(BM_gate_backward_fused_recompute)->Apply(shapes);
BENCHMARK(BM_gate_backward_composed)->Apply(shapes);

}  // namespace

MOXE_BENCHMARK_MAIN();
