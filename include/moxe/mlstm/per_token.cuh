// moxe::mlstm::per_token_forward / per_token_backward: every position of [B, NH, S] its own
// length-1 sequence from the zero state (per_token.hpp has the math and the reference).
//
//   std::size_t per_token_workspace_size(const ForwardParams<T, float>&);   // 0
//   Status per_token_forward(const ForwardParams<T, float>&, void* ws, std::size_t bytes,
//                            cudaStream_t);
//   Status per_token_backward(const BackwardParams<T, float>&, void* ws, std::size_t bytes,
//                             cudaStream_t);
//
// T in {float, __half, __nv_bfloat16}; arithmetic in float. Any DQK, DV >= 1. No initial or
// final states and no segments (Status::unsupported). One warp per (position, head): the
// dot products are warp sums in a fixed order, so the results are deterministic; memory
// bound (q, k, v read once, h written once; the backward also reads dh). No workspace, no
// allocation, no synchronisation.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "moxe/core/config.hpp"
#include "moxe/core/launch.cuh"
#include "moxe/core/numeric.cuh"
#include "moxe/core/reduce.cuh"
#include "moxe/core/status.hpp"
#include "moxe/mlstm/params.hpp"
#include "moxe/mlstm/per_token.hpp"

namespace moxe::mlstm {

namespace detail {

inline constexpr int kPerTokenThreads = 256;
inline constexpr int kPerTokenWarps = kPerTokenThreads / kWarpSize;
inline constexpr int64_t kPerTokenMaxBlocks = int64_t(1) << 20;  // grid-stride beyond this

/// s = k . qs over the warp (every lane gets it).
template <class T>
MOXE_DEVICE MOXE_FORCEINLINE float per_token_dot(const T* __restrict__ a, const T* __restrict__ b, int64_t n,
                                                 int lane) {
  float acc = 0.f;
  for (int64_t j = lane; j < n; j += kWarpSize) acc += to_float(a[j]) * to_float(b[j]);
  return warp_sum(acc);
}

template <class T>
__global__ void __launch_bounds__(kPerTokenThreads)
    per_token_forward_kernel(const __grid_constant__ ForwardParams<T, float> p, float scale, int64_t rows) {
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int64_t dqk = p.dims.dqk, dv = p.dims.dv;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kPerTokenWarps;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kPerTokenWarps + threadIdx.x / kWarpSize; r < rows;
       r += stride) {
    const float s = per_token_dot(p.q + r * dqk, p.k + r * dqk, dqk, lane) * scale;
    const auto f = per_token_scalars(to_float(p.igate[r]), to_float(p.fgate[r]), s, p.eps);
    const T* v = p.v + r * dv;
    T* h = p.h + r * dv;
    for (int64_t e = lane; e < dv; e += kWarpSize) h[e] = from_float<T>(f.h_scale * to_float(v[e]));
  }
}

template <class T>
__global__ void __launch_bounds__(kPerTokenThreads)
    per_token_backward_kernel(const __grid_constant__ BackwardParams<T, float> b, float scale, int64_t rows) {
  const ForwardParams<T, float>& p = b.fwd;
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int64_t dqk = p.dims.dqk, dv = p.dims.dv;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kPerTokenWarps;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kPerTokenWarps + threadIdx.x / kWarpSize; r < rows;
       r += stride) {
    const T* q = p.q + r * dqk;
    const T* k = p.k + r * dqk;
    const T* v = p.v + r * dv;
    const T* dh = b.dh + r * dv;
    const float s = per_token_dot(q, k, dqk, lane) * scale;
    const float g = per_token_dot(dh, v, dv, lane);
    const auto gr = per_token_grad(to_float(p.igate[r]), to_float(p.fgate[r]), s, g, p.eps);
    const float ds_scaled = gr.ds * scale;
    for (int64_t j = lane; j < dqk; j += kWarpSize) {
      b.dq[r * dqk + j] = from_float<T>(ds_scaled * to_float(k[j]));
      b.dk[r * dqk + j] = from_float<T>(ds_scaled * to_float(q[j]));
    }
    for (int64_t e = lane; e < dv; e += kWarpSize) b.dv[r * dv + e] = from_float<T>(gr.h_scale * to_float(dh[e]));
    if (lane == 0) {
      b.digate[r] = from_float<T>(gr.digate);
      b.dfgate[r] = from_float<T>(gr.dfgate);
    }
  }
}

inline unsigned per_token_blocks(int64_t rows) {
  int64_t blocks = ceil_div<int64_t>(rows, kPerTokenWarps);
  if (blocks > kPerTokenMaxBlocks) blocks = kPerTokenMaxBlocks;
  return static_cast<unsigned>(blocks);
}

}  // namespace detail

/// Scratch the per-token path needs: none (0).
template <class T, class Acc>
std::size_t per_token_workspace_size(const ForwardParams<T, Acc>& p) {
  (void)p;
  return 0;
}

/// h [B, NH, S, DV]: every (b, head, s) a length-1 sequence from the zero state.
template <class T, class Acc>
Status per_token_forward(const ForwardParams<T, Acc>& p, void* workspace, std::size_t workspace_bytes,
                         cudaStream_t stream) {
  static_assert(is_device_element_v<T>, "per_token_forward: T must be float, __half or __nv_bfloat16");
  static_assert(std::is_same_v<Acc, float>, "per_token_forward: the device computes in float");
  (void)workspace;
  (void)workspace_bytes;
  MOXE_RETURN_IF_ERROR(validate_per_token(p, /*need_h=*/true));
  const int64_t rows = p.dims.batch * p.dims.heads * p.dims.seq_len;
  MOXE_RETURN_IF_ERROR(launch_kernel(detail::per_token_forward_kernel<T>, detail::per_token_blocks(rows),
                                     detail::kPerTokenThreads, 0, stream, p, effective_qk_scale(p.qk_scale, p.dims.dqk),
                                     rows));
  return check_launch(stream);
}

/// dq, dk, dv, digate, dfgate of per_token_forward (the exact gradient; h is not read).
template <class T, class Acc>
Status per_token_backward(const BackwardParams<T, Acc>& b, void* workspace, std::size_t workspace_bytes,
                          cudaStream_t stream) {
  static_assert(is_device_element_v<T>, "per_token_backward: T must be float, __half or __nv_bfloat16");
  static_assert(std::is_same_v<Acc, float>, "per_token_backward: the device computes in float");
  (void)workspace;
  (void)workspace_bytes;
  MOXE_RETURN_IF_ERROR(validate_per_token(b));
  const int64_t rows = b.fwd.dims.batch * b.fwd.dims.heads * b.fwd.dims.seq_len;
  MOXE_RETURN_IF_ERROR(launch_kernel(detail::per_token_backward_kernel<T>, detail::per_token_blocks(rows),
                                     detail::kPerTokenThreads, 0, stream, b,
                                     effective_qk_scale(b.fwd.qk_scale, b.fwd.dims.dqk), rows));
  return check_launch(stream);
}

}  // namespace moxe::mlstm
