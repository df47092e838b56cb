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
// their hardware.
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
  g.f_scale = math::exp(decay - g.m);
  g.i_scale = math::exp(igate - g.m);
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

/// The normaliser of h: max(|dot|, exp(-m)) + eps, dot = n . qs.
template <class A>
MOXE_HD MOXE_FORCEINLINE A normaliser(A dot, A m, A eps) {
  return math::max(math::abs(dot), math::exp(-m)) + eps;
}

/// Gradients of the normaliser's inputs.
template <class A>
struct NormaliserGrad {
  A ddot, dm;
};

/// Backward of normaliser(): the branch is the one math::max took (|dot| on ties).
template <class A>
MOXE_HD MOXE_FORCEINLINE NormaliserGrad<A> normaliser_backward(A dot, A m, A dden) {
  NormaliserGrad<A> r;
  const A floor = math::exp(-m);
  if (!(math::abs(dot) < floor)) {
    r.ddot = dot < A(0) ? -dden : dden;
    r.dm = A(0);
  } else {
    r.ddot = A(0);
    r.dm = -dden * floor;
  }
  return r;
}

}  // namespace moxe::mlstm::detail
