// moxe::router::variants: group-restricted routing on the device, forward and backward,
// E <= 1024, k <= 32 (docs/router_variants.md).
//
// Per token on a group of lanes: the allowed experts (the token's group range plus the
// shared pool, detail::expert_allowed) become the excluded bits of moxe::router's group
// top-k, the softmax runs over the allowed experts only, the optional DeepSeek-V3 group
// limit (top-2 of the allowed p per equal group, detail::allowed_group_score) excludes
// the groups not kept, and slots past the selectable count are -1. Group offsets live in device memory: a bad range reads as an empty group (the
// host reference rejects it instead).
// Backward: renormalised weights use the shared sparse backward (chosen logits only);
// plain weights (renormalize = false) the masked softmax's full Jacobian.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "moxe/core/launch.cuh"
#include "moxe/core/status.hpp"
#include "moxe/router/variants/detail/device.cuh"
#include "moxe/router/variants/detail/renormalised_backward.cuh"
#include "moxe/router/variants/detail/variant_math.hpp"
#include "moxe/router/variants/params.hpp"

namespace moxe::router::variants {

namespace detail {

/// Bit j set for the lane's elements that the token may not use (padding included).
template <int kLanes, int kPerLane>
MOXE_DEVICE MOXE_FORCEINLINE uint32_t excluded_bits(const LaneGroup<kLanes>& g, const GroupRestrictedDims& d,
                                                    const int32_t* offsets, int32_t group) {
  int lo, hi;
  group_range(offsets, d.num_groups, d.experts, group, lo, hi);
  uint32_t bits = 0;
  MOXE_PRAGMA_UNROLL
  for (int j = 0; j < kPerLane; ++j) {
    const int e = g.element(j);
    if (e >= d.experts || !expert_allowed(e, lo, hi, d.shared_begin, d.shared_end)) bits |= 1u << j;
  }
  return bits;
}

template <class T, int kLanes, int kPerLane>
__global__ void __launch_bounds__(kRowThreads, kRowMinBlocks)
    group_restricted_forward_kernel(const __grid_constant__ GroupRestrictedForwardParams<T, float> p) {
  using Group = LaneGroup<kLanes>;
  constexpr int kGroups = Group::kGroups;
  constexpr int kMaxE = kLanes * kPerLane;
  __shared__ float row_smem[kRowWarps][kGroups][kMaxE];    // p (-1: not allowed), then kept-group flags
  __shared__ float score_smem[kRowWarps][kGroups][kMaxE];  // group scores of the group limit
  __shared__ float slot_value[kRowWarps][kGroups][kMaxTopK];
  __shared__ int slot_index[kRowWarps][kGroups][kMaxTopK];
  const Group g;
  const int warp = threadIdx.x / kWarpSize;
  const int E = p.dims.experts, K = p.dims.top_k;
  const int n_groups = p.dims.n_groups, group_size = E / n_groups;
  const bool limited = n_groups > 1 && p.dims.topk_groups < n_groups;
  const int64_t T_ = p.dims.tokens;
  float* row = row_smem[warp][g.group];
  float* gscore = score_smem[warp][g.group];
  const TopKSlots slots{slot_value[warp][g.group], slot_index[warp][g.group]};
  const int64_t step = int64_t(gridDim.x) * kRowWarps * kGroups;
  for (int64_t base = (int64_t(blockIdx.x) * kRowWarps + warp) * kGroups; base < T_; base += step) {
    const int64_t t = base + g.group;
    const bool valid = t < T_;
    uint32_t excluded =
        valid ? excluded_bits<kLanes, kPerLane>(g, p.dims, p.group_offsets, p.group_id[t]) : ~0u;
    float v[kPerLane];
    load_row<T, kLanes, kPerLane>(g, p.logits + (valid ? t : 0) * E, E, valid, v);
    row_softmax<kLanes, kPerLane>(g, v, excluded);
    if (limited) {  // uniform over the grid; the softmax above stays over the unlimited set
      MOXE_PRAGMA_UNROLL
      for (int j = 0; j < kPerLane; ++j)
        if (g.element(j) < E) row[g.element(j)] = ((excluded >> j) & 1u) ? -1.f : v[j];
      __syncwarp();
      for (int gi = g.lane; gi < n_groups; gi += kLanes) {
        router::detail::Top2<float> t2;
        int count = 0;
        for (int e = gi * group_size; e < (gi + 1) * group_size; ++e)
          if (row[e] >= 0.f) {
            t2.add(row[e]);
            ++count;
          }
        gscore[gi] = allowed_group_score(t2.first, t2.second, count);
      }
      __syncwarp();
      for (int gi = g.lane; gi < n_groups; gi += kLanes) {
        int before = 0;
        for (int o = 0; o < n_groups; ++o) before += router::detail::ranks_before(gscore[o], o, gscore[gi], gi);
        row[gi] = before < p.dims.topk_groups ? 1.f : 0.f;
      }
      __syncwarp();
      MOXE_PRAGMA_UNROLL
      for (int j = 0; j < kPerLane; ++j) {
        const int e = g.element(j);
        if (e < E && row[e / group_size] == 0.f) excluded |= 1u << j;
      }
      __syncwarp();
    }
    const int allowed = g.sum(kPerLane - __popc(excluded & ((kPerLane == 32 ? 0u : (1u << kPerLane)) - 1u)));
    // slots past the allowed count keep these: they rank after every probability
    for (int r = g.lane; r < K; r += kLanes) {
      slots.value[r] = -math::infinity<float>();
      slots.index[r] = -1;
    }
    __syncwarp();
    nan_to_neg_inf(v);
    router::detail::group_topk<kLanes, kPerLane>(g, v, excluded, K, slots);  // K uniform over the warp
    if (valid) {
      const int n = allowed < K ? allowed : K;
      float sum = 0.f;
      for (int r = 0; r < n; ++r) sum += slots.value[r];
      const float inv = 1.f / sum;
      for (int r = g.lane; r < K; r += kLanes) {
        const bool used = r < n;
        p.topk_idx[t * K + r] = used ? slots.index[r] : -1;
        if (p.topk_prob != nullptr) p.topk_prob[t * K + r] = used ? slots.value[r] : 0.f;
        p.topk_weight[t * K + r] = used ? (p.renormalize ? slots.value[r] * inv : slots.value[r]) : 0.f;
      }
    }
    __syncwarp();
  }
}

/// renormalize = false: dz = p (gp - <p, gp>) over the allowed experts, gp = dw on the chosen.
template <class T, int kLanes, int kPerLane>
__global__ void __launch_bounds__(kRowThreads, kRowMinBlocks)
    group_restricted_plain_backward_kernel(const __grid_constant__ GroupRestrictedBackwardParams<T, float> b) {
  using Group = LaneGroup<kLanes>;
  const auto& p = b.fwd;
  const Group g;
  const int E = p.dims.experts, K = p.dims.top_k;
  const int64_t T_ = p.dims.tokens;
  const int warp = threadIdx.x / kWarpSize;
  const int64_t step = int64_t(gridDim.x) * kRowWarps * Group::kGroups;
  for (int64_t base = (int64_t(blockIdx.x) * kRowWarps + warp) * Group::kGroups; base < T_; base += step) {
    const int64_t t = base + g.group;
    const bool valid = t < T_;
    const uint32_t excluded =
        valid ? excluded_bits<kLanes, kPerLane>(g, p.dims, p.group_offsets, p.group_id[t]) : ~0u;
    float v[kPerLane], gp[kPerLane];
    load_row<T, kLanes, kPerLane>(g, p.logits + (valid ? t : 0) * E, E, valid, v);
    row_softmax<kLanes, kPerLane>(g, v, excluded);
    float dot = 0.f;
    MOXE_PRAGMA_UNROLL
    for (int j = 0; j < kPerLane; ++j) {
      gp[j] = 0.f;
      const int e = g.element(j);
      if (valid && !((excluded >> j) & 1u))
        for (int r = 0; r < K; ++r)
          if (p.topk_idx[t * K + r] == e) gp[j] = b.dweight[t * K + r];
      dot += v[j] * gp[j];
    }
    dot = g.sum(dot);
    if (valid) {
      MOXE_PRAGMA_UNROLL
      for (int j = 0; j < kPerLane; ++j) {
        const int e = g.element(j);
        if (e < E)
          b.dlogits[t * E + e] = from_float<T>(((excluded >> j) & 1u) ? 0.f : router::detail::softmax_grad(v[j], gp[j], dot, 0.f));
      }
    }
  }
}

}  // namespace detail

template <class T>
std::size_t group_restricted_forward_workspace_size(const GroupRestrictedForwardParams<T, float>&) { return 0; }

template <class T>
Status group_restricted_forward(const GroupRestrictedForwardParams<T, float>& p, void* workspace,
                                std::size_t workspace_bytes, cudaStream_t stream) {
  static_assert(is_device_element_v<T>, "logits must be float, __half or __nv_bfloat16");
  (void)workspace;
  (void)workspace_bytes;
  MOXE_RETURN_IF_ERROR(validate(p));
  if (p.dims.experts > kMaxExperts || p.dims.top_k > kMaxTopK) return Status::unsupported;
  const int grid = detail::token_grid(p.dims.tokens, p.dims.experts, false);
  return router::detail::dispatch_row_shape(p.dims.experts, [&](auto shape) {
    using S = decltype(shape);
    detail::group_restricted_forward_kernel<T, S::kLanes, S::kPerLane><<<grid, detail::kRowThreads, 0, stream>>>(p);
    return check_launch(stream);
  });
}

template <class T>
std::size_t group_restricted_backward_workspace_size(const GroupRestrictedBackwardParams<T, float>&) { return 0; }

template <class T>
Status group_restricted_backward(const GroupRestrictedBackwardParams<T, float>& b, void* workspace,
                                 std::size_t workspace_bytes, cudaStream_t stream) {
  static_assert(is_device_element_v<T>, "logits must be float, __half or __nv_bfloat16");
  (void)workspace;
  (void)workspace_bytes;
  MOXE_RETURN_IF_ERROR(validate(b));
  const auto& p = b.fwd;
  if (p.dims.experts > kMaxExperts || p.dims.top_k > kMaxTopK) return Status::unsupported;
  if (p.renormalize)
    return detail::launch_renormalised_backward(p.topk_idx, p.logits, b.dweight, p.dims.tokens, p.dims.experts,
                                                p.dims.top_k, b.dlogits, stream);
  const int grid = detail::token_grid(p.dims.tokens, p.dims.experts, false);
  return router::detail::dispatch_row_shape(p.dims.experts, [&](auto shape) {
    using S = decltype(shape);
    detail::group_restricted_plain_backward_kernel<T, S::kLanes, S::kPerLane>
        <<<grid, detail::kRowThreads, 0, stream>>>(b);
    return check_launch(stream);
  });
}

}  // namespace moxe::router::variants
