// moxe::mlstm::detail: the scalar pieces of the mLSTM cell that the host reference and the
// device kernels share (see docs/mlstm.md for the math and the names).
//
// One step of the recurrence, per state slot:
//   lf = logsigmoid(f);  m = max(lf + m_prev, i)
//   f_scale = exp(lf + m_prev - m);  i_scale = exp(i - m)
//   C = f_scale C_prev + i_scale k v^T;  n = f_scale n_prev + i_scale k
//   h = C^T qs / (max(|n . qs|, exp(-m)) + eps)
// The functions below hold every nonlinear scalar of that step and its exact derivative;
// the (bi)linear parts in C, n, q, k, v are left to the callers, which order the loops for
// their hardware. They stay finite for infinite gates: fgate = -inf is a hard reset
// (logsigmoid = -inf, the previous state's weight 0), igate = -inf adds nothing, and a step
// whose sources are both -inf (m = -inf) gives the zero state and h = 0.
#pragma once

#include "moxe/core/config.hpp"
#include "moxe/core/math.hpp"

namespace moxe::mlstm::detail {

/// The gate scalars of one step.
template <class A>
struct GateStep {
  A log_f;             ///< logsigmoid(f)
  A m;                 ///< the new stabiliser max(log_f + m_prev, i)
  A f_scale;           ///< exp(log_f + m_prev - m): the weight of the previous state
  A i_scale;           ///< exp(i - m): the weight of the new k v^T
  bool m_from_decay;   ///< the max took its first argument (ties included)
};

template <class A>
MOXE_HD MOXE_FORCEINLINE GateStep<A> gate_step(A igate, A fgate, A m_prev) {
  GateStep<A> g;
  g.log_f = math::logsigmoid(fgate);
  const A decay = g.log_f + m_prev;
  // math::max keeps its first argument on ties; the backward follows the same branch.
  g.m_from_decay = !(decay < igate);
  g.m = g.m_from_decay ? decay : igate;
  // exp(x - m), 0 for x = -inf: a weight stays 0 when m is -inf too (both sources empty)
  g.f_scale = math::exp_sub(decay, g.m);
  g.i_scale = math::exp_sub(igate, g.m);
  return g;
}

/// Gradients of the gate pre-activations and of the previous stabiliser.
template <class A>
struct GateGrad {
  A digate, dfgate, dm_prev;
};

/// Backward of gate_step. `df_scale`, `di_scale`: gradients of the loss wrt f_scale and
/// i_scale; `dm`: the gradient wrt m from every other path (the exp(-m) branch of the
/// normaliser and the next step's decay, plus any upstream dm_last).
template <class A>
MOXE_HD MOXE_FORCEINLINE GateGrad<A> gate_step_backward(A fgate, const GateStep<A>& g, A df_scale,
                                                        A di_scale, A dm) {
  A ddecay = df_scale * g.f_scale;  // d exp(decay - m) / d decay
  A di = di_scale * g.i_scale;
  // m enters f_scale and i_scale with a minus sign.
  const A dm_total = dm - ddecay - di;
  if (g.m_from_decay) {
    ddecay += dm_total;
  } else {
    di += dm_total;
  }
  GateGrad<A> r;
  r.digate = di;
  r.dfgate = ddecay * math::logsigmoid_grad(fgate);
  r.dm_prev = ddecay;  // decay = log_f + m_prev
  return r;
}

/// The normaliser of h, den = max(|dot|, exp(-m)) + eps with dot = n . qs, as the ratios
/// the callers need: h = num * inv_den, and on the floor branch exp(-m) / den. exp(-m)
/// overflows float for m < -88.7 (double for m < -709) while both ratios stay in range, so
/// on the floor branch with m < 0 they are formed from e = exp(m) < 1, i.e. with den scaled
/// by e: inv_den = e / (1 + eps e), floor_share = 1 / (1 + eps e). Exact to rounding in
/// every regime (inv_den underflows to 0 exactly where h does).
template <class A>
struct Normaliser {
  A inv_den;      ///< 1 / den
  A floor_share;  ///< exp(-m) / den on the floor branch (in (0, 1]); 0 on the |dot| branch
  bool on_floor;  ///< the max took exp(-m): |dot| < exp(-m) (|dot| on ties, as math::max)
};

template <class A>
MOXE_HD MOXE_FORCEINLINE Normaliser<A> normaliser(A dot, A m, A eps) {
  Normaliser<A> r;
  const A floor = math::exp(-m);  // +inf when it overflows: only compared
  r.on_floor = math::abs(dot) < floor;
  if (!r.on_floor) {
    r.inv_den = A(1) / (math::abs(dot) + eps);
    r.floor_share = A(0);
  } else if (m >= A(0)) {  // floor <= 1
    r.inv_den = A(1) / (floor + eps);
    r.floor_share = floor * r.inv_den;
  } else {  // floor > 1, perhaps +inf: den e = 1 + eps e
    const A e = math::exp(m);
    const A scaled = A(1) + eps * e;
    r.inv_den = e / scaled;
    r.floor_share = A(1) / scaled;
  }
  return r;
}

/// Gradients of the normaliser's inputs.
template <class A>
struct NormaliserGrad {
  A ddot, dm;
};

/// Backward of normaliser() along the branch it took, from g = dh . h (the gradient of den
/// is -g / den): ddot = -sign(dot) g / den on the |dot| branch (dot = 0 counts as
/// positive), dm = g exp(-m) / den on the floor branch. Products of the ratios, never den
/// or exp(-m) themselves, so nothing overflows.
template <class A>
MOXE_HD MOXE_FORCEINLINE NormaliserGrad<A> normaliser_backward(A dot, const Normaliser<A>& nz, A dh_dot_h) {
  NormaliserGrad<A> r;
  if (!nz.on_floor) {
    r.ddot = (dot < A(0) ? dh_dot_h : -dh_dot_h) * nz.inv_den;
    r.dm = A(0);
  } else {
    r.ddot = A(0);
    r.dm = dh_dot_h * nz.floor_share;
  }
  return r;
}

}  // namespace moxe::mlstm::detail
