// moxe::mlstm::chunkwise_fused_host: the FUSED design of the chunkwise algorithm on the
// host (docs/mlstm.md "Fused decomposition"), any T/Acc (double included). It runs the
// steps of the fused kernels in their order, over the workspace the device will use
// (detail::carve_fused_workspace), through the MOXE_HD pieces the kernels call
// (detail/fused_chunk.hpp: chunk rows, chunk maps and their scan, weights, the row
// epilogue and its backward, the gate-gradient routing and the stabiliser-gradient scan;
// moxe/core/precision.hpp: the operand transforms of each Precision), with plain loops for
// the matrix products:
//   forward:  gate scan (chunk maps, exclusive scan over a unit's chunks in double: m_prev
//             of every chunk); F1 state (one fp32 checkpoint C'_c = [C | n] per chunk, the
//             final states); F2 output (S, P = S o D, inter, num', the normaliser, h)
//   backward: the gate scan and F1 again; B2 rows (r, dnum', ddot, dmf, dP, dS, dlogD,
//             dlogw, dq); B3 state gradient (dC' reverse over chunks, one checkpoint per
//             chunk, dlogw_L, dc_init/dn_init); B4 columns (dk, dv, dlogE); B5 gates
//             (per-chunk routing with dm_next = 0, the suffix scan of the stabiliser's
//             gradient over chunks, the final shares: digate, dfgate, dm_init).
// Every product has one operand the caller gave (q, k, v', dh: exact in T) and at most one
// the kernel computed (an intermediate: E_s k_s, the checkpoint C', P, dS, P inv_den,
// w qs inv_den, dC'); the fp32 factors of a row (w_j, inv_den_j, ddot_j, E_s, scale) are
// applied in fp32 around the product. The normaliser's column of C' = [C | n] stays fp32
// all the way (n's update, n . q_j, P's row sums, dn, ddot's terms: FFMAs on the device):
// dot_j = n_j . qs_j is a sum of cancelling terms where it is small, and a rounded n or P
// there would put 2^-9 |n| |qs| / |dot_j| into h and into every gradient. B2's r_j = dh_j . h_j
// is formed over the unrounded P as well (not from num over the rounded P): the backward
// differentiates h with the rounding read as the identity, and its row terms inv_den (dh . v)
// and ddot must cancel where h does not depend on P (S = 1: h = sign(P) v), which a
// residual 2^-9 |dh . v| / |dot_j| would not. Under Precision fast the intermediate operand is
// rounded to the operand format, under accurate split into three parts (operand_parts);
// inputs are exact (float inputs with allow_tf32 and fast: rounded to TF32 too).
//
// The operand format is the template argument Fmt (default: T). Host code has no bf16 or
// half type: the tests pass float data already rounded to the format and Fmt =
// __nv_bfloat16 or __half (declared in precision.hpp) with Acc = float, so the products
// see what a bf16/half kernel would (the outputs stay unrounded floats: a kernel with
// T = Fmt rounds them once on store). With
// Acc = double every product is exact. Any chunk_size >= 1 (the device: 16..128, multiples
// of 16), any DQK, DV >= 1. Pointers are host memory (segment offsets included). Host C++.
#pragma once

#include <algorithm>
#include <cstdint>
#include <new>
#include <type_traits>
#include <vector>

#include "moxe/core/math.hpp"
#include "moxe/core/precision.hpp"
#include "moxe/core/status.hpp"
#include "moxe/core/workspace.hpp"
#include "moxe/mlstm/detail/cell.hpp"
#include "moxe/mlstm/detail/chunk_layout.hpp"
#include "moxe/mlstm/detail/fused_chunk.hpp"
#include "moxe/mlstm/params.hpp"

namespace moxe::mlstm::chunkwise_fused_host {

namespace impl {

/// Scratch starts as NaN (floats, doubles) and -1 (integers), like the device's
/// uninitialised workspace: a step that reads what no earlier step wrote fails the tests.
inline constexpr unsigned char kPoisonByte = 0xFF;

/// The operand format of the products: Fmt, or T when Fmt is void; float (exact, unused)
/// where Acc is not float (double: every product exact).
template <class Fmt, class T, class Acc>
using format_t = std::conditional_t<std::is_same_v<Acc, float>, std::conditional_t<std::is_void_v<Fmt>, T, Fmt>, float>;

template <class T, class Acc>
Status validate_segments(const ForwardParams<T, Acc>& p) {
  if (p.segment_offsets == nullptr) return Status::ok;
  const int64_t* o = p.segment_offsets;
  MOXE_REQUIRE(o[0] == 0 && o[p.num_segments] == p.dims.seq_len);
  for (int64_t s = 0; s < p.num_segments; ++s) MOXE_REQUIRE(o[s + 1] >= o[s]);
  return Status::ok;
}

/// The products of the chunk, as plain loops with the operand transforms of the selected
/// Precision (F the operand format).
template <class F, class Acc>
struct Products {
  ProductForms forms;

  /// An input operand as the product sees it (TF32 rounding when asked for).
  Acc input(Acc x) const {
    if constexpr (std::is_same_v<Acc, float>) {
      if (forms.input == OperandForm::rounded) return round_to<F>(x);
    }
    return x;
  }

  /// sum_z a(z) b(z), both inputs.
  template <class AF, class BF>
  Acc dot_inputs(int64_t Z, AF a, BF b) const {
    Acc s = Acc(0);
    for (int64_t z = 0; z < Z; ++z) s += input(a(z)) * input(b(z));
    return s;
  }

  /// out(x, y, sum_z A(x, z) B(z, y)) for x < X, y < Y: A an intermediate (transformed as
  /// one group per x: a row of A shares its half exponent), B an input.
  template <class AF, class BF, class OF>
  void mi(int64_t X, int64_t Y, int64_t Z, AF a, BF b, OF out) const {
    std::vector<Acc> parts(static_cast<std::size_t>(Z) * 3);
    std::vector<int> count(static_cast<std::size_t>(Z));
    std::vector<Acc> bcol(static_cast<std::size_t>(Z));
    for (int64_t x = 0; x < X; ++x) {
      Acc max_abs = Acc(0);
      for (int64_t z = 0; z < Z; ++z) {
        const Acc v = a(x, z);
        parts[z * 3] = v;
        count[z] = 1;
        max_abs = math::max(max_abs, math::abs(v));
      }
      if constexpr (std::is_same_v<Acc, float>) {
        if (forms.intermediate != OperandForm::exact) {
          const int e = operand_exponent<F>(max_abs);
          for (int64_t z = 0; z < Z; ++z) {
            const OperandParts op = operand_parts<F>(parts[z * 3], forms.intermediate, e);
            for (int k = 0; k < op.count; ++k) parts[z * 3 + k] = op.part[k];
            count[z] = op.count;
          }
        }
      }
      for (int64_t y = 0; y < Y; ++y) {
        for (int64_t z = 0; z < Z; ++z) bcol[z] = input(b(z, y));
        Acc s = Acc(0);
        for (int64_t z = 0; z < Z; ++z)
          for (int k = 0; k < count[z]; ++k) s += parts[z * 3 + k] * bcol[z];
        out(x, y, s);
      }
    }
  }
};

/// One pass of the fused design over a batch slice (or all segments).
template <class T, class Acc, class F>
struct Fused {
  using Row = detail::ChunkGateRow;

  const ForwardParams<T, Acc>& p;
  const detail::FusedWorkspace<Acc>& ws;
  Dims d;
  int64_t NH, DQK, DV, W, units;  // W = DV + 1: the width of C' = [C | n]
  Acc scale;
  bool segments;
  Products<F, Acc> prod;

  Fused(const ForwardParams<T, Acc>& p_, const detail::FusedWorkspace<Acc>& ws_)
      : p(p_), ws(ws_), d(p_.dims), NH(p_.dims.heads), DQK(p_.dims.dqk), DV(p_.dims.dv), W(p_.dims.dv + 1),
        units(detail::sequence_units(p_.dims, p_.num_segments)),
        scale(effective_qk_scale(p_.qk_scale, p_.dims.dqk)), segments(p_.segment_offsets != nullptr),
        prod{product_forms<F, Acc>(p_.precision, p_.allow_tf32)} {}

  // ---- indexing ------------------------------------------------------------------------------
  int64_t first(int64_t u) const { return ws.table.unit_first[u]; }
  int64_t count(int64_t u) const { return ws.table.unit_chunks[u]; }
  int32_t len(int64_t c) const { return ws.table.chunk_len[c]; }
  int64_t row(int64_t c, int64_t hd, int64_t j) const {
    return detail::chunk_row(ws.table, segments, NH, d.seq_len, c, hd, j);
  }
  Acc q(int64_t r, int64_t a) const { return detail::load_acc<Acc>(p.q[r * DQK + a]); }
  Acc k(int64_t r, int64_t a) const { return detail::load_acc<Acc>(p.k[r * DQK + a]); }
  /// v'_r = [v_r | 1]
  Acc vp(int64_t r, int64_t e) const { return e < DV ? detail::load_acc<Acc>(p.v[r * DV + e]) : Acc(1); }
  Acc* state(int64_t c, int64_t hd) const { return ws.state + (c * NH + hd) * DQK * W; }
  Acc* dstate(int64_t c, int64_t hd) const { return ws.dstate + (c * NH + hd) * DQK * W; }
  double m_prev(int64_t c, int64_t hd) const { return ws.m_prev[c * NH + hd]; }
  /// The stabiliser after chunk c (the next chunk's m_prev, or the unit's final one).
  double m_next(int64_t u, int64_t c, int64_t hd) const {
    return c + 1 < first(u) + count(u) ? ws.m_prev[(c + 1) * NH + hd] : ws.m_final[u * NH + hd];
  }

  /// The gate rows of chunk c from m_prev mp (ChunkGateRow::before(-inf) for its map).
  void gate_rows(int64_t c, int64_t hd, double mp, std::vector<Row>& rows) const {
    const int32_t n = len(c);
    rows.resize(static_cast<std::size_t>(n));
    Row prev = Row::before(mp);
    for (int32_t j = 0; j < n; ++j) {
      const int64_t r = row(c, hd, j);
      const Acc lf = math::logsigmoid(detail::load_acc<Acc>(p.fgate[r]));
      prev = detail::chunk_gate_step<Acc>(prev, j, detail::load_acc<Acc>(p.igate[r]), lf);
      rows[static_cast<std::size_t>(j)] = prev;
    }
  }

  /// An output element, stored as T (the host keeps float outputs of an emulated bf16/half
  /// run unrounded, so a test sees the arithmetic's error and can add the store's).
  template <class X>
  static X store(Acc x) {
    return detail::store_elem<X>(x);
  }

  // ---- the gate scan ----------------------------------------------------------------------------
  /// m_prev of every chunk: the exclusive scan of the chunk maps over each unit's chunks,
  /// seeded by m_init (or 0), in double; m_final after the last.
  void gate_scan() const {
    std::vector<Row> rows;
    for (int64_t u = 0; u < units; ++u) {
      for (int64_t hd = 0; hd < NH; ++hd) {
        const int64_t slot = u * NH + hd;
        const double m0 = p.m_init ? static_cast<double>(p.m_init[slot]) : 0.0;
        detail::ChunkMap prefix = detail::ChunkMap::identity();
        for (int64_t c = first(u); c < first(u) + count(u); ++c) {
          ws.m_prev[c * NH + hd] = prefix.apply(m0);
          gate_rows(c, hd, -math::infinity<double>(), rows);
          prefix = detail::ChunkMap::compose(prefix, detail::ChunkMap::of_last_row(rows.back()));
        }
        ws.m_final[slot] = prefix.apply(m0);
      }
    }
  }

  // ---- F1: the state walk -----------------------------------------------------------------------
  /// Checkpoints C'_c before every chunk; the final states when c_last is given.
  void state_walk(Acc* c_last, Acc* n_last, Acc* m_last) const {
    std::vector<Row> rows;
    std::vector<Acc> st(static_cast<std::size_t>(DQK * W)), E;
    for (int64_t u = 0; u < units; ++u) {
      for (int64_t hd = 0; hd < NH; ++hd) {
        const int64_t slot = u * NH + hd;
        for (int64_t a = 0; a < DQK; ++a) {
          for (int64_t e = 0; e < DV; ++e) st[a * W + e] = p.c_init ? p.c_init[(slot * DQK + a) * DV + e] : Acc(0);
          st[a * W + DV] = p.c_init ? p.n_init[slot * DQK + a] : Acc(0);
        }
        for (int64_t c = first(u); c < first(u) + count(u); ++c) {
          std::copy(st.begin(), st.end(), state(c, hd));
          const double mp = m_prev(c, hd), mn = m_next(u, c, hd);
          gate_rows(c, hd, mp, rows);
          const int32_t n = len(c);
          const Row& last = rows.back();
          const Acc wL = detail::state_decay_weight<Acc>(mp, last, mn);
          E.resize(static_cast<std::size_t>(n));
          for (int32_t s = 0; s < n; ++s) E[s] = detail::state_source_weight<Acc>(rows[s].x, s, last, mn);
          // C'_next = w_L C' + sum_s (E_s k_s) v'_s^T: C by the product, n in fp32
          prod.mi(
              DQK, DV, n, [&](int64_t a, int64_t s) { return E[s] * k(row(c, hd, s), a); },
              [&](int64_t s, int64_t e) { return vp(row(c, hd, s), e); },
              [&](int64_t a, int64_t e, Acc sum) { st[a * W + e] = wL * st[a * W + e] + sum; });
          for (int64_t a = 0; a < DQK; ++a) {
            Acc sum = Acc(0);
            for (int32_t s = 0; s < n; ++s) sum += E[s] * k(row(c, hd, s), a);
            st[a * W + DV] = wL * st[a * W + DV] + sum;
          }
        }
        if (c_last) {
          for (int64_t a = 0; a < DQK; ++a) {
            for (int64_t e = 0; e < DV; ++e) c_last[(slot * DQK + a) * DV + e] = st[a * W + e];
            n_last[slot * DQK + a] = st[a * W + DV];
          }
          m_last[slot] = static_cast<Acc>(ws.m_final[slot]);
        }
      }
    }
  }

  // ---- F2 / B2: the rows of a chunk ---------------------------------------------------------------
  /// What the rows of chunk c recompute from the inputs and the checkpoint: scores S,
  /// weights D, P = S o D, inter_j = w_j scale C'^T q_j, num'_j = inter_j + sum_s P_js v'_s,
  /// the normalisers.
  struct ChunkRows {
    int32_t n = 0;
    std::vector<Row> rows;
    std::vector<Acc> w, D, S, P, inter, num;  // D, S, P: [n][n] (j, s); inter, num: [n][W]
    std::vector<detail::Normaliser<Acc>> nz;
  };

  void chunk_rows(int64_t c, int64_t hd, ChunkRows& cr) const {
    const double mp = m_prev(c, hd);
    gate_rows(c, hd, mp, cr.rows);
    const int32_t n = len(c);
    cr.n = n;
    const std::size_t nn = static_cast<std::size_t>(n) * n, nw = static_cast<std::size_t>(n * W);
    cr.w.assign(n, Acc(0));
    cr.D.assign(nn, Acc(0));
    cr.S.assign(nn, Acc(0));
    cr.P.assign(nn, Acc(0));
    cr.inter.assign(nw, Acc(0));
    cr.num.assign(nw, Acc(0));
    cr.nz.resize(n);
    for (int32_t j = 0; j < n; ++j) {
      const int64_t rj = row(c, hd, j);
      cr.w[j] = detail::decay_weight<Acc>(mp, cr.rows[j]);
      for (int32_t s = 0; s <= j; ++s) {
        const int64_t rs = row(c, hd, s);
        const Acc D = detail::source_weight<Acc>(cr.rows[s].x, s, cr.rows[j]);
        const Acc S = scale * prod.dot_inputs(DQK, [&](int64_t a) { return q(rj, a); }, [&](int64_t a) { return k(rs, a); });
        cr.D[j * n + s] = D;
        cr.S[j * n + s] = S;
        cr.P[j * n + s] = S * D;
      }
    }
    const Acc* cp = state(c, hd);
    // inter^T (e, j) = sum_a C[a][e] q_j[a], times w_j scale; its n column n . q_j in fp32
    prod.mi(
        DV, n, DQK, [&](int64_t e, int64_t a) { return cp[a * W + e]; },
        [&](int64_t a, int64_t j) { return q(row(c, hd, j), a); },
        [&](int64_t e, int64_t j, Acc sum) { cr.inter[j * W + e] = cr.w[j] * scale * sum; });
    for (int32_t j = 0; j < n; ++j) {
      const int64_t rj = row(c, hd, j);
      Acc sum = Acc(0);
      for (int64_t a = 0; a < DQK; ++a) sum += cp[a * W + DV] * q(rj, a);
      cr.inter[j * W + DV] = cr.w[j] * scale * sum;
    }
    // num' = inter + P V'; its last entry dot_j = inter_j[DV] + sum_s P_js in fp32
    prod.mi(
        n, DV, n, [&](int64_t j, int64_t s) { return cr.P[j * n + s]; },
        [&](int64_t s, int64_t e) { return vp(row(c, hd, s), e); },
        [&](int64_t j, int64_t e, Acc sum) { cr.num[j * W + e] = cr.inter[j * W + e] + sum; });
    for (int32_t j = 0; j < n; ++j) {
      Acc sum = Acc(0);
      for (int32_t s = 0; s <= j; ++s) sum += cr.P[j * n + s];
      cr.num[j * W + DV] = cr.inter[j * W + DV] + sum;
    }
    for (int32_t j = 0; j < n; ++j) cr.nz[j] = detail::row_normaliser(cr.num[j * W + DV], cr.rows[j], p.eps);
  }

  /// F2: h of every row.
  void outputs(T* h) const {
    ChunkRows cr;
    for (int64_t u = 0; u < units; ++u)
      for (int64_t c = first(u); c < first(u) + count(u); ++c)
        for (int64_t hd = 0; hd < NH; ++hd) {
          chunk_rows(c, hd, cr);
          for (int32_t j = 0; j < cr.n; ++j) {
            const int64_t rj = row(c, hd, j);
            for (int64_t e = 0; e < DV; ++e) h[rj * DV + e] = store<T>(cr.num[j * W + e] * cr.nz[j].inv_den);
          }
        }
  }

  // ---- backward -----------------------------------------------------------------------------------
  Acc dh(const BackwardParams<T, Acc>& b, int64_t r, int64_t e) const { return detail::load_acc<Acc>(b.dh[r * DV + e]); }

  /// dP_js = dnum'_j . v'_s = inv_den_j (dh_j . v_s) + ddot_j, s <= j (0 above the diagonal).
  void score_grads(const BackwardParams<T, Acc>& b, int64_t c, int64_t hd, const ChunkRows& cr,
                   std::vector<Acc>& dP) const {
    const int32_t n = cr.n;
    dP.assign(static_cast<std::size_t>(n) * n, Acc(0));
    for (int32_t j = 0; j < n; ++j) {
      const int64_t rj = row(c, hd, j);
      for (int32_t s = 0; s <= j; ++s) {
        const int64_t rs = row(c, hd, s);
        const Acc g = prod.dot_inputs(DV, [&](int64_t e) { return dh(b, rj, e); }, [&](int64_t e) { return vp(rs, e); });
        dP[j * n + s] = detail::score_grad(detail::RowBackward<Acc>{ws.inv_den[rj], ws.ddot[rj], Acc(0), Acc(0)}, g);
      }
    }
  }

  /// B2: the row statistics (into the workspace), dlogD's column sums, dlogw, dq.
  void rows_backward(const BackwardParams<T, Acc>& b) const {
    ChunkRows cr;
    std::vector<Acc> dP, dS, cdh, dsk;
    for (int64_t u = 0; u < units; ++u)
      for (int64_t c = first(u); c < first(u) + count(u); ++c)
        for (int64_t hd = 0; hd < NH; ++hd) {
          chunk_rows(c, hd, cr);
          const int32_t n = cr.n;
          for (int32_t j = 0; j < n; ++j) {
            const int64_t rj = row(c, hd, j);
            // r_j = dh_j . h_j of the function the backward differentiates: num over the
            // unrounded P (as dot), inv_den (dh_j . inter_j + sum_s P_js dh_j . v_s). With the
            // forward's num (over P~) the row terms inv_den (dh . v) and ddot would not cancel
            // where they should (S = 1: h = P~ v / |P|, exact dq = 0, computed ~2^-9 |dh.v| / |P|)
            Acc r = Acc(0);
            for (int64_t e = 0; e < DV; ++e) {
              Acc num = cr.inter[j * W + e];
              for (int32_t s = 0; s <= j; ++s) num += cr.P[j * n + s] * vp(row(c, hd, s), e);
              r += dh(b, rj, e) * (num * cr.nz[j].inv_den);
            }
            const detail::RowBackward<Acc> rb = detail::row_backward(cr.num[j * W + DV], cr.rows[j], p.eps, r);
            ws.inv_den[rj] = rb.inv_den;
            ws.ddot[rj] = rb.ddot;
            ws.dmf[rj] = rb.dmf;
            ws.da_row[rj] = rb.da;
            // dlogw_j = dnum'_j . inter_j
            Acc dli = Acc(0);
            for (int64_t e = 0; e < DV; ++e) dli += dh(b, rj, e) * cr.inter[j * W + e];
            ws.dlogw[rj] = detail::log_decay_grad(rb, dli, cr.inter[j * W + DV]);
          }
          score_grads(b, c, hd, cr, dP);
          dS.assign(dP.size(), Acc(0));
          for (int32_t s = 0; s < n; ++s) {
            Acc col = Acc(0);  // sum_j dlogD_js
            for (int32_t j = s; j < n; ++j) {
              dS[j * n + s] = dP[j * n + s] * cr.D[j * n + s];
              col += dP[j * n + s] * cr.P[j * n + s];
            }
            ws.dlogd_col[row(c, hd, s)] = col;
          }
          // dq_j = scale (w_j (inv_den_j C dh_j + ddot_j n) + sum_s dS_js k_s)
          const Acc* cp = state(c, hd);
          cdh.assign(static_cast<std::size_t>(n * DQK), Acc(0));
          dsk.assign(static_cast<std::size_t>(n * DQK), Acc(0));
          prod.mi(
              DQK, n, DV, [&](int64_t a, int64_t e) { return cp[a * W + e]; },
              [&](int64_t e, int64_t j) { return dh(b, row(c, hd, j), e); },
              [&](int64_t a, int64_t j, Acc sum) { cdh[j * DQK + a] = sum; });
          prod.mi(
              n, DQK, n, [&](int64_t j, int64_t s) { return dS[j * n + s]; },
              [&](int64_t s, int64_t a) { return k(row(c, hd, s), a); },
              [&](int64_t j, int64_t a, Acc sum) { dsk[j * DQK + a] = sum; });
          for (int32_t j = 0; j < n; ++j) {
            const int64_t rj = row(c, hd, j);
            for (int64_t a = 0; a < DQK; ++a) {
              const Acc inter = cr.w[j] * (ws.inv_den[rj] * cdh[j * DQK + a] + ws.ddot[rj] * cp[a * W + DV]);
              b.dq[rj * DQK + a] = store<T>(scale * (inter + dsk[j * DQK + a]));
            }
          }
        }
  }

  /// B3: dC' walking each unit's chunks backwards; dC'_{c+1} checkpointed per chunk,
  /// dlogw_L = w_L <dC'_{c+1}, C'_c>; dc_init, dn_init.
  void state_grad_walk(const BackwardParams<T, Acc>& b) const {
    std::vector<Row> rows;
    std::vector<Acc> g(static_cast<std::size_t>(DQK * W)), wj;
    for (int64_t u = 0; u < units; ++u) {
      for (int64_t hd = 0; hd < NH; ++hd) {
        const int64_t slot = u * NH + hd;
        for (int64_t a = 0; a < DQK; ++a) {
          for (int64_t e = 0; e < DV; ++e) g[a * W + e] = b.dc_last ? b.dc_last[(slot * DQK + a) * DV + e] : Acc(0);
          g[a * W + DV] = b.dc_last ? b.dn_last[slot * DQK + a] : Acc(0);
        }
        for (int64_t c = first(u) + count(u) - 1; c >= first(u); --c) {
          std::copy(g.begin(), g.end(), dstate(c, hd));
          const double mp = m_prev(c, hd), mn = m_next(u, c, hd);
          gate_rows(c, hd, mp, rows);
          const int32_t n = len(c);
          const Acc wL = detail::state_decay_weight<Acc>(mp, rows.back(), mn);
          const Acc* cp = state(c, hd);
          Acc inner = Acc(0);
          for (int64_t i = 0; i < DQK * W; ++i) inner += g[i] * cp[i];
          ws.dlogw_last[c * NH + hd] = wL * inner;
          wj.resize(static_cast<std::size_t>(n));
          for (int32_t j = 0; j < n; ++j) wj[j] = detail::decay_weight<Acc>(mp, rows[j]);
          // dC' = w_L dC' + sum_j (w_j scale q_j) dnum'_j^T; the C columns as
          // (w_j scale inv_den_j q_j) dh_j^T, the n column sum_j (w_j scale q_j) ddot_j in fp32
          prod.mi(
              DQK, DV, n,
              [&](int64_t a, int64_t j) {
                const int64_t rj = row(c, hd, j);
                return wj[j] * scale * ws.inv_den[rj] * q(rj, a);
              },
              [&](int64_t j, int64_t e) { return dh(b, row(c, hd, j), e); },
              [&](int64_t a, int64_t e, Acc sum) { g[a * W + e] = wL * g[a * W + e] + sum; });
          for (int64_t a = 0; a < DQK; ++a) {
            Acc sum = Acc(0);
            for (int32_t j = 0; j < n; ++j) {
              const int64_t rj = row(c, hd, j);
              sum += wj[j] * scale * q(rj, a) * ws.ddot[rj];
            }
            g[a * W + DV] = wL * g[a * W + DV] + sum;
          }
        }
        if (b.dc_init) {
          for (int64_t a = 0; a < DQK; ++a) {
            for (int64_t e = 0; e < DV; ++e) b.dc_init[(slot * DQK + a) * DV + e] = g[a * W + e];
            b.dn_init[slot * DQK + a] = g[a * W + DV];
          }
        }
      }
    }
  }

  /// B4: dk, dv and dlogE per (chunk, head).
  void columns_backward(const BackwardParams<T, Acc>& b) const {
    ChunkRows cr;
    std::vector<Acc> dP, E, dsq, dcv, pdh, dck;
    for (int64_t u = 0; u < units; ++u)
      for (int64_t c = first(u); c < first(u) + count(u); ++c)
        for (int64_t hd = 0; hd < NH; ++hd) {
          chunk_rows(c, hd, cr);
          const int32_t n = cr.n;
          score_grads(b, c, hd, cr, dP);
          const double mn = m_next(u, c, hd);
          E.resize(static_cast<std::size_t>(n));
          for (int32_t s = 0; s < n; ++s) E[s] = detail::state_source_weight<Acc>(cr.rows[s].x, s, cr.rows.back(), mn);
          const Acc* gn = dstate(c, hd);  // dC'_{c+1}
          dsq.assign(static_cast<std::size_t>(n * DQK), Acc(0));
          dcv.assign(static_cast<std::size_t>(n * DQK), Acc(0));
          pdh.assign(static_cast<std::size_t>(n * DV), Acc(0));
          dck.assign(static_cast<std::size_t>(n * DV), Acc(0));
          // sum_{j >= s} dS_js q_j
          prod.mi(
              n, DQK, n, [&](int64_t s, int64_t j) { return j >= s ? dP[j * n + s] * cr.D[j * n + s] : Acc(0); },
              [&](int64_t j, int64_t a) { return q(row(c, hd, j), a); },
              [&](int64_t s, int64_t a, Acc sum) { dsq[s * DQK + a] = sum; });
          // dC'_{c+1} v'_s = dC v_s (the product) + dn (fp32)
          prod.mi(
              DQK, n, DV, [&](int64_t a, int64_t e) { return gn[a * W + e]; },
              [&](int64_t e, int64_t s) { return vp(row(c, hd, s), e); },
              [&](int64_t a, int64_t s, Acc sum) { dcv[s * DQK + a] = sum + gn[a * W + DV]; });
          // sum_{j >= s} P_js dnum_j = sum_j (P_js inv_den_j) dh_j
          prod.mi(
              n, DV, n,
              [&](int64_t s, int64_t j) { return j >= s ? cr.P[j * n + s] * ws.inv_den[row(c, hd, j)] : Acc(0); },
              [&](int64_t j, int64_t e) { return dh(b, row(c, hd, j), e); },
              [&](int64_t s, int64_t e, Acc sum) { pdh[s * DV + e] = sum; });
          // dC_{c+1}^T k_s
          prod.mi(
              DV, n, DQK, [&](int64_t e, int64_t a) { return gn[a * W + e]; },
              [&](int64_t a, int64_t s) { return k(row(c, hd, s), a); },
              [&](int64_t e, int64_t s, Acc sum) { dck[s * DV + e] = sum; });
          for (int32_t s = 0; s < n; ++s) {
            const int64_t rs = row(c, hd, s);
            Acc dle = Acc(0);
            for (int64_t a = 0; a < DQK; ++a) {
              const Acc state_part = E[s] * dcv[s * DQK + a];
              dle += k(rs, a) * state_part;
              b.dk[rs * DQK + a] = store<T>(scale * dsq[s * DQK + a] + state_part);
            }
            for (int64_t e = 0; e < DV; ++e) b.dv[rs * DV + e] = store<T>(pdh[s * DV + e] + E[s] * dck[s * DV + e]);
            ws.dloge[rs] = dle;
          }
        }
  }

  /// The per-row inputs of the gate routing of chunk c.
  void gate_grad_rows(int64_t c, int64_t hd, std::vector<detail::GateGradRow<Acc>>& g) const {
    g.resize(static_cast<std::size_t>(len(c)));
    for (int32_t j = 0; j < len(c); ++j) {
      const int64_t r = row(c, hd, j);
      g[j] = detail::GateGradRow<Acc>{ws.da_row[r], ws.dmf[r], ws.dlogw[r], ws.dlogd_col[r], ws.dloge[r]};
    }
  }

  /// B5: per unit and head, every chunk with dm_next = 0, the suffix scan of the
  /// stabiliser's gradient, the final shares; dm_init.
  void gates_backward(const BackwardParams<T, Acc>& b) const {
    std::vector<Row> rows;
    std::vector<detail::GateGradRow<Acc>> g;
    std::vector<Acc> di, dlf, scratch;
    using Map = detail::StabiliserGradMap<Acc>;
    for (int64_t u = 0; u < units; ++u) {
      for (int64_t hd = 0; hd < NH; ++hd) {
        const int64_t slot = u * NH + hd;
        for (int64_t c = first(u); c < first(u) + count(u); ++c) {  // chunks in parallel
          gate_rows(c, hd, m_prev(c, hd), rows);
          gate_grad_rows(c, hd, g);
          const int32_t n = len(c);
          di.resize(n), dlf.resize(n), scratch.resize(n);
          ws.dmp_local[c * NH + hd] = detail::chunk_gate_grad_local<Acc>(n, rows.data(), g.data(),
                                                                       ws.dlogw_last[c * NH + hd], di.data(),
                                                                       dlf.data(), scratch.data());
          ws.dmp_pass[c * NH + hd] = rows.back().origin < 0 ? 1 : 0;
        }
        const Acc dm_last = b.dm_last ? b.dm_last[slot] : Acc(0);
        Map suffix = Map::identity();  // the chunks after c, applied to dm_last
        for (int64_t c = first(u) + count(u) - 1; c >= first(u); --c) {
          ws.dm_next[c * NH + hd] = suffix.apply(dm_last);
          suffix = Map::compose(Map{ws.dmp_local[c * NH + hd], ws.dmp_pass[c * NH + hd] != 0}, suffix);
        }
        if (b.dm_init) b.dm_init[slot] = suffix.apply(dm_last);
        for (int64_t c = first(u); c < first(u) + count(u); ++c) {  // the final shares
          gate_rows(c, hd, m_prev(c, hd), rows);
          gate_grad_rows(c, hd, g);
          const int32_t n = len(c);
          di.resize(n), dlf.resize(n), scratch.resize(n);
          detail::chunk_gate_grad_local<Acc>(n, rows.data(), g.data(), ws.dlogw_last[c * NH + hd], di.data(),
                                             dlf.data(), scratch.data());
          const int32_t origin_last = rows.back().origin;
          const Acc dmn = ws.dm_next[c * NH + hd];
          for (int32_t j = 0; j < n; ++j) {
            const int64_t r = row(c, hd, j);
            b.digate[r] = store<T>(detail::digate_final(di[j], j, origin_last, dmn));
            const Acc f = detail::load_acc<Acc>(p.fgate[r]);
            b.dfgate[r] = store<T>(detail::dlf_final(dlf[j], j, origin_last, dmn) * math::logsigmoid_grad(f));
          }
        }
      }
    }
  }
};

template <class T, class Acc>
Status validate_forward(const ForwardParams<T, Acc>& p, bool need_h) {
  MOXE_RETURN_IF_ERROR(validate(p, need_h));
  MOXE_REQUIRE(p.chunk_size >= 1);
  return validate_segments(p);
}

}  // namespace impl

template <class T, class Acc>
std::size_t forward_workspace_size(const ForwardParams<T, Acc>& p) {
  WorkspaceCarver c;
  detail::carve_fused_workspace<Acc>(c, detail::pass_dims(p), p.num_segments, p.chunk_size, false);
  return c.required_bytes();
}

template <class T, class Acc>
std::size_t backward_workspace_size(const BackwardParams<T, Acc>& p) {
  WorkspaceCarver c;
  detail::carve_fused_workspace<Acc>(c, detail::pass_dims(p.fwd), p.fwd.num_segments, p.fwd.chunk_size, true);
  return c.required_bytes();
}

/// h and (when c_last is given) the final states, by the fused decomposition. Fmt: the
/// operand format to emulate (void: T); see the file comment.
template <class Fmt = void, class T, class Acc>
Status forward(const ForwardParams<T, Acc>& p) {
  MOXE_RETURN_IF_ERROR(impl::validate_forward(p, /*need_h=*/true));
  using F = impl::format_t<Fmt, T, Acc>;
  try {
    std::vector<unsigned char> storage(forward_workspace_size(p));
    return detail::for_each_batch_pass(p, [&](int64_t b0, int64_t nb) {
      const ForwardParams<T, Acc> s = detail::batch_slice(p, b0, nb);
      std::fill(storage.begin(), storage.end(), impl::kPoisonByte);
      WorkspaceCarver c(storage.data(), storage.size());
      const auto ws = detail::carve_fused_workspace<Acc>(c, s.dims, s.num_segments, s.chunk_size, false);
      if (!c.fits()) return Status::workspace_too_small;
      detail::build_chunk_table(ws.table, detail::sequence_units(s.dims, s.num_segments),
                                detail::chunk_bound(s.dims, s.num_segments, s.chunk_size), s.dims.seq_len,
                                s.chunk_size, s.segment_offsets);
      const impl::Fused<T, Acc, F> fz(s, ws);
      fz.gate_scan();
      fz.state_walk(s.c_last, s.n_last, s.m_last);
      fz.outputs(s.h);
      return Status::ok;
    });
  } catch (const std::bad_alloc&) {
    return Status::unsupported;
  }
}

/// The exact gradient by the fused decomposition (the forward's gate scan and state walk
/// recomputed; h not needed).
template <class Fmt = void, class T, class Acc>
Status backward(const BackwardParams<T, Acc>& p) {
  MOXE_RETURN_IF_ERROR(validate(p));
  MOXE_RETURN_IF_ERROR(impl::validate_forward(p.fwd, /*need_h=*/false));
  using F = impl::format_t<Fmt, T, Acc>;
  try {
    std::vector<unsigned char> storage(backward_workspace_size(p));
    return detail::for_each_batch_pass(p.fwd, [&](int64_t b0, int64_t nb) {
      const BackwardParams<T, Acc> s = detail::batch_slice(p, b0, nb);
      std::fill(storage.begin(), storage.end(), impl::kPoisonByte);
      WorkspaceCarver c(storage.data(), storage.size());
      const auto ws =
          detail::carve_fused_workspace<Acc>(c, s.fwd.dims, s.fwd.num_segments, s.fwd.chunk_size, true);
      if (!c.fits()) return Status::workspace_too_small;
      detail::build_chunk_table(ws.table, detail::sequence_units(s.fwd.dims, s.fwd.num_segments),
                                detail::chunk_bound(s.fwd.dims, s.fwd.num_segments, s.fwd.chunk_size),
                                s.fwd.dims.seq_len, s.fwd.chunk_size, s.fwd.segment_offsets);
      const impl::Fused<T, Acc, F> fz(s.fwd, ws);
      fz.gate_scan();                                  // B1 = F1 again
      fz.state_walk(nullptr, nullptr, nullptr);
      fz.rows_backward(s);                             // B2
      fz.state_grad_walk(s);                           // B3
      fz.columns_backward(s);                          // B4
      fz.gates_backward(s);                            // B5
      return Status::ok;
    });
  } catch (const std::bad_alloc&) {
    return Status::unsupported;
  }
}

}  // namespace moxe::mlstm::chunkwise_fused_host
