// moxe::slstm::detail: how the device kernels cut the problem, as plain host/device
// functions so the CPU tests can check (and emulate) the decomposition without a GPU.
//
// Persistent recurrent kernels: one "group" per (batch tile of kBatchTile rows, head);
// each group is `splits` blocks, block s owning the gate units [s*U, (s+1)*U) of all four
// gates. The forward block keeps r[h][g][j][:] for its units in shared memory ([4U][DH]);
// the backward block keeps r[h][:][:][d] for its units d ([U][4DH], the transposed slice).
// Blocks of one group exchange y_t (forward) or dgates_t (backward) through global
// memory with a grid barrier per step when splits > 1 (cooperative launch).
#pragma once

#include <cstddef>
#include <cstdint>

#include "moxe/core/config.hpp"

namespace moxe::slstm::detail {

inline constexpr int kBatchTile = 16;  // batch rows per group: the WMMA M dimension
inline constexpr int kThreads = 256;   // threads per recurrent block
inline constexpr int kWarps = kThreads / 32;
inline constexpr int kMaxUnits = 128;  // units per block at most
inline constexpr int kMinHeadDim = 16, kMaxHeadDim = 256, kHeadDimStep = 16;
inline constexpr int kMaxHeads = 16;
inline constexpr std::size_t kSmemAlign = 128;

// ---- index maps of the public layouts ---------------------------------------------------
/// wx, dwx and the gate tape: [S, B, 4, NH, DH]
MOXE_HD inline int64_t gate_index(int64_t t, int64_t b, int g, int64_t h, int64_t j, int64_t B,
                                  int64_t NH, int64_t DH) {
  return (((t * B + b) * 4 + g) * NH + h) * DH + j;
}
/// y and the state tapes: [S, B, NH, DH]; states: t = 0 gives [B, NH, DH]
MOXE_HD inline int64_t unit_index(int64_t t, int64_t b, int64_t h, int64_t j, int64_t B,
                                  int64_t NH, int64_t DH) {
  return ((t * B + b) * NH + h) * DH + j;
}
/// r, dr: [NH, 4, DH, DH]
MOXE_HD inline int64_t r_index(int64_t h, int g, int64_t j, int64_t d, int64_t DH) {
  return ((h * 4 + g) * DH + j) * DH + d;
}
/// bias, dbias: [4, NH, DH]
MOXE_HD inline int64_t bias_index(int g, int64_t h, int64_t j, int64_t NH, int64_t DH) {
  return (g * NH + h) * DH + j;
}

// ---- shared memory layouts ------------------------------------------------------------
MOXE_HD constexpr std::size_t align_smem(std::size_t x) {
  return (x + kSmemAlign - 1) / kSmemAlign * kSmemAlign;
}

/// Row padding (elements) of the operand tiles: 8 keeps 16-byte rows for WMMA (16-bit
/// types); 1 makes the fp32 column walk bank-conflict free.
MOXE_HD constexpr int operand_pad(bool tensor_cores) { return tensor_cores ? 8 : 1; }

/// Forward block: r slice [4U][ldr] (row n = g*U + jl), y_{t-1} tile [16][ldy], gates
/// [16][ldg] float.
struct ForwardSmem {
  int ldr, ldy, ldg;
  std::size_t r_off, y_off, gates_off, bytes;
};
MOXE_HD inline ForwardSmem forward_smem(int64_t dh, int units, int elem_bytes, bool tensor_cores) {
  ForwardSmem s{};
  s.ldr = static_cast<int>(dh) + operand_pad(tensor_cores);
  s.ldy = s.ldr;
  s.ldg = 4 * units + 4;
  s.r_off = 0;
  s.y_off = align_smem(s.r_off + std::size_t(4) * units * s.ldr * elem_bytes);
  s.gates_off = align_smem(s.y_off + std::size_t(kBatchTile) * s.ldy * elem_bytes);
  s.bytes = align_smem(s.gates_off + std::size_t(kBatchTile) * s.ldg * sizeof(float));
  return s;
}

/// Backward block: transposed r slice [U][ldk] (row dl, column n = g*DH + j), dgates tile
/// [16][ldk], recurrent dy [16][ldo] float.
struct BackwardSmem {
  int ldk, ldo;
  std::size_t rt_off, dg_off, out_off, bytes;
};
MOXE_HD inline BackwardSmem backward_smem(int64_t dh, int units, int elem_bytes, bool tensor_cores) {
  BackwardSmem s{};
  s.ldk = static_cast<int>(4 * dh) + operand_pad(tensor_cores);
  s.ldo = units + 4;
  s.rt_off = 0;
  s.dg_off = align_smem(s.rt_off + std::size_t(units) * s.ldk * elem_bytes);
  s.out_off = align_smem(s.dg_off + std::size_t(kBatchTile) * s.ldk * elem_bytes);
  s.bytes = align_smem(s.out_off + std::size_t(kBatchTile) * s.ldo * sizeof(float));
  return s;
}

/// Whether the device kernels take these sizes at all (heads, head_dim).
inline bool device_supports(int64_t heads, int64_t head_dim) {
  return heads >= 1 && heads <= kMaxHeads && head_dim >= kMinHeadDim && head_dim <= kMaxHeadDim &&
         head_dim % kHeadDimStep == 0;
}

/// Units per block: `requested` if valid, else (requested == 0) the largest multiple of 16
/// dividing DH, at most kMaxUnits, whose shared memory fits `smem_budget`. 0: none fits.
inline int choose_units(int64_t dh, int elem_bytes, bool tensor_cores, bool backward,
                        std::size_t smem_budget, int requested) {
  auto fits = [&](int u) {
    const std::size_t bytes = backward ? backward_smem(dh, u, elem_bytes, tensor_cores).bytes
                                       : forward_smem(dh, u, elem_bytes, tensor_cores).bytes;
    return bytes <= smem_budget;
  };
  if (requested != 0) {
    const bool ok = requested > 0 && requested % 16 == 0 && requested <= kMaxUnits &&
                    dh % requested == 0 && fits(requested);
    return ok ? requested : 0;
  }
  for (int u = static_cast<int>(dh < kMaxUnits ? dh : kMaxUnits); u >= 16; u -= 16) {
    if (dh % u == 0 && fits(u)) return u;
  }
  return 0;
}

/// Whether the byte ranges [a, a + a_bytes) and [b, b + b_bytes) overlap (null: never).
/// The forward uses it to detect an output y that overlaps y_init (an in-place decoding
/// step with y_out == y in float): the blocks of a group then need a barrier between
/// reading y_init and writing y.
inline bool ranges_overlap(const void* a, std::size_t a_bytes, const void* b, std::size_t b_bytes) {
  if (a == nullptr || b == nullptr || a_bytes == 0 || b_bytes == 0) return false;
  const auto a0 = reinterpret_cast<std::uintptr_t>(a), b0 = reinterpret_cast<std::uintptr_t>(b);
  return a0 < b0 + b_bytes && b0 < a0 + a_bytes;
}

/// Number of (batch tile, head) groups.
MOXE_HD inline int64_t num_groups(int64_t batch, int64_t heads) {
  return (batch + kBatchTile - 1) / kBatchTile * heads;
}

/// What block `split` of `group` owns: head h, batch rows [b0, b0 + kBatchTile) and the
/// units [j0, j0 + units) of every gate.
struct BlockTile {
  int64_t h, b0, j0;
};
MOXE_HD inline BlockTile block_tile(int64_t group, int64_t split, int units, int64_t heads) {
  return {group % heads, (group / heads) * kBatchTile, split * units};
}

// ---- the cluster split (sm_90, ForwardParams::cluster_size) ---------------------------
// A group's `cluster_size` CTAs form one thread-block cluster: CTA `rank` owns the units
// [rank*U, (rank+1)*U) of every gate (U = DH / cluster_size), keeps their r rows in its
// shared memory as a block of the split path does, and publishes its y_t slice [16][U] in
// its own shared memory; after one cluster barrier per step every CTA copies the whole
// y_t of the head from the slices of its peers (distributed shared memory). The backward
// does the same with dgates_t ([16][4U] per CTA, the transposed r slice of its units).
inline constexpr int kMaxClusterSize = 8;  // the portable cluster size

/// Units per CTA of a head of `dh` units split over a cluster of `cluster_size` CTAs: DH /
/// cluster_size when cluster_size is 2, 4 or 8 and that is a multiple of 16 of at most
/// kMaxUnits (the units-per-block rules of choose_units); 0 otherwise.
MOXE_HD inline int cluster_units(int64_t dh, int cluster_size) {
  if (cluster_size != 2 && cluster_size != 4 && cluster_size != kMaxClusterSize) return 0;
  if (dh <= 0 || dh % cluster_size != 0) return 0;
  const int64_t u = dh / cluster_size;
  return u % 16 == 0 && u <= kMaxUnits ? static_cast<int>(u) : 0;
}

/// CTA `block` (blockIdx.x) of a cluster launch, whose grid.x is groups * cluster_size and
/// whose clusters are (cluster_size, 1, 1): the group (relative to the launch's first) and
/// the CTA's rank in its cluster, which is also its slice of the units (block_tile's split).
/// The hardware numbers the CTAs of a 1-D cluster by blockIdx.x % cluster_size, so `rank`
/// is the rank the distributed shared memory is addressed by.
struct ClusterBlock {
  int64_t group;
  int rank;
};
MOXE_HD inline ClusterBlock cluster_block(int64_t block, int cluster_size) {
  return {block / cluster_size, static_cast<int>(block % cluster_size)};
}

/// log2 of a cluster size of 2, 4 or 8 (the kernels shift by it instead of dividing).
MOXE_HD constexpr unsigned cluster_log2(int cluster_size) {
  return cluster_size == 2 ? 1u : cluster_size == 4 ? 2u : 3u;
}

/// The per-step exchange: chunk `c` (16 bytes, `elems` = 16 / sizeof(T) elements) of the
/// head's tile [rows][gates * DH] (the forward's y_t: gates = 1; the backward's dgates_t:
/// gates = 4, column g*DH + j), DH = units << log2_cs. The chunks are ordered by row, then
/// by CTA, then along the CTA's slice row [gates * units] (column g*units + jl), so that
/// consecutive threads read consecutive 16 bytes of one peer and every division is by a
/// compile-time constant or a shift. Gives the chunk's batch row, the head's column it
/// starts at, and where it lies: CTA `rank`'s slice, column `slice_col`. U is a multiple of
/// 16 (>= elems), so a chunk never straddles two gates.
struct ExchangeChunk {
  int row, head_col, rank, slice_col;
};
MOXE_HD inline ExchangeChunk exchange_chunk(unsigned c, unsigned log2_cs, unsigned units, unsigned elems,
                                            unsigned gates = 1) {
  const unsigned per_slice_row = gates * units / elems;
  const unsigned q = c / per_slice_row, slice_col = (c % per_slice_row) * elems;
  const unsigned rank = q & ((1u << log2_cs) - 1u), row = q >> log2_cs;
  const unsigned g = slice_col / units, jl = slice_col % units;
  return {static_cast<int>(row), static_cast<int>(((g << log2_cs) + rank) * units + jl), static_cast<int>(rank),
          static_cast<int>(slice_col)};
}

/// The cluster CTA's shared memory: the split block's (forward_smem: r slice, y tile,
/// gates), then its published y slices, two of them ([2][16][U] of T: step t's in t % 2).
struct ForwardClusterSmem {
  ForwardSmem block;
  std::size_t x_off, bytes;
};
MOXE_HD inline ForwardClusterSmem forward_cluster_smem(int64_t dh, int units, int elem_bytes, bool tensor_cores) {
  ForwardClusterSmem s{};
  s.block = forward_smem(dh, units, elem_bytes, tensor_cores);
  s.x_off = s.block.bytes;
  s.bytes = align_smem(s.x_off + std::size_t(2) * kBatchTile * units * elem_bytes);
  return s;
}

/// The backward's cluster CTA: the split block's (backward_smem), then its published
/// dgates slices, two of them ([2][16][4U] of T, column g*U + jl: step t's in t % 2).
struct BackwardClusterSmem {
  BackwardSmem block;
  std::size_t x_off, bytes;
};
MOXE_HD inline BackwardClusterSmem backward_cluster_smem(int64_t dh, int units, int elem_bytes, bool tensor_cores) {
  BackwardClusterSmem s{};
  s.block = backward_smem(dh, units, elem_bytes, tensor_cores);
  s.x_off = s.block.bytes;
  s.bytes = align_smem(s.x_off + std::size_t(2) * kBatchTile * 4 * units * elem_bytes);
  return s;
}

// ---- the weight-gradient reduction ----------------------------------------------------
// dr[h][m][d] = sum_k dgates[k][m] * y_prev[k][d] over k = t*B + b (m = g*DH + j), a GEMM
// per head with K = S*B, tiled kDrTile x kDrTile and split along K into fixed chunks whose
// float partials a second kernel sums in chunk order: deterministic, no atomics.
inline constexpr int kDrTile = 64, kDrTileK = 16;
inline constexpr int64_t kDrTargetBlocks = 256;

struct DrSplit {
  int64_t chunks, chunk_len;  // K = [c*chunk_len, min(K, (c+1)*chunk_len))
};
MOXE_HD inline DrSplit dr_split(int64_t seq_len, int64_t batch, int64_t heads, int64_t dh) {
  const int64_t k = seq_len * batch;
  const int64_t tiles = heads * ((4 * dh + kDrTile - 1) / kDrTile) * ((dh + kDrTile - 1) / kDrTile);
  int64_t chunks = (kDrTargetBlocks + tiles - 1) / tiles;
  const int64_t max_chunks = (k + 255) / 256;  // at least 256 rows of K per chunk
  if (chunks > max_chunks) chunks = max_chunks;
  if (chunks < 1) chunks = 1;
  int64_t len = (k + chunks - 1) / chunks;
  len = (len + kDrTileK - 1) / kDrTileK * kDrTileK;
  return {(k + len - 1) / len, len};
}

}  // namespace moxe::slstm::detail
