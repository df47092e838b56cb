// moxe::mlstm::detail: the chunkwise mLSTM algorithm, piece by piece, as MOXE_HD functors
// that the host implementation (chunkwise_phase_host.hpp) runs in loops and the device launchers
// (chunkwise.cuh) run one index per thread. Both execute the same arithmetic on the same
// workspace layout, so the CPU tests check the device's math, indexing and workspace.
//
// Notation (docs/mlstm.md, "Chunkwise algorithm"): a chunk holds local positions
// j = 0..len-1 of one head of one sequence unit (a batch entry or a segment).
//   g_j      = sum_{r<=j} logsigmoid(f_r)                      (chunk-local cumulative decay;
//              restarted at 0 at a reset, where the recurrence's f_scale is 0, e.g.
//              fgate = -inf: the weights below that cross it are 0)
//   m_j      = max(m_prev + g_j, max_{s<=j} (i_s + g_j - g_s))  (ties: earliest origin;
//              evaluated by the scalar recurrence, which gives the same numbers and ties)
//   D_js     = exp(i_s + g_j - g_s - m_j), s <= j;   w_j = exp(m_prev + g_j - m_j)
//   P_js     = (qs_j . k_s) D_js
//   num'_j   = w_j C'_prev^T qs_j + sum_s P_js v'_s            (C' = [C | n], v' = [v | 1])
//   h_j      = num_j / (max(|nq_j|, exp(-m_j)) + eps),  nq_j = num'_j[DV]
//   C'_next  = w_L C'_prev + sum_s E_s k_s v'_s^T,  E_s = exp(i_s + g_L - g_s - m_L), L = len-1
// The normaliser column n rides along as column DV of the state, so one code path serves
// C and n (and dC and dn in the backward).
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "moxe/core/config.hpp"
#include "moxe/core/math.hpp"
#include "moxe/core/status.hpp"
#include "moxe/core/workspace.hpp"
#include "moxe/mlstm/detail/cell.hpp"
#include "moxe/mlstm/detail/chunk_layout.hpp"
#include "moxe/mlstm/params.hpp"

namespace moxe::mlstm::detail {

inline constexpr int kDecayGradParts = 64;  // partial sums per chunk of <dC'_next, C'_prev>
inline constexpr int kScanBatch = 16;       // gate loads issued together by the gate scan

// ---- workspace ------------------------------------------------------------------------

/// Every scratch buffer of the chunkwise forward and backward. Row arrays are indexed like
/// the gates ([B * NH * S]); chunk arrays by kh = chunk * NH + head.
template <class A>
struct ChunkWorkspace {
  // chunk table (built on the device from the segment offsets)
  int64_t* chunk_start = nullptr;  ///< [K] first position on the sequence axis
  int32_t* chunk_len = nullptr;    ///< [K] 0 for unused table entries
  int64_t* chunk_unit = nullptr;   ///< [K]
  int64_t* unit_first = nullptr;   ///< [U] first chunk of each unit
  int64_t* unit_chunks = nullptr;  ///< [U]
  // gate table
  double* g = nullptr;         ///< [rows] chunk-local cumulative logsigmoid(f), in double (see ScanGates)
  int32_t* since_reset = nullptr;  ///< [rows] j - (the last reset r <= j in the chunk), -1: none
  A* m = nullptr;              ///< [rows] stabiliser
  int32_t* origin = nullptr;   ///< [rows] argmax of m_j: -1 = m_prev, else local source s
  A* m_prev = nullptr;         ///< [K*NH] stabiliser before the chunk
  A* w_inter = nullptr;        ///< [rows] w_j = exp(m_prev + g_j - m_j)
  A* w_state = nullptr;        ///< [rows] E_s = exp(i_s + g_L - g_s - m_L), L = len-1
  A* state = nullptr;          ///< [K*NH][DQK][DV+1] C' before the chunk
  A* scores = nullptr;         ///< [K*NH][L][L] P
  A* nq = nullptr;             ///< [rows]
  A* inv_den = nullptr;        ///< [rows] 1 / den_j (detail::normaliser)
  // backward
  A* num_inter = nullptr;      ///< [rows][DV+1] w_j C'_prev^T qs_j (shares memory with dstate)
  A* num_intra = nullptr;      ///< [rows][DV+1] sum_s P_js v'_s (shares memory with dstate)
  A* dcv = nullptr;            ///< [rows][DQK] dC'_next v'_s (the state part of dk, before E_s)
  A* dnq = nullptr;            ///< [rows] gradient of n.qs
  A* direct = nullptr;         ///< [rows] gradient of m_j through exp(-m_j) in the normaliser
  A* dlogw = nullptr;          ///< [rows] gradient of log w_j
  A* dm_out = nullptr;         ///< [rows] gradient of m_j through h_j (all paths): eps dden_j
  A* col_sum = nullptr;        ///< [rows] sum_j dlogD_js (indexed by s)
  A* dloge = nullptr;          ///< [rows] gradient of log E_s
  A* origin_acc = nullptr;     ///< [rows] sum of dmt_j over the j whose origin is this row
  A* di_local = nullptr;       ///< [rows] digate without the next chunk's share
  A* dlf_local = nullptr;      ///< [rows] dlogsigmoid(f) without the next chunk's share
  A* dm_prev_local = nullptr;  ///< [K*NH] dm_prev without the next chunk's share
  A* dm_next = nullptr;        ///< [K*NH] gradient of the chunk's last m from after it
  A* dstate = nullptr;         ///< [K*NH][DQK][DV+1] gradient of C' after the chunk (written after num_* die)
  A* dlogw_last = nullptr;     ///< [K*NH] gradient of log w_L through the state
  A* decay_partials = nullptr; ///< [K*NH][kDecayGradParts] partial sums of dlogw_last
  A* dscores = nullptr;        ///< [K*NH][L][L] dS_js = dP_js D_js
  A* dlogd = nullptr;          ///< [K*NH][L][L] dP_js P_js
};

/// The one description of the workspace: sizing and carving both call it. Sizes that
/// validate() rejects carve nothing.
template <class A>
ChunkWorkspace<A> carve_chunk_workspace(WorkspaceCarver& c, const Dims& d, int64_t num_segments,
                                        int chunk_size, bool backward) {
  ChunkWorkspace<A> w;
  if (d.batch <= 0 || d.heads <= 0 || d.seq_len <= 0 || d.dqk <= 0 || d.dv <= 0 || num_segments < 0 ||
      !chunk_size_valid(chunk_size))
    return w;
  const std::size_t K = static_cast<std::size_t>(chunk_bound(d, num_segments, chunk_size));
  const std::size_t U = static_cast<std::size_t>(sequence_units(d, num_segments));
  const std::size_t H = static_cast<std::size_t>(d.heads);
  const std::size_t rows = static_cast<std::size_t>(d.batch * d.heads * d.seq_len);
  const std::size_t L = static_cast<std::size_t>(chunk_size);
  const std::size_t state = static_cast<std::size_t>(d.dqk * (d.dv + 1));
  w.chunk_start = c.carve<int64_t>(K);
  w.chunk_len = c.carve<int32_t>(K);
  w.chunk_unit = c.carve<int64_t>(K);
  w.unit_first = c.carve<int64_t>(U);
  w.unit_chunks = c.carve<int64_t>(U);
  w.g = c.carve<double>(rows);
  w.since_reset = c.carve<int32_t>(rows);
  w.m = c.carve<A>(rows);
  w.origin = c.carve<int32_t>(rows);
  w.m_prev = c.carve<A>(K * H);
  w.w_inter = c.carve<A>(rows);
  w.w_state = c.carve<A>(rows);
  w.state = c.carve<A>(K * H * state);
  w.scores = c.carve<A>(K * H * L * L);
  w.nq = c.carve<A>(rows);
  w.inv_den = c.carve<A>(rows);
  if (backward) {
    // num_inter and num_intra live only from NumInterOp / NumIntraOp (ChunkNumerators) to
    // ChunkRowGrad; dstate is first written by DStateLocalOp (ChunkDStateLocal), after
    // ChunkRowGrad (run_backward's order), and every element of it that a later phase reads
    // is written there. So the two share one buffer: at B*S = 65536, NH = 16, DQK = 128,
    // DV = 256, L = 64 that saves 2 GiB of the backward's 7.3.
    const std::size_t num = rows * static_cast<std::size_t>(d.dv + 1);
    const std::size_t num_padded = round_up(num, WorkspaceCarver::kAlignment / sizeof(A));
    const std::size_t shared_size = 2 * num_padded > K * H * state ? 2 * num_padded : K * H * state;
    A* const shared = c.carve<A>(shared_size);
    w.num_inter = shared;
    w.num_intra = shared ? shared + num_padded : nullptr;
    w.dstate = shared;
    w.dcv = c.carve<A>(rows * static_cast<std::size_t>(d.dqk));
    w.dnq = c.carve<A>(rows);
    w.direct = c.carve<A>(rows);
    w.dlogw = c.carve<A>(rows);
    w.dm_out = c.carve<A>(rows);
    w.col_sum = c.carve<A>(rows);
    w.dloge = c.carve<A>(rows);
    w.origin_acc = c.carve<A>(rows);
    w.di_local = c.carve<A>(rows);
    w.dlf_local = c.carve<A>(rows);
    w.dm_prev_local = c.carve<A>(K * H);
    w.dm_next = c.carve<A>(K * H);
    w.dlogw_last = c.carve<A>(K * H);
    w.decay_partials = c.carve<A>(K * H * kDecayGradParts);
    w.dscores = c.carve<A>(K * H * L * L);
    w.dlogd = c.carve<A>(K * H * L * L);
  }
  return w;
}

// ---- the problem as the functors see it --------------------------------------------------

/// One (chunk, head) pair: its rows are row0 .. row0 + len - 1 (contiguous).
struct ChunkItem {
  int64_t khi, chunk, head, row0;
  int len;
};

template <class T, class A>
struct ChunkProblem {
  int64_t heads, seq_len, dqk, dv;
  int64_t units, chunks;  // chunks: table size (an upper bound on the chunks in use)
  int chunk_size;
  bool varlen;
  A scale, eps;
  const T *q, *k, *v, *igate, *fgate;
  const A *c_init, *n_init, *m_init;
  const int64_t* offsets;
  ChunkWorkspace<A> ws;

  MOXE_HD int64_t state_cols() const { return dv + 1; }
  MOXE_HD int64_t state_size() const { return dqk * (dv + 1); }
  MOXE_HD int64_t kh(int64_t chunk, int64_t head) const { return chunk * heads + head; }

  /// Row (index into the gates; times DQK or DV into q, k, v, h) of local position j.
  MOXE_HD int64_t row(int64_t chunk, int64_t head, int64_t j) const {
    const int64_t t = ws.chunk_start[chunk] + j;
    return varlen ? head * seq_len + t : (ws.chunk_unit[chunk] * heads + head) * seq_len + t;
  }

  MOXE_HD ChunkItem item(int64_t khi) const {
    ChunkItem it;
    it.khi = khi;
    it.chunk = khi / heads;
    it.head = khi % heads;
    it.len = ws.chunk_len[it.chunk];
    it.row0 = it.len > 0 ? row(it.chunk, it.head, 0) : 0;
    return it;
  }
  MOXE_HD const A* state_of(int64_t khi) const { return ws.state + khi * state_size(); }
  MOXE_HD const A* dstate_of(int64_t khi) const { return ws.dstate + khi * state_size(); }
  MOXE_HD const A* scores_of(int64_t khi) const { return ws.scores + khi * chunk_size * chunk_size; }
  MOXE_HD const A* dscores_of(int64_t khi) const { return ws.dscores + khi * chunk_size * chunk_size; }

  MOXE_HD A qs(int64_t r, int64_t d) const { return load_acc<A>(q[r * dqk + d]) * scale; }
  MOXE_HD A query(int64_t r, int64_t d) const { return load_acc<A>(q[r * dqk + d]); }  ///< q unscaled
  MOXE_HD A key(int64_t r, int64_t d) const { return load_acc<A>(k[r * dqk + d]); }
  /// v' = [v | 1]
  MOXE_HD A value_aug(int64_t r, int64_t e) const { return e < dv ? load_acc<A>(v[r * dv + e]) : A(1); }

  /// w_j = exp(m_prev + g_j - m_j) (ChunkRowWeights)
  MOXE_HD A inter_weight(int64_t r) const { return ws.w_inter[r]; }
  /// E_s = exp(i_s + g_L - g_s - m_L) (ChunkRowWeights)
  MOXE_HD A state_weight(int64_t r) const { return ws.w_state[r]; }
  /// D_js = exp(i_s + g_j - g_s - m_j); the argument in double (see ScanGates), then A.
  /// 0 for a source before the last reset at or before j (rows of a chunk are consecutive:
  /// rj - rs = j - s) and for i_s = -inf, as the recurrence's weights.
  MOXE_HD A intra_weight(int64_t rj, int64_t rs) const {
    const int32_t since = ws.since_reset[rj];
    const A i_s = load_acc<A>(igate[rs]);
    if ((since >= 0 && rj - rs > since) || i_s == -math::infinity<A>()) return A(0);
    const double arg = static_cast<double>(i_s) + (ws.g[rj] - ws.g[rs]) - static_cast<double>(ws.m[rj]);
    return math::exp(static_cast<A>(arg));
  }
  /// w_j = exp(m_prev + g_j - m_j), the argument in double; 0 after a reset in the chunk
  /// (m_prev = -inf makes the chunk's first position one).
  MOXE_HD A decay_weight(int64_t khi, int64_t r) const {
    if (ws.since_reset[r] >= 0) return A(0);
    const double arg = static_cast<double>(ws.m_prev[khi]) + ws.g[r] - static_cast<double>(ws.m[r]);
    return math::exp(static_cast<A>(arg));
  }

  /// w_j (C'_prev^T qs_j)[e]
  MOXE_HD A inter_aug(int64_t chunk, int64_t head, int64_t j, int64_t e) const {
    const int64_t khi = kh(chunk, head), r = row(chunk, head, j);
    const A* st = ws.state + khi * state_size();
    A acc = A(0);
    for (int64_t d = 0; d < dqk; ++d) acc += qs(r, d) * st[d * state_cols() + e];
    return inter_weight(r) * acc;
  }
  /// sum_{s<=j} P_js v'_s[e]
  MOXE_HD A intra_aug(int64_t chunk, int64_t head, int64_t j, int64_t e) const {
    const A* p = ws.scores + kh(chunk, head) * chunk_size * chunk_size + j * chunk_size;
    A acc = A(0);
    for (int64_t s = 0; s <= j; ++s) acc += p[s] * value_aug(row(chunk, head, s), e);
    return acc;
  }
  MOXE_HD A num_aug(int64_t chunk, int64_t head, int64_t j, int64_t e) const {
    return inter_aug(chunk, head, j, e) + intra_aug(chunk, head, j, e);
  }
};

template <class T, class A>
ChunkProblem<T, A> make_chunk_problem(const ForwardParams<T, A>& p, const ChunkWorkspace<A>& ws) {
  ChunkProblem<T, A> c;
  c.heads = p.dims.heads;
  c.seq_len = p.dims.seq_len;
  c.dqk = p.dims.dqk;
  c.dv = p.dims.dv;
  c.units = sequence_units(p.dims, p.num_segments);
  c.chunks = chunk_bound(p.dims, p.num_segments, p.chunk_size);
  c.chunk_size = p.chunk_size;
  c.varlen = p.segment_offsets != nullptr;
  c.scale = effective_qk_scale(p.qk_scale, p.dims.dqk);
  c.eps = p.eps;
  c.q = p.q;
  c.k = p.k;
  c.v = p.v;
  c.igate = p.igate;
  c.fgate = p.fgate;
  c.c_init = p.c_init;
  c.n_init = p.n_init;
  c.m_init = p.m_init;
  c.offsets = p.segment_offsets;
  c.ws = ws;
  return c;
}

/// Backward-only inputs and outputs.
template <class T, class A>
struct ChunkGradIO {
  const T* dh;
  const A *dc_last, *dn_last, *dm_last;
  T *dq, *dk, *dv, *digate, *dfgate;
  A *dc_init, *dn_init, *dm_init;
};

template <class T, class A>
ChunkGradIO<T, A> make_chunk_grad_io(const BackwardParams<T, A>& p) {
  return ChunkGradIO<T, A>{p.dh,    p.dc_last, p.dn_last, p.dm_last, p.dq,      p.dk,
                           p.dv,    p.digate,  p.dfgate,  p.dc_init, p.dn_init, p.dm_init};
}

// ---- index-space phases ------------------------------------------------------------------
// Each functor has size() (its index space) and operator()(i); the host runs i in order,
// the device one i per thread. run_forward / run_backward (at the end) fix the order.

/// [index space 1]: the chunk table. Offsets are clamped to a non-decreasing sequence in
/// [0, S] so that garbage offsets cannot index out of bounds (valid offsets are unchanged).
template <class T, class A>
struct BuildChunkTable {
  ChunkProblem<T, A> p;
  MOXE_HD int64_t size() const { return 1; }
  MOXE_HD void operator()(int64_t) const {
    const int64_t L = p.chunk_size;
    int64_t next = 0, prev_end = 0;
    for (int64_t u = 0; u < p.units; ++u) {
      int64_t begin = 0, end = p.seq_len;
      if (p.varlen) {
        begin = math::min(math::max(p.offsets[u], prev_end), p.seq_len);
        end = math::min(math::max(p.offsets[u + 1], begin), p.seq_len);
        prev_end = end;
      }
      const int64_t n = ceil_div<int64_t>(end - begin, L);
      const int64_t first = next;
      for (int64_t c = 0; c < n && next < p.chunks; ++c, ++next) {
        p.ws.chunk_start[next] = begin + c * L;
        p.ws.chunk_len[next] = static_cast<int32_t>(math::min(L, end - begin - c * L));
        p.ws.chunk_unit[next] = u;
      }
      // the chunks written (all n: chunk_bound() bounds the total), so that no later phase
      // can follow a unit past the end of the table
      p.ws.unit_first[u] = first;
      p.ws.unit_chunks[u] = next - first;
    }
    for (; next < p.chunks; ++next) {
      p.ws.chunk_start[next] = 0;
      p.ws.chunk_len[next] = 0;
      p.ws.chunk_unit[next] = 0;
    }
  }
};

/// [index space U*NH]: the gate table, sequential over the unit's chunks. m_last is
/// written when given.
template <class T, class A>
struct ScanGates {
  static constexpr bool kSequentialPhase = true;  // launched one index per block (chunkwise.cuh)
  ChunkProblem<T, A> p;
  A* m_last;
  MOXE_HD int64_t size() const { return p.units * p.heads; }
  MOXE_HD void operator()(int64_t i) const {
    const int64_t u = i / p.heads, h = i % p.heads;
    A m = p.m_init ? p.m_init[i] : A(0);
    const int64_t first = p.ws.unit_first[u], count = p.ws.unit_chunks[u];
    for (int64_t c = first; c < first + count; ++c) {
      p.ws.m_prev[p.kh(c, h)] = m;
      const int len = p.ws.chunk_len[c];
      // g grows to len * |logsigmoid(f)|; the differences g_j - g_s of the exponents would
      // expose its rounding (a float g loses ~1e-5 at j = 128), so g is summed and kept in
      // double. m is the recurrence's own (its rounding is common to a whole row). Where
      // the recurrence's weight of the previous state, f_scale, is 0 (a reset: fgate = -inf,
      // or the state outweighed beyond A's range), every weight that crosses the position
      // is 0 too (they are <= f_scale): g restarts at 0 there and since_reset masks them, so
      // -inf - -inf never forms, nor a difference of two huge g.
      double g_sum = 0.0;
      int32_t origin = -1, since_reset = -1;
      const int64_t row0 = p.row(c, h, 0);  // a chunk's rows are contiguous
      for (int j0 = 0; j0 < len; j0 += kScanBatch) {
        // the gates of kScanBatch steps are loaded before the chain uses them, so the loads
        // overlap instead of each step waiting for its own
        const int n = len - j0 < kScanBatch ? len - j0 : kScanBatch;
        A ig[kScanBatch], fg[kScanBatch];
        MOXE_PRAGMA_UNROLL
        for (int t = 0; t < kScanBatch; ++t) {
          ig[t] = t < n ? load_acc<A>(p.igate[row0 + j0 + t]) : A(0);
          fg[t] = t < n ? load_acc<A>(p.fgate[row0 + j0 + t]) : A(0);
        }
        MOXE_PRAGMA_UNROLL
        for (int t = 0; t < kScanBatch; ++t) {
          if (t >= n) break;
          const int64_t r = row0 + j0 + t;
          // m_j = max(lf_j + m_{j-1}, i_j), evaluated exactly as the recurrence does (same
          // function, same order), so m and the tie rule are the recurrence's bit for bit.
          // Unrolled, m_j = max(m_prev + g_j, max_s (i_s + g_j - g_s)); the recurrence keeps
          // its first argument on ties, i.e. the earliest source: m_prev (-1) or input s.
          const GateStep<A> step = gate_step(ig[t], fg[t], m);
          if (step.f_scale == A(0)) {
            g_sum = 0.0;
            since_reset = 0;
          } else {
            g_sum += static_cast<double>(step.log_f);
            if (since_reset >= 0) ++since_reset;
          }
          if (!step.m_from_decay) origin = j0 + t;
          m = step.m;
          p.ws.g[r] = g_sum;
          p.ws.since_reset[r] = since_reset;
          p.ws.m[r] = m;
          p.ws.origin[r] = origin;
        }
      }
    }
    if (m_last) m_last[i] = m;
  }
};

/// [index space K*NH*L]: the per-position weights w_j and E_s.
template <class T, class A>
struct ChunkRowWeights {
  ChunkProblem<T, A> p;
  MOXE_HD int64_t size() const { return p.chunks * p.heads * p.chunk_size; }
  MOXE_HD void operator()(int64_t i) const {
    const int64_t j = i % p.chunk_size, khi = i / p.chunk_size, c = khi / p.heads, h = khi % p.heads;
    const int len = p.ws.chunk_len[c];
    if (j >= len) return;
    const int64_t r = p.row(c, h, j);
    p.ws.w_inter[r] = p.decay_weight(khi, r);
    p.ws.w_state[r] = p.intra_weight(p.row(c, h, len - 1), r);
  }
};

/// Per-element variant (MOXE_MLSTM_CHUNKWISE_SIMPLE) of StateLocalOp.
/// [index space K*NH*DQK*(DV+1)]: each chunk's own contribution sum_s E_s k_s v'_s^T.
template <class T, class A>
struct ChunkStateLocal {
  ChunkProblem<T, A> p;
  MOXE_HD int64_t size() const { return p.chunks * p.heads * p.state_size(); }
  MOXE_HD void operator()(int64_t i) const {
    const int64_t e = i % p.state_cols(), d = (i / p.state_cols()) % p.dqk;
    const int64_t khi = i / p.state_size(), c = khi / p.heads, h = khi % p.heads;
    const int len = p.ws.chunk_len[c];
    if (len == 0) return;
    A acc = A(0);
    for (int s = 0; s < len; ++s) {
      const int64_t r = p.row(c, h, s);
      acc += p.state_weight(r) * p.key(r, d) * p.value_aug(r, e);
    }
    p.ws.state[i] = acc;
  }
};

/// [index space U*NH*DQK*(DV+1)]: the inter-chunk recurrence, in place: the local
/// contribution of each chunk is replaced by the state before it. Final states when given.
template <class T, class A>
struct ChunkStateRecurrence {
  ChunkProblem<T, A> p;
  A *c_last, *n_last;
  MOXE_HD int64_t size() const { return p.units * p.heads * p.state_size(); }
  MOXE_HD void operator()(int64_t i) const {
    const int64_t e = i % p.state_cols(), d = (i / p.state_cols()) % p.dqk;
    const int64_t slot = i / p.state_size(), u = slot / p.heads, h = slot % p.heads;
    A cur = A(0);
    if (p.c_init) cur = e < p.dv ? p.c_init[(slot * p.dqk + d) * p.dv + e] : p.n_init[slot * p.dqk + d];
    const int64_t first = p.ws.unit_first[u], count = p.ws.unit_chunks[u];
    for (int64_t c = first; c < first + count; ++c) {
      const int64_t khi = p.kh(c, h);
      A* cell = p.ws.state + khi * p.state_size() + d * p.state_cols() + e;
      const A local = *cell;
      *cell = cur;
      const int64_t rl = p.row(c, h, p.ws.chunk_len[c] - 1);
      cur = p.inter_weight(rl) * cur + local;
    }
    if (c_last) {
      if (e < p.dv) {
        c_last[(slot * p.dqk + d) * p.dv + e] = cur;
      } else {
        n_last[slot * p.dqk + d] = cur;
      }
    }
  }
};

/// Per-element variant (MOXE_MLSTM_CHUNKWISE_SIMPLE) of ScoresOp.
/// [index space K*NH*L*L]: P_js = (q_j . k_s) scale D_js for s <= j < len, 0 elsewhere.
template <class T, class A>
struct ChunkScores {
  ChunkProblem<T, A> p;
  MOXE_HD int64_t size() const { return p.chunks * p.heads * p.chunk_size * p.chunk_size; }
  MOXE_HD void operator()(int64_t i) const {
    const int64_t L = p.chunk_size;
    const int64_t s = i % L, j = (i / L) % L, khi = i / (L * L), c = khi / p.heads, h = khi % p.heads;
    const int len = p.ws.chunk_len[c];
    A out = A(0);
    if (j < len && s <= j) {
      const int64_t rj = p.row(c, h, j), rs = p.row(c, h, s);
      A dot = A(0);
      for (int64_t d = 0; d < p.dqk; ++d) dot += p.query(rj, d) * p.key(rs, d);
      out = dot * p.scale * p.intra_weight(rj, rs);  // as ScoresOp
    }
    p.ws.scores[i] = out;
  }
};

/// [index space K*NH*L]: nq_j and the normaliser's 1 / den_j.
template <class T, class A>
struct ChunkRowStats {
  ChunkProblem<T, A> p;
  MOXE_HD int64_t size() const { return p.chunks * p.heads * p.chunk_size; }
  MOXE_HD void operator()(int64_t i) const {
    const int64_t j = i % p.chunk_size, khi = i / p.chunk_size, c = khi / p.heads, h = khi % p.heads;
    if (j >= p.ws.chunk_len[c]) return;
    const int64_t r = p.row(c, h, j);
    const A nq = p.num_aug(c, h, j, p.dv);
    p.ws.nq[r] = nq;
    p.ws.inv_den[r] = normaliser(nq, p.ws.m[r], p.eps).inv_den;
  }
};

/// Per-element variant (MOXE_MLSTM_CHUNKWISE_SIMPLE) of OutputOp.
/// [index space K*NH*L*DV]: h.
template <class T, class A>
struct ChunkOutput {
  ChunkProblem<T, A> p;
  T* h;
  MOXE_HD int64_t size() const { return p.chunks * p.heads * p.chunk_size * p.dv; }
  MOXE_HD void operator()(int64_t i) const {
    const int64_t e = i % p.dv, j = (i / p.dv) % p.chunk_size, khi = i / (p.dv * p.chunk_size);
    const int64_t c = khi / p.heads, hd = khi % p.heads;
    if (j >= p.ws.chunk_len[c]) return;
    const int64_t r = p.row(c, hd, j);
    h[r * p.dv + e] = store_elem<T>(p.num_aug(c, hd, j, e) * p.ws.inv_den[r]);
  }
};

// ---- backward phases (after forward phases 1-6) -----------------------------------------

template <class T, class A>
struct ChunkBackwardBase {
  ChunkProblem<T, A> p;
  ChunkGradIO<T, A> io;
  /// dnum' = [dh / den | dnq]
  MOXE_HD A dnum_aug(int64_t r, int64_t e) const {
    return e < p.dv ? load_acc<A>(io.dh[r * p.dv + e]) * p.ws.inv_den[r] : p.ws.dnq[r];
  }
};

/// Per-element variant (MOXE_MLSTM_CHUNKWISE_SIMPLE) of NumInterOp, NumIntraOp.
/// [index space K*NH*L*(DV+1)]: the two parts of num'_j, kept for the row gradients.
template <class T, class A>
struct ChunkNumerators : ChunkBackwardBase<T, A> {
  MOXE_HD int64_t size() const {
    return this->p.chunks * this->p.heads * this->p.chunk_size * this->p.state_cols();
  }
  MOXE_HD void operator()(int64_t i) const {
    const ChunkProblem<T, A>& p = this->p;
    const int64_t cols = p.state_cols();
    const int64_t e = i % cols, j = (i / cols) % p.chunk_size, khi = i / (cols * p.chunk_size);
    const int64_t c = khi / p.heads, h = khi % p.heads;
    if (j >= p.ws.chunk_len[c]) return;
    const int64_t r = p.row(c, h, j);
    p.ws.num_inter[r * cols + e] = p.inter_aug(c, h, j, e);
    p.ws.num_intra[r * cols + e] = p.intra_aug(c, h, j, e);
  }
};

/// [index space K*NH*L]: the normaliser's backward and the gradient of log w_j.
template <class T, class A>
struct ChunkRowGrad : ChunkBackwardBase<T, A> {
  MOXE_HD int64_t size() const { return this->p.chunks * this->p.heads * this->p.chunk_size; }
  MOXE_HD void operator()(int64_t i) const {
    const ChunkProblem<T, A>& p = this->p;
    const int64_t j = i % p.chunk_size, khi = i / p.chunk_size, c = khi / p.heads, h = khi % p.heads;
    if (j >= p.ws.chunk_len[c]) return;
    const int64_t r = p.row(c, h, j);
    const A inv_den = p.ws.inv_den[r];
    const A* inter_row = p.ws.num_inter + r * p.state_cols();
    const A* intra_row = p.ws.num_intra + r * p.state_cols();
    A dh_dot_h = A(0), dlogw = A(0);
    for (int64_t e = 0; e < p.dv; ++e) {
      const A inter = inter_row[e];
      const A num = inter + intra_row[e];
      const A dh = load_acc<A>(this->io.dh[r * p.dv + e]);
      dh_dot_h += dh * (num * inv_den);
      dlogw += (dh * inv_den) * inter;
    }
    const A nq = p.ws.nq[r];
    const NormaliserGrad<A> ng = normaliser_backward(nq, normaliser(nq, p.ws.m[r], p.eps), dh_dot_h);
    p.ws.dnq[r] = ng.ddot;
    p.ws.direct[r] = ng.dm;
    // h_j depends on m_j only through the normaliser: d h_j / d m_j (through D, w and the
    // floor together) is eps dden_j = -eps (dh_j . h_j) / den_j exactly, with no cancellation.
    p.ws.dm_out[r] = -p.eps * dh_dot_h * inv_den;
    p.ws.dlogw[r] = dlogw + ng.ddot * inter_row[p.dv];
  }
};

/// Per-element variant (MOXE_MLSTM_CHUNKWISE_SIMPLE) of DStateLocalOp.
/// [index space K*NH*DQK*(DV+1)]: each chunk's own contribution to the gradient of the
/// state before it: sum_j w_j qs_j dnum'_j^T.
template <class T, class A>
struct ChunkDStateLocal : ChunkBackwardBase<T, A> {
  MOXE_HD int64_t size() const { return this->p.chunks * this->p.heads * this->p.state_size(); }
  MOXE_HD void operator()(int64_t i) const {
    const ChunkProblem<T, A>& p = this->p;
    const int64_t e = i % p.state_cols(), d = (i / p.state_cols()) % p.dqk;
    const int64_t khi = i / p.state_size(), c = khi / p.heads, h = khi % p.heads;
    const int len = p.ws.chunk_len[c];
    if (len == 0) return;
    A acc = A(0);
    for (int j = 0; j < len; ++j) {
      const int64_t r = p.row(c, h, j);
      acc += p.inter_weight(r) * p.qs(r, d) * this->dnum_aug(r, e);
    }
    p.ws.dstate[i] = acc;
  }
};

/// [index space U*NH*DQK*(DV+1)]: the reverse inter-chunk recurrence, in place: each
/// chunk's local part is replaced by the gradient of the state after the chunk.
template <class T, class A>
struct ChunkDStateRecurrence : ChunkBackwardBase<T, A> {
  MOXE_HD int64_t size() const { return this->p.units * this->p.heads * this->p.state_size(); }
  MOXE_HD void operator()(int64_t i) const {
    const ChunkProblem<T, A>& p = this->p;
    const ChunkGradIO<T, A>& io = this->io;
    const int64_t e = i % p.state_cols(), d = (i / p.state_cols()) % p.dqk;
    const int64_t slot = i / p.state_size(), u = slot / p.heads, h = slot % p.heads;
    A cur = A(0);
    if (io.dc_last) cur = e < p.dv ? io.dc_last[(slot * p.dqk + d) * p.dv + e] : io.dn_last[slot * p.dqk + d];
    const int64_t first = p.ws.unit_first[u], count = p.ws.unit_chunks[u];
    for (int64_t c = first + count - 1; c >= first; --c) {
      const int64_t khi = p.kh(c, h);
      A* cell = p.ws.dstate + khi * p.state_size() + d * p.state_cols() + e;
      const A local = *cell;
      *cell = cur;
      const int64_t rl = p.row(c, h, p.ws.chunk_len[c] - 1);
      cur = p.inter_weight(rl) * cur + local;
    }
    if (io.dc_init) {
      if (e < p.dv) {
        io.dc_init[(slot * p.dqk + d) * p.dv + e] = cur;
      } else {
        io.dn_init[slot * p.dqk + d] = cur;
      }
    }
  }
};

/// [index space K*NH*kDecayGradParts]: partial sums of <dC'_next, C'_prev>, part p over the
/// elements p, p + parts, p + 2 parts, ... (adjacent threads read adjacent elements).
template <class T, class A>
struct ChunkDecayGradPartial : ChunkBackwardBase<T, A> {
  MOXE_HD int64_t size() const { return this->p.chunks * this->p.heads * kDecayGradParts; }
  MOXE_HD void operator()(int64_t i) const {
    const ChunkProblem<T, A>& p = this->p;
    const int64_t part = i % kDecayGradParts, khi = i / kDecayGradParts;
    if (p.ws.chunk_len[khi / p.heads] == 0) return;
    const A* st = p.ws.state + khi * p.state_size();
    const A* dst = p.ws.dstate + khi * p.state_size();
    A acc = A(0);
    for (int64_t x = part; x < p.state_size(); x += kDecayGradParts) acc += dst[x] * st[x];
    p.ws.decay_partials[i] = acc;
  }
};

/// [index space K*NH]: gradient of log w_L through the next state: w_L <dC'_next, C'_prev>,
/// the partial sums added in a fixed order.
template <class T, class A>
struct ChunkDecayGrad : ChunkBackwardBase<T, A> {
  MOXE_HD int64_t size() const { return this->p.chunks * this->p.heads; }
  MOXE_HD void operator()(int64_t khi) const {
    const ChunkProblem<T, A>& p = this->p;
    const int64_t c = khi / p.heads, h = khi % p.heads;
    const int len = p.ws.chunk_len[c];
    if (len == 0) return;
    A acc = A(0);
    for (int part = 0; part < kDecayGradParts; ++part) acc += p.ws.decay_partials[khi * kDecayGradParts + part];
    p.ws.dlogw_last[khi] = p.inter_weight(p.row(c, h, len - 1)) * acc;
  }
};

/// Per-element variant (MOXE_MLSTM_CHUNKWISE_SIMPLE) of DScoresOp.
/// [index space K*NH*L*L]: dS_js = dP_js D_js and dlogD_js = dP_js P_js,
/// dP_js = dnum'_j . v'_s.
template <class T, class A>
struct ChunkDScores : ChunkBackwardBase<T, A> {
  MOXE_HD int64_t size() const {
    return this->p.chunks * this->p.heads * this->p.chunk_size * this->p.chunk_size;
  }
  MOXE_HD void operator()(int64_t i) const {
    const ChunkProblem<T, A>& p = this->p;
    const int64_t L = p.chunk_size;
    const int64_t s = i % L, j = (i / L) % L, khi = i / (L * L), c = khi / p.heads, h = khi % p.heads;
    const int len = p.ws.chunk_len[c];
    A ds = A(0), dlogd = A(0);
    if (j < len && s <= j) {
      const int64_t rj = p.row(c, h, j), rs = p.row(c, h, s);
      A dp = A(0);
      for (int64_t e = 0; e <= p.dv; ++e) dp += this->dnum_aug(rj, e) * p.value_aug(rs, e);
      ds = dp * p.intra_weight(rj, rs);
      dlogd = dp * p.ws.scores[i];
    }
    p.ws.dscores[i] = ds;
    p.ws.dlogd[i] = dlogd;
  }
};

/// [index space K*NH*L] (after dk, whose dcv it reads): column sums of dlogD, and the
/// gradient of log E_s.
template <class T, class A>
struct ChunkLogWeightSums : ChunkBackwardBase<T, A> {
  MOXE_HD int64_t size() const { return this->p.chunks * this->p.heads * this->p.chunk_size; }
  MOXE_HD void operator()(int64_t i) const {
    const ChunkProblem<T, A>& p = this->p;
    const int64_t L = p.chunk_size;
    const int64_t j = i % L, khi = i / L, c = khi / p.heads, h = khi % p.heads;
    const int len = p.ws.chunk_len[c];
    if (j >= len) return;
    const A* dlogd = p.ws.dlogd + khi * L * L;
    A cs = A(0);
    for (int64_t t = j; t < len; ++t) cs += dlogd[t * L + j];
    const int64_t r = p.row(c, h, j);
    // log E_j: E_j k_j^T dC'_next v'_j, with dC'_next v'_j from ChunkDK
    const A* dcv = p.ws.dcv + r * p.dqk;
    A acc = A(0);
    for (int64_t d = 0; d < p.dqk; ++d) acc += p.key(r, d) * dcv[d];
    p.ws.col_sum[r] = cs;
    p.ws.dloge[r] = p.state_weight(r) * acc;
  }
};

/// Per-element variant (MOXE_MLSTM_CHUNKWISE_SIMPLE) of DQOp.
/// [index space K*NH*L*DQK]: dq.
template <class T, class A>
struct ChunkDQ : ChunkBackwardBase<T, A> {
  MOXE_HD int64_t size() const { return this->p.chunks * this->p.heads * this->p.chunk_size * this->p.dqk; }
  MOXE_HD void operator()(int64_t i) const {
    const ChunkProblem<T, A>& p = this->p;
    const int64_t L = p.chunk_size;
    const int64_t d = i % p.dqk, j = (i / p.dqk) % L, khi = i / (p.dqk * L), c = khi / p.heads, h = khi % p.heads;
    if (j >= p.ws.chunk_len[c]) return;
    const int64_t r = p.row(c, h, j);
    const A* st = p.ws.state + khi * p.state_size() + d * p.state_cols();
    A inter = A(0);
    for (int64_t e = 0; e <= p.dv; ++e) inter += st[e] * this->dnum_aug(r, e);
    const A* ds = p.ws.dscores + khi * L * L + j * L;
    A intra = A(0);
    for (int64_t s = 0; s <= j; ++s) intra += ds[s] * p.key(p.row(c, h, s), d);
    this->io.dq[r * p.dqk + d] = store_elem<T>((p.inter_weight(r) * inter + intra) * p.scale);
  }
};

/// Per-element variant (MOXE_MLSTM_CHUNKWISE_SIMPLE) of DCVOp, DKOp.
/// [index space K*NH*L*DQK]: dk (and dC'_next v'_s for ChunkLogWeightSums).
template <class T, class A>
struct ChunkDK : ChunkBackwardBase<T, A> {
  MOXE_HD int64_t size() const { return this->p.chunks * this->p.heads * this->p.chunk_size * this->p.dqk; }
  MOXE_HD void operator()(int64_t i) const {
    const ChunkProblem<T, A>& p = this->p;
    const int64_t L = p.chunk_size;
    const int64_t d = i % p.dqk, s = (i / p.dqk) % L, khi = i / (p.dqk * L), c = khi / p.heads, h = khi % p.heads;
    const int len = p.ws.chunk_len[c];
    if (s >= len) return;
    const int64_t r = p.row(c, h, s);
    const A* ds = p.ws.dscores + khi * L * L;
    A intra = A(0);
    for (int64_t j = s; j < len; ++j) intra += ds[j * L + s] * p.qs(p.row(c, h, j), d);
    const A* dst = p.ws.dstate + khi * p.state_size() + d * p.state_cols();
    A state = A(0);
    for (int64_t e = 0; e <= p.dv; ++e) state += dst[e] * p.value_aug(r, e);
    p.ws.dcv[r * p.dqk + d] = state;
    this->io.dk[r * p.dqk + d] = store_elem<T>(intra + p.state_weight(r) * state);
  }
};

/// Per-element variant (MOXE_MLSTM_CHUNKWISE_SIMPLE) of DVOp.
/// [index space K*NH*L*DV]: dv.
template <class T, class A>
struct ChunkDV : ChunkBackwardBase<T, A> {
  MOXE_HD int64_t size() const { return this->p.chunks * this->p.heads * this->p.chunk_size * this->p.dv; }
  MOXE_HD void operator()(int64_t i) const {
    const ChunkProblem<T, A>& p = this->p;
    const int64_t L = p.chunk_size;
    const int64_t e = i % p.dv, s = (i / p.dv) % L, khi = i / (p.dv * L), c = khi / p.heads, h = khi % p.heads;
    const int len = p.ws.chunk_len[c];
    if (s >= len) return;
    const int64_t r = p.row(c, h, s);
    const A* sc = p.ws.scores + khi * L * L;
    A intra = A(0);
    for (int64_t j = s; j < len; ++j) intra += sc[j * L + s] * this->dnum_aug(p.row(c, h, j), e);
    const A* dst = p.ws.dstate + khi * p.state_size() + e;
    A state = A(0);
    for (int64_t d = 0; d < p.dqk; ++d) state += dst[d * p.state_cols()] * p.key(r, d);
    this->io.dv[r * p.dv + e] = store_elem<T>(intra + p.state_weight(r) * state);
  }
};

// Gate gradients. Inside a chunk, with dm_next the gradient of the chunk's last m (m_L)
// from the chunk after it, R_j = sum_s dlogD_js and C_s = sum_j dlogD_js, the gradient of
// m_j is
//   dmt_j = direct_j - R_j - dlogw_j  (+ dm_next - sum_s dlogE_s - dlogw_L at j = L)
// where direct_j - R_j - dlogw_j = eps dden_j (= dm_out_j) exactly. Then
//   di_s  = C_s + dlogE_s + sum_{j: origin_j = s} dmt_j
//   dg_j  = R_j + dlogw_j - C_j - dlogE_j + dmt_j - sum_{j': origin_j' = j} dmt_j'
//           (+ sum_s dlogE_s + dlogw_L at j = L)
//         = direct_j - di_j  (+ dm_next at j = L)
//   dm_prev = sum_j dlogw_j + dlogw_L + sum_{j: origin_j = -1} dmt_j
//   dlogsigmoid(f_r) = sum_{j>=r} dg_j
// dm_next enters only through dmt_L, so each chunk is first solved with dm_next = 0 (in
// parallel), then a scalar reverse recurrence over chunks gives dm_next, and a last pass
// adds its share: di_{origin_L} += dm_next, dlogsigmoid(f_r) += dm_next for origin_L < r <= L,
// dm_prev += dm_next when origin_L = -1.

/// [index space K*NH]: each chunk's gate gradients with dm_next = 0.
template <class T, class A>
struct ChunkGateGradLocal : ChunkBackwardBase<T, A> {
  MOXE_HD int64_t size() const { return this->p.chunks * this->p.heads; }
  MOXE_HD void operator()(int64_t khi) const {
    const ChunkProblem<T, A>& p = this->p;
    const ChunkWorkspace<A>& w = p.ws;
    const int64_t c = khi / p.heads, h = khi % p.heads;
    const int len = w.chunk_len[c];
    if (len == 0) return;
    A sum_dloge = A(0);
    for (int j = 0; j < len; ++j) sum_dloge += w.dloge[p.row(c, h, j)];
    const A dlogw_last = w.dlogw_last[khi];
    A dm_prev = dlogw_last, from_prev = A(0);
    for (int j = 0; j < len; ++j) w.origin_acc[p.row(c, h, j)] = A(0);
    for (int j = 0; j < len; ++j) {
      const int64_t r = p.row(c, h, j);
      A dmt = w.dm_out[r];
      if (j == len - 1) dmt -= sum_dloge + dlogw_last;
      const int32_t o = w.origin[r];
      if (o < 0) {
        from_prev += dmt;
      } else {
        w.origin_acc[p.row(c, h, o)] += dmt;
      }
      dm_prev += w.dlogw[r];
    }
    A dlf = A(0);
    for (int j = len - 1; j >= 0; --j) {
      const int64_t r = p.row(c, h, j);
      const A di = w.col_sum[r] + w.dloge[r] + w.origin_acc[r];
      // the forget gate of a reset row (and of every row before it) enters no decay sum of
      // a row after the reset (g restarts there): the terms of those rows cancel exactly in
      // the definition, not in rounding, so the suffix sum restarts at a reset
      if (w.since_reset[r] == 0) {
        dlf = A(0);
      } else {
        dlf += w.direct[r] - di;
      }
      w.di_local[r] = di;
      w.dlf_local[r] = dlf;
    }
    w.dm_prev_local[khi] = dm_prev + from_prev;
  }
};

/// [index space U*NH]: the reverse recurrence of the stabiliser's gradient over chunks:
/// dm_next of each chunk, and dm_init.
template <class T, class A>
struct ChunkStabiliserGradRecurrence : ChunkBackwardBase<T, A> {
  static constexpr bool kSequentialPhase = true;
  MOXE_HD int64_t size() const { return this->p.units * this->p.heads; }
  MOXE_HD void operator()(int64_t slot) const {
    const ChunkProblem<T, A>& p = this->p;
    const ChunkWorkspace<A>& w = p.ws;
    const int64_t u = slot / p.heads, h = slot % p.heads;
    A dm = this->io.dm_last ? this->io.dm_last[slot] : A(0);
    const int64_t first = w.unit_first[u], count = w.unit_chunks[u];
    for (int64_t c = first + count - 1; c >= first; --c) {
      const int64_t khi = p.kh(c, h);
      w.dm_next[khi] = dm;
      const bool last_from_prev = w.origin[p.row(c, h, w.chunk_len[c] - 1)] < 0;
      dm = w.dm_prev_local[khi] + (last_from_prev ? dm : A(0));
    }
    if (this->io.dm_init) this->io.dm_init[slot] = dm;
  }
};

/// [index space K*NH*L]: digate and dfgate, with dm_next's share added.
template <class T, class A>
struct ChunkGateGradFinal : ChunkBackwardBase<T, A> {
  MOXE_HD int64_t size() const { return this->p.chunks * this->p.heads * this->p.chunk_size; }
  MOXE_HD void operator()(int64_t i) const {
    const ChunkProblem<T, A>& p = this->p;
    const ChunkWorkspace<A>& w = p.ws;
    const int64_t j = i % p.chunk_size, khi = i / p.chunk_size, c = khi / p.heads, h = khi % p.heads;
    const int len = w.chunk_len[c];
    if (j >= len) return;
    const int64_t r = p.row(c, h, j);
    const A dm_next = w.dm_next[khi];
    const int32_t origin_last = w.origin[p.row(c, h, len - 1)];
    const A di = w.di_local[r] + (j == origin_last ? dm_next : A(0));
    const A dlf = w.dlf_local[r] + (j > origin_last ? dm_next : A(0));
    this->io.digate[r] = store_elem<T>(di);
    this->io.dfgate[r] = store_elem<T>(dlf * math::logsigmoid_grad(load_acc<A>(p.fgate[r])));
  }
};

// ---- tile products ----------------------------------------------------------------------
// The matrix products of a chunk as tile products: for every (chunk, head) item,
// out(x, y) = sum_z a(x, z) b(z, y), x < rows, y < cols, z < depth, then epilogue(x, y, out).
// The device computes each 16 x 16 output tile with one warp (operands staged in shared
// memory 16 deep; tensor cores (TF32) for half and bf16 inputs, fp32 FMA for float inputs);
// the host (run_tile_product_host) stages and sums the same tiles in the same z order.
// kAContiguousX / kBContiguousZ (default false, TileOpBase) tell the device's staging which
// index of A(x, z) / B(z, y) is contiguous in memory; they change no value.
// kAExactTF32 / kBExactTF32 (default false, TileOpBase): every value of that operand is an
// input element as given (half and bf16 values are exact in TF32), so the device's 3xTF32
// split has a zero low part there and skips its product (adding exact zeros changes no
// value).
// Concatenated products (two sums in one) pad the first part of z to a multiple of kTile.

inline constexpr int kTile = 16;

MOXE_HD inline int64_t pad_to_tile(int64_t n) { return (n + kTile - 1) / kTile * kTile; }

template <class T, class A>
struct TileOpBase {
  static constexpr bool kTileProduct = true;
  // staging and precision hints (see above); an op that knows better redeclares them
  static constexpr bool kAContiguousX = false, kBContiguousZ = false;
  static constexpr bool kAExactTF32 = false, kBExactTF32 = false;
  using Element = T;
  using Acc = A;
  ChunkProblem<T, A> p;
  MOXE_HD int64_t items() const { return p.chunks * p.heads; }
  MOXE_HD ChunkItem context(int64_t item) const { return p.item(item); }
};

template <class T, class A>
struct TileGradOpBase : TileOpBase<T, A> {
  ChunkGradIO<T, A> io;
  /// dnum' = [dh / den | dnq]
  MOXE_HD A dnum_aug(int64_t r, int64_t e) const {
    return e < this->p.dv ? load_acc<A>(io.dh[r * this->p.dv + e]) * this->p.ws.inv_den[r] : this->p.ws.dnq[r];
  }
};

/// Each chunk's own state: sum_s (E_s k_s) v'_s^T  -> state [DQK][DV+1].
template <class T, class A>
struct StateLocalOp : TileOpBase<T, A> {
  static constexpr bool kAContiguousX = true;  // A(d, s) = E_s k_s[d]
  static constexpr bool kBExactTF32 = true;    // B = v' (inputs, and the ones column)
  MOXE_HD int64_t max_rows() const { return this->p.dqk; }
  MOXE_HD int64_t max_cols() const { return this->p.state_cols(); }
  MOXE_HD int64_t rows(const ChunkItem& it) const { return it.len > 0 ? this->p.dqk : 0; }
  MOXE_HD int64_t cols(const ChunkItem&) const { return this->p.state_cols(); }
  MOXE_HD int64_t depth(const ChunkItem& it) const { return it.len; }
  MOXE_HD A a(const ChunkItem& it, int64_t d, int64_t s) const {
    const int64_t r = it.row0 + s;
    return this->p.state_weight(r) * this->p.key(r, d);
  }
  MOXE_HD A b(const ChunkItem& it, int64_t s, int64_t e) const { return this->p.value_aug(it.row0 + s, e); }
  MOXE_HD void epilogue(const ChunkItem& it, int64_t d, int64_t e, A acc) const {
    this->p.ws.state[it.khi * this->p.state_size() + d * this->p.state_cols() + e] = acc;
  }
};

/// P_js = (q_j . k_s) scale D_js, s <= j (0 above the diagonal): the scale is applied to the
/// dot product, so both operands are inputs as given (exact in TF32: one MMA, not three).
template <class T, class A>
struct ScoresOp : TileOpBase<T, A> {
  static constexpr bool kBContiguousZ = true;  // B(d, s) = k_s[d]
  static constexpr bool kAExactTF32 = true, kBExactTF32 = true;
  MOXE_HD int64_t max_rows() const { return this->p.chunk_size; }
  MOXE_HD int64_t max_cols() const { return this->p.chunk_size; }
  MOXE_HD int64_t rows(const ChunkItem& it) const { return it.len; }
  MOXE_HD int64_t cols(const ChunkItem& it) const { return it.len; }
  MOXE_HD int64_t depth(const ChunkItem&) const { return this->p.dqk; }
  MOXE_HD A a(const ChunkItem& it, int64_t j, int64_t d) const { return this->p.query(it.row0 + j, d); }
  MOXE_HD A b(const ChunkItem& it, int64_t d, int64_t s) const { return this->p.key(it.row0 + s, d); }
  MOXE_HD void epilogue(const ChunkItem& it, int64_t j, int64_t s, A acc) const {
    const A out = s <= j ? acc * this->p.scale * this->p.intra_weight(it.row0 + j, it.row0 + s) : A(0);
    this->p.ws.scores[it.khi * this->p.chunk_size * this->p.chunk_size + j * this->p.chunk_size + s] = out;
  }
};

/// h_j = (w_j qs_j^T C_prev + sum_s P_js v_s) / den_j: z = [d (padded) | s].
template <class T, class A>
struct OutputOp : TileOpBase<T, A> {
  T* h;
  MOXE_HD int64_t max_rows() const { return this->p.chunk_size; }
  MOXE_HD int64_t max_cols() const { return this->p.dv; }
  MOXE_HD int64_t rows(const ChunkItem& it) const { return it.len; }
  MOXE_HD int64_t cols(const ChunkItem&) const { return this->p.dv; }
  MOXE_HD int64_t depth(const ChunkItem& it) const { return it.len > 0 ? pad_to_tile(this->p.dqk) + it.len : 0; }
  MOXE_HD A a(const ChunkItem& it, int64_t j, int64_t z) const {
    const ChunkProblem<T, A>& p = this->p;
    const int64_t r = it.row0 + j, z1 = pad_to_tile(p.dqk);
    if (z < p.dqk) return p.inter_weight(r) * p.qs(r, z);
    if (z < z1) return A(0);
    return p.scores_of(it.khi)[j * p.chunk_size + (z - z1)];
  }
  MOXE_HD A b(const ChunkItem& it, int64_t z, int64_t e) const {
    const ChunkProblem<T, A>& p = this->p;
    const int64_t z1 = pad_to_tile(p.dqk);
    if (z < p.dqk) return p.state_of(it.khi)[z * p.state_cols() + e];
    if (z < z1) return A(0);
    return p.value_aug(it.row0 + (z - z1), e);
  }
  MOXE_HD void epilogue(const ChunkItem& it, int64_t j, int64_t e, A acc) const {
    const int64_t r = it.row0 + j;
    h[r * this->p.dv + e] = store_elem<T>(acc * this->p.ws.inv_den[r]);
  }
};

/// num_inter = w_j C'_prev^T qs_j  -> [rows][DV+1]
template <class T, class A>
struct NumInterOp : TileGradOpBase<T, A> {
  MOXE_HD int64_t max_rows() const { return this->p.chunk_size; }
  MOXE_HD int64_t max_cols() const { return this->p.state_cols(); }
  MOXE_HD int64_t rows(const ChunkItem& it) const { return it.len; }
  MOXE_HD int64_t cols(const ChunkItem&) const { return this->p.state_cols(); }
  MOXE_HD int64_t depth(const ChunkItem&) const { return this->p.dqk; }
  MOXE_HD A a(const ChunkItem& it, int64_t j, int64_t d) const { return this->p.qs(it.row0 + j, d); }
  MOXE_HD A b(const ChunkItem& it, int64_t d, int64_t e) const {
    return this->p.state_of(it.khi)[d * this->p.state_cols() + e];
  }
  MOXE_HD void epilogue(const ChunkItem& it, int64_t j, int64_t e, A acc) const {
    const int64_t r = it.row0 + j;
    this->p.ws.num_inter[r * this->p.state_cols() + e] = this->p.inter_weight(r) * acc;
  }
};

/// num_intra = sum_s P_js v'_s  -> [rows][DV+1]
template <class T, class A>
struct NumIntraOp : TileGradOpBase<T, A> {
  static constexpr bool kBExactTF32 = true;  // B = v'
  MOXE_HD int64_t max_rows() const { return this->p.chunk_size; }
  MOXE_HD int64_t max_cols() const { return this->p.state_cols(); }
  MOXE_HD int64_t rows(const ChunkItem& it) const { return it.len; }
  MOXE_HD int64_t cols(const ChunkItem&) const { return this->p.state_cols(); }
  MOXE_HD int64_t depth(const ChunkItem& it) const { return it.len; }
  MOXE_HD A a(const ChunkItem& it, int64_t j, int64_t s) const {
    return this->p.scores_of(it.khi)[j * this->p.chunk_size + s];
  }
  MOXE_HD A b(const ChunkItem& it, int64_t s, int64_t e) const { return this->p.value_aug(it.row0 + s, e); }
  MOXE_HD void epilogue(const ChunkItem& it, int64_t j, int64_t e, A acc) const {
    this->p.ws.num_intra[(it.row0 + j) * this->p.state_cols() + e] = acc;
  }
};

/// Each chunk's own share of dC'_prev: sum_j (w_j qs_j) dnum'_j^T  -> dstate [DQK][DV+1].
template <class T, class A>
struct DStateLocalOp : TileGradOpBase<T, A> {
  static constexpr bool kAContiguousX = true;  // A(d, j) = w_j qs_j[d]
  MOXE_HD int64_t max_rows() const { return this->p.dqk; }
  MOXE_HD int64_t max_cols() const { return this->p.state_cols(); }
  MOXE_HD int64_t rows(const ChunkItem& it) const { return it.len > 0 ? this->p.dqk : 0; }
  MOXE_HD int64_t cols(const ChunkItem&) const { return this->p.state_cols(); }
  MOXE_HD int64_t depth(const ChunkItem& it) const { return it.len; }
  MOXE_HD A a(const ChunkItem& it, int64_t d, int64_t j) const {
    const int64_t r = it.row0 + j;
    return this->p.inter_weight(r) * this->p.qs(r, d);
  }
  MOXE_HD A b(const ChunkItem& it, int64_t j, int64_t e) const { return this->dnum_aug(it.row0 + j, e); }
  MOXE_HD void epilogue(const ChunkItem& it, int64_t d, int64_t e, A acc) const {
    this->p.ws.dstate[it.khi * this->p.state_size() + d * this->p.state_cols() + e] = acc;
  }
};

/// dP_js = dnum'_j . v'_s; dS = dP D, dlogD = dP P (0 above the diagonal).
template <class T, class A>
struct DScoresOp : TileGradOpBase<T, A> {
  static constexpr bool kBContiguousZ = true;  // B(e, s) = v'_s[e]
  static constexpr bool kBExactTF32 = true;
  MOXE_HD int64_t max_rows() const { return this->p.chunk_size; }
  MOXE_HD int64_t max_cols() const { return this->p.chunk_size; }
  MOXE_HD int64_t rows(const ChunkItem& it) const { return it.len; }
  MOXE_HD int64_t cols(const ChunkItem& it) const { return it.len; }
  MOXE_HD int64_t depth(const ChunkItem&) const { return this->p.state_cols(); }
  MOXE_HD A a(const ChunkItem& it, int64_t j, int64_t e) const { return this->dnum_aug(it.row0 + j, e); }
  MOXE_HD A b(const ChunkItem& it, int64_t e, int64_t s) const { return this->p.value_aug(it.row0 + s, e); }
  MOXE_HD void epilogue(const ChunkItem& it, int64_t j, int64_t s, A acc) const {
    const ChunkProblem<T, A>& p = this->p;
    const int64_t i = it.khi * p.chunk_size * p.chunk_size + j * p.chunk_size + s;
    A ds = A(0), dlogd = A(0);
    if (s <= j) {
      ds = acc * p.intra_weight(it.row0 + j, it.row0 + s);
      dlogd = acc * p.ws.scores[i];
    }
    p.ws.dscores[i] = ds;
    p.ws.dlogd[i] = dlogd;
  }
};

/// dq_j = scale (w_j C'_prev dnum'_j + sum_s dS_js k_s): z = [e (padded) | s].
template <class T, class A>
struct DQOp : TileGradOpBase<T, A> {
  static constexpr bool kBContiguousZ = true;  // B(e, d) = C'_prev[d][e] (most of z; k_s[d] for the rest)
  MOXE_HD int64_t max_rows() const { return this->p.chunk_size; }
  MOXE_HD int64_t max_cols() const { return this->p.dqk; }
  MOXE_HD int64_t rows(const ChunkItem& it) const { return it.len; }
  MOXE_HD int64_t cols(const ChunkItem&) const { return this->p.dqk; }
  MOXE_HD int64_t depth(const ChunkItem& it) const {
    return it.len > 0 ? pad_to_tile(this->p.state_cols()) + it.len : 0;
  }
  MOXE_HD A a(const ChunkItem& it, int64_t j, int64_t z) const {
    const ChunkProblem<T, A>& p = this->p;
    const int64_t r = it.row0 + j, z1 = pad_to_tile(p.state_cols());
    if (z < p.state_cols()) return p.inter_weight(r) * this->dnum_aug(r, z);
    if (z < z1) return A(0);
    return p.dscores_of(it.khi)[j * p.chunk_size + (z - z1)];
  }
  MOXE_HD A b(const ChunkItem& it, int64_t z, int64_t d) const {
    const ChunkProblem<T, A>& p = this->p;
    const int64_t z1 = pad_to_tile(p.state_cols());
    if (z < p.state_cols()) return p.state_of(it.khi)[d * p.state_cols() + z];
    if (z < z1) return A(0);
    return p.key(it.row0 + (z - z1), d);
  }
  MOXE_HD void epilogue(const ChunkItem& it, int64_t j, int64_t d, A acc) const {
    this->io.dq[(it.row0 + j) * this->p.dqk + d] = store_elem<T>(acc * this->p.scale);
  }
};

/// dcv_s = dC'_next v'_s  -> [rows][DQK] (the state part of dk, before E_s).
template <class T, class A>
struct DCVOp : TileGradOpBase<T, A> {
  static constexpr bool kAExactTF32 = true;  // A = v'
  static constexpr bool kBContiguousZ = true;  // B(e, d) = dC'_next[d][e]
  MOXE_HD int64_t max_rows() const { return this->p.chunk_size; }
  MOXE_HD int64_t max_cols() const { return this->p.dqk; }
  MOXE_HD int64_t rows(const ChunkItem& it) const { return it.len; }
  MOXE_HD int64_t cols(const ChunkItem&) const { return this->p.dqk; }
  MOXE_HD int64_t depth(const ChunkItem&) const { return this->p.state_cols(); }
  MOXE_HD A a(const ChunkItem& it, int64_t s, int64_t e) const { return this->p.value_aug(it.row0 + s, e); }
  MOXE_HD A b(const ChunkItem& it, int64_t e, int64_t d) const {
    return this->p.dstate_of(it.khi)[d * this->p.state_cols() + e];
  }
  MOXE_HD void epilogue(const ChunkItem& it, int64_t s, int64_t d, A acc) const {
    this->p.ws.dcv[(it.row0 + s) * this->p.dqk + d] = acc;
  }
};

/// dk_s = sum_j dS_js qs_j + E_s dcv_s.
template <class T, class A>
struct DKOp : TileGradOpBase<T, A> {
  static constexpr bool kAContiguousX = true;  // A(s, j) = dS[j][s]
  MOXE_HD int64_t max_rows() const { return this->p.chunk_size; }
  MOXE_HD int64_t max_cols() const { return this->p.dqk; }
  MOXE_HD int64_t rows(const ChunkItem& it) const { return it.len; }
  MOXE_HD int64_t cols(const ChunkItem&) const { return this->p.dqk; }
  MOXE_HD int64_t depth(const ChunkItem& it) const { return it.len; }
  MOXE_HD A a(const ChunkItem& it, int64_t s, int64_t j) const {
    return this->p.dscores_of(it.khi)[j * this->p.chunk_size + s];
  }
  MOXE_HD A b(const ChunkItem& it, int64_t j, int64_t d) const { return this->p.qs(it.row0 + j, d); }
  MOXE_HD void epilogue(const ChunkItem& it, int64_t s, int64_t d, A acc) const {
    const ChunkProblem<T, A>& p = this->p;
    const int64_t r = it.row0 + s;
    this->io.dk[r * p.dqk + d] = store_elem<T>(acc + p.state_weight(r) * p.ws.dcv[r * p.dqk + d]);
  }
};

/// dv_s = sum_j P_js dnum_j + E_s dC_next^T k_s: z = [j (padded) | d].
template <class T, class A>
struct DVOp : TileGradOpBase<T, A> {
  MOXE_HD int64_t max_rows() const { return this->p.chunk_size; }
  MOXE_HD int64_t max_cols() const { return this->p.dv; }
  MOXE_HD int64_t rows(const ChunkItem& it) const { return it.len; }
  MOXE_HD int64_t cols(const ChunkItem&) const { return this->p.dv; }
  MOXE_HD int64_t depth(const ChunkItem& it) const { return it.len > 0 ? pad_to_tile(it.len) + this->p.dqk : 0; }
  MOXE_HD A a(const ChunkItem& it, int64_t s, int64_t z) const {
    const ChunkProblem<T, A>& p = this->p;
    const int64_t z1 = pad_to_tile(it.len);
    if (z < it.len) return p.scores_of(it.khi)[z * p.chunk_size + s];
    if (z < z1) return A(0);
    const int64_t r = it.row0 + s;
    return p.state_weight(r) * p.key(r, z - z1);
  }
  MOXE_HD A b(const ChunkItem& it, int64_t z, int64_t e) const {
    const ChunkProblem<T, A>& p = this->p;
    const int64_t z1 = pad_to_tile(it.len);
    if (z < it.len) return this->dnum_aug(it.row0 + z, e);
    if (z < z1) return A(0);
    return p.dstate_of(it.khi)[(z - z1) * p.state_cols() + e];
  }
  MOXE_HD void epilogue(const ChunkItem& it, int64_t s, int64_t e, A acc) const {
    this->io.dv[(it.row0 + s) * this->p.dv + e] = store_elem<T>(acc);
  }
};

/// Whether a phase is a tile product (else an index functor).
template <class F, class = void>
struct is_tile_product : std::false_type {};
template <class F>
struct is_tile_product<F, std::void_t<decltype(F::kTileProduct)>> : std::true_type {};

/// Whether the device multiplies an op's operands on tensor cores (TF32): half and bf16
/// inputs with float accumulation.
template <class Op>
inline constexpr bool uses_tf32_v =
    !std::is_arithmetic_v<typename Op::Element> && std::is_same_v<typename Op::Acc, float>;

/// x rounded to TF32 (10 mantissa bits, to nearest, ties away from zero), as the device's
/// conversion to a tensor-core operand does.
inline float round_to_tf32(float x) {
  std::uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  if ((bits & 0x7f800000u) != 0x7f800000u) bits = (bits + 0x1000u) & 0xffffe000u;  // finite only
  std::memcpy(&x, &bits, sizeof bits);
  return x;
}

/// The host check of an op's kAExactTF32 / kBExactTF32 claims (the device skips the low
/// TF32 parts of such operands): every value the tiles would stage is a TF32 value.
template <class Op>
bool exact_operands_hold_host(const Op& op) {
  constexpr bool kA = Op::kAExactTF32, kB = Op::kBExactTF32;
  if constexpr (!uses_tf32_v<Op> || (!kA && !kB)) {
    (void)op;
    return true;
  } else {
    using A = typename Op::Acc;
    auto exact = [](A x) { return round_to_tf32(x) == x; };
    for (int64_t item = 0; item < op.items(); ++item) {
      const ChunkItem it = op.context(item);
      const int64_t rows = op.rows(it), cols = op.cols(it), depth = op.depth(it);
      for (int64_t z = 0; z < depth; ++z) {
        if constexpr (kA)
          for (int64_t x = 0; x < rows; ++x)
            if (!exact(op.a(it, x, z))) return false;
        if constexpr (kB)
          for (int64_t y = 0; y < cols; ++y)
            if (!exact(op.b(it, z, y))) return false;
      }
    }
    return true;
  }
}

/// The host execution of a tile product: the device's tiles, staged and summed in the
/// same order (the reference for the device's tile engine, and the CPU check of the ops).
/// For half and bf16 with float accumulation the products are formed like the device's
/// 3xTF32 tensor-core products: a b ~ a_hi b_lo + a_lo b_hi + a_hi b_hi.
template <class Op>
void run_tile_product_host(const Op& op) {
  using A = typename Op::Acc;
  auto operand = [](A x) { return x; };
  auto product = [](A a, A b) {
    if constexpr (uses_tf32_v<Op>) {
      const A a_hi = round_to_tf32(a), a_lo = round_to_tf32(a - a_hi);
      const A b_hi = round_to_tf32(b), b_lo = round_to_tf32(b - b_hi);
      return a_hi * b_lo + a_lo * b_hi + a_hi * b_hi;
    } else {
      return a * b;
    }
  };
  A a_tile[kTile][kTile], b_tile[kTile][kTile], acc[kTile][kTile];
  for (int64_t item = 0; item < op.items(); ++item) {
    const ChunkItem it = op.context(item);
    const int64_t rows = op.rows(it), cols = op.cols(it), depth = op.depth(it);
    for (int64_t x0 = 0; x0 < rows; x0 += kTile) {
      for (int64_t y0 = 0; y0 < cols; y0 += kTile) {
        for (auto& row : acc)
          for (A& v : row) v = A(0);
        for (int64_t z0 = 0; z0 < depth; z0 += kTile) {
          for (int x = 0; x < kTile; ++x)
            for (int z = 0; z < kTile; ++z) {
              const bool in = x0 + x < rows && z0 + z < depth;
              a_tile[x][z] = in ? operand(op.a(it, x0 + x, z0 + z)) : A(0);
            }
          for (int z = 0; z < kTile; ++z)
            for (int y = 0; y < kTile; ++y) {
              const bool in = z0 + z < depth && y0 + y < cols;
              b_tile[z][y] = in ? operand(op.b(it, z0 + z, y0 + y)) : A(0);
            }
          for (int x = 0; x < kTile; ++x)
            for (int y = 0; y < kTile; ++y)
              for (int z = 0; z < kTile; ++z) acc[x][y] += product(a_tile[x][z], b_tile[z][y]);
        }
        for (int x = 0; x < kTile && x0 + x < rows; ++x)
          for (int y = 0; y < kTile && y0 + y < cols; ++y) op.epilogue(it, x0 + x, y0 + y, acc[x][y]);
      }
    }
  }
}

// ---- the order of the phases, one list for the host and the device ----------------------

/// Forward phases up to the row statistics; `run(phase)` executes one phase and returns a
/// Status (the host runs a loop, the device launches a kernel). kTiled: the chunk matrix
/// products as tile products (the default), else as per-element index functors.
#if defined(MOXE_MLSTM_CHUNKWISE_SIMPLE)
inline constexpr bool kChunkwiseTiled = false;  // fallback: per-element functors only
#else
inline constexpr bool kChunkwiseTiled = true;
#endif

template <bool kTiled, class T, class A, class Run>
Status run_forward_phases(const ChunkProblem<T, A>& cp, A* c_last, A* n_last, A* m_last, Run&& run) {
  MOXE_RETURN_IF_ERROR(run(BuildChunkTable<T, A>{cp}));
  MOXE_RETURN_IF_ERROR(run(ScanGates<T, A>{cp, m_last}));
  MOXE_RETURN_IF_ERROR(run(ChunkRowWeights<T, A>{cp}));
  if constexpr (kTiled) {
    MOXE_RETURN_IF_ERROR(run(StateLocalOp<T, A>{{cp}}));
  } else {
    MOXE_RETURN_IF_ERROR(run(ChunkStateLocal<T, A>{cp}));
  }
  MOXE_RETURN_IF_ERROR(run(ChunkStateRecurrence<T, A>{cp, c_last, n_last}));
  if constexpr (kTiled) {
    MOXE_RETURN_IF_ERROR(run(ScoresOp<T, A>{{cp}}));
  } else {
    MOXE_RETURN_IF_ERROR(run(ChunkScores<T, A>{cp}));
  }
  return run(ChunkRowStats<T, A>{cp});
}

/// The whole forward: h and (when given) the final states.
template <bool kTiled, class T, class A, class Run>
Status run_forward(const ChunkProblem<T, A>& cp, T* h, A* c_last, A* n_last, A* m_last, Run&& run) {
  MOXE_RETURN_IF_ERROR(run_forward_phases<kTiled>(cp, c_last, n_last, m_last, run));
  if constexpr (kTiled) {
    return run(OutputOp<T, A>{{cp}, h});
  } else {
    return run(ChunkOutput<T, A>{cp, h});
  }
}

/// The whole backward (the forward phases recomputed first). num_inter / num_intra and
/// dstate share memory (carve_chunk_workspace): nothing may read num_* after the first
/// dstate phase, nor dstate before it.
template <bool kTiled, class T, class A, class Run>
Status run_backward(const ChunkProblem<T, A>& cp, const ChunkGradIO<T, A>& io, Run&& run) {
  MOXE_RETURN_IF_ERROR(run_forward_phases<kTiled>(cp, static_cast<A*>(nullptr), static_cast<A*>(nullptr),
                                                  static_cast<A*>(nullptr), run));
  if constexpr (kTiled) {
    MOXE_RETURN_IF_ERROR(run(NumInterOp<T, A>{{{cp}, io}}));
    MOXE_RETURN_IF_ERROR(run(NumIntraOp<T, A>{{{cp}, io}}));
  } else {
    MOXE_RETURN_IF_ERROR(run(ChunkNumerators<T, A>{{cp, io}}));
  }
  MOXE_RETURN_IF_ERROR(run(ChunkRowGrad<T, A>{{cp, io}}));
  if constexpr (kTiled) {
    MOXE_RETURN_IF_ERROR(run(DStateLocalOp<T, A>{{{cp}, io}}));
  } else {
    MOXE_RETURN_IF_ERROR(run(ChunkDStateLocal<T, A>{{cp, io}}));
  }
  MOXE_RETURN_IF_ERROR(run(ChunkDStateRecurrence<T, A>{{cp, io}}));
  MOXE_RETURN_IF_ERROR(run(ChunkDecayGradPartial<T, A>{{cp, io}}));
  MOXE_RETURN_IF_ERROR(run(ChunkDecayGrad<T, A>{{cp, io}}));
  if constexpr (kTiled) {
    MOXE_RETURN_IF_ERROR(run(DScoresOp<T, A>{{{cp}, io}}));
    MOXE_RETURN_IF_ERROR(run(DQOp<T, A>{{{cp}, io}}));
    MOXE_RETURN_IF_ERROR(run(DCVOp<T, A>{{{cp}, io}}));
    MOXE_RETURN_IF_ERROR(run(DKOp<T, A>{{{cp}, io}}));
    MOXE_RETURN_IF_ERROR(run(DVOp<T, A>{{{cp}, io}}));
  } else {
    MOXE_RETURN_IF_ERROR(run(ChunkDScores<T, A>{{cp, io}}));
    MOXE_RETURN_IF_ERROR(run(ChunkDQ<T, A>{{cp, io}}));
    MOXE_RETURN_IF_ERROR(run(ChunkDK<T, A>{{cp, io}}));
    MOXE_RETURN_IF_ERROR(run(ChunkDV<T, A>{{cp, io}}));
  }
  MOXE_RETURN_IF_ERROR(run(ChunkLogWeightSums<T, A>{{cp, io}}));
  MOXE_RETURN_IF_ERROR(run(ChunkGateGradLocal<T, A>{{cp, io}}));
  MOXE_RETURN_IF_ERROR(run(ChunkStabiliserGradRecurrence<T, A>{{cp, io}}));
  return run(ChunkGateGradFinal<T, A>{{cp, io}});
}

}  // namespace moxe::mlstm::detail
