// moxe::dispatch::detail: the pieces of the routing map's counting sort that the host
// reference, the host emulation in the tests and the device kernels share: the tile
// decomposition, the treatment of invalid indices, the capacity cut and the padding.
#pragma once

#include <cstdint>

#include "moxe/core/config.hpp"

namespace moxe::dispatch::detail {

/// How the device splits the T*K (t, k) entries: tiles of kTileItems entries, one per
/// block; inside a tile warp w owns the contiguous kWarpItems entries from
/// w*kWarpItems, read as kChunksPerWarp chunks of 32 (lane l reads entry chunk*32 + l).
/// Entries are visited in increasing flattened index, which makes the ranks stable.
struct MapTiling {
  static constexpr int kLanes = 32;
  static constexpr int kWarps = 8;
  static constexpr int kThreads = kWarps * kLanes;
  static constexpr int kChunksPerWarp = 16;
  static constexpr int kWarpItems = kLanes * kChunksPerWarp;
  static constexpr int kTileItems = kWarps * kWarpItems;

  MOXE_HD static constexpr int64_t tiles(int64_t entries) { return ceil_div<int64_t>(entries, kTileItems); }
  MOXE_HD static constexpr int64_t entry(int64_t tile, int warp, int chunk, int lane) {
    return tile * kTileItems + int64_t(warp) * kWarpItems + int64_t(chunk) * kLanes + lane;
  }
};

/// Out-of-range indices are treated as "not routed" (-1) on the device.
MOXE_HD MOXE_FORCEINLINE int sanitize_expert(int32_t idx, int experts) {
  return (idx >= 0 && idx < experts) ? idx : -1;
}

/// An index that is neither an expert nor the "not routed" marker -1.
MOXE_HD MOXE_FORCEINLINE bool is_invalid_expert(int32_t idx, int experts) {
  return idx != -1 && (idx < 0 || idx >= experts);
}

/// Rows an expert keeps out of `routed` under `capacity` (-1: no limit).
MOXE_HD MOXE_FORCEINLINE int64_t kept_rows(int64_t routed, int64_t capacity) {
  return (capacity < 0 || routed < capacity) ? routed : capacity;
}

/// The expert's segment length: kept rows rounded up to a multiple of `align`.
MOXE_HD MOXE_FORCEINLINE int64_t padded_rows(int64_t kept, int align) {
  return round_up<int64_t>(kept, align);
}

/// Row of the entry that is the pos-th (0-based, in token order) routed to an expert whose
/// segment starts at `expert_offset`; -1 when the capacity drops it.
MOXE_HD MOXE_FORCEINLINE int64_t row_of(int64_t expert_offset, int64_t pos, int64_t capacity) {
  return (capacity >= 0 && pos >= capacity) ? int64_t(-1) : expert_offset + pos;
}

}  // namespace moxe::dispatch::detail
