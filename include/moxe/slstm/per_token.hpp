// moxe::slstm per-token: every (step, batch) position its own length-1 sequence from the
// zero state, as the per-token sLSTM experts of a MoxE layer run the cell. From y_0 = c_0 =
// n_0 = m_0 = 0 the recurrent product is zero and the cell collapses to a pointwise map of
// the raw gates raw_g = wx_g + bias_g:
//
//   m = i (n_0 = 0);  c = tanh(z);  n = 1;  y = sigmoid(o) tanh(z)
//
// computed here by the cell's own scalar functions (detail/cell.hpp) on zero states, so the
// numbers are those of the sequence path at its first step; r is not read (its gradient is
// zero: dr = sum dgates y_0^T with y_0 = 0). Backward: dwx from the cell's exact gradient,
// dbias = sum over positions of dwx, dr = 0.
//
// This header: the checks and the host implementation reference::per_token_forward /
// per_token_backward (any T, Acc). per_token.cuh: the device.
#pragma once

#include <cstdint>

#include "moxe/core/status.hpp"
#include "moxe/slstm/detail/cell.hpp"
#include "moxe/slstm/params.hpp"

namespace moxe::slstm {

/// The checks of the per-token path on top of validate(): no initial or final states, no
/// tape and no state gradients (Status::unsupported): those belong to sequence_* and step().
template <class T, class Acc>
Status validate_per_token(const ForwardParams<T, Acc>& p, bool need_y) {
  MOXE_RETURN_IF_ERROR(validate(p, need_y));
  if (p.y_init || p.y_last || has_tape(p)) return Status::unsupported;
  return Status::ok;
}

template <class T, class Acc>
Status validate_per_token(const BackwardParams<T, Acc>& b) {
  MOXE_RETURN_IF_ERROR(validate(b));
  MOXE_RETURN_IF_ERROR(validate_per_token(b.fwd, /*need_y=*/false));
  if (b.dy_last || b.dy_init) return Status::unsupported;
  return Status::ok;
}

namespace detail {

/// The raw gates of one unit at one position: wx + bias (the recurrent term of y_0 = 0 is
/// zero; gate_preactivation adds it in the sequence path's order).
template <class A>
MOXE_HD MOXE_FORCEINLINE GatesRaw<A> per_token_gates(A wx_i, A wx_f, A wx_z, A wx_o, A b_i, A b_f, A b_z, A b_o) {
  return {gate_preactivation(wx_i, A(0), b_i), gate_preactivation(wx_f, A(0), b_f),
          gate_preactivation(wx_z, A(0), b_z), gate_preactivation(wx_o, A(0), b_o)};
}

}  // namespace detail

namespace reference {

namespace detail_ref {

/// The raw gates of unit u at position r (wx [positions, 4, H], bias [4, H]), in Acc.
template <class T, class Acc>
slstm::detail::GatesRaw<Acc> per_token_gates_at(const ForwardParams<T, Acc>& p, int64_t r, int64_t u, int64_t H) {
  auto acc = [](T x) { return static_cast<Acc>(x); };
  const T* wx = p.wx + r * 4 * H + u;
  return slstm::detail::per_token_gates(acc(wx[0]), acc(wx[H]), acc(wx[2 * H]), acc(wx[3 * H]), acc(p.bias[u]),
                                        acc(p.bias[H + u]), acc(p.bias[2 * H + u]), acc(p.bias[3 * H + u]));
}

}  // namespace detail_ref

/// y [S, B, NH, DH]: every (t, b) a length-1 sequence from the zero state.
template <class T, class Acc>
Status per_token_forward(const ForwardParams<T, Acc>& p) {
  MOXE_RETURN_IF_ERROR(validate_per_token(p, /*need_y=*/true));
  const Dims& d = p.dims;
  const int64_t H = hidden(d), positions = d.seq_len * d.batch;
  for (int64_t r = 0; r < positions; ++r)
    for (int64_t u = 0; u < H; ++u) {
      const auto g = detail_ref::per_token_gates_at(p, r, u, H);
      p.y[r * H + u] = static_cast<T>(detail::cell_forward(g, Acc(0), Acc(0), Acc(0)).y);
    }
  return Status::ok;
}

/// dwx, dbias (summed over positions in order) and dr (zero) of per_token_forward.
template <class T, class Acc>
Status per_token_backward(const BackwardParams<T, Acc>& b) {
  MOXE_RETURN_IF_ERROR(validate_per_token(b));
  const ForwardParams<T, Acc>& p = b.fwd;
  const Dims& d = p.dims;
  const int64_t H = hidden(d), positions = d.seq_len * d.batch;
  for (int64_t u = 0; u < H; ++u) {
    Acc sum[4] = {Acc(0), Acc(0), Acc(0), Acc(0)};
    for (int64_t r = 0; r < positions; ++r) {
      const auto g = detail_ref::per_token_gates_at(p, r, u, H);
      const auto cg = detail::cell_backward(g, Acc(0), Acc(0), Acc(0), static_cast<Acc>(b.dy[r * H + u]), Acc(0),
                                            Acc(0), Acc(0));
      const Acc dg[4] = {cg.d.i, cg.d.f, cg.d.z, cg.d.o};
      for (int gate = 0; gate < 4; ++gate) {
        b.dwx[r * 4 * H + gate * H + u] = static_cast<T>(dg[gate]);
        sum[gate] += dg[gate];
      }
    }
    for (int gate = 0; gate < 4; ++gate) b.dbias[gate * H + u] = static_cast<T>(sum[gate]);
  }
  for (int64_t i = 0; i < d.heads * 4 * d.head_dim * d.head_dim; ++i) b.dr[i] = static_cast<T>(Acc(0));
  return Status::ok;
}

}  // namespace reference

}  // namespace moxe::slstm
