// moxe::dispatch::reference: host references of the routing map, permute, unpermute,
// their backward passes and the expert-parallel layout helpers (see docs/dispatch.md).
// Host-only C++: any element type that converts to and from Acc (double, float).
//
// The references check everything they can on the host (indices in [0, E) or -1, row maps
// inside the permuted buffer and without duplicates, split sizes) and return
// Status::invalid_argument, writing nothing, when a check fails.
#pragma once

#include <cstdint>
#include <type_traits>
#include <vector>

#include "moxe/core/status.hpp"
#include "moxe/dispatch/detail/counting_sort.hpp"
#include "moxe/dispatch/params.hpp"

namespace moxe::dispatch::reference {

namespace detail {

/// The accumulator of sums of rows of T: double for double, float otherwise (as the device).
template <class T>
using RowAcc = std::conditional_t<std::is_same_v<T, double>, double, float>;

/// Every entry of row_map is -1 or a row in [0, rows), and no row is used twice.
inline bool row_map_is_valid(const int64_t* row_map, int64_t entries, int64_t rows) {
  std::vector<char> used(static_cast<std::size_t>(rows), 0);
  for (int64_t i = 0; i < entries; ++i) {
    const int64_t r = row_map[i];
    if (r == -1) continue;
    if (r < 0 || r >= rows || used[static_cast<std::size_t>(r)]) return false;
    used[static_cast<std::size_t>(r)] = 1;
  }
  return true;
}

/// Rows of the permuted buffer an entry point writes: expert_offsets[E] when given (-1 when
/// that is outside [0, permuted_rows]), else permuted_rows.
inline int64_t written_rows(const Dims& d, const int64_t* expert_offsets) {
  const int64_t rows = permuted_rows(d);
  if (expert_offsets == nullptr) return rows;
  const int64_t used = expert_offsets[d.experts];
  return (used >= 0 && used <= rows) ? used : int64_t(-1);
}

}  // namespace detail

/// Expert-major, token-stable row map with optional capacity and alignment padding.
inline Status routing_map(const RoutingMapParams& p) {
  MOXE_RETURN_IF_ERROR(validate(p));
  const Dims& d = p.dims;
  const int64_t entries = d.tokens * d.top_k;
  for (int64_t i = 0; i < entries; ++i)
    MOXE_REQUIRE(!dispatch::detail::is_invalid_expert(p.topk_idx[i], d.experts));

  std::vector<int64_t> routed(d.experts, 0), kept(d.experts, 0), offsets(d.experts + 1, 0);
  for (int64_t i = 0; i < entries; ++i)
    if (p.topk_idx[i] >= 0) ++routed[p.topk_idx[i]];
  int64_t dropped = 0;
  for (int e = 0; e < d.experts; ++e) {
    kept[e] = dispatch::detail::kept_rows(routed[e], d.capacity);
    dropped += routed[e] - kept[e];
    offsets[e + 1] = offsets[e] + dispatch::detail::padded_rows(kept[e], d.align);
  }
  std::vector<int64_t> position(d.experts, 0);
  for (int64_t i = 0; i < entries; ++i) {
    const int e = p.topk_idx[i];
    p.row_map[i] = e < 0 ? int64_t(-1) : dispatch::detail::row_of(offsets[e], position[e]++, d.capacity);
  }
  for (int e = 0; e <= d.experts; ++e) p.expert_offsets[e] = offsets[e];
  for (int e = 0; e < d.experts; ++e) {
    p.expert_counts[e] = static_cast<int32_t>(kept[e]);
    if (p.routed_counts) p.routed_counts[e] = static_cast<int32_t>(routed[e]);
  }
  if (p.dropped_count) *p.dropped_count = dropped;
  if (p.invalid_count) *p.invalid_count = 0;
  return Status::ok;
}

/// xp[row_map[t,k]] = x[t]; every other row below expert_offsets[E] (all permuted rows when
/// expert_offsets is null) is zero, rows from expert_offsets[E] on are not written.
template <class T>
Status permute(const PermuteParams<T>& p) {
  MOXE_RETURN_IF_ERROR(validate(p));
  const Dims& d = p.dims;
  const int64_t h = d.hidden, rows = detail::written_rows(d, p.expert_offsets);
  MOXE_REQUIRE(rows >= 0);
  MOXE_REQUIRE(detail::row_map_is_valid(p.row_map, d.tokens * d.top_k, rows));
  for (int64_t i = 0; i < rows * h; ++i) p.xp[i] = T(0);
  for (int64_t t = 0; t < d.tokens; ++t)
    for (int k = 0; k < d.top_k; ++k) {
      const int64_t r = p.row_map[t * d.top_k + k];
      if (r < 0) continue;
      for (int64_t j = 0; j < h; ++j) p.xp[r * h + j] = p.x[t * h + j];
    }
  return Status::ok;
}

/// dx[t] = sum_k dxp[row_map[t,k]], summed in k order.
template <class T>
Status permute_backward(const PermuteBackwardParams<T>& p) {
  MOXE_RETURN_IF_ERROR(validate(p));
  const Dims& d = p.dims;
  const int64_t h = d.hidden;
  MOXE_REQUIRE(detail::row_map_is_valid(p.row_map, d.tokens * d.top_k, permuted_rows(d)));
  using Acc = detail::RowAcc<T>;
  for (int64_t t = 0; t < d.tokens; ++t)
    for (int64_t j = 0; j < h; ++j) {
      Acc s = Acc(0);
      for (int k = 0; k < d.top_k; ++k) {
        const int64_t r = p.row_map[t * d.top_k + k];
        if (r >= 0) s += static_cast<Acc>(p.dxp[r * h + j]);
      }
      p.dx[t * h + j] = static_cast<T>(s);
    }
  return Status::ok;
}

/// y[t] = sum_k weight[t,k] * yp[row_map[t,k]], accumulated in Acc in k order.
template <class T, class Acc>
Status unpermute(const UnpermuteParams<T, Acc>& p) {
  MOXE_RETURN_IF_ERROR(validate(p));
  const Dims& d = p.dims;
  const int64_t h = d.hidden;
  MOXE_REQUIRE(detail::row_map_is_valid(p.row_map, d.tokens * d.top_k, permuted_rows(d)));
  for (int64_t t = 0; t < d.tokens; ++t)
    for (int64_t j = 0; j < h; ++j) {
      Acc s = Acc(0);
      for (int k = 0; k < d.top_k; ++k) {
        const int64_t r = p.row_map[t * d.top_k + k];
        if (r >= 0) s += p.weight[t * d.top_k + k] * static_cast<Acc>(p.yp[r * h + j]);
      }
      p.y[t * h + j] = static_cast<T>(s);
    }
  return Status::ok;
}

/// dyp[row_map[t,k]] = weight[t,k] * dy[t] (other rows zero, as in permute);
/// dweight[t,k] = <dy[t], yp[row_map[t,k]]> in Acc (0 where row_map is -1).
template <class T, class Acc>
Status unpermute_backward(const UnpermuteBackwardParams<T, Acc>& p) {
  MOXE_RETURN_IF_ERROR(validate(p));
  const UnpermuteParams<T, Acc>& f = p.fwd;
  const Dims& d = f.dims;
  const int64_t h = d.hidden, rows = detail::written_rows(d, p.expert_offsets);
  MOXE_REQUIRE(rows >= 0);
  MOXE_REQUIRE(detail::row_map_is_valid(f.row_map, d.tokens * d.top_k, rows));
  for (int64_t i = 0; i < rows * h; ++i) p.dyp[i] = T(0);
  for (int64_t t = 0; t < d.tokens; ++t)
    for (int k = 0; k < d.top_k; ++k) {
      const int64_t tk = t * d.top_k + k, r = f.row_map[tk];
      Acc dot = Acc(0);
      if (r >= 0) {
        const Acc w = f.weight[tk];
        for (int64_t j = 0; j < h; ++j) {
          const Acc g = static_cast<Acc>(p.dy[t * h + j]);
          p.dyp[r * h + j] = static_cast<T>(w * g);
          dot += g * static_cast<Acc>(f.yp[r * h + j]);
        }
      }
      p.dweight[tk] = dot;
    }
  return Status::ok;
}

// ---- expert parallelism -------------------------------------------------------------------

/// Per-rank send counts (and offsets, and per-expert segment rows) from expert_offsets.
inline Status send_counts(const SendCountsParams& p) {
  MOXE_RETURN_IF_ERROR(validate(p));
  const int local = p.experts / p.ranks;
  MOXE_REQUIRE(p.expert_offsets[0] == 0);
  for (int e = 0; e < p.experts; ++e) MOXE_REQUIRE(p.expert_offsets[e + 1] >= p.expert_offsets[e]);
  for (int r = 0; r < p.ranks; ++r) {
    p.send_counts[r] = p.expert_offsets[(r + 1) * local] - p.expert_offsets[r * local];
    if (p.send_offsets) p.send_offsets[r] = p.expert_offsets[r * local];
  }
  if (p.send_offsets) p.send_offsets[p.ranks] = p.expert_offsets[p.experts];
  if (p.expert_rows)
    for (int e = 0; e < p.experts; ++e) p.expert_rows[e] = p.expert_offsets[e + 1] - p.expert_offsets[e];
  return Status::ok;
}

namespace detail {

/// Chunk starts in rank-major (s, e) and expert-major (e, s) order; false on bad sizes.
template <class T>
bool chunk_starts(const SortChunksParams<T>& p, std::vector<int64_t>& rank_major,
                  std::vector<int64_t>& expert_major) {
  const int R = p.ranks, L = p.local_experts;
  rank_major.assign(std::size_t(R) * L, 0);
  expert_major.assign(std::size_t(R) * L, 0);
  int64_t at = 0;
  for (int s = 0; s < R; ++s)
    for (int e = 0; e < L; ++e) {
      const int64_t n = p.split_sizes[s * L + e];
      if (n < 0) return false;
      rank_major[s * L + e] = at;
      at += n;
      if (at > p.max_rows) return false;
    }
  at = 0;
  for (int e = 0; e < L; ++e)
    for (int s = 0; s < R; ++s) {
      expert_major[s * L + e] = at;
      at += p.split_sizes[s * L + e];
    }
  return true;
}

template <class T>
Status sort_chunks(const SortChunksParams<T>& p, bool to_expert_major) {
  MOXE_RETURN_IF_ERROR(validate(p));
  std::vector<int64_t> rank_major, expert_major;
  MOXE_REQUIRE(chunk_starts(p, rank_major, expert_major));
  const int64_t h = p.hidden;
  const int L = p.local_experts;
  for (int s = 0; s < p.ranks; ++s)
    for (int e = 0; e < L; ++e) {
      const int64_t c = int64_t(s) * L + e, n = p.split_sizes[c];
      const int64_t src = to_expert_major ? rank_major[c] : expert_major[c];
      const int64_t dst = to_expert_major ? expert_major[c] : rank_major[c];
      for (int64_t i = 0; i < n * h; ++i) p.out[dst * h + i] = p.in[src * h + i];
    }
  if (p.expert_offsets) {
    for (int e = 0; e < L; ++e) p.expert_offsets[e] = expert_major[std::size_t(e)];  // chunk (0, e)
    int64_t total = 0;
    for (int64_t c = 0; c < int64_t(p.ranks) * L; ++c) total += p.split_sizes[c];
    p.expert_offsets[L] = total;
  }
  return Status::ok;
}

}  // namespace detail

/// Rank-major chunks (as received from the all-to-all) -> expert-major order.
template <class T>
Status sort_chunks(const SortChunksParams<T>& p) {
  return detail::sort_chunks(p, /*to_expert_major=*/true);
}

/// The inverse reorder: expert-major -> rank-major. It is the gradient of sort_chunks and
/// the layout step before the combine all-to-all.
template <class T>
Status sort_chunks_backward(const SortChunksParams<T>& p) {
  return detail::sort_chunks(p, /*to_expert_major=*/false);
}

}  // namespace moxe::dispatch::reference
