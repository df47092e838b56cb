// moxe: compile-time configuration shared by host and device code.
#pragma once

#include <cstddef>
#include <cstdint>

#define MOXE_VERSION_MAJOR 0
#define MOXE_VERSION_MINOR 1
#define MOXE_VERSION_PATCH 0

// MOXE_HD marks scalar functions that the host references and the device kernels share,
// so both compute the same arithmetic from one definition.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define MOXE_HD __host__ __device__
#define MOXE_DEVICE __device__
#define MOXE_HOST __host__
#define MOXE_FORCEINLINE __forceinline__
#define MOXE_CUDA_COMPILER 1
#else
#define MOXE_HD
#define MOXE_DEVICE
#define MOXE_HOST
#define MOXE_FORCEINLINE inline __attribute__((always_inline))
#define MOXE_CUDA_COMPILER 0
#endif

// True while compiling device code (the __CUDA_ARCH__ pass of nvcc).
#if defined(__CUDA_ARCH__)
#define MOXE_DEVICE_PASS 1
#else
#define MOXE_DEVICE_PASS 0
#endif

#if defined(__CUDA_ARCH__) || defined(__clang__) || defined(__GNUC__)
#define MOXE_RESTRICT __restrict__
#else
#define MOXE_RESTRICT
#endif

// Full unrolling in device code (nvcc's device pass) and under clang; host compilers
// without the pragma (g++, also as nvcc's host pass over MOXE_HD code) get nothing rather
// than an unknown-pragma warning.
#if defined(__CUDA_ARCH__) || defined(__clang__)
#define MOXE_PRAGMA_UNROLL _Pragma("unroll")
#else
#define MOXE_PRAGMA_UNROLL
#endif

namespace moxe {

/// Integer ceiling division for non-negative operands.
template <class I>
MOXE_HD constexpr I ceil_div(I a, I b) {
  return (a + b - 1) / b;
}

/// Round `a` up to a multiple of `b` (b > 0).
template <class I>
MOXE_HD constexpr I round_up(I a, I b) {
  return ceil_div(a, b) * b;
}

}  // namespace moxe
