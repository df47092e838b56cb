// moxe::slstm::reference: host references of the sLSTM sequence forward and its exact
// backward through time (host C++ only; any T/Acc, double all the way through for double).
//
// They differ from the device kernels only in the order of the loops: the cell arithmetic
// is the same detail::cell_forward / detail::cell_backward.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "moxe/core/status.hpp"
#include "moxe/slstm/detail/cell.hpp"
#include "moxe/slstm/detail/plan.hpp"
#include "moxe/slstm/params.hpp"

namespace moxe::slstm::reference {

namespace detail_ref {

template <class Acc, class T>
inline Acc to_acc(T x) {
  return static_cast<Acc>(x);
}

/// What the backward needs from the forward, all in Acc: raw gates [S,B,4,NH,DH], the
/// states after each step [S,B,NH,DH], and the outputs y_t in Acc.
template <class Acc>
struct Tape {
  std::vector<Acc> gates, c, n, m, y;
};

/// The forward over the whole sequence; fills `tape` when given. Validated params only.
template <class T, class Acc>
void run_forward(const ForwardParams<T, Acc>& p, Tape<Acc>* tape) {
  using namespace moxe::slstm::detail;
  const int64_t S = p.dims.seq_len, B = p.dims.batch, NH = p.dims.heads, DH = p.dims.head_dim;
  const int64_t units = B * NH * DH;
  std::vector<Acc> y(units, Acc(0)), c(units, Acc(0)), n(units, Acc(0)), m(units, Acc(0));
  if (p.y_init) {
    for (int64_t i = 0; i < units; ++i) {
      y[i] = p.y_init[i];
      c[i] = p.c_init[i];
      n[i] = p.n_init[i];
      m[i] = p.m_init[i];
    }
  }
  if (tape) {
    tape->gates.assign(S * units * 4, Acc(0));
    tape->c.assign(S * units, Acc(0));
    tape->n.assign(S * units, Acc(0));
    tape->m.assign(S * units, Acc(0));
    tape->y.assign(S * units, Acc(0));
  }
  std::vector<Acc> raw(4 * DH);
  std::vector<Acc> y_next(units);
  for (int64_t t = 0; t < S; ++t) {
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t h = 0; h < NH; ++h) {
        const Acc* y_prev = &y[unit_index(0, b, h, 0, B, NH, DH)];
        for (int g = 0; g < 4; ++g) {
          for (int64_t j = 0; j < DH; ++j) {
            Acc rec = Acc(0);
            for (int64_t d = 0; d < DH; ++d) rec += to_acc<Acc>(p.r[r_index(h, g, j, d, DH)]) * y_prev[d];
            raw[g * DH + j] = gate_preactivation(to_acc<Acc>(p.wx[gate_index(t, b, g, h, j, B, NH, DH)]), rec,
                                                 to_acc<Acc>(p.bias[bias_index(g, h, j, NH, DH)]));
          }
        }
        for (int64_t j = 0; j < DH; ++j) {
          const int64_t u = unit_index(0, b, h, j, B, NH, DH);
          const GatesRaw<Acc> gr{raw[j], raw[DH + j], raw[2 * DH + j], raw[3 * DH + j]};
          const CellOut<Acc> o = cell_forward(gr, c[u], n[u], m[u]);
          c[u] = o.c;
          n[u] = o.n;
          m[u] = o.m;
          y_next[u] = o.y;
          p.y[t * units + u] = static_cast<T>(o.y);
          if (tape) {
            for (int g = 0; g < 4; ++g) tape->gates[gate_index(t, b, g, h, j, B, NH, DH)] = raw[g * DH + j];
            tape->c[t * units + u] = o.c;
            tape->n[t * units + u] = o.n;
            tape->m[t * units + u] = o.m;
            tape->y[t * units + u] = o.y;
          }
        }
      }
    }
    y.swap(y_next);
  }
  if (p.y_last) {
    for (int64_t i = 0; i < units; ++i) {
      p.y_last[i] = y[i];
      p.c_last[i] = c[i];
      p.n_last[i] = n[i];
      p.m_last[i] = m[i];
    }
  }
}

}  // namespace detail_ref

/// y_t for t = 1..S, (optionally) the final states and (optionally) the tape: raw gates and
/// states of every step. See docs/slstm.md.
template <class T, class Acc>
Status forward(const ForwardParams<T, Acc>& p) {
  MOXE_RETURN_IF_ERROR(validate(p));
  if (!has_tape(p)) {
    detail_ref::run_forward(p, static_cast<detail_ref::Tape<Acc>*>(nullptr));
    return Status::ok;
  }
  detail_ref::Tape<Acc> tape;
  detail_ref::run_forward(p, &tape);
  for (std::size_t i = 0; i < tape.gates.size(); ++i) p.tape_gates[i] = tape.gates[i];
  for (std::size_t i = 0; i < tape.c.size(); ++i) {
    p.tape_c[i] = tape.c[i];
    p.tape_n[i] = tape.n[i];
    p.tape_m[i] = tape.m[i];
  }
  return Status::ok;
}

/// One decoding step: the states (y, c, n, m) are read and updated in place.
template <class T, class Acc>
Status step(const StepParams<T, Acc>& p) {
  MOXE_RETURN_IF_ERROR(validate(p));
  // run_forward copies the initial states before it writes the final ones: aliasing is safe
  detail_ref::run_forward(as_forward(p), static_cast<detail_ref::Tape<Acc>*>(nullptr));
  return Status::ok;
}

/// The exact gradient through time: dwx, dr, dbias and (optionally) dy_init, dc_init,
/// dn_init, dm_init, given dy and (optionally) the upstream gradients of the final y, c, n,
/// m. With the m gradients a sequence run as chained calls (the final states of one the
/// initial states of the next, dm_init of one the dm_last of the other) gets the gradients
/// of the sequence run whole.
template <class T, class Acc>
Status backward(const BackwardParams<T, Acc>& p) {
  using namespace moxe::slstm::detail;
  MOXE_RETURN_IF_ERROR(validate(p));
  const ForwardParams<T, Acc>& f = p.fwd;
  const int64_t S = f.dims.seq_len, B = f.dims.batch, NH = f.dims.heads, DH = f.dims.head_dim;
  const int64_t units = B * NH * DH;

  // Replay the forward into a tape (y goes to a scratch copy: fwd.y is not written). The
  // caller's tape (fwd.tape_*), checked by validate, is not read: the replay is in Acc.
  std::vector<T> y_scratch(S * units);
  ForwardParams<T, Acc> replay = f;
  replay.y = y_scratch.data();
  replay.y_last = replay.c_last = replay.n_last = replay.m_last = nullptr;
  replay.tape_gates = replay.tape_c = replay.tape_n = replay.tape_m = nullptr;
  detail_ref::Tape<Acc> tape;
  detail_ref::run_forward(replay, &tape);

  std::vector<Acc> dr(NH * 4 * DH * DH, Acc(0)), dbias(4 * NH * DH, Acc(0));
  std::vector<Acc> dc(units, Acc(0)), dn(units, Acc(0)), dm(units, Acc(0)), dy_rec(units, Acc(0));
  if (p.dy_last) {
    for (int64_t i = 0; i < units; ++i) {
      dy_rec[i] = p.dy_last[i];
      dc[i] = p.dc_last[i];
      dn[i] = p.dn_last[i];
      dm[i] = p.dm_last[i];
    }
  }
  std::vector<Acc> dgates(4 * DH);
  for (int64_t t = S - 1; t >= 0; --t) {
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t h = 0; h < NH; ++h) {
        for (int64_t j = 0; j < DH; ++j) {
          const int64_t u = unit_index(0, b, h, j, B, NH, DH);
          const GatesRaw<Acc> gr{tape.gates[gate_index(t, b, 0, h, j, B, NH, DH)],
                                 tape.gates[gate_index(t, b, 1, h, j, B, NH, DH)],
                                 tape.gates[gate_index(t, b, 2, h, j, B, NH, DH)],
                                 tape.gates[gate_index(t, b, 3, h, j, B, NH, DH)]};
          Acc c0 = Acc(0), n0 = Acc(0), m0 = Acc(0);
          if (t > 0) {
            c0 = tape.c[(t - 1) * units + u];
            n0 = tape.n[(t - 1) * units + u];
            m0 = tape.m[(t - 1) * units + u];
          } else if (f.y_init) {
            c0 = f.c_init[u];
            n0 = f.n_init[u];
            m0 = f.m_init[u];
          }
          const Acc dy_total = detail_ref::to_acc<Acc>(p.dy[t * units + u]) + dy_rec[u];
          const CellGrad<Acc> gd = cell_backward(gr, c0, n0, m0, dy_total, dc[u], dn[u], dm[u]);
          dc[u] = gd.dc0;
          dn[u] = gd.dn0;
          dm[u] = gd.dm0;
          const Acc d4[4] = {gd.d.i, gd.d.f, gd.d.z, gd.d.o};
          for (int g = 0; g < 4; ++g) {
            dgates[g * DH + j] = d4[g];
            p.dwx[gate_index(t, b, g, h, j, B, NH, DH)] = static_cast<T>(d4[g]);
            dbias[bias_index(g, h, j, NH, DH)] += d4[g];
          }
        }
        // dr += dgates y_{t-1}^T;  dy_{t-1} = r^T dgates
        for (int g = 0; g < 4; ++g) {
          for (int64_t j = 0; j < DH; ++j) {
            const Acc dg = dgates[g * DH + j];
            for (int64_t d = 0; d < DH; ++d) {
              const int64_t ud = unit_index(0, b, h, d, B, NH, DH);
              const Acc y_prev = t > 0 ? tape.y[(t - 1) * units + ud] : (f.y_init ? Acc(f.y_init[ud]) : Acc(0));
              dr[r_index(h, g, j, d, DH)] += dg * y_prev;
            }
          }
        }
        for (int64_t d = 0; d < DH; ++d) {
          Acc s = Acc(0);
          for (int g = 0; g < 4; ++g)
            for (int64_t j = 0; j < DH; ++j) s += detail_ref::to_acc<Acc>(f.r[r_index(h, g, j, d, DH)]) * dgates[g * DH + j];
          dy_rec[unit_index(0, b, h, d, B, NH, DH)] = s;
        }
      }
    }
  }
  for (size_t i = 0; i < dr.size(); ++i) p.dr[i] = static_cast<T>(dr[i]);
  for (size_t i = 0; i < dbias.size(); ++i) p.dbias[i] = static_cast<T>(dbias[i]);
  if (p.dy_init) {
    for (int64_t i = 0; i < units; ++i) {
      p.dy_init[i] = dy_rec[i];
      p.dc_init[i] = dc[i];
      p.dn_init[i] = dn[i];
      p.dm_init[i] = dm[i];
    }
  }
  return Status::ok;
}

}  // namespace moxe::slstm::reference
