// moxe::slstm::detail: the device kernels of the sLSTM sequence forward and backward.
//
//   forward_kernel   persistent, walks t = 0..S-1; block (group, split) keeps the r rows
//                    of its units on chip and updates their states in registers; optional
//                    tape (raw gates, states) for the backward
//   backward_kernel  persistent, walks t = S-1..0 with the transposed r slice on chip;
//                    overwrites the gate tape with dgates, writes dwx, per-row dbias partials
//   dr_partial_kernel / dr_reduce_kernel / dbias_reduce_kernel   deterministic reductions
//
// Blocks of one group (splits > 1) exchange y_t / dgates_t through global memory and a
// cooperative-groups grid barrier; with one block per group a __syncthreads suffices.
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
  int units, splits;
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
  int units, splits;
  int64_t group_begin;
  const T* r;
  const T* dy;
  const float *dy_last, *dc_last, *dn_last;  // all or none
  const float *c_init, *n_init, *m_init;     // all or none
  float* tape_gates;                         // in: raw gates; out: dgates (float)
  const float *tape_c, *tape_n, *tape_m;
  T* dwx;
  float *dy_init, *dc_init, *dn_init;  // all or none
  float* dbias_partial;                // [B, 4, NH, DH]
};

/// End of a time step: every block of the group has published its part of the step.
MOXE_DEVICE MOXE_FORCEINLINE void step_barrier(int splits) {
  if (splits > 1) {
    cooperative_groups::this_grid().sync();
  } else {
    __syncthreads();
  }
}

template <class T, bool kTape>
__global__ void __launch_bounds__(kThreads) forward_kernel(const ForwardArgs<T> a) {
  constexpr bool kTC = uses_tensor_cores_v<T>;
  extern __shared__ __align__(128) unsigned char smem[];
  const int U = a.units;
  const int64_t DH = a.DH, NH = a.NH, B = a.B, S = a.S;
  const ForwardSmem L = forward_smem(DH, U, static_cast<int>(sizeof(T)), kTC);
  T* r_s = reinterpret_cast<T*>(smem + L.r_off);
  T* y_s = reinterpret_cast<T*>(smem + L.y_off);
  float* g_s = reinterpret_cast<float*>(smem + L.gates_off);

  const int tid = static_cast<int>(threadIdx.x);
  const BlockTile tile = block_tile(a.group_begin + blockIdx.x, static_cast<int64_t>(blockIdx.y), U, NH);
  const int64_t h = tile.h, b0 = tile.b0, j0 = tile.j0;

  // r rows of this block's units: row n = g*U + jl holds r[h][g][j0 + jl][:]
  for (int64_t idx = tid; idx < 4LL * U * DH; idx += kThreads) {
    const int n = static_cast<int>(idx / DH);
    const int64_t d = idx % DH;
    const int g = n / U, jl = n % U;
    r_s[static_cast<size_t>(n) * L.ldr + d] = a.r[r_index(h, g, j0 + jl, d, DH)];
  }

  // (row, unit) pairs of this thread: p = tid + k*kThreads, row p / U, unit p % U
  const int pairs = kBatchTile * U;
  float c[kMaxPairsPerThread], n[kMaxPairsPerThread], m[kMaxPairsPerThread], y_last[kMaxPairsPerThread];
  MOXE_PRAGMA_UNROLL
  for (int k = 0; k < kMaxPairsPerThread; ++k) {
    c[k] = n[k] = m[k] = y_last[k] = 0.f;
    const int p = tid + k * kThreads;
    const int64_t b = b0 + p / U;
    if (p < pairs && b < B && a.c_init != nullptr) {
      const int64_t u = unit_index(0, b, h, j0 + p % U, B, NH, DH);
      c[k] = a.c_init[u];
      n[k] = a.n_init[u];
      m[k] = a.m_init[u];
      y_last[k] = a.y_init[u];
    }
  }

  // With one block per group, y_t goes straight into y_s (the product of step t has read
  // y_s before the pointwise phase writes it); with several, every step reloads y_{t-1}.
  const bool own_head = a.splits == 1;
  for (int64_t t = 0; t < S; ++t) {
    // y_{t-1} of the whole head for the tile's rows (zeros past the batch)
    for (int64_t idx = tid; (t == 0 || !own_head) && idx < kBatchTile * DH; idx += kThreads) {
      const int bl = static_cast<int>(idx / DH);
      const int64_t d = idx % DH;
      const int64_t b = b0 + bl;
      T v = from_float<T>(0.f);
      if (b < B) {
        if (t == 0) {
          if (a.y_init) v = from_float<T>(a.y_init[unit_index(0, b, h, d, B, NH, DH)]);
        } else {
          v = load_cg(a.y + unit_index(t - 1, b, h, d, B, NH, DH));
        }
      }
      y_s[bl * L.ldy + d] = v;
    }
    // y may overlap y_init (an in-place step with y_out == y): every block of the group
    // has read y_init before any block writes y_0
    if (t == 0 && a.init_barrier) step_barrier(a.splits);
    // this step's input projections, fetched before the product to hide their latency
    float wx[kMaxPairsPerThread][4];
    MOXE_PRAGMA_UNROLL
    for (int k = 0; k < kMaxPairsPerThread; ++k) {
      const int p = tid + k * kThreads;
      const int64_t b = b0 + p / U;
      MOXE_PRAGMA_UNROLL
      for (int g = 0; g < 4; ++g)
        wx[k][g] = (p < pairs && b < B) ? to_float(a.wx[gate_index(t, b, g, h, j0 + p % U, B, NH, DH)]) : 0.f;
    }
    __syncthreads();
    block_product<T>(y_s, L.ldy, r_s, L.ldr, g_s, L.ldg, 4 * U, static_cast<int>(DH));
    __syncthreads();
    MOXE_PRAGMA_UNROLL
    for (int k = 0; k < kMaxPairsPerThread; ++k) {
      const int p = tid + k * kThreads;
      const int bl = p / U, jl = p % U;
      const int64_t b = b0 + bl, j = j0 + jl;
      if (p < pairs && b < B) {
        float raw[4];
        MOXE_PRAGMA_UNROLL
        for (int g = 0; g < 4; ++g)
          raw[g] = gate_preactivation(wx[k][g], g_s[bl * L.ldg + g * U + jl], to_float(a.bias[bias_index(g, h, j, NH, DH)]));
        const CellOut<float> o = cell_forward(GatesRaw<float>{raw[0], raw[1], raw[2], raw[3]}, c[k], n[k], m[k]);
        c[k] = o.c;
        n[k] = o.n;
        m[k] = o.m;
        y_last[k] = o.y;
        const int64_t u = unit_index(t, b, h, j, B, NH, DH);
        a.y[u] = from_float<T>(o.y);
        if (own_head) y_s[bl * L.ldy + j] = from_float<T>(o.y);
        if constexpr (kTape) {
          MOXE_PRAGMA_UNROLL
          for (int g = 0; g < 4; ++g) a.tape_gates[gate_index(t, b, g, h, j, B, NH, DH)] = raw[g];
          a.tape_c[u] = o.c;
          a.tape_n[u] = o.n;
          a.tape_m[u] = o.m;
        }
      }
    }
    step_barrier(a.splits);
  }

  if (a.y_last != nullptr) {  // after the last barrier: y_init may alias y_last (decoding step)
    MOXE_PRAGMA_UNROLL
    for (int k = 0; k < kMaxPairsPerThread; ++k) {
      const int p = tid + k * kThreads;
      const int64_t b = b0 + p / U;
      if (p < pairs && b < B) {
        const int64_t u = unit_index(0, b, h, j0 + p % U, B, NH, DH);
        a.y_last[u] = y_last[k];
        a.c_last[u] = c[k];
        a.n_last[u] = n[k];
        a.m_last[u] = m[k];
      }
    }
  }
}

/// Loads dgates_t of the group's rows (all 4*DH gate units of head h) into dg_s as T.
template <class T>
MOXE_DEVICE MOXE_FORCEINLINE void load_dgates_tile(const BackwardArgs<T>& a, const BackwardSmem& L, T* dg_s,
                                                   int64_t t, int64_t b0, int64_t h) {
  const int64_t DH = a.DH, B = a.B, NH = a.NH;
  for (int64_t idx = threadIdx.x; idx < kBatchTile * 4 * DH; idx += kThreads) {
    const int bl = static_cast<int>(idx / (4 * DH));
    const int64_t col = idx % (4 * DH);
    const int g = static_cast<int>(col / DH);
    const int64_t j = col % DH;
    const int64_t b = b0 + bl;
    const float v = b < B ? load_cg(a.tape_gates + gate_index(t, b, g, h, j, B, NH, DH)) : 0.f;
    dg_s[bl * L.ldk + col] = from_float<T>(v);
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads) backward_kernel(const BackwardArgs<T> a) {
  constexpr bool kTC = uses_tensor_cores_v<T>;
  extern __shared__ __align__(128) unsigned char smem[];
  const int U = a.units;
  const int64_t DH = a.DH, NH = a.NH, B = a.B, S = a.S;
  const BackwardSmem L = backward_smem(DH, U, static_cast<int>(sizeof(T)), kTC);
  T* rt_s = reinterpret_cast<T*>(smem + L.rt_off);
  T* dg_s = reinterpret_cast<T*>(smem + L.dg_off);
  float* out_s = reinterpret_cast<float*>(smem + L.out_off);

  const int tid = static_cast<int>(threadIdx.x);
  const BlockTile tile = block_tile(a.group_begin + blockIdx.x, static_cast<int64_t>(blockIdx.y), U, NH);
  const int64_t h = tile.h, b0 = tile.b0, j0 = tile.j0;

  // transposed slice: row dl, column n = g*DH + j holds r[h][g][j][j0 + dl]
  for (int64_t idx = tid; idx < 4LL * DH * U; idx += kThreads) {
    const int64_t col = idx / U;
    const int dl = static_cast<int>(idx % U);
    rt_s[static_cast<size_t>(dl) * L.ldk + col] = a.r[(h * 4 * DH + col) * DH + j0 + dl];
  }

  // With one block per group, dgates_t goes straight into dg_s (rows past the batch stay
  // zero); with several, every step reloads dgates_{t+1} of the whole head.
  const bool own_head = a.splits == 1;
  for (int64_t idx = tid; idx < kBatchTile * static_cast<int64_t>(L.ldk); idx += kThreads) dg_s[idx] = from_float<T>(0.f);
  __syncthreads();  // the zeros land before step S-1 writes its dgates into dg_s

  const int pairs = kBatchTile * U;
  float dc[kMaxPairsPerThread], dn[kMaxPairsPerThread], dm[kMaxPairsPerThread], dbias[kMaxPairsPerThread][4];
  MOXE_PRAGMA_UNROLL
  for (int k = 0; k < kMaxPairsPerThread; ++k) {
    dc[k] = dn[k] = dm[k] = 0.f;
    MOXE_PRAGMA_UNROLL
    for (int g = 0; g < 4; ++g) dbias[k][g] = 0.f;
    const int p = tid + k * kThreads;
    const int64_t b = b0 + p / U;
    if (p < pairs && b < B && a.dc_last != nullptr) {
      const int64_t u = unit_index(0, b, h, j0 + p % U, B, NH, DH);
      dc[k] = a.dc_last[u];
      dn[k] = a.dn_last[u];
    }
  }

  for (int64_t t = S - 1; t >= 0; --t) {
    if (t < S - 1) {  // recurrent part of dy_t: r^T dgates_{t+1}, for this block's units
      if (!own_head) load_dgates_tile(a, L, dg_s, t + 1, b0, h);
      __syncthreads();
      block_product<T>(dg_s, L.ldk, rt_s, L.ldk, out_s, L.ldo, U, static_cast<int>(4 * DH));
      __syncthreads();
    }
    MOXE_PRAGMA_UNROLL
    for (int k = 0; k < kMaxPairsPerThread; ++k) {
      const int p = tid + k * kThreads;
      const int bl = p / U, jl = p % U;
      const int64_t b = b0 + bl, j = j0 + jl;
      if (p < pairs && b < B) {
        const int64_t u = unit_index(t, b, h, j, B, NH, DH);
        const int64_t u0 = unit_index(0, b, h, j, B, NH, DH);
        float dy = to_float(a.dy[u]);
        if (t < S - 1) {
          dy += out_s[bl * L.ldo + jl];
        } else if (a.dy_last != nullptr) {
          dy += a.dy_last[u0];
        }
        float raw[4];
        MOXE_PRAGMA_UNROLL
        for (int g = 0; g < 4; ++g) raw[g] = a.tape_gates[gate_index(t, b, g, h, j, B, NH, DH)];
        float c0 = 0.f, n0 = 0.f, m0 = 0.f;
        if (t > 0) {
          const int64_t up = unit_index(t - 1, b, h, j, B, NH, DH);
          c0 = a.tape_c[up];
          n0 = a.tape_n[up];
          m0 = a.tape_m[up];
        } else if (a.c_init != nullptr) {
          c0 = a.c_init[u0];
          n0 = a.n_init[u0];
          m0 = a.m_init[u0];
        }
        const CellGrad<float> gd =
            cell_backward(GatesRaw<float>{raw[0], raw[1], raw[2], raw[3]}, c0, n0, m0, dy, dc[k], dn[k], dm[k]);
        dc[k] = gd.dc0;
        dn[k] = gd.dn0;
        dm[k] = gd.dm0;
        const float d4[4] = {gd.d.i, gd.d.f, gd.d.z, gd.d.o};
        MOXE_PRAGMA_UNROLL
        for (int g = 0; g < 4; ++g) {
          const int64_t gi = gate_index(t, b, g, h, j, B, NH, DH);
          a.tape_gates[gi] = d4[g];
          a.dwx[gi] = from_float<T>(d4[g]);
          if (own_head) dg_s[bl * L.ldk + g * DH + j] = from_float<T>(d4[g]);
          dbias[k][g] += d4[g];
        }
      }
    }
    step_barrier(a.splits);
  }

  // dy_init = r^T dgates_0 (after the last barrier every block's dgates_0 is visible)
  if (a.dy_init != nullptr) {
    if (!own_head) load_dgates_tile(a, L, dg_s, 0, b0, h);
    __syncthreads();
    block_product<T>(dg_s, L.ldk, rt_s, L.ldk, out_s, L.ldo, U, static_cast<int>(4 * DH));
    __syncthreads();
  }
  MOXE_PRAGMA_UNROLL
  for (int k = 0; k < kMaxPairsPerThread; ++k) {
    const int p = tid + k * kThreads;
    const int bl = p / U, jl = p % U;
    const int64_t b = b0 + bl, j = j0 + jl;
    if (p < pairs && b < B) {
      const int64_t u0 = unit_index(0, b, h, j, B, NH, DH);
      if (a.dy_init != nullptr) {
        a.dy_init[u0] = out_s[bl * L.ldo + jl];
        a.dc_init[u0] = dc[k];
        a.dn_init[u0] = dn[k];
      }
      MOXE_PRAGMA_UNROLL
      for (int g = 0; g < 4; ++g) a.dbias_partial[gate_index(0, b, g, h, j, B, NH, DH)] = dbias[k][g];
    }
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
