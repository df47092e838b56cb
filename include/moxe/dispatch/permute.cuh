// moxe::dispatch: the device entry points of token dispatch (see docs/dispatch.md): the
// routing map (routing_map.cuh), permute and unpermute and their backward passes.
//
// Kernels work on whole rows of H elements, one block per token, reading and writing each
// row once, with 16-byte vector accesses when every row start is 16-byte aligned (H*sizeof(T)
// a multiple of 16 and aligned base pointers) and a scalar path otherwise.
//
// permute and unpermute_backward scatter into the permuted buffer (permuted_rows(dims) rows)
// and must also zero every row no (t, k) maps to below expert_offsets[E] (the alignment
// padding; with expert_offsets null: every unused row of the buffer), without knowing the used
// row count on the host. They mark the used rows in a byte mask in the workspace (a memset
// plus one small kernel over row_map) and then block b, besides its token, zeros the unused
// rows among [b*K, (b+1)*K): the grid ceil(permuted_rows / K) >= T covers the worst case
// exactly once, and blocks past the end read expert_offsets[E] on the device and stop.
// With align 1 and expert_offsets given there is nothing to zero: no mask, one launch.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <type_traits>

#include "moxe/core/launch.cuh"
#include "moxe/core/numeric.cuh"
#include "moxe/core/reduce.cuh"
#include "moxe/core/status.hpp"
#include "moxe/core/workspace.hpp"
#include "moxe/dispatch/params.hpp"
#include "moxe/dispatch/routing_map.cuh"

namespace moxe::dispatch {

namespace detail {

inline constexpr int kRowThreads = 128;
inline constexpr int kRowWarps = kRowThreads / kWarpSize;
inline constexpr int kMarkThreads = 256;

/// One access unit of a row: a 16-byte vector of T, or a single T on the scalar path.
template <class T, bool kVector>
struct RowUnit;

template <class T>
struct RowUnit<T, true> {
  using V = Vec16<T>;
  static constexpr int kElements = V::kElements;
  V v;
  MOXE_DEVICE MOXE_FORCEINLINE static RowUnit load(const T* row, int64_t u) {
    return {V::load_nc(row + u * kElements)};
  }
  /// One 16-byte store. (Storing through the struct let nvcc split a unit that was loaded once
  /// and stored K times into four 32-bit stores per thread: 4x the store instructions.)
  MOXE_DEVICE MOXE_FORCEINLINE void store(T* row, int64_t u) const {
    uint4 bits;
    memcpy(&bits, &v, sizeof(bits));
    reinterpret_cast<uint4*>(row)[u] = bits;
  }
  MOXE_DEVICE MOXE_FORCEINLINE static RowUnit zero() { return {V::zero()}; }
  MOXE_DEVICE MOXE_FORCEINLINE float get(int i) const { return moxe::to_float(v.v[i]); }
  MOXE_DEVICE MOXE_FORCEINLINE void set(int i, float x) { v.v[i] = moxe::from_float<T>(x); }
};

template <class T>
struct RowUnit<T, false> {
  static constexpr int kElements = 1;
  T v;
  MOXE_DEVICE MOXE_FORCEINLINE static RowUnit load(const T* row, int64_t u) { return {row[u]}; }
  MOXE_DEVICE MOXE_FORCEINLINE void store(T* row, int64_t u) const { row[u] = v; }
  MOXE_DEVICE MOXE_FORCEINLINE static RowUnit zero() { return {moxe::from_float<T>(0.f)}; }
  MOXE_DEVICE MOXE_FORCEINLINE float get(int) const { return moxe::to_float(v); }
  MOXE_DEVICE MOXE_FORCEINLINE void set(int, float x) { v = moxe::from_float<T>(x); }
};

/// True when 16-byte vector accesses are valid for rows of `hidden` T at these pointers.
template <class T>
inline bool rows_vectorizable(int hidden, std::initializer_list<const void*> pointers) {
  if ((static_cast<std::size_t>(hidden) * sizeof(T)) % 16 != 0) return false;
  for (const void* p : pointers)
    if (p != nullptr && !is_aligned(p, 16)) return false;
  return true;
}

/// A row index of row_map that is safe to use: in [0, rows), else -1 (nothing is written
/// out of bounds even from a corrupt map).
MOXE_DEVICE MOXE_FORCEINLINE int64_t checked_row(int64_t r, int64_t rows) { return (r >= 0 && r < rows) ? r : -1; }

/// Byte mask of the rows row_map uses (the mask is zeroed by a memset before).
template <int kThreads = kMarkThreads>
__global__ void __launch_bounds__(kThreads)
    mark_used_rows_kernel(const int64_t* MOXE_RESTRICT row_map, int64_t entries, int64_t rows,
                          uint8_t* MOXE_RESTRICT used) {
  const int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (i < entries) {
    const int64_t r = checked_row(row_map[i], rows);
    if (r >= 0) used[r] = 1;
  }
}

/// Zeros the rows listed in zero_rows (block-shared, -1: nothing) of `out`.
template <class T, bool kVector>
MOXE_DEVICE MOXE_FORCEINLINE void zero_unused_rows(const int64_t (&zero_rows)[kMaxDeviceTopK], int top_k,
                                                   int64_t units, int hidden, T* MOXE_RESTRICT out) {
  using Unit = RowUnit<T, kVector>;
  for (int j = 0; j < top_k; ++j) {
    const int64_t r = zero_rows[j];
    if (r < 0) continue;
    T* row = out + r * hidden;
    for (int64_t u = threadIdx.x; u < units; u += kRowThreads) Unit::zero().store(row, u);
  }
}

/// The rows below which unused rows are zeroed: expert_offsets[E] when given (clamped to the
/// buffer), else the whole buffer.
MOXE_DEVICE MOXE_FORCEINLINE int64_t zeroed_rows_end(const int64_t* MOXE_RESTRICT expert_offsets, int experts,
                                                     int64_t rows) {
  if (expert_offsets == nullptr) return rows;
  const int64_t used = expert_offsets[experts];
  return used < rows ? used : rows;
}

/// Block b's candidate row j if it is unused and below `end`, else -1 (always -1 without a
/// mask: nothing to zero).
MOXE_DEVICE MOXE_FORCEINLINE int64_t unused_candidate_row(int64_t b, int j, int top_k, int64_t end,
                                                          const uint8_t* MOXE_RESTRICT used) {
  const int64_t r = b * top_k + j;
  return (used != nullptr && r < end && used[r] == 0) ? r : int64_t(-1);
}

template <class T, bool kVector, int kUnroll = 4>
__global__ void __launch_bounds__(kRowThreads)
    permute_kernel(const T* MOXE_RESTRICT x, const int64_t* MOXE_RESTRICT row_map,
                   const int64_t* MOXE_RESTRICT expert_offsets, const uint8_t* MOXE_RESTRICT used, int64_t tokens,
                   int hidden, int experts, int top_k, int64_t rows, T* MOXE_RESTRICT xp) {
  using Unit = RowUnit<T, kVector>;
  __shared__ int64_t dst[kMaxDeviceTopK], zero_rows[kMaxDeviceTopK];
  const int64_t b = blockIdx.x;
  const bool has_token = b < tokens;
  if (threadIdx.x < top_k) {
    dst[threadIdx.x] = has_token ? checked_row(row_map[b * top_k + threadIdx.x], rows) : int64_t(-1);
    const int64_t end = zeroed_rows_end(expert_offsets, experts, rows);
    zero_rows[threadIdx.x] = unused_candidate_row(b, threadIdx.x, top_k, end, used);
  }
  __syncthreads();
  const int64_t units = hidden / Unit::kElements;
  if (has_token) {
    const T* src = x + b * hidden;
    for (int64_t u0 = threadIdx.x; u0 < units; u0 += int64_t(kRowThreads) * kUnroll) {
      Unit v[kUnroll];
      MOXE_PRAGMA_UNROLL
      for (int q = 0; q < kUnroll; ++q) {
        const int64_t u = u0 + int64_t(q) * kRowThreads;
        if (u < units) v[q] = Unit::load(src, u);
      }
      for (int j = 0; j < top_k; ++j) {
        const int64_t r = dst[j];
        if (r < 0) continue;
        T* row = xp + r * hidden;
        MOXE_PRAGMA_UNROLL
        for (int q = 0; q < kUnroll; ++q) {
          const int64_t u = u0 + int64_t(q) * kRowThreads;
          if (u < units) v[q].store(row, u);
        }
      }
    }
  }
  zero_unused_rows<T, kVector>(zero_rows, top_k, units, hidden, xp);
}

/// y[t] = sum_k w[t,k] * src[row_map[t,k]] in fp32, k in order. Without weights (null) w = 1,
/// and fma(1, v, acc) rounds exactly as acc + v: one kernel serves both passes. The loads of
/// kRowsInFlight rows are issued before the first is used (kRowsInFlight * kUnroll 16-byte
/// loads in flight per thread); the sums still run over k in order, element by element.
template <class T, bool kVector, int kUnroll = 2, int kRowsInFlight = 2>
__global__ void __launch_bounds__(kRowThreads)
    gather_kernel(const T* MOXE_RESTRICT src, const int64_t* MOXE_RESTRICT row_map,
                  const float* MOXE_RESTRICT weight, int hidden, int top_k, int64_t rows, T* MOXE_RESTRICT y) {
  using Unit = RowUnit<T, kVector>;
  constexpr int kE = Unit::kElements;
  __shared__ int64_t from[kMaxDeviceTopK];
  __shared__ float w[kMaxDeviceTopK];
  const int64_t t = blockIdx.x;
  if (threadIdx.x < top_k) {
    from[threadIdx.x] = checked_row(row_map[t * top_k + threadIdx.x], rows);
    w[threadIdx.x] = weight != nullptr ? weight[t * top_k + threadIdx.x] : 1.f;
  }
  __syncthreads();
  const int64_t units = hidden / kE;
  for (int64_t u0 = threadIdx.x; u0 < units; u0 += int64_t(kRowThreads) * kUnroll) {
    float acc[kUnroll][kE];
    MOXE_PRAGMA_UNROLL
    for (int q = 0; q < kUnroll; ++q)
      MOXE_PRAGMA_UNROLL
      for (int i = 0; i < kE; ++i) acc[q][i] = 0.f;
    for (int j0 = 0; j0 < top_k; j0 += kRowsInFlight) {
      Unit v[kRowsInFlight][kUnroll];
      MOXE_PRAGMA_UNROLL
      for (int jj = 0; jj < kRowsInFlight; ++jj) {
        const int64_t r = j0 + jj < top_k ? from[j0 + jj] : int64_t(-1);
        const T* row = src + (r < 0 ? int64_t(0) : r) * hidden;
        MOXE_PRAGMA_UNROLL
        for (int q = 0; q < kUnroll; ++q) {
          const int64_t u = u0 + int64_t(q) * kRowThreads;
          if (r >= 0 && u < units) v[jj][q] = Unit::load(row, u);
        }
      }
      MOXE_PRAGMA_UNROLL
      for (int jj = 0; jj < kRowsInFlight; ++jj) {
        const int64_t r = j0 + jj < top_k ? from[j0 + jj] : int64_t(-1);
        if (r < 0) continue;
        const float wj = w[j0 + jj];
        MOXE_PRAGMA_UNROLL
        for (int q = 0; q < kUnroll; ++q) {
          const int64_t u = u0 + int64_t(q) * kRowThreads;
          if (u < units) {
            MOXE_PRAGMA_UNROLL
            for (int i = 0; i < kE; ++i) acc[q][i] = fmaf(wj, v[jj][q].get(i), acc[q][i]);
          }
        }
      }
    }
    T* out = y + t * hidden;
    MOXE_PRAGMA_UNROLL
    for (int q = 0; q < kUnroll; ++q) {
      const int64_t u = u0 + int64_t(q) * kRowThreads;
      if (u < units) {
        Unit v;
        MOXE_PRAGMA_UNROLL
        for (int i = 0; i < kE; ++i) v.set(i, acc[q][i]);
        v.store(out, u);
      }
    }
  }
}

/// dyp[row] = w * dy[t] (unused rows zero), dweight[t,k] = <dy[t], yp[row]>: per-thread fp32
/// partial sums in a fixed order, then a fixed-order warp and block combination.
template <class T, bool kVector, int kUnroll = 2>
__global__ void __launch_bounds__(kRowThreads)
    unpermute_backward_kernel(const T* MOXE_RESTRICT dy, const T* MOXE_RESTRICT yp,
                              const int64_t* MOXE_RESTRICT row_map, const float* MOXE_RESTRICT weight,
                              const int64_t* MOXE_RESTRICT expert_offsets, const uint8_t* MOXE_RESTRICT used,
                              int64_t tokens, int hidden, int experts, int top_k, int64_t rows,
                              T* MOXE_RESTRICT dyp, float* MOXE_RESTRICT dweight) {
  using Unit = RowUnit<T, kVector>;
  constexpr int kE = Unit::kElements;
  __shared__ int64_t dst[kMaxDeviceTopK], zero_rows[kMaxDeviceTopK];
  __shared__ float w[kMaxDeviceTopK];
  __shared__ float partial[kRowWarps][kMaxDeviceTopK];
  const int64_t b = blockIdx.x;
  const bool has_token = b < tokens;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  if (threadIdx.x < top_k) {
    dst[threadIdx.x] = has_token ? checked_row(row_map[b * top_k + threadIdx.x], rows) : int64_t(-1);
    w[threadIdx.x] = has_token ? weight[b * top_k + threadIdx.x] : 0.f;
    const int64_t end = zeroed_rows_end(expert_offsets, experts, rows);
    zero_rows[threadIdx.x] = unused_candidate_row(b, threadIdx.x, top_k, end, used);
  }
  __syncthreads();
  const int64_t units = hidden / kE;
  if (has_token) {
    const T* g = dy + b * hidden;
    for (int j = 0; j < top_k; ++j) {
      const int64_t r = dst[j];
      float dot = 0.f;
      if (r >= 0) {
        const float wj = w[j];
        const T* y_row = yp + r * hidden;
        T* d_row = dyp + r * hidden;
        for (int64_t u0 = threadIdx.x; u0 < units; u0 += int64_t(kRowThreads) * kUnroll) {
          Unit gv[kUnroll], yv[kUnroll];  // every load of the step issued before the first use
          MOXE_PRAGMA_UNROLL
          for (int q = 0; q < kUnroll; ++q) {
            const int64_t u = u0 + int64_t(q) * kRowThreads;
            if (u < units) {
              gv[q] = Unit::load(g, u);
              yv[q] = Unit::load(y_row, u);
            }
          }
          MOXE_PRAGMA_UNROLL
          for (int q = 0; q < kUnroll; ++q) {
            const int64_t u = u0 + int64_t(q) * kRowThreads;
            if (u < units) {
              Unit out;
              MOXE_PRAGMA_UNROLL
              for (int i = 0; i < kE; ++i) {
                const float gi = gv[q].get(i);
                out.set(i, wj * gi);
                dot += gi * yv[q].get(i);
              }
              out.store(d_row, u);
            }
          }
        }
      }
      dot = warp_sum(dot);
      if (lane == 0) partial[warp][j] = dot;
    }
    __syncthreads();
    if (threadIdx.x < top_k) {
      float s = 0.f;
      for (int v = 0; v < kRowWarps; ++v) s += partial[v][threadIdx.x];
      dweight[b * top_k + threadIdx.x] = dst[threadIdx.x] >= 0 ? s : 0.f;
    }
  }
  zero_unused_rows<T, kVector>(zero_rows, top_k, units, hidden, dyp);
}

/// Scratch of permute and unpermute_backward: the used-row mask.
struct RowMaskScratch {
  uint8_t* used;  // [permuted_rows]
};

inline RowMaskScratch carve_row_mask(WorkspaceCarver& c, const Dims& d) {
  return {c.carve<uint8_t>(static_cast<std::size_t>(permuted_rows(d)))};
}

/// Whether a scatter pass has rows to zero. With align 1 the kept rows of every expert fill
/// its segment, so [0, expert_offsets[E]) has no unused row; only the tail (zeroed when
/// expert_offsets is null) or alignment padding needs the mask.
inline bool needs_row_mask(const Dims& d, const int64_t* expert_offsets) {
  return d.align > 1 || expert_offsets == nullptr;
}

inline Status mark_used_rows(const Dims& d, const int64_t* row_map, uint8_t* used, cudaStream_t stream) {
  const int64_t rows = permuted_rows(d), entries = d.tokens * d.top_k;
  MOXE_CUDA_TRY(cudaMemsetAsync(used, 0, static_cast<std::size_t>(rows), stream));
  const dim3 grid(static_cast<unsigned>(ceil_div<int64_t>(entries, kMarkThreads)));
  MOXE_RETURN_IF_ERROR(
      launch_kernel(mark_used_rows_kernel<>, grid, kMarkThreads, 0, stream, row_map, entries, rows, used));
  return check_launch(stream);
}

/// Blocks of the scatter kernels: one per token and enough to visit every row once.
inline dim3 scatter_grid(const Dims& d) {
  return dim3(static_cast<unsigned>(ceil_div<int64_t>(permuted_rows(d), d.top_k)));
}

}  // namespace detail

// ---- permute ------------------------------------------------------------------------------

template <class T>
std::size_t permute_workspace_size(const PermuteParams<T>& p) {
  if (validate(p.dims) != Status::ok) return 0;
  WorkspaceCarver c;
  detail::carve_row_mask(c, p.dims);
  return c.required_bytes();
}

/// xp[row_map[t,k]] = x[t]; every other row below expert_offsets[E] is zeroed (below
/// permuted_rows(dims) when expert_offsets is null); rows from expert_offsets[E] on are untouched.
template <class T>
Status permute(const PermuteParams<T>& p, void* workspace, std::size_t workspace_bytes, cudaStream_t stream) {
  static_assert(is_device_element_v<T>, "T must be float, __half or __nv_bfloat16");
  MOXE_RETURN_IF_ERROR(validate(p));
  MOXE_RETURN_IF_ERROR(validate_device_limits(p.dims));
  WorkspaceCarver carver(workspace, workspace_bytes);
  const detail::RowMaskScratch scratch = detail::carve_row_mask(carver, p.dims);
  if (!carver.fits()) return Status::workspace_too_small;
  const Dims& d = p.dims;
  const uint8_t* used = nullptr;
  if (detail::needs_row_mask(d, p.expert_offsets)) {
    MOXE_RETURN_IF_ERROR(detail::mark_used_rows(d, p.row_map, scratch.used, stream));
    used = scratch.used;
  }
  const int64_t rows = permuted_rows(d);
  const auto kernel = detail::rows_vectorizable<T>(d.hidden, {p.x, p.xp}) ? detail::permute_kernel<T, true>
                                                                           : detail::permute_kernel<T, false>;
  MOXE_RETURN_IF_ERROR(launch_kernel(kernel, detail::scatter_grid(d), detail::kRowThreads, 0, stream, p.x, p.row_map,
                                     p.expert_offsets, used, d.tokens, d.hidden, d.experts, d.top_k, rows, p.xp));
  return check_launch(stream);
}

// ---- permute backward ---------------------------------------------------------------------

template <class T>
std::size_t permute_backward_workspace_size(const PermuteBackwardParams<T>&) {
  return 0;
}

/// dx[t] = sum_k dxp[row_map[t,k]] in fp32, k in order.
template <class T>
Status permute_backward(const PermuteBackwardParams<T>& p, void* /*workspace*/, std::size_t /*workspace_bytes*/,
                        cudaStream_t stream) {
  static_assert(is_device_element_v<T>, "T must be float, __half or __nv_bfloat16");
  MOXE_RETURN_IF_ERROR(validate(p));
  MOXE_RETURN_IF_ERROR(validate_device_limits(p.dims));
  const Dims& d = p.dims;
  const dim3 grid(static_cast<unsigned>(d.tokens));
  const int64_t rows = permuted_rows(d);
  const auto kernel = detail::rows_vectorizable<T>(d.hidden, {p.dxp, p.dx}) ? detail::gather_kernel<T, true>
                                                                             : detail::gather_kernel<T, false>;
  MOXE_RETURN_IF_ERROR(launch_kernel(kernel, grid, detail::kRowThreads, 0, stream, p.dxp, p.row_map,
                                     nullptr, d.hidden, d.top_k, rows, p.dx));
  return check_launch(stream);
}

// ---- unpermute ----------------------------------------------------------------------------

template <class T, class Acc>
std::size_t unpermute_workspace_size(const UnpermuteParams<T, Acc>&) {
  return 0;
}

/// y[t] = sum_k weight[t,k] * yp[row_map[t,k]] in fp32, k in order.
template <class T, class Acc>
Status unpermute(const UnpermuteParams<T, Acc>& p, void* /*workspace*/, std::size_t /*workspace_bytes*/,
                 cudaStream_t stream) {
  static_assert(is_device_element_v<T>, "T must be float, __half or __nv_bfloat16");
  static_assert(std::is_same_v<Acc, float>, "the device accumulates in float");
  MOXE_RETURN_IF_ERROR(validate(p));
  MOXE_RETURN_IF_ERROR(validate_device_limits(p.dims));
  const Dims& d = p.dims;
  const dim3 grid(static_cast<unsigned>(d.tokens));
  const int64_t rows = permuted_rows(d);
  const auto kernel = detail::rows_vectorizable<T>(d.hidden, {p.yp, p.y}) ? detail::gather_kernel<T, true>
                                                                           : detail::gather_kernel<T, false>;
  MOXE_RETURN_IF_ERROR(launch_kernel(kernel, grid, detail::kRowThreads, 0, stream, p.yp, p.row_map, p.weight, d.hidden,
                                     d.top_k, rows, p.y));
  return check_launch(stream);
}

// ---- unpermute backward -------------------------------------------------------------------

template <class T, class Acc>
std::size_t unpermute_backward_workspace_size(const UnpermuteBackwardParams<T, Acc>& p) {
  if (validate(p.fwd.dims) != Status::ok) return 0;
  WorkspaceCarver c;
  detail::carve_row_mask(c, p.fwd.dims);
  return c.required_bytes();
}

/// dyp[row_map[t,k]] = weight[t,k] * dy[t] (every other row of dyp zeroed, as in permute) and
/// dweight[t,k] = <dy[t], yp[row_map[t,k]]> (0 where row_map is -1), deterministic.
template <class T, class Acc>
Status unpermute_backward(const UnpermuteBackwardParams<T, Acc>& p, void* workspace, std::size_t workspace_bytes,
                          cudaStream_t stream) {
  static_assert(is_device_element_v<T>, "T must be float, __half or __nv_bfloat16");
  static_assert(std::is_same_v<Acc, float>, "the device accumulates in float");
  MOXE_RETURN_IF_ERROR(validate(p));
  MOXE_RETURN_IF_ERROR(validate_device_limits(p.fwd.dims));
  WorkspaceCarver carver(workspace, workspace_bytes);
  const detail::RowMaskScratch scratch = detail::carve_row_mask(carver, p.fwd.dims);
  if (!carver.fits()) return Status::workspace_too_small;
  const UnpermuteParams<T, Acc>& f = p.fwd;
  const Dims& d = f.dims;
  const uint8_t* used = nullptr;
  if (detail::needs_row_mask(d, p.expert_offsets)) {
    MOXE_RETURN_IF_ERROR(detail::mark_used_rows(d, f.row_map, scratch.used, stream));
    used = scratch.used;
  }
  const int64_t rows = permuted_rows(d);
  const auto kernel = detail::rows_vectorizable<T>(d.hidden, {p.dy, f.yp, p.dyp})
                          ? detail::unpermute_backward_kernel<T, true>
                          : detail::unpermute_backward_kernel<T, false>;
  MOXE_RETURN_IF_ERROR(launch_kernel(kernel, detail::scatter_grid(d), detail::kRowThreads, 0, stream, p.dy, f.yp,
                                     f.row_map, f.weight, p.expert_offsets, used, d.tokens, d.hidden, d.experts,
                                     d.top_k, rows, p.dyp, p.dweight));
  return check_launch(stream);
}

}  // namespace moxe::dispatch
