// moxe::dispatch: shapes and parameter structs of token dispatch (see docs/dispatch.md).
//
// Layouts (row-major, outermost first): topk_idx [T, K] int32 (expert id or -1),
// row_map [T, K] int64 (row of xp or -1), expert_offsets [E+1] int64, expert_counts [E]
// int32, x / y / dx / dy [T, H], weight / dweight [T, K] (Acc), and the permuted buffers
// xp / yp / dxp / dyp with permuted_rows(dims) = T*K + E*(align-1) rows of H.
#pragma once

#include <cstdint>

#include "moxe/core/config.hpp"
#include "moxe/core/status.hpp"

namespace moxe::dispatch {

struct Dims {
  int64_t tokens;
  int hidden, experts, top_k;
  int64_t capacity = -1;  // rows kept per expert; -1: no limit (0 is allowed: drop all)
  int align = 1;          // each expert's segment is padded to a multiple of align rows
};

/// Builds the expert-major, token-stable row map. expert_counts holds the rows KEPT per
/// expert (after the capacity cut, before padding): the number of data rows an expert's
/// GEMM sees. The padded segment is [expert_offsets[e], expert_offsets[e+1]).
struct RoutingMapParams {
  Dims dims;
  const int32_t* topk_idx;   // [T, K]
  int64_t* row_map;          // [T, K]: row of the permuted buffer, or -1 (not routed/dropped)
  int64_t* expert_offsets;   // [E + 1]: padded segment starts; [E] is the used row count
  int32_t* expert_counts;    // [E]: kept rows
  int32_t* routed_counts = nullptr;  // optional [E]: routed rows (kept + dropped)
  int64_t* dropped_count = nullptr;  // optional [1]: (t, k) dropped by the capacity
  int64_t* invalid_count = nullptr;  // optional [1]: entries outside [0, E) and != -1
};

/// xp[row_map[t,k]] = x[t]; every other row of xp below expert_offsets[E] (the alignment
/// padding) is written with zeros and rows from expert_offsets[E] on are left untouched.
/// With expert_offsets null, every other row of the permuted_rows(dims) rows is zeroed.
template <class T>
struct PermuteParams {
  Dims dims;
  const T* x;                      // [T, H]
  const int64_t* row_map;          // [T, K]
  const int64_t* expert_offsets;   // [E + 1] (optional: null zeros the whole tail)
  T* xp;                           // [permuted_rows(dims), H]
};

/// dx[t] = sum_k dxp[row_map[t,k]] (rows -1 contribute nothing).
template <class T>
struct PermuteBackwardParams {
  Dims dims;
  const T* dxp;            // [permuted_rows(dims), H]
  const int64_t* row_map;  // [T, K]
  T* dx;                   // [T, H]
};

/// y[t] = sum_k weight[t,k] * yp[row_map[t,k]], accumulated in Acc (fp32 on the device).
template <class T, class Acc = float>
struct UnpermuteParams {
  Dims dims;
  const T* yp;             // [permuted_rows(dims), H]
  const int64_t* row_map;  // [T, K]
  const Acc* weight;       // [T, K]
  T* y;                    // [T, H]
};

/// dyp[row_map[t,k]] = weight[t,k] * dy[t], every other row of dyp zero (as in permute:
/// below expert_offsets[E] when given, else all permuted_rows(dims) rows);
/// dweight[t,k] = <dy[t], yp[row_map[t,k]]> (0 where row_map is -1).
template <class T, class Acc = float>
struct UnpermuteBackwardParams {
  UnpermuteParams<T, Acc> fwd;  // the forward's inputs (y unused)
  const T* dy;                  // [T, H]
  T* dyp;                       // [permuted_rows(dims), H]
  Acc* dweight;                 // [T, K]
  const int64_t* expert_offsets = nullptr;  // optional [E + 1]: rows from [E] on untouched
};

// ---- expert parallelism: experts split contiguously over `ranks` ------------------------
// Rank r owns experts [r*E/R, (r+1)*E/R). After the routing map and the permute, the rows
// for rank r are the contiguous range [expert_offsets[r*E/R], expert_offsets[(r+1)*E/R]).

/// send_counts[r] = rows for rank r; optional send_offsets [R+1] and expert_rows [E]
/// (= expert_offsets[e+1] - expert_offsets[e], the split sizes to exchange with the rows).
struct SendCountsParams {
  int experts, ranks;
  const int64_t* expert_offsets;    // [E + 1]
  int64_t* send_counts;             // [R]
  int64_t* send_offsets = nullptr;  // optional [R + 1]
  int64_t* expert_rows = nullptr;   // optional [E]
};

/// Reorders rows made of chunks. split_sizes [ranks, local_experts] (int64) gives the rows
/// received from rank s for local expert e. Rank-major order is (s, e) with e fastest (the
/// order an all-to-all delivers), expert-major order is (e, s) with s fastest (the order
/// the expert GEMMs want). sort_chunks moves rank-major -> expert-major; the inverse move
/// (and the gradient) is sort_chunks_backward. Rows past the sum of split_sizes (up to
/// max_rows) are left untouched.
template <class T>
struct SortChunksParams {
  int64_t max_rows;  // rows allocated in `in` and `out` (>= sum of split_sizes)
  int hidden, ranks, local_experts;
  const int64_t* split_sizes;  // [ranks, local_experts]
  const T* in;                 // [max_rows, H]
  T* out;                      // [max_rows, H]
  int64_t* expert_offsets = nullptr;  // optional [local_experts + 1]: expert-major starts
};

// ---- sizes and checks shared by the references and the launchers --------------------------

/// Rows of the permuted buffers: the worst case over all routings.
MOXE_HD constexpr int64_t permuted_rows(const Dims& d) {
  return d.tokens * d.top_k + static_cast<int64_t>(d.experts) * (d.align - 1);
}

/// Device limits (the references accept any size).
inline constexpr int kMaxDeviceExperts = 1024;
inline constexpr int kMaxDeviceTopK = 32;

/// The checks every dispatch entry point makes on the sizes before touching memory.
/// Row indices are int64 everywhere; per-expert counts are int32, so T*K plus the padding
/// must stay below 2^31 (unsupported otherwise).
inline Status validate(const Dims& d) {
  MOXE_REQUIRE(d.tokens > 0 && d.hidden > 0 && d.experts > 0);
  MOXE_REQUIRE(d.top_k >= 1 && d.top_k <= d.experts);
  MOXE_REQUIRE(d.align >= 1 && d.capacity >= -1);
  if (d.tokens > (int64_t(INT32_MAX) - int64_t(d.experts) * (d.align - 1)) / d.top_k)
    return Status::unsupported;
  return Status::ok;
}

inline Status validate_device_limits(const Dims& d) {
  MOXE_RETURN_IF_ERROR(validate(d));
  if (d.experts > kMaxDeviceExperts || d.top_k > kMaxDeviceTopK) return Status::unsupported;
  return Status::ok;
}

inline Status validate(const RoutingMapParams& p) {
  MOXE_RETURN_IF_ERROR(validate(p.dims));
  MOXE_REQUIRE(p.topk_idx && p.row_map && p.expert_offsets && p.expert_counts);
  return Status::ok;
}

template <class T>
Status validate(const PermuteParams<T>& p) {
  MOXE_RETURN_IF_ERROR(validate(p.dims));
  MOXE_REQUIRE(p.x && p.row_map && p.xp);
  return Status::ok;
}

template <class T>
Status validate(const PermuteBackwardParams<T>& p) {
  MOXE_RETURN_IF_ERROR(validate(p.dims));
  MOXE_REQUIRE(p.dxp && p.row_map && p.dx);
  return Status::ok;
}

template <class T, class Acc>
Status validate(const UnpermuteParams<T, Acc>& p, bool need_y = true) {
  MOXE_RETURN_IF_ERROR(validate(p.dims));
  MOXE_REQUIRE(p.yp && p.row_map && p.weight);
  MOXE_REQUIRE(!need_y || p.y);
  return Status::ok;
}

template <class T, class Acc>
Status validate(const UnpermuteBackwardParams<T, Acc>& p) {
  MOXE_RETURN_IF_ERROR(validate(p.fwd, /*need_y=*/false));
  MOXE_REQUIRE(p.dy && p.dyp && p.dweight);
  return Status::ok;
}

inline Status validate(const SendCountsParams& p) {
  MOXE_REQUIRE(p.experts > 0 && p.ranks > 0 && p.experts % p.ranks == 0);
  MOXE_REQUIRE(p.expert_offsets && p.send_counts);
  return Status::ok;
}

template <class T>
Status validate(const SortChunksParams<T>& p) {
  MOXE_REQUIRE(p.max_rows > 0 && p.hidden > 0 && p.ranks > 0 && p.local_experts > 0);
  if (int64_t(p.ranks) * p.local_experts >= int64_t(INT32_MAX)) return Status::unsupported;
  MOXE_REQUIRE(p.split_sizes && p.in && p.out);
  MOXE_REQUIRE(p.in != p.out);  // a permutation of rows cannot run in place
  return Status::ok;
}

}  // namespace moxe::dispatch
