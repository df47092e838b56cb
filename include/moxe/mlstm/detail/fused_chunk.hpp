// moxe::mlstm::detail: the per-chunk arithmetic of the fused chunkwise mLSTM, as MOXE_HD
// pieces that the device kernels and the host twin (chunkwise_fused_host.hpp) both call. The
// math, with these names, is docs/mlstm.md "Chunkwise algorithm"; in short, per state slot
// and chunk of len rows (local row j, L = len - 1), from the stabiliser m_prev (mp) before
// the chunk:
//
//   lf_j = logsigmoid(f_j)                     hard reset at j: lf_j < -2^24 (-inf included)
//   G_j  = sum of lf_r, r in (last reset, j]   in double; 0 at a reset row
//   x_j  = i_j - G_j                           the log-weight of source j (double)
//   a_j  = max(mp, x_s: s <= j)                running max; a reset drops mp and s < reset
//   m_j  = G_j + a_j                           the definition's stabiliser at row j
//   w_j  = exp(mp - a_j)   D_js = exp(x_s - a_j)   (0 across a reset)
//   chunk map: m_next = max(mp + G_L, A_c), A_c = max_s x_s + G_L (G_L = -inf: a reset)
//
// Sections: gates (rows, chunk maps and their scan), weights, the row epilogue and its
// backward, the gate-gradient routing (and the scan of the stabiliser's gradient over
// chunks). The operand transforms of each Precision are in moxe/core/precision.hpp.
#pragma once

#include <cstdint>

#include "moxe/core/config.hpp"
#include "moxe/core/math.hpp"
#include "moxe/mlstm/detail/cell.hpp"

namespace moxe::mlstm::detail {

// ---- gates -----------------------------------------------------------------------------------

/// A finite logsigmoid(f) below -2^24 is a hard reset, as -inf is. From such a row r on,
/// the previous state and every source before r weigh exp(lf_r + (a difference of gates
/// in range)) = 0 in double, so G restarts at 0 and they are dropped, instead of forming
/// differences of numbers near lf_r that have lost every digit. The one observable
/// difference to the recurrence: with no input from r to the end of the unit, the final
/// stabilised state is (0, -inf) where the recurrence has (C, m + lf_r + ...); both are the
/// memory exp(m) C = 0 (docs/mlstm.md "Resets").
inline constexpr double kHardResetLogDecay = -16777216.0;  // -2^24

template <class A>
MOXE_HD MOXE_FORCEINLINE bool is_hard_reset(A log_f) {
  return log_f < static_cast<A>(kHardResetLogDecay);
}

/// The gate quantities of row j of a chunk. Rows follow from one another (chunk_gate_step),
/// starting from ChunkGateRow::before(mp); the map of a chunk (no mp known yet) is the last
/// row started from before(-inf).
struct ChunkGateRow {
  double G;        ///< sum of lf over (the last reset, j], 0 at a reset row
  double x;        ///< i_j - G_j (-inf: no input)
  double a;        ///< running max of mp and the sources since the last reset
  int32_t origin;  ///< -1: a is mp; else the earliest source s attaining a (the recurrence's tie rule)
  int32_t reset;   ///< the last hard reset row <= j of the chunk, -1: none

  MOXE_HD static ChunkGateRow before(double m_prev) {
    return ChunkGateRow{0.0, -math::infinity<double>(), m_prev, -1, -1};
  }
  /// m_j = G_j + a_j
  MOXE_HD double m() const { return G + a; }
  /// The first source that counts in this row (0, or the last reset).
  MOXE_HD int32_t first_source() const { return reset < 0 ? 0 : reset; }
};

/// Row j from row j - 1 (`prev`; ChunkGateRow::before(mp) for j = 0). log_f = logsigmoid(f_j)
/// in A (math::logsigmoid), i_j in A; both widened to double.
template <class A>
MOXE_HD MOXE_FORCEINLINE ChunkGateRow chunk_gate_step(const ChunkGateRow& prev, int32_t j, A igate, A log_f) {
  ChunkGateRow r;
  if (is_hard_reset(log_f)) {
    r.G = 0.0;
    r.x = static_cast<double>(igate);
    r.a = r.x;
    r.origin = j;
    r.reset = j;
  } else {
    r.G = prev.G + static_cast<double>(log_f);
    r.x = static_cast<double>(igate) - r.G;
    // the recurrence takes the input only when it beats the decayed max strictly: ties
    // keep the earlier source (mp before any input)
    const bool take = prev.a < r.x;
    r.a = take ? r.x : prev.a;
    r.origin = take ? j : prev.origin;
    r.reset = prev.reset;
  }
  return r;
}

/// The rows of a chunk as an associative scan (a warp can compute G, a, origin, reset of
/// all its rows with log-many shuffles): the element of row j is chunk_gate_step applied to
/// an empty row, and combine(earlier, later) joins two consecutive ranges of rows. It gives
/// a, origin and reset exactly as the sequential steps do; G up to the order of its double
/// sums; x is the later range's x re-based by the earlier G.
MOXE_HD inline ChunkGateRow combine_gate_rows(const ChunkGateRow& earlier, const ChunkGateRow& later) {
  if (later.reset >= 0) return later;
  ChunkGateRow r;
  r.G = earlier.G + later.G;
  r.x = later.x - earlier.G;
  const double later_a = later.a - earlier.G;  // the later range's max, relative to the joined G
  const bool take = later.origin >= 0 && earlier.a < later_a;
  r.a = take ? later_a : earlier.a;
  r.origin = take ? later.origin : earlier.origin;
  r.reset = earlier.reset;
  return r;
}

/// The map of a chunk on the stabiliser: m_next = max(m_prev + G, A). G = -inf for a chunk
/// with a hard reset (m_next = A whatever came before). Composition is associative, so
/// m_prev of every chunk of a unit is an exclusive scan of the maps, seeded by m_init (or 0)
/// and evaluated in double.
struct ChunkMap {
  double G, A;

  MOXE_HD static ChunkMap identity() { return ChunkMap{0.0, -math::infinity<double>()}; }
  /// The map of a chunk from its last row computed from ChunkGateRow::before(-inf).
  MOXE_HD static ChunkMap of_last_row(const ChunkGateRow& last) {
    return ChunkMap{last.reset >= 0 ? -math::infinity<double>() : last.G, last.a + last.G};
  }
  /// `first`, then `second`.
  MOXE_HD static ChunkMap compose(const ChunkMap& first, const ChunkMap& second) {
    return ChunkMap{first.G + second.G, math::max(first.A + second.G, second.A)};
  }
  /// m_next from m_prev (ties: m_prev, the earlier source).
  MOXE_HD double apply(double m_prev) const { return math::max(m_prev + G, A); }
};

// ---- weights ---------------------------------------------------------------------------------

/// exp(x - m) in A from double log-weights, 0 for x = -inf (math::exp_sub's rule: also
/// when m is -inf, an empty max). The difference is formed in double: the gates' sums are
/// large where their differences are small.
template <class A>
MOXE_HD MOXE_FORCEINLINE A log_weight(double x, double m) {
  return x == -math::infinity<double>() ? A(0) : math::exp(static_cast<A>(x - m));
}

/// w_j = exp(mp - a_j): the previous state's weight in row j; 0 after a reset in the chunk.
template <class A>
MOXE_HD MOXE_FORCEINLINE A decay_weight(double m_prev, const ChunkGateRow& row_j) {
  return row_j.reset >= 0 ? A(0) : log_weight<A>(m_prev, row_j.a);
}

/// D_js = exp(x_s - a_j), s <= j: source s's weight in row j; 0 before the row's last reset.
template <class A>
MOXE_HD MOXE_FORCEINLINE A source_weight(double x_s, int32_t s, const ChunkGateRow& row_j) {
  return s < row_j.first_source() ? A(0) : log_weight<A>(x_s, row_j.a);
}

/// w_L = exp(mp + G_L - mp_next) of the state update C'_next = w_L C' + sum_s E_s k_s v'_s^T,
/// from the scan's values on both sides (mp_next is the next chunk's m_prev bit for bit, so
/// the checkpoints are stabilised by exactly the m_prev that reads them); 0 after a reset.
template <class A>
MOXE_HD MOXE_FORCEINLINE A state_decay_weight(double m_prev, const ChunkGateRow& last, double m_next) {
  return last.reset >= 0 ? A(0) : log_weight<A>(m_prev + last.G, m_next);
}

/// E_s = exp(x_s + G_L - mp_next) of the state update; 0 before the chunk's last reset.
template <class A>
MOXE_HD MOXE_FORCEINLINE A state_source_weight(double x_s, int32_t s, const ChunkGateRow& last, double m_next) {
  return s < last.first_source() ? A(0) : log_weight<A>(x_s + last.G, m_next);
}

// ---- the row epilogue and its backward -------------------------------------------------------

/// The normaliser of row j: dot_j = num'_j[DV] = n_j . qs_j and m_j = G_j + a_j (rounded to
/// A once). h_j = num_j * inv_den (cell.hpp's ratio forms, overflow-safe).
template <class A>
MOXE_HD MOXE_FORCEINLINE Normaliser<A> row_normaliser(A dot, const ChunkGateRow& row_j, A eps) {
  return normaliser(dot, static_cast<A>(row_j.m()), eps);
}

/// The scalars of row j's backward, from r_j = dh_j . h_j (= inv_den (dh_j . num_j)):
///   dnum'_j = [dh_j inv_den | ddot]     (the scale of dh_j, and the gradient of dot_j)
///   dmf      the gradient of m_j through the floor exp(-m_j) (0 on the |dot| branch)
///   da       the gradient of a_j through row j: w_j, every D_js and m_j's floor together.
///            Row j is homogeneous in exp(-a_j) except for eps, so this is -eps r_j inv_den
///            exactly (no cancellation of dlogw_j, sum_s dlogD_js and dmf_j).
template <class A>
struct RowBackward {
  A inv_den, ddot, dmf, da;
};

template <class A>
MOXE_HD MOXE_FORCEINLINE RowBackward<A> row_backward(A dot, const ChunkGateRow& row_j, A eps, A dh_dot_h) {
  const Normaliser<A> nz = row_normaliser(dot, row_j, eps);
  const NormaliserGrad<A> ng = normaliser_backward(dot, nz, dh_dot_h);
  return RowBackward<A>{nz.inv_den, ng.ddot, ng.dm, -eps * dh_dot_h * nz.inv_den};
}

/// dP_js = dnum'_j . v'_s = inv_den_j (dh_j . v_s) + ddot_j: the score gradient from the
/// product of two inputs (dh, v) and row j's scalars.
template <class A>
MOXE_HD MOXE_FORCEINLINE A score_grad(const RowBackward<A>& row_j, A dh_dot_v) {
  return row_j.inv_den * dh_dot_v + row_j.ddot;
}

/// dlogw_j = dnum'_j . inter_j = inv_den_j (dh_j . inter_j[:DV]) + ddot_j inter_j[DV].
template <class A>
MOXE_HD MOXE_FORCEINLINE A log_decay_grad(const RowBackward<A>& row_j, A dh_dot_inter, A inter_dot) {
  return row_j.inv_den * dh_dot_inter + row_j.ddot * inter_dot;
}

// ---- gate gradients --------------------------------------------------------------------------
// Every log-weight is linear in mp, x, a, G: dlog w_j -> (mp +, a_j -), dlog D_js -> (x_s +,
// a_j -), dlog w_L -> (mp +, a_L -), dlog E_s -> (x_s +, a_L -) (mp_next = G_L + a_L), the
// floor's m_j = G_j + a_j -> (G_j, a_j), the next chunk's m_prev = m_next -> (G_L, a_L). The
// gradient of a_j goes to its origin (mp or x_origin); x_s = i_s - G_s; lf_r enters every
// G_j, r <= j, of its reset segment. The gradient of m_next (dmn) enters only a_L and G_L, so
// each chunk is solved with dmn = 0 (chunk_gate_grad_local), the dmn of every chunk follows
// from an associative suffix scan (StabiliserGradMap) and each chunk adds its share
// (gate_grad_final).

/// What the gate gradients need of row j (B2, B4 and the state-gradient pass).
template <class A>
struct GateGradRow {
  A da;         ///< RowBackward::da
  A dmf;        ///< RowBackward::dmf
  A dlogw;      ///< dnum'_j . inter_j
  A dlogd_col;  ///< sum_j' dlogD_j'j: the log-weight gradients of source j in every row
  A dloge;      ///< dlog E_j = E_j k_j^T dC'_next v'_j
};

/// One chunk with dmn = 0: digate (di) and dlogsigmoid(f) (dlf) of its rows without the
/// next chunk's share, and the return value: the gradient of m_prev without it. `rows`
/// are the chunk's gate rows (from its m_prev), `origin_acc` scratch for len values.
/// Origins are non-decreasing between resets, so the per-origin sums are segmented sums
/// (a warp scan on the device).
template <class A>
MOXE_HD A chunk_gate_grad_local(int32_t len, const ChunkGateRow* rows, const GateGradRow<A>* g, A dlogw_last,
                                A* di, A* dlf, A* origin_acc) {
  A sum_dloge = A(0);
  for (int32_t j = 0; j < len; ++j) {
    sum_dloge += g[j].dloge;
    origin_acc[j] = A(0);
  }
  A dmp = dlogw_last, from_prev = A(0);
  for (int32_t j = 0; j < len; ++j) {
    A da = g[j].da;
    if (j == len - 1) da -= sum_dloge + dlogw_last;  // mp_next = G_L + a_L in log w_L, log E_s
    if (rows[j].origin < 0) {
      from_prev += da;
    } else {
      origin_acc[rows[j].origin] += da;
    }
    dmp += g[j].dlogw;
  }
  A suffix = A(0);
  for (int32_t j = len - 1; j >= 0; --j) {
    const A dx = g[j].dlogd_col + g[j].dloge + origin_acc[j];
    // lf_j enters G of the rows from j to the next reset; a reset row's own lf enters none
    // (G restarts there), and the rows before it take nothing from the rows after it
    if (rows[j].reset == j) {
      suffix = A(0);
    } else {
      suffix += g[j].dmf - dx;  // dG_j = dmf_j - dx_j (x_j = i_j - G_j)
    }
    di[j] = dx;
    dlf[j] = suffix;
  }
  return dmp + from_prev;
}

/// The gradient of a chunk's m_prev as a map of the gradient of its m_next:
/// dm_prev = add + (pass ? dm_next : 0), pass when origin_L = -1 (m_next is mp + G_L).
/// Over a unit's chunks, dm_next of chunk c is the composition of the maps of the chunks
/// after it applied to dm_last (or 0), and dm_init the composition of all: a suffix scan.
template <class A>
struct StabiliserGradMap {
  A add;
  bool pass;

  MOXE_HD static StabiliserGradMap identity() { return StabiliserGradMap{A(0), true}; }
  /// `outer` after `inner`: inner is the later chunk (applied first going backwards).
  MOXE_HD static StabiliserGradMap compose(const StabiliserGradMap& outer, const StabiliserGradMap& inner) {
    return StabiliserGradMap{outer.pass ? outer.add + inner.add : outer.add, outer.pass && inner.pass};
  }
  MOXE_HD A apply(A dm_next) const { return pass ? add + dm_next : add; }
};

/// digate of row j with the next chunk's share: + dmn at the last row's origin.
template <class A>
MOXE_HD MOXE_FORCEINLINE A digate_final(A di_local, int32_t j, int32_t origin_last, A dm_next) {
  return j == origin_last ? di_local + dm_next : di_local;
}

/// dlogsigmoid(f) of row j with the next chunk's share: + dmn for origin_L < j (dG_L += dmn,
/// dG_origin -= dmn; origin_L = -1 or any reset lies at or before origin_L).
template <class A>
MOXE_HD MOXE_FORCEINLINE A dlf_final(A dlf_local, int32_t j, int32_t origin_last, A dm_next) {
  return j > origin_last ? dlf_local + dm_next : dlf_local;
}

}  // namespace moxe::mlstm::detail
