// moxe: the warp's size and the reduction operators of the warp and block reductions.
// Plain C++ (no CUDA header), so that host code can use them too: the references, and host
// tests that run lane-group code over an emulated warp.
#pragma once

#include "moxe/core/config.hpp"
#include "moxe/core/math.hpp"

namespace moxe {

inline constexpr int kWarpSize = 32;
inline constexpr unsigned kFullMask = 0xffffffffu;

struct SumOp {
  template <class A>
  MOXE_HD MOXE_FORCEINLINE A operator()(A a, A b) const { return a + b; }
};
struct MaxOp {
  template <class A>
  MOXE_HD MOXE_FORCEINLINE A operator()(A a, A b) const { return math::max(a, b); }
};
struct MinOp {
  template <class A>
  MOXE_HD MOXE_FORCEINLINE A operator()(A a, A b) const { return math::min(a, b); }
};

}  // namespace moxe
