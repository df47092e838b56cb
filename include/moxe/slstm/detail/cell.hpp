// moxe::slstm::detail: the sLSTM cell, one unit, forward and backward, as MOXE_HD scalar
// functions. The host reference and the device kernels call these, so both compute the
// same arithmetic; they differ only in how the recurrent dot products are ordered.
#pragma once

#include "moxe/core/config.hpp"
#include "moxe/core/math.hpp"

namespace moxe::slstm::detail {

/// raw_g = wx_g + (r y_{t-1})_g + bias_g, summed in this order everywhere.
template <class A>
MOXE_HD MOXE_FORCEINLINE A gate_preactivation(A wx, A recurrent, A bias) {
  return (wx + recurrent) + bias;
}

/// The four gate pre-activations of one unit.
template <class A>
struct GatesRaw {
  A i, f, z, o;
};

/// The state of one unit after a step, and its output.
template <class A>
struct CellOut {
  A c, n, m, y;
};

/// fg * x, exactly 0 for x == 0 whatever fg (fg may overflow to inf from the zero state).
template <class A>
MOXE_HD MOXE_FORCEINLINE A forget_term(A fg, A x) {
  return x == A(0) ? A(0) : fg * x;
}

/// One step of one unit (DESIGN.md, sLSTM):
///   m = (n0 == 0) ? i : max(i, logsigmoid(f) + m0)      (ties select i)
///   c = exp(lsf + m0 - m) c0 + exp(i - m) tanh(z);  n = ... n0 + exp(i - m)
///   y = sigmoid(o) c / n
template <class A>
MOXE_HD MOXE_FORCEINLINE CellOut<A> cell_forward(const GatesRaw<A>& g, A c0, A n0, A m0) {
  const A lf_m = math::logsigmoid(g.f) + m0;
  const A m = (n0 == A(0)) ? g.i : math::max(g.i, lf_m);
  const A ig = math::exp(g.i - m);
  const A fg = math::exp(lf_m - m);
  // from the zero state m = i, and fg = exp(lf + m0 - i) overflows for i ~88 below lf + m0:
  // a zero state contributes exactly nothing (not inf * 0 = NaN)
  const A c = forget_term(fg, c0) + ig * math::tanh(g.z);
  const A n = forget_term(fg, n0) + ig;
  const A y = math::sigmoid(g.o) * c / n;
  return {c, n, m, y};
}

/// Gradients of one step of one unit: with respect to the raw gates and the previous
/// state (c0, n0, m0).
template <class A>
struct CellGrad {
  GatesRaw<A> d;  // d raw gates (i, f, z, o)
  A dc0, dn0, dm0;
};

/// The exact gradient of cell_forward given the upstream gradients of its outputs y, c, n
/// and m (dy is the total gradient of this step's y: the loss's plus the recurrent one).
/// At the max, the gradient goes to the selected argument (i on ties, as cell_forward);
/// the n0 == 0 test has no gradient. sigmoid'(o) and tanh'(z) are taken from the raw gates
/// (math::sigmoid_grad, math::tanh_grad), not from the rounded og and tanh(z): og (1 - og)
/// and 1 - tanh(z)^2 lose all relative accuracy at large |o|, |z| (in float sigmoid(17) and
/// tanh(10) round to 1, where sigmoid'(17) ~ 4e-8 and tanh'(10) ~ 8e-9).
template <class A>
MOXE_HD MOXE_FORCEINLINE CellGrad<A> cell_backward(const GatesRaw<A>& g, A c0, A n0, A m0, A dy,
                                                   A dc, A dn, A dm) {
  const A lf_m = math::logsigmoid(g.f) + m0;
  const bool select_i = (n0 == A(0)) || !(g.i < lf_m);  // math::max(a, b) keeps a unless a < b
  const A m = select_i ? g.i : lf_m;
  const A ig = math::exp(g.i - m);
  const A fg = math::exp(lf_m - m);
  const A tz = math::tanh(g.z);
  const A c = forget_term(fg, c0) + ig * tz;
  const A n = forget_term(fg, n0) + ig;
  const A og = math::sigmoid(g.o);
  const A inv_n = A(1) / n;

  CellGrad<A> r;
  r.d.o = dy * c * inv_n * math::sigmoid_grad(g.o);
  const A dc_total = dc + dy * og * inv_n;
  const A dn_total = dn - dy * og * c * inv_n * inv_n;
  const A dfg = dc_total * c0 + dn_total * n0;
  const A dig = dc_total * tz + dn_total;
  r.d.z = dc_total * ig * math::tanh_grad(g.z);
  r.dc0 = dc_total * fg;
  r.dn0 = dn_total * fg;
  // ig = exp(i - m), fg = exp(lf_m - m)
  const A gi = dig * ig;
  const A gf = forget_term(fg, dfg);  // 0 from the zero state (dfg = 0), even where fg is inf
  const A dm_total = dm - gi - gf;
  A di = gi, dlf_m = gf;
  if (select_i) {
    di += dm_total;
  } else {
    dlf_m += dm_total;
  }
  r.d.i = di;
  r.d.f = dlf_m * math::logsigmoid_grad(g.f);
  r.dm0 = dlf_m;  // lf_m = logsigmoid(f) + m0
  return r;
}

}  // namespace moxe::slstm::detail
