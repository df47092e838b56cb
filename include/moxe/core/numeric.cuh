// moxe: element types on the device (float, __half, __nv_bfloat16): conversion traits and
// vectorised 16-byte access.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "moxe/core/config.hpp"

namespace moxe {

template <class T>
struct NumericTraits;

template <>
struct NumericTraits<float> {
  static constexpr bool is_reduced = false;  // float computes in full fp32 (no TF32)
  static constexpr const char* name = "float";
  MOXE_HD MOXE_FORCEINLINE static float to_float(float x) { return x; }
  MOXE_HD MOXE_FORCEINLINE static float from_float(float x) { return x; }
};

template <>
struct NumericTraits<__half> {
  static constexpr bool is_reduced = true;
  static constexpr const char* name = "half";
  MOXE_HD MOXE_FORCEINLINE static float to_float(__half x) { return __half2float(x); }
  MOXE_HD MOXE_FORCEINLINE static __half from_float(float x) { return __float2half_rn(x); }
};

template <>
struct NumericTraits<__nv_bfloat16> {
  static constexpr bool is_reduced = true;
  static constexpr const char* name = "bf16";
  MOXE_HD MOXE_FORCEINLINE static float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  MOXE_HD MOXE_FORCEINLINE static __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
};

template <>
struct NumericTraits<double> {  // host references and double checks only
  static constexpr bool is_reduced = false;
  static constexpr const char* name = "double";
  MOXE_HD MOXE_FORCEINLINE static double to_float(double x) { return x; }
  MOXE_HD MOXE_FORCEINLINE static double from_float(double x) { return x; }
};

template <class T>
inline constexpr bool is_device_element_v =
    std::is_same_v<T, float> || std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>;

/// Element -> float (float stays float).
template <class T>
MOXE_HD MOXE_FORCEINLINE float to_float(T x) {
  return static_cast<float>(NumericTraits<T>::to_float(x));
}

/// float -> element, round to nearest even.
template <class T>
MOXE_HD MOXE_FORCEINLINE T from_float(float x) {
  return NumericTraits<T>::from_float(x);
}

/// True when `p` is aligned to `bytes`.
MOXE_HD MOXE_FORCEINLINE bool is_aligned(const void* p, std::size_t bytes) {
  return (reinterpret_cast<std::uintptr_t>(p) % bytes) == 0;
}

/// N elements of T packed into one 16-byte word: the unit of vectorised global access.
template <class T>
struct alignas(16) Vec16 {
  static constexpr int kElements = 16 / sizeof(T);
  T v[kElements];

  MOXE_DEVICE MOXE_FORCEINLINE static Vec16 load(const T* p) {  // p 16-byte aligned
    Vec16 r;
    *reinterpret_cast<uint4*>(&r) = *reinterpret_cast<const uint4*>(p);
    return r;
  }
  /// Read-only path (ld.global.nc): for inputs no thread of the kernel writes.
  MOXE_DEVICE MOXE_FORCEINLINE static Vec16 load_nc(const T* p) {
    Vec16 r;
    *reinterpret_cast<uint4*>(&r) = __ldg(reinterpret_cast<const uint4*>(p));
    return r;
  }
  MOXE_DEVICE MOXE_FORCEINLINE void store(T* p) const {
    *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(this);
  }
  MOXE_DEVICE MOXE_FORCEINLINE void to_float(float (&out)[kElements]) const {
    MOXE_PRAGMA_UNROLL
    for (int i = 0; i < kElements; ++i) out[i] = moxe::to_float(v[i]);
  }
  MOXE_DEVICE MOXE_FORCEINLINE static Vec16 from_float(const float (&in)[kElements]) {
    Vec16 r;
    MOXE_PRAGMA_UNROLL
    for (int i = 0; i < kElements; ++i) r.v[i] = moxe::from_float<T>(in[i]);
    return r;
  }
  MOXE_DEVICE MOXE_FORCEINLINE static Vec16 zero() {
    Vec16 r;
    *reinterpret_cast<uint4*>(&r) = make_uint4(0u, 0u, 0u, 0u);
    return r;
  }
};

}  // namespace moxe
