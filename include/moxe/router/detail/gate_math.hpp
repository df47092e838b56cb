// moxe::router: the per-token arithmetic of the gate, shared by the host references and the
// device kernels (the reference only orders the loops differently). See docs/router.md.
#pragma once

#include "moxe/core/config.hpp"
#include "moxe/core/math.hpp"
#include "moxe/loss/detail/balance_math.hpp"
#include "moxe/router/params.hpp"

namespace moxe::router::detail {

/// Floor of q inside the entropy's logarithm.
inline constexpr double kEntropyFloor = 1e-6;

/// s(d) for each modulation kind.
template <class A>
MOXE_HD MOXE_FORCEINLINE A modulation_shift(Modulation m, A gamma, A tau, A d) {
  switch (m) {
    case Modulation::standard: return gamma * d;
    case Modulation::proportional: return gamma * math::relu(d - tau);
    case Modulation::masked: return d > tau ? gamma * d : A(0);
    default: return A(0);
  }
}

/// ds/dd on the active piece (the indicator of `masked` and the kink of `proportional`
/// contribute nothing: their derivative is zero almost everywhere).
template <class A>
MOXE_HD MOXE_FORCEINLINE A modulation_shift_grad(Modulation m, A gamma, A tau, A d) {
  switch (m) {
    case Modulation::standard: return gamma;
    case Modulation::proportional:
    case Modulation::masked: return d > tau ? gamma : A(0);
    default: return A(0);
  }
}

/// 1 / log E (0 for a single expert, whose entropy is 0).
template <class A>
MOXE_HD MOXE_FORCEINLINE A inv_log_experts(int experts) {
  return experts > 1 ? A(1) / math::log(static_cast<A>(experts)) : A(0);
}

/// Online (max, sum exp) over one token's unbiased logits, with separate sums for the
/// mLSTM group [0, E_m) and the sLSTM group [E_m, E). Both softmaxes (the shifted p and
/// the unbiased q) and both group masses follow from it, so one pass suffices.
template <class A>
struct SplitMaxSum {
  A max = -math::infinity<A>();
  A sum_m = A(0);
  A sum_s = A(0);

  MOXE_HD MOXE_FORCEINLINE void add(A x, bool in_mlstm) {
    if (x > max) {
      const A r = math::exp_sub(max, x);
      sum_m *= r;
      sum_s *= r;
      max = x;
    }
    const A e = math::exp_sub(x, max);
    if (in_mlstm) sum_m += e; else sum_s += e;
  }

  /// The same bits whichever state comes first (as math::MaxSum::merge: a butterfly's lanes
  /// merge one pair in opposite roles, and fma contraction rounds the two orders differently).
  MOXE_HD MOXE_FORCEINLINE static SplitMaxSum merge(const SplitMaxSum& a, const SplitMaxSum& b) {
    const bool swap =
        b.max < a.max || (b.max == a.max && (b.sum_m < a.sum_m || (b.sum_m == a.sum_m && b.sum_s < a.sum_s)));
    const SplitMaxSum& x = swap ? b : a;
    const SplitMaxSum& y = swap ? a : b;
    SplitMaxSum r;
    r.max = math::max(x.max, y.max);
    const A rx = math::exp_sub(x.max, r.max), ry = math::exp_sub(y.max, r.max);
    r.sum_m = x.sum_m * rx + y.sum_m * ry;
    r.sum_s = x.sum_s * rx + y.sum_s * ry;
    return r;
  }
};

/// What one token's softmax pass yields.
template <class A>
struct TokenSoftmax {
  A lse;        // logsumexp(zc), zc = z + s (mLSTM group) / z - s (sLSTM group)
  A lse_plain;  // logsumexp(z) = max + log_sum, the normaliser of q
  A log_sum;    // log(S_m + S_s), S_g = sum over group g of exp(z - max)
  A inv_sum;    // 1 / (S_m + S_s): q_e = exp(z_e - max) * inv_sum
  A mass_m;     // sum_{e < E_m} p_e
  A mass_s;     // sum_{e >= E_m} p_e
};

/// From the max of z and the two group sums of exp(z - max): both normalisers and both
/// group masses (the shift s moves the groups apart: p = q * exp(+-s + lse_plain - lse)).
template <class A>
MOXE_HD MOXE_FORCEINLINE TokenSoftmax<A> token_softmax(A max, A sum_m, A sum_s, A shift) {
  TokenSoftmax<A> r;
  const A total = sum_m + sum_s;
  r.log_sum = math::log(total);
  r.inv_sum = A(1) / total;
  r.lse_plain = max + r.log_sum;
  const A lse_m = sum_m > A(0) ? max + shift + math::log(sum_m) : -math::infinity<A>();
  const A lse_s = sum_s > A(0) ? max - shift + math::log(sum_s) : -math::infinity<A>();
  r.lse = math::log_add_exp(lse_m, lse_s);
  r.mass_m = math::exp_sub(lse_m, r.lse);
  r.mass_s = math::exp_sub(lse_s, r.lse);
  return r;
}

template <class A>
MOXE_HD MOXE_FORCEINLINE TokenSoftmax<A> token_softmax(const SplitMaxSum<A>& st, A shift) {
  return token_softmax(st.max, st.sum_m, st.sum_s, shift);
}

/// zc_e = z_e + s (e < E_m) or z_e - s.
template <class A>
MOXE_HD MOXE_FORCEINLINE A conditioned_logit(A z, A shift, bool in_mlstm) {
  return in_mlstm ? z + shift : z - shift;
}

/// log(1e-6).
inline constexpr double kLogEntropyFloor = -13.815510557964274;

/// -q log(max(q, 1e-6)): one expert's share of the (unnormalised) entropy.
template <class A>
MOXE_HD MOXE_FORCEINLINE A entropy_term(A q) {
  return -math::xlogx_clamped(q, A(kEntropyFloor));
}

/// dH/dq_e times log E: -(d/dq)[q log(max(q, 1e-6))].
template <class A>
MOXE_HD MOXE_FORCEINLINE A entropy_term_grad(A q) {
  return -math::xlogx_clamped_grad(q, A(kEntropyFloor));
}

/// entropy_term(q) given log q as well (q = exp(log_q) from a softmax: log_q = z - lse is
/// exact and saves a logarithm).
template <class A>
MOXE_HD MOXE_FORCEINLINE A entropy_term_log(A q, A log_q) {
  return -q * (q > A(kEntropyFloor) ? log_q : A(kLogEntropyFloor));
}

/// entropy_term_grad(q) given log q.
template <class A>
MOXE_HD MOXE_FORCEINLINE A entropy_term_grad_log(A q, A log_q) {
  return q > A(kEntropyFloor) ? -(log_q + A(1)) : -A(kLogEntropyFloor);
}

/// p_e = q_e * scale of its group: exp(+-s + lse_plain - lse). One exponential per expert
/// gives both softmaxes.
template <class A>
struct GroupScales {
  A mlstm, slstm;
};

template <class A>
MOXE_HD MOXE_FORCEINLINE GroupScales<A> group_scales(const TokenSoftmax<A>& sm, A shift) {
  const A base = sm.lse_plain - sm.lse;
  return {math::exp(shift + base), math::exp(base - shift)};
}

/// "a ranks before b" in a top-k: larger value first, lower index on ties.
template <class A>
MOXE_HD MOXE_FORCEINLINE bool ranks_before(A va, int ia, A vb, int ib) {
  return va > vb || (va == vb && ia < ib);
}

/// The value a top-k ranks by: NaN as -inf (below every number, ties to the lower index),
/// so that every candidate can be chosen and a selection never runs out of candidates.
template <class A>
MOXE_HD MOXE_FORCEINLINE A rank_value(A x) {
  return x != x ? -math::infinity<A>() : x;
}

/// Batch constants of the gate backward (one set per call).
template <class A>
struct GateBackwardScalars {
  A g_z;      // d(c_z L_z)/d lse_t = g_z * lse_t:   2 c_z / T
  A g_m, g_s; // d(c_g L_g)/d p_te for e < E_m / e >= E_m:  c_g L_g'(P) / T
  A g_d;      // c_d: d(c_d L_d)/dd_t = g_d * 2 (d - H) / T
  A inv_tokens;
};

template <class A>
MOXE_HD MOXE_FORCEINLINE GateBackwardScalars<A> gate_backward_scalars(A c_z, A c_g, A c_d, A mass_m,
                                                                       A mass_s, int64_t tokens) {
  GateBackwardScalars<A> b;
  b.inv_tokens = A(1) / static_cast<A>(tokens);
  b.g_z = A(2) * c_z * b.inv_tokens;
  // c_g = 0: no group-loss gradient whatever the masses hold (0 * NaN would spread a
  // non-finite mass over every token; with and without the forward's totals alike)
  b.g_m = c_g == A(0) ? A(0) : c_g * loss::detail::group_loss_term_grad(mass_m, A(2)) * b.inv_tokens;
  b.g_s = c_g == A(0) ? A(0) : c_g * loss::detail::group_loss_term_grad(mass_s, A(2)) * b.inv_tokens;
  b.g_d = c_d;
  return b;
}

/// Gradient of sum_k w_k dw_k with respect to the selected p_{idx_j}, w = p / S:
/// (dw_j - sum_k w_k dw_k) / S.
template <class A>
MOXE_HD MOXE_FORCEINLINE A renorm_grad(A dw_j, A w_dot_dw, A inv_sum) {
  return (dw_j - w_dot_dw) * inv_sum;
}

/// dzc_e = p_e (gp_e - <p, gp> + g_lse): the softmax Jacobian applied to the gradient gp
/// with respect to p, plus the lse path (d lse / d zc = p).
template <class A>
MOXE_HD MOXE_FORCEINLINE A softmax_grad(A p, A gp, A p_dot_gp, A g_lse) {
  return p * (gp - p_dot_gp + g_lse);
}

/// ds = sum_e sign_e dzc_e in closed form: the group masses carry the common terms and
/// the routed slots (sum over j of sign * p_j r_j, `routed_signed`) the rest.
template <class A>
MOXE_HD MOXE_FORCEINLINE A shift_grad(A mass_m, A mass_s, A g_m, A g_s, A p_dot_gp, A g_lse, A routed_signed) {
  return mass_m * (g_m - p_dot_gp + g_lse) - mass_s * (g_s - p_dot_gp + g_lse) + routed_signed;
}

}  // namespace moxe::router::detail

namespace moxe::router::detail {

/// The two largest values seen (group score of group-limited routing).
template <class A>
struct Top2 {
  A first = -math::infinity<A>();
  A second = -math::infinity<A>();
  MOXE_HD MOXE_FORCEINLINE void add(A x) {
    if (x > first) {
      second = first;
      first = x;
    } else if (x > second) {
      second = x;
    }
  }
  /// DeepSeek-V3's group score: the sum of the top-2 (the top-1 for one-expert groups).
  MOXE_HD MOXE_FORCEINLINE A group_score(int group_size) const {
    return group_size >= 2 ? first + second : first;
  }
};

}  // namespace moxe::router::detail
