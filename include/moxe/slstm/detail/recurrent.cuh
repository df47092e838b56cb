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
#pragma once

#include <cuda_runtime.h>
#include <mma.h>

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

/// out[b * ldo + n] = sum_k a_s[b * lda + k] * b_s[n * ldb + k], b < 16, n < kNcols (a
/// multiple of 16); K a multiple of 16 * kKSplit. Tensor cores: part q of K is
/// [q*K/kKSplit, (q+1)*K/kKSplit), summed in its own accumulator, the parts added in order;
/// float: one chain over all of K (kKSplit unused). Called by all kThreads threads; no
/// barrier inside.
template <class T, int kNcols, int kKSplit = 1>
MOXE_DEVICE MOXE_FORCEINLINE void block_product(const T* a_s, int lda, const T* b_s, int ldb, float* out,
                                                int ldo, int K) {
  static_assert(kNcols % 16 == 0 && kNcols > 0, "whole 16-column tiles");
  if constexpr (uses_tensor_cores_v<T>) {
    using namespace nvcuda;
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
