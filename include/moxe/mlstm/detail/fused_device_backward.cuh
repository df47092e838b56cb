// moxe::mlstm::detail: the FUSED chunkwise mLSTM backward on the device (docs/mlstm.md
// "Fused decomposition", "Fused device backward"). It follows the host twin's backward
// (chunkwise_fused_host.hpp) step by step, through the same MOXE_HD pieces (fused_chunk.hpp,
// cell.hpp, core/precision.hpp), over the same workspace (carve_fused_workspace with its
// backward arrays) plus the forward's per-row gate quantities and one array of per-(chunk,
// column block) partials:
//
//   F0, F1   the forward's gate scan and state walk (fused_device.cuh) again: m_prev of every
//            chunk and the fp32 checkpoints C'_c (no final states). Not run where the
//            forward kept them on its tape (ForwardParams::tape): the backward reads them there.
//   B2 rows, grid (K*NH). bf16 / half (fused_rows_mma_kernel), L / 16 warps, a warp per 16
//            rows, mma.sync m16n8k16 on operands staged by cp.async in 64-wide slices:
//            inter = Q C_c (B: the checkpoint converted to T parts) -> dli = dh . inter;
//            S = Q K^T and dhv = dh V^T (causal k16 steps) in registers; per row: P =
//            scale S o D, dot = w scale n.q + sum_s P (fp32), the normaliser, r = dh . h as
//            inv_den (w scale dli + sum_s P dhv) (the unrounded P, as dot: the function the
//            backward differentiates, F2's product folded into dh V^T), row_backward -> inv_den, ddot,
//            dmf, da, dlogw (O(rows) scalars); dP = inv_den dhv + ddot, dS = dP D, dlogD =
//            dP P (column sums: per warp by shuffles, then warps in order); dq = scale (w
//            (inv_den C dh + ddot n) + dS K) per 64 DQK columns (C dh: B = C_c's parts; dS K:
//            A = dS from registers, rounded / split per row). float (fused_rows_kernel), 8
//            warps: P, D then dlogD, dS in two triangular fp32 tiles in shared memory, the
//            same steps by fp32 FMAs, a warp per row.
//   B3 state gradient, grid (U*NH, ceil(DV/64)), 256 threads: dC'[:, 64 columns] in
//            registers (thread: one column, DQK/4 rows), the n column in block 0; walking a
//            unit's chunks backwards it writes dC'_{c+1} (fp32) per chunk, the block's part
//            of <dC'_{c+1}, C'_c> (summed in block order by B5: no atomics) and updates
//            dC' <- w_L dC' + (diag(w scale inv_den) Q)^T dh, dn <- w_L dn + Q^T (w scale ddot);
//            dc_init/dn_init at the end. (That is float's fused_state_grad_kernel; bf16 /
//            half run fused_state_grad_mma_kernel: F1 mirrored, dC' in mma accumulators, q
//            and dh staged as F1's K and V: whole chunks in two buffers where they fit, chunk
//            c - 1's copies during chunk c, else 16-row blocks.)
//   B4 columns, grid (K*NH). bf16 / half (fused_columns_mma_kernel), L / 16 warps, a warp
//            per 16 source rows, B2 transposed: S^T = K Q^T and V dh^T (anti-causal k16
//            steps) in registers -> dS^T and (P inv_den)^T, rounded / split per source row,
//            one strip at a time: per 64 DV columns dv = (P inv_den)^T dh + E dC_{c+1}^T k;
//            per 64 DQK columns dk = scale dS^T Q + E (dC_{c+1} v + dn_{c+1}) and dlogE = k .
//            (that last term) (dC v: B = dC'_{c+1} converted to T parts). float (fused_columns_kernel), 8 warps:
//            dS and P inv_den in two triangular fp32 tiles, fp32 FMAs, a warp per source row.
//   B5 gates, grid (U*NH), 128 threads: thread i solves chunk i of the unit with
//            dm_next = 0 (chunk_gate_grad_local), a block suffix scan of the stabiliser's
//            gradient maps (StabiliserGradMap) gives every chunk's dm_next, then the final
//            shares: digate, dfgate; dm_init.
//
// bf16 / half: every product of B2, B3 and B4 on mma.sync with fp32 accumulation, on the
// operands the twin's Products::mi forms: inputs exact, intermediates (C', P, dS, P inv_den,
// w scale inv_den q, dC') rounded to T (fast) or split in three T parts (accurate, three MMAs
// per product), half's groups scaled by a power of two (the twin's groups); the same rounding
// points as the twin, the order of the fp32 additions differs. float: fp32 FMAs (SIMT) on the
// same steps (exact fp32). Every kernel's dynamic shared memory is set before the first launch
// (prepare_backward_smem). B2 and B4 stage their slices in rounds of two stages (the next
// round's cp.async copies in flight during a round's MMAs, the checkpoint slices copied raw
// and converted in shared memory) where the device's shared memory allows it without fewer
// resident blocks (at most 131 KiB dynamic + 11 KiB static: chunk 128, accurate), else in one
// (63 + 11 KiB; the conversion reads global memory): the same arithmetic and bits either way
// (backward_slice_stages). Everything is deterministic (fixed orders, no
// atomics); no allocation and no host synchronisation.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "moxe/core/config.hpp"
#include "moxe/core/launch.cuh"
#include "moxe/core/math.hpp"
#include "moxe/core/precision.hpp"
#include "moxe/core/status.hpp"
#include "moxe/core/workspace.hpp"
#include "moxe/mlstm/detail/cell.hpp"
#include "moxe/mlstm/detail/chunk_layout.hpp"
#include "moxe/mlstm/detail/fused_chunk.hpp"
#include "moxe/mlstm/detail/fused_device.cuh"
#include "moxe/mlstm/params.hpp"

namespace moxe::mlstm::detail {

// ---- workspace -------------------------------------------------------------------------------

/// The fused backward's scratch: carve_fused_workspace(backward) (table, m_prev, m_final,
/// C', dC', the row scalars, the per-chunk gate arrays), the forward's per-row gate
/// quantities (the first four and these on the forward's tape instead, when it has one) and
/// B3's parts of <dC'_{c+1}, C'_c> ([K*NH][column blocks]).
struct FusedBackwardWorkspace {
  FusedWorkspace<float> ws;
  ChunkGateRow* local_rows = nullptr;
  float* inner_part = nullptr;
};

/// taped (ForwardParams::tape given): what the forward's tape holds (the table, m_prev,
/// m_final, the checkpoints C', the per-row gate quantities) is not carved here.
inline FusedBackwardWorkspace carve_fused_backward_workspace(WorkspaceCarver& c, const Dims& d, int64_t num_segments,
                                                             int chunk_size, bool taped = false) {
  FusedBackwardWorkspace w;
  w.ws = carve_fused_workspace<float>(c, d, num_segments, chunk_size, /*backward=*/true, /*forward_parts=*/!taped);
  if (d.batch <= 0 || d.heads <= 0 || d.seq_len <= 0 || d.dqk <= 0 || d.dv <= 0 || num_segments < 0 ||
      chunk_size < 1)
    return w;
  if (!taped) w.local_rows = c.carve<ChunkGateRow>(static_cast<std::size_t>(d.batch * d.heads * d.seq_len));
  const std::size_t K = static_cast<std::size_t>(chunk_bound(d, num_segments, chunk_size));
  w.inner_part = c.carve<float>(K * static_cast<std::size_t>(d.heads * ceil_div<int64_t>(d.dv, kFusedColumns)));
  return w;
}

template <class T>
std::size_t fused_backward_workspace_size(const BackwardParams<T, float>& p) {
  WorkspaceCarver c;
  carve_fused_backward_workspace(c, pass_dims(p.fwd), p.fwd.num_segments, p.fwd.chunk_size, p.fwd.tape != nullptr);
  return c.required_bytes();
}

// ---- kernel arguments ------------------------------------------------------------------------

inline constexpr int kFusedRowThreads = 256;     // B2, B4: 8 warps
inline constexpr int kFusedGradThreads = 256;    // B3
inline constexpr int kFusedGradRowsPerThread = kFusedMaxHeadDim / (kFusedGradThreads / kFusedColumns);

template <class T>
struct FusedBackwardArgs {
  FusedArgs<T> f;  // the forward's (h, c_last unused)
  const T* dh;
  const float *dc_last, *dn_last, *dm_last;
  T *dq, *dk, *dv, *digate, *dfgate;
  float *dc_init, *dn_init, *dm_init;
  OperandForm form;  // of the intermediate operands
  bool aligned;      // q and dh 16-byte aligned: cp.async staging in B3 (else plain loads)
  int col_blocks;
  int stages;  // B2 / B4's pipeline depth (1 or 2: backward_slice_stages)
  bool c_kept;  // B2 keeps all of C_c converted (its <T, 1, true> instance, fused_rows_kept_smem; bf16 fast)
  bool grad_whole;  // B3 stages whole chunks, two buffers (fused_state_whole_smem), else 16-row blocks
  FusedWorkspace<float> ws;
  float* inner_part;
};

/// s + a b over a's parts (a an intermediate operand of group exponent e): the twin's order.
template <class F>
MOXE_DEVICE MOXE_FORCEINLINE float mac_parts(float s, float a, float b, OperandForm form, int e) {
  const OperandParts op = operand_parts<F>(a, form, e);
  s += op.part[0] * b;
  if (op.count == 3) {
    s += op.part[1] * b;
    s += op.part[2] * b;
  }
  return s;
}

template <class F>
MOXE_DEVICE MOXE_FORCEINLINE int group_exponent(float max_abs) {
  return operand_exponent<F>(max_abs);
}

MOXE_DEVICE MOXE_FORCEINLINE float warp_sum(float x) {
  MOXE_PRAGMA_UNROLL
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

MOXE_DEVICE MOXE_FORCEINLINE float warp_max(float x) {
  MOXE_PRAGMA_UNROLL
  for (int off = 16; off > 0; off >>= 1) x = math::max(x, __shfl_xor_sync(0xffffffffu, x, off));
  return x;
}

/// The causal tiles of the float B2 and B4 keep their lower triangle (s <= j) only: entry (j, s) at
/// tri(j, s); L (L + 1) / 2 entries.
MOXE_HD MOXE_FORCEINLINE int tri(int j, int s) { return j * (j + 1) / 2 + s; }
MOXE_HD MOXE_FORCEINLINE int tri_size(int L) { return L * (L + 1) / 2; }

/// Dynamic shared memory of the float B2 and B4: two triangular fp32 tiles (66 KiB at chunk 128).
inline std::size_t fused_rows_smem(int L) { return 2 * sizeof(float) * static_cast<std::size_t>(tri_size(L)); }

/// The m_next of chunk c of unit u (the next chunk's m_prev, or the unit's final one).
template <class T>
MOXE_DEVICE MOXE_FORCEINLINE double fused_m_next(const FusedArgs<T>& p, int64_t u, int64_t c, int64_t hd) {
  const int64_t first = p.table.unit_first[u], count = p.table.unit_chunks[u];
  return c + 1 < first + count ? p.m_prev[(c + 1) * p.NH + hd] : p.m_final[u * p.NH + hd];
}

// ---- B2: rows --------------------------------------------------------------------------------

template <class T, class F>
__global__ void __launch_bounds__(kFusedRowThreads) fused_rows_kernel(const __grid_constant__ FusedBackwardArgs<T> b) {
  extern __shared__ __align__(16) unsigned char fused_smem[];
  __shared__ ChunkGateRow sRow[kFusedMaxChunk];
  __shared__ float sW[kFusedMaxChunk], sNq[kFusedMaxChunk], sInv[kFusedMaxChunk], sDdot[kFusedMaxChunk];
  __shared__ int sExpRow[kFusedMaxChunk], sExpC[kFusedMaxHeadDim], sExpCr[kFusedMaxHeadDim];
  const FusedArgs<T>& p = b.f;
  const int64_t kh = blockIdx.x, c = kh / p.NH, hd = kh % p.NH;
  const int len = p.table.chunk_len[c];
  if (len == 0) return;  // uniform: past the chunks in use
  const int L = p.L, DQK = static_cast<int>(p.DQK), DV = static_cast<int>(p.DV);
  float* tP = reinterpret_cast<float*>(fused_smem);  // P, then dlogD (lower triangle, tri(j, s))
  float* tD = tP + tri_size(L);                      // D, then dS
  const int tid = static_cast<int>(threadIdx.x), lane = tid % 32, warp = tid / 32;
  const int threads = static_cast<int>(blockDim.x), warps = threads / 32;
  const int64_t u = p.table.chunk_unit[c], start = p.table.chunk_start[c], W = p.DV + 1;
  const double mp = p.m_prev[kh];
  const float* ck = p.state + kh * p.DQK * W;
  const OperandForm form = b.form;
  auto row_of = [&](int s) { return p.row(u, hd, start + s); };
  auto q = [&](int j, int a) { return load_acc<float>(p.q[row_of(j) * p.DQK + a]); };
  auto k = [&](int j, int a) { return load_acc<float>(p.k[row_of(j) * p.DQK + a]); };
  auto v = [&](int j, int e) { return load_acc<float>(p.v[row_of(j) * p.DV + e]); };
  auto dh = [&](int j, int e) { return load_acc<float>(b.dh[row_of(j) * p.DV + e]); };

  // the rows' gate quantities; w_j scale n_c . q_j; the groups of C (columns: inter; rows: C dh)
  for (int j = tid; j < len; j += threads) {
    const ChunkGateRow row = gate_row_from_local(p.local_rows[row_of(j)], mp);
    sRow[j] = row;
    sW[j] = decay_weight<float>(mp, row);
    float nq = 0.0f;
    for (int a = 0; a < DQK; ++a) nq += ck[a * W + DV] * q(j, a);
    sNq[j] = sW[j] * p.scale * nq;
  }
  for (int e = tid; e < DV; e += threads) {
    float mx = 0.0f;
    if constexpr (OperandFormat<F>::kNarrowRange)
      for (int a = 0; a < DQK; ++a) mx = math::max(mx, math::abs(ck[a * W + e]));
    sExpC[e] = group_exponent<F>(mx);
  }
  for (int a = tid; a < DQK; a += threads) {
    float mx = 0.0f;
    if constexpr (OperandFormat<F>::kNarrowRange)
      for (int e = 0; e < DV; ++e) mx = math::max(mx, math::abs(ck[a * W + e]));
    sExpCr[a] = group_exponent<F>(mx);
  }
  __syncthreads();
  // S, D, P (s <= j)
  for (int idx = tid; idx < len * len; idx += threads) {
    const int j = idx / len, s = idx % len;
    if (s > j) continue;
    const float D = source_weight<float>(sRow[s].x, s, sRow[j]);
    float dot = 0.0f;
    for (int a = 0; a < DQK; ++a) dot += q(j, a) * k(s, a);
    tP[tri(j, s)] = (p.scale * dot) * D;
    tD[tri(j, s)] = D;
  }
  __syncthreads();
  // per row (a warp): dot, the normaliser, r = dh . h, dlogw and the row scalars
  for (int j = warp; j < len; j += warps) {
    float mx = 0.0f, ps = 0.0f;
    for (int s = lane; s <= j; s += 32) {
      mx = math::max(mx, math::abs(tP[tri(j, s)]));
    }
    mx = warp_max(mx);
    if (lane == 0)
      for (int s = 0; s <= j; ++s) ps += tP[tri(j, s)];  // the twin's order
    ps = __shfl_sync(0xffffffffu, ps, 0);
    const int ep = group_exponent<F>(mx);
    const float dot = sNq[j] + ps;
    const Normaliser<float> nz = row_normaliser(dot, sRow[j], p.eps);
    const float ws = sW[j] * p.scale;
    float r = 0.0f, dli = 0.0f;
    for (int e = lane; e < DV; e += 32) {
      float si = 0.0f, sp = 0.0f;
      for (int a = 0; a < DQK; ++a) si = mac_parts<F>(si, ck[a * W + e], q(j, a), form, sExpC[e]);
      for (int s = 0; s <= j; ++s) sp = mac_parts<F>(sp, tP[tri(j, s)], v(s, e), form, ep);
      const float inter = ws * si, num = inter + sp, g = dh(j, e);
      r += g * (num * nz.inv_den);
      dli += g * inter;
    }
    r = warp_sum(r);
    dli = warp_sum(dli);
    if (lane == 0) {
      const int64_t rj = row_of(j);
      const RowBackward<float> rb = row_backward(dot, sRow[j], p.eps, r);
      b.ws.inv_den[rj] = rb.inv_den;
      b.ws.ddot[rj] = rb.ddot;
      b.ws.dmf[rj] = rb.dmf;
      b.ws.da_row[rj] = rb.da;
      b.ws.dlogw[rj] = log_decay_grad(rb, dli, sNq[j]);
      sInv[j] = rb.inv_den;
      sDdot[j] = rb.ddot;
    }
  }
  __syncthreads();
  // dP = inv_den (dh . v) + ddot; dS = dP D; dlogD = dP P
  for (int idx = tid; idx < len * len; idx += threads) {
    const int j = idx / len, s = idx % len;
    if (s > j) continue;
    float g = 0.0f;
    for (int e = 0; e < DV; ++e) g += dh(j, e) * v(s, e);
    const float dP = score_grad(RowBackward<float>{sInv[j], sDdot[j], 0.0f, 0.0f}, g);
    tD[tri(j, s)] = dP * tD[tri(j, s)];
    tP[tri(j, s)] = dP * tP[tri(j, s)];
  }
  __syncthreads();
  for (int s = tid; s < len; s += threads) {
    float col = 0.0f;
    for (int j = s; j < len; ++j) col += tP[tri(j, s)];
    b.ws.dlogd_col[row_of(s)] = col;
  }
  for (int j = tid; j < len; j += threads) {
    float mx = 0.0f;
    if constexpr (OperandFormat<F>::kNarrowRange)
      for (int s = 0; s <= j; ++s) mx = math::max(mx, math::abs(tD[tri(j, s)]));
    sExpRow[j] = group_exponent<F>(mx);
  }
  __syncthreads();
  // dq = scale (w (inv_den C dh + ddot n) + dS K)
  for (int idx = tid; idx < len * DQK; idx += threads) {
    const int j = idx / DQK, a = idx % DQK;
    float cdh = 0.0f, dsk = 0.0f;
    for (int e = 0; e < DV; ++e) cdh = mac_parts<F>(cdh, ck[a * W + e], dh(j, e), form, sExpCr[a]);
    for (int s = 0; s <= j; ++s) dsk = mac_parts<F>(dsk, tD[tri(j, s)], k(s, a), form, sExpRow[j]);
    const float inter = sW[j] * (sInv[j] * cdh + sDdot[j] * ck[a * W + DV]);
    b.dq[row_of(j) * p.DQK + a] = store_elem<T>(p.scale * (inter + dsk));
  }
}

// ---- B2 on the tensor cores (bf16, half) -----------------------------------------------------

/// Dynamic shared memory of B2 and B4 on the tensor cores: `stages` (1 or 2) pairs of [L][64]
/// slices of inputs (Q, K, V or dh), one 64 x 64 slice of C'_c (B2) or dC'_{c+1} (B4) in
/// kParts T parts and, with two stages, two raw fp32 64 x 64 slices of it (the copies in
/// flight). One stage: 63 KiB at L 128 with three parts, 27 KiB at L 64 with one; two stages:
/// 131 / 77 KiB.
template <class T, int kParts>
inline std::size_t fused_rows_mma_smem(int L, int stages) {
  constexpr int ld = kFusedBwdSlice + kFusedPad<T>;
  const std::size_t raw = stages == 2 ? 2 * sizeof(float) * kFusedBwdSlice * kFusedBwdSlice : 0;
  return sizeof(T) * (2 * static_cast<std::size_t>(stages) * L * ld +
                      static_cast<std::size_t>(kParts) * kFusedBwdSlice * ld) +
         raw;
}

/// B2's row pitch of C_c kept whole: its 64-wide slices side by side, 16 bytes of padding.
template <class T>
MOXE_HD inline int fused_kept_ld(int64_t dv) {
  return static_cast<int>(ceil_div<int64_t>(dv, kFusedBwdSlice)) * kFusedBwdSlice + kFusedPad<T>;
}

/// B2's dynamic shared memory with C_c kept whole (c_kept): fused_rows_mma_smem with the 64 x
/// 64 slice of C_c's parts replaced by all of them ([kParts][DQK rounded to 64][fused_kept_ld]),
/// converted once in A and read again in D. Only where no scaling differs between A's groups
/// (columns) and D's (rows): bf16 with one part (half's powers of two differ; three parts
/// would not fit). At chunk 128, DQK 128, DV 256, two stages: 174,080 B (the slice's 115,712;
/// + 11,264 static), one block a multiprocessor either way (its registers): kept; at chunk 64
/// it would cost the second block: not kept by default.
template <class T, int kParts>
inline std::size_t fused_rows_kept_smem(int L, int stages, int64_t dqk, int64_t dv) {
  constexpr int ld = kFusedBwdSlice + kFusedPad<T>;
  const std::size_t rows = static_cast<std::size_t>(ceil_div<int64_t>(dqk, kFusedBwdSlice)) * kFusedBwdSlice;
  const std::size_t raw = stages == 2 ? 2 * sizeof(float) * kFusedBwdSlice * kFusedBwdSlice : 0;
  return sizeof(T) * (2 * static_cast<std::size_t>(stages) * L * ld +
                      static_cast<std::size_t>(kParts) * rows * fused_kept_ld<T>(dv)) +
         raw;
}

/// acc (the 16 x kST*8 strip of rows row0.. against the staged slices' rows) += X Y^T over
/// `width` columns of one staged slice pair (X, Y: [rows][ld] of T, the columns the k
/// dimension); only the n-tiles with active(nt) (the causal ones). B2's S = Q K^T and
/// dhv = dh V^T, B4's S^T = K Q^T and V dh^T.
template <class T, int kST, class Active>
MOXE_DEVICE MOXE_FORCEINLINE void strip_products(mma::FragmentC (&acc)[kST], const T* X, const T* Y, int ld, int row0,
                                                 int width, int lane, Active&& active) {
  for (int kk = 0; kk < width; kk += 16) {
    const mma::FragmentA xa = mma::load_a(X, ld, row0, kk, lane);
    MOXE_PRAGMA_UNROLL
    for (int nt = 0; nt < kST; ++nt) {
      if (!active(nt)) continue;
      const mma::FragmentB yb = mma::load_b(Y, ld, kk, nt * 8, lane, /*k_major=*/false);
      mma::mma_16816<T>(acc[nt], xa, yb);
    }
  }
}

/// Half's power-of-two groups of a checkpoint m ([DQK][W] fp32, the first DV columns): one
/// per column (by_col) and one per row (by_row), as the twin's groups; 0 for bf16. The block's
/// threads split the columns, then the rows.
template <class T>
MOXE_DEVICE void checkpoint_exponents(const float* m, int DQK, int DV, int W, int* by_col, int* by_row, int tid,
                                      int threads) {
  for (int e = tid; e < DV; e += threads) {
    float mx = 0.0f;
    if constexpr (OperandFormat<T>::kNarrowRange)
      for (int a = 0; a < DQK; ++a) mx = math::max(mx, math::abs(m[a * W + e]));
    by_col[e] = operand_exponent<T>(mx);
  }
  for (int a = tid; a < DQK; a += threads) {
    float mx = 0.0f;
    if constexpr (OperandFormat<T>::kNarrowRange)
      for (int e = 0; e < DV; ++e) mx = math::max(mx, math::abs(m[a * W + e]));
    by_row[a] = operand_exponent<T>(mx);
  }
}

/// B2 for bf16 / half: one warp per 16 rows of the chunk (L / 16 warps), F2's structure. In
/// order, over staged 64-wide slices (cp.async):
///   A  inter = Q C_c (A: Q; B: C_c converted to T parts, a power of two per column for half)
///      -> dli_j = dh_j . inter_j (dh from global at the accumulator positions);
///   B  S = Q K^T (causal k16 steps) and n_c . q_j (fp32);
///   C  dhv = dh V^T (causal);
///   then per row: P = scale S o D, dot, the normaliser, r = inv_den (dli + sum_s P_js dhv_js)
///      (the unrounded P, as dot, the twin's r: dh_j . h_j of the function the backward
///      differentiates, so that inv_den dhv and ddot cancel where h does not depend on P), the row
///      scalars, dP = inv_den dhv + ddot, dS = dP D, dlogD = dP P (column sums through shared
///      memory, warps in order);
///   D  per 64 DQK columns: cdh = dh C_c^T (B: C_c's parts, a power of two per DQK row for
///      half) and dsk = dS K (A: dS from registers rounded / split per row), dq = scale
///      (w (inv_den cdh + ddot n) + dsk).
template <class T, int kParts, bool kKept = false>
__global__ void __launch_bounds__(kFusedMaxChunk * 2)
    fused_rows_mma_kernel(const __grid_constant__ FusedBackwardArgs<T> b) {
  extern __shared__ __align__(16) unsigned char fused_smem[];
  __shared__ ChunkGateRow sRow[kFusedMaxChunk];
  __shared__ float sW[kFusedMaxChunk], sNq[kFusedMaxChunk];
  __shared__ int sExpC[kFusedMaxHeadDim], sExpCr[kFusedMaxHeadDim];
  __shared__ float sCol[kFusedMaxChunk / 16][kFusedMaxChunk];
  constexpr int kSl = kFusedBwdSlice, ld = kSl + kFusedPad<T>, kVec = 16 / sizeof(T);
  constexpr int kNT = kSl / 8, kST = kFusedMaxChunk / 8;
  const FusedArgs<T>& p = b.f;
  const int64_t kh = blockIdx.x, c = kh / p.NH, hd = kh % p.NH;
  const int len = p.table.chunk_len[c];
  if (len == 0) return;  // uniform: past the chunks in use
  const int L = p.L, DQK = static_cast<int>(p.DQK), DV = static_cast<int>(p.DV);
  // [stages][L][ld] each, buffer buf at x0(buf), x1(buf) (stages 1: buf is 0): X0 Q, then Q, dh, dh; X1 -, K, V, K
  const int stages = b.stages;
  T* const X0 = reinterpret_cast<T*>(fused_smem);
  T* const X1 = X0 + stages * L * ld;
  auto x0 = [&](int buf) { return X0 + buf * L * ld; };
  auto x1 = [&](int buf) { return X1 + buf * L * ld; };
  // C_c's slice [kParts][kSl][ld]; or, kept (the <T, 1, true> instance, launched where
  // b.c_kept), all of C_c [na * kSl][ldk] (slice (a0, e0) at Cs + a0 * ldk + e0, converted in
  // A, read again in D)
  static_assert(!kKept || (kParts == 1 && !OperandFormat<T>::kNarrowRange), "kept: one part, no scaling");
  constexpr bool kept = kKept;
  const int ldk = fused_kept_ld<T>(p.DV);
  const int na = (static_cast<int>(p.DQK) + kSl - 1) / kSl, ne = (static_cast<int>(p.DV) + kSl - 1) / kSl;
  T* Cs = X1 + stages * L * ld;
  float* raw = reinterpret_cast<float*>(Cs + kParts * (kept ? na * kSl * ldk : kSl * ld));  // [2][kSl][kSl] (stages 2)
  const int tid = static_cast<int>(threadIdx.x), lane = tid % 32, warp = tid / 32;
  const int threads = static_cast<int>(blockDim.x), warps = threads / 32;
  const int64_t u = p.table.chunk_unit[c], start = p.table.chunk_start[c], W = p.DV + 1;
  const double mp = p.m_prev[kh];
  const float* ck = p.state + kh * p.DQK * W;
  const bool aligned = p.aligned && b.aligned;
  auto row_of = [&](int s) { return p.row(u, hd, start + s); };

  // the rows' gate quantities (rows past len: no sources, weight 0, written nowhere)
  for (int j = tid; j < kFusedMaxChunk; j += threads) {
    const ChunkGateRow row =
        j < len ? gate_row_from_local(p.local_rows[row_of(j)], mp) : ChunkGateRow::before(0.0);
    sRow[j] = row;
    sW[j] = j < len ? decay_weight<float>(mp, row) : 0.0f;
  }
  // half: the powers of two of C_c's columns (inter) and rows (C dh), as the twin's groups
  checkpoint_exponents<T>(ck, DQK, DV, W, sExpC, sExpCr, tid, threads);
  // rows [0, L) of a T matrix (row stride ldg), columns c0..c0+63 (zeros past len and past limit)
  auto stage = [&](T* dst, const T* src, int64_t ldg, int c0, int limit) {
    for (int idx = tid; idx < L * (kSl / kVec); idx += threads) {
      const int s = idx / (kSl / kVec), col = (idx % (kSl / kVec)) * kVec;
      const bool in = s < len && c0 + col < limit;
      stage16(dst + s * ld + col, src + (s < len ? row_of(s) : 0) * ldg + c0 + col, in ? kVec : 0, aligned);
    }
  };
  // C_c[a0.., e0..] into Cs (scaled by its row's or its column's power of two, in parts)
  const CheckpointSlices<T, kParts> cps{Cs, raw, ck, W, ld, DQK, DV, stages, tid, threads, sExpCr, sExpC};
  // where slice (a0, e0) of C_c's parts is converted and read (kept: one part), and its pitch
  const int cld = kept ? ldk : ld;
  auto c_slice = [&](int a0, int e0) { return kept ? Cs + a0 * ldk + e0 : Cs; };
  __syncthreads();  // sRow, sW, sExpC, sExpCr

  const int j0 = warp * 16;
  const bool warp_rows = j0 < len;
  const int g0 = mma::fragment_c_row(lane, 0), g1 = mma::fragment_c_row(lane, 2);
  const int jr[2] = {j0 + g0, j0 + g1};
  auto active_st = [&](int nt) { return nt * 8 < j0 + 16 && nt * 8 < len; };  // causal, inside the chunk
  auto quad_sum = [](float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    return x + __shfl_xor_sync(0xffffffffu, x, 2);
  };
  auto quad_max = [](float x) {
    x = math::max(x, __shfl_xor_sync(0xffffffffu, x, 1));
    return math::max(x, __shfl_xor_sync(0xffffffffu, x, 2));
  };

  // Q kept: with two stages and DQK <= 128 Q's slices stay in x0(0), x0(1) from A's first
  // rounds through B (staged once, not DV/64 + 1 times; the buffers are distinct, nothing else
  // writes them before B ends)
  const bool q_kept = stages == 2 && na <= 2;
  // A: dli_j = dh_j . (C_c^T q_j) (times w_j scale below); rounds over (e0, a0), a0 inner
  float dli[2] = {0.0f, 0.0f};
  {
    mma::FragmentC iacc[kNT];
    staged_rounds(
        ne * na, stages,
        [&](int r, int buf) {
          const int e0 = (r / na) * kSl, a0 = (r % na) * kSl;
          if (!q_kept) stage(x0(buf), p.q, p.DQK, a0, DQK);
          else if (r < na) stage(x0(r), p.q, p.DQK, a0, DQK);
          cps.issue_into(c_slice(a0, e0), cld, buf, a0, e0, /*by_row=*/false);
        },
        [&](int r, int buf) {
          const int e0 = (r / na) * kSl, a0 = (r % na) * kSl;
          T* const cs = c_slice(a0, e0);
          cps.use_into(cs, cld, buf, a0, e0, /*by_row=*/false);
          if (warp_rows) {
            const int width = math::min(kSl, DQK - a0);
            const T* qs = x0(q_kept ? r % na : buf);
            for (int kk = 0; kk < width; kk += 16) {
              const mma::FragmentA qa = mma::load_a(qs, ld, j0, kk, lane);
              MOXE_PRAGMA_UNROLL
              for (int nt = 0; nt < kNT; ++nt) {
                if (e0 + nt * 8 >= DV) continue;
                MOXE_PRAGMA_UNROLL
                for (int pt = 0; pt < kParts; ++pt) {
                  const mma::FragmentB cf = mma::load_b(cs + pt * kSl * cld, cld, kk, nt * 8, lane, /*k_major=*/true);
                  mma::mma_16816<T>(iacc[nt], qa, cf);
                }
              }
            }
          }
          if (r % na != na - 1) return;
          // the last DQK slice of e0's columns: dli, and iacc starts again
          MOXE_PRAGMA_UNROLL
          for (int nt = 0; nt < kNT; ++nt)
            MOXE_PRAGMA_UNROLL
            for (int e = 0; e < 4; ++e) {
              const int h2 = e / 2, j = jr[h2], col = e0 + nt * 8 + mma::fragment_c_col(lane, e);
              if (j < len && col < DV)
                dli[h2] += load_acc<float>(b.dh[row_of(j) * p.DV + col]) * (iacc[nt].c[e] * exp2_int(-sExpC[col]));
              iacc[nt].c[e] = 0.0f;
            }
        });
  }

  // B: S = Q K^T; n_c . q_j (thread j, fp32, a in order)
  mma::FragmentC sacc[kST];
  float nq = 0.0f;
  staged_rounds(
      na, stages,
      [&](int r, int buf) {
        if (!q_kept) stage(x0(buf), p.q, p.DQK, r * kSl, DQK);  // (kept: slice r in x0(r), r = buf)
        stage(x1(buf), p.k, p.DQK, r * kSl, DQK);
      },
      [&](int r, int buf) {
        const int a0 = r * kSl, width = math::min(kSl, DQK - a0);
        if (tid < L)
          for (int a = 0; a < width; ++a) nq += ck[(a0 + a) * W + DV] * static_cast<float>(x0(buf)[tid * ld + a]);
        if (warp_rows) strip_products<T>(sacc, x0(buf), x1(buf), ld, j0, width, lane, active_st);
      });
  if (tid < L) sNq[tid] = nq;

  // C: dhv = dh V^T
  mma::FragmentC gacc[kST];
  staged_rounds(
      ne, stages,
      [&](int r, int buf) {
        stage(x0(buf), b.dh, p.DV, r * kSl, DV);
        stage(x1(buf), p.v, p.DV, r * kSl, DV);
      },
      [&](int r, int buf) {
        if (warp_rows) strip_products<T>(gacc, x0(buf), x1(buf), ld, j0, math::min(kSl, DV - r * kSl), lane, active_st);
      });

  // the rows: P, dot, the normaliser, r, the row scalars, dS, dlogD
  float ws[2], inv[2], dd[2];
  int dexp[2] = {0, 0};
  {
    float psum[2] = {0.0f, 0.0f};
    MOXE_PRAGMA_UNROLL
    for (int nt = 0; nt < kST; ++nt)
      MOXE_PRAGMA_UNROLL
      for (int e = 0; e < 4; ++e) {
        const int h2 = e / 2, j = jr[h2], s = nt * 8 + mma::fragment_c_col(lane, e);
        float P = 0.0f;
        if (active_st(nt) && s <= j && j < len)
          P = (p.scale * sacc[nt].c[e]) * source_weight<float>(sRow[s].x, s, sRow[j]);
        sacc[nt].c[e] = P;
        psum[h2] += P;
      }
    MOXE_PRAGMA_UNROLL
    for (int h2 = 0; h2 < 2; ++h2) {
      psum[h2] = quad_sum(psum[h2]);
      dli[h2] = quad_sum(dli[h2]);
    }
    // sum_s P_js dhv_js over the unrounded P, as dot (the twin's r: the function the
    // backward differentiates, so that inv_den dhv and ddot cancel where they should)
    float spv[2] = {0.0f, 0.0f};
    MOXE_PRAGMA_UNROLL
    for (int nt = 0; nt < kST; ++nt)
      MOXE_PRAGMA_UNROLL
      for (int e = 0; e < 4; ++e) spv[e / 2] += sacc[nt].c[e] * gacc[nt].c[e];
    RowBackward<float> rb[2];
    MOXE_PRAGMA_UNROLL
    for (int h2 = 0; h2 < 2; ++h2) {
      const int j = jr[h2];
      spv[h2] = quad_sum(spv[h2]);
      ws[h2] = sW[j] * p.scale;
      const float inter_dot = ws[h2] * sNq[j], dl = ws[h2] * dli[h2];
      const float dot = inter_dot + psum[h2];
      const Normaliser<float> nz = row_normaliser(dot, sRow[j], p.eps);
      rb[h2] = row_backward(dot, sRow[j], p.eps, nz.inv_den * (dl + spv[h2]));
      inv[h2] = rb[h2].inv_den;
      dd[h2] = rb[h2].ddot;
      if (lane % 4 == 0 && j < len) {
        const int64_t rj = row_of(j);
        b.ws.inv_den[rj] = rb[h2].inv_den;
        b.ws.ddot[rj] = rb[h2].ddot;
        b.ws.dmf[rj] = rb[h2].dmf;
        b.ws.da_row[rj] = rb[h2].da;
        b.ws.dlogw[rj] = log_decay_grad(rb[h2], dl, inter_dot);
      }
    }
    // dP = inv_den dhv + ddot; dS = dP D (into sacc); dlogD = dP P (column sums)
    float dmax[2] = {0.0f, 0.0f};
    MOXE_PRAGMA_UNROLL
    for (int nt = 0; nt < kST; ++nt) {
      float colp[2] = {0.0f, 0.0f};
      MOXE_PRAGMA_UNROLL
      for (int e = 0; e < 4; ++e) {
        const int h2 = e / 2, j = jr[h2], s = nt * 8 + mma::fragment_c_col(lane, e);
        float dS = 0.0f, dl = 0.0f;
        if (active_st(nt) && s <= j && j < len) {
          const float dP = score_grad(rb[h2], gacc[nt].c[e]);
          dS = dP * source_weight<float>(sRow[s].x, s, sRow[j]);
          dl = dP * sacc[nt].c[e];
        }
        sacc[nt].c[e] = dS;
        dmax[h2] = math::max(dmax[h2], math::abs(dS));
        colp[e % 2] += dl;
      }
      MOXE_PRAGMA_UNROLL
      for (int t = 0; t < 2; ++t) {  // over the 8 row groups of the warp (lanes 4 apart)
        for (int off = 4; off < 32; off <<= 1) colp[t] += __shfl_xor_sync(0xffffffffu, colp[t], off);
        if (lane < 4 && nt * 8 < L) sCol[warp][nt * 8 + mma::fragment_c_col(lane, t)] = colp[t];
      }
    }
    MOXE_PRAGMA_UNROLL
    for (int h2 = 0; h2 < 2; ++h2) dexp[h2] = operand_exponent<T>(quad_max(dmax[h2]));
  }
  __syncthreads();  // sCol
  for (int s = tid; s < len; s += threads) {
    float col = 0.0f;
    for (int w = 0; w < warps; ++w) col += sCol[w][s];
    b.ws.dlogd_col[row_of(s)] = col;
  }

  // D: dq = scale (w (inv_den C dh + ddot n) + dS K), 64 DQK columns at a time
  const int ksteps = math::min(warp + 1, (len + 15) / 16);
  T* const Ks = X1;  // K's slice ab, staged with the first round's copies
  for (int ab = 0; ab < DQK; ab += kSl) {
    mma::FragmentC cacc[kNT], kacc[kNT];
    staged_rounds(
        ne, stages,
        [&](int r, int buf) {
          if (r == 0) stage(Ks, p.k, p.DQK, ab, DQK);
          stage(x0(buf), b.dh, p.DV, r * kSl, DV);
          if (!kept) cps.issue(buf, ab, r * kSl, /*by_row=*/true);  // (kept: converted in A)
        },
        [&](int r, int buf) {
          const int e0 = r * kSl;
          if (!kept) cps.use(buf, ab, e0, /*by_row=*/true);
          if (!warp_rows) return;
          const T* const cs = c_slice(ab, e0);
          const int width = math::min(kSl, DV - e0);
          for (int kk = 0; kk < width; kk += 16) {
            const mma::FragmentA ha = mma::load_a(x0(buf), ld, j0, kk, lane);
            MOXE_PRAGMA_UNROLL
            for (int nt = 0; nt < kNT; ++nt) {
              if (ab + nt * 8 >= DQK) continue;
              MOXE_PRAGMA_UNROLL
              for (int pt = 0; pt < kParts; ++pt) {
                const mma::FragmentB cf = mma::load_b(cs + pt * kSl * cld, cld, kk, nt * 8, lane, /*k_major=*/false);
                mma::mma_16816<T>(cacc[nt], ha, cf);
              }
            }
          }
        });
    if (warp_rows) {
      MOXE_PRAGMA_UNROLL
      for (int ks = 0; ks < kST / 2; ++ks) {
        if (ks >= ksteps) break;
        float x[8];
        MOXE_PRAGMA_UNROLL
        for (int r = 0; r < 4; ++r) {
          const float up = exp2_int(dexp[r % 2]);
          x[2 * r] = sacc[2 * ks + r / 2].c[(r % 2) * 2] * up;
          x[2 * r + 1] = sacc[2 * ks + r / 2].c[(r % 2) * 2 + 1] * up;
        }
        mma::FragmentA fa[kParts];
        pack_a_parts<T, kParts>(fa, x);
        MOXE_PRAGMA_UNROLL
        for (int nt = 0; nt < kNT; ++nt) {
          if (ab + nt * 8 >= DQK) continue;
          const mma::FragmentB kb = mma::load_b(Ks, ld, ks * 16, nt * 8, lane, /*k_major=*/true);
          MOXE_PRAGMA_UNROLL
          for (int pt = 0; pt < kParts; ++pt) mma::mma_16816<T>(kacc[nt], fa[pt], kb);
        }
      }
      MOXE_PRAGMA_UNROLL
      for (int nt = 0; nt < kNT; ++nt)
        MOXE_PRAGMA_UNROLL
        for (int e = 0; e < 4; ++e) {
          const int h2 = e / 2, j = jr[h2], a = ab + nt * 8 + mma::fragment_c_col(lane, e);
          if (j >= len || a >= DQK) continue;
          const float cdh = cacc[nt].c[e] * exp2_int(-sExpCr[a]);
          const float inter = sW[j] * (inv[h2] * cdh + dd[h2] * ck[a * W + DV]);
          b.dq[row_of(j) * p.DQK + a] = store_elem<T>(p.scale * (inter + kacc[nt].c[e] * exp2_int(-dexp[h2])));
        }
    }
    __syncthreads();  // Ks is staged again
  }
}

// ---- B3: the state gradient ------------------------------------------------------------------

template <class T, class F>
__global__ void __launch_bounds__(kFusedGradThreads)
    fused_state_grad_kernel(const __grid_constant__ FusedBackwardArgs<T> b) {
  constexpr int kR = kFusedGradRowsPerThread, kStride = kFusedGradThreads / kFusedColumns;
  __shared__ ChunkGateRow sRow[kFusedMaxChunk];
  __shared__ float sFac[kFusedMaxChunk], sWs[kFusedMaxChunk], sDdot[kFusedMaxChunk];
  __shared__ int sExpQ[kFusedMaxHeadDim];
  __shared__ float sRed[kFusedGradThreads];
  const FusedArgs<T>& p = b.f;
  const int tid = static_cast<int>(threadIdx.x);
  const int64_t slot = blockIdx.x, u = slot / p.NH, hd = slot % p.NH;
  const int DQK = static_cast<int>(p.DQK), DV = static_cast<int>(p.DV);
  const int64_t W = p.DV + 1, first = p.table.unit_first[u], count = p.table.unit_chunks[u];
  const int col = static_cast<int>(blockIdx.y) * kFusedColumns + tid % kFusedColumns, a0 = tid / kFusedColumns;
  const bool col_in = col < DV;
  const bool n_owner = blockIdx.y == 0 && tid < DQK;
  const OperandForm form = b.form;

  float g[kR];
  MOXE_PRAGMA_UNROLL
  for (int i = 0; i < kR; ++i) {
    const int a = a0 + kStride * i;
    g[i] = (b.dc_last && col_in && a < DQK) ? b.dc_last[(slot * p.DQK + a) * p.DV + col] : 0.0f;
  }
  float gn = (n_owner && b.dn_last) ? b.dn_last[slot * p.DQK + tid] : 0.0f;

  for (int64_t c = first + count - 1; c >= first; --c) {
    const int64_t kh = c * p.NH + hd, start = p.table.chunk_start[c];
    const int len = p.table.chunk_len[c];
    const double mp = p.m_prev[kh], mn = fused_m_next(p, u, c, hd);
    float* gk = b.ws.dstate + kh * p.DQK * W;
    const float* ck = p.state + kh * p.DQK * W;
    auto row_of = [&](int s) { return p.row(u, hd, start + s); };
    // dC'_{c+1} to the workspace; this block's part of <dC'_{c+1}, C'_c>
    float inner = 0.0f;
    MOXE_PRAGMA_UNROLL
    for (int i = 0; i < kR; ++i) {
      const int a = a0 + kStride * i;
      if (col_in && a < DQK) {
        gk[a * W + col] = g[i];
        inner += g[i] * ck[a * W + col];
      }
    }
    if (n_owner) {
      gk[tid * W + DV] = gn;
      inner += gn * ck[tid * W + DV];
    }
    sRed[tid] = inner;
    for (int j = tid; j < len; j += kFusedGradThreads) {
      const int64_t rj = row_of(j);
      const ChunkGateRow row = gate_row_from_local(p.local_rows[rj], mp);
      sRow[j] = row;
      sWs[j] = decay_weight<float>(mp, row) * p.scale;
      sFac[j] = sWs[j] * b.ws.inv_den[rj];
      sDdot[j] = b.ws.ddot[rj];
    }
    __syncthreads();
    for (int off = kFusedGradThreads / 2; off > 0; off >>= 1) {  // a fixed tree
      if (tid < off) sRed[tid] += sRed[tid + off];
      __syncthreads();
    }
    if (tid == 0) b.inner_part[kh * b.col_blocks + blockIdx.y] = sRed[0];
    for (int a = tid; a < DQK; a += kFusedGradThreads) {
      float mx = 0.0f;
      if constexpr (OperandFormat<F>::kNarrowRange)
        for (int j = 0; j < len; ++j)
          mx = math::max(mx, math::abs(sFac[j] * load_acc<float>(p.q[row_of(j) * p.DQK + a])));
      sExpQ[a] = group_exponent<F>(mx);
    }
    __syncthreads();
    const float wL = state_decay_weight<float>(mp, sRow[len - 1], mn);
    // dC' <- w_L dC' + sum_j (w_j scale inv_den_j q_j) dh_j^T; dn <- w_L dn + sum_j w_j scale q_j ddot_j
    MOXE_PRAGMA_UNROLL
    for (int i = 0; i < kR; ++i) {
      const int a = a0 + kStride * i;
      if (!col_in || a >= DQK) continue;
      float sum = 0.0f;
      for (int j = 0; j < len; ++j) {
        const int64_t rj = row_of(j);
        sum = mac_parts<F>(sum, sFac[j] * load_acc<float>(p.q[rj * p.DQK + a]), load_acc<float>(b.dh[rj * p.DV + col]),
                           form, sExpQ[a]);
      }
      g[i] = wL * g[i] + sum;
    }
    if (n_owner) {
      float sum = 0.0f;
      for (int j = 0; j < len; ++j) sum += sWs[j] * load_acc<float>(p.q[row_of(j) * p.DQK + tid]) * sDdot[j];
      gn = wL * gn + sum;
    }
    __syncthreads();  // the shared rows are written again
  }
  if (b.dc_init) {
    MOXE_PRAGMA_UNROLL
    for (int i = 0; i < kR; ++i) {
      const int a = a0 + kStride * i;
      if (col_in && a < DQK) b.dc_init[(slot * p.DQK + a) * p.DV + col] = g[i];
    }
    if (n_owner) b.dn_init[slot * p.DQK + tid] = gn;
  }
}

/// B3 for bf16 / half on the tensor cores: F1's structure mirrored. dC'[:, 64-column block]
/// in mma accumulators (warp w: DQK rows 16w.., +128), dn in fp32 registers (block 0, one
/// DQK row per thread). Per chunk, last first: dC'_{c+1} (fp32) to the workspace and this
/// block's part of <dC'_{c+1}, C'_c>; then dC' <- w_L dC' + (Q^T diag(w scale inv_den)) dH
/// with the A operand built in registers from Q staged by cp.async (rounded to T: fast;
/// three T parts: accurate; half: a power of two per DQK row), dH staged the same way, and
/// dn <- w_L dn + Q^T (w scale ddot) by FFMA.
template <class T, int kRT, int kParts>
__global__ void __launch_bounds__(kFusedStateThreads, 1)
    fused_state_grad_mma_kernel(const __grid_constant__ FusedBackwardArgs<T> b) {
  extern __shared__ __align__(16) unsigned char fused_smem[];
  __shared__ float sFac[kFusedMaxChunk], sWs[kFusedMaxChunk], sDdot[kFusedMaxChunk];
  __shared__ int sExp[kFusedMaxHeadDim];
  __shared__ float sRed[kFusedStateThreads];
  constexpr int kNT = kFusedColumns / 8;
  const FusedArgs<T>& p = b.f;
  const int DQK = static_cast<int>(p.DQK), DV = static_cast<int>(p.DV);
  const int ldk = DQK + kFusedPad<T>, ldv = kFusedColumns + kFusedPad<T>;
  // blocks: [2][16][ldk] and [2][16][ldv]; whole chunks: [2][L][ldk] and [2][L][ldv]
  const bool whole = b.grad_whole;
  const int buf_rows = whole ? p.L : 16;
  T* Qs = reinterpret_cast<T*>(fused_smem);
  T* Hs = Qs + 2 * buf_rows * ldk;
  const int tid = static_cast<int>(threadIdx.x), lane = tid % 32, warp = tid / 32;
  const int64_t slot = blockIdx.x, u = slot / p.NH, hd = slot % p.NH;
  const int cb = static_cast<int>(blockIdx.y) * kFusedColumns;
  const int64_t W = p.DV + 1, first = p.table.unit_first[u], count = p.table.unit_chunks[u];
  const StateRowStager<T> stage{Qs, Hs, p.q, b.dh, ldk, ldv, buf_rows, cb, tid, b.aligned};
  // whole chunks (F1's scheme walked backwards): the last chunk's copies before the walk,
  // chunk c - 1's during chunk c
  if (whole && count > 0) stage.chunk(p, u, hd, first + count - 1, 0);

  mma::FragmentC st[kRT][kNT], acc[kRT][kNT];
  auto active_rt = [&](int i) { return (warp + kFusedStateWarps * i) * 16 < DQK; };
  auto active_nt = [&](int nt) { return cb + nt * 8 < DV; };
  MOXE_PRAGMA_UNROLL
  for (int i = 0; i < kRT; ++i)
    MOXE_PRAGMA_UNROLL
    for (int nt = 0; nt < kNT; ++nt)
      MOXE_PRAGMA_UNROLL
      for (int e = 0; e < 4; ++e) {
        const int a = (warp + kFusedStateWarps * i) * 16 + mma::fragment_c_row(lane, e);
        const int col = cb + nt * 8 + mma::fragment_c_col(lane, e);
        st[i][nt].c[e] =
            (b.dc_last && active_rt(i) && col < DV) ? b.dc_last[(slot * p.DQK + a) * p.DV + col] : 0.0f;
      }
  const bool n_owner = blockIdx.y == 0 && tid < DQK;
  float n_reg = (n_owner && b.dn_last) ? b.dn_last[slot * p.DQK + tid] : 0.0f;

  for (int64_t c = first + count - 1; c >= first; --c) {
    const int64_t kh = c * p.NH + hd, start = p.table.chunk_start[c];
    const int len = p.table.chunk_len[c];
    const int cbuf = static_cast<int>((first + count - 1 - c) % 2);  // whole chunks: this chunk's buffer
    // whole chunks: chunk c - 1's copies into the other buffer (its last reader, chunk c + 1,
    // ended with a barrier)
    if (whole && c > first) stage.chunk(p, u, hd, c - 1, 1 - cbuf);
    const double mp = p.m_prev[kh], mn = fused_m_next(p, u, c, hd);
    float* gk = b.ws.dstate + kh * p.DQK * W;
    const float* ck = p.state + kh * p.DQK * W;
    // dC'_{c+1} to the workspace; this block's part of <dC'_{c+1}, C'_c>
    float inner = 0.0f;
    MOXE_PRAGMA_UNROLL
    for (int i = 0; i < kRT; ++i)
      MOXE_PRAGMA_UNROLL
      for (int nt = 0; nt < kNT; ++nt)
        MOXE_PRAGMA_UNROLL
        for (int e = 0; e < 4; ++e) {
          const int a = (warp + kFusedStateWarps * i) * 16 + mma::fragment_c_row(lane, e);
          const int col = cb + nt * 8 + mma::fragment_c_col(lane, e);
          if (active_rt(i) && col < DV) {
            gk[a * W + col] = st[i][nt].c[e];
            inner += st[i][nt].c[e] * ck[a * W + col];
          }
        }
    if (n_owner) {
      gk[tid * W + DV] = n_reg;
      inner += n_reg * ck[tid * W + DV];
    }
    sRed[tid] = inner;
    auto row_of = [&](int s) { return p.row(u, hd, start + s); };
    for (int s = tid; s < kFusedMaxChunk; s += kFusedStateThreads) {
      float ws = 0.0f, inv = 0.0f, dd = 0.0f;
      if (s < len) {
        const int64_t r = row_of(s);
        ws = decay_weight<float>(mp, gate_row_from_local(p.local_rows[r], mp)) * p.scale;
        inv = b.ws.inv_den[r];
        dd = b.ws.ddot[r];
      }
      sWs[s] = ws;
      sFac[s] = ws * inv;
      sDdot[s] = dd;
    }
    if (whole) {  // this chunk's copies landed (the previous chunk's may still fly)
      if (c > first)
        mma::cp_async_wait<1>();
      else
        mma::cp_async_wait<0>();
    }
    __syncthreads();
    for (int off = kFusedStateThreads / 2; off > 0; off >>= 1) {  // a fixed tree
      if (tid < off) sRed[tid] += sRed[tid + off];
      __syncthreads();
    }
    if (tid == 0) b.inner_part[kh * b.col_blocks + blockIdx.y] = sRed[0];
    const float wL = state_decay_weight<float>(mp, gate_row_from_local(p.local_rows[row_of(len - 1)], mp), mn);
    // per DQK row: the half exponent of fac_s q_s[a] over the chunk; dn <- w_L dn + sum_s ws_s q_s ddot_s
    // (q from the staged chunk when whole, else from global)
    if (tid < DQK) {
      float max_abs = 0.0f, nsum = 0.0f;
      if (OperandFormat<T>::kNarrowRange || n_owner) {
        const T* qc = Qs + cbuf * buf_rows * ldk + tid;
        for (int s = 0; s < len; ++s) {
          const float qv = whole ? static_cast<float>(qc[s * ldk]) : load_acc<float>(p.q[row_of(s) * p.DQK + tid]);
          max_abs = math::max(max_abs, math::abs(sFac[s] * qv));
          nsum += sWs[s] * qv * sDdot[s];
        }
      }
      sExp[tid] = operand_exponent<T>(max_abs);
      if (n_owner) n_reg = wL * n_reg + nsum;
    }
    MOXE_PRAGMA_UNROLL
    for (int i = 0; i < kRT; ++i)
      MOXE_PRAGMA_UNROLL
      for (int nt = 0; nt < kNT; ++nt) acc[i][nt] = mma::FragmentC{};

    const int blocks = (len + 15) / 16;
    __syncthreads();  // sExp
    if (!whole && blocks > 0) stage.rows(p, u, hd, start, len, 0, 16, 0);
    for (int blk = 0; blk < blocks; ++blk) {
      // blocks: block blk + 1's copies fly during block blk's products; whole chunks: all landed
      const int buf = whole ? cbuf : blk % 2, row0 = whole ? blk * 16 : 0;
      if (!whole) {
        if (blk + 1 < blocks) {
          stage.rows(p, u, hd, start, len, (blk + 1) * 16, 16, (blk + 1) % 2);
          mma::cp_async_wait<1>();
        } else {
          mma::cp_async_wait<0>();
        }
        __syncthreads();
      }
      const T* qb = Qs + (buf * buf_rows + row0) * ldk;
      const T* hb = Hs + (buf * buf_rows + row0) * ldv;
      const float* fb = sFac + blk * 16;
      MOXE_PRAGMA_UNROLL
      for (int i = 0; i < kRT; ++i) {
        if (!active_rt(i)) continue;
        const int a0 = (warp + kFusedStateWarps * i) * 16;
        float x[8];
        MOXE_PRAGMA_UNROLL
        for (int r = 0; r < 4; ++r) {
          const int ar = a0 + mma::fragment_a_row(lane, 2 * r), s = mma::fragment_a_col(lane, 2 * r);
          const float up = exp2_int(sExp[ar]);
          x[2 * r] = fb[s] * static_cast<float>(qb[s * ldk + ar]) * up;
          x[2 * r + 1] = fb[s + 1] * static_cast<float>(qb[(s + 1) * ldk + ar]) * up;
        }
        mma::FragmentA fa[kParts];
        pack_a_parts<T, kParts>(fa, x);
        MOXE_PRAGMA_UNROLL
        for (int nt = 0; nt < kNT; ++nt) {
          if (!active_nt(nt)) continue;
          const mma::FragmentB fbv = mma::load_b(hb, ldv, 0, nt * 8, lane, /*k_major=*/true);
          MOXE_PRAGMA_UNROLL
          for (int pt = 0; pt < kParts; ++pt) mma::mma_16816<T>(acc[i][nt], fa[pt], fbv);
        }
      }
      if (!whole) __syncthreads();  // the buffer is staged again two blocks on
    }
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
    __syncthreads();  // sFac, sExp, sRed
  }
  if (b.dc_init) {
    MOXE_PRAGMA_UNROLL
    for (int i = 0; i < kRT; ++i)
      MOXE_PRAGMA_UNROLL
      for (int nt = 0; nt < kNT; ++nt)
        MOXE_PRAGMA_UNROLL
        for (int e = 0; e < 4; ++e) {
          const int a = (warp + kFusedStateWarps * i) * 16 + mma::fragment_c_row(lane, e);
          const int col = cb + nt * 8 + mma::fragment_c_col(lane, e);
          if (active_rt(i) && col < DV) b.dc_init[(slot * p.DQK + a) * p.DV + col] = st[i][nt].c[e];
        }
    if (n_owner) b.dn_init[slot * p.DQK + tid] = n_reg;
  }
}

// ---- B4: columns -----------------------------------------------------------------------------

template <class T, class F>
__global__ void __launch_bounds__(kFusedRowThreads)
    fused_columns_kernel(const __grid_constant__ FusedBackwardArgs<T> b) {
  extern __shared__ __align__(16) unsigned char fused_smem[];
  __shared__ ChunkGateRow sRow[kFusedMaxChunk];
  __shared__ float sInv[kFusedMaxChunk], sDdot[kFusedMaxChunk], sE[kFusedMaxChunk];
  __shared__ int sExpS[kFusedMaxChunk], sExpPd[kFusedMaxChunk], sExpGr[kFusedMaxHeadDim], sExpGc[kFusedMaxHeadDim];
  const FusedArgs<T>& p = b.f;
  const int64_t kh = blockIdx.x, c = kh / p.NH, hd = kh % p.NH;
  const int len = p.table.chunk_len[c];
  if (len == 0) return;
  const int L = p.L, DQK = static_cast<int>(p.DQK), DV = static_cast<int>(p.DV);
  float* tS = reinterpret_cast<float*>(fused_smem);  // dS (lower triangle, tri(j, s))
  float* tQ = tS + tri_size(L);                      // P inv_den
  const int tid = static_cast<int>(threadIdx.x), lane = tid % 32, warp = tid / 32;
  const int threads = static_cast<int>(blockDim.x), warps = threads / 32;
  const int64_t u = p.table.chunk_unit[c], start = p.table.chunk_start[c], W = p.DV + 1;
  const double mp = p.m_prev[kh], mn = fused_m_next(p, u, c, hd);
  const float* gn = b.ws.dstate + kh * p.DQK * W;  // dC'_{c+1}
  const OperandForm form = b.form;
  auto row_of = [&](int s) { return p.row(u, hd, start + s); };
  auto q = [&](int j, int a) { return load_acc<float>(p.q[row_of(j) * p.DQK + a]); };
  auto k = [&](int j, int a) { return load_acc<float>(p.k[row_of(j) * p.DQK + a]); };
  auto v = [&](int j, int e) { return load_acc<float>(p.v[row_of(j) * p.DV + e]); };
  auto dh = [&](int j, int e) { return load_acc<float>(b.dh[row_of(j) * p.DV + e]); };

  for (int j = tid; j < len; j += threads) {
    const int64_t rj = row_of(j);
    sRow[j] = gate_row_from_local(p.local_rows[rj], mp);
    sInv[j] = b.ws.inv_den[rj];
    sDdot[j] = b.ws.ddot[rj];
  }
  for (int e = tid; e < DV; e += threads) {
    float mx = 0.0f;
    if constexpr (OperandFormat<F>::kNarrowRange)
      for (int a = 0; a < DQK; ++a) mx = math::max(mx, math::abs(gn[a * W + e]));
    sExpGc[e] = group_exponent<F>(mx);
  }
  for (int a = tid; a < DQK; a += threads) {
    float mx = 0.0f;
    if constexpr (OperandFormat<F>::kNarrowRange)
      for (int e = 0; e < DV; ++e) mx = math::max(mx, math::abs(gn[a * W + e]));
    sExpGr[a] = group_exponent<F>(mx);
  }
  __syncthreads();
  for (int s = tid; s < len; s += threads) sE[s] = state_source_weight<float>(sRow[s].x, s, sRow[len - 1], mn);
  // dS = dP D and P inv_den (s <= j)
  for (int idx = tid; idx < len * len; idx += threads) {
    const int j = idx / len, s = idx % len;
    if (s > j) continue;
    const float D = source_weight<float>(sRow[s].x, s, sRow[j]);
    float sq = 0.0f, g = 0.0f;
    for (int a = 0; a < DQK; ++a) sq += q(j, a) * k(s, a);
    for (int e = 0; e < DV; ++e) g += dh(j, e) * v(s, e);
    const float P = (p.scale * sq) * D;
    const float dP = score_grad(RowBackward<float>{sInv[j], sDdot[j], 0.0f, 0.0f}, g);
    tS[tri(j, s)] = dP * D;
    tQ[tri(j, s)] = P * sInv[j];
  }
  __syncthreads();
  for (int s = tid; s < len; s += threads) {
    float m1 = 0.0f, m2 = 0.0f;
    if constexpr (OperandFormat<F>::kNarrowRange)
      for (int j = s; j < len; ++j) {
        m1 = math::max(m1, math::abs(tS[tri(j, s)]));
        m2 = math::max(m2, math::abs(tQ[tri(j, s)]));
      }
    sExpS[s] = group_exponent<F>(m1);
    sExpPd[s] = group_exponent<F>(m2);
  }
  __syncthreads();
  // per source row s (a warp): dk, dlogE, dv
  for (int s = warp; s < len; s += warps) {
    const int64_t rs = row_of(s);
    float dle = 0.0f;
    for (int a = lane; a < DQK; a += 32) {
      float dsq = 0.0f, dcv = 0.0f;
      for (int j = s; j < len; ++j) dsq = mac_parts<F>(dsq, tS[tri(j, s)], q(j, a), form, sExpS[s]);
      for (int e = 0; e < DV; ++e) dcv = mac_parts<F>(dcv, gn[a * W + e], v(s, e), form, sExpGr[a]);
      const float state_part = sE[s] * (dcv + gn[a * W + DV]);
      dle += k(s, a) * state_part;
      b.dk[rs * p.DQK + a] = store_elem<T>(p.scale * dsq + state_part);
    }
    dle = warp_sum(dle);
    if (lane == 0) b.ws.dloge[rs] = dle;
    for (int e = lane; e < DV; e += 32) {
      float pdh = 0.0f, dck = 0.0f;
      for (int j = s; j < len; ++j) pdh = mac_parts<F>(pdh, tQ[tri(j, s)], dh(j, e), form, sExpPd[s]);
      for (int a = 0; a < DQK; ++a) dck = mac_parts<F>(dck, gn[a * W + e], k(s, a), form, sExpGc[e]);
      b.dv[rs * p.DV + e] = store_elem<T>(pdh + sE[s] * dck);
    }
  }
}

// ---- B4 on the tensor cores (bf16, half) -----------------------------------------------------

/// B4 for bf16 / half: one warp per 16 source rows s of the chunk (L / 16 warps), B2's
/// structure transposed (rows j >= s), one 16 x L strip live at a time (no spills). Over
/// staged 64-wide slices (cp.async):
///   S^T = K Q^T (anti-causal k16 steps) -> P inv_den = scale S D inv_den in registers
///      (rounded / split per source row as the twin's operand);
///   per 64 DV columns: dck = K dC_{c+1} (a power of two per DV column for half) and
///      pdh = (P inv_den)^T dh; dv = pdh + E dck;
///   dh . v as V dh^T -> dS = (inv_den dh . v + ddot) D in registers (as P inv_den);
///   per 64 DQK columns: dcv = V dC_{c+1}^T (B: dC_{c+1}'s parts, a power of two per DQK row
///      for half) and dsq = dS^T Q; dk = scale dsq + E (dcv + dn), dlogE = k . E (dcv + dn).
template <class T, int kParts>
__global__ void __launch_bounds__(kFusedMaxChunk * 2)
    fused_columns_mma_kernel(const __grid_constant__ FusedBackwardArgs<T> b) {
  extern __shared__ __align__(16) unsigned char fused_smem[];
  __shared__ ChunkGateRow sRow[kFusedMaxChunk];
  __shared__ float sInv[kFusedMaxChunk], sDdot[kFusedMaxChunk], sE[kFusedMaxChunk];
  __shared__ int sExpGc[kFusedMaxHeadDim], sExpGr[kFusedMaxHeadDim];
  constexpr int kSl = kFusedBwdSlice, ld = kSl + kFusedPad<T>, kVec = 16 / sizeof(T);
  constexpr int kNT = kSl / 8, kST = kFusedMaxChunk / 8;
  const FusedArgs<T>& p = b.f;
  const int64_t kh = blockIdx.x, c = kh / p.NH, hd = kh % p.NH;
  const int len = p.table.chunk_len[c];
  if (len == 0) return;  // uniform: past the chunks in use
  const int L = p.L, DQK = static_cast<int>(p.DQK), DV = static_cast<int>(p.DV);
  // [stages][L][ld] each, buffer buf at x0(buf), x1(buf) (stages 1: buf is 0): X0 K, K, V, V; X1 Q, dh, dh, Q
  const int stages = b.stages;
  T* const X0 = reinterpret_cast<T*>(fused_smem);
  T* const X1 = X0 + stages * L * ld;
  auto x0 = [&](int buf) { return X0 + buf * L * ld; };
  auto x1 = [&](int buf) { return X1 + buf * L * ld; };
  T* Gs = X1 + stages * L * ld;  // [kParts][kSl][ld]: dC_{c+1}'s slice
  float* raw = reinterpret_cast<float*>(Gs + kParts * kSl * ld);  // [2][kSl][kSl] (stages 2)
  T* const Ys = X1;  // the loops' second operand (dh, then Q), staged with their first round
  const int tid = static_cast<int>(threadIdx.x), lane = tid % 32, warp = tid / 32;
  const int threads = static_cast<int>(blockDim.x);
  const int64_t u = p.table.chunk_unit[c], start = p.table.chunk_start[c], W = p.DV + 1;
  const double mp = p.m_prev[kh], mn = fused_m_next(p, u, c, hd);
  const float* gn = b.ws.dstate + kh * p.DQK * W;  // dC'_{c+1}
  const bool aligned = p.aligned && b.aligned;
  auto row_of = [&](int s) { return p.row(u, hd, start + s); };

  for (int j = tid; j < kFusedMaxChunk; j += threads) {
    const bool in = j < len;
    sRow[j] = in ? gate_row_from_local(p.local_rows[row_of(j)], mp) : ChunkGateRow::before(0.0);
    sInv[j] = in ? b.ws.inv_den[row_of(j)] : 0.0f;
    sDdot[j] = in ? b.ws.ddot[row_of(j)] : 0.0f;
  }
  checkpoint_exponents<T>(gn, DQK, DV, W, sExpGc, sExpGr, tid, threads);
  auto stage = [&](T* dst, const T* src, int64_t ldg, int c0, int limit) {
    for (int idx = tid; idx < L * (kSl / kVec); idx += threads) {
      const int s = idx / (kSl / kVec), col = (idx % (kSl / kVec)) * kVec;
      const bool in = s < len && c0 + col < limit;
      stage16(dst + s * ld + col, src + (s < len ? row_of(s) : 0) * ldg + c0 + col, in ? kVec : 0, aligned);
    }
  };
  // dC_{c+1}[a0.., e0..] into Gs (scaled by its row's or its column's power of two, in parts)
  const CheckpointSlices<T, kParts> cps{Gs, raw, gn, W, ld, DQK, DV, stages, tid, threads, sExpGr, sExpGc};
  __syncthreads();  // sRow, sInv, sDdot, the exponents
  for (int s = tid; s < len; s += threads) sE[s] = state_source_weight<float>(sRow[s].x, s, sRow[len - 1], mn);

  const int s0 = warp * 16;
  const bool warp_rows = s0 < len;
  const int g0 = mma::fragment_c_row(lane, 0), g1 = mma::fragment_c_row(lane, 2);
  const int sr[2] = {s0 + g0, s0 + g1};
  auto active_jt = [&](int nt) { return nt * 8 + 8 > s0 && nt * 8 < len; };  // j >= s, inside the chunk
  auto quad_max = [](float x) {
    x = math::max(x, __shfl_xor_sync(0xffffffffu, x, 1));
    return math::max(x, __shfl_xor_sync(0xffffffffu, x, 2));
  };

  auto strip = [&](mma::FragmentC(&acc)[kST], bool second) {
    const int D = second ? DV : DQK;
    staged_rounds(
        (D + kSl - 1) / kSl, stages,
        [&](int r, int buf) {
          const int a0 = r * kSl;
          if (!second) {
            stage(x0(buf), p.k, p.DQK, a0, DQK);
            stage(x1(buf), p.q, p.DQK, a0, DQK);
          } else {
            stage(x0(buf), p.v, p.DV, a0, DV);
            stage(x1(buf), b.dh, p.DV, a0, DV);
          }
        },
        [&](int r, int buf) {
          if (warp_rows) strip_products<T>(acc, x0(buf), x1(buf), ld, s0, math::min(kSl, D - r * kSl), lane, active_jt);
        });
  };
  const int kfirst = warp, kend = (len + 15) / 16;
  auto product = [&](mma::FragmentC(&acc)[kNT], const mma::FragmentC(&src)[kST], const int(&ex)[2], int n0, int limit) {
    MOXE_PRAGMA_UNROLL
    for (int ks = 0; ks < kST / 2; ++ks) {
      if (ks < kfirst || ks >= kend) continue;
      float x[8];
      MOXE_PRAGMA_UNROLL
      for (int r = 0; r < 4; ++r) {
        const float up = exp2_int(ex[r % 2]);
        x[2 * r] = src[2 * ks + r / 2].c[(r % 2) * 2] * up;
        x[2 * r + 1] = src[2 * ks + r / 2].c[(r % 2) * 2 + 1] * up;
      }
      mma::FragmentA fa[kParts];
      pack_a_parts<T, kParts>(fa, x);
      MOXE_PRAGMA_UNROLL
      for (int nt = 0; nt < kNT; ++nt) {
        if (n0 + nt * 8 >= limit) continue;
        const mma::FragmentB yb = mma::load_b(Ys, ld, ks * 16, nt * 8, lane, /*k_major=*/true);
        MOXE_PRAGMA_UNROLL
        for (int pt = 0; pt < kParts; ++pt) mma::mma_16816<T>(acc[nt], fa[pt], yb);
      }
    }
  };
  // the strip's tile in place: entry (s, j) -> f(s, j, acc) on the causal entries j >= s
  // (0 elsewhere), and each source row's power of two (half's operand groups)
  auto transform = [&](mma::FragmentC(&acc)[kST], int(&ex)[2], auto f) {
    float mx[2] = {0.0f, 0.0f};
    MOXE_PRAGMA_UNROLL
    for (int nt = 0; nt < kST; ++nt)
      MOXE_PRAGMA_UNROLL
      for (int e = 0; e < 4; ++e) {
        const int h2 = e / 2, s = sr[h2], j = nt * 8 + mma::fragment_c_col(lane, e);
        float y = 0.0f;
        if (active_jt(nt) && j >= s && j < len) y = f(s, j, acc[nt].c[e]);
        acc[nt].c[e] = y;
        mx[h2] = math::max(mx[h2], math::abs(y));
      }
    MOXE_PRAGMA_UNROLL
    for (int h2 = 0; h2 < 2; ++h2) ex[h2] = operand_exponent<T>(quad_max(mx[h2]));
  };
  // acc (16 source rows x 64 columns from ob of the outer dimension) += X (the strip's rows of
  // `src`, staged 64 columns at a time over the inner dimension) times dC'_{c+1}'s T parts:
  // by_row false: K dC (outer DV, inner DQK); true: V dC^T (outer DQK, inner DV). Ys gets
  // (y, y_pitch)'s columns ob.. (limit y_limit) with the first round. src_kept: the strip
  // before left src's slices in x0(0), x0(1) (two stages, inner <= 128: round r's buffer is r)
  // and nothing has written them since: not staged again.
  auto state_product = [&](mma::FragmentC(&acc)[kNT], const T* src, int64_t pitch, int inner, int ob, int outer,
                           bool by_row, const T* y, int64_t y_pitch, int y_limit, bool src_kept) {
    staged_rounds(
        (inner + kSl - 1) / kSl, stages,
        [&](int r, int buf) {
          const int i0 = r * kSl;
          if (r == 0) stage(Ys, y, y_pitch, ob, y_limit);
          if (!src_kept) stage(x0(buf), src, pitch, i0, inner);
          cps.issue(buf, by_row ? ob : i0, by_row ? i0 : ob, by_row);
        },
        [&](int r, int buf) {
          const int i0 = r * kSl;
          cps.use(buf, by_row ? ob : i0, by_row ? i0 : ob, by_row);
          if (!warp_rows) return;
          const int width = math::min(kSl, inner - i0);
          for (int kk = 0; kk < width; kk += 16) {
            const mma::FragmentA xa = mma::load_a(x0(buf), ld, s0, kk, lane);
            MOXE_PRAGMA_UNROLL
            for (int nt = 0; nt < kNT; ++nt) {
              if (ob + nt * 8 >= outer) continue;
              MOXE_PRAGMA_UNROLL
              for (int pt = 0; pt < kParts; ++pt) {
                const mma::FragmentB gf = mma::load_b(Gs + pt * kSl * ld, ld, kk, nt * 8, lane, /*k_major=*/!by_row);
                mma::mma_16816<T>(acc[nt], xa, gf);
              }
            }
          }
        });
  };
  // a strip's first operand (K, then V) stays in x0(0), x0(1) for the state products after it
  // where it spans at most two slices and there are two stages (Ys is X1; Gs and raw after it)
  auto kept = [&](int width) { return stages == 2 && width <= 2 * kSl; };
  {
    mma::FragmentC sacc[kST];
    strip(sacc, false);
    int pexp[2];
    transform(sacc, pexp, [&](int s, int j, float S) {
      const float D = source_weight<float>(sRow[s].x, s, sRow[j]);
      return ((p.scale * S) * D) * sInv[j];
    });
    for (int eb = 0; eb < DV; eb += kSl) {
      mma::FragmentC kacc[kNT], pacc[kNT];
      state_product(kacc, p.k, p.DQK, DQK, eb, DV, /*by_row=*/false, b.dh, p.DV, DV, kept(DQK));
      if (warp_rows) {
        product(pacc, sacc, pexp, eb, DV);
        MOXE_PRAGMA_UNROLL
        for (int nt = 0; nt < kNT; ++nt)
          MOXE_PRAGMA_UNROLL
          for (int e = 0; e < 4; ++e) {
            const int h2 = e / 2, s = sr[h2], col = eb + nt * 8 + mma::fragment_c_col(lane, e);
            if (s >= len || col >= DV) continue;
            const float dck = kacc[nt].c[e] * exp2_int(-sExpGc[col]);
            b.dv[row_of(s) * p.DV + col] = store_elem<T>(pacc[nt].c[e] * exp2_int(-pexp[h2]) + sE[s] * dck);
          }
      }
      __syncthreads();
    }
  }
  mma::FragmentC gacc[kST];
  strip(gacc, true);
  int dexp[2];
  transform(gacc, dexp, [&](int s, int j, float dhv) {
    const float D = source_weight<float>(sRow[s].x, s, sRow[j]);
    return score_grad(RowBackward<float>{sInv[j], sDdot[j], 0.0f, 0.0f}, dhv) * D;
  });
  float dle[2] = {0.0f, 0.0f};
  for (int ab = 0; ab < DQK; ab += kSl) {
    mma::FragmentC cacc[kNT], qacc[kNT];
    state_product(cacc, p.v, p.DV, DV, ab, DQK, /*by_row=*/true, p.q, p.DQK, DQK, kept(DV));
    if (warp_rows) {
      product(qacc, gacc, dexp, ab, DQK);
      MOXE_PRAGMA_UNROLL
      for (int nt = 0; nt < kNT; ++nt)
        MOXE_PRAGMA_UNROLL
        for (int e = 0; e < 4; ++e) {
          const int h2 = e / 2, s = sr[h2], a = ab + nt * 8 + mma::fragment_c_col(lane, e);
          if (s >= len || a >= DQK) continue;
          const int64_t rs = row_of(s);
          const float state_part = sE[s] * (cacc[nt].c[e] * exp2_int(-sExpGr[a]) + gn[a * W + DV]);
          dle[h2] += load_acc<float>(p.k[rs * p.DQK + a]) * state_part;
          b.dk[rs * p.DQK + a] = store_elem<T>(p.scale * (qacc[nt].c[e] * exp2_int(-dexp[h2])) + state_part);
        }
    }
    __syncthreads();
  }
  MOXE_PRAGMA_UNROLL
  for (int h2 = 0; h2 < 2; ++h2) {
    dle[h2] += __shfl_xor_sync(0xffffffffu, dle[h2], 1);
    dle[h2] += __shfl_xor_sync(0xffffffffu, dle[h2], 2);
    if (lane % 4 == 0 && sr[h2] < len) b.ws.dloge[row_of(sr[h2])] = dle[h2];
  }
}

// ---- B5: gates -------------------------------------------------------------------------------

template <class T>
__global__ void __launch_bounds__(kFusedScanThreads) fused_gates_kernel(const __grid_constant__ FusedBackwardArgs<T> b) {
  __shared__ float sAdd[kFusedScanThreads];
  __shared__ int sPass[kFusedScanThreads];
  const FusedArgs<T>& p = b.f;
  const int tid = static_cast<int>(threadIdx.x);
  const int64_t slot = blockIdx.x, u = slot / p.NH, hd = slot % p.NH;
  const int64_t first = p.table.unit_first[u], count = p.table.unit_chunks[u];
  const float dm_last = b.dm_last ? b.dm_last[slot] : 0.0f;
  using Map = StabiliserGradMap<float>;
  ChunkGateRow rows[kFusedMaxChunk];
  GateGradRow<float> g[kFusedMaxChunk];
  float di[kFusedMaxChunk], dlf[kFusedMaxChunk], scratch[kFusedMaxChunk];
  Map carry = Map::identity();  // the chunks after this group, applied to dm_last
  // groups of chunks from the unit's end; position t of a group is chunk count - 1 - (base + t)
  for (int64_t base = 0; base < count; base += kFusedScanThreads) {
    const int64_t i = count - 1 - (base + tid);
    Map mine = Map::identity();
    int32_t len = 0, origin_last = -1;
    int64_t c = 0, start = 0;
    if (i >= 0) {
      c = first + i;
      const int64_t kh = c * p.NH + hd;
      start = p.table.chunk_start[c];
      len = p.table.chunk_len[c];
      const double mp = p.m_prev[kh], mn = fused_m_next(p, u, c, hd);
      for (int j = 0; j < len; ++j) {
        const int64_t r = p.row(u, hd, start + j);
        rows[j] = gate_row_from_local(p.local_rows[r], mp);
        g[j] = GateGradRow<float>{b.ws.da_row[r], b.ws.dmf[r], b.ws.dlogw[r], b.ws.dlogd_col[r], b.ws.dloge[r]};
      }
      float inner = 0.0f;
      for (int cb = 0; cb < b.col_blocks; ++cb) inner += b.inner_part[kh * b.col_blocks + cb];
      const float dlogw_last = state_decay_weight<float>(mp, rows[len - 1], mn) * inner;
      b.ws.dlogw_last[kh] = dlogw_last;
      const float add = chunk_gate_grad_local<float>(len, rows, g, dlogw_last, di, dlf, scratch);
      origin_last = rows[len - 1].origin;
      mine = Map{add, origin_last < 0};
      b.ws.dmp_local[kh] = add;
      b.ws.dmp_pass[kh] = origin_last < 0 ? 1 : 0;
    }
    // inclusive scan in group order: position t after the positions before it (later chunks)
    sAdd[tid] = mine.add;
    sPass[tid] = mine.pass ? 1 : 0;
    __syncthreads();
    for (int off = 1; off < kFusedScanThreads; off <<= 1) {
      Map m{sAdd[tid], sPass[tid] != 0};
      if (tid >= off) m = Map::compose(m, Map{sAdd[tid - off], sPass[tid - off] != 0});
      __syncthreads();
      sAdd[tid] = m.add;
      sPass[tid] = m.pass ? 1 : 0;
      __syncthreads();
    }
    const Map excl = tid == 0 ? Map::identity() : Map{sAdd[tid - 1], sPass[tid - 1] != 0};
    if (i >= 0) {
      const int64_t kh = c * p.NH + hd;
      const float dmn = Map::compose(excl, carry).apply(dm_last);
      b.ws.dm_next[kh] = dmn;
      for (int j = 0; j < len; ++j) {
        const int64_t r = p.row(u, hd, start + j);
        b.digate[r] = store_elem<T>(digate_final(di[j], j, origin_last, dmn));
        const float f = load_acc<float>(p.fgate[r]);
        b.dfgate[r] = store_elem<T>(dlf_final(dlf[j], j, origin_last, dmn) * math::logsigmoid_grad(f));
      }
    }
    carry = Map::compose(Map{sAdd[kFusedScanThreads - 1], sPass[kFusedScanThreads - 1] != 0}, carry);
    __syncthreads();
  }
  if (tid == 0 && b.dm_init) b.dm_init[slot] = carry.apply(dm_last);
}

// ---- the launcher ----------------------------------------------------------------------------

/// B2 and B4's pipeline depth at this chunk size (pick_stages over both kernels).
template <class T, int kParts>
Status backward_slice_stages(int chunk, int requested, int* stages) {
  return pick_stages(requested, (chunk / 16) * 32, fused_rows_mma_smem<T, kParts>(chunk, 1),
                     fused_rows_mma_smem<T, kParts>(chunk, 2), stages, fused_rows_mma_kernel<T, kParts>,
                     fused_columns_mma_kernel<T, kParts>);
}

/// Dynamic shared memory of every kernel of the backward for this call (F1, B2, B3, B4),
/// set before anything is launched: a size the device cannot give is Status::unsupported
/// with nothing written (the same caveat as prepare_fused_smem for concurrent host threads).
/// `stages`: B2 and B4's (backward_slice_stages; unused for float). *state_whole, *grad_whole:
/// F1's and B3's staging (whole chunks or 16-row blocks: prepare_state_smem's choice, for each
/// kernel; state_requested as there).
/// Whether B2 keeps all of C_c converted (c_kept: bf16 with one part, never for half or
/// three parts whatever is requested; requested 0 the default: where it fits the opt-in shared
/// memory and costs no resident blocks, pick_stages' rule, the occupancy read on the kept
/// instance at both sizes; 1 never; 2 where it fits), and B2's shared memory raised to what
/// it then takes.
template <class T, int kParts>
Status prepare_rows_smem(int64_t dqk, int64_t dv, int chunk, int stages, int requested, bool* kept) {
  *kept = false;
  const std::size_t slice = fused_rows_mma_smem<T, kParts>(chunk, stages);
  if constexpr (kParts == 1 && !OperandFormat<T>::kNarrowRange) {
    int depth = 1;
    MOXE_RETURN_IF_ERROR(pick_stages(requested, (chunk / 16) * 32, slice,
                                     fused_rows_kept_smem<T, kParts>(chunk, stages, dqk, dv), &depth,
                                     fused_rows_mma_kernel<T, kParts, true>));
    *kept = depth == 2;
    if (*kept)
      return set_max_dynamic_smem(fused_rows_mma_kernel<T, kParts, true>,
                                  fused_rows_kept_smem<T, kParts>(chunk, stages, dqk, dv));
  } else {
    (void)dqk, (void)dv, (void)requested;
  }
  return set_max_dynamic_smem(fused_rows_mma_kernel<T, kParts>, slice);
}

template <class T, int kParts, class F>
Status prepare_backward_smem(int64_t dqk, int64_t dv, int chunk, int stages, int state_requested, int keep_requested,
                             bool* state_whole, bool* grad_whole, bool* c_kept) {
  MOXE_RETURN_IF_ERROR((prepare_state_smem<T, kParts>(dqk, chunk, state_requested, state_whole)));
  *grad_whole = false;
  *c_kept = false;
  const std::size_t smem = fused_rows_smem(chunk);
  if constexpr (kFusedMma<T>) {
    const std::size_t smem24 = fused_rows_mma_smem<T, kParts>(chunk, stages);
    MOXE_RETURN_IF_ERROR((prepare_rows_smem<T, kParts>(dqk, dv, chunk, stages, keep_requested, c_kept)));
    // B3: whole chunks as F1's (pick_state_staging), for the instance DQK selects
    auto b3 = dqk > 16 * kFusedStateWarps ? fused_state_grad_mma_kernel<T, 2, kParts>
                                          : fused_state_grad_mma_kernel<T, 1, kParts>;
    MOXE_RETURN_IF_ERROR(pick_state_staging<T>(b3, dqk, chunk, state_requested, grad_whole));
    return set_max_dynamic_smem(fused_columns_mma_kernel<T, kParts>, smem24);
  } else {
    (void)dv, (void)keep_requested;
    MOXE_RETURN_IF_ERROR(set_max_dynamic_smem(fused_rows_kernel<T, F>, smem));
    return set_max_dynamic_smem(fused_columns_kernel<T, F>, smem);
  }
}

template <class T, int kParts, class F>
Status launch_fused_backward_pass(const FusedBackwardArgs<T>& b, const int64_t* offsets, bool taped,
                                  cudaStream_t stream) {
  const FusedArgs<T>& a = b.f;
  const int64_t slots = a.units * a.NH;
  // F0, F1: the gate scan and the checkpoints, as the forward runs them (every kernel's
  // shared memory was set beforehand: prepare_backward_smem), unless the forward's tape
  // holds them
  if (!taped) MOXE_RETURN_IF_ERROR((launch_gate_scan_and_states<T, kParts>(a, offsets, stream)));
  const std::size_t smem1 = fused_state_staging_smem<T>(a.DQK, a.L, b.grad_whole);
  const dim3 grid1(static_cast<unsigned>(slots), static_cast<unsigned>(b.col_blocks));  // B3
  const std::size_t smem = fused_rows_smem(a.L);
  const unsigned chunk_heads = static_cast<unsigned>(a.chunks * a.NH);
  if constexpr (kFusedMma<T>) {
    auto b2 = fused_rows_mma_kernel<T, kParts>;  // (both instances take the same arguments)
    std::size_t smem2 = fused_rows_mma_smem<T, kParts>(a.L, b.stages);
    if constexpr (kParts == 1 && !OperandFormat<T>::kNarrowRange) {
      if (b.c_kept) {
        b2 = fused_rows_mma_kernel<T, kParts, true>;
        smem2 = fused_rows_kept_smem<T, kParts>(a.L, b.stages, a.DQK, a.DV);
      }
    }
    MOXE_RETURN_IF_ERROR(launch_kernel(b2, chunk_heads, (a.L / 16) * 32, smem2, stream, b));
  } else {
    MOXE_RETURN_IF_ERROR(launch_kernel(fused_rows_kernel<T, F>, chunk_heads, kFusedRowThreads, smem, stream, b));
  }
  if constexpr (kFusedMma<T>) {
    if (a.DQK > 16 * kFusedStateWarps) {
      MOXE_RETURN_IF_ERROR(
          launch_kernel(fused_state_grad_mma_kernel<T, 2, kParts>, grid1, kFusedStateThreads, smem1, stream, b));
    } else {
      MOXE_RETURN_IF_ERROR(
          launch_kernel(fused_state_grad_mma_kernel<T, 1, kParts>, grid1, kFusedStateThreads, smem1, stream, b));
    }
  } else {
    MOXE_RETURN_IF_ERROR(launch_kernel(fused_state_grad_kernel<T, F>, grid1, kFusedGradThreads, 0, stream, b));
  }
  if constexpr (kFusedMma<T>) {
    MOXE_RETURN_IF_ERROR(launch_kernel(fused_columns_mma_kernel<T, kParts>, chunk_heads, (a.L / 16) * 32,
                                       fused_rows_mma_smem<T, kParts>(a.L, b.stages), stream, b));
  } else {
    MOXE_RETURN_IF_ERROR(launch_kernel(fused_columns_kernel<T, F>, chunk_heads, kFusedRowThreads, smem, stream, b));
  }
  MOXE_RETURN_IF_ERROR(
      launch_kernel(fused_gates_kernel<T>, static_cast<unsigned>(slots), kFusedScanThreads, 0, stream, b));
  return check_launch(stream);
}

/// The fused backward: dq, dk, dv, digate, dfgate and (when given) dc_init, dn_init, dm_init.
/// T float, __half or __nv_bfloat16; chunk_size 16..128 (multiples of 16); DQK, DV multiples
/// of 16 up to 256; batch_per_pass as the forward. fwd.h is not read. bf16 / half need sm_80.
/// stages: B2 and B4's pipeline depth (backward_slice_stages: 0 the default choice; 1 or 2
/// forced where they fit, for the tests that compare them); *stages_used, when given, gets the
/// depth that ran (1 for float). state: F1's and B3's staging (0 the default, 1 16-row
/// blocks, 2 whole chunks where they fit: prepare_state_smem); *state_whole_used, when given,
/// says whether both ran in whole chunks (float: F1; its B3 stages nothing). With
/// ForwardParams::tape (written by fused_chunkwise_forward with the same params) F0 and F1
/// are not run: the tape's checkpoints are read, the same bits; a short tape is
/// Status::workspace_too_small, nothing launched.
template <class T>
Status fused_chunkwise_backward(const BackwardParams<T, float>& p, void* workspace, std::size_t workspace_bytes,
                                cudaStream_t stream, int stages_requested = 0, int* stages_used = nullptr,
                                int state_requested = 0, bool* state_whole_used = nullptr, int keep_requested = 0,
                                bool* c_kept_used = nullptr) {
  static_assert(std::is_same_v<T, float> || mma::is_mma_element_v<T>,
                "fused chunkwise: T must be float, __half or __nv_bfloat16");
  MOXE_RETURN_IF_ERROR(validate(p));
  MOXE_RETURN_IF_ERROR(validate_chunkwise(p.fwd, /*need_h=*/false));
  if (!fused_head_dim_supported(p.fwd.dims.dqk) || !fused_head_dim_supported(p.fwd.dims.dv))
    return Status::unsupported;
  if (workspace_bytes < fused_backward_workspace_size(p)) return Status::workspace_too_small;
  if (p.fwd.tape != nullptr && p.fwd.tape_bytes < fused_tape_size(p.fwd)) return Status::workspace_too_small;
  if (chunk_bound(pass_dims(p.fwd), p.fwd.num_segments, p.fwd.chunk_size) * p.fwd.dims.heads > int64_t(0x7fffffff))
    return Status::unsupported;  // B2 / B4: one block per (chunk, head) in one grid dimension
  if constexpr (kFusedMma<T>) {
    int device = 0;
    MOXE_RETURN_IF_ERROR(from_cuda(cudaGetDevice(&device)));
    MOXE_RETURN_IF_ERROR(mma::sm80_supported(device));
  }
  int stages = 1;
  bool whole = false, grad_whole = false, c_kept = false;
  const int64_t dqk = p.fwd.dims.dqk, dv = p.fwd.dims.dv;
  const int chunk = p.fwd.chunk_size;
  if constexpr (kFusedMma<T>) {
    if (p.fwd.precision == Precision::accurate) {
      MOXE_RETURN_IF_ERROR((backward_slice_stages<T, 3>(chunk, stages_requested, &stages)));
      MOXE_RETURN_IF_ERROR((prepare_backward_smem<T, 3, T>(dqk, dv, chunk, stages, state_requested, keep_requested,
                                                           &whole, &grad_whole, &c_kept)));
    } else {
      MOXE_RETURN_IF_ERROR((backward_slice_stages<T, 1>(chunk, stages_requested, &stages)));
      MOXE_RETURN_IF_ERROR((prepare_backward_smem<T, 1, T>(dqk, dv, chunk, stages, state_requested, keep_requested,
                                                           &whole, &grad_whole, &c_kept)));
    }
  } else {
    MOXE_RETURN_IF_ERROR((prepare_backward_smem<T, 1, float>(dqk, dv, chunk, stages, state_requested, keep_requested,
                                                             &whole, &grad_whole, &c_kept)));
  }
  if (c_kept_used) *c_kept_used = c_kept;
  if (stages_used) *stages_used = stages;
  // (with a tape F1 does not run: B3's staging alone)
  if (state_whole_used) *state_whole_used = (whole || p.fwd.tape != nullptr) && (grad_whole || !kFusedMma<T>);
  return for_each_batch_pass(p.fwd, [&](int64_t b0, int64_t nb) {
    const BackwardParams<T, float> sb = batch_slice(p, b0, nb);
    const ForwardParams<T, float>& s = sb.fwd;
    const bool taped = p.fwd.tape != nullptr;
    WorkspaceCarver carver(workspace, workspace_bytes);
    FusedBackwardWorkspace w = carve_fused_backward_workspace(carver, s.dims, s.num_segments, s.chunk_size, taped);
    if (!carver.fits()) return Status::workspace_too_small;
    if (taped) {  // the forward's gate scan, table and checkpoints, where it wrote them
      bool fits = false;
      const FusedForwardWorkspace t = carve_tape_pass(p.fwd, s, b0, &fits);
      if (!fits) return Status::workspace_too_small;
      w.ws.table = t.ws.table;
      w.ws.m_prev = t.ws.m_prev;
      w.ws.m_final = t.ws.m_final;
      w.ws.state = t.ws.state;
      w.local_rows = t.local_rows;
    }
    FusedBackwardArgs<T> b{};
    FusedArgs<T>& a = b.f;
    a.q = s.q;
    a.k = s.k;
    a.v = s.v;
    a.igate = s.igate;
    a.fgate = s.fgate;
    a.c_init = s.c_init;
    a.n_init = s.n_init;
    a.m_init = s.m_init;
    a.h = nullptr;
    a.c_last = nullptr;
    a.n_last = nullptr;
    a.m_last = nullptr;
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
    a.stages = 1;  // (F2's: not run by the backward)
    a.state_whole = whole;
    a.table = w.ws.table;
    a.m_prev = w.ws.m_prev;
    a.m_final = w.ws.m_final;
    a.state = w.ws.state;
    a.local_rows = w.local_rows;
    b.dh = sb.dh;
    b.dc_last = sb.dc_last;
    b.dn_last = sb.dn_last;
    b.dm_last = sb.dm_last;
    b.dq = sb.dq;
    b.dk = sb.dk;
    b.dv = sb.dv;
    b.digate = sb.digate;
    b.dfgate = sb.dfgate;
    b.dc_init = sb.dc_init;
    b.dn_init = sb.dn_init;
    b.dm_init = sb.dm_init;
    b.col_blocks = static_cast<int>(ceil_div<int64_t>(s.dims.dv, kFusedColumns));
    b.stages = stages;
    b.c_kept = c_kept;
    b.grad_whole = grad_whole;
    b.ws = w.ws;
    b.inner_part = w.inner_part;
    b.aligned = al(s.q) && al(sb.dh);
    b.form = product_forms<T, float>(s.precision, /*allow_tf32=*/false).intermediate;
    if constexpr (kFusedMma<T>) {
      if (s.precision == Precision::accurate)
        return launch_fused_backward_pass<T, 3, T>(b, s.segment_offsets, taped, stream);
      return launch_fused_backward_pass<T, 1, T>(b, s.segment_offsets, taped, stream);
    } else {
      return launch_fused_backward_pass<T, 1, float>(b, s.segment_offsets, taped, stream);
    }
  });
}

}  // namespace moxe::mlstm::detail
