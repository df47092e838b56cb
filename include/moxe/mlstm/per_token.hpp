// moxe::mlstm per-token: every position its own length-1 sequence from the zero state, as
// the per-token experts of a MoxE layer run the mLSTM cell (the paper's code). With
// C_0 = 0, n_0 = 0, m_0 = 0 the recurrence of docs/mlstm.md collapses to a closed form per
// (position, head):
//
//   m = max(logsigmoid(f), i);  a = exp(i - m);  s = k . qs   (qs = q * qk_scale)
//   h = a s v / (max(|a s|, exp(-m)) + eps)
//
// (C_1 = a k v^T and n_1 = a k, so C_1^T qs = a s v and n_1 . qs = a s.) The same function
// the chunkwise and recurrent paths compute at seq_len 1, without a DQK x DV state per
// position: two dot products and a scale. Backward: the exact gradient through every path
// (both max branches and eps, ties as the recurrence takes them), from the scalar pieces
// the recurrence itself uses (detail/cell.hpp); on the |n.q| branch of the normaliser the
// gradient of n.q is the small eps / den^2, computed as such rather than as a difference.
//
// This header: the shared scalars, the checks, and the host implementation
// reference::per_token_forward / per_token_backward (any T, Acc). per_token.cuh: the device.
#pragma once

#include <cstdint>

#include "moxe/core/config.hpp"
#include "moxe/core/math.hpp"
#include "moxe/core/status.hpp"
#include "moxe/mlstm/detail/cell.hpp"
#include "moxe/mlstm/params.hpp"
#include "moxe/mlstm/reference.hpp"

namespace moxe::mlstm {

namespace detail {

/// The scalars of one (position, head) from its dot product s = k . qs.
template <class A>
struct PerTokenScalars {
  GateStep<A> gate;    ///< the stabiliser step from m_prev = 0
  A nq;                ///< n . qs = a s (also C^T qs = a s v)
  Normaliser<A> norm;  ///< of den = max(|a s|, exp(-m)) + eps
  A h_scale;           ///< h = h_scale * v
};

template <class A>
MOXE_HD MOXE_FORCEINLINE PerTokenScalars<A> per_token_scalars(A igate, A fgate, A s, A eps) {
  PerTokenScalars<A> r;
  r.gate = gate_step(igate, fgate, A(0));
  r.nq = r.gate.i_scale * s;
  r.norm = normaliser(r.nq, r.gate.m, eps);
  r.h_scale = r.nq * r.norm.inv_den;
  return r;
}

/// The backward's scalars from s = k . qs and g = dh . v:
///   dv = h_scale dh;  dq = ds qk_scale k;  dk = ds qs;  digate, dfgate.
template <class A>
struct PerTokenGrad {
  A h_scale;
  A ds;
  A digate, dfgate;
};

template <class A>
MOXE_HD MOXE_FORCEINLINE PerTokenGrad<A> per_token_grad(A igate, A fgate, A s, A g, A eps) {
  const PerTokenScalars<A> f = per_token_scalars(igate, fgate, s, eps);
  // h = nq v / den, den = max(|nq|, exp(-m)) + eps; the branch is normaliser()'s.
  //   |nq| branch:   dh/dnq = v (den - |nq|) / den^2 = v eps / den^2. Written so, not as
  //                  the difference g / den - |nq| g / den^2 of two nearly equal terms
  //                  (which loses |nq| / eps of relative precision).
  //   exp(-m) branch: dh/dnq = v / den, and m moves the floor: dm = nq g exp(-m) / den^2.
  // (Products of the normaliser's ratios, never den^2 or exp(-m), which leave float's
  // range for large |m|.)
  const A g_den = g * f.norm.inv_den;
  A dnq, dm;
  if (!f.norm.on_floor) {
    dnq = g_den * (eps * f.norm.inv_den);
    dm = A(0);
  } else {
    dnq = g_den;
    dm = f.nq * g_den * f.norm.floor_share;
  }
  // nq = a s: a is the gate's i_scale; f_scale multiplies the zero states (no gradient)
  const GateGrad<A> gg = gate_step_backward(fgate, f.gate, A(0), dnq * s, dm);
  PerTokenGrad<A> r;
  r.h_scale = f.h_scale;
  r.ds = dnq * f.gate.i_scale;
  r.digate = gg.digate;
  r.dfgate = gg.dfgate;
  return r;
}

}  // namespace detail

/// The checks of the per-token path on top of validate(): it has no states (the zero state
/// at every position; initial and final states, and segments, are the chunkwise path's and
/// step()'s business), so those pointers must be null: Status::unsupported otherwise.
template <class T, class Acc>
Status validate_per_token(const ForwardParams<T, Acc>& p, bool need_h) {
  MOXE_RETURN_IF_ERROR(validate(p, need_h));
  if (p.c_init || p.n_init || p.m_init || p.c_last || p.n_last || p.m_last || p.segment_offsets)
    return Status::unsupported;
  return Status::ok;
}

template <class T, class Acc>
Status validate_per_token(const BackwardParams<T, Acc>& b) {
  MOXE_RETURN_IF_ERROR(validate(b));
  MOXE_RETURN_IF_ERROR(validate_per_token(b.fwd, /*need_h=*/false));
  if (b.dc_last || b.dn_last || b.dm_last || b.dc_init || b.dn_init || b.dm_init) return Status::unsupported;
  return Status::ok;
}

namespace reference {

/// h for every (b, head, s) of [B, NH, S] as a length-1 sequence from the zero state.
template <class T, class Acc>
Status per_token_forward(const ForwardParams<T, Acc>& p) {
  MOXE_RETURN_IF_ERROR(validate_per_token(p, /*need_h=*/true));
  const Dims& d = p.dims;
  const Acc scale = effective_qk_scale(p.qk_scale, d.dqk);
  const int64_t rows = d.batch * d.heads * d.seq_len;
  for (int64_t r = 0; r < rows; ++r) {
    Acc s = 0;
    for (int64_t j = 0; j < d.dqk; ++j)
      s += impl::load<Acc>(p.q[r * d.dqk + j]) * scale * impl::load<Acc>(p.k[r * d.dqk + j]);
    const auto f = detail::per_token_scalars(impl::load<Acc>(p.igate[r]), impl::load<Acc>(p.fgate[r]), s, p.eps);
    for (int64_t e = 0; e < d.dv; ++e) p.h[r * d.dv + e] = impl::store<T>(f.h_scale * impl::load<Acc>(p.v[r * d.dv + e]));
  }
  return Status::ok;
}

/// dq, dk, dv, digate, dfgate of per_token_forward (the exact gradient).
template <class T, class Acc>
Status per_token_backward(const BackwardParams<T, Acc>& b) {
  MOXE_RETURN_IF_ERROR(validate_per_token(b));
  const ForwardParams<T, Acc>& p = b.fwd;
  const Dims& d = p.dims;
  const Acc scale = effective_qk_scale(p.qk_scale, d.dqk);
  const int64_t rows = d.batch * d.heads * d.seq_len;
  for (int64_t r = 0; r < rows; ++r) {
    Acc s = 0, g = 0;
    for (int64_t j = 0; j < d.dqk; ++j)
      s += impl::load<Acc>(p.q[r * d.dqk + j]) * scale * impl::load<Acc>(p.k[r * d.dqk + j]);
    for (int64_t e = 0; e < d.dv; ++e) g += impl::load<Acc>(b.dh[r * d.dv + e]) * impl::load<Acc>(p.v[r * d.dv + e]);
    const auto gr = detail::per_token_grad(impl::load<Acc>(p.igate[r]), impl::load<Acc>(p.fgate[r]), s, g, p.eps);
    for (int64_t j = 0; j < d.dqk; ++j) {
      b.dq[r * d.dqk + j] = impl::store<T>(gr.ds * scale * impl::load<Acc>(p.k[r * d.dqk + j]));
      b.dk[r * d.dqk + j] = impl::store<T>(gr.ds * scale * impl::load<Acc>(p.q[r * d.dqk + j]));
    }
    for (int64_t e = 0; e < d.dv; ++e) b.dv[r * d.dv + e] = impl::store<T>(gr.h_scale * impl::load<Acc>(b.dh[r * d.dv + e]));
    b.digate[r] = impl::store<T>(gr.digate);
    b.dfgate[r] = impl::store<T>(gr.dfgate);
  }
  return Status::ok;
}

}  // namespace reference

}  // namespace moxe::mlstm
