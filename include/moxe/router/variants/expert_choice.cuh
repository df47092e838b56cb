// moxe::router::variants: expert-choice routing on the device (Zhou et al. 2022),
// forward and backward, E <= 1024, T < 2^31 (docs/router_variants.md).
//
// Forward, three launches, no sort of T x E and no atomics outside shared memory:
//   1. ec_scores_kernel: 32 tokens per block; s = softmax(z) per token, written to the
//      optional scores [T, E] and, through a shared-memory tile, transposed into the
//      workspace as score_t [E, T] (coalesced both ways); row_map and token_weight rows
//      are reset (-1, 0).
//   2. ec_select_kernel: one block per expert over its column of score_t
//      (detail::select_column): a 4-pass 8-bit radix select finds the key of the C-th
//      largest score and how many of the tokens equal to it to take, then a stable block
//      compaction in token order writes expert_tokens [E, C], expert_weights,
//      row_map[t, e] = e*C + position and token_weight[t, e] = s (ties to the lower token
//      index).
//   3. (optional) ec_count_kernel: experts_per_token from the row map.
// Backward: per token, dz = s (gp - <s, gp>) with gp = dweight on the chosen (t, e).
#pragma once

#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "moxe/core/launch.cuh"
#include "moxe/core/reduce.cuh"
#include "moxe/core/status.hpp"
#include "moxe/core/workspace.hpp"
#include "moxe/router/detail/gate_math.hpp"
#include "moxe/router/variants/detail/column_select.cuh"
#include "moxe/router/variants/detail/device.cuh"
#include "moxe/router/variants/detail/variant_math.hpp"
#include "moxe/router/variants/params.hpp"

namespace moxe::router::variants {

namespace detail {

inline constexpr int kScoreTileTokens = 32;
inline constexpr int kScoreThreads = 256;

inline std::size_t score_tile_bytes(int experts) {
  return sizeof(float) * kScoreTileTokens * (static_cast<std::size_t>(experts) + 1);
}

/// The block's score tile (tokens t0.., [kScoreTileTokens][E + 1] in shared memory, after a
/// barrier) to its columns of the expert-major score_t [E, T]: consecutive threads write
/// consecutive tokens of one expert.
MOXE_DEVICE MOXE_FORCEINLINE void store_score_tile(const float* tile, int64_t t0, int64_t tokens, int E, float* score_t) {
  for (int i = threadIdx.x; i < kScoreTileTokens * E; i += kScoreThreads) {
    const int e = i / kScoreTileTokens, tt = i % kScoreTileTokens;
    if (t0 + tt < tokens) score_t[int64_t(e) * tokens + t0 + tt] = tile[tt * (E + 1) + e];
  }
}

template <class T>
__global__ void __launch_bounds__(kScoreThreads)
    ec_scores_kernel(const __grid_constant__ ExpertChoiceForwardParams<T, float> p, float* score_t) {
  extern __shared__ float tile[];  // [kScoreTileTokens][E + 1]
  const int E = p.dims.experts;
  const int64_t T_ = p.dims.tokens;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int64_t t0 = int64_t(blockIdx.x) * kScoreTileTokens;
  for (int tt = warp; tt < kScoreTileTokens; tt += kScoreThreads / kWarpSize) {
    const int64_t t = t0 + tt;
    if (t >= T_) break;
    const T* row = p.logits + t * E;
    math::MaxSum<float> ms;
    for (int e = lane; e < E; e += kWarpSize) ms.add(to_float(row[e]));
    const float lse = warp_merge(ms).log_sum_exp();
    for (int e = lane; e < E; e += kWarpSize) {
      const float s = math::exp(to_float(row[e]) - lse);
      tile[tt * (E + 1) + e] = s;
      if (p.scores != nullptr) p.scores[t * E + e] = s;
      p.row_map[t * E + e] = -1;
      p.token_weight[t * E + e] = 0.f;
    }
  }
  __syncthreads();
  store_score_tile(tile, t0, T_, E, score_t);
}

template <class T>
__global__ void __launch_bounds__(kSelectThreads)
    ec_select_kernel(const __grid_constant__ ExpertChoiceForwardParams<T, float> p, const float* score_t) {
  __shared__ ColumnSelectStorage storage;
  const int e = blockIdx.x, E = p.dims.experts;
  const int64_t T_ = p.dims.tokens, C = effective_capacity(p.dims);
  select_column(storage, score_t + int64_t(e) * T_, T_, C, [&](int64_t t, int64_t pos, float s) {
    const int64_t row = int64_t(e) * C + pos;
    p.expert_tokens[row] = static_cast<int32_t>(t);
    if (p.expert_weights != nullptr) p.expert_weights[row] = s;
    p.row_map[t * E + e] = row;
    p.token_weight[t * E + e] = s;
  });
  if (threadIdx.x == 0 && p.expert_offsets != nullptr) {
    p.expert_offsets[e] = int64_t(e) * C;
    if (e == 0) p.expert_offsets[E] = int64_t(E) * C;
  }
}

/// experts_per_token[t] = number of chosen (t, e): one warp per token.
template <class Index = int64_t>  // a template: one definition across translation units
__global__ void __launch_bounds__(kScoreThreads)
    ec_count_kernel(const Index* row_map, int64_t tokens, int experts, int32_t* experts_per_token) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t warps = int64_t(gridDim.x) * (kScoreThreads / kWarpSize);
  for (int64_t t = (int64_t(blockIdx.x) * kScoreThreads + threadIdx.x) / kWarpSize; t < tokens; t += warps) {
    int n = 0;
    for (int e = lane; e < experts; e += kWarpSize) n += row_map[t * experts + e] >= 0 ? 1 : 0;
    n = warp_sum(n);
    if (lane == 0) experts_per_token[t] = n;
  }
}

template <class T, int kLanes, int kPerLane>
__global__ void __launch_bounds__(kRowThreads, kRowMinBlocks)
    ec_backward_kernel(const __grid_constant__ ExpertChoiceBackwardParams<T, float> b) {
  const auto& p = b.fwd;
  const LaneGroup<kLanes> g;
  const int E = p.dims.experts;
  const uint32_t padding = router::detail::padding_bits<kLanes, kPerLane>(g, E);
  for_each_token(g, p.dims.tokens, [&](int64_t t, bool valid) {
    float v[kPerLane], gp[kPerLane];
    load_row<T, kLanes, kPerLane>(g, p.logits + (valid ? t : 0) * E, E, valid, v);
    row_softmax<kLanes, kPerLane>(g, v, padding);
    float dot = 0.f;
    MOXE_PRAGMA_UNROLL
    for (int j = 0; j < kPerLane; ++j) {
      const int e = g.element(j);
      gp[j] = (valid && e < E && p.row_map[t * E + e] >= 0) ? b.dweight[t * E + e] : 0.f;
      dot += v[j] * gp[j];
    }
    write_softmax_grad_row<T, kLanes, kPerLane>(g, v, gp, dot, padding, E, valid, b.dlogits + (valid ? t : 0) * E);
  });
}

template <class T>
float* carve_expert_choice_scratch(WorkspaceCarver& c, const ExpertChoiceForwardParams<T, float>& p) {
  return c.carve<float>(static_cast<std::size_t>(p.dims.tokens) * static_cast<std::size_t>(p.dims.experts));
}

}  // namespace detail

template <class T>
std::size_t expert_choice_forward_workspace_size(const ExpertChoiceForwardParams<T, float>& p) {
  WorkspaceCarver c;
  if (validate_dims(p.dims) == Status::ok) detail::carve_expert_choice_scratch(c, p);
  return c.required_bytes();
}

template <class T>
Status expert_choice_forward(const ExpertChoiceForwardParams<T, float>& p, void* workspace,
                             std::size_t workspace_bytes, cudaStream_t stream) {
  static_assert(is_device_element_v<T>, "logits must be float, __half or __nv_bfloat16");
  MOXE_RETURN_IF_ERROR(validate(p));
  if (p.dims.experts > kMaxExperts || p.dims.tokens > INT32_MAX) return Status::unsupported;
  WorkspaceCarver c(workspace, workspace_bytes);
  float* score_t = detail::carve_expert_choice_scratch(c, p);
  if (!c.fits()) return Status::workspace_too_small;
  const std::size_t smem = detail::score_tile_bytes(p.dims.experts);
  MOXE_RETURN_IF_ERROR(set_max_dynamic_smem(detail::ec_scores_kernel<T>, smem));
  const int64_t tiles = ceil_div<int64_t>(p.dims.tokens, detail::kScoreTileTokens);
  if (tiles > INT_MAX) return Status::unsupported;
  MOXE_RETURN_IF_ERROR(launch_kernel(detail::ec_scores_kernel<T>, static_cast<int>(tiles), detail::kScoreThreads, smem,
                                     stream, p, score_t));
  MOXE_RETURN_IF_ERROR(
      launch_kernel(detail::ec_select_kernel<T>, p.dims.experts, detail::kSelectThreads, 0, stream, p, score_t));
  if (p.experts_per_token == nullptr) return Status::ok;
  const int64_t warps_needed = p.dims.tokens;
  const int64_t blocks = ceil_div<int64_t>(warps_needed, detail::kScoreThreads / kWarpSize);
  const int grid = static_cast<int>(blocks < (int64_t(1) << 16) ? blocks : (int64_t(1) << 16));
  MOXE_RETURN_IF_ERROR(launch_kernel(detail::ec_count_kernel<int64_t>, grid, detail::kScoreThreads, 0, stream,
                                     p.row_map, p.dims.tokens, p.dims.experts, p.experts_per_token));
  return check_launch(stream);
}

template <class T>
std::size_t expert_choice_backward_workspace_size(const ExpertChoiceBackwardParams<T, float>&) { return 0; }

template <class T>
Status expert_choice_backward(const ExpertChoiceBackwardParams<T, float>& b, void* workspace,
                              std::size_t workspace_bytes, cudaStream_t stream) {
  static_assert(is_device_element_v<T>, "logits must be float, __half or __nv_bfloat16");
  (void)workspace;
  (void)workspace_bytes;
  MOXE_RETURN_IF_ERROR(validate(b));
  if (b.fwd.dims.experts > kMaxExperts || b.fwd.dims.tokens > INT32_MAX) return Status::unsupported;
  const int grid = detail::token_grid(b.fwd.dims.tokens, b.fwd.dims.experts, false);
  return detail::launch_rows(grid, b.fwd.dims.experts, stream, [](auto shape) {
    return detail::ec_backward_kernel<T, decltype(shape)::kLanes, decltype(shape)::kPerLane>;
  }, b);
}

}  // namespace moxe::router::variants
