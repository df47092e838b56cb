// Inputs of the router benchmarks (bench_router, bench_router_variants): hashed bf16
// logits, the fused gate's buffers and params, and the timing loop over rotating sets.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "harness.cuh"
#include "moxe/core/numeric.cuh"
#include "moxe/core/status.hpp"
#include "moxe/router/gate.cuh"

namespace moxe::bench {

/// p[i] in [-3, 3) from a hash of (i, seed): deterministic, spread like real logits.
template <class T>
__global__ void fill_logits(T* p, int64_t n, uint32_t seed) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    uint32_t x = static_cast<uint32_t>(i) * 2654435761u ^ seed;
    x ^= x >> 15;
    x *= 2246822519u;
    x ^= x >> 13;
    p[i] = from_float<T>(static_cast<float>(x & 0xffffu) / 65536.f * 6.f - 3.f);
  }
}

/// The fused gate over `tokens` tokens with bf16 logits: inputs, the required outputs
/// and the gradients, filled (dweight ~0.01 each); experts / 2 of the experts are mLSTM.
struct GateBuffers {
  using Bf16 = __nv_bfloat16;
  int64_t tokens;
  int experts, top_k;
  DeviceMemory logits, difficulty_logit, topk_idx, topk_prob, topk_weight, counts, losses, dweight, dlogits,
      ddifficulty;

  GateBuffers(int64_t t, int e, int k, int seed)
      : tokens(t),
        experts(e),
        top_k(k),
        logits(t * e * sizeof(Bf16)),
        difficulty_logit(t * sizeof(Bf16)),
        topk_idx(t * k * sizeof(int32_t)),
        topk_prob(t * k * sizeof(float)),
        topk_weight(t * k * sizeof(float)),
        counts(e * sizeof(int32_t)),
        losses(4 * sizeof(float)),
        dweight(t * k * sizeof(float)),
        dlogits(t * e * sizeof(Bf16)),
        ddifficulty(t * sizeof(Bf16)) {
    fill_logits<<<1024, 256>>>(logits.as<Bf16>(), t * e, 17u + seed);
    fill_logits<<<256, 256>>>(difficulty_logit.as<Bf16>(), t, 91u + seed);
    MOXE_BENCH_CUDA(cudaMemset(dweight.as<void>(), 0x3c, dweight.bytes()));  // ~0.01 each
  }

  /// Standard modulation, gamma 1, tau 0.5; the optional outputs null.
  router::GateForwardParams<Bf16, float> gate_forward() const {
    router::GateForwardParams<Bf16, float> p{};
    p.dims = {tokens, experts, experts / 2, top_k};
    p.logits = logits.as<Bf16>();
    p.difficulty_logit = difficulty_logit.as<Bf16>();
    p.modulation = router::Modulation::standard;
    p.gamma = 1.f;
    p.tau = 0.5f;
    p.topk_idx = topk_idx.as<int32_t>();
    p.topk_prob = topk_prob.as<float>();
    p.topk_weight = topk_weight.as<float>();
    p.expert_counts = counts.as<int32_t>();
    p.losses = losses.as<float>();
    return p;
  }

  /// Over gate_forward(), with c_z = 1e-3 and c_lb = c_d = c_g = 1e-2.
  router::GateBackwardParams<Bf16, float> gate_backward() const {
    router::GateBackwardParams<Bf16, float> b{};
    b.fwd = gate_forward();
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

/// Times launch(set, stream) once per iteration, taking `sets` in turn (inputs past L2);
/// a launch that fails ends the benchmark with its status.
template <class Set, class Launch>
void time_rotating(benchmark::State& state, std::vector<Set>& sets, double bytes, Launch launch) {
  cudaStream_t stream;
  MOXE_BENCH_CUDA(cudaStreamCreate(&stream));
  EventTimer timer;
  std::size_t i = 0;
  for (auto _ : state) {
    Set& s = sets[i++ % sets.size()];
    timer.start(stream);
    const Status st = launch(s, stream);
    state.SetIterationTime(timer.stop_seconds(stream));
    if (st != Status::ok) {
      state.SkipWithError(to_string(st));
      break;
    }
  }
  set_counters(state, bytes, 0);
  MOXE_BENCH_CUDA(cudaStreamDestroy(stream));
}

}  // namespace moxe::bench
