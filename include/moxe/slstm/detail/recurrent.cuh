// moxe::slstm::detail: the recurrent product of one block, gates[16][kNcols] =
// A[16][K] * B[K][kNcols] with B stored column by column (B(k, n) = b_s[n * ldb + k]), both
// operands in shared memory. Half and bf16 run on tensor cores (WMMA 16x16x16, float
// accumulate); float runs in full fp32 FFMA (no TF32). Every output column is one fixed
// sequence of multiply-adds, independent of how the units are split over blocks.
//
// Latency: a warp's output tiles are interleaved over k (independent MMA chains in flight,
// one A fragment shared by all), and K may be cut into kKSplit equal parts with one
// accumulator each (more independent chains), added at the end in part order:
// ((p0 + p1) + p2) + p3. The float path gives every thread of the block a column and a
// group of rows (16 / kRowGroups rows, one fma chain over k each).
//
// Small batches: when the tile holds at most 8 rows (the batch, or the last tile of it),
// the tensor-core path puts the rows on the MMA's short side, mma.sync m16n8k16 with the
// units as M and the rows as N: half the MMAs of the 16-row WMMA, same tiles and k order.
#pragma once

#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "moxe/core/config.hpp"
#include "moxe/core/numeric.cuh"
#include "moxe/slstm/detail/plan.hpp"

namespace moxe::slstm::detail {

template <class T>
inline constexpr bool uses_tensor_cores_v = NumericTraits<T>::is_reduced;

/// Row groups of the float product for kNcols columns: the largest power of two <= 16 with
/// kNcols * groups <= kThreads (1 when kNcols >= kThreads).
template <int kNcols>
inline constexpr int kRowGroups = kNcols * 16 <= kThreads   ? 16
                                  : kNcols * 8 <= kThreads  ? 8
                                  : kNcols * 4 <= kThreads  ? 4
                                  : kNcols * 2 <= kThreads  ? 2
                                                            : 1;

/// Two consecutive 16-bit elements of shared memory as one 32-bit MMA operand register.
template <class T>
MOXE_DEVICE MOXE_FORCEINLINE uint32_t operand_pair(const T* p) {
  static_assert(sizeof(T) == 2, "16-bit element");
  return *reinterpret_cast<const uint32_t*>(p);
}

/// c += a * b, mma.sync m16n8k16, A row-major, B column-major, float accumulate.
template <class T>
MOXE_DEVICE MOXE_FORCEINLINE void mma_16816(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    static_assert(std::is_same_v<T, __half>, "half or bf16");
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

/// The tensor-core product of a tile of at most 8 rows (block_product, rows <= 8): per
/// output tile of 16 columns (units) one m16n8k16 MMA per k-step with the units as M (from
/// b_s, row-major) and the rows as N (from a_s: B(k, row) = a_s[row * lda + k]); rows 8..15
/// of `out` are not written.
template <class T, int kNcols, int kKSplit>
MOXE_DEVICE MOXE_FORCEINLINE void block_product_narrow(const T* a_s, int lda, const T* b_s, int ldb, float* out,
                                                       int ldo, int K) {
  constexpr int kTiles = kNcols / 16;
  constexpr int kPerWarp = (kTiles + kWarps - 1) / kWarps;  // tile nt = warp + i*kWarps
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int gid = lane / 4, tq = lane % 4;  // the fragments' row group and thread in group
  if (warp >= kTiles) return;
  const int kpart = K / kKSplit;
  float acc[kPerWarp][kKSplit][4];
  MOXE_PRAGMA_UNROLL
  for (int i = 0; i < kPerWarp; ++i)
    MOXE_PRAGMA_UNROLL
    for (int q = 0; q < kKSplit; ++q)
      MOXE_PRAGMA_UNROLL
      for (int e = 0; e < 4; ++e) acc[i][q][e] = 0.f;
  const T* b_row = a_s + gid * lda + 2 * tq;  // N = row gid, k = 2tq, 2tq + 1 (+8)
  for (int k = 0; k < kpart; k += 16) {
    MOXE_PRAGMA_UNROLL
    for (int q = 0; q < kKSplit; ++q) {
      const int kk = q * kpart + k;
      const uint32_t fb[2] = {operand_pair(b_row + kk), operand_pair(b_row + kk + 8)};
      MOXE_PRAGMA_UNROLL
      for (int i = 0; i < kPerWarp; ++i) {
        if (warp + i * kWarps < kTiles) {  // warp-uniform
          // M = unit gid (+8) of the tile, k = 2tq, 2tq + 1 (+8)
          const T* a_row = b_s + static_cast<size_t>((warp + i * kWarps) * 16 + gid) * ldb + kk + 2 * tq;
          const uint32_t fa[4] = {operand_pair(a_row), operand_pair(a_row + 8 * ldb), operand_pair(a_row + 8),
                                  operand_pair(a_row + 8 * ldb + 8)};
          mma_16816<T>(acc[i][q], fa, fb);
        }
      }
    }
  }
  MOXE_PRAGMA_UNROLL
  for (int i = 0; i < kPerWarp; ++i) {
    if (warp + i * kWarps < kTiles) {
      MOXE_PRAGMA_UNROLL
      for (int q = 1; q < kKSplit; ++q)
        MOXE_PRAGMA_UNROLL
        for (int e = 0; e < 4; ++e) acc[i][0][e] += acc[i][q][e];
      // c0, c1: unit gid, rows 2tq, 2tq + 1; c2, c3: unit gid + 8
      float* o = out + (warp + i * kWarps) * 16 + gid;
      o[(2 * tq) * ldo] = acc[i][0][0];
      o[(2 * tq + 1) * ldo] = acc[i][0][1];
      o[(2 * tq) * ldo + 8] = acc[i][0][2];
      o[(2 * tq + 1) * ldo + 8] = acc[i][0][3];
    }
  }
}

/// out[b * ldo + n] = sum_k a_s[b * lda + k] * b_s[n * ldb + k], b < 16, n < kNcols (a
/// multiple of 16); K a multiple of 16 * kKSplit; the rows from `rows` on are zero in a_s
/// (with rows <= 8 the tensor-core path leaves rows 8..15 of out unwritten). Tensor cores:
/// part q of K is [q*K/kKSplit, (q+1)*K/kKSplit), summed in its own accumulator, the parts
/// added in order; float: one chain over all of K (kKSplit unused). Called by all kThreads
/// threads with the same `rows`; no barrier inside.
template <class T, int kNcols, int kKSplit = 1>
MOXE_DEVICE MOXE_FORCEINLINE void block_product(const T* a_s, int lda, const T* b_s, int ldb, float* out,
                                                int ldo, int K, int rows) {
  static_assert(kNcols % 16 == 0 && kNcols > 0, "whole 16-column tiles");
  if constexpr (uses_tensor_cores_v<T>) {
    using namespace nvcuda;
    if (rows <= 8) {
      block_product_narrow<T, kNcols, kKSplit>(a_s, lda, b_s, ldb, out, ldo, K);
      return;
    }
    constexpr int kTiles = kNcols / 16;
    constexpr int kPerWarp = (kTiles + kWarps - 1) / kWarps;  // tile nt = warp + i*kWarps
    const int warp = static_cast<int>(threadIdx.x) / 32;
    const int kpart = K / kKSplit;
    bool has[kPerWarp];
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kPerWarp][kKSplit];
    MOXE_PRAGMA_UNROLL
    for (int i = 0; i < kPerWarp; ++i) {
      has[i] = warp + i * kWarps < kTiles;  // warp-uniform
      MOXE_PRAGMA_UNROLL
      for (int q = 0; q < kKSplit; ++q) wmma::fill_fragment(acc[i][q], 0.f);
    }
    if (!has[0]) return;
    for (int k = 0; k < kpart; k += 16) {
      MOXE_PRAGMA_UNROLL
      for (int q = 0; q < kKSplit; ++q) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
        wmma::load_matrix_sync(fa, a_s + q * kpart + k, lda);
        MOXE_PRAGMA_UNROLL
        for (int i = 0; i < kPerWarp; ++i) {
          if (has[i]) {
            wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;
            const T* b_tile = b_s + static_cast<size_t>(warp + i * kWarps) * 16 * ldb;
            wmma::load_matrix_sync(fb, b_tile + q * kpart + k, ldb);
            wmma::mma_sync(acc[i][q], fa, fb, acc[i][q]);
          }
        }
      }
    }
    MOXE_PRAGMA_UNROLL
    for (int i = 0; i < kPerWarp; ++i) {
      if (has[i]) {
        MOXE_PRAGMA_UNROLL
        for (int q = 1; q < kKSplit; ++q) {
          MOXE_PRAGMA_UNROLL
          for (int e = 0; e < acc[i][0].num_elements; ++e) acc[i][0].x[e] += acc[i][q].x[e];
        }
        wmma::store_matrix_sync(out + (warp + i * kWarps) * 16, acc[i][0], ldo, wmma::mem_row_major);
      }
    }
  } else {
    static_assert(std::is_same_v<T, float>, "fp32 path is for float");
    (void)rows;
    constexpr int kGroups = kRowGroups<kNcols>, kRows = kBatchTile / kGroups;
    for (int w = static_cast<int>(threadIdx.x); w < kNcols * kGroups; w += kThreads) {
      const int n = w % kNcols, b0 = (w / kNcols) * kRows;
      float acc[kRows];
      MOXE_PRAGMA_UNROLL
      for (int b = 0; b < kRows; ++b) acc[b] = 0.f;
      const float* col = b_s + static_cast<size_t>(n) * ldb;
      const float* a_rows = a_s + b0 * lda;
      for (int k = 0; k < K; ++k) {
        const float w_k = col[k];
        MOXE_PRAGMA_UNROLL
        for (int b = 0; b < kRows; ++b) acc[b] = fmaf(a_rows[b * lda + k], w_k, acc[b]);
      }
      MOXE_PRAGMA_UNROLL
      for (int b = 0; b < kRows; ++b) out[(b0 + b) * ldo + n] = acc[b];
    }
  }
}

/// Load from global memory through L2 only (data other blocks of this kernel wrote).
template <class T>
MOXE_DEVICE MOXE_FORCEINLINE T load_cg(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return __ldcg(p);
  } else {
    const unsigned short bits = __ldcg(reinterpret_cast<const unsigned short*>(p));
    T v;
    static_assert(sizeof(T) == 2, "16-bit element");
    memcpy(&v, &bits, 2);
    return v;
  }
}

}  // namespace moxe::slstm::detail
