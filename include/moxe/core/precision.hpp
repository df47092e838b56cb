// moxe: where speed and accuracy trade, the caller picks (Precision), and the element-wise
// operand transforms that a tensor-core product applies under each choice.
//
// A product of two fp32 values on the tensor cores takes its operands in a narrower format
// T (bf16, half, or TF32 for float inputs). An operand that is an input element as given
// is exact in its own T; an intermediate (an fp32 value the kernel computed: a weight
// times an input, a score, a state) is not, and the Precision decides what it becomes:
//   fast:     round_to<T>(x), one MMA per product (TFLA's choice);
//   accurate: split3<T>(x) = hi + mid + lo, three T parts that hold x to about 2^-24 of
//             its size, so an input x intermediate product takes 3 MMAs (in hi, in mid,
//             in lo) and an intermediate x intermediate product 6 (the pairs whose parts'
//             indices add to at most 2: the rest lie below 2^-24 of the product).
// half's exponent range is narrower than float's (largest finite 65504, normals from
// 2^-14): an intermediate operand is first scaled by a power of two (operand_exponent)
// chosen from the largest magnitude of the values that share one factor of the output
// (an operand tile, or a row of A / column of B), and the product is scaled back in fp32
// (exact). bf16 has float's range and needs none.
// Everything here is MOXE_HD and element-wise, so device fragments and host emulations
// apply the same transforms. Host code needs no CUDA headers: __half and __nv_bfloat16 are
// only declared here (tags for OperandFormat), and the roundings to them are written out
// in float bit arithmetic, bit for bit the conversions cvt.rn.bf16.f32 / cvt.rn.f16.f32
// (round to nearest even, overflow to infinity, half's subnormals), so a host emulation
// (chunkwise_fused_host.hpp with a format tag) rounds exactly as the device does.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "moxe/core/config.hpp"

struct __half;         // cuda_fp16.h
struct __nv_bfloat16;  // cuda_bf16.h

namespace moxe {

/// The caller's choice where a kernel trades accuracy for speed (the mLSTM's intermediate
/// tiles, see docs/mlstm.md "Precision"): fast keeps intermediate operands in the input
/// type; accurate keeps about fp32 accuracy.
enum class Precision { fast, accurate };

/// What an operand of a product becomes on its way into the multiply.
enum class OperandForm {
  exact,    ///< taken as it is (fp32 SIMT FMAs; double on the host; inputs exact in T)
  rounded,  ///< rounded to the operand format once: one MMA
  split3,   ///< hi + mid + lo in the operand format: three MMAs against an exact operand
};

/// The forms of a product's two kinds of operand.
struct ProductForms {
  OperandForm input;         ///< an input element as the caller gave it
  OperandForm intermediate;  ///< an fp32 value computed by the kernel
};

/// The tensor-core operand format of element type T: bf16 and half (an MMA with T
/// operands), nothing for float and double.
template <class T>
struct OperandFormat {
  static constexpr bool kReduced = false;
  static constexpr bool kNarrowRange = false;
};
template <>
struct OperandFormat<__nv_bfloat16> {
  static constexpr bool kReduced = true;
  static constexpr int kSignificandBits = 8;
  static constexpr bool kNarrowRange = false;  // float's exponent range
};
template <>
struct OperandFormat<__half> {
  static constexpr bool kReduced = true;
  static constexpr int kSignificandBits = 11;
  static constexpr bool kNarrowRange = true;  // largest finite 65504, normals from 2^-14
  /// operand_exponent scales the largest magnitude of a group into [2^kTopExponent, 2^(kTopExponent + 1)):
  /// a split's lo part of an element 2^-k of that stays a normal half for k up to 7.
  static constexpr int kTopExponent = 14;
};

/// The forms the device uses for inputs of type T accumulated in Acc: half and bf16 keep
/// their inputs exact and round (fast) or split (accurate) the intermediates; float inputs
/// compute in exact fp32 unless TF32 is allowed and the precision is fast (then every
/// operand, inputs included, is rounded to TF32); double (host) is exact all the way.
template <class T, class Acc>
MOXE_HD constexpr ProductForms product_forms(Precision precision, bool allow_tf32) {
  if constexpr (!std::is_same_v<Acc, float>) {
    return ProductForms{OperandForm::exact, OperandForm::exact};
  } else if constexpr (OperandFormat<T>::kReduced) {
    return ProductForms{OperandForm::exact,
                        precision == Precision::fast ? OperandForm::rounded : OperandForm::split3};
  } else if (allow_tf32 && precision == Precision::fast) {
    return ProductForms{OperandForm::rounded, OperandForm::rounded};
  } else {
    return ProductForms{OperandForm::exact, OperandForm::exact};
  }
}

MOXE_HD MOXE_FORCEINLINE std::uint32_t float_bits(float x) {
  std::uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return bits;
}

MOXE_HD MOXE_FORCEINLINE float float_from_bits(std::uint32_t bits) {
  float x;
  std::memcpy(&x, &bits, sizeof x);
  return x;
}

/// x rounded to TF32 (10 stored significand bits, to nearest, ties away from zero), as
/// cvt.rna.tf32.f32 does; infinities and NaN unchanged.
MOXE_HD MOXE_FORCEINLINE float round_to_tf32(float x) {
  std::uint32_t bits = float_bits(x);
  if ((bits & 0x7f800000u) != 0x7f800000u) bits = (bits + 0x1000u) & 0xffffe000u;
  return float_from_bits(bits);
}

/// x rounded to bf16 (8 significand bits, float's exponent range), to nearest even, as
/// cvt.rn.bf16.f32; overflow gives infinity, NaN stays NaN.
MOXE_HD MOXE_FORCEINLINE float round_to_bf16(float x) {
  std::uint32_t bits = float_bits(x);
  if ((bits & 0x7f800000u) == 0x7f800000u) return x;  // inf, NaN
  bits = (bits + 0x7fffu + ((bits >> 16) & 1u)) & 0xffff0000u;
  return float_from_bits(bits);
}

/// x rounded to half (11 significand bits, normals from 2^-14, largest finite 65504), to
/// nearest even, as cvt.rn.f16.f32: subnormals are multiples of 2^-24, |x| >= 65520
/// becomes infinity, NaN stays NaN.
MOXE_HD MOXE_FORCEINLINE float round_to_half(float x) {
  const std::uint32_t bits = float_bits(x);
  const std::uint32_t sign = bits & 0x80000000u, mag = bits & 0x7fffffffu;
  if (mag >= 0x7f800000u) return x;  // inf, NaN
  float r;
  if (mag < 0x38800000u) {  // |x| < 2^-14: to a multiple of 2^-24 (ulp of 0.5 is 2^-24)
    const float big = 0.5f;
    r = (float_from_bits(mag) + big) - big;  // both steps exact but the one rounding
  } else {
    const std::uint32_t m = (mag + 0xfffu + ((mag >> 13) & 1u)) & 0xffffe000u;
    r = m > 0x477fe000u ? float_from_bits(0x7f800000u) : float_from_bits(m);  // > 65504: inf
  }
  return float_from_bits(float_bits(r) | sign);
}

/// x rounded to the operand format of T (to nearest even; float: TF32), back in float.
template <class T>
MOXE_HD MOXE_FORCEINLINE float round_to(float x) {
  if constexpr (std::is_same_v<T, float>) {
    return round_to_tf32(x);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return round_to_bf16(x);
  } else {
    static_assert(std::is_same_v<T, __half>, "round_to: float, __half or __nv_bfloat16");
    return round_to_half(x);
  }
}

/// x = hi + mid + lo + r with hi, mid, lo values of T's operand format: each part is the
/// rounding of what the parts before it left, so |r| <= 2^-(3 p) |x| roughly (p = T's
/// significand bits: 2^-27 for bf16; half, scaled by operand_exponent first, 2^-33 above
/// its subnormals). The subtractions are exact in float.
struct Split3 {
  float hi, mid, lo;
};

template <class T>
MOXE_HD MOXE_FORCEINLINE Split3 split3(float x) {
  Split3 s;
  s.hi = round_to<T>(x);
  const float r1 = x - s.hi;
  s.mid = round_to<T>(r1);
  s.lo = round_to<T>(r1 - s.mid);
  return s;
}

/// 2^e as a float, e in [-126, 127].
MOXE_HD MOXE_FORCEINLINE float exp2_int(int e) {
  return float_from_bits(static_cast<std::uint32_t>(e + 127) << 23);
}

/// The power of two (its exponent) by which a group of intermediate operands whose largest
/// magnitude is `max_abs` is scaled before it is converted to T's operand format; the
/// product is multiplied by exp2_int(-exponent) afterwards. 0 where the format has float's
/// range (bf16, TF32), for max_abs 0 and for a max that is not finite; half: max_abs is
/// brought into [2^14, 2^15), so nothing overflows and the parts of its split stay normal
/// (the exponent is clamped to [-112, 112]: groups below 2^-98 keep their tiny values).
template <class T>
MOXE_HD MOXE_FORCEINLINE int operand_exponent(float max_abs) {
  if constexpr (!OperandFormat<T>::kNarrowRange) {
    (void)max_abs;
    return 0;
  } else {
    const int biased = static_cast<int>((float_bits(max_abs) >> 23) & 0xffu);
    if (max_abs == 0.0f || biased == 0xff) return 0;  // zero, inf, NaN
    const int top = (biased == 0 ? -126 : biased - 127);  // floor(log2(max_abs)) for normals
    const int e = OperandFormat<T>::kTopExponent - top;
    return e < -112 ? -112 : (e > 112 ? 112 : e);
  }
}

/// What an operand x becomes in a product under `form`, as the values its parts stand for:
/// exact: x; rounded: round_to<T>(x 2^e) 2^-e; split3: the parts of split3<T>(x 2^e), each
/// times 2^-e (e = the group's operand_exponent, 0 but for half; the scalings are exact).
/// The device multiplies the scaled parts and scales the fp32 sum back; a host emulation
/// (chunkwise_fused_host.hpp) multiplies these values, the same numbers up to the order
/// of the fp32 additions.
struct OperandParts {
  float part[3];
  int count;
};

template <class T>
MOXE_HD MOXE_FORCEINLINE OperandParts operand_parts(float x, OperandForm form, int exponent) {
  OperandParts r{{x, 0.0f, 0.0f}, 1};
  if (form == OperandForm::exact) return r;
  const float up = exp2_int(exponent), down = exp2_int(-exponent);
  if (form == OperandForm::rounded) {
    r.part[0] = round_to<T>(x * up) * down;
  } else {
    const Split3 sp = split3<T>(x * up);
    r.part[0] = sp.hi * down;
    r.part[1] = sp.mid * down;
    r.part[2] = sp.lo * down;
    r.count = 3;
  }
  return r;
}

}  // namespace moxe
