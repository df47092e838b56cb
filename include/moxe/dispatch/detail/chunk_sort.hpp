// moxe::dispatch::detail: the index arithmetic of the expert-parallel chunk reorder, shared
// by the device kernels and the host tests. Chunk (s, e) = (source rank, local expert).
// Rank-major position q = s*L + e; expert-major position q = e*R + s.
#pragma once

#include <cstdint>

#include "moxe/core/config.hpp"

namespace moxe::dispatch::detail {

struct ChunkIndex {
  int rank, expert;
};

MOXE_HD MOXE_FORCEINLINE ChunkIndex chunk_at(int position, bool expert_major, int ranks, int local_experts) {
  return expert_major ? ChunkIndex{position % ranks, position / ranks}
                      : ChunkIndex{position / local_experts, position % local_experts};
}

MOXE_HD MOXE_FORCEINLINE int position_of(ChunkIndex c, bool expert_major, int ranks, int local_experts) {
  return expert_major ? c.expert * ranks + c.rank : c.rank * local_experts + c.expert;
}

/// The last position q in [0, chunks) with starts[q] <= r (starts non-decreasing, starts[0] = 0):
/// the chunk holding row r whenever r < the total.
MOXE_HD MOXE_FORCEINLINE int last_start_at_or_below(const int64_t* starts, int chunks, int64_t r) {
  int lo = 0, hi = chunks - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (starts[mid] <= r) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

/// The input row that output row r (< the total) copies. rank_major / expert_major are the
/// chunk starts indexed by position in each order.
MOXE_HD MOXE_FORCEINLINE int64_t chunk_source_row(int64_t r, const int64_t* rank_major, const int64_t* expert_major,
                                                  int ranks, int local_experts, bool to_expert_major) {
  const int chunks = ranks * local_experts;
  const int64_t* dst_starts = to_expert_major ? expert_major : rank_major;
  const int64_t* src_starts = to_expert_major ? rank_major : expert_major;
  const int q = last_start_at_or_below(dst_starts, chunks, r);
  const ChunkIndex c = chunk_at(q, to_expert_major, ranks, local_experts);
  return src_starts[position_of(c, !to_expert_major, ranks, local_experts)] + (r - dst_starts[q]);
}

}  // namespace moxe::dispatch::detail
