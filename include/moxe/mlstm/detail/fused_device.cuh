// moxe::mlstm::detail: the FUSED chunkwise mLSTM forward on the device (docs/mlstm.md
// "Fused decomposition", "Fused device forward"). It follows the host twin
// (chunkwise_fused_host.hpp) step by step, through the same MOXE_HD pieces
// (detail/fused_chunk.hpp, cell.hpp, core/precision.hpp) and the same workspace
// (detail::carve_fused_workspace), plus one array of per-row gate quantities:
//
//   [table]  segments only: the chunk table (detail::build_chunk_table, one thread).
//   F0 gate scan, grid (U*NH), 128 threads: thread i walks chunk i of the slot's unit (rows in
//            order, chunk_gate_step from ChunkGateRow::before(-inf), in double): the rows'
//            mp-free quantities (G, x, the running max of the sources and its origin, the
//            last reset) go to `local_rows`, the chunk's map (ChunkMap::of_last_row) into a
//            block scan; m_prev of every chunk = the exclusive scan of the maps seeded by
//            m_init (or 0), m_final after the last. Without segments it also fills the table.
//   F1 state, grid U*NH x ceil(DV/64) (column blocks of a slot adjacent), 8 warps: the
//            state C[:, 64-column block] of the slot in mma accumulators (warp w: DQK rows
//            16w.., +128), n in fp32 registers (block 0, one DQK row per thread). Per chunk:
//            the checkpoint C'_c (fp32) to the workspace, E_s and w_L from the scan's m_prev
//            on both sides, K and V staged by cp.async: whole chunks in two buffers (chunk
//            c + 1's copies in flight during chunk c) where they fit, else 16-row blocks
//            (double-buffered), C <- w_L C + (K^T diag(E)) V with the E_s k_s
//            operand built in registers (rounded to T: fast; split in three T parts:
//            accurate; half: scaled by a power of two per DQK row), n <- w_L n + K^T E by
//            FFMA. The final states when asked for.
//   F2 output, grid K*NH x ceil(DV/64) (column blocks of a chunk adjacent), one warp per 16
//            rows of the chunk: S = Q K^T (causal k-steps only) and inter = Q C_c on
//            mma.sync over 64-wide DQK slices (Q, K by cp.async; C_c converted from the fp32
//            checkpoint to T parts in shared memory; the slices in staged_rounds, two stages
//            where they cost no resident blocks),
//            P = scale S o D in registers (never stored; rounded / split per row as the
//            intermediate operand of P V), num = inter + P V, dot = w scale n.q + sum_s P in
//            fp32, the normaliser (cell.hpp) and h stored as T.
//
// Float inputs run the same structure with fp32 FMAs at the same fragment positions (exact
// fp32; allow_tf32 is not implemented on the device: float stays fp32). Everything is
// deterministic (fixed orders, no atomics); no allocation and no host synchronisation.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "moxe/core/config.hpp"
#include "moxe/core/launch.cuh"
#include "moxe/core/math.hpp"
#include "moxe/core/mma.cuh"
#include "moxe/core/precision.hpp"
#include "moxe/core/status.hpp"
#include "moxe/core/workspace.hpp"
#include "moxe/mlstm/detail/cell.hpp"
#include "moxe/mlstm/detail/chunk_layout.hpp"
#include "moxe/mlstm/detail/fused_chunk.hpp"
#include "moxe/mlstm/params.hpp"

namespace moxe::mlstm::detail {

// ---- an MOXE_HD piece: a chunk row from its mp-free quantities -------------------------------

/// Row j of a chunk started from m_prev, from `local`: row j of the same chunk started from
/// ChunkGateRow::before(-inf) (what F0 stores). G, x and reset do not depend on m_prev; the
/// running max is max(m_prev, the sources' max) with the recurrence's tie rule (m_prev wins
/// ties: origin -1), unless a reset dropped m_prev. Equal, bit for bit, to the sequential
/// chunk_gate_step from before(m_prev).
MOXE_HD inline ChunkGateRow gate_row_from_local(const ChunkGateRow& local, double m_prev) {
  if (local.reset >= 0) return local;
  ChunkGateRow r = local;
  const bool take = m_prev < local.a;
  r.a = take ? local.a : m_prev;
  r.origin = take ? local.origin : -1;
  return r;
}

// ---- workspace -------------------------------------------------------------------------------

/// The fused forward's scratch: detail::carve_fused_workspace (table, m_prev, m_final, the
/// checkpoints) and the per-row gate quantities of F0 ([B*NH*S] ChunkGateRow).
struct FusedForwardWorkspace {
  FusedWorkspace<float> ws;
  ChunkGateRow* local_rows = nullptr;
};

inline FusedForwardWorkspace carve_fused_forward_workspace(WorkspaceCarver& c, const Dims& d, int64_t num_segments,
                                                           int chunk_size) {
  FusedForwardWorkspace w;
  w.ws = carve_fused_workspace<float>(c, d, num_segments, chunk_size, /*backward=*/false);
  if (d.batch <= 0 || d.heads <= 0 || d.seq_len <= 0 || d.dqk <= 0 || d.dv <= 0 || num_segments < 0 ||
      chunk_size < 1)
    return w;
  w.local_rows = c.carve<ChunkGateRow>(static_cast<std::size_t>(d.batch * d.heads * d.seq_len));
  return w;
}

// ---- kernel arguments ------------------------------------------------------------------------

inline constexpr int kFusedScanThreads = 128;  // F0
inline constexpr int kFusedStateWarps = 8;     // F1
inline constexpr int kFusedStateThreads = kFusedStateWarps * 32;
inline constexpr int kFusedColumns = 64;       // DV columns per block (F1, F2)
inline constexpr int kFusedMaxHeadDim = 256;
inline constexpr int kFusedMaxChunk = 128;

template <class T>
struct FusedArgs {
  const T *q, *k, *v, *igate, *fgate;
  const float *c_init, *n_init, *m_init;
  T* h;
  float *c_last, *n_last, *m_last;
  float scale, eps;
  int64_t NH, S, DQK, DV, units, chunks;  // chunks: the table's capacity (chunk_bound)
  int L;
  bool segments;
  bool aligned;  // q, k, v 16-byte aligned: cp.async staging (else plain loads)
  int stages;    // F2's pipeline depth (1 or 2: fused_output_stages)
  bool state_whole;  // F1 stages whole chunks, two buffers (fused_state_whole_smem), else 16-row blocks
  ChunkTable table;
  double *m_prev, *m_final;
  float* state;
  ChunkGateRow* local_rows;

  MOXE_HD int64_t row(int64_t unit, int64_t hd, int64_t pos) const {
    return segments ? hd * S + pos : (unit * NH + hd) * S + pos;
  }
};

/// 16 bytes of T from global (n valid elements of 16 / sizeof(T); n <= 0: zeros) to shared:
/// cp.async where the source is 16-byte aligned and the architecture has it (sm_80; the
/// float kernels also run below), plain loads otherwise (the same values).
template <class T>
MOXE_DEVICE MOXE_FORCEINLINE void stage16(T* dst, const T* src, int n, bool aligned) {
  constexpr int kVec = 16 / sizeof(T);
#if MOXE_MMA_SM80
  if (aligned) {
    mma::cp_async_16(dst, src, n > 0 ? 16 : 0);  // n <= 0: nothing read, zeros written
    return;
  }
#else
  (void)aligned;
#endif
  MOXE_PRAGMA_UNROLL
  for (int i = 0; i < kVec; ++i) dst[i] = i < n ? src[i] : T(0.0f);
}

// ---- segments: the chunk table ---------------------------------------------------------------

template <int = 0>
__global__ void fused_table_kernel(ChunkTable t, int64_t units, int64_t capacity, int64_t seq_len, int chunk_size,
                                   const int64_t* offsets) {
  if (blockIdx.x == 0 && threadIdx.x == 0) build_chunk_table(t, units, capacity, seq_len, chunk_size, offsets);
}

// ---- F0: the gate scan -----------------------------------------------------------------------

template <class T>
__global__ void __launch_bounds__(kFusedScanThreads) fused_gate_scan_kernel(const __grid_constant__ FusedArgs<T> p) {
  __shared__ double sG[kFusedScanThreads], sA[kFusedScanThreads];
  const int tid = static_cast<int>(threadIdx.x);
  const int64_t slot = blockIdx.x, u = slot / p.NH, hd = slot % p.NH;
  const int64_t per_unit = ceil_div<int64_t>(p.S, p.L);
  const int64_t first = p.segments ? p.table.unit_first[u] : u * per_unit;
  const int64_t count = p.segments ? p.table.unit_chunks[u] : per_unit;
  if (!p.segments && hd == 0 && tid == 0) {
    p.table.unit_first[u] = first;
    p.table.unit_chunks[u] = count;
  }
  const double m0 = p.m_init ? static_cast<double>(p.m_init[slot]) : 0.0;
  ChunkMap carry = ChunkMap::identity();
  for (int64_t base = 0; base < count; base += kFusedScanThreads) {
    const int64_t i = base + tid;
    ChunkMap map = ChunkMap::identity();
    if (i < count) {
      const int64_t c = first + i;
      int64_t start;
      int32_t len;
      if (p.segments) {
        start = p.table.chunk_start[c];
        len = p.table.chunk_len[c];
      } else {
        start = i * p.L;
        len = static_cast<int32_t>(math::min<int64_t>(p.L, p.S - start));
        if (hd == 0) {
          p.table.chunk_start[c] = start;
          p.table.chunk_len[c] = len;
          p.table.chunk_unit[c] = u;
        }
      }
      ChunkGateRow prev = ChunkGateRow::before(-math::infinity<double>());
      for (int32_t j = 0; j < len; ++j) {
        const int64_t r = p.row(u, hd, start + j);
        const float lf = math::logsigmoid(load_acc<float>(p.fgate[r]));
        prev = chunk_gate_step<float>(prev, j, load_acc<float>(p.igate[r]), lf);
        p.local_rows[r] = prev;
      }
      map = ChunkMap::of_last_row(prev);
    }
    // inclusive scan of the maps in chunk order (compose is associative, not commutative)
    sG[tid] = map.G;
    sA[tid] = map.A;
    __syncthreads();
    for (int off = 1; off < kFusedScanThreads; off <<= 1) {
      ChunkMap m{sG[tid], sA[tid]};
      if (tid >= off) m = ChunkMap::compose(ChunkMap{sG[tid - off], sA[tid - off]}, m);
      __syncthreads();
      sG[tid] = m.G;
      sA[tid] = m.A;
      __syncthreads();
    }
    const ChunkMap excl = tid == 0 ? ChunkMap::identity() : ChunkMap{sG[tid - 1], sA[tid - 1]};
    if (i < count) p.m_prev[(first + i) * p.NH + hd] = ChunkMap::compose(carry, excl).apply(m0);
    carry = ChunkMap::compose(carry, ChunkMap{sG[kFusedScanThreads - 1], sA[kFusedScanThreads - 1]});
    __syncthreads();
  }
  if (tid == 0) p.m_final[slot] = carry.apply(m0);
}

// ---- fragments of computed operands ----------------------------------------------------------

/// The A fragment(s) of an intermediate operand from its values at the lane's fragment
/// positions (x[2 r], x[2 r + 1]: register r, already scaled by their group's power of two):
/// kParts 1 rounds to T (fast), 3 splits (accurate). pack2 of split parts is exact (they are
/// values of T).
template <class T, int kParts>
MOXE_DEVICE MOXE_FORCEINLINE void pack_a_parts(mma::FragmentA (&f)[kParts], const float (&x)[8]) {
  MOXE_PRAGMA_UNROLL
  for (int r = 0; r < 4; ++r) {
    if constexpr (kParts == 1) {
      f[0].r[r] = mma::pack2<T>(x[2 * r], x[2 * r + 1]);
    } else {
      const Split3 s0 = split3<T>(x[2 * r]), s1 = split3<T>(x[2 * r + 1]);
      f[0].r[r] = mma::pack2<T>(s0.hi, s1.hi);
      f[1].r[r] = mma::pack2<T>(s0.mid, s1.mid);
      f[2].r[r] = mma::pack2<T>(s0.lo, s1.lo);
    }
  }
}

template <class T>
inline constexpr bool kFusedMma = mma::is_mma_element_v<T>;

template <class T>
inline constexpr int kFusedPad = 16 / static_cast<int>(sizeof(T));  // 16 bytes per shared row

// ---- F1: the state walk ----------------------------------------------------------------------

/// F1's and B3's staging of a chunk's rows by cp.async (plain loads where not aligned): A, all
/// DQK columns of `a` (K; B3: q), and B, the block's 64 columns of `b` from cb (V; B3: dh), into
/// two shared buffers of `buf_rows` rows each (16-row blocks, or whole chunks), zeros past the
/// chunk's rows and past DV.
template <class T>
struct StateRowStager {
  T *A, *B;  // [2][buf_rows][lda], [2][buf_rows][ldb]
  const T *a, *b;
  int lda, ldb, buf_rows, cb, tid;
  bool aligned;

  /// rows [r0, r0 + n) of the chunk at `start` of `len` rows into rows [0, n) of buffer buf:
  /// one commit group
  MOXE_DEVICE MOXE_FORCEINLINE void rows(const FusedArgs<T>& p, int64_t u, int64_t hd, int64_t start, int len, int r0,
                                         int n, int buf) const {
    constexpr int kVec = 16 / sizeof(T);
    const int achunks = static_cast<int>(p.DQK) / kVec, bchunks = kFusedColumns / kVec;
    for (int idx = tid; idx < n * (achunks + bchunks); idx += kFusedStateThreads) {
      const int r = idx / (achunks + bchunks), x = idx % (achunks + bchunks);
      const int s = r0 + r;
      const bool in = s < len;
      const int64_t gr = in ? p.row(u, hd, start + s) : 0;
      if (x < achunks) {
        stage16(A + (buf * buf_rows + r) * lda + x * kVec, a + gr * p.DQK + x * kVec, in ? kVec : 0, aligned);
      } else {
        const int col = (x - achunks) * kVec;
        stage16(B + (buf * buf_rows + r) * ldb + col, b + gr * p.DV + cb + col, (in && cb + col < p.DV) ? kVec : 0,
                aligned);
      }
    }
    mma::cp_async_commit();
  }
  /// whole chunks: chunk cc (its rows rounded up to 16) into buffer buf
  MOXE_DEVICE MOXE_FORCEINLINE void chunk(const FusedArgs<T>& p, int64_t u, int64_t hd, int64_t cc, int buf) const {
    const int len = p.table.chunk_len[cc];
    rows(p, u, hd, p.table.chunk_start[cc], len, 0, (len + 15) / 16 * 16, buf);
  }
};

/// Dynamic shared memory of F1 (and B3) in blocks: K and V blocks of 16 rows, double-buffered.
template <class T>
inline std::size_t fused_state_smem(int64_t dqk) {
  return sizeof(T) * 2 * 16 * static_cast<std::size_t>((dqk + kFusedPad<T>) + (kFusedColumns + kFusedPad<T>));
}

/// Dynamic shared memory of F1 (and B3) in whole chunks: K and V (q and dh) of two chunks (the
/// next one's copies in flight during this one's products).
template <class T>
inline std::size_t fused_state_whole_smem(int64_t dqk, int chunk) {
  return sizeof(T) * 2 * static_cast<std::size_t>(chunk) *
         static_cast<std::size_t>((dqk + kFusedPad<T>) + (kFusedColumns + kFusedPad<T>));
}

/// F1's or B3's dynamic shared memory in the staging chosen (whole chunks or 16-row blocks).
template <class T>
inline std::size_t fused_state_staging_smem(int64_t dqk, int chunk, bool whole) {
  return whole ? fused_state_whole_smem<T>(dqk, chunk) : fused_state_smem<T>(dqk);
}

template <class T, int kRT, int kParts>
__global__ void __launch_bounds__(kFusedStateThreads, 1) fused_state_kernel(const __grid_constant__ FusedArgs<T> p) {
  extern __shared__ __align__(16) unsigned char fused_smem[];
  __shared__ float sE[kFusedMaxChunk];
  __shared__ int sExp[kFusedMaxHeadDim];
  constexpr int kNT = kFusedColumns / 8;
  const int DQK = static_cast<int>(p.DQK), DV = static_cast<int>(p.DV);
  const int ldk = DQK + kFusedPad<T>, ldv = kFusedColumns + kFusedPad<T>;
  // blocks: [2][16][ldk] and [2][16][ldv]; whole chunks: [2][L][ldk] and [2][L][ldv]
  const int buf_rows = p.state_whole ? p.L : 16;
  T* Ks = reinterpret_cast<T*>(fused_smem);
  T* Vs = Ks + 2 * buf_rows * ldk;
  const int tid = static_cast<int>(threadIdx.x), lane = tid % 32, warp = tid / 32;
  // block x = slot * column blocks + column block: a slot's column blocks run together (K
  // is read from DRAM once, by the first of them, and from L2 by the others)
  const int64_t col_blocks = ceil_div<int64_t>(p.DV, kFusedColumns);
  const int64_t slot = blockIdx.x / col_blocks, u = slot / p.NH, hd = slot % p.NH;
  const int cby = static_cast<int>(blockIdx.x % col_blocks), cb = cby * kFusedColumns;
  const int64_t W = p.DV + 1, first = p.table.unit_first[u], count = p.table.unit_chunks[u];
  const StateRowStager<T> stage{Ks, Vs, p.k, p.v, ldk, ldv, buf_rows, cb, tid, p.aligned};
  // whole chunks: the first chunk's copies before the walk, chunk c + 1's during chunk c
  if (p.state_whole && count > 0) stage.chunk(p, u, hd, first, 0);

  mma::FragmentC st[kRT][kNT], acc[kRT][kNT];
  auto active_rt = [&](int i) { return (warp + kFusedStateWarps * i) * 16 < DQK; };
  auto active_nt = [&](int nt) { return cb + nt * 8 < DV; };
  // the state: from c_init or 0
  MOXE_PRAGMA_UNROLL
  for (int i = 0; i < kRT; ++i)
    MOXE_PRAGMA_UNROLL
    for (int nt = 0; nt < kNT; ++nt)
      MOXE_PRAGMA_UNROLL
      for (int e = 0; e < 4; ++e) {
        const int a = (warp + kFusedStateWarps * i) * 16 + mma::fragment_c_row(lane, e);
        const int col = cb + nt * 8 + mma::fragment_c_col(lane, e);
        st[i][nt].c[e] = (p.c_init && active_rt(i) && col < DV) ? p.c_init[(slot * p.DQK + a) * p.DV + col] : 0.0f;
      }
  const bool n_owner = cby == 0 && tid < DQK;
  float n_reg = (n_owner && p.n_init) ? p.n_init[slot * p.DQK + tid] : 0.0f;

  for (int64_t c = first; c < first + count; ++c) {
    const int64_t start = p.table.chunk_start[c];
    const int len = p.table.chunk_len[c];
    const int cbuf = static_cast<int>((c - first) % 2);  // whole chunks: this chunk's buffer
    // whole chunks: the next chunk's copies into the other buffer (its last reader, chunk
    // c - 1, ended with a barrier)
    if (p.state_whole && c + 1 < first + count) stage.chunk(p, u, hd, c + 1, 1 - cbuf);
    const double mp = p.m_prev[c * p.NH + hd];
    const double mn = c + 1 < first + count ? p.m_prev[(c + 1) * p.NH + hd] : p.m_final[slot];
    float* ck = p.state + (c * p.NH + hd) * p.DQK * W;
    // the checkpoint C'_c (before the chunk)
    MOXE_PRAGMA_UNROLL
    for (int i = 0; i < kRT; ++i)
      MOXE_PRAGMA_UNROLL
      for (int nt = 0; nt < kNT; ++nt)
        MOXE_PRAGMA_UNROLL
        for (int e = 0; e < 4; ++e) {
          const int a = (warp + kFusedStateWarps * i) * 16 + mma::fragment_c_row(lane, e);
          const int col = cb + nt * 8 + mma::fragment_c_col(lane, e);
          if (active_rt(i) && col < DV) ck[a * W + col] = st[i][nt].c[e];
        }
    if (n_owner) ck[tid * W + p.DV] = n_reg;

    auto row_of = [&](int s) { return p.row(u, hd, start + s); };
    const ChunkGateRow last = gate_row_from_local(p.local_rows[row_of(len - 1)], mp);
    const float wL = state_decay_weight<float>(mp, last, mn);
    for (int s = tid; s < kFusedMaxChunk; s += kFusedStateThreads)
      sE[s] = s < len ? state_source_weight<float>(p.local_rows[row_of(s)].x, s, last, mn) : 0.0f;
    if (p.state_whole) {  // this chunk's copies landed (the next chunk's may still fly)
      if (c + 1 < first + count)
        mma::cp_async_wait<1>();
      else
        mma::cp_async_wait<0>();
    }
    __syncthreads();
    // half: per DQK row, the power of two of E_s k_s[a] over the whole chunk (before the
    // products: a pass over the chunk's K, staged when whole, else from global; bf16 and float
    // need none)
    if (tid < DQK) {
      float max_abs = 0.0f;
      if constexpr (OperandFormat<T>::kNarrowRange) {
        if (p.state_whole) {
          const T* kc = Ks + cbuf * buf_rows * ldk + tid;
#pragma unroll 8
          for (int s = 0; s < len; ++s)
            max_abs = math::max(max_abs, math::abs(sE[s] * static_cast<float>(kc[s * ldk])));
        } else {
#pragma unroll 8
          for (int s = 0; s < len; ++s)
            max_abs = math::max(max_abs, math::abs(sE[s] * load_acc<float>(p.k[row_of(s) * p.DQK + tid])));
        }
      }
      sExp[tid] = kFusedMma<T> ? operand_exponent<T>(max_abs) : 0;
    }
    float nsum = 0.0f;  // n's update: sum_s E_s k_s[a] in fp32, s in order (from the staged K)
    MOXE_PRAGMA_UNROLL
    for (int i = 0; i < kRT; ++i)
      MOXE_PRAGMA_UNROLL
      for (int nt = 0; nt < kNT; ++nt) acc[i][nt] = mma::FragmentC{};

    const int blocks = (len + 15) / 16;
    __syncthreads();  // sExp
    if (!p.state_whole && blocks > 0) stage.rows(p, u, hd, start, len, 0, 16, 0);
    for (int b = 0; b < blocks; ++b) {
      // blocks: block b + 1's copies fly during block b's products; whole chunks: all landed
      const int buf = p.state_whole ? cbuf : b % 2, row0 = p.state_whole ? b * 16 : 0;
      if (!p.state_whole) {
        if (b + 1 < blocks) {
          stage.rows(p, u, hd, start, len, (b + 1) * 16, 16, (b + 1) % 2);
          mma::cp_async_wait<1>();
        } else {
          mma::cp_async_wait<0>();
        }
        __syncthreads();
      }
      const T* kb = Ks + (buf * buf_rows + row0) * ldk;
      const T* vb = Vs + (buf * buf_rows + row0) * ldv;
      const float* eb = sE + b * 16;
      if (n_owner) {  // rows past len: E_s = 0 and K zero-filled, exact zeros added
        for (int s = 0; s < 16; ++s) nsum += eb[s] * static_cast<float>(kb[s * ldk + tid]);
      }
      MOXE_PRAGMA_UNROLL
      for (int i = 0; i < kRT; ++i) {
        if (!active_rt(i)) continue;
        const int a0 = (warp + kFusedStateWarps * i) * 16;
        if constexpr (kFusedMma<T>) {
          float x[8];
          MOXE_PRAGMA_UNROLL
          for (int r = 0; r < 4; ++r) {
            const int ar = a0 + mma::fragment_a_row(lane, 2 * r), s = mma::fragment_a_col(lane, 2 * r);
            const float up = exp2_int(sExp[ar]);
            x[2 * r] = eb[s] * static_cast<float>(kb[s * ldk + ar]) * up;
            x[2 * r + 1] = eb[s + 1] * static_cast<float>(kb[(s + 1) * ldk + ar]) * up;
          }
          mma::FragmentA fa[kParts];
          pack_a_parts<T, kParts>(fa, x);
          MOXE_PRAGMA_UNROLL
          for (int nt = 0; nt < kNT; ++nt) {
            if (!active_nt(nt)) continue;
            const mma::FragmentB fb = mma::load_b(vb, ldv, 0, nt * 8, lane, /*k_major=*/true);
            MOXE_PRAGMA_UNROLL
            for (int pt = 0; pt < kParts; ++pt) mma::mma_16816<T>(acc[i][nt], fa[pt], fb);
          }
        } else {
          const int r0 = a0 + mma::fragment_c_row(lane, 0), r1 = a0 + mma::fragment_c_row(lane, 2);
          for (int s = 0; s < 16; ++s) {
            const float x0 = eb[s] * kb[s * ldk + r0], x1 = eb[s] * kb[s * ldk + r1];
            MOXE_PRAGMA_UNROLL
            for (int nt = 0; nt < kNT; ++nt) {
              const int col = nt * 8 + mma::fragment_c_col(lane, 0);
              const float v0 = vb[s * ldv + col], v1 = vb[s * ldv + col + 1];
              acc[i][nt].c[0] += x0 * v0;
              acc[i][nt].c[1] += x0 * v1;
              acc[i][nt].c[2] += x1 * v0;
              acc[i][nt].c[3] += x1 * v1;
            }
          }
        }
      }
      if (!p.state_whole) __syncthreads();  // the buffer is staged again two blocks on
    }
    // C <- w_L C + (the product, scaled back by its row's power of two)
    MOXE_PRAGMA_UNROLL
    for (int i = 0; i < kRT; ++i)
      MOXE_PRAGMA_UNROLL
      for (int nt = 0; nt < kNT; ++nt)
        MOXE_PRAGMA_UNROLL
        for (int e = 0; e < 4; ++e) {
          const int a = (warp + kFusedStateWarps * i) * 16 + mma::fragment_c_row(lane, e);
          const float down = active_rt(i) ? exp2_int(-sExp[a]) : 1.0f;
          st[i][nt].c[e] = wL * st[i][nt].c[e] + acc[i][nt].c[e] * down;
        }
    if (n_owner) n_reg = wL * n_reg + nsum;
    __syncthreads();  // sE, sExp
  }
  if (p.c_last) {
    MOXE_PRAGMA_UNROLL
    for (int i = 0; i < kRT; ++i)
      MOXE_PRAGMA_UNROLL
      for (int nt = 0; nt < kNT; ++nt)
        MOXE_PRAGMA_UNROLL
        for (int e = 0; e < 4; ++e) {
          const int a = (warp + kFusedStateWarps * i) * 16 + mma::fragment_c_row(lane, e);
          const int col = cb + nt * 8 + mma::fragment_c_col(lane, e);
          if (active_rt(i) && col < DV) p.c_last[(slot * p.DQK + a) * p.DV + col] = st[i][nt].c[e];
        }
    if (n_owner) p.n_last[slot * p.DQK + tid] = n_reg;
    if (cby == 0 && tid == 0) p.m_last[slot] = static_cast<float>(p.m_final[slot]);
  }
}

// ---- F2: the outputs -------------------------------------------------------------------------

/// Columns of a staged checkpoint slice (F2's column block of C_c; B2 / B4's 64 x 64 slices)
/// and DQK / DV columns per staged input slice of B2 and B4.
inline constexpr int kFusedBwdSlice = 64;

/// The rounds of F2's, B2's and B4's loops over staged slices: issue(r, buf) starts round r's
/// copies (cp.async) into buffer buf, use(r, buf) runs once every thread's copies of round r
/// have landed. stages 2: round r + 1's copies are in flight during round r's use (buffers 0
/// and 1 in turn); stages 1: one buffer, each round waits for its own copies. Each round ends
/// with a barrier, so a buffer is written again only after every warp's use of it; no group
/// is left in flight at the end. `rounds` and `stages` are uniform over the block.
template <class Issue, class Use>
MOXE_DEVICE MOXE_FORCEINLINE void staged_rounds(int rounds, int stages, Issue&& issue, Use&& use) {
  if (rounds <= 0) return;
  issue(0, 0);
  mma::cp_async_commit();
  for (int r = 0; r < rounds; ++r) {
    const int buf = stages == 2 ? (r & 1) : 0;
    if (stages == 2 && r + 1 < rounds) {
      issue(r + 1, buf ^ 1);
      mma::cp_async_commit();
      mma::cp_async_wait<1>();  // round r's group (all but the newest)
    } else {
      mma::cp_async_wait<0>();
    }
    __syncthreads();
    use(r, buf);
    __syncthreads();  // the buffer (and the converted slice) may be written again
    if (stages != 2 && r + 1 < rounds) {  // (any other value runs as one stage)
      issue(r + 1, 0);
      mma::cp_async_commit();
    }
  }
}

/// The kRows x 64 slice [a0.., e0..] of a checkpoint, read at src (its element (a0, e0); rows
/// `pitch` floats apart: the checkpoint in global memory, or its raw copy in shared memory),
/// into dst (row pitch ld) in kParts T parts (parts kRows rows apart), scaled by its row's or
/// its column's power of two (exp_row / exp_col indexed by the checkpoint's row / column);
/// zeros past DQK, DV (nothing read there).
template <class T, int kParts, int kRows = kFusedBwdSlice>
MOXE_DEVICE void convert_checkpoint_slice(T* dst, int ld, const float* src, int64_t pitch, int DQK, int DV, int a0,
                                          int e0, bool by_row, const int* exp_row, const int* exp_col, int tid,
                                          int threads) {
  constexpr int kSl = kFusedBwdSlice;
  for (int idx = tid; idx < kRows * kSl; idx += threads) {
    const int a = idx / kSl, e = idx % kSl;
    float x = 0.0f;
    if (a0 + a < DQK && e0 + e < DV) x = src[a * pitch + e] * exp2_int(by_row ? exp_row[a0 + a] : exp_col[e0 + e]);
    if constexpr (kParts == 1) {
      dst[a * ld + e] = T(x);
    } else {
      const Split3 sp = split3<T>(x);
      dst[a * ld + e] = T(sp.hi);
      dst[(kRows + a) * ld + e] = T(sp.mid);
      dst[(2 * kRows + a) * ld + e] = T(sp.lo);
    }
  }
}

/// The checkpoint slices of F2 and B2 (C'_c) and B4 (dC'_{c+1}) in staged rounds (kRows x
/// 64 each): with two stages issue copies the raw fp32 slice into raw[buf] (cp.async, 4 bytes
/// an element: the checkpoint's rows are DV + 1 floats apart, not 16-byte aligned; sm_80) and
/// use converts it into dst; with one, issue converts it from global memory (dst is free by
/// then) and use does nothing. Either way dst holds the slice's T parts for the round's MMAs
/// after use.
template <class T, int kParts, int kRows = kFusedBwdSlice>
struct CheckpointSlices {
  T* dst;        // [kParts][kRows][ld]
  float* raw;    // [2][kRows][64] (stages 2)
  const float* m;  // the checkpoint, [DQK][W]
  int64_t W;
  int ld, DQK, DV, stages, tid, threads;
  const int *exp_row, *exp_col;

  MOXE_DEVICE void issue(int buf, int a0, int e0, bool by_row) const { issue_into(dst, ld, buf, a0, e0, by_row); }
  /// (use and use_into: a barrier inside with two stages, call them from every thread)
  MOXE_DEVICE void use(int buf, int a0, int e0, bool by_row) const { use_into(dst, ld, buf, a0, e0, by_row); }

  /// issue / use with the parts written at d (row pitch dld; parts kRows rows apart) instead
  /// of dst: B2's whole converted checkpoint (fused_rows_mma_kernel, kept)
  MOXE_DEVICE void issue_into(T* d, int dld, int buf, int a0, int e0, bool by_row) const {
    constexpr int kSl = kFusedBwdSlice;
    if (stages == 2) {
      float* r = raw + buf * kRows * kSl;
      for (int idx = tid; idx < kRows * kSl; idx += threads) {
        const int a = idx / kSl, e = idx % kSl;
        const bool in = a0 + a < DQK && e0 + e < DV;
        mma::cp_async_4(r + idx, in ? m + (a0 + a) * W + e0 + e : m, in ? 4 : 0);
      }
    } else {
      convert_checkpoint_slice<T, kParts, kRows>(d, dld, m + a0 * W + e0, W, DQK, DV, a0, e0, by_row, exp_row,
                                                 exp_col, tid, threads);
    }
  }
  MOXE_DEVICE void use_into(T* d, int dld, int buf, int a0, int e0, bool by_row) const {
    constexpr int kSl = kFusedBwdSlice;
    if (stages != 2) return;
    convert_checkpoint_slice<T, kParts, kRows>(d, dld, raw + buf * kRows * kSl, kSl, DQK, DV, a0, e0, by_row, exp_row,
                                               exp_col, tid, threads);
    __syncthreads();
  }
};


/// DQK columns per staged slice of Q, K and C (F2).
template <class T>
inline constexpr int kFusedSlice = kFusedMma<T> ? 64 : 32;

/// F2's dynamic shared memory: `stages` (1 or 2; 2 for bf16 / half only) pairs of Q, K slices
/// ([L][kFusedSlice]), V's column block, C_c's slice in kParts T parts and, with two stages,
/// two raw fp32 slices of it; float: the FMA path's P tiles.
template <class T, int kParts>
inline std::size_t fused_output_smem(int chunk_size, int stages) {
  constexpr int ld = kFusedSlice<T> + kFusedPad<T>, ldc = kFusedColumns + kFusedPad<T>;
  const std::size_t L = static_cast<std::size_t>(chunk_size);
  std::size_t bytes =
      sizeof(T) * (2 * std::size_t(stages) * L * ld + L * ldc + std::size_t(kParts) * kFusedSlice<T> * ldc);
  if (!kFusedMma<T>) bytes += sizeof(float) * (L / 16) * 16 * 17;  // P tiles of the FMA path
  if (stages == 2) bytes += 2 * sizeof(float) * kFusedSlice<T> * kFusedColumns;
  return bytes;
}

template <class T, int kParts>
__global__ void __launch_bounds__(kFusedMaxChunk * 2) fused_output_kernel(const __grid_constant__ FusedArgs<T> p) {
  extern __shared__ __align__(16) unsigned char fused_smem[];
  __shared__ double sX[kFusedMaxChunk], sA[kFusedMaxChunk], sM[kFusedMaxChunk];
  __shared__ int sReset[kFusedMaxChunk];
  __shared__ float sW[kFusedMaxChunk], sNq[kFusedMaxChunk], sN[2][kFusedSlice<T>];
  __shared__ int sExpC[kFusedMaxHeadDim];  // by column of C_c (this block's cb.. cb + 63)
  constexpr int kNT = kFusedColumns / 8, kST = kFusedMaxChunk / 8, kAS = kFusedSlice<T>;
  static_assert(kFusedColumns == kFusedBwdSlice, "F2's column block is CheckpointSlices' 64 columns");
  constexpr int ld = kAS + kFusedPad<T>, ldc = kFusedColumns + kFusedPad<T>;
  // block x = (chunk * NH + head) * column blocks + column block: the column blocks of a
  // chunk run together (Q, K and the checkpoint's n column from L2 after the first)
  const int64_t col_blocks = ceil_div<int64_t>(p.DV, kFusedColumns);
  const int64_t kh = blockIdx.x / col_blocks, c = kh / p.NH, hd = kh % p.NH;
  const int len = p.table.chunk_len[c];
  if (len == 0) return;  // uniform: past the chunks in use
  const int L = p.L, DQK = static_cast<int>(p.DQK), DV = static_cast<int>(p.DV);
  // Q's and K's slices [stages][L][ld] each, buffer buf at qs(buf), ks(buf) (stages 1: buf 0)
  const int stages = p.stages;
  T* const Q0 = reinterpret_cast<T*>(fused_smem);
  T* const K0 = Q0 + stages * L * ld;
  auto qs = [&](int buf) { return Q0 + buf * L * ld; };
  auto ks = [&](int buf) { return K0 + buf * L * ld; };
  T* Vs = K0 + stages * L * ld;                                    // [L][ldc]
  T* Cs = Vs + L * ldc;                                            // [kParts][kAS][ldc]
  float* Pw = reinterpret_cast<float*>(Cs + kParts * kAS * ldc);  // FMA path: [warps][16][17]
  float* raw = Pw;  // two stages (bf16 / half, no FMA path): [2][kAS][kFusedColumns]
  const int tid = static_cast<int>(threadIdx.x), lane = tid % 32, warp = tid / 32;
  const int threads = static_cast<int>(blockDim.x);
  const int cb = static_cast<int>(blockIdx.x % col_blocks) * kFusedColumns;
  const int64_t u = p.table.chunk_unit[c], start = p.table.chunk_start[c], W = p.DV + 1;
  const double mp = p.m_prev[kh];
  const float* ck = p.state + kh * p.DQK * W;
  auto row_of = [&](int s) { return p.row(u, hd, start + s); };
  constexpr int kVec = 16 / sizeof(T);

  // V of the chunk's rows (columns cb..cb+63), by cp.async while the rows' scalars are formed
  for (int idx = tid; idx < L * (kFusedColumns / kVec); idx += threads) {
    const int s = idx / (kFusedColumns / kVec), col = (idx % (kFusedColumns / kVec)) * kVec;
    const bool in = s < len && cb + col < DV;
    stage16(Vs + s * ldc + col, p.v + (s < len ? row_of(s) : 0) * p.DV + cb + col, in ? kVec : 0, p.aligned);
  }
  mma::cp_async_commit();
  // the rows' gate quantities from m_prev; n_c . q_j in fp32
  for (int j = tid; j < L; j += threads) {
    if (j < len) {
      const ChunkGateRow row = gate_row_from_local(p.local_rows[row_of(j)], mp);
      sX[j] = row.x;
      sA[j] = row.a;
      sM[j] = row.m();
      sReset[j] = row.reset;
      sW[j] = decay_weight<float>(mp, row);
    } else {
      sX[j] = -math::infinity<double>();
      sA[j] = 0.0;
      sM[j] = 0.0;
      sReset[j] = -1;
      sW[j] = 0.0f;
    }
  }
  // half: one power of two per column of C_c (over all DQK rows), as the host twin's groups
  for (int e = tid; e < kFusedColumns; e += threads) {
    float max_abs = 0.0f;
    if constexpr (OperandFormat<T>::kNarrowRange) {
      if (cb + e < DV)
#pragma unroll 8
        for (int a = 0; a < DQK; ++a) max_abs = math::max(max_abs, math::abs(ck[a * W + cb + e]));
    }
    sExpC[cb + e] = kFusedMma<T> ? operand_exponent<T>(max_abs) : 0;
  }
  __syncthreads();

  const int j0 = warp * 16;
  const bool warp_rows = j0 < len;
  mma::FragmentC sacc[kST], iacc[kNT];
  float nq = 0.0f;  // thread j < L: n_c . q_j in fp32, a in order (from the staged Q)
  auto active_nt = [&](int nt) { return cb + nt * 8 < DV; };
  auto active_st = [&](int nt) { return nt * 8 < j0 + 16 && nt * 8 < len; };  // causal, inside the chunk

  // C_c[a0.., cb..] as the intermediate operand of inter (scaled per column, parts), with Q
  // and K's slices a0.. in staged rounds (cps: from its raw copy with two stages)
  const CheckpointSlices<T, kParts, kAS> cps{Cs, raw, ck, W, ldc, DQK, DV, stages, tid, threads, sExpC, sExpC};
  staged_rounds(
      (DQK + kAS - 1) / kAS, stages,
      [&](int r, int buf) {
        const int a0 = r * kAS, width = math::min(kAS, DQK - a0);  // a multiple of 16
        for (int idx = tid; idx < 2 * L * (kAS / kVec); idx += threads) {
          const int which = idx / (L * (kAS / kVec)), rem = idx % (L * (kAS / kVec));
          const int s = rem / (kAS / kVec), col = (rem % (kAS / kVec)) * kVec;
          const bool in = s < len && col < width;
          const T* src = (which == 0 ? p.q : p.k) + (s < len ? row_of(s) : 0) * p.DQK + a0 + col;
          stage16((which == 0 ? qs(buf) : ks(buf)) + s * ld + col, src, in ? kVec : 0, p.aligned);
        }
        cps.issue(buf, a0, cb, /*by_row=*/false);
        for (int a = tid; a < kAS; a += threads) sN[buf][a] = a < width ? ck[(a0 + a) * W + p.DV] : 0.0f;
      },
      [&](int r, int buf) {
        const int a0 = r * kAS, width = math::min(kAS, DQK - a0);
        cps.use(buf, a0, cb, /*by_row=*/false);
        const T* Qs = qs(buf);
        const T* Ks = ks(buf);
        if (tid < L)
          for (int a = 0; a < width; ++a) nq += sN[buf][a] * static_cast<float>(Qs[tid * ld + a]);
        if (warp_rows) {
          for (int kk = 0; kk < width; kk += 16) {
            if constexpr (kFusedMma<T>) {
              const mma::FragmentA qa = mma::load_a(Qs, ld, j0, kk, lane);
              MOXE_PRAGMA_UNROLL
              for (int nt = 0; nt < kST; ++nt) {
                if (!active_st(nt)) continue;
                const mma::FragmentB kb = mma::load_b(Ks, ld, kk, nt * 8, lane, /*k_major=*/false);
                mma::mma_16816<T>(sacc[nt], qa, kb);
              }
              MOXE_PRAGMA_UNROLL
              for (int nt = 0; nt < kNT; ++nt) {
                if (!active_nt(nt)) continue;
                MOXE_PRAGMA_UNROLL
                for (int pt = 0; pt < kParts; ++pt) {
                  const mma::FragmentB cf = mma::load_b(Cs + pt * kAS * ldc, ldc, kk, nt * 8, lane, /*k_major=*/true);
                  mma::mma_16816<T>(iacc[nt], qa, cf);
                }
              }
            } else {
              const int r0 = j0 + mma::fragment_c_row(lane, 0), r1 = j0 + mma::fragment_c_row(lane, 2);
              const int cq = mma::fragment_c_col(lane, 0);
              for (int a = kk; a < kk + 16; ++a) {
                const float q0 = Qs[r0 * ld + a], q1 = Qs[r1 * ld + a];
                MOXE_PRAGMA_UNROLL
                for (int nt = 0; nt < kST; ++nt) {
                  if (!active_st(nt)) continue;
                  const float k0 = Ks[(nt * 8 + cq) * ld + a], k1 = Ks[(nt * 8 + cq + 1) * ld + a];
                  sacc[nt].c[0] += q0 * k0;
                  sacc[nt].c[1] += q0 * k1;
                  sacc[nt].c[2] += q1 * k0;
                  sacc[nt].c[3] += q1 * k1;
                }
                MOXE_PRAGMA_UNROLL
                for (int nt = 0; nt < kNT; ++nt) {
                  const float c0 = Cs[a * ldc + nt * 8 + cq], c1 = Cs[a * ldc + nt * 8 + cq + 1];
                  iacc[nt].c[0] += q0 * c0;
                  iacc[nt].c[1] += q0 * c1;
                  iacc[nt].c[2] += q1 * c0;
                  iacc[nt].c[3] += q1 * c1;
                }
              }
            }
          }
        }
      });
  if (tid < L) sNq[tid] = nq;
  __syncthreads();
  if (!warp_rows) return;  // no barrier follows

  // P = (scale S) o D in registers; its row sums (fp32) and, for half, each row's exponent
  const int g0 = mma::fragment_c_row(lane, 0), g1 = mma::fragment_c_row(lane, 2);
  const int jr[2] = {j0 + g0, j0 + g1};
  ChunkGateRow rowj[2];
  MOXE_PRAGMA_UNROLL
  for (int h2 = 0; h2 < 2; ++h2) {
    rowj[h2] = ChunkGateRow{0.0, 0.0, sA[jr[h2]], 0, sReset[jr[h2]]};
  }
  float psum[2] = {0.0f, 0.0f}, pmax[2] = {0.0f, 0.0f};
  MOXE_PRAGMA_UNROLL
  for (int nt = 0; nt < kST; ++nt) {
    MOXE_PRAGMA_UNROLL
    for (int e = 0; e < 4; ++e) {
      const int h2 = e / 2, j = jr[h2], s = nt * 8 + mma::fragment_c_col(lane, e);
      float P = 0.0f;
      if (active_st(nt) && s <= j && j < len)
        P = (p.scale * sacc[nt].c[e]) * source_weight<float>(sX[s], s, rowj[h2]);
      sacc[nt].c[e] = P;
      psum[h2] += P;
      pmax[h2] = math::max(pmax[h2], math::abs(P));
    }
  }
  int pexp[2];
  MOXE_PRAGMA_UNROLL
  for (int h2 = 0; h2 < 2; ++h2) {
    for (int off = 1; off < 4; off <<= 1) {
      psum[h2] += __shfl_xor_sync(0xffffffffu, psum[h2], off);
      pmax[h2] = math::max(pmax[h2], __shfl_xor_sync(0xffffffffu, pmax[h2], off));
    }
    pexp[h2] = kFusedMma<T> ? operand_exponent<T>(pmax[h2]) : 0;
  }

  // P V' (V' = [V | 1]: the 1 column is psum above)
  mma::FragmentC pacc[kNT];
  const int ksteps = math::min(warp + 1, (len + 15) / 16);
  MOXE_PRAGMA_UNROLL
  for (int nt = 0; nt < kNT; ++nt) pacc[nt] = mma::FragmentC{};
  MOXE_PRAGMA_UNROLL
  for (int ks = 0; ks < kST / 2; ++ks) {
    if (ks >= ksteps) break;
    if constexpr (kFusedMma<T>) {
      // register r of the A fragment of k-step ks: accumulators (r % 2) * 2, +1 (row g or
      // g + 8) of S tile 2 ks + r / 2
      float x[8];
      MOXE_PRAGMA_UNROLL
      for (int r = 0; r < 4; ++r) {
        const float up = exp2_int(pexp[r % 2]);
        x[2 * r] = sacc[2 * ks + r / 2].c[(r % 2) * 2] * up;
        x[2 * r + 1] = sacc[2 * ks + r / 2].c[(r % 2) * 2 + 1] * up;
      }
      mma::FragmentA fa[kParts];
      pack_a_parts<T, kParts>(fa, x);
      MOXE_PRAGMA_UNROLL
      for (int nt = 0; nt < kNT; ++nt) {
        if (!active_nt(nt)) continue;
        const mma::FragmentB vb = mma::load_b(Vs, ldc, ks * 16, nt * 8, lane, /*k_major=*/true);
        MOXE_PRAGMA_UNROLL
        for (int pt = 0; pt < kParts; ++pt) mma::mma_16816<T>(pacc[nt], fa[pt], vb);
      }
    } else {
      float* pw = Pw + warp * 16 * 17;
      MOXE_PRAGMA_UNROLL
      for (int t = 0; t < 2; ++t)
        MOXE_PRAGMA_UNROLL
        for (int e = 0; e < 4; ++e)
          pw[mma::fragment_c_row(lane, e) * 17 + t * 8 + mma::fragment_c_col(lane, e)] = sacc[2 * ks + t].c[e];
      __syncwarp();
      const int cq = mma::fragment_c_col(lane, 0);
      MOXE_PRAGMA_UNROLL
      for (int nt = 0; nt < kNT; ++nt) {
        for (int s = 0; s < 16; ++s) {
          const float p0 = pw[g0 * 17 + s], p1 = pw[g1 * 17 + s];
          const float v0 = Vs[(ks * 16 + s) * ldc + nt * 8 + cq], v1 = Vs[(ks * 16 + s) * ldc + nt * 8 + cq + 1];
          pacc[nt].c[0] += p0 * v0;
          pacc[nt].c[1] += p0 * v1;
          pacc[nt].c[2] += p1 * v0;
          pacc[nt].c[3] += p1 * v1;
        }
      }
      __syncwarp();
    }
  }

  // the epilogue: inter, num, the normaliser, h
  Normaliser<float> nz[2];
  float dn[2], ws[2];
  MOXE_PRAGMA_UNROLL
  for (int h2 = 0; h2 < 2; ++h2) {
    const int j = jr[h2];
    ws[h2] = sW[j] * p.scale;
    const float dot = ws[h2] * sNq[j] + psum[h2];
    nz[h2] = normaliser(dot, static_cast<float>(sM[j]), p.eps);
    dn[h2] = exp2_int(-pexp[h2]);
  }
  MOXE_PRAGMA_UNROLL
  for (int nt = 0; nt < kNT; ++nt) {
    if (!active_nt(nt)) continue;
    MOXE_PRAGMA_UNROLL
    for (int e = 0; e < 4; ++e) {
      const int h2 = e / 2, j = jr[h2], col = nt * 8 + mma::fragment_c_col(lane, e);
      if (j >= len || cb + col >= DV) continue;
      const float inter = ws[h2] * (iacc[nt].c[e] * exp2_int(-sExpC[cb + col]));
      const float num = inter + pacc[nt].c[e] * dn[h2];
      p.h[row_of(j) * p.DV + cb + col] = store_elem<T>(num * nz[h2].inv_den);
    }
  }
}

// ---- the launcher ----------------------------------------------------------------------------

/// Bytes of one batch pass's FusedForwardWorkspace: the forward's workspace, or one pass's
/// share of a forward tape.
template <class T>
std::size_t fused_forward_pass_bytes(const ForwardParams<T, float>& p) {
  WorkspaceCarver c;
  carve_fused_forward_workspace(c, pass_dims(p), p.num_segments, p.chunk_size);
  return c.required_bytes();
}

/// The forward's workspace: none where it writes a tape (the tape holds what it carves).
template <class T>
std::size_t fused_chunkwise_forward_workspace_size(const ForwardParams<T, float>& p) {
  return p.tape != nullptr ? 0 : fused_forward_pass_bytes(p);
}

/// The forward tape (ForwardParams::tape): every batch pass's FusedForwardWorkspace (gate
/// scan, chunk table, checkpoints, per-row gate quantities), fused_forward_pass_bytes apart
/// (the last pass, which may hold fewer entries, sized by its own), so that a backward run in
/// the same passes finds each pass's share where the forward wrote it. Sizes validate()
/// rejects: 0.
template <class T>
std::size_t fused_tape_size(const ForwardParams<T, float>& p) {
  const std::size_t pass = fused_forward_pass_bytes(p);
  if (pass == 0) return 0;
  const int64_t per_pass = pass_batch(p), full = (p.dims.batch - 1) / per_pass;  // passes before the last
  WorkspaceCarver last;
  Dims d = p.dims;
  d.batch -= full * per_pass;
  carve_fused_forward_workspace(last, d, p.num_segments, p.chunk_size);
  return pass * static_cast<std::size_t>(full) + last.required_bytes();
}

/// The share of the tape of `whole` (the call's params) for the batch pass starting at entry
/// b0 (`pass`: batch_slice(whole, b0, ...)), carved; *fits false where the tape is short.
template <class T>
FusedForwardWorkspace carve_tape_pass(const ForwardParams<T, float>& whole, const ForwardParams<T, float>& pass,
                                      int64_t b0, bool* fits) {
  const std::size_t offset = static_cast<std::size_t>(b0 / pass_batch(whole)) * fused_forward_pass_bytes(whole);
  WorkspaceCarver c(static_cast<char*>(whole.tape) + offset, whole.tape_bytes > offset ? whole.tape_bytes - offset : 0);
  const FusedForwardWorkspace w = carve_fused_forward_workspace(c, pass.dims, pass.num_segments, pass.chunk_size);
  *fits = c.fits();
  return w;
}

/// The pipeline depth of kernels run in staged rounds (`threads` a block; `one` / `two` bytes
/// of dynamic shared memory at depth 1 / 2). requested 1: one; 2: two where every kernel fits
/// the device's opt-in shared memory with them, else one; 0 (the default): two where they fit
/// and cost no kernel resident blocks a multiprocessor, else one (small chunks: more blocks
/// hide the copies better than a second stage's raw slices). Raises the kernels' dynamic
/// shared memory limit to `two` where it fits (never lowered: set_max_dynamic_smem).
template <class... Kernels>
Status pick_stages(int requested, int threads, std::size_t one, std::size_t two, int* stages, Kernels... kernels) {
  *stages = 1;
  if (requested == 1) return Status::ok;
  bool fits = true;
  for (auto kernel : {kernels...}) {
    bool f = false;
    MOXE_RETURN_IF_ERROR(dynamic_smem_fits(kernel, two, &f));
    fits = fits && f;
  }
  if (!fits) return Status::ok;
  if (requested != 2) {
    for (auto kernel : {kernels...}) {
      // (the attribute raised first: the occupancy of a size above it would read 0)
      MOXE_RETURN_IF_ERROR(set_max_dynamic_smem(kernel, two));
      int b1 = 0, b2 = 0;
      MOXE_CUDA_TRY(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&b1, kernel, threads, one));
      MOXE_CUDA_TRY(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&b2, kernel, threads, two));
      if (b2 < b1 || b2 == 0) return Status::ok;
    }
  }
  *stages = 2;
  return Status::ok;
}

/// F2's pipeline depth (pick_stages; float: 1, its FMA path has no raw slices).
template <class T, int kParts>
Status fused_output_stages(int chunk, int requested, int* stages) {
  *stages = 1;
  if constexpr (kFusedMma<T>) {
    return pick_stages(requested, (chunk / 16) * 32, fused_output_smem<T, kParts>(chunk, 1),
                       fused_output_smem<T, kParts>(chunk, 2), stages, fused_output_kernel<T, kParts>);
  } else {
    (void)chunk, (void)requested;
    return Status::ok;
  }
}

/// F1's or B3's staging (*whole), its kernel's shared memory raised to it: whole chunks in two
/// buffers where they fit the device's opt-in shared memory and cost no resident blocks
/// (pick_stages: requested 0 the default, 1 16-row blocks, 2 whole chunks where they fit),
/// else 16-row blocks (float at DQK 256 and chunk 128 would need 328 KiB). Both run one block
/// a multiprocessor either way (their registers).
template <class T, class Kernel>
Status pick_state_staging(Kernel kernel, int64_t dqk, int chunk, int requested, bool* whole) {
  int depth = 1;
  MOXE_RETURN_IF_ERROR(pick_stages(requested, kFusedStateThreads, fused_state_smem<T>(dqk),
                                   fused_state_whole_smem<T>(dqk, chunk), &depth, kernel));
  *whole = depth == 2;
  return set_max_dynamic_smem(kernel, fused_state_staging_smem<T>(dqk, chunk, *whole));
}

/// F1's staging (pick_state_staging) for the instance DQK selects.
template <class T, int kParts>
Status prepare_state_smem(int64_t dqk, int chunk, int requested, bool* whole) {
  auto kernel = dqk > 16 * kFusedStateWarps ? fused_state_kernel<T, 2, kParts> : fused_state_kernel<T, 1, kParts>;
  return pick_state_staging<T>(kernel, dqk, chunk, requested, whole);
}

/// Dynamic shared memory of F1 and F2 for this call, set before anything is launched (a
/// size the device cannot give is Status::unsupported with nothing written). The attribute
/// is only ever raised (set_max_dynamic_smem), so calls of different sizes from several
/// host threads do not undo each other's setting.
template <class T, int kParts>
Status prepare_fused_smem(int64_t dqk, int chunk, int stages, int state_requested, bool* state_whole) {
  MOXE_RETURN_IF_ERROR((prepare_state_smem<T, kParts>(dqk, chunk, state_requested, state_whole)));
  return set_max_dynamic_smem(fused_output_kernel<T, kParts>, fused_output_smem<T, kParts>(chunk, stages));
}

/// The chunk table (segments only), F0 and F1: what the forward and the backward both run
/// first (the checkpoints). F1's grid is 1-D: block x = slot * column blocks + column
/// block, the column blocks of a slot adjacent. Its shared memory is set beforehand
/// (prepare_state_smem).
template <class T, int kParts>
Status launch_gate_scan_and_states(const FusedArgs<T>& a, const int64_t* offsets, cudaStream_t stream) {
  const int64_t slots = a.units * a.NH;
  const int64_t col_blocks = ceil_div<int64_t>(a.DV, kFusedColumns);
  if (a.segments)
    MOXE_RETURN_IF_ERROR(launch_kernel(fused_table_kernel<0>, 1, 1, 0, stream, a.table, a.units, a.chunks, a.S, a.L,
                                       offsets));
  MOXE_RETURN_IF_ERROR(
      launch_kernel(fused_gate_scan_kernel<T>, static_cast<unsigned>(slots), kFusedScanThreads, 0, stream, a));
  const std::size_t smem1 = fused_state_staging_smem<T>(a.DQK, a.L, a.state_whole);
  const dim3 grid1(static_cast<unsigned>(slots * col_blocks));
  if (a.DQK > 16 * kFusedStateWarps)
    return launch_kernel(fused_state_kernel<T, 2, kParts>, grid1, kFusedStateThreads, smem1, stream, a);
  return launch_kernel(fused_state_kernel<T, 1, kParts>, grid1, kFusedStateThreads, smem1, stream, a);
}

template <class T, int kParts>
Status launch_fused_pass(const FusedArgs<T>& a, const int64_t* offsets, cudaStream_t stream) {
  const int64_t col_blocks = ceil_div<int64_t>(a.DV, kFusedColumns);
  MOXE_RETURN_IF_ERROR((launch_gate_scan_and_states<T, kParts>(a, offsets, stream)));
  const std::size_t smem2 = fused_output_smem<T, kParts>(a.L, a.stages);
  const dim3 grid2(static_cast<unsigned>(a.chunks * a.NH * col_blocks));
  MOXE_RETURN_IF_ERROR(launch_kernel(fused_output_kernel<T, kParts>, grid2, (a.L / 16) * 32, smem2, stream, a));
  return check_launch(stream);
}

inline bool fused_head_dim_supported(int64_t dim) { return dim % 16 == 0 && dim <= kFusedMaxHeadDim; }

/// The fused forward: h, and the final states when given. T float, __half or
/// __nv_bfloat16; chunk_size 16..128 (multiples of 16); DQK, DV multiples of 16 up to 256.
/// batch_per_pass runs the batch in passes over one pass's workspace, as the phase design.
/// bf16 / half need sm_80 (Status::unsupported below). ForwardParams::allow_tf32 is not
/// implemented here: float inputs compute in fp32 either way. With ForwardParams::tape the
/// gate scan, table and checkpoints go to the tape (fused_tape_size), not the workspace (then
/// 0 bytes); a short tape is Status::workspace_too_small, nothing launched. stages: F2's pipeline depth
/// (fused_output_stages: 0 the default choice; 1 or 2 forced where they fit, for the tests
/// that compare them); *stages_used, when given, gets the depth that ran. state: F1's staging
/// (prepare_state_smem: 0 the default, 1 16-row blocks, 2 whole chunks where they fit);
/// *state_whole_used, when given, says whether whole chunks ran.
template <class T>
Status fused_chunkwise_forward(const ForwardParams<T, float>& p, void* workspace, std::size_t workspace_bytes,
                               cudaStream_t stream, int stages_requested = 0, int* stages_used = nullptr,
                               int state_requested = 0, bool* state_whole_used = nullptr) {
  static_assert(std::is_same_v<T, float> || mma::is_mma_element_v<T>,
                "fused chunkwise: T must be float, __half or __nv_bfloat16");
  MOXE_RETURN_IF_ERROR(validate_chunkwise(p, /*need_h=*/true));
  if (!fused_head_dim_supported(p.dims.dqk) || !fused_head_dim_supported(p.dims.dv)) return Status::unsupported;
  if (workspace_bytes < fused_chunkwise_forward_workspace_size(p)) return Status::workspace_too_small;
  if (p.tape != nullptr && p.tape_bytes < fused_tape_size(p)) return Status::workspace_too_small;
  {  // grid sizes (F2: chunks x heads x column blocks) within one grid dimension
    const int64_t blocks = chunk_bound(pass_dims(p), p.num_segments, p.chunk_size) * p.dims.heads *
                           ceil_div<int64_t>(p.dims.dv, kFusedColumns);
    if (blocks > int64_t(0x7fffffff)) return Status::unsupported;
  }
  if constexpr (kFusedMma<T>) {
    int device = 0;
    MOXE_RETURN_IF_ERROR(from_cuda(cudaGetDevice(&device)));
    MOXE_RETURN_IF_ERROR(mma::sm80_supported(device));
  }
  int stages = 1;
  bool whole = false;
  auto prepare = [&](auto parts) {
    constexpr int kParts = decltype(parts)::value;
    MOXE_RETURN_IF_ERROR((fused_output_stages<T, kParts>(p.chunk_size, stages_requested, &stages)));
    return prepare_fused_smem<T, kParts>(p.dims.dqk, p.chunk_size, stages, state_requested, &whole);
  };
  if constexpr (kFusedMma<T>) {
    if (p.precision == Precision::accurate)
      MOXE_RETURN_IF_ERROR(prepare(std::integral_constant<int, 3>{}));
    else
      MOXE_RETURN_IF_ERROR(prepare(std::integral_constant<int, 1>{}));
  } else {
    MOXE_RETURN_IF_ERROR(prepare(std::integral_constant<int, 1>{}));
  }
  if (stages_used) *stages_used = stages;
  if (state_whole_used) *state_whole_used = whole;
  return for_each_batch_pass(p, [&](int64_t b0, int64_t nb) {
    const ForwardParams<T, float> s = batch_slice(p, b0, nb);
    FusedForwardWorkspace w;
    bool fits = true;
    if (p.tape != nullptr) {
      w = carve_tape_pass(p, s, b0, &fits);
    } else {
      WorkspaceCarver carver(workspace, workspace_bytes);
      w = carve_fused_forward_workspace(carver, s.dims, s.num_segments, s.chunk_size);
      fits = carver.fits();
    }
    if (!fits) return Status::workspace_too_small;
    FusedArgs<T> a;
    a.q = s.q;
    a.k = s.k;
    a.v = s.v;
    a.igate = s.igate;
    a.fgate = s.fgate;
    a.c_init = s.c_init;
    a.n_init = s.n_init;
    a.m_init = s.m_init;
    a.h = s.h;
    a.c_last = s.c_last;
    a.n_last = s.n_last;
    a.m_last = s.m_last;
    a.scale = effective_qk_scale(s.qk_scale, s.dims.dqk);
    a.eps = s.eps;
    a.NH = s.dims.heads;
    a.S = s.dims.seq_len;
    a.DQK = s.dims.dqk;
    a.DV = s.dims.dv;
    a.units = sequence_units(s.dims, s.num_segments);
    a.chunks = chunk_bound(s.dims, s.num_segments, s.chunk_size);
    a.L = s.chunk_size;
    a.segments = s.segment_offsets != nullptr;
    auto al = [](const void* x) { return reinterpret_cast<std::uintptr_t>(x) % 16 == 0; };
    a.aligned = al(s.q) && al(s.k) && al(s.v);
    a.stages = stages;
    a.state_whole = whole;
    a.table = w.ws.table;
    a.m_prev = w.ws.m_prev;
    a.m_final = w.ws.m_final;
    a.state = w.ws.state;
    a.local_rows = w.local_rows;
    if constexpr (kFusedMma<T>) {
      if (s.precision == Precision::accurate) return launch_fused_pass<T, 3>(a, s.segment_offsets, stream);
    }
    return launch_fused_pass<T, 1>(a, s.segment_offsets, stream);
  });
}

}  // namespace moxe::mlstm::detail
