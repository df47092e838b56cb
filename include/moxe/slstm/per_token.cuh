// moxe::slstm::per_token_forward / per_token_backward: every (step, batch) position of
// [S, B] its own length-1 sequence from the zero state (per_token.hpp has the math and the
// reference).
//
//   std::size_t per_token_forward_workspace_size(const ForwardParams<T, float>&);   // 0
//   Status per_token_forward(const ForwardParams<T, float>&, void* ws, std::size_t bytes,
//                            cudaStream_t);
//   std::size_t per_token_backward_workspace_size(const BackwardParams<T, float>&);
//   Status per_token_backward(const BackwardParams<T, float>&, void* ws, std::size_t bytes,
//                             cudaStream_t);
//
// T in {float, __half, __nv_bfloat16}; arithmetic in float. Any NH, DH. No states
// (Status::unsupported). Pointwise and memory bound: the forward reads wx and writes y, the
// backward reads wx and dy and writes dwx, then dbias from per-chunk partial sums added in
// chunk order (deterministic) and dr = 0 (cudaMemsetAsync). r is never read. No
// allocation, no synchronisation.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "moxe/core/config.hpp"
#include "moxe/core/launch.cuh"
#include "moxe/core/numeric.cuh"
#include "moxe/core/status.hpp"
#include "moxe/core/workspace.hpp"
#include "moxe/slstm/detail/cell.hpp"
#include "moxe/slstm/detail/kernels.cuh"
#include "moxe/slstm/params.hpp"
#include "moxe/slstm/per_token.hpp"

namespace moxe::slstm {

namespace detail {

inline constexpr int kPerTokenThreads = 256;
inline constexpr int64_t kPerTokenMaxBlocks = int64_t(1) << 20;
inline constexpr int64_t kPerTokenMaxChunks = 256;  // rows of dbias partials at most

/// The raw gates of unit u at position r (wx [positions, 4, H], bias [4, H]).
template <class T>
MOXE_DEVICE MOXE_FORCEINLINE GatesRaw<float> per_token_raw(const T* __restrict__ wx, const T* __restrict__ bias,
                                                           int64_t r, int64_t u, int64_t H) {
  const T* w = wx + r * 4 * H + u;
  return per_token_gates(to_float(w[0]), to_float(w[H]), to_float(w[2 * H]), to_float(w[3 * H]), to_float(bias[u]),
                         to_float(bias[H + u]), to_float(bias[2 * H + u]), to_float(bias[3 * H + u]));
}

template <class T>
__global__ void __launch_bounds__(kPerTokenThreads)
    per_token_forward_kernel(const __grid_constant__ ForwardParams<T, float> p, int64_t H, int64_t count) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += stride) {
    const int64_t r = i / H, u = i % H;
    p.y[i] = from_float<T>(cell_forward(per_token_raw(p.wx, p.bias, r, u, H), 0.f, 0.f, 0.f).y);
  }
}

/// Chunks of positions for the dbias partials: each (unit, chunk) thread walks its chunk's
/// rows in order.
struct PerTokenChunks {
  int64_t chunks, rows_per_chunk;
};

inline PerTokenChunks per_token_chunks(int64_t positions) {
  const int64_t chunks = positions < kPerTokenMaxChunks ? positions : kPerTokenMaxChunks;
  return {chunks, (positions + chunks - 1) / chunks};
}

/// dwx of every position, and partial[chunk][g * H + u] = the chunk's sum of dgates_g of
/// unit u. Grid (units / threads, chunks).
template <class T>
__global__ void __launch_bounds__(kPerTokenThreads)
    per_token_backward_kernel(const __grid_constant__ BackwardParams<T, float> b, int64_t H, int64_t positions,
                              int64_t rows_per_chunk, float* __restrict__ partial) {
  const int64_t u = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (u >= H) return;
  const int64_t chunk = blockIdx.y, r0 = chunk * rows_per_chunk;
  const int64_t r1 = r0 + rows_per_chunk < positions ? r0 + rows_per_chunk : positions;
  float sum[4] = {0.f, 0.f, 0.f, 0.f};
  for (int64_t r = r0; r < r1; ++r) {
    const GatesRaw<float> g = per_token_raw(b.fwd.wx, b.fwd.bias, r, u, H);
    const CellGrad<float> cg = cell_backward(g, 0.f, 0.f, 0.f, to_float(b.dy[r * H + u]), 0.f, 0.f, 0.f);
    const float dg[4] = {cg.d.i, cg.d.f, cg.d.z, cg.d.o};
    MOXE_PRAGMA_UNROLL
    for (int gate = 0; gate < 4; ++gate) {
      b.dwx[r * 4 * H + gate * H + u] = from_float<T>(dg[gate]);
      sum[gate] += dg[gate];
    }
  }
  MOXE_PRAGMA_UNROLL
  for (int gate = 0; gate < 4; ++gate) partial[chunk * 4 * H + gate * H + u] = sum[gate];
}

inline float* carve_per_token_partials(WorkspaceCarver& c, const Dims& d) {
  const PerTokenChunks k = per_token_chunks(d.seq_len * d.batch);
  return c.carve<float>(static_cast<std::size_t>(k.chunks * 4 * hidden(d)));
}

}  // namespace detail

/// Scratch of the per-token forward: none (0).
template <class T, class Acc>
std::size_t per_token_forward_workspace_size(const ForwardParams<T, Acc>& p) {
  (void)p;
  return 0;
}

/// Scratch of the per-token backward: the dbias partials (at most 256 rows of 4 * NH * DH
/// floats). Reads only the sizes in `b`.
template <class T, class Acc>
std::size_t per_token_backward_workspace_size(const BackwardParams<T, Acc>& b) {
  const Dims& d = b.fwd.dims;
  if (d.seq_len <= 0 || d.batch <= 0 || d.heads <= 0 || d.head_dim <= 0) return 0;
  WorkspaceCarver c;
  detail::carve_per_token_partials(c, b.fwd.dims);
  return c.required_bytes();
}

/// y [S, B, NH, DH]: every (t, b) a length-1 sequence from the zero state.
template <class T, class Acc>
Status per_token_forward(const ForwardParams<T, Acc>& p, void* workspace, std::size_t workspace_bytes,
                         cudaStream_t stream) {
  static_assert(is_device_element_v<T>, "per_token_forward: T must be float, __half or __nv_bfloat16");
  static_assert(std::is_same_v<Acc, float>, "per_token_forward: the device computes in float");
  (void)workspace;
  (void)workspace_bytes;
  MOXE_RETURN_IF_ERROR(validate_per_token(p, /*need_y=*/true));
  const int64_t H = hidden(p.dims), count = p.dims.seq_len * p.dims.batch * H;
  int64_t blocks = ceil_div<int64_t>(count, detail::kPerTokenThreads);
  if (blocks > detail::kPerTokenMaxBlocks) blocks = detail::kPerTokenMaxBlocks;
  MOXE_RETURN_IF_ERROR(launch_kernel(detail::per_token_forward_kernel<T>, static_cast<unsigned>(blocks),
                                     detail::kPerTokenThreads, 0, stream, p, H, count));
  return check_launch(stream);
}

/// dwx, dbias, dr (= 0) of per_token_forward (the exact gradient; y is not read).
template <class T, class Acc>
Status per_token_backward(const BackwardParams<T, Acc>& b, void* workspace, std::size_t workspace_bytes,
                          cudaStream_t stream) {
  static_assert(is_device_element_v<T>, "per_token_backward: T must be float, __half or __nv_bfloat16");
  static_assert(std::is_same_v<Acc, float>, "per_token_backward: the device computes in float");
  MOXE_RETURN_IF_ERROR(validate_per_token(b));
  const Dims& d = b.fwd.dims;
  if (ceil_div<int64_t>(hidden(d), detail::kPerTokenThreads) > 65535) return Status::unsupported;
  if (workspace_bytes < per_token_backward_workspace_size(b)) return Status::workspace_too_small;
  WorkspaceCarver c(workspace, workspace_bytes);
  float* partial = detail::carve_per_token_partials(c, d);
  if (!c.fits()) return Status::workspace_too_small;
  const int64_t H = hidden(d), positions = d.seq_len * d.batch;
  const detail::PerTokenChunks k = detail::per_token_chunks(positions);
  MOXE_CUDA_TRY(cudaMemsetAsync(b.dr, 0, sizeof(T) * static_cast<std::size_t>(d.heads * 4 * d.head_dim * d.head_dim),
                                stream));
  const dim3 grid(static_cast<unsigned>(ceil_div<int64_t>(H, detail::kPerTokenThreads)),
                  static_cast<unsigned>(k.chunks));
  MOXE_RETURN_IF_ERROR(launch_kernel(detail::per_token_backward_kernel<T>, grid, detail::kPerTokenThreads, 0, stream, b,
                                     H, positions, k.rows_per_chunk, partial));
  const int64_t count = 4 * H;
  MOXE_RETURN_IF_ERROR(launch_kernel(detail::sum_partials_kernel<T>,
                                     static_cast<unsigned>(ceil_div<int64_t>(count, 256)), 256, 0, stream, partial,
                                     k.chunks, count, b.dbias));
  return check_launch(stream);
}

}  // namespace moxe::slstm
