// moxe::router::variants: sigmoid scoring with a selection bias (DeepSeek-V3) on the
// device, forward, backward and the bias update; E <= 1024, k <= 32
// (docs/router_variants.md).
//
// Forward, per token on a group of lanes: s = sigmoid(z), the selection key s + bias,
// optional group-limited routing (n_groups equal groups scored by their top-2 keys, the
// topk_groups best kept: moxe::router::topk's rule), moxe::router's group top-k, then
// weights from s alone. Per-expert counts go to per-block rows of partials that one block
// sums in block order (deterministic; the only atomics are integer ones in shared memory).
// Backward reads only the chosen logits. bias_update reads the counts on the device: no
// host synchronisation anywhere.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "moxe/core/launch.cuh"
#include "moxe/core/reduce.cuh"
#include "moxe/core/status.hpp"
#include "moxe/core/workspace.hpp"
#include "moxe/router/detail/gate_math.hpp"
#include "moxe/router/variants/detail/device.cuh"
#include "moxe/router/variants/detail/group_limit.cuh"
#include "moxe/router/variants/detail/variant_math.hpp"
#include "moxe/router/variants/params.hpp"

namespace moxe::router::variants {

namespace detail {

template <class T, int kLanes, int kPerLane>
__global__ void __launch_bounds__(kRowThreads, kRowMinBlocks)
    sigmoid_bias_forward_kernel(const __grid_constant__ SigmoidBiasForwardParams<T, float> p, int64_t* block_counts) {
  using Group = LaneGroup<kLanes>;
  using Limit = GroupLimit<kLanes, kPerLane>;
  constexpr int kGroups = Group::kGroups;
  __shared__ typename Limit::TempStorage limit_storage;
  // separate arrays, not a SlotStorage: for E <= 8 slot_value is write-only and drops out
  __shared__ float slot_value[kRowWarps][kGroups][kMaxTopK];
  __shared__ int slot_index[kRowWarps][kGroups][kMaxTopK];
  __shared__ float slot_score[kRowWarps][kGroups][kMaxTopK];
  __shared__ int counts[kMaxExperts];
  const Group g;
  const int E = p.dims.experts, K = p.dims.top_k;
  if (block_counts != nullptr) {
    for (int e = threadIdx.x; e < E; e += kRowThreads) counts[e] = 0;
    __syncthreads();
  }
  const Limit limit(limit_storage, g, E, p.dims.n_groups, p.dims.topk_groups);
  const int warp = threadIdx.x / kWarpSize;
  float* sslot = slot_score[warp][g.group];
  const TopKSlots slots{slot_value[warp][g.group], slot_index[warp][g.group]};
  const uint32_t padding = router::detail::padding_bits<kLanes, kPerLane>(g, E);
  const auto group_score = [](const float* keys, int size) {
    router::detail::Top2<float> t2;
    for (int i = 0; i < size; ++i) t2.add(keys[i]);
    return t2.group_score(size);
  };
  for_each_token(g, p.dims.tokens, [&](int64_t t, bool valid) {
    const T* logits = p.logits + (valid ? t : 0) * E;
    float key[kPerLane];
    MOXE_PRAGMA_UNROLL
    for (int j = 0; j < kPerLane; ++j) {
      const int e = g.element(j);
      key[j] = 0.f;
      if (valid && e < E) key[j] = math::sigmoid(to_float(logits[e])) + (p.bias != nullptr ? p.bias[e] : 0.f);
    }
    nan_to_neg_inf(key);
    uint32_t taken = padding;
    limit.exclude_unkept([&](int j) { return key[j]; }, group_score, taken);
    router::detail::group_topk<kLanes, kPerLane>(g, key, taken, K, slots);
    if (valid)
      for (int r = g.lane; r < K; r += kLanes) sslot[r] = math::sigmoid(to_float(logits[slots.index[r]]));
    __syncwarp();
    if (valid) {
      float sum = 0.f;
      for (int r = 0; r < K; ++r) sum += sslot[r];
      const float inv = 1.f / sum;
      for (int r = g.lane; r < K; r += kLanes) {
        const int e = slots.index[r];
        p.topk_idx[t * K + r] = e;
        if (p.topk_score != nullptr) p.topk_score[t * K + r] = sslot[r];
        p.topk_weight[t * K + r] = sigmoid_weight(sslot[r], inv, p.routed_scaling, p.renormalize);
        if (block_counts != nullptr) atomicAdd(&counts[e], 1);  // integer: order-free
      }
    }
    __syncwarp();
  });
  if (block_counts != nullptr) {
    __syncthreads();
    for (int e = threadIdx.x; e < E; e += kRowThreads) block_counts[int64_t(blockIdx.x) * E + e] = counts[e];
  }
}

template <class T, int kLanes, int kPerLane>
__global__ void __launch_bounds__(kRowThreads, kRowMinBlocks)
    sigmoid_bias_backward_kernel(const __grid_constant__ SigmoidBiasBackwardParams<T, float> b) {
  const LaneGroup<kLanes> g;
  __shared__ SlotStorage<LaneGroup<kLanes>::kGroups> slot_storage;
  const auto& p = b.fwd;
  const int E = p.dims.experts, K = p.dims.top_k;
  const TopKSlots grad = slot_storage.of(g.group);  // per chosen slot: dz and the expert
  for_each_token(g, p.dims.tokens, [&](int64_t t, bool valid) {
    if (valid) {
      const int32_t* idx = p.topk_idx + t * K;
      const T* row = p.logits + t * E;
      float sum = 0.f;
      for (int r = 0; r < K; ++r)
        if (idx[r] >= 0 && idx[r] < E) sum += math::sigmoid(to_float(row[idx[r]]));
      const float inv = 1.f / sum;
      float u_dot = 0.f;
      for (int r = 0; r < K; ++r)
        if (idx[r] >= 0 && idx[r] < E) u_dot += math::sigmoid(to_float(row[idx[r]])) * inv * b.dweight[t * K + r];
      for (int r = g.lane; r < K; r += kLanes) {
        const bool ok = idx[r] >= 0 && idx[r] < E;
        const float z = ok ? to_float(row[idx[r]]) : 0.f;
        grad.value[r] = ok ? sigmoid_weight_grad(z, b.dweight[t * K + r], u_dot, inv, p.routed_scaling, p.renormalize) : 0.f;
        grad.index[r] = ok ? idx[r] : -1;
      }
    }
    __syncwarp();
    if (valid) write_sparse_row<T, kLanes, kPerLane>(g, grad.value, grad.index, K, E, b.dlogits + t * E);
    __syncwarp();
  });
}

inline constexpr int kBiasThreads = 256;

template <class Acc = float>  // a template: one definition across translation units
__global__ void __launch_bounds__(kBiasThreads) bias_update_kernel(const __grid_constant__ BiasUpdateParams<Acc> p) {
  __shared__ typename BlockAllReduce<long long, kBiasThreads>::TempStorage storage;
  long long part = 0;
  for (int e = threadIdx.x; e < p.experts; e += kBiasThreads) part += p.expert_counts[e];
  const long long total = BlockAllReduce<long long, kBiasThreads>(storage).sum(part);
  for (int e = threadIdx.x; e < p.experts; e += kBiasThreads)
    p.bias[e] += bias_step(int64_t(total), p.experts, int64_t(p.expert_counts[e]), p.rate);
}

template <class T>
int64_t* carve_sigmoid_scratch(WorkspaceCarver& c, const SigmoidBiasForwardParams<T, float>& p) {
  if (p.expert_counts == nullptr) return nullptr;
  const int grid = token_grid(p.dims.tokens, p.dims.experts, true);
  return c.carve<int64_t>(static_cast<std::size_t>(grid) * static_cast<std::size_t>(p.dims.experts));
}

}  // namespace detail

template <class T>
std::size_t sigmoid_bias_forward_workspace_size(const SigmoidBiasForwardParams<T, float>& p) {
  WorkspaceCarver c;
  if (validate_dims(p.dims) == Status::ok) detail::carve_sigmoid_scratch(c, p);
  return c.required_bytes();
}

template <class T>
Status sigmoid_bias_forward(const SigmoidBiasForwardParams<T, float>& p, void* workspace, std::size_t workspace_bytes,
                            cudaStream_t stream) {
  static_assert(is_device_element_v<T>, "logits must be float, __half or __nv_bfloat16");
  MOXE_RETURN_IF_ERROR(validate(p));
  if (p.dims.experts > kMaxExperts || p.dims.top_k > kMaxTopK) return Status::unsupported;
  WorkspaceCarver c(workspace, workspace_bytes);
  int64_t* block_counts = detail::carve_sigmoid_scratch(c, p);
  if (!c.fits()) return Status::workspace_too_small;
  const int grid = detail::token_grid(p.dims.tokens, p.dims.experts, p.expert_counts != nullptr);
  MOXE_RETURN_IF_ERROR(detail::launch_rows(grid, p.dims.experts, stream, [](auto shape) {
    return detail::sigmoid_bias_forward_kernel<T, decltype(shape)::kLanes, decltype(shape)::kPerLane>;
  }, p, block_counts));
  if (p.expert_counts == nullptr) return Status::ok;
  MOXE_RETURN_IF_ERROR(launch_kernel(detail::sum_partials_kernel<int32_t>, 1, 256, 0, stream, block_counts, grid,
                                     p.dims.experts, p.expert_counts));
  return check_launch(stream);
}

template <class T>
std::size_t sigmoid_bias_backward_workspace_size(const SigmoidBiasBackwardParams<T, float>&) { return 0; }

template <class T>
Status sigmoid_bias_backward(const SigmoidBiasBackwardParams<T, float>& b, void* workspace,
                             std::size_t workspace_bytes, cudaStream_t stream) {
  static_assert(is_device_element_v<T>, "logits must be float, __half or __nv_bfloat16");
  (void)workspace;
  (void)workspace_bytes;
  MOXE_RETURN_IF_ERROR(validate(b));
  if (b.fwd.dims.experts > kMaxExperts || b.fwd.dims.top_k > kMaxTopK) return Status::unsupported;
  const int grid = detail::token_grid(b.fwd.dims.tokens, b.fwd.dims.experts, false);
  return detail::launch_rows(grid, b.fwd.dims.experts, stream, [](auto shape) {
    return detail::sigmoid_bias_backward_kernel<T, decltype(shape)::kLanes, decltype(shape)::kPerLane>;
  }, b);
}

inline std::size_t bias_update_workspace_size(const BiasUpdateParams<float>&) { return 0; }

/// b_e += rate * sign(mean load - load_e) from the counts in device memory.
inline Status bias_update(const BiasUpdateParams<float>& p, void* workspace, std::size_t workspace_bytes,
                          cudaStream_t stream) {
  (void)workspace;
  (void)workspace_bytes;
  MOXE_RETURN_IF_ERROR(validate(p));
  MOXE_RETURN_IF_ERROR(launch_kernel(detail::bias_update_kernel<float>, 1, detail::kBiasThreads, 0, stream, p));
  return check_launch(stream);
}

}  // namespace moxe::router::variants
