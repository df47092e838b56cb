// moxe::router::variants: device pieces shared by the variant kernels: the per-token lane
// layout (moxe::router's LaneGroup and row shapes), a row's softmax in registers, the
// sparse row write of a backward, and deterministic integer partial-sum reductions.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "moxe/core/config.hpp"
#include "moxe/core/math.hpp"
#include "moxe/core/numeric.cuh"
#include "moxe/core/reduce.cuh"
#include "moxe/router/detail/lane_group.cuh"
#include "moxe/router/entropy.cuh"

namespace moxe::router::variants::detail {

using router::detail::LaneGroup;
using router::detail::TopKSlots;

inline constexpr int kRowWarps = 4;
inline constexpr int kRowThreads = kRowWarps * kWarpSize;
/// Launch-bounds minimum of resident blocks: it allows up to 128 registers per thread,
/// where ptxas's default choice (32) spilled in the backward kernels.
inline constexpr int kRowMinBlocks = 4;

/// Blocks of the count-producing kernels are capped so that their per-block partials
/// (one row of counts each) stay small; the kernels loop over the remaining tokens.
inline constexpr int kMaxCountBlocks = 1024;

/// Loads one token's row into registers as float (padding and invalid tokens: -inf).
template <class T, int kLanes, int kPerLane>
MOXE_DEVICE MOXE_FORCEINLINE void load_row(const LaneGroup<kLanes>& g, const T* row, int experts, bool valid,
                                           float (&v)[kPerLane]) {
  MOXE_PRAGMA_UNROLL
  for (int j = 0; j < kPerLane; ++j) {
    const int e = g.element(j);
    v[j] = (valid && e < experts) ? to_float(row[e]) : -math::infinity<float>();
  }
}

/// In place: v <- softmax(v) over the elements whose bit is clear in `excluded` (those
/// become 0). All lanes of the warp call it. An all-excluded row becomes all zeros.
template <int kLanes, int kPerLane>
MOXE_DEVICE MOXE_FORCEINLINE void row_softmax(const LaneGroup<kLanes>& g, float (&v)[kPerLane], uint32_t excluded) {
  math::MaxSum<float> ms;
  MOXE_PRAGMA_UNROLL
  for (int j = 0; j < kPerLane; ++j)
    if (!((excluded >> j) & 1u)) ms.add(v[j]);
  const float lse = g.merge(ms).log_sum_exp();
  MOXE_PRAGMA_UNROLL
  for (int j = 0; j < kPerLane; ++j) v[j] = ((excluded >> j) & 1u) ? 0.f : math::exp(v[j] - lse);
}

/// NaN -> -inf before a selection (as moxe::router::topk): a NaN never wins a round, and
/// a row with NaNs still yields valid expert indices.
template <int kPerLane>
MOXE_DEVICE MOXE_FORCEINLINE void nan_to_neg_inf(float (&v)[kPerLane]) {
  MOXE_PRAGMA_UNROLL
  for (int j = 0; j < kPerLane; ++j)
    if (v[j] != v[j]) v[j] = -math::infinity<float>();
}

/// Writes a token's gradient row: value[r] at index[r] for r < k (index < 0 skipped),
/// zero elsewhere. slots live in the group's shared memory.
template <class T, int kLanes, int kPerLane>
MOXE_DEVICE MOXE_FORCEINLINE void write_sparse_row(const LaneGroup<kLanes>& g, const float* value, const int* index,
                                                   int k, int experts, T* out) {
  MOXE_PRAGMA_UNROLL
  for (int j = 0; j < kPerLane; ++j) {
    const int e = g.element(j);
    if (e >= experts) continue;
    float x = 0.f;
    for (int r = 0; r < k; ++r)
      if (index[r] == e) x = value[r];
    out[e] = from_float<T>(x);
  }
}

/// Grid of a per-token kernel (capped when the kernel writes per-block partials).
inline int token_grid(int64_t tokens, int experts, bool capped) {
  const int grid = router::detail::row_grid(tokens, experts, kRowWarps);
  return capped && grid > kMaxCountBlocks ? kMaxCountBlocks : grid;
}

/// out[i] = sum over blocks b of partials[b * n + i], in block order (one block, any n).
template <class Out>
__global__ void __launch_bounds__(256) sum_partials_kernel(const int64_t* partials, int blocks, int n, Out* out) {
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    int64_t s = 0;
    for (int b = 0; b < blocks; ++b) s += partials[int64_t(b) * n + i];
    out[i] = static_cast<Out>(s);
  }
}

}  // namespace moxe::router::variants::detail
