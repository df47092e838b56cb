// Shared fixtures of the sLSTM tests (host and device): the inputs of one sequence problem
// as pointers, and the forward, backward and step params that point at them.
#pragma once

#include <cstdint>

#include "moxe/slstm/params.hpp"

namespace moxe::test {

/// X, in a parameter that takes no part in deduction: T and Acc come from the inputs alone,
/// so a bare nullptr can stand for an output that is not wanted.
template <class X>
struct not_deduced {
  using type = X;
};
template <class X>
using not_deduced_t = typename not_deduced<X>::type;

/// The inputs of one sequence problem, host or device pointers alike. The initial states
/// are all null when the problem has none.
template <class T, class Acc>
struct SequenceInputs {
  slstm::Dims dims;
  const T *wx, *r, *bias;                         // [S, B, 4, NH, DH], [NH, 4, DH, DH], [4, NH, DH]
  const Acc *y_init, *c_init, *n_init, *m_init;  // [B, NH, DH]
  const T* dy;                                    // [S, B, NH, DH]
  const Acc *dy_last, *dc_last, *dn_last, *dm_last;  // [B, NH, DH] upstream of the final states
};

/// The forward over `in`: y, and the final states when y_last is given.
template <class T, class Acc>
slstm::ForwardParams<T, Acc> forward_params(const SequenceInputs<T, Acc>& in, not_deduced_t<T>* y,
                                            not_deduced_t<Acc>* y_last, not_deduced_t<Acc>* c_last,
                                            not_deduced_t<Acc>* n_last, not_deduced_t<Acc>* m_last) {
  slstm::ForwardParams<T, Acc> p{};
  p.dims = in.dims;
  p.wx = in.wx;
  p.r = in.r;
  p.bias = in.bias;
  p.y_init = in.y_init;
  p.c_init = in.c_init;
  p.n_init = in.n_init;
  p.m_init = in.m_init;
  p.y = y;
  p.y_last = y_last;
  p.c_last = c_last;
  p.n_last = n_last;
  p.m_last = m_last;
  return p;
}

/// The backward over `in` (forward outputs unset), with the upstream gradients of the final
/// states when `upstream`, and the initial-state gradients when dy_init is given.
template <class T, class Acc>
slstm::BackwardParams<T, Acc> backward_params(const SequenceInputs<T, Acc>& in, bool upstream,
                                              not_deduced_t<T>* dwx, not_deduced_t<T>* dr, not_deduced_t<T>* dbias,
                                              not_deduced_t<Acc>* dy_init, not_deduced_t<Acc>* dc_init,
                                              not_deduced_t<Acc>* dn_init, not_deduced_t<Acc>* dm_init) {
  slstm::BackwardParams<T, Acc> b{};
  b.fwd = forward_params(in, nullptr, nullptr, nullptr, nullptr, nullptr);
  b.dy = in.dy;
  if (upstream) {
    b.dy_last = in.dy_last;
    b.dc_last = in.dc_last;
    b.dn_last = in.dn_last;
    b.dm_last = in.dm_last;
  }
  b.dwx = dwx;
  b.dr = dr;
  b.dbias = dbias;
  b.dy_init = dy_init;
  b.dc_init = dc_init;
  b.dn_init = dn_init;
  b.dm_init = dm_init;
  return b;
}

/// Decoding step t of the sequence `in` (its wx_t), from the states y, c, n, m (updated in
/// place) into y_out.
template <class T, class Acc>
slstm::StepParams<T, Acc> step_params(const SequenceInputs<T, Acc>& in, int64_t t, not_deduced_t<Acc>* y,
                                      not_deduced_t<Acc>* c, not_deduced_t<Acc>* n, not_deduced_t<Acc>* m,
                                      not_deduced_t<T>* y_out) {
  const slstm::Dims& d = in.dims;
  slstm::StepParams<T, Acc> s{};
  s.batch = d.batch;
  s.heads = d.heads;
  s.head_dim = d.head_dim;
  s.wx = in.wx + t * d.batch * 4 * slstm::hidden(d);
  s.r = in.r;
  s.bias = in.bias;
  s.y = y;
  s.c = c;
  s.n = n;
  s.m = m;
  s.y_out = y_out;
  return s;
}

}  // namespace moxe::test
