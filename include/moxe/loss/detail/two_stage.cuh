// moxe::loss: the second stage of the deterministic two-stage reductions used by the
// router and the losses. Stage one writes one row of partials per block ([blocks, width]);
// column_sum_kernel adds the rows in block order (fixed, so the bits never change), one
// column per thread group, with no atomics.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "moxe/core/config.hpp"
#include "moxe/core/launch.cuh"
#include "moxe/core/reduce.cuh"

namespace moxe::loss::detail {

/// Cap on the number of stage-one blocks: it bounds the partials (and the workspace);
/// grids larger than that loop over their tokens.
inline constexpr int kMaxPartialBlocks = 256;

inline constexpr int kColumnSumThreads = 256;
// few columns and many row slices per block: a column's rows are read by 32 threads at
// once (a thread reads rows / 32 of them, unrolled), so even 1024 rows take a few memory
// round trips, and wide rows still spread over many blocks; 8 floats = one 32-byte sector
inline constexpr int kColumnSumColumns = 8;   // columns per block
inline constexpr int kColumnSumSlices = kColumnSumThreads / kColumnSumColumns;

/// out[c] = sum_{b < rows} partials[b * width + c], in a fixed order (slice s adds rows
/// s, s + 32, ... in order; the 32 slice sums are added in slice order).
template <class V>
__global__ void __launch_bounds__(kColumnSumThreads)
    column_sum_kernel(const V* __restrict__ partials, int rows, int width, V* __restrict__ out) {
  __shared__ V slice_sums[kColumnSumSlices][kColumnSumColumns];
  const int col_in_block = threadIdx.x % kColumnSumColumns;
  const int slice = threadIdx.x / kColumnSumColumns;
  const int col = blockIdx.x * kColumnSumColumns + col_in_block;
  V s = V(0);
  if (col < width) {
#pragma unroll 8
    for (int b = slice; b < rows; b += kColumnSumSlices) s += partials[static_cast<int64_t>(b) * width + col];
  }
  slice_sums[slice][col_in_block] = s;
  __syncthreads();
  if (slice == 0 && col < width) {
    V total = slice_sums[0][col_in_block];
    MOXE_PRAGMA_UNROLL
    for (int i = 1; i < kColumnSumSlices; ++i) total += slice_sums[i][col_in_block];
    out[col] = total;
  }
}

template <class V>
inline Status launch_column_sum(const V* partials, int rows, int width, V* out, cudaStream_t stream) {
  const int blocks = (width + kColumnSumColumns - 1) / kColumnSumColumns;
  return launch_kernel(column_sum_kernel<V>, blocks, kColumnSumThreads, 0, stream, partials, rows, width, out);
}

/// Number of stage-one blocks for `work_items` items handled `per_block` at a time, at
/// most `cap` (the rows of partials a workspace holds).
inline int partial_blocks(int64_t work_items, int64_t per_block, int cap = kMaxPartialBlocks) {
  const int64_t b = (work_items + per_block - 1) / per_block;
  return static_cast<int>(b < cap ? (b > 0 ? b : 1) : cap);
}

}  // namespace moxe::loss::detail
