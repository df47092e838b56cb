// moxe::slstm::detail: the recurrent product of one block, gates[16][ncols] =
// A[16][K] * B[K][ncols] with B stored column by column (B(k, n) = b_s[n * ldb + k]), both
// operands in shared memory. Half and bf16 run on tensor cores (WMMA 16x16x16, float
// accumulate); float runs in full fp32 FFMA (no TF32). Every output column is one fixed
// sequence of multiply-adds, independent of how the units are split over blocks.
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

/// out[b * ldo + n] = sum_k a_s[b * lda + k] * b_s[n * ldb + k], b < 16, n < ncols (a
/// multiple of 16), K a multiple of 16. Called by all kThreads threads; no barrier inside.
template <class T>
MOXE_DEVICE MOXE_FORCEINLINE void block_product(const T* a_s, int lda, const T* b_s, int ldb, float* out,
                                                int ldo, int ncols, int K) {
  if constexpr (uses_tensor_cores_v<T>) {
    using namespace nvcuda;
    const int warp = static_cast<int>(threadIdx.x) / 32;
    for (int nt = warp; nt < ncols / 16; nt += kWarps) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.f);
      const T* b_tile = b_s + static_cast<size_t>(nt) * 16 * ldb;
      for (int k = 0; k < K; k += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;
        wmma::load_matrix_sync(fa, a_s + k, lda);
        wmma::load_matrix_sync(fb, b_tile + k, ldb);
        wmma::mma_sync(acc, fa, fb, acc);
      }
      wmma::store_matrix_sync(out + nt * 16, acc, ldo, wmma::mem_row_major);
    }
  } else {
    static_assert(std::is_same_v<T, float>, "fp32 path is for float");
    for (int n = static_cast<int>(threadIdx.x); n < ncols; n += kThreads) {
      float acc[kBatchTile];
      MOXE_PRAGMA_UNROLL
      for (int b = 0; b < kBatchTile; ++b) acc[b] = 0.f;
      const float* col = b_s + static_cast<size_t>(n) * ldb;
      for (int k = 0; k < K; ++k) {
        const float w = col[k];
        MOXE_PRAGMA_UNROLL
        for (int b = 0; b < kBatchTile; ++b) acc[b] = fmaf(a_s[b * lda + k], w, acc[b]);
      }
      MOXE_PRAGMA_UNROLL
      for (int b = 0; b < kBatchTile; ++b) out[b * ldo + n] = acc[b];
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
