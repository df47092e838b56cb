// moxe::router: softmax + normalised entropy on the device, forward and backward, on its
// own (the fused gate computes the same per token). One pass over each token's logits.
//
//   p = softmax(z), lse = logsumexp(z), entropy = -sum_e p_e log(max(p_e, 1e-6)) / log E
//   dz_e = p_e (g_e - <p, g>) + dlse p_e,  g_e = dp_e + dentropy dH/dp_e
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "moxe/core/launch.cuh"
#include "moxe/core/math.hpp"
#include "moxe/core/numeric.cuh"
#include "moxe/core/status.hpp"
#include "moxe/router/detail/gate_math.hpp"
#include "moxe/router/detail/lane_group.cuh"
#include "moxe/router/params.hpp"

namespace moxe::router {

namespace detail {

inline constexpr int kRowWarps = 8;
inline constexpr int kRowThreads = kRowWarps * kWarpSize;

inline int row_grid(int64_t tokens, int experts, int warps) {
  const int64_t per_block = int64_t(warps) * (kWarpSize / row_lanes(experts));
  const int64_t b = (tokens + per_block - 1) / per_block;
  constexpr int64_t kMaxGrid = int64_t(1) << 16;  // the kernels loop over the rest
  return static_cast<int>(b < kMaxGrid ? b : kMaxGrid);
}

template <class T, int kLanes, int kPerLane>
MOXE_DEVICE MOXE_FORCEINLINE float load_row_lse(const LaneGroup<kLanes>& g, const T* row, int experts, bool valid,
                                                float (&v)[kPerLane]) {
  math::MaxSum<float> ms;
  MOXE_PRAGMA_UNROLL
  for (int j = 0; j < kPerLane; ++j) {
    const int e = g.element(j);
    v[j] = (valid && e < experts) ? to_float(row[e]) : -math::infinity<float>();
    ms.add(v[j]);
  }
  return g.merge(ms).log_sum_exp();
}

template <class T, int kLanes, int kPerLane>
__global__ void __launch_bounds__(kRowThreads)
    softmax_entropy_forward_kernel(const __grid_constant__ SoftmaxEntropyParams<T, float> p) {
  using Group = LaneGroup<kLanes>;
  const Group g;
  const int warp = threadIdx.x / kWarpSize;
  const int E = p.dims.experts;
  const int64_t T_ = p.dims.tokens;
  const float inv_log = inv_log_experts<float>(E);
  const int64_t step = int64_t(gridDim.x) * kRowWarps * Group::kGroups;
  for (int64_t base = (int64_t(blockIdx.x) * kRowWarps + warp) * Group::kGroups; base < T_; base += step) {
    const int64_t t = base + g.group;
    const bool valid = t < T_;
    float v[kPerLane];
    const float lse = load_row_lse<T, kLanes, kPerLane>(g, p.logits + (valid ? t : 0) * E, E, valid, v);
    float h = 0.f;
    MOXE_PRAGMA_UNROLL
    for (int j = 0; j < kPerLane; ++j) {
      const int e = g.element(j);
      if (!valid || e >= E) continue;
      const float log_q = v[j] - lse;
      const float q = math::exp(log_q);
      h += entropy_term_log(q, log_q);
      if (p.probs != nullptr) p.probs[t * E + e] = q;
    }
    h = g.sum(h) * inv_log;
    if (valid && g.lane == 0) {
      if (p.lse != nullptr) p.lse[t] = lse;
      if (p.entropy != nullptr) p.entropy[t] = h;
    }
  }
}

template <class T, int kLanes, int kPerLane>
__global__ void __launch_bounds__(kRowThreads)
    softmax_entropy_backward_kernel(const __grid_constant__ SoftmaxEntropyBackwardParams<T, float> b) {
  using Group = LaneGroup<kLanes>;
  const Group g;
  const int warp = threadIdx.x / kWarpSize;
  const int E = b.fwd.dims.experts;
  const int64_t T_ = b.fwd.dims.tokens;
  const float inv_log = inv_log_experts<float>(E);
  const int64_t step = int64_t(gridDim.x) * kRowWarps * Group::kGroups;
  for (int64_t base = (int64_t(blockIdx.x) * kRowWarps + warp) * Group::kGroups; base < T_; base += step) {
    const int64_t t = base + g.group;
    const bool valid = t < T_;
    float v[kPerLane], gr[kPerLane];
    const float lse = load_row_lse<T, kLanes, kPerLane>(g, b.fwd.logits + (valid ? t : 0) * E, E, valid, v);
    const float dh = (valid && b.dentropy != nullptr) ? b.dentropy[t] * inv_log : 0.f;
    const float dlse = (valid && b.dlse != nullptr) ? b.dlse[t] : 0.f;
    float dot = 0.f;
    MOXE_PRAGMA_UNROLL
    for (int j = 0; j < kPerLane; ++j) {
      const int e = g.element(j);
      const bool live = valid && e < E;
      const float log_q = v[j] - lse;
      v[j] = live ? math::exp(log_q) : 0.f;  // the logit until here, the probability from now on
      gr[j] = 0.f;
      if (!live) continue;
      gr[j] = (b.dprobs != nullptr ? b.dprobs[t * E + e] : 0.f) + dh * entropy_term_grad_log(v[j], log_q);
      dot += v[j] * gr[j];
    }
    dot = g.sum(dot);
    if (!valid) continue;
    MOXE_PRAGMA_UNROLL
    for (int j = 0; j < kPerLane; ++j) {
      const int e = g.element(j);
      if (e < E) b.dlogits[t * E + e] = from_float<T>(softmax_grad(v[j], gr[j], dot, dlse));
    }
  }
}

}  // namespace detail

template <class T>
std::size_t softmax_entropy_forward_workspace_size(const SoftmaxEntropyParams<T, float>&) { return 0; }

template <class T>
Status softmax_entropy_forward(const SoftmaxEntropyParams<T, float>& p, void* workspace, std::size_t workspace_bytes,
                               cudaStream_t stream) {
  static_assert(is_device_element_v<T>, "logits must be float, __half or __nv_bfloat16");
  (void)workspace;
  (void)workspace_bytes;
  MOXE_RETURN_IF_ERROR(validate(p));
  if (p.dims.experts > kMaxExperts) return Status::unsupported;
  const int grid = detail::row_grid(p.dims.tokens, p.dims.experts, detail::kRowWarps);
  return detail::dispatch_row_shape(p.dims.experts, [&](auto shape) {
    using S = decltype(shape);
    MOXE_RETURN_IF_ERROR(launch_kernel(detail::softmax_entropy_forward_kernel<T, S::kLanes, S::kPerLane>, grid,
                                       detail::kRowThreads, 0, stream, p));
    return check_launch(stream);
  });
}

template <class T>
std::size_t softmax_entropy_backward_workspace_size(const SoftmaxEntropyBackwardParams<T, float>&) { return 0; }

template <class T>
Status softmax_entropy_backward(const SoftmaxEntropyBackwardParams<T, float>& b, void* workspace,
                                std::size_t workspace_bytes, cudaStream_t stream) {
  static_assert(is_device_element_v<T>, "logits must be float, __half or __nv_bfloat16");
  (void)workspace;
  (void)workspace_bytes;
  MOXE_RETURN_IF_ERROR(validate(b));
  if (b.fwd.dims.experts > kMaxExperts) return Status::unsupported;
  const int grid = detail::row_grid(b.fwd.dims.tokens, b.fwd.dims.experts, detail::kRowWarps);
  return detail::dispatch_row_shape(b.fwd.dims.experts, [&](auto shape) {
    using S = decltype(shape);
    MOXE_RETURN_IF_ERROR(launch_kernel(detail::softmax_entropy_backward_kernel<T, S::kLanes, S::kPerLane>, grid,
                                       detail::kRowThreads, 0, stream, b));
    return check_launch(stream);
  });
}

}  // namespace moxe::router
