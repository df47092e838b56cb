// moxe: warp and block reductions used by the kernels. All are deterministic: the
// combination order is fixed by lane and warp index, never by timing.
#pragma once

#include <cuda_runtime.h>

#include "moxe/core/config.hpp"
#include "moxe/core/math.hpp"
#include "moxe/core/warp.hpp"  // kWarpSize, kFullMask, SumOp, MaxOp, MinOp

namespace moxe {

/// Butterfly all-reduce over the warp (every lane gets the result).
template <class A, class Op>
MOXE_DEVICE MOXE_FORCEINLINE A warp_allreduce(A x, Op op) {
  MOXE_PRAGMA_UNROLL
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) x = op(x, __shfl_xor_sync(kFullMask, x, offset));
  return x;
}

template <class A>
MOXE_DEVICE MOXE_FORCEINLINE A warp_sum(A x) { return warp_allreduce(x, SumOp{}); }

template <class A>
MOXE_DEVICE MOXE_FORCEINLINE A warp_max(A x) { return warp_allreduce(x, MaxOp{}); }

/// Warp all-reduce of an online-softmax state.
template <class A>
MOXE_DEVICE MOXE_FORCEINLINE math::MaxSum<A> warp_merge(math::MaxSum<A> s) {
  MOXE_PRAGMA_UNROLL
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    math::MaxSum<A> o;
    o.max = __shfl_xor_sync(kFullMask, s.max, offset);
    o.sum = __shfl_xor_sync(kFullMask, s.sum, offset);
    s = math::MaxSum<A>::merge(s, o);
  }
  return s;
}

/// Block-wide all-reduce for a block of kThreads threads (a multiple of 32). The caller
/// provides TempStorage in shared memory; the call contains the barriers it needs and can be
/// repeated with the same storage.
template <class A, int kThreads>
struct BlockAllReduce {
  static_assert(kThreads % kWarpSize == 0 && kThreads <= 1024, "block size must be whole warps");
  static constexpr int kWarps = kThreads / kWarpSize;
  struct TempStorage {
    A warp_values[kWarps];
  };

  MOXE_DEVICE explicit BlockAllReduce(TempStorage& storage) : storage_(storage) {}

  template <class Op>
  MOXE_DEVICE A reduce(A x, Op op) {
    const int lane = threadIdx.x % kWarpSize;
    const int warp = threadIdx.x / kWarpSize;
    x = warp_allreduce(x, op);
    __syncthreads();  // storage may still be read by a previous call
    if (lane == 0) storage_.warp_values[warp] = x;
    __syncthreads();
    A r = storage_.warp_values[0];
    MOXE_PRAGMA_UNROLL
    for (int w = 1; w < kWarps; ++w) r = op(r, storage_.warp_values[w]);
    return r;
  }

  MOXE_DEVICE A sum(A x) { return reduce(x, SumOp{}); }
  MOXE_DEVICE A max(A x) { return reduce(x, MaxOp{}); }

 private:
  TempStorage& storage_;
};

}  // namespace moxe
