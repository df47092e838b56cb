// moxe::dispatch: the routing map on the device, an atomic-free counting sort in three
// launches (see docs/dispatch.md):
//   1. map_histogram_kernel: one block per tile of MapTiling::kTileItems (t, k) entries;
//      each warp counts its entries per expert (match-any: the lowest lane of each group of
//      equal experts adds the group's size), the block sums its warps -> tile_hist[tile][e].
//   2. map_scan_kernel (one block): per expert, the exclusive prefix over tiles (in place),
//      the routed, kept and padded counts, and the exclusive scan over experts ->
//      expert_offsets, expert_counts; totals of dropped and invalid entries.
//   3. map_rank_kernel: the same tiles again; each entry's position within its expert is
//      tile prefix + earlier warps' counts + earlier lanes/chunks of its warp (stable).
// No atomics, no host synchronisation; the result is bitwise deterministic.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "moxe/core/launch.cuh"
#include "moxe/core/reduce.cuh"
#include "moxe/core/status.hpp"
#include "moxe/core/workspace.hpp"
#include "moxe/dispatch/detail/block_scan.cuh"
#include "moxe/dispatch/detail/counting_sort.hpp"
#include "moxe/dispatch/params.hpp"

namespace moxe::dispatch {

namespace detail {

inline constexpr int kMapScanThreads = 1024;  // >= kMaxDeviceExperts: one thread per expert
static_assert(kMapScanThreads >= kMaxDeviceExperts, "one scan thread per expert");

/// Scratch of the routing map: per-tile histograms (then prefixes) and invalid counts.
struct MapScratch {
  int32_t* tile_hist;     // [tiles, E]
  int32_t* tile_invalid;  // [tiles]
};

inline MapScratch carve_map_scratch(WorkspaceCarver& c, const Dims& d) {
  const int64_t tiles = MapTiling::tiles(d.tokens * d.top_k);
  MapScratch s;
  s.tile_hist = c.carve<int32_t>(static_cast<std::size_t>(tiles * d.experts));
  s.tile_invalid = c.carve<int32_t>(static_cast<std::size_t>(tiles));
  return s;
}

/// Loads the warp's kChunksPerWarp entries (one per chunk for this lane) as sanitized
/// expert ids (-1 past the end); returns how many of them were invalid.
MOXE_DEVICE MOXE_FORCEINLINE int load_warp_experts(const int32_t* MOXE_RESTRICT topk_idx, int64_t entries,
                                                   int experts, int64_t tile, int warp, int lane,
                                                   int (&expert)[MapTiling::kChunksPerWarp]) {
  int32_t raw[MapTiling::kChunksPerWarp];
  MOXE_PRAGMA_UNROLL
  for (int c = 0; c < MapTiling::kChunksPerWarp; ++c) {
    const int64_t i = MapTiling::entry(tile, warp, c, lane);
    raw[c] = i < entries ? __ldg(topk_idx + i) : int32_t(-1);
  }
  int invalid = 0;
  MOXE_PRAGMA_UNROLL
  for (int c = 0; c < MapTiling::kChunksPerWarp; ++c) {
    invalid += is_invalid_expert(raw[c], experts) ? 1 : 0;
    expert[c] = sanitize_expert(raw[c], experts);
  }
  return invalid;
}

/// counts[e] += number of the warp's entries routed to e (counts: this warp's row of smem).
MOXE_DEVICE MOXE_FORCEINLINE void count_warp_experts(const int (&expert)[MapTiling::kChunksPerWarp], int lane,
                                                     int32_t* counts) {
  MOXE_PRAGMA_UNROLL
  for (int c = 0; c < MapTiling::kChunksPerWarp; ++c) {
    const int e = expert[c];
    const unsigned peers = __match_any_sync(kFullMask, e);
    if (e >= 0 && lane == __ffs(peers) - 1) counts[e] += __popc(peers);  // one writer per expert
    __syncwarp();
  }
}

template <class Tiling = MapTiling>  // a template: one definition across translation units
__global__ void __launch_bounds__(Tiling::kThreads)
    map_histogram_kernel(const int32_t* MOXE_RESTRICT topk_idx, int64_t entries, int experts,
                         int32_t* MOXE_RESTRICT tile_hist, int32_t* MOXE_RESTRICT tile_invalid) {
  extern __shared__ int32_t warp_counts[];  // [kWarps, experts]
  __shared__ int32_t warp_invalid[MapTiling::kWarps];
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int64_t tile = blockIdx.x;
  for (int i = threadIdx.x; i < MapTiling::kWarps * experts; i += MapTiling::kThreads) warp_counts[i] = 0;
  int expert[MapTiling::kChunksPerWarp];
  int invalid = load_warp_experts(topk_idx, entries, experts, tile, warp, lane, expert);
  __syncthreads();
  count_warp_experts(expert, lane, warp_counts + warp * experts);
  invalid = warp_sum(invalid);
  if (lane == 0) warp_invalid[warp] = invalid;
  __syncthreads();
  for (int e = threadIdx.x; e < experts; e += MapTiling::kThreads) {
    int32_t total = 0;
    for (int w = 0; w < MapTiling::kWarps; ++w) total += warp_counts[w * experts + e];
    tile_hist[tile * experts + e] = total;
  }
  if (threadIdx.x == 0) {
    int32_t total = 0;
    for (int w = 0; w < MapTiling::kWarps; ++w) total += warp_invalid[w];
    tile_invalid[tile] = total;
  }
}

template <int kThreads = kMapScanThreads>
__global__ void __launch_bounds__(kThreads)
    map_scan_kernel(int32_t* MOXE_RESTRICT tile_hist, const int32_t* MOXE_RESTRICT tile_invalid, int64_t tiles,
                    int experts, int64_t capacity, int align, int64_t* MOXE_RESTRICT expert_offsets,
                    int32_t* MOXE_RESTRICT expert_counts, int32_t* MOXE_RESTRICT routed_counts,
                    int64_t* MOXE_RESTRICT dropped_count, int64_t* MOXE_RESTRICT invalid_count) {
  __shared__ BlockScanStorage scan_storage;
  const int e = threadIdx.x;
  int64_t routed = 0, kept = 0, padded = 0;
  if (e < experts) {
    int32_t* column = tile_hist + e;  // coalesced over e for each tile
    constexpr int kBatch = 16;        // loads in flight per thread: the loop is latency-bound
    for (int64_t b0 = 0; b0 < tiles; b0 += kBatch) {
      int32_t c[kBatch];
      MOXE_PRAGMA_UNROLL
      for (int q = 0; q < kBatch; ++q) c[q] = b0 + q < tiles ? column[(b0 + q) * experts] : 0;
      MOXE_PRAGMA_UNROLL
      for (int q = 0; q < kBatch; ++q) {
        if (b0 + q < tiles) column[(b0 + q) * experts] = static_cast<int32_t>(routed);
        routed += c[q];
      }
    }
    kept = kept_rows(routed, capacity);
    padded = padded_rows(kept, align);
  }
  const int64_t end = block_inclusive_sum(padded, scan_storage);
  if (e < experts) {
    expert_offsets[e] = end - padded;
    expert_counts[e] = static_cast<int32_t>(kept);
    if (routed_counts) routed_counts[e] = static_cast<int32_t>(routed);
    if (e == experts - 1) expert_offsets[experts] = end;
  }
  int64_t invalid = 0;
  for (int64_t b = threadIdx.x; b < tiles; b += kThreads) invalid += tile_invalid[b];
  const int64_t dropped_total = block_sum(routed - kept, scan_storage);
  const int64_t invalid_total = block_sum(invalid, scan_storage);
  if (threadIdx.x == 0) {
    if (dropped_count) *dropped_count = dropped_total;
    if (invalid_count) *invalid_count = invalid_total;
  }
}

template <class Tiling = MapTiling>  // a template: one definition across translation units
__global__ void __launch_bounds__(Tiling::kThreads)
    map_rank_kernel(const int32_t* MOXE_RESTRICT topk_idx, int64_t entries, int experts, int64_t capacity,
                    const int32_t* MOXE_RESTRICT tile_prefix, const int64_t* MOXE_RESTRICT expert_offsets,
                    int64_t* MOXE_RESTRICT row_map) {
  extern __shared__ int32_t warp_base[];  // [kWarps, experts]: counts, then positions
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int64_t tile = blockIdx.x;
  for (int i = threadIdx.x; i < MapTiling::kWarps * experts; i += MapTiling::kThreads) warp_base[i] = 0;
  int expert[MapTiling::kChunksPerWarp];
  load_warp_experts(topk_idx, entries, experts, tile, warp, lane, expert);
  __syncthreads();
  count_warp_experts(expert, lane, warp_base + warp * experts);
  __syncthreads();
  // counts -> the first position of each warp's entries within the expert
  for (int e = threadIdx.x; e < experts; e += MapTiling::kThreads) {
    int32_t running = tile_prefix[tile * experts + e];
    for (int w = 0; w < MapTiling::kWarps; ++w) {
      const int32_t c = warp_base[w * experts + e];
      warp_base[w * experts + e] = running;
      running += c;
    }
  }
  __syncthreads();
  int32_t* base = warp_base + warp * experts;
  const unsigned lanes_before = (1u << lane) - 1u;
  MOXE_PRAGMA_UNROLL
  for (int c = 0; c < MapTiling::kChunksPerWarp; ++c) {
    const int e = expert[c];
    const unsigned peers = __match_any_sync(kFullMask, e);
    const int leader = __ffs(peers) - 1;
    int32_t first = 0;
    if (e >= 0 && lane == leader) {
      first = base[e];
      base[e] = first + __popc(peers);
    }
    first = __shfl_sync(kFullMask, first, leader);
    __syncwarp();
    const int64_t i = MapTiling::entry(tile, warp, c, lane);
    if (i < entries) {
      const int64_t position = int64_t(first) + __popc(peers & lanes_before);
      row_map[i] = e < 0 ? int64_t(-1) : row_of(expert_offsets[e], position, capacity);
    }
  }
}

}  // namespace detail

/// Workspace bytes of routing_map: reads only the sizes (0 for sizes that fail validation).
inline std::size_t routing_map_workspace_size(const RoutingMapParams& p) {
  if (validate(p.dims) != Status::ok) return 0;
  WorkspaceCarver c;
  detail::carve_map_scratch(c, p.dims);
  return c.required_bytes();
}

/// Builds row_map, expert_offsets, expert_counts (and the optional outputs) on `stream`.
/// Out-of-range entries of topk_idx are treated as -1 and counted in invalid_count.
/// Limits: E <= kMaxDeviceExperts, K <= kMaxDeviceTopK (unsupported otherwise).
inline Status routing_map(const RoutingMapParams& p, void* workspace, std::size_t workspace_bytes,
                          cudaStream_t stream) {
  MOXE_RETURN_IF_ERROR(validate(p));
  MOXE_RETURN_IF_ERROR(validate_device_limits(p.dims));
  WorkspaceCarver carver(workspace, workspace_bytes);
  const detail::MapScratch scratch = detail::carve_map_scratch(carver, p.dims);
  if (!carver.fits()) return Status::workspace_too_small;

  const Dims& d = p.dims;
  const int64_t entries = d.tokens * d.top_k;
  const int64_t tiles = detail::MapTiling::tiles(entries);
  const std::size_t smem = sizeof(int32_t) * detail::MapTiling::kWarps * d.experts;  // <= 32 KiB
  const dim3 grid(static_cast<unsigned>(tiles));
  MOXE_RETURN_IF_ERROR(launch_kernel(detail::map_histogram_kernel<>, grid, detail::MapTiling::kThreads, smem, stream,
                                     p.topk_idx, entries, d.experts, scratch.tile_hist, scratch.tile_invalid));
  MOXE_RETURN_IF_ERROR(launch_kernel(detail::map_scan_kernel<>, 1, detail::kMapScanThreads, 0, stream,
                                     scratch.tile_hist, scratch.tile_invalid, tiles, d.experts, d.capacity, d.align,
                                     p.expert_offsets, p.expert_counts, p.routed_counts, p.dropped_count,
                                     p.invalid_count));
  MOXE_RETURN_IF_ERROR(launch_kernel(detail::map_rank_kernel<>, grid, detail::MapTiling::kThreads, smem, stream,
                                     p.topk_idx, entries, d.experts, d.capacity, scratch.tile_hist, p.expert_offsets,
                                     p.row_map));
  return check_launch(stream);
}

}  // namespace moxe::dispatch
