// moxe::dispatch: layout helpers for expert parallelism over R ranks (experts split
// contiguously). The exchange itself is the caller's (NCCL all-to-all); moxe prepares and
// restores the layouts (see docs/dispatch.md):
//   send_counts            rows per destination rank from expert_offsets (and the per-expert
//                          split sizes to exchange alongside the rows)
//   sort_chunks            received rank-major chunks (s, e) -> expert-major (e, s)
//   sort_chunks_backward   expert-major -> rank-major: the inverse and the gradient
// All on the device, no host synchronisation: the sizes stay on the device.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "moxe/core/launch.cuh"
#include "moxe/core/status.hpp"
#include "moxe/core/workspace.hpp"
#include "moxe/dispatch/detail/block_scan.cuh"
#include "moxe/dispatch/detail/chunk_sort.hpp"
#include "moxe/dispatch/params.hpp"
#include "moxe/dispatch/permute.cuh"

namespace moxe::dispatch {

namespace detail {

inline constexpr int kChunkScanThreads = 1024;
inline constexpr int kChunkCopyThreads = 128;
inline constexpr unsigned kMaxChunkCopyBlocks = 1u << 20;

template <int kThreads = 256>
__global__ void __launch_bounds__(kThreads)
    send_counts_kernel(int experts, int ranks, const int64_t* MOXE_RESTRICT expert_offsets,
                       int64_t* MOXE_RESTRICT send_counts, int64_t* MOXE_RESTRICT send_offsets,
                       int64_t* MOXE_RESTRICT expert_rows) {
  const int local = experts / ranks;
  for (int r = threadIdx.x; r < ranks; r += kThreads) {
    send_counts[r] = expert_offsets[(r + 1) * local] - expert_offsets[r * local];
    if (send_offsets) send_offsets[r] = expert_offsets[r * local];
  }
  if (send_offsets && threadIdx.x == 0) send_offsets[ranks] = expert_offsets[experts];
  if (expert_rows)
    for (int e = threadIdx.x; e < experts; e += kThreads) expert_rows[e] = expert_offsets[e + 1] - expert_offsets[e];
}

/// Chunk starts in both orders, each indexed by its position in that order:
/// rank_major[s*L + e] and expert_major[e*R + s]; [R*L] holds the total in both.
struct ChunkScratch {
  int64_t* rank_major;    // [R*L + 1]
  int64_t* expert_major;  // [R*L + 1]
};

inline ChunkScratch carve_chunk_scratch(WorkspaceCarver& c, int ranks, int local_experts) {
  const std::size_t n = static_cast<std::size_t>(ranks) * local_experts + 1;
  ChunkScratch s;
  s.rank_major = c.carve<int64_t>(n);
  s.expert_major = c.carve<int64_t>(n);
  return s;
}

template <int kThreads = kChunkScanThreads>
__global__ void __launch_bounds__(kThreads)
    chunk_starts_kernel(const int64_t* MOXE_RESTRICT split_sizes, int ranks, int local_experts,
                        int64_t* MOXE_RESTRICT rank_major, int64_t* MOXE_RESTRICT expert_major,
                        int64_t* MOXE_RESTRICT expert_offsets) {
  __shared__ BlockScanStorage storage;
  __shared__ int64_t block_carry;
  const int64_t chunks = int64_t(ranks) * local_experts;
  for (int pass = 0; pass < 2; ++pass) {  // 0: rank-major order, 1: expert-major order
    int64_t* starts = pass == 0 ? rank_major : expert_major;
    int64_t carry = 0;
    for (int64_t base = 0; base < chunks; base += kThreads) {
      const int64_t q = base + threadIdx.x;  // position in this pass's order
      int64_t n = 0;
      if (q < chunks) {
        const ChunkIndex c = chunk_at(static_cast<int>(q), /*expert_major=*/pass == 1, ranks, local_experts);
        n = split_sizes[int64_t(c.rank) * local_experts + c.expert];
        n = n > 0 ? n : 0;  // negative sizes cannot be checked without a sync: treated as 0
      }
      const int64_t inclusive = block_inclusive_sum(n, storage) + carry;
      if (q < chunks) starts[q] = inclusive - n;
      if (threadIdx.x == kThreads - 1) block_carry = inclusive;
      __syncthreads();
      carry = block_carry;
      __syncthreads();
    }
    if (threadIdx.x == 0) starts[chunks] = carry;
  }
  __syncthreads();
  if (expert_offsets) {
    for (int e = threadIdx.x; e < local_experts; e += kThreads) expert_offsets[e] = expert_major[int64_t(e) * ranks];
    if (threadIdx.x == 0) expert_offsets[local_experts] = expert_major[chunks];
  }
}

/// Output row r: find its chunk among the destination-order starts (binary search), copy the
/// row from the same chunk's source start. Rows past the total are left untouched.
template <class T, bool kVector>
__global__ void __launch_bounds__(kChunkCopyThreads)
    sort_chunks_kernel(const T* MOXE_RESTRICT in, T* MOXE_RESTRICT out, int hidden, int ranks, int local_experts,
                       int64_t max_rows, const int64_t* MOXE_RESTRICT rank_major,
                       const int64_t* MOXE_RESTRICT expert_major, bool to_expert_major) {
  using Unit = RowUnit<T, kVector>;
  const int64_t chunks = int64_t(ranks) * local_experts;
  const int64_t* dst_starts = to_expert_major ? expert_major : rank_major;
  const int64_t total = dst_starts[chunks];
  const int64_t units = hidden / Unit::kElements;
  for (int64_t r = blockIdx.x; r < total && r < max_rows; r += gridDim.x) {
    const int64_t src_row = chunk_source_row(r, rank_major, expert_major, ranks, local_experts, to_expert_major);
    if (src_row >= max_rows) continue;  // inconsistent sizes: never read out of bounds
    const T* from = in + src_row * hidden;
    T* to = out + r * hidden;
    for (int64_t u = threadIdx.x; u < units; u += kChunkCopyThreads) Unit::load(from, u).store(to, u);
  }
}

template <class T>
Status sort_chunks(const SortChunksParams<T>& p, void* workspace, std::size_t workspace_bytes, cudaStream_t stream,
                   bool to_expert_major) {
  static_assert(is_device_element_v<T>, "T must be float, __half or __nv_bfloat16");
  MOXE_RETURN_IF_ERROR(validate(p));
  WorkspaceCarver carver(workspace, workspace_bytes);
  const ChunkScratch scratch = carve_chunk_scratch(carver, p.ranks, p.local_experts);
  if (!carver.fits()) return Status::workspace_too_small;
  MOXE_RETURN_IF_ERROR(launch_kernel(chunk_starts_kernel<>, 1, kChunkScanThreads, 0, stream, p.split_sizes, p.ranks,
                                     p.local_experts, scratch.rank_major, scratch.expert_major, p.expert_offsets));
  const dim3 grid(static_cast<unsigned>(p.max_rows < kMaxChunkCopyBlocks ? p.max_rows : kMaxChunkCopyBlocks));
  const auto kernel =
      rows_vectorizable<T>(p.hidden, {p.in, p.out}) ? sort_chunks_kernel<T, true> : sort_chunks_kernel<T, false>;
  MOXE_RETURN_IF_ERROR(launch_kernel(kernel, grid, kChunkCopyThreads, 0, stream, p.in, p.out, p.hidden, p.ranks,
                                     p.local_experts, p.max_rows, scratch.rank_major, scratch.expert_major,
                                     to_expert_major));
  return check_launch(stream);
}

}  // namespace detail

inline std::size_t send_counts_workspace_size(const SendCountsParams&) { return 0; }

/// send_counts[r] = expert_offsets[(r+1)L] - expert_offsets[rL] (L = E/R), optional
/// send_offsets [R+1] and expert_rows [E], on the device.
inline Status send_counts(const SendCountsParams& p, void* /*workspace*/, std::size_t /*workspace_bytes*/,
                          cudaStream_t stream) {
  MOXE_RETURN_IF_ERROR(validate(p));
  MOXE_RETURN_IF_ERROR(launch_kernel(detail::send_counts_kernel<>, 1, 256, 0, stream, p.experts, p.ranks,
                                     p.expert_offsets, p.send_counts, p.send_offsets, p.expert_rows));
  return check_launch(stream);
}

template <class T>
std::size_t sort_chunks_workspace_size(const SortChunksParams<T>& p) {
  if (p.ranks <= 0 || p.local_experts <= 0) return 0;
  WorkspaceCarver c;
  detail::carve_chunk_scratch(c, p.ranks, p.local_experts);
  return c.required_bytes();
}

template <class T>
std::size_t sort_chunks_backward_workspace_size(const SortChunksParams<T>& p) {
  return sort_chunks_workspace_size(p);
}

/// Rank-major chunks -> expert-major order (TransformerEngine's sort_chunks_by_index).
/// Negative split sizes count as 0 on the device; rows past the total are untouched.
template <class T>
Status sort_chunks(const SortChunksParams<T>& p, void* workspace, std::size_t workspace_bytes,
                   cudaStream_t stream) {
  return detail::sort_chunks(p, workspace, workspace_bytes, stream, /*to_expert_major=*/true);
}

/// Expert-major -> rank-major: the inverse of sort_chunks and its gradient.
template <class T>
Status sort_chunks_backward(const SortChunksParams<T>& p, void* workspace, std::size_t workspace_bytes,
                            cudaStream_t stream) {
  return detail::sort_chunks(p, workspace, workspace_bytes, stream, /*to_expert_major=*/false);
}

}  // namespace moxe::dispatch
