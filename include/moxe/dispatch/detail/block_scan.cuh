// moxe::dispatch::detail: integer block scans for the single-block bookkeeping kernels.
// Integer sums are exact, so any combination order gives the same (deterministic) result.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "moxe/core/config.hpp"
#include "moxe/core/reduce.cuh"

namespace moxe::dispatch::detail {

/// Storage for BlockScan: one total per warp.
struct BlockScanStorage {
  int64_t warp_totals[kWarpSize];
};

/// Inclusive prefix sum over the threads of the block (blockDim.x a multiple of 32, at most
/// 1024; every thread calls). Contains the barriers it needs; the storage can be reused.
MOXE_DEVICE inline int64_t block_inclusive_sum(int64_t x, BlockScanStorage& storage) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int warps = blockDim.x / kWarpSize;
  MOXE_PRAGMA_UNROLL
  for (int offset = 1; offset < kWarpSize; offset *= 2) {
    const int64_t y = __shfl_up_sync(kFullMask, x, offset);
    if (lane >= offset) x += y;
  }
  __syncthreads();  // storage may still be read by a previous call
  if (lane == kWarpSize - 1) storage.warp_totals[warp] = x;
  __syncthreads();
  if (warp == 0) {
    int64_t t = lane < warps ? storage.warp_totals[lane] : 0;
    MOXE_PRAGMA_UNROLL
    for (int offset = 1; offset < kWarpSize; offset *= 2) {
      const int64_t y = __shfl_up_sync(kFullMask, t, offset);
      if (lane >= offset) t += y;
    }
    storage.warp_totals[lane] = t;
  }
  __syncthreads();
  return warp > 0 ? x + storage.warp_totals[warp - 1] : x;
}

/// Sum over the block, returned to every thread.
MOXE_DEVICE inline int64_t block_sum(int64_t x, BlockScanStorage& storage) {
  const int64_t inclusive = block_inclusive_sum(x, storage);
  __shared__ int64_t total;
  if (threadIdx.x == blockDim.x - 1) total = inclusive;
  __syncthreads();
  const int64_t r = total;
  __syncthreads();
  return r;
}

}  // namespace moxe::dispatch::detail
