// moxe::router::variants: expert choice inside groups (MoMa, Lin et al. 2024) on the
// device, forward and backward, E <= 1024, num_groups <= 1024, T < 2^31
// (docs/router_variants.md).
//
// Forward, five launches, no sort of T x E and no atomics outside shared memory:
//   1. gec_count_kernel: per-block histograms of the group ids (integer shared-memory
//      adds, order-free) into rows of partials.
//   2. gec_layout_kernel, one block: the group token counts (partials summed in block
//      order), each expert's pool (detail::expert_pool), the experts of each pool, each
//      expert's capacity (detail::pool_capacity) and their exclusive scan, expert_offsets.
//   3. gec_scores_kernel: 32 tokens per block; s = sigmoid(z), or the softmax over the
//      experts whose pool sees the token; the optional scores, the reset of row_map and
//      token_weight, and the transpose into score_t [E, T] with -1 where the expert's pool
//      does not see the token (detail::select_key: never chosen).
//   4. gec_select_kernel: one block per expert, expert choice's detail::select_column with
//      C_e = off[e+1] - off[e] rows from off[e].
//   5. (optional) expert choice's ec_count_kernel: experts_per_token.
// Backward, per token: sigmoid: dz = dw sigmoid'(z) on the chosen pairs (from z, not from
// the rounded s); softmax: the masked softmax's Jacobian over the experts that see the
// token (their pools from one layout block into the workspace).
// Group ids and offsets live in device memory: an id outside [0, num_groups) is in no
// group (only shared experts see the token); bad offsets are clamped per group and an
// expert belongs to the lowest group that holds it (the host reference rejects them).
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
#include "moxe/router/variants/expert_choice.cuh"
#include "moxe/router/variants/params.hpp"

namespace moxe::router::variants {

/// Device limit on num_groups of group_expert_choice (the layout block counts tokens per
/// group in shared memory).
inline constexpr int kMaxChoiceGroups = 1024;

namespace detail {

inline constexpr int kCountThreads = 256;
inline constexpr int kCountTokensPerThread = 16;
inline constexpr int kLayoutThreads = 1024;  // one per expert
static_assert(kLayoutThreads >= kMaxExperts, "the layout block holds one thread per expert");

/// Blocks of the group-id histogram: at least kCountThreads * kCountTokensPerThread tokens
/// each, at most kMaxCountBlocks.
inline int gec_count_grid(int64_t tokens) {
  const int64_t blocks = ceil_div<int64_t>(tokens, int64_t(kCountThreads) * kCountTokensPerThread);
  return static_cast<int>(blocks < kMaxCountBlocks ? blocks : kMaxCountBlocks);
}

/// partials[block][g] = tokens of group g among the block's (ids outside [0, G) skipped).
template <int = 0>  // a template: one definition across translation units
__global__ void __launch_bounds__(kCountThreads)
    gec_count_kernel(const int32_t* group_id, int64_t tokens, int num_groups, int32_t* partials) {
  __shared__ int hist[kMaxChoiceGroups];
  for (int g = threadIdx.x; g < num_groups; g += kCountThreads) hist[g] = 0;
  __syncthreads();
  // the whole warp runs every round (a lane past the end adds nothing): match needs it
  const int64_t step = int64_t(gridDim.x) * kCountThreads;
  for (int64_t start = int64_t(blockIdx.x) * kCountThreads; start < tokens; start += step) {
    const int64_t t = start + threadIdx.x;
    const int32_t g = t < tokens ? group_id[t] : -1;
    const int bin = (g >= 0 && g < num_groups) ? g : -1;
    // few groups (modalities): aggregate equal ids over the warp first
    const unsigned peers = __match_any_sync(kFullMask, bin);
    if (bin >= 0 && int(threadIdx.x % kWarpSize) == __ffs(peers) - 1) atomicAdd(&hist[bin], __popc(peers));
  }
  __syncthreads();
  for (int g = threadIdx.x; g < num_groups; g += kCountThreads)
    partials[int64_t(blockIdx.x) * num_groups + g] = hist[g];
}

/// One block of kLayoutThreads: pool[e] for every expert and, with partials (count_blocks
/// rows of num_groups), expert_offsets[0..E] from the capacities of the pools.
template <int = 0>  // a template: one definition across translation units
__global__ void __launch_bounds__(kLayoutThreads)
    gec_layout_kernel(const GroupExpertChoiceDims d, const int32_t* group_offsets, const int32_t* partials,
                      int count_blocks, int32_t* pool_out, int64_t* expert_offsets) {
  __shared__ int64_t group_tokens[kMaxChoiceGroups];
  __shared__ int pool_experts[kMaxChoiceGroups + 1];  // [G]: the shared pool
  __shared__ int64_t warp_totals[kLayoutThreads / kWarpSize];
  const int E = d.experts, G = d.num_groups, e = threadIdx.x;
  const int32_t pool = e < E ? expert_pool(group_offsets, G, E, d.shared_begin, d.shared_end, e) : kNoPool;
  if (e < E) pool_out[e] = pool;
  if (partials == nullptr) return;  // uniform: the pools were all that was asked for
  for (int g = threadIdx.x; g < G; g += kLayoutThreads) {
    int64_t n = 0;
    for (int b = 0; b < count_blocks; ++b) n += partials[int64_t(b) * G + g];
    group_tokens[g] = n;
  }
  for (int g = threadIdx.x; g <= G; g += kLayoutThreads) pool_experts[g] = 0;
  __syncthreads();
  if (pool != kNoPool) atomicAdd(&pool_experts[pool == kSharedPool ? G : pool], 1);  // integer: order-free
  __syncthreads();
  int64_t c = 0;
  if (pool != kNoPool) {
    const int slot = pool == kSharedPool ? G : pool;
    const int64_t n = pool == kSharedPool ? d.tokens : group_tokens[pool];
    c = pool_capacity(n, pool_experts[slot], d.capacity, d.capacity_factor, d.top_k);
  }
  // exclusive scan of the capacities over the experts: warps, then the warp totals
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  int64_t inclusive = c;
  MOXE_PRAGMA_UNROLL
  for (int o = 1; o < kWarpSize; o *= 2) {
    const int64_t x = __shfl_up_sync(kFullMask, inclusive, o);
    if (lane >= o) inclusive += x;
  }
  if (lane == kWarpSize - 1) warp_totals[warp] = inclusive;
  __syncthreads();
  int64_t before = 0;
  for (int w = 0; w < warp; ++w) before += warp_totals[w];
  inclusive += before;
  if (e < E) expert_offsets[e] = inclusive - c;
  if (e == E - 1) expert_offsets[E] = inclusive;
}

template <class T>
__global__ void __launch_bounds__(kScoreThreads)
    gec_scores_kernel(const __grid_constant__ GroupExpertChoiceForwardParams<T, float> p, const int32_t* pool,
                      float* score_t) {
  extern __shared__ float tile[];  // [kScoreTileTokens][E + 1]
  const int E = p.dims.experts;
  const int64_t T_ = p.dims.tokens;
  const bool softmax = p.score == ChoiceScore::softmax;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int64_t t0 = int64_t(blockIdx.x) * kScoreTileTokens;
  for (int tt = warp; tt < kScoreTileTokens; tt += kScoreThreads / kWarpSize) {
    const int64_t t = t0 + tt;
    if (t >= T_) break;
    const T* row = p.logits + t * E;
    const int32_t group = p.group_id[t];
    float lse = 0.f;
    if (softmax) {
      math::MaxSum<float> ms;
      for (int e = lane; e < E; e += kWarpSize)
        if (pool_sees(pool[e], group)) ms.add(to_float(row[e]));
      lse = warp_merge(ms).log_sum_exp();
    }
    for (int e = lane; e < E; e += kWarpSize) {
      const bool seen = pool_sees(pool[e], group);
      const float z = to_float(row[e]);
      const float s = softmax ? math::exp(z - lse) : math::sigmoid(z);
      tile[tt * (E + 1) + e] = seen ? s : -1.f;  // select_key: -1 is never chosen
      if (p.scores != nullptr) p.scores[t * E + e] = seen ? s : 0.f;
      p.row_map[t * E + e] = -1;
      p.token_weight[t * E + e] = 0.f;
    }
  }
  __syncthreads();
  store_score_tile(tile, t0, T_, E, score_t);
}

template <class T>
__global__ void __launch_bounds__(kSelectThreads)
    gec_select_kernel(const __grid_constant__ GroupExpertChoiceForwardParams<T, float> p, const float* score_t) {
  __shared__ ColumnSelectStorage storage;
  const int e = blockIdx.x, E = p.dims.experts;
  const int64_t T_ = p.dims.tokens, base = p.expert_offsets[e], C = p.expert_offsets[e + 1] - base;
  select_column(storage, score_t + int64_t(e) * T_, T_, C, [&](int64_t t, int64_t pos, float s) {
    const int64_t row = base + pos;
    p.expert_tokens[row] = static_cast<int32_t>(t);
    if (p.expert_weights != nullptr) p.expert_weights[row] = s;
    p.row_map[t * E + e] = row;
    p.token_weight[t * E + e] = s;
  });
}

/// sigmoid: dz = dw sigmoid'(z) where row_map >= 0; softmax: dz = s (gp - <s, gp>) over the
/// experts whose pool sees the token (pool: the layout block's), gp = dw on the chosen.
template <class T, int kLanes, int kPerLane>
__global__ void __launch_bounds__(kRowThreads, kRowMinBlocks)
    gec_backward_kernel(const __grid_constant__ GroupExpertChoiceBackwardParams<T, float> b, const int32_t* pool) {
  const auto& p = b.fwd;
  const LaneGroup<kLanes> g;
  const int E = p.dims.experts;
  const uint32_t padding = router::detail::padding_bits<kLanes, kPerLane>(g, E);
  for_each_token(g, p.dims.tokens, [&](int64_t t, bool valid) {
    const int64_t row = valid ? t : 0;
    float v[kPerLane], gp[kPerLane];
    load_row<T, kLanes, kPerLane>(g, p.logits + row * E, E, valid, v);
    if (p.score == ChoiceScore::sigmoid) {  // uniform over the grid
      if (!valid) return;
      MOXE_PRAGMA_UNROLL
      for (int j = 0; j < kPerLane; ++j) {
        const int e = g.element(j);
        if (e >= E) continue;
        const bool chosen = p.row_map[row * E + e] >= 0;
        const float ds = math::sigmoid_grad(v[j]);  // from z: exact for the large logits chosen
        b.dlogits[row * E + e] = from_float<T>(chosen ? b.dweight[row * E + e] * ds : 0.f);
      }
      return;
    }
    uint32_t excluded = padding;
    const int32_t group = valid ? p.group_id[row] : -1;
    MOXE_PRAGMA_UNROLL
    for (int j = 0; j < kPerLane; ++j) {
      const int e = g.element(j);
      if (!valid || (e < E && !pool_sees(pool[e], group))) excluded |= 1u << j;
    }
    row_softmax<kLanes, kPerLane>(g, v, excluded);
    float dot = 0.f;
    MOXE_PRAGMA_UNROLL
    for (int j = 0; j < kPerLane; ++j) {
      const int e = g.element(j);
      gp[j] = (!((excluded >> j) & 1u) && p.row_map[row * E + e] >= 0) ? b.dweight[row * E + e] : 0.f;
      dot += v[j] * gp[j];
    }
    write_softmax_grad_row<T, kLanes, kPerLane>(g, v, gp, dot, excluded, E, valid, b.dlogits + row * E);
  });
}

struct GecForwardScratch {
  int32_t* partials;  // [count blocks, G]
  int32_t* pool;      // [E]
  float* score_t;     // [E, T]
};

inline GecForwardScratch carve_gec_forward_scratch(WorkspaceCarver& c, const GroupExpertChoiceDims& d) {
  GecForwardScratch s;
  s.partials = c.carve<int32_t>(static_cast<std::size_t>(gec_count_grid(d.tokens)) * d.num_groups);
  s.pool = c.carve<int32_t>(static_cast<std::size_t>(d.experts));
  s.score_t = c.carve<float>(static_cast<std::size_t>(d.tokens) * static_cast<std::size_t>(d.experts));
  return s;
}

/// The backward needs the pools only with softmax scores.
inline int32_t* carve_gec_backward_scratch(WorkspaceCarver& c, const GroupExpertChoiceDims& d, ChoiceScore score) {
  return score == ChoiceScore::softmax ? c.carve<int32_t>(static_cast<std::size_t>(d.experts)) : nullptr;
}

inline bool gec_device_supported(const GroupExpertChoiceDims& d) {
  return d.experts <= kMaxExperts && d.num_groups <= kMaxChoiceGroups && d.tokens <= INT32_MAX;
}

}  // namespace detail

template <class T>
std::size_t group_expert_choice_forward_workspace_size(const GroupExpertChoiceForwardParams<T, float>& p) {
  WorkspaceCarver c;
  if (validate_dims(p.dims) == Status::ok && detail::gec_device_supported(p.dims))
    detail::carve_gec_forward_scratch(c, p.dims);
  return c.required_bytes();
}

/// expert_tokens and expert_weights hold group_expert_choice_max_rows(dims) entries; the
/// launcher fills the first expert_offsets[E] and leaves the rest untouched.
template <class T>
Status group_expert_choice_forward(const GroupExpertChoiceForwardParams<T, float>& p, void* workspace,
                                   std::size_t workspace_bytes, cudaStream_t stream) {
  static_assert(is_device_element_v<T>, "logits must be float, __half or __nv_bfloat16");
  MOXE_RETURN_IF_ERROR(validate(p));
  if (!detail::gec_device_supported(p.dims)) return Status::unsupported;
  const int64_t tiles = ceil_div<int64_t>(p.dims.tokens, detail::kScoreTileTokens);
  if (tiles > INT_MAX) return Status::unsupported;
  WorkspaceCarver c(workspace, workspace_bytes);
  const detail::GecForwardScratch s = detail::carve_gec_forward_scratch(c, p.dims);
  if (!c.fits()) return Status::workspace_too_small;
  const std::size_t smem = detail::score_tile_bytes(p.dims.experts);
  MOXE_RETURN_IF_ERROR(set_max_dynamic_smem(detail::gec_scores_kernel<T>, smem));
  const int count_grid = detail::gec_count_grid(p.dims.tokens);
  MOXE_RETURN_IF_ERROR(launch_kernel(detail::gec_count_kernel<0>, count_grid, detail::kCountThreads, 0, stream,
                                     p.group_id, p.dims.tokens, p.dims.num_groups, s.partials));
  MOXE_RETURN_IF_ERROR(launch_kernel(detail::gec_layout_kernel<0>, 1, detail::kLayoutThreads, 0, stream, p.dims,
                                     p.group_offsets, s.partials, count_grid, s.pool, p.expert_offsets));
  MOXE_RETURN_IF_ERROR(launch_kernel(detail::gec_scores_kernel<T>, static_cast<int>(tiles), detail::kScoreThreads,
                                     smem, stream, p, s.pool, s.score_t));
  MOXE_RETURN_IF_ERROR(
      launch_kernel(detail::gec_select_kernel<T>, p.dims.experts, detail::kSelectThreads, 0, stream, p, s.score_t));
  if (p.experts_per_token != nullptr) {
    const int64_t blocks = ceil_div<int64_t>(p.dims.tokens, detail::kScoreThreads / kWarpSize);
    const int grid = static_cast<int>(blocks < (int64_t(1) << 16) ? blocks : (int64_t(1) << 16));
    MOXE_RETURN_IF_ERROR(launch_kernel(detail::ec_count_kernel<int64_t>, grid, detail::kScoreThreads, 0, stream,
                                       p.row_map, p.dims.tokens, p.dims.experts, p.experts_per_token));
  }
  return check_launch(stream);
}

template <class T>
std::size_t group_expert_choice_backward_workspace_size(const GroupExpertChoiceBackwardParams<T, float>& b) {
  WorkspaceCarver c;
  if (validate_dims(b.fwd.dims) == Status::ok && detail::gec_device_supported(b.fwd.dims))
    detail::carve_gec_backward_scratch(c, b.fwd.dims, b.fwd.score);
  return c.required_bytes();
}

template <class T>
Status group_expert_choice_backward(const GroupExpertChoiceBackwardParams<T, float>& b, void* workspace,
                                    std::size_t workspace_bytes, cudaStream_t stream) {
  static_assert(is_device_element_v<T>, "logits must be float, __half or __nv_bfloat16");
  MOXE_RETURN_IF_ERROR(validate(b));
  const auto& p = b.fwd;
  if (!detail::gec_device_supported(p.dims)) return Status::unsupported;
  WorkspaceCarver c(workspace, workspace_bytes);
  int32_t* pool = detail::carve_gec_backward_scratch(c, p.dims, p.score);
  if (!c.fits()) return Status::workspace_too_small;
  if (pool != nullptr)
    MOXE_RETURN_IF_ERROR(launch_kernel(detail::gec_layout_kernel<0>, 1, detail::kLayoutThreads, 0, stream, p.dims,
                                       p.group_offsets, static_cast<const int32_t*>(nullptr), 0, pool,
                                       static_cast<int64_t*>(nullptr)));
  const int grid = detail::token_grid(p.dims.tokens, p.dims.experts, false);
  return detail::launch_rows(grid, p.dims.experts, stream, [](auto shape) {
    return detail::gec_backward_kernel<T, decltype(shape)::kLanes, decltype(shape)::kPerLane>;
  }, b, static_cast<const int32_t*>(pool));
}

}  // namespace moxe::router::variants
