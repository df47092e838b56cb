// moxe::router::variants: one block selects the C largest scores of a column (an expert's
// scores over the tokens) without sorting it: a 4-pass 8-bit radix select finds the key
// of the C-th largest and how many of the entries equal to it to take, then a stable
// block compaction hands the chosen entries out in index order (ties to the lower index).
// Expert choice and group-restricted expert choice run it once per expert.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "moxe/core/config.hpp"
#include "moxe/core/reduce.cuh"
#include "moxe/router/detail/lane_group.cuh"
#include "moxe/router/variants/detail/variant_math.hpp"

namespace moxe::router::variants::detail {

inline constexpr int kSelectThreads = 512;
inline constexpr int kSelectWarps = kSelectThreads / kWarpSize;
inline constexpr int kSelectUnroll = 4;
inline constexpr int kRadixBits = 8;
inline constexpr int kRadixBins = 1 << kRadixBits;

/// Shared memory of select_column; the kernel puts it in shared memory.
struct ColumnSelectStorage {
  int hist[kRadixBins];
  int warp_totals[kSelectWarps];
  uint32_t digit;
  int64_t remaining;
};

/// The selection key of a score: float_key's order (NaN as -inf). A negative score (no
/// softmax or sigmoid value is one) marks an entry that may not be chosen: key 0, below
/// every score's key.
MOXE_DEVICE MOXE_FORCEINLINE uint32_t select_key(float s) { return s < 0.f ? 0u : router::detail::float_key(s); }

/// Exclusive rank of `flag` among the block's threads (thread order) and the block total.
MOXE_DEVICE MOXE_FORCEINLINE int block_rank(bool flag, int* warp_totals, int& total) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const unsigned ballot = __ballot_sync(kFullMask, flag);
  const int rank = __popc(ballot & ((1u << lane) - 1u));
  if (lane == 0) warp_totals[warp] = __popc(ballot);
  __syncthreads();
  int before = 0;
  total = 0;
  for (int w = 0; w < kSelectWarps; ++w) {
    const int c = warp_totals[w];
    before += w < warp ? c : 0;
    total += c;
  }
  __syncthreads();
  return before + rank;
}

/// The whole block (kSelectThreads threads) selects the C entries of col[0, n) of largest
/// select_key (ties to the lower index), C at most the number of entries with a nonzero
/// key, and calls emit(i, position, col[i]) for each, in ascending i, position 0..C-1.
/// C is uniform over the block; C <= 0 selects nothing.
template <class Emit>
MOXE_DEVICE void select_column(ColumnSelectStorage& st, const float* col, int64_t n, int64_t C, Emit emit) {
  if (C <= 0) return;
  // radix select: the key of the C-th largest score, and how many equal to it to take
  uint32_t prefix = 0, mask = 0;
  int64_t remaining = C;
  for (int shift = 32 - kRadixBits; shift >= 0; shift -= kRadixBits) {
    for (int i = threadIdx.x; i < kRadixBins; i += kSelectThreads) st.hist[i] = 0;
    __syncthreads();
    // kSelectUnroll independent loads in flight per thread, then the histogram updates;
    // the whole block runs every round (past the end a lane adds nothing)
    for (int64_t start = 0; start < n; start += int64_t(kSelectThreads) * kSelectUnroll) {
      float x[kSelectUnroll];
      MOXE_PRAGMA_UNROLL
      for (int u = 0; u < kSelectUnroll; ++u) {
        const int64_t i = start + int64_t(u) * kSelectThreads + threadIdx.x;
        x[u] = i < n ? __ldg(col + i) : 0.f;
      }
      MOXE_PRAGMA_UNROLL
      for (int u = 0; u < kSelectUnroll; ++u) {
        const bool valid = start + int64_t(u) * kSelectThreads + threadIdx.x < n;
        const uint32_t k = select_key(x[u]);
        const int bin = (valid && (k & mask) == prefix) ? int((k >> shift) & (kRadixBins - 1)) : -1;
        // softmax scores share their top bits: aggregate equal bins over the warp first
        const unsigned peers = __match_any_sync(kFullMask, bin);
        if (bin >= 0 && (threadIdx.x % kWarpSize) == __ffs(peers) - 1) atomicAdd(&st.hist[bin], __popc(peers));
      }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int64_t in_digit = 0;
      st.digit = static_cast<uint32_t>(radix_select_digit(st.hist, kRadixBins, remaining, in_digit));
      st.remaining = in_digit;
    }
    __syncthreads();
    prefix |= st.digit << shift;
    mask |= uint32_t(kRadixBins - 1) << shift;
    remaining = st.remaining;
  }
  const uint32_t tau = prefix;
  const int64_t need = remaining;  // entries with key == tau to take, lowest index first
  // stable compaction in index order
  int64_t eq_base = 0, sel_base = 0;
  for (int64_t start = 0; start < n; start += kSelectThreads) {
    const int64_t i = start + threadIdx.x;
    const bool valid = i < n;
    const float s = valid ? col[i] : 0.f;
    const uint32_t k = valid ? select_key(s) : 0u;
    const bool eq = valid && k == tau;
    int eq_total, sel_total;
    const int eq_rank = block_rank(eq, st.warp_totals, eq_total);
    // a key-0 entry is never chosen (tau > 0 already, by the bound on C)
    const bool sel = k != 0u && ((valid && k > tau) || (eq && eq_base + eq_rank < need));
    const int sel_rank = block_rank(sel, st.warp_totals, sel_total);
    if (sel && sel_base + sel_rank < C) emit(i, sel_base + sel_rank, s);  // the bound holds by construction
    eq_base += eq_total;
    sel_base += sel_total;
    if (sel_base >= C) break;  // exactly C are chosen: the rest of the column is not (uniform)
  }
}

}  // namespace moxe::router::variants::detail
