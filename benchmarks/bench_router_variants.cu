// Routing-variant benchmarks beside the fused MoxE gate: top-p (raw and renormalised
// weights), expert choice, group-restricted expert choice (MoMa), group-restricted and
// sigmoid-with-bias routing, forward and backward, T = 65536 tokens, bf16 logits, E in
// {64, 256}, k (or max_k) = 8. All are memory bound: bytes/s and
// frac_copy_bw (with MOXE_COPY_BW_GBPS set) are the figures to read; the byte counts are
// the minimum traffic of each operation (logits read once, outputs written once).
#include <cuda_bf16.h>

#include <algorithm>
#include <vector>

#include "harness.cuh"
#include "moxe/router/gate.cuh"
#include "moxe/router/variants/expert_choice.cuh"
#include "moxe/router/variants/group_expert_choice.cuh"
#include "moxe/router/variants/group_restricted.cuh"
#include "moxe/router/variants/sigmoid_bias.cuh"
#include "moxe/router/variants/topp.cuh"
#include "router_inputs.cuh"

namespace {

using moxe::bench::DeviceMemory;
using Bf16 = __nv_bfloat16;
namespace rv = moxe::router::variants;

constexpr int64_t kTokens = 65536;
constexpr int kTopK = 8;

__global__ void fill_groups(int32_t* group_id, int64_t n, int groups) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    group_id[i] = static_cast<int32_t>((i * 2654435761u >> 7) % groups);
}

/// One problem: the gate's buffers (their [T, K] outputs shared by every variant) and
/// the other variants' inputs, outputs and gradients.
struct Set : moxe::bench::GateBuffers {
  int64_t capacity;
  DeviceMemory group_id, group_offsets, bias, count, total;
  DeviceMemory scores, ec_tokens, ec_weights, row_map, token_weight, offsets;  // expert choice
  DeviceMemory gec_tokens, gec_weights;  // group expert choice (row map, weights, offsets shared)
  DeviceMemory dweight_dense, workspace;
  Set(int e, int seed)
      : GateBuffers(kTokens, e, kTopK, seed),
        capacity(rv::expert_choice_capacity(kTokens, e, 1.0, kTopK)),
        group_id(kTokens * sizeof(int32_t)),
        group_offsets(3 * sizeof(int32_t)),
        bias(e * sizeof(float)),
        count(kTokens * sizeof(int32_t)),
        total(sizeof(int64_t)),
        scores(kTokens * e * sizeof(float)),
        ec_tokens(e * capacity * sizeof(int32_t)),
        ec_weights(e * capacity * sizeof(float)),
        row_map(kTokens * e * sizeof(int64_t)),
        token_weight(kTokens * e * sizeof(float)),
        offsets((e + 1) * sizeof(int64_t)),
        gec_tokens(rv::group_expert_choice_max_rows(gec_dims(e)) * sizeof(int32_t)),
        gec_weights(rv::group_expert_choice_max_rows(gec_dims(e)) * sizeof(float)),
        dweight_dense(kTokens * e * sizeof(float)) {
    fill_groups<<<256, 256>>>(group_id.as<int32_t>(), kTokens, 2);
    const int32_t off[3] = {0, e * 7 / 16, e * 7 / 8};  // two groups of 7E/16, a shared pool of E/8
    MOXE_BENCH_CUDA(cudaMemcpy(group_offsets.as<void>(), off, sizeof(off), cudaMemcpyHostToDevice));
    MOXE_BENCH_CUDA(cudaMemset(bias.as<void>(), 0, bias.bytes()));
    MOXE_BENCH_CUDA(cudaMemset(dweight_dense.as<void>(), 0x3c, dweight_dense.bytes()));
    std::size_t ws = std::max({moxe::router::gate_forward_workspace_size(gate_forward()),
                               moxe::router::gate_backward_workspace_size(gate_backward()),
                               rv::topp_forward_workspace_size(topp()),
                               rv::expert_choice_forward_workspace_size(expert_choice()),
                               rv::group_expert_choice_forward_workspace_size(group_expert_choice()),
                               rv::sigmoid_bias_forward_workspace_size(sigmoid())});
    workspace = DeviceMemory(std::max<std::size_t>(ws, 1));
    MOXE_BENCH_CUDA(cudaDeviceSynchronize());
  }
  rv::TopPForwardParams<Bf16, float> topp() const {
    return {{kTokens, experts, kTopK}, logits.as<Bf16>(), 0.9f, topk_idx.as<int32_t>(), topk_prob.as<float>(),
            topk_weight.as<float>(), count.as<int32_t>(), total.as<int64_t>()};
  }
  rv::ExpertChoiceForwardParams<Bf16, float> expert_choice() const {
    return {{kTokens, experts, capacity}, logits.as<Bf16>(), nullptr, ec_tokens.as<int32_t>(), ec_weights.as<float>(),
            row_map.as<int64_t>(), token_weight.as<float>(), offsets.as<int64_t>(), nullptr};
  }
  /// MoMa: two groups of 7E/16 experts, a shared pool of E/8, capacity factor 1, top_k 1.
  static rv::GroupExpertChoiceDims gec_dims(int e) { return {kTokens, e, 2, e * 7 / 8, e}; }
  rv::GroupExpertChoiceForwardParams<Bf16, float> group_expert_choice() const {
    return {gec_dims(experts),       logits.as<Bf16>(),      group_id.as<int32_t>(), group_offsets.as<int32_t>(),
            rv::ChoiceScore::sigmoid, nullptr,                gec_tokens.as<int32_t>(), gec_weights.as<float>(),
            row_map.as<int64_t>(),   token_weight.as<float>(), offsets.as<int64_t>(), nullptr};
  }
  rv::GroupRestrictedForwardParams<Bf16, float> group_restricted() const {
    return {{kTokens, experts, kTopK, 2, experts * 7 / 8, experts}, logits.as<Bf16>(), group_id.as<int32_t>(),
            group_offsets.as<int32_t>(), true, topk_idx.as<int32_t>(), topk_prob.as<float>(), topk_weight.as<float>()};
  }
  rv::SigmoidBiasForwardParams<Bf16, float> sigmoid() const {
    return {{kTokens, experts, kTopK, 8, 4}, logits.as<Bf16>(), bias.as<float>(), 2.5f, true, topk_idx.as<int32_t>(),
            topk_prob.as<float>(), topk_weight.as<float>(), counts.as<int32_t>()};
  }
};

std::vector<Set>& sets_for(int e) {
  static std::vector<Set> s64, s256;
  auto& sets = e == 64 ? s64 : s256;
  if (sets.empty()) {
    const double per_set = double(kTokens) * e * 2.0;
    const int n = static_cast<int>(std::min(6.0, std::max(2.0, 3.0 * moxe::bench::l2_bytes() / per_set)));
    for (int i = 0; i < n; ++i) sets.emplace_back(e, i);
  }
  return sets;
}

/// Times `launch(set, stream)` over rotating sets (inputs past L2).
template <class Launch>
void run(benchmark::State& state, double bytes, Launch launch) {
  moxe::bench::time_rotating(state, sets_for(int(state.range(0))), bytes, launch);
}

// minimum traffic, bytes per token
double logits_bytes(int e) { return e * 2.0; }
double slots_bytes() { return kTopK * 12.0; }  // idx + prob + weight (or their gradients)

void BM_gate_forward(benchmark::State& state) {
  const int e = int(state.range(0));
  run(state, kTokens * (logits_bytes(e) + 2.0 + slots_bytes()), [](Set& s, cudaStream_t st) {
    return moxe::router::gate_forward(s.gate_forward(), s.workspace.as<void>(), s.workspace.bytes(), st);
  });
}
void BM_gate_backward(benchmark::State& state) {
  const int e = int(state.range(0));
  for (auto& s : sets_for(e))
    (void)moxe::router::gate_forward(s.gate_forward(), s.workspace.as<void>(), s.workspace.bytes(), nullptr);
  run(state, kTokens * (2 * logits_bytes(e) + 4.0 + slots_bytes()), [](Set& s, cudaStream_t st) {
    return moxe::router::gate_backward(s.gate_backward(), s.workspace.as<void>(), s.workspace.bytes(), st);
  });
}
void BM_topp_forward(benchmark::State& state) {
  const int e = int(state.range(0));
  run(state, kTokens * (logits_bytes(e) + slots_bytes() + 4.0), [](Set& s, cudaStream_t st) {
    return rv::topp_forward(s.topp(), s.workspace.as<void>(), s.workspace.bytes(), st);
  });
}
// raw weights (the default): the whole logit row in, the whole gradient row out
void BM_topp_backward(benchmark::State& state) {
  const int e = int(state.range(0));
  for (auto& s : sets_for(e)) (void)rv::topp_forward(s.topp(), s.workspace.as<void>(), s.workspace.bytes(), nullptr);
  run(state, kTokens * (2 * logits_bytes(e) + kTopK * 8.0), [](Set& s, cudaStream_t st) {
    return rv::topp_backward(rv::TopPBackwardParams<Bf16, float>{s.topp(), s.dweight.as<float>(), s.dlogits.as<Bf16>()},
                             nullptr, 0, st);
  });
}
// renormalised weights: only the chosen logits in
void BM_topp_backward_renormalized(benchmark::State& state) {
  const int e = int(state.range(0));
  for (auto& s : sets_for(e)) (void)rv::topp_forward(s.topp(), s.workspace.as<void>(), s.workspace.bytes(), nullptr);
  run(state, kTokens * (logits_bytes(e) + kTopK * 8.0), [](Set& s, cudaStream_t st) {
    auto p = s.topp();
    p.renormalize = true;
    return rv::topp_backward(rv::TopPBackwardParams<Bf16, float>{p, s.dweight.as<float>(), s.dlogits.as<Bf16>()},
                             nullptr, 0, st);
  });
}
void BM_expert_choice_forward(benchmark::State& state) {
  const int e = int(state.range(0));
  // logits in; score_t out and read once (the select's passes mostly hit L2); row map and
  // token weights written; the expert lists
  run(state, kTokens * e * (2.0 + 4.0 * 2 + 8.0 + 4.0) + 8.0 * e * sets_for(e)[0].capacity,
      [](Set& s, cudaStream_t st) {
        return rv::expert_choice_forward(s.expert_choice(), s.workspace.as<void>(), s.workspace.bytes(), st);
      });
}
void BM_expert_choice_backward(benchmark::State& state) {
  const int e = int(state.range(0));
  for (auto& s : sets_for(e))
    (void)rv::expert_choice_forward(s.expert_choice(), s.workspace.as<void>(), s.workspace.bytes(), nullptr);
  run(state, kTokens * e * (2.0 + 8.0 + 4.0 + 2.0), [](Set& s, cudaStream_t st) {
    return rv::expert_choice_backward(
        rv::ExpertChoiceBackwardParams<Bf16, float>{s.expert_choice(), s.dweight_dense.as<float>(),
                                                    s.dlogits.as<Bf16>()},
        nullptr, 0, st);
  });
}
void BM_group_expert_choice_forward(benchmark::State& state) {
  const int e = int(state.range(0));
  // as expert choice, plus the group ids read twice; the lists: about 2T rows (two pools)
  run(state, kTokens * e * (2.0 + 4.0 * 2 + 8.0 + 4.0) + kTokens * 8.0 + 8.0 * 2 * kTokens,
      [](Set& s, cudaStream_t st) {
        return rv::group_expert_choice_forward(s.group_expert_choice(), s.workspace.as<void>(), s.workspace.bytes(),
                                               st);
      });
}
void BM_group_expert_choice_backward(benchmark::State& state) {
  const int e = int(state.range(0));
  for (auto& s : sets_for(e))
    (void)rv::group_expert_choice_forward(s.group_expert_choice(), s.workspace.as<void>(), s.workspace.bytes(),
                                          nullptr);
  run(state, kTokens * e * (2.0 + 8.0 + 4.0 + 2.0), [](Set& s, cudaStream_t st) {
    return rv::group_expert_choice_backward(
        rv::GroupExpertChoiceBackwardParams<Bf16, float>{s.group_expert_choice(), s.dweight_dense.as<float>(),
                                                         s.dlogits.as<Bf16>()},
        nullptr, 0, st);  // sigmoid scores: no workspace
  });
}
void BM_group_restricted_forward(benchmark::State& state) {
  const int e = int(state.range(0));
  run(state, kTokens * (logits_bytes(e) + 4.0 + slots_bytes()), [](Set& s, cudaStream_t st) {
    return rv::group_restricted_forward(s.group_restricted(), nullptr, 0, st);
  });
}
void BM_group_restricted_backward(benchmark::State& state) {
  const int e = int(state.range(0));
  for (auto& s : sets_for(e)) (void)rv::group_restricted_forward(s.group_restricted(), nullptr, 0, nullptr);
  run(state, kTokens * (logits_bytes(e) + kTopK * 8.0), [](Set& s, cudaStream_t st) {
    return rv::group_restricted_backward(
        rv::GroupRestrictedBackwardParams<Bf16, float>{s.group_restricted(), s.dweight.as<float>(),
                                                       s.dlogits.as<Bf16>()},
        nullptr, 0, st);
  });
}
void BM_sigmoid_bias_forward(benchmark::State& state) {
  const int e = int(state.range(0));
  run(state, kTokens * (logits_bytes(e) + slots_bytes()), [](Set& s, cudaStream_t st) {
    return rv::sigmoid_bias_forward(s.sigmoid(), s.workspace.as<void>(), s.workspace.bytes(), st);
  });
}
void BM_sigmoid_bias_backward(benchmark::State& state) {
  const int e = int(state.range(0));
  for (auto& s : sets_for(e))
    (void)rv::sigmoid_bias_forward(s.sigmoid(), s.workspace.as<void>(), s.workspace.bytes(), nullptr);
  run(state, kTokens * (logits_bytes(e) + kTopK * 8.0), [](Set& s, cudaStream_t st) {
    return rv::sigmoid_bias_backward(
        rv::SigmoidBiasBackwardParams<Bf16, float>{s.sigmoid(), s.dweight.as<float>(), s.dlogits.as<Bf16>()}, nullptr,
        0, st);
  });
}
void BM_bias_update(benchmark::State& state) {
  const int e = int(state.range(0));
  run(state, e * 12.0, [e](Set& s, cudaStream_t st) {
    return rv::bias_update(rv::BiasUpdateParams<float>{e, s.counts.as<int32_t>(), s.bias.as<float>(), 1e-3f}, nullptr,
                           0, st);
  });
}

void shapes(benchmark::internal::Benchmark* b) {
  for (int e : {64, 256}) b->Args({e});
  b->ArgNames({"E"});
  b->UseManualTime();
  b->Unit(benchmark::kMicrosecond);
}

BENCHMARK(BM_gate_forward)->Apply(shapes);
BENCHMARK(BM_gate_backward)->Apply(shapes);
BENCHMARK(BM_topp_forward)->Apply(shapes);
BENCHMARK(BM_topp_backward)->Apply(shapes);
BENCHMARK(BM_topp_backward_renormalized)->Apply(shapes);
BENCHMARK(BM_expert_choice_forward)->Apply(shapes);
BENCHMARK(BM_expert_choice_backward)->Apply(shapes);
BENCHMARK(BM_group_expert_choice_forward)->Apply(shapes);
BENCHMARK(BM_group_expert_choice_backward)->Apply(shapes);
BENCHMARK(BM_group_restricted_forward)->Apply(shapes);
BENCHMARK(BM_group_restricted_backward)->Apply(shapes);
BENCHMARK(BM_sigmoid_bias_forward)->Apply(shapes);
BENCHMARK(BM_sigmoid_bias_backward)->Apply(shapes);
BENCHMARK(BM_bias_update)->Apply(shapes);

}  // namespace

MOXE_BENCHMARK_MAIN();
