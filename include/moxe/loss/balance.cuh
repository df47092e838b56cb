// moxe::loss: the routing losses on the device, forward and backward (docs/loss.md).
// Every batch-wide reduction is two-stage: per-block partials in the workspace, then a
// fixed-order sum (loss/detail/two_stage.cuh): no float atomics, the same bits every run.
// Counts use shared-memory integer atomics, which are exact in any order.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "moxe/core/launch.cuh"
#include "moxe/core/math.hpp"
#include "moxe/core/numeric.cuh"
#include "moxe/core/reduce.cuh"
#include "moxe/core/status.hpp"
#include "moxe/core/workspace.hpp"
#include "moxe/loss/detail/balance_math.hpp"
#include "moxe/loss/detail/two_stage.cuh"
#include "moxe/loss/params.hpp"

namespace moxe::loss {

/// Largest E the device losses take (the per-block expert histograms live in shared memory).
inline constexpr int kMaxDeviceExperts = 1024;

namespace detail {

inline constexpr int kThreads = 256;
inline constexpr int kWarps = kThreads / kWarpSize;

inline int elementwise_grid(int64_t n) {
  const int64_t b = (n + kThreads - 1) / kThreads;
  return static_cast<int>(b < (int64_t(1) << 16) ? (b > 0 ? b : 1) : (int64_t(1) << 16));
}

/// out[0] = scale * sum_{i < n} values[i], fixed order (one block).
template <class A>
__global__ void __launch_bounds__(kThreads)
    sum_to_scalar_kernel(const A* __restrict__ values, int n, A scale, A* __restrict__ out) {
  using Reduce = BlockAllReduce<A, kThreads>;
  __shared__ typename Reduce::TempStorage storage;
  A s = A(0);
  for (int i = threadIdx.x; i < n; i += kThreads) s += values[i];
  s = Reduce(storage).sum(s);
  if (threadIdx.x == 0) out[0] = s * scale;
}

/// Per-block sums of lse(z_t)^2, one warp per token.
template <class T>
__global__ void __launch_bounds__(kThreads)
    z_loss_partials_kernel(const T* __restrict__ logits, int64_t tokens, int experts, float* __restrict__ partials) {
  using Reduce = BlockAllReduce<float, kThreads>;
  __shared__ Reduce::TempStorage storage;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  float acc = 0.f;
  for (int64_t t = int64_t(blockIdx.x) * kWarps + warp; t < tokens; t += int64_t(gridDim.x) * kWarps) {
    math::MaxSum<float> ms;
    for (int e = lane; e < experts; e += kWarpSize) ms.add(to_float(logits[t * experts + e]));
    const float lse = warp_merge(ms).log_sum_exp();
    if (lane == 0) acc += z_loss_term(lse);
  }
  acc = Reduce(storage).sum(acc);
  if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

template <class T>
__global__ void __launch_bounds__(kThreads)
    z_loss_backward_kernel(const T* __restrict__ logits, int64_t tokens, int experts, const float* __restrict__ loss_grad,
                           float dloss, T* __restrict__ dlogits) {
  const float upstream = upstream_gradient(loss_grad, dloss);
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  for (int64_t t = int64_t(blockIdx.x) * kWarps + warp; t < tokens; t += int64_t(gridDim.x) * kWarps) {
    math::MaxSum<float> ms;
    for (int e = lane; e < experts; e += kWarpSize) ms.add(to_float(logits[t * experts + e]));
    const float lse = warp_merge(ms).log_sum_exp();
    const float g = upstream * 2.f * lse / static_cast<float>(tokens);
    for (int e = lane; e < experts; e += kWarpSize)
      dlogits[t * experts + e] = from_float<T>(g * math::exp(to_float(logits[t * experts + e]) - lse));
  }
}

/// Per-block, per-expert sums of probs over the routed (t, k): one warp per token, one
/// shared histogram row per warp (lanes of a token touch distinct experts).
template <class A>
__global__ void __launch_bounds__(kThreads)
    routed_load_partials_kernel(const A* __restrict__ probs, const int32_t* __restrict__ topk_idx, int64_t tokens,
                                int experts, int top_k, A* __restrict__ partials) {
  extern __shared__ unsigned char routed_load_smem[];
  A* hist = reinterpret_cast<A*>(routed_load_smem);  // [kWarps][experts]
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  for (int i = threadIdx.x; i < kWarps * experts; i += kThreads) hist[i] = A(0);
  __syncthreads();
  A* row = hist + warp * experts;
  for (int64_t t = int64_t(blockIdx.x) * kWarps + warp; t < tokens; t += int64_t(gridDim.x) * kWarps) {
    for (int k = lane; k < top_k; k += kWarpSize) {
      const int e = topk_idx[t * top_k + k];
      if (e >= 0 && e < experts) row[e] += probs[t * experts + e];
    }
    __syncwarp();
  }
  __syncthreads();
  for (int e = threadIdx.x; e < experts; e += kThreads) {
    A s = A(0);
    for (int w = 0; w < kWarps; ++w) s += hist[w * experts + e];
    partials[int64_t(blockIdx.x) * experts + e] = s;
  }
}

/// Per-block column sums of probs (rows [b * rows, (b+1) * rows)) and per-block counts of
/// routed slots per expert; either part is skipped when its input is null.
template <class A>
__global__ void __launch_bounds__(kThreads)
    column_count_partials_kernel(const A* __restrict__ probs, const int32_t* __restrict__ topk_idx, int64_t tokens,
                                 int experts, int top_k, int64_t rows_per_block, A* __restrict__ column_partials,
                                 int32_t* __restrict__ count_partials) {
  extern __shared__ int32_t counts[];  // [experts]
  __shared__ A slice_sums[kThreads];
  const int64_t t0 = int64_t(blockIdx.x) * rows_per_block;
  const int64_t t1 = t0 + rows_per_block < tokens ? t0 + rows_per_block : tokens;
  if (probs != nullptr) {
    // chunks of up to 32 columns, each read by kThreads / cols row slices at once (one
    // thread per column would leave most threads idle at small E and give each a chain of
    // rows_per_block loads); slice sums are then added in slice order (fixed)
    const int cols = experts < kWarpSize ? experts : kWarpSize;
    const int slices = kThreads / cols;
    const int ci = threadIdx.x % cols, slice = threadIdx.x / cols;
    for (int c0 = 0; c0 < experts; c0 += cols) {
      const int e = c0 + ci;
      A s = A(0);
      if (slice < slices && e < experts) {
#pragma unroll 8
        for (int64_t t = t0 + slice; t < t1; t += slices) s += probs[t * experts + e];
      }
      slice_sums[threadIdx.x] = s;
      __syncthreads();
      if (threadIdx.x < cols && c0 + threadIdx.x < experts) {
        A total = A(0);
        for (int i = 0; i < slices; ++i) total += slice_sums[i * cols + threadIdx.x];
        column_partials[int64_t(blockIdx.x) * experts + c0 + threadIdx.x] = total;
      }
      __syncthreads();
    }
  }
  if (topk_idx != nullptr) {
    for (int e = threadIdx.x; e < experts; e += kThreads) counts[e] = 0;
    __syncthreads();
    for (int64_t i = t0 * top_k + threadIdx.x; i < t1 * top_k; i += kThreads) {
      const int e = topk_idx[i];
      if (e >= 0 && e < experts) atomicAdd(&counts[e], 1);  // integer: exact in any order
    }
    __syncthreads();
    for (int e = threadIdx.x; e < experts; e += kThreads) count_partials[int64_t(blockIdx.x) * experts + e] = counts[e];
  }
}

template <class A>
__global__ void __launch_bounds__(kThreads)
    load_balance_finish_kernel(const A* __restrict__ load_sum, int experts, A slots, A* __restrict__ loss,
                               A* __restrict__ load) {
  using Reduce = BlockAllReduce<A, kThreads>;
  __shared__ typename Reduce::TempStorage storage;
  A s = A(0);
  for (int e = threadIdx.x; e < experts; e += kThreads) {
    const A u = load_sum[e] / slots;
    if (load != nullptr) load[e] = u;
    s += load_balance_term(u, static_cast<A>(experts));
  }
  s = Reduce(storage).sum(s);
  if (threadIdx.x == 0) loss[0] = s;
}

template <class A>
__global__ void __launch_bounds__(kThreads)
    load_balance_grad_kernel(const A* __restrict__ load_sum, const int32_t* __restrict__ topk_idx, int64_t tokens,
                             int experts, int top_k, const A* __restrict__ loss_grad, A dloss, A* __restrict__ dprobs) {
  const A upstream = upstream_gradient(loss_grad, dloss);
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const A slots = static_cast<A>(tokens) * static_cast<A>(top_k);
  for (int64_t t = int64_t(blockIdx.x) * kWarps + warp; t < tokens; t += int64_t(gridDim.x) * kWarps) {
    for (int e = lane; e < experts; e += kWarpSize) dprobs[t * experts + e] = A(0);
    __syncwarp();
    for (int k = lane; k < top_k; k += kWarpSize) {
      const int e = topk_idx[t * top_k + k];
      if (e >= 0 && e < experts)
        dprobs[t * experts + e] = upstream * load_balance_grad(load_sum[e] / slots, static_cast<A>(experts), slots);
    }
    __syncwarp();
  }
}

template <class A>
__global__ void __launch_bounds__(kThreads)
    switch_finish_kernel(const A* __restrict__ column_sum, const int32_t* __restrict__ counts, int experts,
                         int64_t tokens, int top_k, A* __restrict__ loss) {
  using Reduce = BlockAllReduce<A, kThreads>;
  __shared__ typename Reduce::TempStorage storage;
  const A slots = static_cast<A>(tokens) * static_cast<A>(top_k);
  A s = A(0);
  for (int e = threadIdx.x; e < experts; e += kThreads)
    s += static_cast<A>(counts[e]) / slots * (column_sum[e] / static_cast<A>(tokens));
  s = Reduce(storage).sum(s);
  if (threadIdx.x == 0) loss[0] = static_cast<A>(experts) * s;
}

template <class A>
__global__ void __launch_bounds__(kThreads)
    switch_grad_kernel(const int32_t* __restrict__ counts, int64_t tokens, int experts, int top_k,
                       const A* __restrict__ loss_grad, A dloss, A* __restrict__ dprobs) {
  const A slots = static_cast<A>(tokens) * static_cast<A>(top_k);
  const A scale = upstream_gradient(loss_grad, dloss) * static_cast<A>(experts) / static_cast<A>(tokens);
  const int64_t n = tokens * experts;
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < n; i += int64_t(gridDim.x) * kThreads)
    dprobs[i] = scale * (static_cast<A>(counts[i % experts]) / slots);
}

/// Group masses and the group loss; with expert_grad, also each expert's d(dloss L)/dp.
/// The offsets live in device memory and cannot be checked on the host: they are read as
/// their running maximum clamped to [0, E] (group_span), so the groups are disjoint and
/// in order whatever the memory holds; a decreasing offset makes an empty group, and
/// experts outside every group get no mass and a zero gradient.
template <class A>
__global__ void __launch_bounds__(kThreads)
    group_finish_kernel(const A* __restrict__ column_sum, const int32_t* __restrict__ offsets, int groups,
                        int experts, int64_t tokens, const A* __restrict__ loss_grad, A dloss, A* __restrict__ loss,
                        A* __restrict__ mass_out, A* __restrict__ expert_grad) {
  using Reduce = BlockAllReduce<A, kThreads>;
  __shared__ typename Reduce::TempStorage storage;
  __shared__ int32_t span_ends[kThreads + 1];  // running maxima of one chunk of offsets
  const A inv_t = A(1) / static_cast<A>(tokens), fg = static_cast<A>(groups);
  const A upstream = expert_grad != nullptr ? upstream_gradient(loss_grad, dloss) : A(0);
  if (expert_grad != nullptr)
    for (int e = threadIdx.x; e < experts; e += kThreads) expert_grad[e] = A(0);
  A s = A(0);
  int32_t carry = clamp_offset(offsets[0], experts);  // the running maximum before the chunk
  for (int g0 = 0; g0 < groups; g0 += kThreads) {
    const int g = g0 + threadIdx.x;
    // inclusive running maximum of the clamped ends offsets[g0 + 1 .. g0 + kThreads]
    __syncthreads();  // the previous chunk is done with span_ends (and expert_grad is zeroed)
    span_ends[threadIdx.x + 1] = g < groups ? clamp_offset(offsets[g + 1], experts) : experts;
    if (threadIdx.x == 0) span_ends[0] = carry;
    __syncthreads();
    for (int d = 1; d <= kThreads; d *= 2) {  // Hillis-Steele max scan over span_ends[0..kThreads]
      const int i = threadIdx.x + 1;
      const int32_t other = i >= d ? span_ends[i - d] : 0;
      __syncthreads();
      if (i >= d && other > span_ends[i]) span_ends[i] = other;
      __syncthreads();
    }
    if (g < groups) {
      const int lo = span_ends[threadIdx.x], hi = span_ends[threadIdx.x + 1];
      A m = A(0);
      for (int e = lo; e < hi; ++e) m += column_sum[e];
      m *= inv_t;
      if (mass_out != nullptr) mass_out[g] = m;
      s += group_loss_term(m, fg);
      if (expert_grad != nullptr) {
        const A grad = upstream * group_loss_term_grad(m, fg) * inv_t;
        for (int e = lo; e < hi; ++e) expert_grad[e] = grad;
      }
    }
    carry = span_ends[kThreads];
  }
  s = Reduce(storage).sum(s);
  if (threadIdx.x == 0 && loss != nullptr) loss[0] = s;
}

template <class A>
__global__ void __launch_bounds__(kThreads)
    broadcast_rows_kernel(const A* __restrict__ row, int64_t tokens, int experts, A* __restrict__ out) {
  const int64_t n = tokens * experts;
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < n; i += int64_t(gridDim.x) * kThreads)
    out[i] = row[i % experts];
}

template <class A>
__global__ void __launch_bounds__(kThreads)
    difficulty_partials_kernel(const A* __restrict__ d, const A* __restrict__ h, int64_t tokens,
                               A* __restrict__ partials) {
  using Reduce = BlockAllReduce<A, kThreads>;
  __shared__ typename Reduce::TempStorage storage;
  A s = A(0);
  for (int64_t t = int64_t(blockIdx.x) * kThreads + threadIdx.x; t < tokens; t += int64_t(gridDim.x) * kThreads)
    s += difficulty_loss_term(d[t], h[t]);
  s = Reduce(storage).sum(s);
  if (threadIdx.x == 0) partials[blockIdx.x] = s;
}

template <class A>
__global__ void __launch_bounds__(kThreads)
    difficulty_grad_kernel(const A* __restrict__ d, const A* __restrict__ h, int64_t tokens,
                           const A* __restrict__ loss_grad, A dloss, A* __restrict__ dd, A* __restrict__ dh) {
  const A upstream = upstream_gradient(loss_grad, dloss);
  for (int64_t t = int64_t(blockIdx.x) * kThreads + threadIdx.x; t < tokens; t += int64_t(gridDim.x) * kThreads) {
    const A g = upstream * difficulty_loss_grad(d[t], h[t], static_cast<A>(tokens));
    if (dd != nullptr) dd[t] = g;
    if (dh != nullptr) dh[t] = -g;
  }
}

// ---- workspaces: one carve function per loss, shared by the size function and the launcher

/// Cap on the blocks of the per-token (latency-bound) stage-one kernels: 1024 blocks of 8
/// warps keep an H100 full (132 SMs x 8 resident blocks), where 256 would leave each warp a
/// chain of T / 2048 dependent tokens. Scalar partials cost 4 bytes a block.
inline constexpr int kTokenPartialBlocks = 1024;

struct ScalarScratch {
  float* partials;
  int blocks;
};
inline ScalarScratch carve_scalar(WorkspaceCarver& c, int64_t items, int64_t per_block) {
  ScalarScratch s{};
  if (items <= 0) return s;
  s.blocks = partial_blocks(items, per_block, kTokenPartialBlocks);
  s.partials = c.carve<float>(s.blocks);
  return s;
}

struct ExpertScratch {
  float* column_partials;   // [blocks, E]
  int32_t* count_partials;  // [blocks, E]
  float* column_sum;        // [E]
  int32_t* counts;          // [E]
  float* expert_grad;       // [E]
  int blocks;
  int64_t rows_per_block;
};
/// Column (or routed-load) partials, optional count partials, and their totals.
inline ExpertScratch carve_expert(WorkspaceCarver& c, const Dims& d, bool columns, bool counts, bool grad) {
  ExpertScratch s{};
  if (d.tokens <= 0 || d.experts <= 0) return s;
  s.blocks = partial_blocks(d.tokens, 64);
  s.rows_per_block = (d.tokens + s.blocks - 1) / s.blocks;
  const std::size_t n = static_cast<std::size_t>(s.blocks) * d.experts;
  if (columns) {
    s.column_partials = c.carve<float>(n);
    s.column_sum = c.carve<float>(d.experts);
  }
  if (counts) {
    s.count_partials = c.carve<int32_t>(n);
    s.counts = c.carve<int32_t>(d.experts);
  }
  if (grad) s.expert_grad = c.carve<float>(d.experts);
  return s;
}

inline Status check_experts(const Dims& d) {
  return d.experts > kMaxDeviceExperts ? Status::unsupported : Status::ok;
}

/// Routed-load partials use one block per kWarps tokens at a time.
inline ExpertScratch carve_routed(WorkspaceCarver& c, const Dims& d) {
  ExpertScratch s{};
  if (d.tokens <= 0 || d.experts <= 0) return s;
  s.blocks = partial_blocks(d.tokens, kWarps, kTokenPartialBlocks);
  s.column_partials = c.carve<float>(static_cast<std::size_t>(s.blocks) * d.experts);
  s.column_sum = c.carve<float>(d.experts);
  return s;
}

inline Status launch_routed_load(const ExpertScratch& s, const Dims& d, const float* probs, const int32_t* idx,
                                 cudaStream_t stream) {
  MOXE_RETURN_IF_ERROR(launch_kernel(routed_load_partials_kernel<float>, s.blocks, kThreads,
                                     kWarps * d.experts * sizeof(float), stream, probs, idx, d.tokens, d.experts,
                                     d.top_k, s.column_partials));
  return launch_column_sum<float>(s.column_partials, s.blocks, d.experts, s.column_sum, stream);
}

inline Status launch_columns_counts(const ExpertScratch& s, const Dims& d, const float* probs, const int32_t* idx,
                                    cudaStream_t stream) {
  const std::size_t smem = idx != nullptr ? d.experts * sizeof(int32_t) : 0;
  MOXE_RETURN_IF_ERROR(launch_kernel(column_count_partials_kernel<float>, s.blocks, kThreads, smem, stream, probs, idx,
                                     d.tokens, d.experts, d.top_k, s.rows_per_block, s.column_partials,
                                     s.count_partials));
  if (probs != nullptr)
    MOXE_RETURN_IF_ERROR(launch_column_sum<float>(s.column_partials, s.blocks, d.experts, s.column_sum, stream));
  if (idx != nullptr)
    MOXE_RETURN_IF_ERROR(launch_column_sum<int32_t>(s.count_partials, s.blocks, d.experts, s.counts, stream));
  return Status::ok;
}

}  // namespace detail

// ---- z-loss ----------------------------------------------------------------------------------

template <class T>
std::size_t z_loss_workspace_size(const ZLossParams<T, float>& p) {
  WorkspaceCarver c;
  detail::carve_scalar(c, p.dims.tokens, detail::kWarps);
  return c.required_bytes();
}

template <class T>
Status z_loss(const ZLossParams<T, float>& p, void* workspace, std::size_t workspace_bytes, cudaStream_t stream) {
  MOXE_RETURN_IF_ERROR(validate(p));
  WorkspaceCarver c(workspace, workspace_bytes);
  const auto s = detail::carve_scalar(c, p.dims.tokens, detail::kWarps);
  if (!c.fits()) return Status::workspace_too_small;
  MOXE_RETURN_IF_ERROR(launch_kernel(detail::z_loss_partials_kernel<T>, s.blocks, detail::kThreads, 0, stream,
                                     p.logits, p.dims.tokens, p.dims.experts, s.partials));
  MOXE_RETURN_IF_ERROR(launch_kernel(detail::sum_to_scalar_kernel<float>, 1, detail::kThreads, 0, stream, s.partials,
                                     s.blocks, 1.f / static_cast<float>(p.dims.tokens), p.loss));
  return check_launch(stream);
}

template <class T>
std::size_t z_loss_backward_workspace_size(const ZLossBackwardParams<T, float>&) { return 0; }

template <class T>
Status z_loss_backward(const ZLossBackwardParams<T, float>& b, void* workspace, std::size_t workspace_bytes,
                       cudaStream_t stream) {
  (void)workspace;
  (void)workspace_bytes;
  MOXE_RETURN_IF_ERROR(validate(b));
  const int grid = detail::elementwise_grid(b.fwd.dims.tokens * kWarpSize);
  MOXE_RETURN_IF_ERROR(launch_kernel(detail::z_loss_backward_kernel<T>, grid, detail::kThreads, 0, stream,
                                     b.fwd.logits, b.fwd.dims.tokens, b.fwd.dims.experts, b.loss_grad, b.dloss,
                                     b.dlogits));
  return check_launch(stream);
}

// ---- MoxE load balance -----------------------------------------------------------------------

inline std::size_t load_balance_workspace_size(const LoadBalanceParams<float>& p) {
  WorkspaceCarver c;
  detail::carve_routed(c, p.dims);
  return c.required_bytes();
}

inline Status load_balance(const LoadBalanceParams<float>& p, void* workspace, std::size_t workspace_bytes,
                           cudaStream_t stream) {
  MOXE_RETURN_IF_ERROR(validate(p));
  MOXE_RETURN_IF_ERROR(detail::check_experts(p.dims));
  WorkspaceCarver c(workspace, workspace_bytes);
  const auto s = detail::carve_routed(c, p.dims);
  if (!c.fits()) return Status::workspace_too_small;
  MOXE_RETURN_IF_ERROR(detail::launch_routed_load(s, p.dims, p.probs, p.topk_idx, stream));
  const float slots = static_cast<float>(p.dims.tokens) * static_cast<float>(p.dims.top_k);
  MOXE_RETURN_IF_ERROR(launch_kernel(detail::load_balance_finish_kernel<float>, 1, detail::kThreads, 0, stream,
                                     s.column_sum, p.dims.experts, slots, p.loss, p.load));
  return check_launch(stream);
}

inline std::size_t load_balance_backward_workspace_size(const LoadBalanceBackwardParams<float>& b) {
  WorkspaceCarver c;
  detail::carve_routed(c, b.fwd.dims);
  return c.required_bytes();
}

inline Status load_balance_backward(const LoadBalanceBackwardParams<float>& b, void* workspace,
                                    std::size_t workspace_bytes, cudaStream_t stream) {
  MOXE_RETURN_IF_ERROR(validate(b));
  MOXE_RETURN_IF_ERROR(detail::check_experts(b.fwd.dims));
  WorkspaceCarver c(workspace, workspace_bytes);
  const auto s = detail::carve_routed(c, b.fwd.dims);
  if (!c.fits()) return Status::workspace_too_small;
  const auto& d = b.fwd.dims;
  MOXE_RETURN_IF_ERROR(detail::launch_routed_load(s, d, b.fwd.probs, b.fwd.topk_idx, stream));
  MOXE_RETURN_IF_ERROR(launch_kernel(detail::load_balance_grad_kernel<float>,
                                     detail::elementwise_grid(d.tokens * kWarpSize), detail::kThreads, 0, stream,
                                     s.column_sum, b.fwd.topk_idx, d.tokens, d.experts, d.top_k, b.loss_grad,
                                     b.dloss, b.dprobs));
  return check_launch(stream);
}

// ---- Switch load balance ---------------------------------------------------------------------

inline std::size_t switch_load_balance_workspace_size(const SwitchLoadBalanceParams<float>& p) {
  WorkspaceCarver c;
  detail::carve_expert(c, p.dims, true, true, false);
  return c.required_bytes();
}

inline Status switch_load_balance(const SwitchLoadBalanceParams<float>& p, void* workspace, std::size_t workspace_bytes,
                                  cudaStream_t stream) {
  MOXE_RETURN_IF_ERROR(validate(p));
  MOXE_RETURN_IF_ERROR(detail::check_experts(p.dims));
  WorkspaceCarver c(workspace, workspace_bytes);
  const auto s = detail::carve_expert(c, p.dims, true, true, false);
  if (!c.fits()) return Status::workspace_too_small;
  MOXE_RETURN_IF_ERROR(detail::launch_columns_counts(s, p.dims, p.probs, p.topk_idx, stream));
  MOXE_RETURN_IF_ERROR(launch_kernel(detail::switch_finish_kernel<float>, 1, detail::kThreads, 0, stream, s.column_sum,
                                     s.counts, p.dims.experts, p.dims.tokens, p.dims.top_k, p.loss));
  return check_launch(stream);
}

inline std::size_t switch_load_balance_backward_workspace_size(const SwitchLoadBalanceBackwardParams<float>& b) {
  WorkspaceCarver c;
  detail::carve_expert(c, b.fwd.dims, false, true, false);
  return c.required_bytes();
}

inline Status switch_load_balance_backward(const SwitchLoadBalanceBackwardParams<float>& b, void* workspace,
                                           std::size_t workspace_bytes, cudaStream_t stream) {
  MOXE_RETURN_IF_ERROR(validate(b));
  MOXE_RETURN_IF_ERROR(detail::check_experts(b.fwd.dims));
  WorkspaceCarver c(workspace, workspace_bytes);
  const auto s = detail::carve_expert(c, b.fwd.dims, false, true, false);
  if (!c.fits()) return Status::workspace_too_small;
  const auto& d = b.fwd.dims;
  MOXE_RETURN_IF_ERROR(detail::launch_columns_counts(s, d, nullptr, b.fwd.topk_idx, stream));
  MOXE_RETURN_IF_ERROR(launch_kernel(detail::switch_grad_kernel<float>, detail::elementwise_grid(d.tokens * d.experts),
                                     detail::kThreads, 0, stream, s.counts, d.tokens, d.experts, d.top_k, b.loss_grad,
                                     b.dloss, b.dprobs));
  return check_launch(stream);
}

// ---- group balance ---------------------------------------------------------------------------

inline std::size_t group_balance_workspace_size(const GroupBalanceParams<float>& p) {
  WorkspaceCarver c;
  detail::carve_expert(c, p.dims, true, false, false);
  return c.required_bytes();
}

inline Status group_balance(const GroupBalanceParams<float>& p, void* workspace, std::size_t workspace_bytes,
                            cudaStream_t stream) {
  MOXE_RETURN_IF_ERROR(validate(p));
  WorkspaceCarver c(workspace, workspace_bytes);
  const auto s = detail::carve_expert(c, p.dims, true, false, false);
  if (!c.fits()) return Status::workspace_too_small;
  MOXE_RETURN_IF_ERROR(detail::launch_columns_counts(s, p.dims, p.probs, nullptr, stream));
  MOXE_RETURN_IF_ERROR(launch_kernel(detail::group_finish_kernel<float>, 1, detail::kThreads, 0, stream, s.column_sum,
                                     p.group_offsets, p.num_groups, p.dims.experts, p.dims.tokens, nullptr, 0.f,
                                     p.loss, p.group_mass, nullptr));
  return check_launch(stream);
}

inline std::size_t group_balance_backward_workspace_size(const GroupBalanceBackwardParams<float>& b) {
  WorkspaceCarver c;
  detail::carve_expert(c, b.fwd.dims, true, false, true);
  return c.required_bytes();
}

inline Status group_balance_backward(const GroupBalanceBackwardParams<float>& b, void* workspace,
                                     std::size_t workspace_bytes, cudaStream_t stream) {
  MOXE_RETURN_IF_ERROR(validate(b));
  WorkspaceCarver c(workspace, workspace_bytes);
  const auto s = detail::carve_expert(c, b.fwd.dims, true, false, true);
  if (!c.fits()) return Status::workspace_too_small;
  const auto& p = b.fwd;
  MOXE_RETURN_IF_ERROR(detail::launch_columns_counts(s, p.dims, p.probs, nullptr, stream));
  MOXE_RETURN_IF_ERROR(launch_kernel(detail::group_finish_kernel<float>, 1, detail::kThreads, 0, stream, s.column_sum,
                                     p.group_offsets, p.num_groups, p.dims.experts, p.dims.tokens, b.loss_grad,
                                     b.dloss, nullptr, nullptr, s.expert_grad));
  MOXE_RETURN_IF_ERROR(launch_kernel(detail::broadcast_rows_kernel<float>,
                                     detail::elementwise_grid(p.dims.tokens * p.dims.experts), detail::kThreads, 0,
                                     stream, s.expert_grad, p.dims.tokens, p.dims.experts, b.dprobs));
  return check_launch(stream);
}

// ---- difficulty loss -------------------------------------------------------------------------

inline std::size_t difficulty_loss_workspace_size(const DifficultyLossParams<float>& p) {
  WorkspaceCarver c;
  detail::carve_scalar(c, p.tokens, detail::kThreads);
  return c.required_bytes();
}

inline Status difficulty_loss(const DifficultyLossParams<float>& p, void* workspace, std::size_t workspace_bytes,
                              cudaStream_t stream) {
  MOXE_RETURN_IF_ERROR(validate(p));
  WorkspaceCarver c(workspace, workspace_bytes);
  const auto s = detail::carve_scalar(c, p.tokens, detail::kThreads);
  if (!c.fits()) return Status::workspace_too_small;
  MOXE_RETURN_IF_ERROR(launch_kernel(detail::difficulty_partials_kernel<float>, s.blocks, detail::kThreads, 0, stream,
                                     p.difficulty, p.entropy, p.tokens, s.partials));
  MOXE_RETURN_IF_ERROR(launch_kernel(detail::sum_to_scalar_kernel<float>, 1, detail::kThreads, 0, stream, s.partials,
                                     s.blocks, 1.f / static_cast<float>(p.tokens), p.loss));
  return check_launch(stream);
}

inline std::size_t difficulty_loss_backward_workspace_size(const DifficultyLossBackwardParams<float>&) { return 0; }

inline Status difficulty_loss_backward(const DifficultyLossBackwardParams<float>& b, void* workspace,
                                       std::size_t workspace_bytes, cudaStream_t stream) {
  (void)workspace;
  (void)workspace_bytes;
  MOXE_RETURN_IF_ERROR(validate(b));
  MOXE_RETURN_IF_ERROR(launch_kernel(detail::difficulty_grad_kernel<float>, detail::elementwise_grid(b.fwd.tokens),
                                     detail::kThreads, 0, stream, b.fwd.difficulty, b.fwd.entropy, b.fwd.tokens,
                                     b.loss_grad, b.dloss, b.ddifficulty, b.dentropy));
  return check_launch(stream);
}

}  // namespace moxe::loss
