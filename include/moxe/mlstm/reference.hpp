// moxe::mlstm::reference: host reference of the mLSTM cell (forward, exact backward, and
// one decoding step), in the recurrent form of the definition (docs/mlstm.md).
//
// Host C++ only: compiles with a plain C++17 compiler and no CUDA. Any element type T that
// converts to and from float (float, double, and __half / __nv_bfloat16 when their headers
// are included by the caller); all arithmetic in Acc (double all the way for Acc = double).
// Pointers are host memory, segment_offsets included.
#pragma once

#include <cstddef>
#include <cstdint>
#include <new>
#include <type_traits>
#include <vector>

#include "moxe/core/math.hpp"
#include "moxe/core/status.hpp"
#include "moxe/mlstm/detail/cell.hpp"
#include "moxe/mlstm/params.hpp"

namespace moxe::mlstm::reference {

namespace impl {

template <class Acc, class T>
inline Acc load(T x) {
  if constexpr (std::is_arithmetic_v<T>) {
    return static_cast<Acc>(x);
  } else {
    return static_cast<Acc>(static_cast<float>(x));  // __half, __nv_bfloat16
  }
}

template <class T, class Acc>
inline T store(Acc x) {
  if constexpr (std::is_arithmetic_v<T>) {
    return static_cast<T>(x);
  } else {
    return T(static_cast<float>(x));
  }
}

/// The host-side checks of a segment description: offsets[0] == 0, non-decreasing,
/// offsets[num_segments] == seq_len.
template <class T, class Acc>
Status validate_segments(const ForwardParams<T, Acc>& p) {
  if (p.segment_offsets == nullptr) return Status::ok;
  const int64_t* o = p.segment_offsets;
  MOXE_REQUIRE(o[0] == 0);
  for (int64_t s = 0; s < p.num_segments; ++s) MOXE_REQUIRE(o[s + 1] >= o[s]);
  MOXE_REQUIRE(o[p.num_segments] == p.dims.seq_len);
  return Status::ok;
}

/// One independent recurrence: `length` consecutive token rows starting at row `begin` of
/// the [B * NH * S] rows of q, k, v, h and the gates; its states live at index `state`.
struct Slot {
  int64_t begin, length, state;
};

template <class T, class Acc>
Slot slot_of(const ForwardParams<T, Acc>& p, int64_t state) {
  const int64_t S = p.dims.seq_len;
  if (p.segment_offsets == nullptr) return Slot{state * S, S, state};
  const int64_t segment = state / p.dims.heads, head = state % p.dims.heads;
  const int64_t* o = p.segment_offsets;
  return Slot{head * S + o[segment], o[segment + 1] - o[segment], state};
}

/// The states of one slot and the scratch one step needs, all in Acc.
template <class Acc>
struct Cell {
  int64_t dqk, dv;
  Acc scale, eps;
  std::vector<Acc> c, n;  // [DQK, DV], [DQK]
  Acc m = Acc(0);
  std::vector<Acc> qs, k, v;  // the step's inputs, q already scaled

  Cell(int64_t dqk_, int64_t dv_, Acc scale_, Acc eps_)
      : dqk(dqk_), dv(dv_), scale(scale_), eps(eps_), c(dqk_ * dv_), n(dqk_), qs(dqk_), k(dqk_),
        v(dv_) {}

  void reset(const Acc* c0, const Acc* n0, const Acc* m0) {
    for (int64_t i = 0; i < dqk * dv; ++i) c[i] = c0 ? c0[i] : Acc(0);
    for (int64_t a = 0; a < dqk; ++a) n[a] = n0 ? n0[a] : Acc(0);
    m = m0 ? *m0 : Acc(0);
  }

  template <class T>
  void load_inputs(const T* q_row, const T* k_row, const T* v_row) {
    for (int64_t a = 0; a < dqk; ++a) {
      qs[a] = load<Acc>(q_row[a]) * scale;
      k[a] = load<Acc>(k_row[a]);
    }
    for (int64_t j = 0; j < dv; ++j) v[j] = load<Acc>(v_row[j]);
  }

  /// The state update of one step from (c, n, m) in place; returns the gate scalars.
  detail::GateStep<Acc> update(Acc igate, Acc fgate) {
    const detail::GateStep<Acc> g = detail::gate_step(igate, fgate, m);
    for (int64_t a = 0; a < dqk; ++a) {
      n[a] = g.f_scale * n[a] + g.i_scale * k[a];
      const Acc ik = g.i_scale * k[a];
      Acc* row = c.data() + a * dv;
      for (int64_t j = 0; j < dv; ++j) row[j] = g.f_scale * row[j] + ik * v[j];
    }
    m = g.m;
    return g;
  }

  /// n . qs with the current state.
  Acc n_dot_q() const {
    Acc dot = Acc(0);
    for (int64_t a = 0; a < dqk; ++a) dot += n[a] * qs[a];
    return dot;
  }

  /// (C^T qs)_j with the current state.
  Acc c_dot_q(int64_t j) const {
    Acc num = Acc(0);
    for (int64_t a = 0; a < dqk; ++a) num += c[a * dv + j] * qs[a];
    return num;
  }

  /// One full forward step: update the states, write h.
  template <class T>
  void forward_step(const T* q_row, const T* k_row, const T* v_row, T igate, T fgate, T* h_row) {
    load_inputs(q_row, k_row, v_row);
    update(load<Acc>(igate), load<Acc>(fgate));
    const Acc inv_den = detail::normaliser(n_dot_q(), m, eps).inv_den;
    for (int64_t j = 0; j < dv; ++j) h_row[j] = store<T>(c_dot_q(j) * inv_den);
  }

  void store_states(Acc* c_out, Acc* n_out, Acc* m_out) const {
    for (int64_t i = 0; i < dqk * dv; ++i) c_out[i] = c[i];
    for (int64_t a = 0; a < dqk; ++a) n_out[a] = n[a];
    *m_out = m;
  }
};

/// Saved states (C, n, m) of a slot at a number of time steps.
template <class Acc>
struct StateStore {
  int64_t c_size, n_size;
  std::vector<Acc> c, n, m;
  StateStore(int64_t count, int64_t dqk, int64_t dv)
      : c_size(dqk * dv), n_size(dqk), c(count * dqk * dv), n(count * dqk), m(count) {}
  void save(int64_t i, const Cell<Acc>& cell) {
    cell.store_states(c.data() + i * c_size, n.data() + i * n_size, m.data() + i);
  }
  void restore(int64_t i, Cell<Acc>& cell) const {
    cell.reset(c.data() + i * c_size, n.data() + i * n_size, m.data() + i);
  }
};

}  // namespace impl

/// Forward over the whole sequence: h, and the final states when c_last is given.
template <class T, class Acc>
Status forward(const ForwardParams<T, Acc>& p) {
  MOXE_RETURN_IF_ERROR(validate(p));
  MOXE_RETURN_IF_ERROR(impl::validate_segments(p));
  const Dims& d = p.dims;
  const Acc scale = effective_qk_scale(p.qk_scale, d.dqk);
  const int64_t slots = state_slots(d, p.num_segments);
  try {
    impl::Cell<Acc> cell(d.dqk, d.dv, scale, p.eps);
    for (int64_t s = 0; s < slots; ++s) {
      const impl::Slot slot = impl::slot_of(p, s);
      if (p.c_init) {
        cell.reset(p.c_init + s * d.dqk * d.dv, p.n_init + s * d.dqk, p.m_init + s);
      } else {
        cell.reset(nullptr, nullptr, nullptr);
      }
      for (int64_t t = slot.begin; t < slot.begin + slot.length; ++t) {
        cell.forward_step(p.q + t * d.dqk, p.k + t * d.dqk, p.v + t * d.dv, p.igate[t], p.fgate[t],
                          p.h + t * d.dv);
      }
      if (p.c_last) cell.store_states(p.c_last + s * d.dqk * d.dv, p.n_last + s * d.dqk, p.m_last + s);
    }
  } catch (const std::bad_alloc&) {
    return Status::unsupported;  // host memory for the states could not be had
  }
  return Status::ok;
}

/// One decoding step for every (batch, head): states updated in place, h written. Equals
/// forward() with S = 1 started from the given states.
template <class T, class Acc>
Status step(const StepParams<T, Acc>& p) {
  MOXE_RETURN_IF_ERROR(validate(p));
  const Acc scale = effective_qk_scale(p.qk_scale, p.dqk);
  const int64_t cs = p.dqk * p.dv;
  try {
    impl::Cell<Acc> cell(p.dqk, p.dv, scale, p.eps);
    for (int64_t s = 0; s < p.batch * p.heads; ++s) {
      cell.reset(p.c + s * cs, p.n + s * p.dqk, p.m + s);
      cell.forward_step(p.q + s * p.dqk, p.k + s * p.dqk, p.v + s * p.dv, p.igate[s], p.fgate[s],
                        p.h + s * p.dv);
      cell.store_states(p.c + s * cs, p.n + s * p.dqk, p.m + s);
    }
  } catch (const std::bad_alloc&) {
    return Status::unsupported;
  }
  return Status::ok;
}

/// The exact gradient of the definition (docs/mlstm.md, "Backward"). Backpropagation
/// through time over (C, n, m); the forward states are recomputed from checkpoints every
/// ceil(sqrt(S)) steps, so memory stays O(sqrt(S) DQK DV) per slot.
template <class T, class Acc>
Status backward(const BackwardParams<T, Acc>& p) {
  MOXE_RETURN_IF_ERROR(validate(p));
  MOXE_RETURN_IF_ERROR(impl::validate_segments(p.fwd));
  const ForwardParams<T, Acc>& f = p.fwd;
  const Dims& d = f.dims;
  const int64_t DQK = d.dqk, DV = d.dv, cs = DQK * DV;
  const Acc scale = effective_qk_scale(f.qk_scale, DQK);
  const int64_t slots = state_slots(d, f.num_segments);
  int64_t block = 1;
  while (block * block < d.seq_len) ++block;
  const int64_t max_blocks = (d.seq_len + block - 1) / block;

  try {
    impl::Cell<Acc> cell(DQK, DV, scale, f.eps);
    impl::StateStore<Acc> checkpoints(max_blocks, DQK, DV);
    impl::StateStore<Acc> prev(block, DQK, DV);  // the states before each step of a block
    std::vector<Acc> dc(cs), dn(DQK), c_prev(cs), n_prev(DQK), dnum(DV), dcv(DQK);

    for (int64_t s = 0; s < slots; ++s) {
      const impl::Slot slot = impl::slot_of(f, s);
      const Acc* c0 = f.c_init ? f.c_init + s * cs : nullptr;
      const Acc* n0 = f.c_init ? f.n_init + s * DQK : nullptr;
      const Acc* m0 = f.c_init ? f.m_init + s : nullptr;

      // forward: the states at the start of every block
      cell.reset(c0, n0, m0);
      const int64_t blocks = (slot.length + block - 1) / block;
      for (int64_t t = 0; t < slot.length; ++t) {
        if (t % block == 0) checkpoints.save(t / block, cell);
        const int64_t r = slot.begin + t;
        cell.load_inputs(f.q + r * DQK, f.k + r * DQK, f.v + r * DV);
        cell.update(impl::load<Acc>(f.igate[r]), impl::load<Acc>(f.fgate[r]));
      }

      // upstream gradients of the final states
      for (int64_t i = 0; i < cs; ++i) dc[i] = p.dc_last ? p.dc_last[s * cs + i] : Acc(0);
      for (int64_t a = 0; a < DQK; ++a) dn[a] = p.dn_last ? p.dn_last[s * DQK + a] : Acc(0);
      Acc dm = p.dm_last ? p.dm_last[s] : Acc(0);

      for (int64_t b = blocks - 1; b >= 0; --b) {
        const int64_t t0 = b * block;
        const int64_t t1 = t0 + block < slot.length ? t0 + block : slot.length;
        checkpoints.restore(b, cell);
        for (int64_t t = t0; t < t1; ++t) {
          prev.save(t - t0, cell);
          const int64_t r = slot.begin + t;
          cell.load_inputs(f.q + r * DQK, f.k + r * DQK, f.v + r * DV);
          cell.update(impl::load<Acc>(f.igate[r]), impl::load<Acc>(f.fgate[r]));
        }
        for (int64_t t = t1 - 1; t >= t0; --t) {
          const int64_t r = slot.begin + t;
          // recompute step t from the state before it
          prev.restore(t - t0, cell);
          for (int64_t i = 0; i < cs; ++i) c_prev[i] = cell.c[i];
          for (int64_t a = 0; a < DQK; ++a) n_prev[a] = cell.n[a];
          cell.load_inputs(f.q + r * DQK, f.k + r * DQK, f.v + r * DV);
          const Acc ig = impl::load<Acc>(f.igate[r]), fg = impl::load<Acc>(f.fgate[r]);
          const detail::GateStep<Acc> g = cell.update(ig, fg);
          const Acc dot = cell.n_dot_q();
          const detail::Normaliser<Acc> nz = detail::normaliser(dot, g.m, f.eps);

          // h_j = num_j / den
          const T* dh = p.dh + r * DV;
          Acc dh_dot_h = Acc(0);
          for (int64_t j = 0; j < DV; ++j) {
            const Acc dhj = impl::load<Acc>(dh[j]);
            dnum[j] = dhj * nz.inv_den;
            dh_dot_h += dhj * (cell.c_dot_q(j) * nz.inv_den);
          }
          const detail::NormaliserGrad<Acc> ng = detail::normaliser_backward(dot, nz, dh_dot_h);
          dm += ng.dm;

          // num = C^T qs, dot = n . qs: into dC, dn and dq
          for (int64_t a = 0; a < DQK; ++a) {
            Acc dqs = ng.ddot * cell.n[a];
            const Acc* c_row = cell.c.data() + a * DV;
            Acc* dc_row = dc.data() + a * DV;
            for (int64_t j = 0; j < DV; ++j) {
              dqs += c_row[j] * dnum[j];
              dc_row[j] += cell.qs[a] * dnum[j];
            }
            dn[a] += ng.ddot * cell.qs[a];
            p.dq[r * DQK + a] = impl::store<T>(dqs * scale);
          }

          // C = f_scale C_prev + i_scale k v^T, n = f_scale n_prev + i_scale k
          Acc df_scale = Acc(0), di_scale = Acc(0);
          for (int64_t a = 0; a < DQK; ++a) {
            const Acc* dc_row = dc.data() + a * DV;
            const Acc* cp_row = c_prev.data() + a * DV;
            Acc dcv_a = Acc(0);
            for (int64_t j = 0; j < DV; ++j) {
              df_scale += dc_row[j] * cp_row[j];
              dcv_a += dc_row[j] * cell.v[j];
            }
            df_scale += dn[a] * n_prev[a];
            dcv[a] = dcv_a + dn[a];
            di_scale += cell.k[a] * dcv[a];
            p.dk[r * DQK + a] = impl::store<T>(g.i_scale * dcv[a]);
          }
          for (int64_t j = 0; j < DV; ++j) {
            Acc dvj = Acc(0);
            for (int64_t a = 0; a < DQK; ++a) dvj += dc[a * DV + j] * cell.k[a];
            p.dv[r * DV + j] = impl::store<T>(g.i_scale * dvj);
          }
          const detail::GateGrad<Acc> gg = detail::gate_step_backward(fg, g, df_scale, di_scale, dm);
          p.digate[r] = impl::store<T>(gg.digate);
          p.dfgate[r] = impl::store<T>(gg.dfgate);

          // to the states before step t
          for (int64_t i = 0; i < cs; ++i) dc[i] *= g.f_scale;
          for (int64_t a = 0; a < DQK; ++a) dn[a] *= g.f_scale;
          dm = gg.dm_prev;
        }
      }

      if (p.dc_init) {
        for (int64_t i = 0; i < cs; ++i) p.dc_init[s * cs + i] = dc[i];
        for (int64_t a = 0; a < DQK; ++a) p.dn_init[s * DQK + a] = dn[a];
        p.dm_init[s] = dm;
      }
    }
  } catch (const std::bad_alloc&) {
    return Status::unsupported;
  }
  return Status::ok;
}

}  // namespace moxe::mlstm::reference
