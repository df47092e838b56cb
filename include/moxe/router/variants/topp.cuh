// moxe::router::variants: top-p (dynamic-k) routing on the device, forward and backward,
// E <= 1024, max_k <= 32 (docs/router_variants.md).
//
// Forward, per token on a group of lanes (moxe::router's row layout): the softmax in
// registers, the top-max_k of p by moxe::router's group top-k (ties to the lower index),
// then the prefix length from detail::topp_count, the arithmetic the reference runs too.
// The per-token counts sum into per-block partials and one small block adds them in
// block order (deterministic, no atomics).
// Backward: with renormalize (w = p / sum(p chosen)), w is the softmax of the chosen
// logits alone, so it reads only the chosen logits and writes dz = w (dw - <w, dw>) on
// them, zero elsewhere. Without (w = p, the default), the full softmax Jacobian:
// dz = p (gp - <p, gp>) over every expert, gp = dw on the chosen.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "moxe/core/launch.cuh"
#include "moxe/core/status.hpp"
#include "moxe/core/workspace.hpp"
#include "moxe/router/variants/detail/device.cuh"
#include "moxe/router/variants/detail/renormalised_backward.cuh"
#include "moxe/router/variants/detail/variant_math.hpp"
#include "moxe/router/variants/params.hpp"

namespace moxe::router::variants {

namespace detail {

template <class T, int kLanes, int kPerLane>
__global__ void __launch_bounds__(kRowThreads, kRowMinBlocks)
    topp_forward_kernel(const __grid_constant__ TopPForwardParams<T, float> p, int64_t* block_counts) {
  const LaneGroup<kLanes> g;
  __shared__ SlotStorage<LaneGroup<kLanes>::kGroups> slot_storage;
  __shared__ int64_t warp_counts[kRowWarps];
  const int E = p.dims.experts, K = p.dims.max_k;
  const TopKSlots slots = slot_storage.of(g.group);
  const uint32_t padding = router::detail::padding_bits<kLanes, kPerLane>(g, E);
  int64_t my_count = 0;
  for_each_token(g, p.dims.tokens, [&](int64_t t, bool valid) {
    float v[kPerLane];
    load_row<T, kLanes, kPerLane>(g, p.logits + (valid ? t : 0) * E, E, valid, v);
    row_softmax<kLanes, kPerLane>(g, v, padding);
    nan_to_neg_inf(v);
    router::detail::group_topk<kLanes, kPerLane>(g, v, padding, K, slots);
    if (valid) {
      const int n = topp_count(slots.value, K, p.top_p);
      write_chosen_prefix(g, slots, n, K, p.renormalize, t, p.topk_idx, p.topk_prob, p.topk_weight);
      if (g.lane == 0) {
        if (p.expert_count != nullptr) p.expert_count[t] = n;
        my_count += n;
      }
    }
    __syncwarp();
  });
  if (block_counts != nullptr) {
    my_count = warp_sum(my_count);  // fixed order: lanes, then warps
    if (threadIdx.x % kWarpSize == 0) warp_counts[threadIdx.x / kWarpSize] = my_count;
    __syncthreads();
    if (threadIdx.x == 0) {
      int64_t s = 0;
      for (int w = 0; w < kRowWarps; ++w) s += warp_counts[w];
      block_counts[blockIdx.x] = s;
    }
  }
}

/// renormalize = false: dz = p (gp - <p, gp>) over all experts, gp = dw on the chosen.
template <class T, int kLanes, int kPerLane>
__global__ void __launch_bounds__(kRowThreads, kRowMinBlocks)
    topp_plain_backward_kernel(const __grid_constant__ TopPBackwardParams<T, float> b) {
  const auto& p = b.fwd;
  const LaneGroup<kLanes> g;
  const int E = p.dims.experts, K = p.dims.max_k;
  const uint32_t padding = router::detail::padding_bits<kLanes, kPerLane>(g, E);
  for_each_token(g, p.dims.tokens, [&](int64_t t, bool valid) {
    const int64_t row = valid ? t : 0;
    float v[kPerLane], gp[kPerLane];
    load_row<T, kLanes, kPerLane>(g, p.logits + row * E, E, valid, v);
    row_softmax<kLanes, kPerLane>(g, v, padding);
    const float dot = gather_chosen_gradient<kLanes, kPerLane>(g, p.topk_idx + row * K, b.dweight + row * K, K,
                                                               padding, valid, v, gp);
    write_softmax_grad_row<T, kLanes, kPerLane>(g, v, gp, dot, padding, E, valid, b.dlogits + row * E);
  });
}

/// Scratch of the top-p forward: per-block token counts (only when total_count is wanted).
template <class T>
int64_t* carve_topp_scratch(WorkspaceCarver& c, const TopPForwardParams<T, float>& p) {
  if (p.total_count == nullptr) return nullptr;
  return c.carve<int64_t>(static_cast<std::size_t>(token_grid(p.dims.tokens, p.dims.experts, true)));
}

}  // namespace detail

template <class T>
std::size_t topp_forward_workspace_size(const TopPForwardParams<T, float>& p) {
  WorkspaceCarver c;
  if (validate_dims(p.dims) == Status::ok) detail::carve_topp_scratch(c, p);
  return c.required_bytes();
}

template <class T>
Status topp_forward(const TopPForwardParams<T, float>& p, void* workspace, std::size_t workspace_bytes,
                    cudaStream_t stream) {
  static_assert(is_device_element_v<T>, "logits must be float, __half or __nv_bfloat16");
  MOXE_RETURN_IF_ERROR(validate(p));
  if (p.dims.experts > kMaxExperts || p.dims.max_k > kMaxTopK) return Status::unsupported;
  WorkspaceCarver c(workspace, workspace_bytes);
  int64_t* block_counts = detail::carve_topp_scratch(c, p);
  if (!c.fits()) return Status::workspace_too_small;
  const int grid = detail::token_grid(p.dims.tokens, p.dims.experts, p.total_count != nullptr);
  MOXE_RETURN_IF_ERROR(detail::launch_rows(grid, p.dims.experts, stream, [](auto shape) {
    return detail::topp_forward_kernel<T, decltype(shape)::kLanes, decltype(shape)::kPerLane>;
  }, p, block_counts));
  if (p.total_count == nullptr) return Status::ok;
  MOXE_RETURN_IF_ERROR(
      launch_kernel(detail::sum_partials_kernel<int64_t>, 1, 256, 0, stream, block_counts, grid, 1, p.total_count));
  return check_launch(stream);
}

template <class T>
std::size_t topp_backward_workspace_size(const TopPBackwardParams<T, float>&) { return 0; }

template <class T>
Status topp_backward(const TopPBackwardParams<T, float>& b, void* workspace, std::size_t workspace_bytes,
                     cudaStream_t stream) {
  static_assert(is_device_element_v<T>, "logits must be float, __half or __nv_bfloat16");
  (void)workspace;
  (void)workspace_bytes;
  MOXE_RETURN_IF_ERROR(validate(b));
  if (b.fwd.dims.experts > kMaxExperts || b.fwd.dims.max_k > kMaxTopK) return Status::unsupported;
  if (b.fwd.renormalize)
    return detail::launch_renormalised_backward(b.fwd.topk_idx, b.fwd.logits, b.dweight, b.fwd.dims.tokens,
                                                b.fwd.dims.experts, b.fwd.dims.max_k, b.dlogits, stream);
  const int grid = detail::token_grid(b.fwd.dims.tokens, b.fwd.dims.experts, false);
  return detail::launch_rows(grid, b.fwd.dims.experts, stream, [](auto shape) {
    return detail::topp_plain_backward_kernel<T, decltype(shape)::kLanes, decltype(shape)::kPerLane>;
  }, b);
}

}  // namespace moxe::router::variants
