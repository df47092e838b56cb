// moxe: scalar math shared by the host references and the device kernels.
//
// Every function here is MOXE_HD and overloaded for float and double, so a kernel
// (float) and a reference (double) evaluate the same formula. Family-specific
// formulas (gates, stabilisers) build on these in <family>/detail headers.
#pragma once

#include <cmath>

#include "moxe/core/config.hpp"

namespace moxe::math {

// ---- elementary functions: the CUDA intrinsics' full-precision forms on the device,
// std:: on the host. -------------------------------------------------------------------
#if MOXE_DEVICE_PASS
#define MOXE_MATH_UNARY(name, fdev, ddev)                        \
  MOXE_HD MOXE_FORCEINLINE float name(float x) { return fdev(x); } \
  MOXE_HD MOXE_FORCEINLINE double name(double x) { return ddev(x); }
#else
#define MOXE_MATH_UNARY(name, fdev, ddev)                                  \
  MOXE_HD MOXE_FORCEINLINE float name(float x) { return std::name(x); }  \
  MOXE_HD MOXE_FORCEINLINE double name(double x) { return std::name(x); }
#endif

MOXE_MATH_UNARY(exp, ::expf, ::exp)
MOXE_MATH_UNARY(log, ::logf, ::log)
MOXE_MATH_UNARY(log1p, ::log1pf, ::log1p)
MOXE_MATH_UNARY(tanh, ::tanhf, ::tanh)
MOXE_MATH_UNARY(sqrt, ::sqrtf, ::sqrt)
MOXE_MATH_UNARY(fabs, ::fabsf, ::fabs)
#undef MOXE_MATH_UNARY

template <class A>
MOXE_HD MOXE_FORCEINLINE A abs(A x) { return math::fabs(x); }

template <class A>
MOXE_HD MOXE_FORCEINLINE A max(A a, A b) { return a < b ? b : a; }  // a on ties (and NaN b)

template <class A>
MOXE_HD MOXE_FORCEINLINE A min(A a, A b) { return b < a ? b : a; }

/// +infinity of A (constexpr-friendly on host and device).
template <class A>
MOXE_HD constexpr A infinity();
template <>
MOXE_HD constexpr float infinity<float>() { return __builtin_huge_valf(); }
template <>
MOXE_HD constexpr double infinity<double>() { return __builtin_huge_val(); }

template <class A>
MOXE_HD MOXE_FORCEINLINE bool is_finite(A x) {
  return x == x && x != infinity<A>() && x != -infinity<A>();
}

// ---- activations ----------------------------------------------------------------------

/// sigmoid(x) = 1 / (1 + exp(-x)), without overflow for either sign.
template <class A>
MOXE_HD MOXE_FORCEINLINE A sigmoid(A x) {
  if (x >= A(0)) return A(1) / (A(1) + math::exp(-x));
  const A e = math::exp(x);
  return e / (A(1) + e);
}

/// log(sigmoid(x)) = min(x, 0) - log1p(exp(-|x|)); exact for large |x|.
template <class A>
MOXE_HD MOXE_FORCEINLINE A logsigmoid(A x) {
  return math::min(x, A(0)) - math::log1p(math::exp(-math::abs(x)));
}

/// d/dx logsigmoid(x) = sigmoid(-x).
template <class A>
MOXE_HD MOXE_FORCEINLINE A logsigmoid_grad(A x) { return sigmoid(-x); }

/// softplus(x) = log(1 + exp(x)) = -logsigmoid(-x).
template <class A>
MOXE_HD MOXE_FORCEINLINE A softplus(A x) { return -logsigmoid(-x); }

template <class A>
MOXE_HD MOXE_FORCEINLINE A relu(A x) { return x > A(0) ? x : A(0); }

/// d/dx tanh(x) given y = tanh(x). Loses relative accuracy for large |x| (1 - y^2 rounds to
/// a multiple of y's ulp: in float ~1.5e-4 off at |x| = 5, a factor 2 at 9, 0 from 10 on);
/// where x is at hand, tanh_grad(x) is exact to rounding.
template <class A>
MOXE_HD MOXE_FORCEINLINE A tanh_grad_from_output(A y) { return A(1) - y * y; }

/// d/dx sigmoid(x) given y = sigmoid(x). Loses relative accuracy for large positive x
/// (1 - y rounds to a multiple of y's ulp: ~1e-3 at x = 10 in float, ~50% at x = 16);
/// where x is at hand, sigmoid_grad(x) is exact to rounding.
template <class A>
MOXE_HD MOXE_FORCEINLINE A sigmoid_grad_from_output(A y) { return y * (A(1) - y); }

/// d/dx sigmoid(x) = sigmoid(x) sigmoid(-x) = e / (1 + e)^2 with e = exp(-|x|): every
/// factor is exact to rounding for any x (0 only where it underflows).
template <class A>
MOXE_HD MOXE_FORCEINLINE A sigmoid_grad(A x) {
  const A e = math::exp(-math::abs(x));
  const A d = A(1) + e;
  return e / (d * d);
}

/// d/dx tanh(x) = sech^2(x) = 4 e / (1 + e)^2 with e = exp(-2|x|) (= 4 sigmoid'(2x)): every
/// factor is exact to rounding for any x (0 only where it underflows).
template <class A>
MOXE_HD MOXE_FORCEINLINE A tanh_grad(A x) {
  const A e = math::exp(A(-2) * math::abs(x));
  const A d = A(1) + e;
  return A(4) * e / (d * d);
}

// ---- stabilised exponentials and log-sum-exp ------------------------------------------

/// exp(x - m) with the convention exp(-inf - (-inf)) = 0 (an empty running max).
template <class A>
MOXE_HD MOXE_FORCEINLINE A exp_sub(A x, A m) {
  return x == -infinity<A>() ? A(0) : math::exp(x - m);
}

/// A running (max, sum of exp(x - max)) pair: the state of an online softmax or
/// log-sum-exp. Merging is associative, so it serves sequential scans, warp reductions
/// and two-stage block reductions alike.
template <class A>
struct MaxSum {
  A max = -infinity<A>();
  A sum = A(0);

  MOXE_HD MOXE_FORCEINLINE void add(A x) {
    if (x > max) {
      sum = sum * exp_sub(max, x) + A(1);
      max = x;
    } else {
      sum += exp_sub(x, max);
    }
  }

  /// The same bits whichever state comes first: the lanes of a butterfly all-reduce merge
  /// one pair in opposite roles, and a compiler that contracts x.sum * rx + y.sum * ry into
  /// an fma rounds the two orders differently, so the pair is put in one order first.
  MOXE_HD MOXE_FORCEINLINE static MaxSum merge(const MaxSum& a, const MaxSum& b) {
    const bool swap = b.max < a.max || (b.max == a.max && b.sum < a.sum);
    const MaxSum& x = swap ? b : a;
    const MaxSum& y = swap ? a : b;
    MaxSum r;
    r.max = math::max(x.max, y.max);
    r.sum = x.sum * exp_sub(x.max, r.max) + y.sum * exp_sub(y.max, r.max);
    return r;
  }

  /// log(sum_i exp(x_i)); -inf when empty.
  MOXE_HD MOXE_FORCEINLINE A log_sum_exp() const {
    return sum > A(0) ? max + math::log(sum) : -infinity<A>();
  }
};

/// log(exp(a) + exp(b)) computed stably.
template <class A>
MOXE_HD MOXE_FORCEINLINE A log_add_exp(A a, A b) {
  const A m = math::max(a, b);
  if (m == -infinity<A>()) return m;
  return m + math::log1p(math::exp(-math::abs(a - b)));
}

// ---- entropy terms --------------------------------------------------------------------

/// q * log(max(q, floor)): the clamped entropy summand used by the router.
template <class A>
MOXE_HD MOXE_FORCEINLINE A xlogx_clamped(A q, A floor) {
  return q * math::log(math::max(q, floor));
}

/// d/dq [q log(max(q, floor))] = log(q) + 1 above the floor, log(floor) at or below it.
template <class A>
MOXE_HD MOXE_FORCEINLINE A xlogx_clamped_grad(A q, A floor) {
  return q > floor ? math::log(q) + A(1) : math::log(floor);
}

}  // namespace moxe::math
