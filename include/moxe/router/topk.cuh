// moxe::router: top-k with renormalisation on the device, forward and backward, for any
// E <= 1024 and k <= 32, optionally group-limited (DeepSeek-V3): experts form n_groups
// equal contiguous groups, a group scores the sum of its top-2 scores (top-1 for one-expert
// groups), the topk_groups best groups (ties: lower group) stay, and the top-k is taken
// among their experts. Ties go to the lower index everywhere.
//
// Per token, a group of lanes holds the scores in registers; k <= 8 runs k rounds of group
// argmax, larger k a radix threshold search that costs O(E) per token whatever k is.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "moxe/core/launch.cuh"
#include "moxe/core/math.hpp"
#include "moxe/core/numeric.cuh"
#include "moxe/core/status.hpp"
#include "moxe/router/detail/gate_math.hpp"
#include "moxe/router/detail/lane_group.cuh"
#include "moxe/router/entropy.cuh"
#include "moxe/router/params.hpp"

namespace moxe::router {

namespace detail {

inline constexpr int kTopKWarps = 4;
inline constexpr int kTopKThreads = kTopKWarps * kWarpSize;

template <class T, int kLanes, int kPerLane>
__global__ void __launch_bounds__(kTopKThreads) topk_forward_kernel(const __grid_constant__ TopKParams<T, float> p) {
  using Group = LaneGroup<kLanes>;
  constexpr int kGroups = Group::kGroups;
  constexpr int kMaxE = kLanes * kPerLane;
  __shared__ float row_smem[kTopKWarps][kGroups][kMaxE];    // the scores, then the kept-group flags
  __shared__ float score_smem[kTopKWarps][kGroups][kMaxE];  // group scores
  __shared__ float slot_value[kTopKWarps][kGroups][kMaxTopK];
  __shared__ int slot_index[kTopKWarps][kGroups][kMaxTopK];
  const Group g;
  const int warp = threadIdx.x / kWarpSize;
  const int E = p.dims.experts, K = p.dims.top_k;
  const int n_groups = p.dims.n_groups, group_size = E / n_groups;
  const bool limited = n_groups > 1 && p.dims.topk_groups < n_groups;
  const int64_t T_ = p.dims.tokens;
  float* row = row_smem[warp][g.group];
  float* gscore = score_smem[warp][g.group];
  const TopKSlots slots{slot_value[warp][g.group], slot_index[warp][g.group]};
  const uint32_t padding = padding_bits<kLanes, kPerLane>(g, E);
  const int64_t step = int64_t(gridDim.x) * kTopKWarps * kGroups;
  for (int64_t base = (int64_t(blockIdx.x) * kTopKWarps + warp) * kGroups; base < T_; base += step) {
    const int64_t t = base + g.group;
    const bool valid = t < T_;
    float v[kPerLane];
    MOXE_PRAGMA_UNROLL
    for (int j = 0; j < kPerLane; ++j) {
      const int e = g.element(j);
      v[j] = (valid && e < E) ? to_float(p.scores[t * E + e]) : 0.f;
      if (v[j] != v[j]) v[j] = -math::infinity<float>();
    }
    uint32_t taken = padding;
    if (limited) {  // uniform over the grid
      MOXE_PRAGMA_UNROLL
      for (int j = 0; j < kPerLane; ++j)
        if (g.element(j) < E) row[g.element(j)] = v[j];
      __syncwarp();
      for (int gi = g.lane; gi < n_groups; gi += kLanes) {
        Top2<float> t2;
        for (int e = gi * group_size; e < (gi + 1) * group_size; ++e) t2.add(row[e]);
        gscore[gi] = t2.group_score(group_size);
      }
      __syncwarp();
      for (int gi = g.lane; gi < n_groups; gi += kLanes) {
        int before = 0;
        for (int o = 0; o < n_groups; ++o) before += ranks_before(gscore[o], o, gscore[gi], gi);
        row[gi] = before < p.dims.topk_groups ? 1.f : 0.f;
      }
      __syncwarp();
      MOXE_PRAGMA_UNROLL
      for (int j = 0; j < kPerLane; ++j) {
        const int e = g.element(j);
        if (e < E && row[e / group_size] == 0.f) taken |= 1u << j;
      }
      __syncwarp();
    }
    group_topk<kLanes, kPerLane>(g, v, taken, K, slots);
    if (valid) {
      float total = 0.f;
      for (int r = 0; r < K; ++r) total += slots.value[r];
      for (int r = g.lane; r < K; r += kLanes) {
        p.topk_idx[t * K + r] = slots.index[r];
        if (p.topk_value != nullptr) p.topk_value[t * K + r] = slots.value[r];
        if (p.topk_weight != nullptr)
          p.topk_weight[t * K + r] = p.renormalize ? slots.value[r] / total : slots.value[r];
      }
    }
    __syncwarp();
  }
}

template <class T, int kLanes, int kPerLane>
__global__ void __launch_bounds__(kTopKThreads)
    topk_backward_kernel(const __grid_constant__ TopKBackwardParams<T, float> b) {
  using Group = LaneGroup<kLanes>;
  constexpr int kGroups = Group::kGroups;
  constexpr int kMaxE = kLanes * kPerLane;
  __shared__ float grad_smem[kTopKWarps][kGroups][kMaxE];  // per-expert gradient, zero elsewhere
  const Group g;
  const int warp = threadIdx.x / kWarpSize;
  const auto& p = b.fwd;
  const int E = p.dims.experts, K = p.dims.top_k;
  const int64_t T_ = p.dims.tokens;
  for (int i = threadIdx.x; i < kTopKWarps * kGroups * kMaxE; i += kTopKThreads) (&grad_smem[0][0][0])[i] = 0.f;
  __syncthreads();
  float* grad = grad_smem[warp][g.group];
  const int64_t step = int64_t(gridDim.x) * kTopKWarps * kGroups;
  for (int64_t base = (int64_t(blockIdx.x) * kTopKWarps + warp) * kGroups; base < T_; base += step) {
    const int64_t t = base + g.group;
    const bool valid = t < T_;
    if (valid) {
      const int32_t* idx = p.topk_idx + t * K;
      const T* scores = p.scores + t * E;
      // slots outside [0, E) (-1: not routed) are skipped: no score is read for them, and
      // the renormalisation is over the routed slots
      float total = 0.f, w_dot = 0.f;
      for (int k = 0; k < K; ++k)
        if (idx[k] >= 0 && idx[k] < E) total += to_float(scores[idx[k]]);
      const float inv_total = 1.f / total;
      if (b.dweight != nullptr && p.renormalize)
        for (int k = 0; k < K; ++k)
          if (idx[k] >= 0 && idx[k] < E) w_dot += to_float(scores[idx[k]]) * inv_total * b.dweight[t * K + k];
      for (int k = g.lane; k < K; k += kLanes) {
        const int e = idx[k];
        if (e < 0 || e >= E) continue;
        // a repeated expert (corrupt input: a top-k's are distinct) would be two lanes' racing
        // stores: the last slot wins, as in the reference, and the bits stay deterministic
        bool repeated_later = false;
        for (int later = k + 1; later < K; ++later) repeated_later |= idx[later] == e;
        if (repeated_later) continue;
        const float dw = b.dweight != nullptr ? b.dweight[t * K + k] : 0.f;
        float gk = p.renormalize ? renorm_grad(dw, w_dot, inv_total) : dw;
        if (b.dvalue != nullptr) gk += b.dvalue[t * K + k];
        grad[e] = gk;
      }
    }
    __syncwarp();
    if (valid) {
      MOXE_PRAGMA_UNROLL
      for (int j = 0; j < kPerLane; ++j) {
        const int e = g.element(j);
        if (e < E) b.dscores[t * E + e] = from_float<T>(grad[e]);
      }
    }
    __syncwarp();
    if (valid)
      for (int k = g.lane; k < K; k += kLanes) {
        const int e = p.topk_idx[t * K + k];
        if (e >= 0 && e < E) grad[e] = 0.f;
      }
    __syncwarp();
  }
}

}  // namespace detail

template <class T>
std::size_t topk_forward_workspace_size(const TopKParams<T, float>&) { return 0; }

template <class T>
Status topk_forward(const TopKParams<T, float>& p, void* workspace, std::size_t workspace_bytes, cudaStream_t stream) {
  static_assert(is_device_element_v<T>, "scores must be float, __half or __nv_bfloat16");
  (void)workspace;
  (void)workspace_bytes;
  MOXE_RETURN_IF_ERROR(validate(p));
  if (p.dims.experts > kMaxExperts || p.dims.top_k > kMaxTopK) return Status::unsupported;
  const int grid = detail::row_grid(p.dims.tokens, p.dims.experts, detail::kTopKWarps);
  return detail::dispatch_row_shape(p.dims.experts, [&](auto shape) {
    using S = decltype(shape);
    MOXE_RETURN_IF_ERROR(
        launch_kernel(detail::topk_forward_kernel<T, S::kLanes, S::kPerLane>, grid, detail::kTopKThreads, 0, stream, p));
    return check_launch(stream);
  });
}

template <class T>
std::size_t topk_backward_workspace_size(const TopKBackwardParams<T, float>&) { return 0; }

template <class T>
Status topk_backward(const TopKBackwardParams<T, float>& b, void* workspace, std::size_t workspace_bytes,
                     cudaStream_t stream) {
  static_assert(is_device_element_v<T>, "scores must be float, __half or __nv_bfloat16");
  (void)workspace;
  (void)workspace_bytes;
  MOXE_RETURN_IF_ERROR(validate(b));
  if (b.fwd.dims.experts > kMaxExperts || b.fwd.dims.top_k > kMaxTopK) return Status::unsupported;
  const int grid = detail::row_grid(b.fwd.dims.tokens, b.fwd.dims.experts, detail::kTopKWarps);
  return detail::dispatch_row_shape(b.fwd.dims.experts, [&](auto shape) {
    using S = decltype(shape);
    MOXE_RETURN_IF_ERROR(launch_kernel(detail::topk_backward_kernel<T, S::kLanes, S::kPerLane>, grid,
                                       detail::kTopKThreads, 0, stream, b));
    return check_launch(stream);
  });
}

}  // namespace moxe::router
