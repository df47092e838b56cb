// moxe::slstm::detail: the device kernels of the sLSTM sequence forward and backward.
//
//   forward_kernel   persistent, walks t = 0..S-1; block (group, split) keeps the r rows
//                    of its units on chip and updates their states in registers; optional
//                    tape (raw gates, states) for the backward
//   backward_kernel  persistent, walks t = S-1..0 with the transposed r slice on chip;
//                    reads the tape (raw gates, states), writes dgates (float, for dr and
//                    dbias) and dwx; dgates may be the gate tape itself (the launcher's own
//                    replay: each raw gate is read before its dgate replaces it)
//   dr_partial_kernel / dbias_rows_kernel / sum_partials_kernel   deterministic reductions
//
//   forward_cluster_kernel / backward_cluster_kernel  (sm_90) the recurrent kernels with a
//                    group's blocks as one thread-block cluster: y_t / dgates_t exchanged
//                    through distributed shared memory, one cluster barrier per step
//                    (ForwardParams::cluster_size)
//
// The two recurrent kernels take the units per block as a template parameter kU;
// forward_kernel_for / backward_kernel_for and their cluster_ twins pick the instance at
// launch. Blocks of one group (splits > 1) exchange y_t / dgates_t through global memory
// and a cooperative-groups grid barrier; with one block per group a __syncthreads suffices.
#pragma once

#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include "moxe/core/config.hpp"
#include "moxe/core/numeric.cuh"
#include "moxe/slstm/detail/cell.hpp"
#include "moxe/slstm/detail/plan.hpp"
#include "moxe/slstm/detail/recurrent.cuh"

namespace moxe::slstm::detail {

template <class T>
struct ForwardArgs {
  int64_t S, B, NH, DH;
  int splits;           // blocks per group (DH / units; the units are the kernel's kU)
  int64_t group_begin;  // first group of this launch
  bool init_barrier;    // y overlaps y_init: a group barrier after reading y_init (splits > 1)
  const T* wx;
  const T* r;
  const T* bias;
  const float *y_init, *c_init, *n_init, *m_init;  // all or none
  T* y;                                            // [S, B, NH, DH]: also the exchange buffer
  float *y_last, *c_last, *n_last, *m_last;        // all or none
  float* tape_gates;                               // [S, B, 4, NH, DH] raw gates, or null
  float *tape_c, *tape_n, *tape_m;                 // [S, B, NH, DH], with tape_gates
};

template <class T>
struct BackwardArgs {
  int64_t S, B, NH, DH;
  int splits;
  int64_t group_begin;
  const T* r;
  const T* dy;
  const float *dy_last, *dc_last, *dn_last, *dm_last;  // all or none
  const float *c_init, *n_init, *m_init;               // all or none
  const float* tape_gates;                             // raw gates [S, B, 4, NH, DH]
  const float *tape_c, *tape_n, *tape_m;               // states [S, B, NH, DH]
  float* dgates;                                       // out [S, B, 4, NH, DH]; may be tape_gates
  T* dwx;
  float *dy_init, *dc_init, *dn_init, *dm_init;  // all or none
};

/// End of a time step: every block of the group has published its part of the step.
MOXE_DEVICE MOXE_FORCEINLINE void step_barrier(int splits) {
  if (splits > 1) {
    cooperative_groups::this_grid().sync();
  } else {
    __syncthreads();
  }
}

// ---- the cluster exchange (sm_90; compiled only there, a trap elsewhere) ----------------

/// The cluster barrier: every thread of every CTA of the cluster arrives (release: its
/// earlier shared-memory writes, and its reads of the peers' shared memory, are ordered
/// before it) and waits for all (acquire). Also a barrier of the CTA's own threads.
MOXE_DEVICE MOXE_FORCEINLINE void cluster_barrier() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.arrive.release.aligned;\n" ::: "memory");
  asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory");
#else
  __trap();
#endif
}

/// 16 bytes at shared-memory offset `addr` (a shared::cta address of this CTA) in the
/// shared memory of the cluster's CTA `rank` (mapa + ld.shared::cluster).
MOXE_DEVICE MOXE_FORCEINLINE uint4 load_peer_16(uint32_t addr, uint32_t rank) {
  uint4 v{};
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  uint32_t remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(remote) : "r"(addr), "r"(rank));
  asm volatile("ld.shared::cluster.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "r"(remote)
               : "memory");
#else
  (void)addr;
  (void)rank;
  __trap();
#endif
  return v;
}

/// tile[row][col] = the head's tile (forward: y_t, kGates = 1; backward: dgates_t, kGates =
/// 4, column g*DH + j) for rows < `rows`, gathered from the published slices of the
/// cluster's CTAs: CTA q's slice [kBatchTile][kGates*kU] of T lies at shared::cta offset
/// `slices` in q's shared memory (exchange_chunk: which CTA and column each 16-byte chunk
/// comes from). Called by all threads; no barrier inside.
template <class T, int kU, int kGates>
MOXE_DEVICE MOXE_FORCEINLINE void gather_cluster_tile(uint32_t slices, T* tile, int ld, unsigned log2_cs, int rows) {
  constexpr unsigned kElems = 16 / sizeof(T);
  const unsigned chunks = (static_cast<unsigned>(rows) << log2_cs) * (kGates * kU / kElems);
  for (unsigned c = threadIdx.x; c < chunks; c += kThreads) {
    const ExchangeChunk e = exchange_chunk(c, log2_cs, kU, kElems, kGates);
    const uint4 v = load_peer_16(slices + static_cast<uint32_t>((e.row * kGates * kU + e.slice_col) * sizeof(T)),
                                 static_cast<uint32_t>(e.rank));
    T* dst = tile + e.row * ld + e.head_col;
    if constexpr (sizeof(T) == 2) {  // rows of ld = kGates*DH + 8 16-bit elements: 16-byte aligned
      *reinterpret_cast<uint4*>(dst) = v;
    } else {  // float rows of ld = kGates*DH + 1: element by element
      const float f[4] = {__uint_as_float(v.x), __uint_as_float(v.y), __uint_as_float(v.z), __uint_as_float(v.w)};
      MOXE_PRAGMA_UNROLL
      for (int i = 0; i < 4; ++i) dst[i] = f[i];
    }
  }
}

/// End of a time step (or the y_init barrier) of the group: the cluster barrier in the
/// cluster kernel, else step_barrier.
template <bool kCluster>
MOXE_DEVICE MOXE_FORCEINLINE void group_barrier(int splits) {
  if constexpr (kCluster) {
    cluster_barrier();
  } else {
    step_barrier(splits);
  }
}

/// (row, unit) pairs per thread in a block of kU units: pair k of thread tid is
/// p = tid + k*kThreads, row p / kU, unit p % kU. kU is a multiple of 16, so the
/// kBatchTile*kU pairs fill every thread's kPairs exactly.
template <int kU>
inline constexpr int kPairs = kBatchTile * kU / kThreads;

/// Threads per row when a block walks the [kBatchTile][..] operand tiles row by row.
inline constexpr int kRowThreads = kThreads / kBatchTile;

/// Where pair k of this thread sits, relative to row b0 and unit j0 of head h: within one
/// step of [S, B, 4, NH, DH] (gate 0; gate g adds g*H) and of [S, B, NH, DH], and its row
/// and unit in the block. None of it depends on the step.
struct PairOffsets {
  int gate, unit, bl, jl;
  bool valid;  // b0 + bl < B
};
template <int kU>
MOXE_DEVICE MOXE_FORCEINLINE PairOffsets pair_offsets(int tid, int k, int64_t b0, int64_t B, int H) {
  // unsigned arithmetic: with int the bf16 U = 128 forward took 30 more registers and the
  // backward spilled (nvcc 13, sm_90)
  const unsigned p = static_cast<unsigned>(tid) + static_cast<unsigned>(k) * kThreads;
  PairOffsets o;
  o.bl = static_cast<int>(p / kU);
  o.jl = static_cast<int>(p % kU);
  o.gate = o.bl * 4 * H + o.jl;
  o.unit = o.bl * H + o.jl;
  o.valid = b0 + o.bl < B;
  return o;
}

/// The forward of one block (forward_kernel) or one cluster CTA (forward_cluster_kernel,
/// kCluster: the block's group and split from its cluster, y_{t-1} gathered from the peers'
/// shared memory instead of reloaded from y, the cluster barrier instead of the grid's).
template <class T, int kU, bool kTape, bool kCluster>
MOXE_DEVICE MOXE_FORCEINLINE void forward_block(const ForwardArgs<T>& a) {
  constexpr bool kTC = uses_tensor_cores_v<T>;
  constexpr int P = kPairs<kU>;
  static_assert(kU % 16 == 0 && kU <= kMaxUnits && P * kThreads == kBatchTile * kU, "units per block");
  extern __shared__ __align__(128) unsigned char smem[];
  const int64_t DH = a.DH, NH = a.NH, B = a.B, S = a.S;
  const int dh = static_cast<int>(DH), H = static_cast<int>(NH * DH);  // H <= kMaxHeads * kMaxHeadDim
  const int64_t BH = B * H;
  const ForwardSmem L = forward_smem(DH, kU, static_cast<int>(sizeof(T)), kTC);
  T* r_s = reinterpret_cast<T*>(smem + L.r_off);
  T* y_s = reinterpret_cast<T*>(smem + L.y_off);
  float* g_s = reinterpret_cast<float*>(smem + L.gates_off);

  const int tid = static_cast<int>(threadIdx.x);
  BlockTile tile;
  // the cluster CTA's published y_t slices, [2][kBatchTile][kU] (step t's in t % 2)
  T* x_s = nullptr;
  if constexpr (kCluster) {
    const ClusterBlock cb = cluster_block(static_cast<int64_t>(blockIdx.x), a.splits);
    tile = block_tile(a.group_begin + cb.group, cb.rank, kU, NH);
    x_s = reinterpret_cast<T*>(smem + forward_cluster_smem(DH, kU, static_cast<int>(sizeof(T)), kTC).x_off);
  } else {
    tile = block_tile(a.group_begin + blockIdx.x, static_cast<int64_t>(blockIdx.y), kU, NH);
  }
  const int64_t h = tile.h, b0 = tile.b0, j0 = tile.j0;
  // rows of the tile within the batch (the rest are zero): at most 8 takes the narrow product
  const int tile_rows = B - b0 < kBatchTile ? static_cast<int>(B - b0) : kBatchTile;

  // r rows of this block's units: row n = g*kU + jl holds r[h][g][j0 + jl][:]
  for (int idx = tid; idx < 4 * kU * dh; idx += kThreads) {
    const int n = idx / dh, d = idx % dh;
    const int g = n / kU, jl = n % kU;
    r_s[static_cast<size_t>(n) * L.ldr + d] = a.r[r_index(h, g, j0 + jl, d, DH)];
  }

  // (row, unit) pairs of this thread (pair_offsets), at unit_base + t*BH in y and the state
  // tapes and gate_base + t*4BH in wx and the gate tape
  const int64_t unit_base = unit_index(0, b0, h, j0, B, NH, DH);
  const int64_t gate_base = gate_index(0, b0, 0, h, j0, B, NH, DH);
  PairOffsets po[P];
  float c[P], n[P], m[P], y_last[P];
  MOXE_PRAGMA_UNROLL
  for (int k = 0; k < P; ++k) {
    po[k] = pair_offsets<kU>(tid, k, b0, B, H);
    c[k] = n[k] = m[k] = y_last[k] = 0.f;
    if (po[k].valid && a.c_init != nullptr) {
      const int64_t u = unit_base + po[k].unit;
      c[k] = a.c_init[u];
      n[k] = a.n_init[u];
      m[k] = a.m_init[u];
      y_last[k] = a.y_init[u];
    }
  }
  // bias of the thread's units, read once; with kU dividing kThreads all pairs of a thread
  // share one unit
  constexpr int kBiasUnits = kThreads % kU == 0 ? 1 : P;
  float bias[kBiasUnits][4];
  MOXE_PRAGMA_UNROLL
  for (int k = 0; k < kBiasUnits; ++k) {
    MOXE_PRAGMA_UNROLL
    for (int g = 0; g < 4; ++g) bias[k][g] = to_float(a.bias[bias_index(g, h, j0 + po[k].jl, NH, DH)]);
  }

  // y_{t-1} tile: thread tid loads row tid / kRowThreads, columns tid % kRowThreads + i*kRowThreads
  const int ld_row = tid / kRowThreads, ld_col = tid % kRowThreads;
  const bool ld_valid = b0 + ld_row < B;
  const int64_t ld_base = unit_index(0, b0 + ld_row, h, 0, B, NH, DH);

  // step t's slices of wx, y and the tapes (at gate_base / unit_base), one step further
  // after each step
  const T* wx_t = a.wx + gate_base;
  T* y_t = a.y + unit_base;
  float *tape_gates_t = nullptr, *tape_c_t = nullptr, *tape_n_t = nullptr, *tape_m_t = nullptr;
  if constexpr (kTape) {
    tape_gates_t = a.tape_gates + gate_base;
    tape_c_t = a.tape_c + unit_base;
    tape_n_t = a.tape_n + unit_base;
    tape_m_t = a.tape_m + unit_base;
  }

  // With one block per group, y_t goes straight into y_s (the product of step t has read
  // y_s before the pointwise phase writes it); with several, every step reloads y_{t-1}
  // (from y, or in a cluster from the peers' slices).
  //
  // The cluster's exchange needs one barrier per step because the slices are double
  // buffered. Slice t % 2 of each CTA is written in step t (its own cell, before barrier t)
  // and read in step t + 1 (every CTA's gather, after barrier t and before barrier t + 1).
  // Its next write is in step t + 2, after barrier t + 1, which no CTA passes before all
  // have arrived, i.e. finished their reads of step t + 1. The writes of step t + 1 go to
  // the other slice, whose reads (step t) all came before barrier t. Barrier t's release /
  // acquire makes the writes of step t visible to the reads of step t + 1. The last reads
  // of a peer's shared memory (step S - 1) come before the last barrier, so no CTA exits
  // while a peer may still read its slices.
  const bool own_head = a.splits == 1;
  for (int64_t t = 0; t < S; ++t) {
    // y_{t-1} of the whole head for the tile's rows (zeros past the batch)
    if constexpr (kCluster) {
      if (t > 0) {
        const T* slices = x_s + ((t - 1) & 1) * kBatchTile * kU;
        gather_cluster_tile<T, kU, 1>(static_cast<uint32_t>(__cvta_generic_to_shared(slices)), y_s, L.ldy,
                                      cluster_log2(a.splits), tile_rows);
      }
    }
    if ((!kCluster || t == 0) && (t == 0 || !own_head)) {
      for (int d = ld_col; d < dh; d += kRowThreads) {
        T v = from_float<T>(0.f);
        if (ld_valid) {
          if (t == 0) {
            if (a.y_init) v = from_float<T>(a.y_init[ld_base + d]);
          } else {
            v = load_cg(a.y + ((t - 1) * BH + ld_base + d));
          }
        }
        y_s[ld_row * L.ldy + d] = v;
      }
    }
    // y may overlap y_init (an in-place step with y_out == y): every block of the group
    // has read y_init before any block writes y_0
    if (t == 0 && a.init_barrier) group_barrier<kCluster>(a.splits);
    // this step's input projections, fetched before the product to hide their latency
    float wx[P][4];
    MOXE_PRAGMA_UNROLL
    for (int k = 0; k < P; ++k) {
      MOXE_PRAGMA_UNROLL
      for (int g = 0; g < 4; ++g) wx[k][g] = po[k].valid ? to_float(wx_t[po[k].gate + g * H]) : 0.f;
    }
    __syncthreads();
    block_product<T, 4 * kU>(y_s, L.ldy, r_s, L.ldr, g_s, L.ldg, dh, tile_rows);
    __syncthreads();
    MOXE_PRAGMA_UNROLL
    for (int k = 0; k < P; ++k) {
      const int bl = po[k].bl, jl = po[k].jl;
      if (po[k].valid) {
        float raw[4];
        MOXE_PRAGMA_UNROLL
        for (int g = 0; g < 4; ++g)
          raw[g] = gate_preactivation(wx[k][g], g_s[bl * L.ldg + g * kU + jl], bias[kBiasUnits == 1 ? 0 : k][g]);
        const CellOut<float> o = cell_forward(GatesRaw<float>{raw[0], raw[1], raw[2], raw[3]}, c[k], n[k], m[k]);
        c[k] = o.c;
        n[k] = o.n;
        m[k] = o.m;
        y_last[k] = o.y;
        y_t[po[k].unit] = from_float<T>(o.y);
        if (own_head) y_s[bl * L.ldy + static_cast<int>(j0) + jl] = from_float<T>(o.y);
        if constexpr (kCluster) x_s[((t & 1) * kBatchTile + bl) * kU + jl] = from_float<T>(o.y);
        if constexpr (kTape) {
          MOXE_PRAGMA_UNROLL
          for (int g = 0; g < 4; ++g) tape_gates_t[po[k].gate + g * H] = raw[g];
          tape_c_t[po[k].unit] = o.c;
          tape_n_t[po[k].unit] = o.n;
          tape_m_t[po[k].unit] = o.m;
        }
      }
    }
    if (t + 1 < S) {
      wx_t += 4 * BH;
      y_t += BH;
      if constexpr (kTape) {
        tape_gates_t += 4 * BH;
        tape_c_t += BH;
        tape_n_t += BH;
        tape_m_t += BH;
      }
    }
    group_barrier<kCluster>(a.splits);
  }

  if (a.y_last != nullptr) {  // after the last barrier: y_init may alias y_last (decoding step)
    MOXE_PRAGMA_UNROLL
    for (int k = 0; k < P; ++k) {
      if (po[k].valid) {
        const int64_t u = unit_base + po[k].unit;
        a.y_last[u] = y_last[k];
        a.c_last[u] = c[k];
        a.n_last[u] = n[k];
        a.m_last[u] = m[k];
      }
    }
  }
}

template <class T, int kU, bool kTape>
__global__ void __launch_bounds__(kThreads, 1) forward_kernel(const ForwardArgs<T> a) {
  forward_block<T, kU, kTape, false>(a);
}

/// The forward with each group's a.splits blocks as one cluster of (a.splits, 1, 1) CTAs;
/// grid.x = groups * a.splits. Its device code is compiled for sm_90 and later only (a trap
/// elsewhere: the launcher never launches it there).
template <class T, int kU, bool kTape>
__global__ void __launch_bounds__(kThreads, 1) forward_cluster_kernel(const ForwardArgs<T> a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  forward_block<T, kU, kTape, true>(a);
#else
  (void)a;
  __trap();
#endif
}

/// Loads dgates_t of the group's rows (all 4*DH gate units of head h) into dg_s as T:
/// thread tid loads row tid / kRowThreads, columns tid % kRowThreads + i*kRowThreads.
template <class T>
MOXE_DEVICE MOXE_FORCEINLINE void load_dgates_tile(const BackwardArgs<T>& a, const BackwardSmem& L, T* dg_s,
                                                   int64_t t, int64_t b0, int64_t h) {
  static_assert(kHeadDimStep % kRowThreads == 0, "a row's walk crosses gates at multiples of kRowThreads");
  const int bl = static_cast<int>(threadIdx.x) / kRowThreads, lane = static_cast<int>(threadIdx.x) % kRowThreads;
  const int dh = static_cast<int>(a.DH), H = static_cast<int>(a.NH * a.DH);
  const int64_t b = b0 + bl;
  const float* src = b < a.B ? a.dgates + gate_index(t, b, 0, h, 0, a.B, a.NH, a.DH) : nullptr;
  // column col = g*DH + j is src[g*H + j]; j runs up to DH, then the next gate starts
  int j = lane, off = lane;
  for (int col = lane; col < 4 * dh; col += kRowThreads) {
    const float v = src != nullptr ? load_cg(src + off) : 0.f;
    dg_s[bl * L.ldk + col] = from_float<T>(v);
    j += kRowThreads;
    off += kRowThreads;
    if (j >= dh) {
      j -= dh;
      off += H - dh;
    }
  }
}

/// The backward product's K = 4*DH in one part per gate (tensor cores; block_product).
inline constexpr int kBackwardKSplit = 4;

/// The backward of one block (backward_kernel) or one cluster CTA (backward_cluster_kernel,
/// kCluster: as forward_block, with the dgates_t slices exchanged).
template <class T, int kU, bool kCluster>
MOXE_DEVICE MOXE_FORCEINLINE void backward_block(const BackwardArgs<T>& a) {
  constexpr bool kTC = uses_tensor_cores_v<T>;
  constexpr int P = kPairs<kU>;
  static_assert(kU % 16 == 0 && kU <= kMaxUnits && P * kThreads == kBatchTile * kU, "units per block");
  extern __shared__ __align__(128) unsigned char smem[];
  const int64_t DH = a.DH, NH = a.NH, B = a.B, S = a.S;
  const int dh = static_cast<int>(DH), H = static_cast<int>(NH * DH);  // H <= kMaxHeads * kMaxHeadDim
  const int64_t BH = B * H;
  const BackwardSmem L = backward_smem(DH, kU, static_cast<int>(sizeof(T)), kTC);
  T* rt_s = reinterpret_cast<T*>(smem + L.rt_off);
  T* dg_s = reinterpret_cast<T*>(smem + L.dg_off);
  float* out_s = reinterpret_cast<float*>(smem + L.out_off);

  const int tid = static_cast<int>(threadIdx.x);
  BlockTile tile;
  // the cluster CTA's published dgates_t slices, [2][kBatchTile][4*kU] (step t's in t % 2)
  T* x_s = nullptr;
  if constexpr (kCluster) {
    const ClusterBlock cb = cluster_block(static_cast<int64_t>(blockIdx.x), a.splits);
    tile = block_tile(a.group_begin + cb.group, cb.rank, kU, NH);
    x_s = reinterpret_cast<T*>(smem + backward_cluster_smem(DH, kU, static_cast<int>(sizeof(T)), kTC).x_off);
  } else {
    tile = block_tile(a.group_begin + blockIdx.x, static_cast<int64_t>(blockIdx.y), kU, NH);
  }
  const int64_t h = tile.h, b0 = tile.b0, j0 = tile.j0;
  // rows of the tile within the batch (the rest are zero): at most 8 takes the narrow product
  const int tile_rows = B - b0 < kBatchTile ? static_cast<int>(B - b0) : kBatchTile;
  // dgates_{t} of the head from the peers' slices t % 2 (cluster; see forward_block for why
  // one barrier per step suffices: the same argument with the steps walked backward)
  auto gather = [&](auto t) {  // generic: instantiated only where called (kCluster)
    const T* slices = x_s + (t & 1) * kBatchTile * 4 * kU;
    gather_cluster_tile<T, kU, 4>(static_cast<uint32_t>(__cvta_generic_to_shared(slices)), dg_s, L.ldk,
                                  cluster_log2(a.splits), tile_rows);
  };

  // transposed slice: row dl, column n = g*DH + j holds r[h][g][j][j0 + dl]
  for (int idx = tid; idx < 4 * dh * kU; idx += kThreads) {
    const int col = idx / kU, dl = idx % kU;
    rt_s[static_cast<size_t>(dl) * L.ldk + col] = a.r[(h * 4 * DH + col) * DH + j0 + dl];
  }

  // With one block per group, dgates_t goes straight into dg_s (rows past the batch stay
  // zero); with several, every step reloads dgates_{t+1} of the whole head.
  const bool own_head = a.splits == 1;
  for (int idx = tid; idx < kBatchTile * L.ldk; idx += kThreads) dg_s[idx] = from_float<T>(0.f);
  __syncthreads();  // the zeros land before step S-1 writes its dgates into dg_s

  // (row, unit) pairs of this thread (pair_offsets), at unit_base + t*BH in dy and the state
  // tapes and gate_base + t*4BH in the gate tape and dwx
  const int64_t unit_base = unit_index(0, b0, h, j0, B, NH, DH);
  const int64_t gate_base = gate_index(0, b0, 0, h, j0, B, NH, DH);
  PairOffsets po[P];
  float dc[P], dn[P], dm[P];
  MOXE_PRAGMA_UNROLL
  for (int k = 0; k < P; ++k) {
    po[k] = pair_offsets<kU>(tid, k, b0, B, H);
    dc[k] = dn[k] = dm[k] = 0.f;
    if (po[k].valid && a.dc_last != nullptr) {
      const int64_t u = unit_base + po[k].unit;
      dc[k] = a.dc_last[u];
      dn[k] = a.dn_last[u];
      dm[k] = a.dm_last[u];
    }
  }

  // step t's slices of dy, the gate tape, dgates and dwx (at unit_base / gate_base) and step
  // t-1's of the state tapes (used for t > 0), one step back after each step
  const T* dy_t = a.dy + (unit_base + (S - 1) * BH);
  const float* tape_gates_t = a.tape_gates + (gate_base + (S - 1) * 4 * BH);
  float* dgates_t = a.dgates + (gate_base + (S - 1) * 4 * BH);
  T* dwx_t = a.dwx + (gate_base + (S - 1) * 4 * BH);
  const int64_t prev_base = unit_base + (S > 1 ? (S - 2) * BH : 0);
  const float *tape_c_prev = a.tape_c + prev_base, *tape_n_prev = a.tape_n + prev_base,
              *tape_m_prev = a.tape_m + prev_base;

  for (int64_t t = S - 1; t >= 0; --t) {
    // this step's dy, raw gates and previous states, fetched before the product to hide
    // their latency (none of them depends on it)
    float dy[P], raw[P][4], c0[P], n0[P], m0[P];
    MOXE_PRAGMA_UNROLL
    for (int k = 0; k < P; ++k) {
      dy[k] = c0[k] = n0[k] = m0[k] = 0.f;
      MOXE_PRAGMA_UNROLL
      for (int g = 0; g < 4; ++g) raw[k][g] = 0.f;
      if (po[k].valid) {
        const int64_t u0 = unit_base + po[k].unit;
        dy[k] = to_float(dy_t[po[k].unit]);
        if (t == S - 1 && a.dy_last != nullptr) dy[k] += a.dy_last[u0];
        MOXE_PRAGMA_UNROLL
        for (int g = 0; g < 4; ++g) raw[k][g] = tape_gates_t[po[k].gate + g * H];
        if (t > 0) {
          c0[k] = tape_c_prev[po[k].unit];
          n0[k] = tape_n_prev[po[k].unit];
          m0[k] = tape_m_prev[po[k].unit];
        } else if (a.c_init != nullptr) {
          c0[k] = a.c_init[u0];
          n0[k] = a.n_init[u0];
          m0[k] = a.m_init[u0];
        }
      }
    }
    if (t < S - 1) {  // recurrent part of dy_t: r^T dgates_{t+1}, for this block's units
      if constexpr (kCluster) {
        gather(t + 1);
      } else {
        if (!own_head) load_dgates_tile(a, L, dg_s, t + 1, b0, h);
      }
      __syncthreads();
      block_product<T, kU, kBackwardKSplit>(dg_s, L.ldk, rt_s, L.ldk, out_s, L.ldo, 4 * dh, tile_rows);
      __syncthreads();
    }
    MOXE_PRAGMA_UNROLL
    for (int k = 0; k < P; ++k) {
      const int bl = po[k].bl, jl = po[k].jl;
      if (po[k].valid) {
        const float dy_total = t < S - 1 ? dy[k] + out_s[bl * L.ldo + jl] : dy[k];
        const CellGrad<float> gd = cell_backward(GatesRaw<float>{raw[k][0], raw[k][1], raw[k][2], raw[k][3]}, c0[k],
                                                 n0[k], m0[k], dy_total, dc[k], dn[k], dm[k]);
        dc[k] = gd.dc0;
        dn[k] = gd.dn0;
        dm[k] = gd.dm0;
        const float d4[4] = {gd.d.i, gd.d.f, gd.d.z, gd.d.o};
        MOXE_PRAGMA_UNROLL
        for (int g = 0; g < 4; ++g) {
          const int gi = po[k].gate + g * H;
          dgates_t[gi] = d4[g];
          dwx_t[gi] = from_float<T>(d4[g]);
          if (own_head) dg_s[bl * L.ldk + g * dh + static_cast<int>(j0) + jl] = from_float<T>(d4[g]);
          if constexpr (kCluster) x_s[((t & 1) * kBatchTile + bl) * 4 * kU + g * kU + jl] = from_float<T>(d4[g]);
        }
      }
    }
    if (t > 0) {
      dy_t -= BH;
      tape_gates_t -= 4 * BH;
      dgates_t -= 4 * BH;
      dwx_t -= 4 * BH;
    }
    if (t > 1) {
      tape_c_prev -= BH;
      tape_n_prev -= BH;
      tape_m_prev -= BH;
    }
    group_barrier<kCluster>(a.splits);
  }

  // dy_init = r^T dgates_0 (after the last barrier every block's dgates_0 is visible)
  if (a.dy_init != nullptr) {
    if constexpr (kCluster) {
      gather(0);
    } else {
      if (!own_head) load_dgates_tile(a, L, dg_s, 0, b0, h);
    }
    __syncthreads();
    block_product<T, kU, kBackwardKSplit>(dg_s, L.ldk, rt_s, L.ldk, out_s, L.ldo, 4 * dh, tile_rows);
    // a cluster CTA's slices are read by its peers up to here: none exits before all are done
    if constexpr (kCluster) {
      cluster_barrier();
    } else {
      __syncthreads();
    }
  }
  if (a.dy_init != nullptr) {
    MOXE_PRAGMA_UNROLL
    for (int k = 0; k < P; ++k) {
      if (po[k].valid) {
        const int64_t u0 = unit_base + po[k].unit;
        a.dy_init[u0] = out_s[po[k].bl * L.ldo + po[k].jl];
        a.dc_init[u0] = dc[k];
        a.dn_init[u0] = dn[k];
        a.dm_init[u0] = dm[k];
      }
    }
  }
}

template <class T, int kU>
__global__ void __launch_bounds__(kThreads, 1) backward_kernel(const BackwardArgs<T> a) {
  backward_block<T, kU, false>(a);
}

/// The backward with each group's a.splits blocks as one cluster (as forward_cluster_kernel);
/// compiled for sm_90 and later only.
template <class T, int kU>
__global__ void __launch_bounds__(kThreads, 1) backward_cluster_kernel(const BackwardArgs<T> a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  backward_block<T, kU, true>(a);
#else
  (void)a;
  __trap();
#endif
}

/// The kernel instances per units per block (a multiple of 16 up to kMaxUnits); null for
/// any other count.
template <class T>
using ForwardKernel = void (*)(ForwardArgs<T>);
template <class T>
using BackwardKernel = void (*)(BackwardArgs<T>);

template <class T, bool kTape>
ForwardKernel<T> forward_kernel_for(int units) {
  static_assert(kMaxUnits == 128, "one case per multiple of 16 up to kMaxUnits");
  switch (units) {
    case 16: return forward_kernel<T, 16, kTape>;
    case 32: return forward_kernel<T, 32, kTape>;
    case 48: return forward_kernel<T, 48, kTape>;
    case 64: return forward_kernel<T, 64, kTape>;
    case 80: return forward_kernel<T, 80, kTape>;
    case 96: return forward_kernel<T, 96, kTape>;
    case 112: return forward_kernel<T, 112, kTape>;
    case 128: return forward_kernel<T, 128, kTape>;
    default: return nullptr;
  }
}

template <class T, bool kTape>
ForwardKernel<T> forward_cluster_kernel_for(int units) {
  static_assert(kMaxUnits == 128, "one case per multiple of 16 up to kMaxUnits");
  switch (units) {
    case 16: return forward_cluster_kernel<T, 16, kTape>;
    case 32: return forward_cluster_kernel<T, 32, kTape>;
    case 48: return forward_cluster_kernel<T, 48, kTape>;
    case 64: return forward_cluster_kernel<T, 64, kTape>;
    case 80: return forward_cluster_kernel<T, 80, kTape>;
    case 96: return forward_cluster_kernel<T, 96, kTape>;
    case 112: return forward_cluster_kernel<T, 112, kTape>;
    case 128: return forward_cluster_kernel<T, 128, kTape>;
    default: return nullptr;
  }
}

template <class T>
BackwardKernel<T> backward_kernel_for(int units) {
  static_assert(kMaxUnits == 128, "one case per multiple of 16 up to kMaxUnits");
  switch (units) {
    case 16: return backward_kernel<T, 16>;
    case 32: return backward_kernel<T, 32>;
    case 48: return backward_kernel<T, 48>;
    case 64: return backward_kernel<T, 64>;
    case 80: return backward_kernel<T, 80>;
    case 96: return backward_kernel<T, 96>;
    case 112: return backward_kernel<T, 112>;
    case 128: return backward_kernel<T, 128>;
    default: return nullptr;
  }
}

template <class T>
BackwardKernel<T> backward_cluster_kernel_for(int units) {
  static_assert(kMaxUnits == 128, "one case per multiple of 16 up to kMaxUnits");
  switch (units) {
    case 16: return backward_cluster_kernel<T, 16>;
    case 32: return backward_cluster_kernel<T, 32>;
    case 48: return backward_cluster_kernel<T, 48>;
    case 64: return backward_cluster_kernel<T, 64>;
    case 80: return backward_cluster_kernel<T, 80>;
    case 96: return backward_cluster_kernel<T, 96>;
    case 112: return backward_cluster_kernel<T, 112>;
    case 128: return backward_cluster_kernel<T, 128>;
    default: return nullptr;
  }
}

/// dr partials: partial[chunk][h][m][d] = sum over k in the chunk of dgates[k][g][h][j] *
/// y_prev[k][h][d], m = g*DH + j, k = t*B + b, y_prev(t = 0) = y_init (or 0). Tile
/// kDrTile x kDrTile, each thread 4x4 outputs accumulated in k order.
template <class T>
__global__ void __launch_bounds__(256) dr_partial_kernel(const float* dgates, const T* y_tape, const float* y_init,
                                                         int64_t S, int64_t B, int64_t NH, int64_t DH,
                                                         int64_t chunk_len, float* partial) {
  __shared__ float a_s[kDrTileK][kDrTile + 4];
  __shared__ float b_s[kDrTileK][kDrTile + 4];
  const int64_t M = 4 * DH, H = NH * DH, K = S * B;
  const int64_t tiles_n = (DH + kDrTile - 1) / kDrTile;
  const int64_t m0 = (blockIdx.x / tiles_n) * kDrTile, n0 = (blockIdx.x % tiles_n) * kDrTile;
  const int64_t h = blockIdx.y, chunk = blockIdx.z;
  const int64_t k_begin = chunk * chunk_len;
  const int64_t k_end = k_begin + chunk_len < K ? k_begin + chunk_len : K;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  float acc[4][4] = {};
  for (int64_t kt = k_begin; kt < k_end; kt += kDrTileK) {
    for (int idx = threadIdx.x; idx < kDrTileK * kDrTile; idx += 256) {
      const int kk = idx / kDrTile, col = idx % kDrTile;
      const int64_t k = kt + kk;
      const int64_t mm = m0 + col, nn = n0 + col;
      float av = 0.f, bv = 0.f;
      if (k < k_end) {
        if (mm < M) av = dgates[k * 4 * H + (mm / DH) * H + h * DH + mm % DH];
        if (nn < DH) {
          if (k >= B) {
            bv = to_float(y_tape[(k - B) * H + h * DH + nn]);
          } else if (y_init != nullptr) {
            bv = y_init[k * H + h * DH + nn];
          }
        }
      }
      a_s[kk][col] = av;
      b_s[kk][col] = bv;
    }
    __syncthreads();
    MOXE_PRAGMA_UNROLL
    for (int kk = 0; kk < kDrTileK; ++kk) {
      float av[4], bv[4];
      MOXE_PRAGMA_UNROLL
      for (int i = 0; i < 4; ++i) {
        av[i] = a_s[kk][ty * 4 + i];
        bv[i] = b_s[kk][tx * 4 + i];
      }
      MOXE_PRAGMA_UNROLL
      for (int i = 0; i < 4; ++i)
        MOXE_PRAGMA_UNROLL
        for (int jn = 0; jn < 4; ++jn) acc[i][jn] = fmaf(av[i], bv[jn], acc[i][jn]);
    }
    __syncthreads();
  }
  float* out = partial + (chunk * NH + h) * M * DH;
  MOXE_PRAGMA_UNROLL
  for (int i = 0; i < 4; ++i) {
    const int64_t mm = m0 + ty * 4 + i;
    MOXE_PRAGMA_UNROLL
    for (int jn = 0; jn < 4; ++jn) {
      const int64_t nn = n0 + tx * 4 + jn;
      if (mm < M && nn < DH) out[mm * DH + nn] = acc[i][jn];
    }
  }
}

/// dbias partials per batch row: partial[b][i] = sum over t = S-1..0 (the backward's order)
/// of dgates[t][b][i], i < 4H; sum_partials_kernel then adds the rows in row order.
template <int = 0>
__global__ void __launch_bounds__(256) dbias_rows_kernel(const float* dgates, int64_t S, int64_t B, int64_t H4,
                                                         float* partial) {
  const int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;  // b * H4 + i
  if (e >= B * H4) return;
  const int64_t step = B * H4;
  float s = 0.f;
  for (int64_t t = S - 1; t >= 0; --t) s += dgates[t * step + e];
  partial[e] = s;
}

/// out[i] = sum_c partial[c * count + i] in chunk order, as T.
template <class T>
__global__ void __launch_bounds__(256) sum_partials_kernel(const float* partial, int64_t chunks, int64_t count,
                                                           T* out) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= count) return;
  float s = 0.f;
  for (int64_t c = 0; c < chunks; ++c) s += partial[c * count + i];
  out[i] = from_float<T>(s);
}

}  // namespace moxe::slstm::detail
