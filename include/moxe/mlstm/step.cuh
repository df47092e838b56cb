// moxe::mlstm::step: one decoding step of the mLSTM cell for a batch of heads, the states
// (C, n, m) updated in place. Same math as the recurrent definition (docs/mlstm.md) and as
// reference::step, from the same scalar functions (detail/cell.hpp).
//
// One block per (batch, head). The state update is memory bound (every element of C is read
// and written once), so the kernel is laid out for coalesced access to C and nothing more:
// threads own (row group, column) pairs of C, q and k sit in shared memory, and the two
// reductions (n . qs over DQK, C^T qs over row groups) are combined in a fixed order, so the
// result is deterministic.
#pragma once

#include <cuda_runtime.h>

#include <climits>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "moxe/core/config.hpp"
#include "moxe/core/launch.cuh"
#include "moxe/core/math.hpp"
#include "moxe/core/numeric.cuh"
#include "moxe/core/reduce.cuh"
#include "moxe/core/status.hpp"
#include "moxe/mlstm/detail/cell.hpp"
#include "moxe/mlstm/params.hpp"

namespace moxe::mlstm {

namespace detail {

/// Launch shape and head-dimension limits of the step kernel (the family's device limits).
struct StepKernelTraits {
  static constexpr int kThreads = 256;
  static constexpr int kMaxHeadDim = 256;
  static constexpr int kHeadDimMultiple = 16;
  static constexpr int kRowsInFlight = 4;  // rows of C each thread loads before storing

  static constexpr bool head_dim_supported(int64_t d) {
    return d > 0 && d <= kMaxHeadDim && d % kHeadDimMultiple == 0;
  }
};

template <class T>
__global__ void __launch_bounds__(StepKernelTraits::kThreads)
    step_kernel(const StepParams<T, float> p, const float scale) {
  constexpr int kThreads = StepKernelTraits::kThreads;
  using Reduce = BlockAllReduce<float, kThreads>;
  __shared__ float qs_shared[StepKernelTraits::kMaxHeadDim];
  __shared__ float k_shared[StepKernelTraits::kMaxHeadDim];
  __shared__ float partial_num[kThreads];  // [row group][column] partial sums of C^T qs
  __shared__ typename Reduce::TempStorage reduce_storage;

  const int tid = static_cast<int>(threadIdx.x);
  const int dqk = static_cast<int>(p.dqk), dv = static_cast<int>(p.dv);
  const int64_t slot = blockIdx.x;
  const T* q = p.q + slot * dqk;
  const T* k = p.k + slot * dqk;
  const T* v = p.v + slot * dv;
  float* n = p.n + slot * dqk;
  float* c = p.c + slot * dqk * dv;

  for (int a = tid; a < dqk; a += kThreads) {
    qs_shared[a] = to_float(q[a]) * scale;
    k_shared[a] = to_float(k[a]);
  }
  // Every thread reads m before the barriers below; thread 0 overwrites it at the end.
  const GateStep<float> g = gate_step(to_float(p.igate[slot]), to_float(p.fgate[slot]), p.m[slot]);
  __syncthreads();

  // n = f_scale n + i_scale k, and n . qs
  float nq = 0.f;
  for (int a = tid; a < dqk; a += kThreads) {
    const float na = g.f_scale * n[a] + g.i_scale * k_shared[a];
    n[a] = na;
    nq += na * qs_shared[a];
  }
  nq = Reduce(reduce_storage).sum(nq);

  // C = f_scale C + i_scale k v^T, and per row group the partial C^T qs
  const int groups = kThreads / dv;
  const int group = tid / dv, col = tid % dv;
  if (group < groups) {
    const float vj = to_float(v[col]);
    float* c_col = c + col;
    float num = 0.f;
    int a = group;
    // kRows loads in flight before the stores: the compiler cannot hoist a load of C above
    // the previous row's store by itself (it cannot tell that the rows differ).
    constexpr int kRows = StepKernelTraits::kRowsInFlight;
    for (; a + (kRows - 1) * groups < dqk; a += kRows * groups) {
      float old[kRows];
      MOXE_PRAGMA_UNROLL
      for (int u = 0; u < kRows; ++u) old[u] = c_col[static_cast<int64_t>(a + u * groups) * dv];
      MOXE_PRAGMA_UNROLL
      for (int u = 0; u < kRows; ++u) {
        const int row = a + u * groups;
        const float value = g.f_scale * old[u] + g.i_scale * k_shared[row] * vj;
        c_col[static_cast<int64_t>(row) * dv] = value;
        num += value * qs_shared[row];
      }
    }
    for (; a < dqk; a += groups) {
      const float value = g.f_scale * c_col[static_cast<int64_t>(a) * dv] + g.i_scale * k_shared[a] * vj;
      c_col[static_cast<int64_t>(a) * dv] = value;
      num += value * qs_shared[a];
    }
    partial_num[tid] = num;
  }
  __syncthreads();

  if (tid < dv) {
    float num = partial_num[tid];
    for (int gr = 1; gr < groups; ++gr) num += partial_num[gr * dv + tid];
    p.h[slot * dv + tid] = from_float<T>(num * normaliser(nq, g.m, p.eps).inv_den);
  }
  if (tid == 0) p.m[slot] = g.m;
}

}  // namespace detail

/// Scratch the step needs: none (0). Reads only the sizes in `p`.
template <class T, class Acc>
std::size_t step_workspace_size(const StepParams<T, Acc>& p) {
  (void)p;
  return 0;
}

/// One decoding step: h [B, NH, DV] from q, k, v, the gates and the states, which are
/// updated in place. T in {float, __half, __nv_bfloat16}, Acc = float. Device limits: DQK and
/// DV multiples of 16 up to 256 (Status::unsupported otherwise).
template <class T, class Acc>
Status step(const StepParams<T, Acc>& p, void* workspace, std::size_t workspace_bytes,
            cudaStream_t stream) {
  static_assert(is_device_element_v<T>, "step: T must be float, __half or __nv_bfloat16");
  static_assert(std::is_same_v<Acc, float>, "step: device states are float");
  (void)workspace;
  MOXE_RETURN_IF_ERROR(validate(p));
  if (!detail::StepKernelTraits::head_dim_supported(p.dqk) ||
      !detail::StepKernelTraits::head_dim_supported(p.dv))
    return Status::unsupported;
  if (p.batch > INT_MAX / p.heads) return Status::unsupported;  // one block per (b, head)
  if (workspace_bytes < step_workspace_size(p)) return Status::workspace_too_small;

  const float scale = effective_qk_scale(p.qk_scale, p.dqk);
  const auto blocks = static_cast<unsigned>(p.batch * p.heads);
  MOXE_RETURN_IF_ERROR(
      launch_kernel(detail::step_kernel<T>, blocks, detail::StepKernelTraits::kThreads, 0, stream, p, scale));
  return check_launch(stream);
}

}  // namespace moxe::mlstm
