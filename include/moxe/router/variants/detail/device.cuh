// moxe::router::variants: device pieces shared by the variant kernels: the per-token lane
// layout (moxe::router's LaneGroup and row shapes) with its token loop, slot storage and
// launch, a row's softmax in registers, the sparse row write of a backward, and
// deterministic integer partial-sum reductions.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "moxe/core/config.hpp"
#include "moxe/core/launch.cuh"
#include "moxe/core/math.hpp"
#include "moxe/core/numeric.cuh"
#include "moxe/core/reduce.cuh"
#include "moxe/core/status.hpp"
#include "moxe/router/detail/gate_math.hpp"
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

/// Grid-stride loop over the tokens, one per group of lanes: body(t, valid) with valid =
/// t < tokens. Every lane of the warp runs every round, so the body may sync the warp.
template <int kLanes, class Body>
MOXE_DEVICE MOXE_FORCEINLINE void for_each_token(const LaneGroup<kLanes>& g, int64_t tokens, Body&& body) {
  constexpr int kGroups = LaneGroup<kLanes>::kGroups;
  const int warp = threadIdx.x / kWarpSize;
  const int64_t step = int64_t(gridDim.x) * kRowWarps * kGroups;
  for (int64_t base = (int64_t(blockIdx.x) * kRowWarps + warp) * kGroups; base < tokens; base += step)
    body(base + g.group, base + g.group < tokens);
}

/// Top-k slots of every group of lanes of a block; the kernel puts it in shared memory.
template <int kGroups>
struct SlotStorage {
  float value[kRowWarps][kGroups][kMaxTopK];
  int index[kRowWarps][kGroups][kMaxTopK];

  /// The slots of the calling thread's group of lanes.
  MOXE_DEVICE MOXE_FORCEINLINE TopKSlots of(int group) {
    const int warp = threadIdx.x / kWarpSize;
    return {value[warp][group], index[warp][group]};
  }
};

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

/// Writes a token's dz = p (gp - <p, gp>) (0 where excluded) from p = softmax, gp (the
/// gradient wrt p) in registers and the lane's part of <p, gp> (summed over j in order).
/// All lanes of the warp call it; invalid tokens write nothing.
template <class T, int kLanes, int kPerLane>
MOXE_DEVICE MOXE_FORCEINLINE void write_softmax_grad_row(const LaneGroup<kLanes>& g, const float (&p)[kPerLane],
                                                         const float (&gp)[kPerLane], float lane_dot,
                                                         uint32_t excluded, int experts, bool valid, T* out) {
  const float dot = g.sum(lane_dot);
  if (!valid) return;
  MOXE_PRAGMA_UNROLL
  for (int j = 0; j < kPerLane; ++j) {
    const int e = g.element(j);
    if (e < experts)
      out[e] = from_float<T>(((excluded >> j) & 1u) ? 0.f : router::detail::softmax_grad(p[j], gp[j], dot, 0.f));
  }
}

/// gp[j] = the dweight of token row `idx` / `dweight` (k slots) whose expert is the lane's
/// element j, 0 where unchosen, excluded or the token invalid; returns the lane's part of
/// <p, gp> (summed over j in order), for write_softmax_grad_row.
template <int kLanes, int kPerLane>
MOXE_DEVICE MOXE_FORCEINLINE float gather_chosen_gradient(const LaneGroup<kLanes>& g, const int32_t* idx,
                                                          const float* dweight, int k, uint32_t excluded, bool valid,
                                                          const float (&p)[kPerLane], float (&gp)[kPerLane]) {
  float lane_dot = 0.f;
  MOXE_PRAGMA_UNROLL
  for (int j = 0; j < kPerLane; ++j) {
    gp[j] = 0.f;
    const int e = g.element(j);
    if (valid && !((excluded >> j) & 1u))
      for (int r = 0; r < k; ++r)
        if (idx[r] == e) gp[j] = dweight[r];
    lane_dot += p[j] * gp[j];
  }
  return lane_dot;
}

/// Writes token t's k output slots ([T, k] rows) from its sorted top-k slots: the first n
/// chosen, with weight p / (sum of the n) when renormalising, else p; the rest -1 / 0.
/// prob is optional.
template <int kLanes>
MOXE_DEVICE MOXE_FORCEINLINE void write_chosen_prefix(const LaneGroup<kLanes>& g, TopKSlots slots, int n, int k,
                                                      bool renormalize, int64_t t, int32_t* idx, float* prob,
                                                      float* weight) {
  float sum = 0.f;
  for (int r = 0; r < n; ++r) sum += slots.value[r];
  const float inv = 1.f / sum;
  for (int r = g.lane; r < k; r += kLanes) {
    const bool used = r < n;
    idx[t * k + r] = used ? slots.index[r] : -1;
    if (prob != nullptr) prob[t * k + r] = used ? slots.value[r] : 0.f;
    weight[t * k + r] = used ? (renormalize ? slots.value[r] * inv : slots.value[r]) : 0.f;
  }
}

/// Grid of a per-token kernel (capped when the kernel writes per-block partials).
inline int token_grid(int64_t tokens, int experts, bool capped) {
  const int grid = router::detail::row_grid(tokens, experts, kRowWarps);
  return capped && grid > kMaxCountBlocks ? kMaxCountBlocks : grid;
}

/// Launches kernel_for(shape), a per-token kernel for moxe::router's row shape of
/// `experts`, on `grid` blocks of kRowThreads with `args`; the launch's status.
template <class KernelFor, class... Args>
Status launch_rows(int grid, int experts, cudaStream_t stream, KernelFor kernel_for, const Args&... args) {
  return router::detail::dispatch_row_shape(experts, [&](auto shape) {
    MOXE_RETURN_IF_ERROR(launch_kernel(kernel_for(shape), grid, kRowThreads, 0, stream, args...));
    return check_launch(stream);
  });
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
