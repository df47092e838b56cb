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
#include "moxe/router/variants/detail/group_limit.cuh"
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
  using Limit = GroupLimit<kLanes, kPerLane>;
  const LaneGroup<kLanes> g;
  __shared__ typename Limit::TempStorage limit_storage;
  __shared__ SlotStorage<LaneGroup<kLanes>::kGroups> slot_storage;
  const int E = p.dims.experts, K = p.dims.top_k;
  const Limit limit(limit_storage, g, E, p.dims.n_groups, p.dims.topk_groups);
  const TopKSlots slots = slot_storage.of(g.group);
  const auto group_score = [](const float* p_or_minus_one, int size) {  // -1: not allowed
    router::detail::Top2<float> t2;
    int count = 0;
    for (int i = 0; i < size; ++i)
      if (p_or_minus_one[i] >= 0.f) {
        t2.add(p_or_minus_one[i]);
        ++count;
      }
    return allowed_group_score(t2.first, t2.second, count);
  };
  for_each_token(g, p.dims.tokens, [&](int64_t t, bool valid) {
    uint32_t excluded =
        valid ? excluded_bits<kLanes, kPerLane>(g, p.dims, p.group_offsets, p.group_id[t]) : ~0u;
    float v[kPerLane];
    load_row<T, kLanes, kPerLane>(g, p.logits + (valid ? t : 0) * E, E, valid, v);
    row_softmax<kLanes, kPerLane>(g, v, excluded);
    // the group limit steers the selection only: the softmax above stays over the unlimited set
    const uint32_t not_allowed = excluded;
    limit.exclude_unkept([&](int j) { return ((not_allowed >> j) & 1u) ? -1.f : v[j]; }, group_score, excluded);
    const int allowed = g.sum(kPerLane - __popc(excluded & ((kPerLane == 32 ? 0u : (1u << kPerLane)) - 1u)));
    // slots past the allowed count keep these: they rank after every probability
    for (int r = g.lane; r < K; r += kLanes) {
      slots.value[r] = -math::infinity<float>();
      slots.index[r] = -1;
    }
    __syncwarp();
    nan_to_neg_inf(v);
    router::detail::group_topk<kLanes, kPerLane>(g, v, excluded, K, slots);  // K uniform over the warp
    if (valid)
      write_chosen_prefix(g, slots, allowed < K ? allowed : K, K, p.renormalize, t, p.topk_idx, p.topk_prob,
                          p.topk_weight);
    __syncwarp();
  });
}

/// renormalize = false: dz = p (gp - <p, gp>) over the allowed experts, gp = dw on the chosen.
template <class T, int kLanes, int kPerLane>
__global__ void __launch_bounds__(kRowThreads, kRowMinBlocks)
    group_restricted_plain_backward_kernel(const __grid_constant__ GroupRestrictedBackwardParams<T, float> b) {
  const auto& p = b.fwd;
  const LaneGroup<kLanes> g;
  const int E = p.dims.experts, K = p.dims.top_k;
  for_each_token(g, p.dims.tokens, [&](int64_t t, bool valid) {
    const uint32_t excluded =
        valid ? excluded_bits<kLanes, kPerLane>(g, p.dims, p.group_offsets, p.group_id[t]) : ~0u;
    float v[kPerLane], gp[kPerLane];
    load_row<T, kLanes, kPerLane>(g, p.logits + (valid ? t : 0) * E, E, valid, v);
    row_softmax<kLanes, kPerLane>(g, v, excluded);
    const int64_t row = valid ? t : 0;
    const float dot = gather_chosen_gradient<kLanes, kPerLane>(g, p.topk_idx + row * K, b.dweight + row * K, K,
                                                               excluded, valid, v, gp);
    write_softmax_grad_row<T, kLanes, kPerLane>(g, v, gp, dot, excluded, E, valid, b.dlogits + (valid ? t : 0) * E);
  });
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
  return detail::launch_rows(grid, p.dims.experts, stream, [](auto shape) {
    return detail::group_restricted_forward_kernel<T, decltype(shape)::kLanes, decltype(shape)::kPerLane>;
  }, p);
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
  return detail::launch_rows(grid, p.dims.experts, stream, [](auto shape) {
    return detail::group_restricted_plain_backward_kernel<T, decltype(shape)::kLanes, decltype(shape)::kPerLane>;
  }, b);
}

}  // namespace moxe::router::variants
