// moxe::router::variants: the backward shared by every variant whose weights are the
// chosen probabilities renormalised (top-p, group-restricted): w = p / sum(p chosen) is
// the softmax of the chosen logits alone, so the kernel reads only those (k <= 32 per
// token) and writes dz = w (dw - <w, dw>) on them, zero elsewhere.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "moxe/core/launch.cuh"
#include "moxe/core/status.hpp"
#include "moxe/router/variants/detail/device.cuh"
#include "moxe/router/variants/detail/variant_math.hpp"

namespace moxe::router::variants::detail {

/// One token per group of lanes; the chosen (<= 32) slots in shared memory.
template <class T, int kLanes, int kPerLane>
__global__ void __launch_bounds__(kRowThreads, kRowMinBlocks)
    renormalised_backward_kernel(const int32_t* topk_idx, const T* logits, const float* dweight, int64_t tokens,
                                 int experts, int k, T* dlogits) {
  const LaneGroup<kLanes> g;
  __shared__ SlotStorage<LaneGroup<kLanes>::kGroups> slot_storage;
  const TopKSlots grad = slot_storage.of(g.group);  // per chosen slot: dz and the expert
  for_each_token(g, tokens, [&](int64_t t, bool valid) {
    if (valid) {
      // w = softmax of the chosen logits: every lane computes it (k <= 32 reads, cached)
      const int32_t* idx = topk_idx + t * k;
      const T* row = logits + t * experts;
      float m = -math::infinity<float>();
      for (int r = 0; r < k; ++r)
        if (idx[r] >= 0 && idx[r] < experts) m = math::max(m, to_float(row[idx[r]]));
      float sum = 0.f;
      for (int r = 0; r < k; ++r)
        if (idx[r] >= 0 && idx[r] < experts) sum += math::exp(to_float(row[idx[r]]) - m);
      const float inv = 1.f / sum;
      float w_dot = 0.f;
      for (int r = 0; r < k; ++r)
        if (idx[r] >= 0 && idx[r] < experts) w_dot += math::exp(to_float(row[idx[r]]) - m) * inv * dweight[t * k + r];
      for (int r = g.lane; r < k; r += kLanes) {
        const bool ok = idx[r] >= 0 && idx[r] < experts;
        const float w = ok ? math::exp(to_float(row[idx[r]]) - m) * inv : 0.f;
        grad.value[r] = ok ? renormalised_softmax_grad(w, dweight[t * k + r], w_dot) : 0.f;
        grad.index[r] = ok ? idx[r] : -1;
      }
    }
    __syncwarp();
    if (valid) write_sparse_row<T, kLanes, kPerLane>(g, grad.value, grad.index, k, experts, dlogits + t * experts);
    __syncwarp();
  });
}

/// Launches the renormalised backward for any row shape.
template <class T>
Status launch_renormalised_backward(const int32_t* idx, const T* logits, const float* dweight, int64_t tokens,
                                    int experts, int k, T* dlogits, cudaStream_t stream) {
  return launch_rows(token_grid(tokens, experts, false), experts, stream, [](auto shape) {
    return renormalised_backward_kernel<T, decltype(shape)::kLanes, decltype(shape)::kPerLane>;
  }, idx, logits, dweight, tokens, experts, k, dlogits);
}

}  // namespace moxe::router::variants::detail
