// The small dense ops of the MoxE layer example on the device: the cuBLAS linear, the
// group norm (LayerNorm and multi-head norm), the causal depthwise conv + SiLU, the gated
// GELU, the mixer mLSTM block's output gate, residual adds, the layout changes between
// token rows and the cells' layouts, and the expert-row bookkeeping built from the
// dispatch's outputs. They mirror ops_reference.hpp (forward only); every kernel computes
// in float and reads/writes the element type T (float or __nv_bfloat16).
//
// Conventions as on the host: row-major activations [rows, features], row = b * S + s; a
// matrix argument with an `ld` has its rows ld elements apart (so a kernel or GEMM can read
// or write a block of columns of a wider buffer in place).
#pragma once

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "moxe/core/launch.cuh"
#include "moxe/core/math.hpp"
#include "moxe/core/numeric.cuh"
#include "moxe/core/reduce.cuh"
#include "moxe/core/status.hpp"

#define MOXE_LAYER_CUDA_TRY(expr)                                      \
  do {                                                                 \
    if ((expr) != cudaSuccess) return ::moxe::Status::cuda_error;      \
  } while (0)

#define MOXE_LAYER_CUBLAS_TRY(expr)                                         \
  do {                                                                      \
    if ((expr) != CUBLAS_STATUS_SUCCESS) return ::moxe::Status::cuda_error; \
  } while (0)

namespace moxe_layer::device {

using moxe::Status;

inline constexpr int kThreads = 256;
inline constexpr int kWarpsPerBlock = kThreads / moxe::kWarpSize;

/// Blocks for a grid-stride loop over n items (at least one, at most a bounded grid).
inline unsigned grid_for(int64_t n, int64_t items_per_block = kThreads) {
  const int64_t blocks = (n + items_per_block - 1) / items_per_block;
  return static_cast<unsigned>(std::clamp<int64_t>(blocks, 1, int64_t(1) << 16));
}

__device__ inline int64_t grid_start() { return int64_t(blockIdx.x) * blockDim.x + threadIdx.x; }
__device__ inline int64_t grid_stride() { return int64_t(gridDim.x) * blockDim.x; }

__device__ inline float silu(float x) { return x * moxe::math::sigmoid(x); }
/// The exact (erf) GELU, as torch.nn.GELU() and ops::gelu.
__device__ inline float gelu(float x) { return 0.5f * x * (1.f + erff(x * 0.70710678118654752f)); }

/// Keeps an argument out of template deduction (a null bias is then fine).
template <class U>
struct no_deduce {
  using type = U;
};
template <class U>
using no_deduce_t = typename no_deduce<U>::type;

template <class T>
__device__ inline float load(const T* p, int64_t i) {
  return moxe::to_float(p[i]);
}
template <class T>
__device__ inline void store(T* p, int64_t i, float v) {
  p[i] = moxe::from_float<T>(v);
}

// ---- linear (cuBLAS) ---------------------------------------------------------------------

template <class T>
constexpr cudaDataType_t cuda_data_type() {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, __nv_bfloat16>, "float or bf16");
  return std::is_same_v<T, float> ? CUDA_R_32F : CUDA_R_16BF;
}

template <class T>
__global__ void add_bias_kernel(T* y, int64_t ldy, int64_t rows, int64_t out, const T* bias) {
  for (int64_t i = grid_start(); i < rows * out; i += grid_stride()) {
    const int64_t r = i / out, o = i % out;
    store(y, r * ldy + o, load(y, r * ldy + o) + load(bias, o));
  }
}

/// y[n, o] = sum_i x[n, i] w[o, i] + b[o] (w [out, in] as torch.nn.Linear; b may be null),
/// or y += that with `accumulate` (residual branches). fp32 accumulation; float operands
/// stay in full fp32 (no TF32), bf16 operands use the tensor cores.
template <class T>
Status linear_forward(cublasHandle_t handle, const T* x, int64_t ldx, int64_t rows, int64_t in, const T* w,
                      const no_deduce_t<T>* b, int64_t out, T* y, int64_t ldy, bool accumulate,
                      cudaStream_t stream) {
  if (rows == 0) return Status::ok;
  const float alpha = 1.f, beta = accumulate ? 1.f : 0.f;
  // Row-major y[rows, out] is the column-major [out, rows] matrix W x^T.
  MOXE_LAYER_CUBLAS_TRY(cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, int(out), int(rows), int(in), &alpha, w,
                                     cuda_data_type<T>(), int(in), x, cuda_data_type<T>(), int(ldx), &beta, y,
                                     cuda_data_type<T>(), int(ldy), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  if (b != nullptr) {
    MOXE_RETURN_IF_ERROR(
        moxe::launch_kernel(add_bias_kernel<T>, grid_for(rows * out), kThreads, 0, stream, y, ldy, rows, out, b));
    return moxe::check_launch(stream);
  }
  return Status::ok;
}

// ---- group norm: LayerNorm (groups = 1) and the multi-head norm (groups = heads) ----------

/// One warp per (row, group): y = (x - mean) rstd w (+ b), statistics in float.
template <class T>
__global__ void group_norm_kernel(const T* x, int64_t ldx, int64_t rows, int groups, int size, const T* w,
                                  const T* b, float eps, T* y, int64_t ldy) {
  const int lane = int(threadIdx.x) % moxe::kWarpSize;
  const int64_t first = int64_t(blockIdx.x) * kWarpsPerBlock + int(threadIdx.x) / moxe::kWarpSize;
  for (int64_t g = first; g < rows * groups; g += int64_t(gridDim.x) * kWarpsPerBlock) {
    const int64_t row = g / groups, c0 = (g % groups) * int64_t(size);
    const T* xg = x + row * ldx + c0;
    float sum = 0.f;
    for (int i = lane; i < size; i += moxe::kWarpSize) sum += load(xg, i);
    const float mean = moxe::warp_sum(sum) / float(size);
    float sq = 0.f;
    for (int i = lane; i < size; i += moxe::kWarpSize) {
      const float d = load(xg, i) - mean;
      sq += d * d;
    }
    const float rstd = 1.f / sqrtf(moxe::warp_sum(sq) / float(size) + eps);
    for (int i = lane; i < size; i += moxe::kWarpSize) {
      const float v = (load(xg, i) - mean) * rstd * load(w, c0 + i) + (b ? load(b, c0 + i) : 0.f);
      store(y, row * ldy + c0 + i, v);
    }
  }
}

template <class T>
Status group_norm_forward(const T* x, int64_t ldx, int64_t rows, int64_t groups, int64_t size, const T* w,
                          const no_deduce_t<T>* b, float eps, T* y, int64_t ldy, cudaStream_t stream) {
  if (rows == 0) return Status::ok;
  MOXE_RETURN_IF_ERROR(moxe::launch_kernel(group_norm_kernel<T>, grid_for(rows * groups, kWarpsPerBlock), kThreads, 0,
                                           stream, x, ldx, rows, int(groups), int(size), w, b, eps, y, ldy));
  return moxe::check_launch(stream);
}

template <class T>
Status layer_norm_forward(const T* x, int64_t rows, int64_t size, const T* w, const no_deduce_t<T>* b, float eps, T* y,
                          cudaStream_t stream) {
  return group_norm_forward(x, size, rows, 1, size, w, b, eps, y, size, stream);
}

// ---- causal depthwise conv (+ SiLU) over the sequence -------------------------------------

/// y[b, t, c] = SiLU(bias[c] + sum_j w[c, j] x[b, t - (width - 1) + j, c]); x rows ldx
/// apart (a column block of a wider buffer), y contiguous [B * S, C].
template <class T>
__global__ void causal_conv_silu_kernel(const T* x, int64_t ldx, int64_t batch, int64_t seq, int64_t channels,
                                        const T* w, const T* bias, int width, T* y) {
  for (int64_t i = grid_start(); i < batch * seq * channels; i += grid_stride()) {
    const int64_t c = i % channels, row = i / channels, t = row % seq;
    float acc = load(bias, c);
    for (int j = 0; j < width; ++j) {
      const int64_t src = t - (width - 1) + j;
      if (src >= 0) acc += load(w, c * width + j) * load(x, (row - t + src) * ldx + c);
    }
    store(y, i, silu(acc));
  }
}

template <class T>
Status causal_conv_silu_forward(const T* x, int64_t ldx, int64_t batch, int64_t seq, int64_t channels, const T* w,
                                const T* bias, int64_t width, T* y, cudaStream_t stream) {
  MOXE_RETURN_IF_ERROR(moxe::launch_kernel(causal_conv_silu_kernel<T>, grid_for(batch * seq * channels), kThreads, 0,
                                           stream, x, ldx, batch, seq, channels, w, bias, int(width), y));
  return moxe::check_launch(stream);
}

// ---- elementwise ---------------------------------------------------------------------------

/// act[t, j] = GELU(up[t, j]) * up[t, F + j]: the gated FFN (up = [gate ; branch]).
template <class T>
__global__ void gated_gelu_kernel(const T* up, int64_t rows, int64_t f, T* act) {
  for (int64_t i = grid_start(); i < rows * f; i += grid_stride()) {
    const int64_t t = i / f, j = i % f;
    store(act, i, gelu(load(up, t * 2 * f + j)) * load(up, t * 2 * f + f + j));
  }
}

template <class T>
Status gated_gelu_forward(const T* up, int64_t rows, int64_t f, T* act, cudaStream_t stream) {
  MOXE_RETURN_IF_ERROR(
      moxe::launch_kernel(gated_gelu_kernel<T>, grid_for(rows * f), kThreads, 0, stream, up, rows, f, act));
  return moxe::check_launch(stream);
}

/// The mixer mLSTM block's output: o = (hn + skip * xc) * SiLU(z), z in columns [di, 2di)
/// of up [rows, 2di].
template <class T>
__global__ void mlstm_block_output_kernel(const T* hn, const T* xc, const T* skip, const T* up, int64_t rows,
                                          int64_t di, T* o) {
  for (int64_t i = grid_start(); i < rows * di; i += grid_stride()) {
    const int64_t t = i / di, j = i % di;
    const float hs = load(hn, i) + load(skip, j) * load(xc, i);
    store(o, i, hs * silu(load(up, t * 2 * di + di + j)));
  }
}

template <class T>
Status mlstm_block_output(const T* hn, const T* xc, const T* skip, const T* up, int64_t rows, int64_t di, T* o,
                          cudaStream_t stream) {
  MOXE_RETURN_IF_ERROR(moxe::launch_kernel(mlstm_block_output_kernel<T>, grid_for(rows * di), kThreads, 0, stream, hn,
                                           xc, skip, up, rows, di, o));
  return moxe::check_launch(stream);
}

/// y = a + b (residual streams), n elements.
template <class T>
__global__ void add_kernel(const T* a, const T* b, int64_t n, T* y) {
  for (int64_t i = grid_start(); i < n; i += grid_stride()) store(y, i, load(a, i) + load(b, i));
}

template <class T>
Status add(const T* a, const T* b, int64_t n, T* y, cudaStream_t stream) {
  MOXE_RETURN_IF_ERROR(moxe::launch_kernel(add_kernel<T>, grid_for(n), kThreads, 0, stream, a, b, n, y));
  return moxe::check_launch(stream);
}

// ---- layouts: token rows <-> the cells' layouts --------------------------------------------

/// rows[(b * S + s) * ld + col0 + h * dh + d]  <->  cell[((b * NH + h) * S + s) * dh + d]
/// (the mLSTM layout [B, NH, S, dh]); one kernel for both directions.
template <class T, bool kToCell>
__global__ void rows_cell_kernel(const T* src, T* dst, int64_t ld, int64_t col0, int64_t batch, int64_t seq,
                                 int64_t heads, int64_t dh) {
  for (int64_t i = grid_start(); i < batch * heads * seq * dh; i += grid_stride()) {
    const int64_t d = i % dh, s = (i / dh) % seq, h = (i / (dh * seq)) % heads, b = i / (dh * seq * heads);
    const int64_t row = (b * seq + s) * ld + col0 + h * dh + d;
    if constexpr (kToCell) {
      dst[i] = src[row];
    } else {
      dst[row] = src[i];
    }
  }
}

template <class T>
Status rows_to_mlstm(const T* rows, int64_t ld, int64_t col0, int64_t batch, int64_t seq, int64_t heads, int64_t dh,
                     T* cell, cudaStream_t stream) {
  MOXE_RETURN_IF_ERROR(moxe::launch_kernel(rows_cell_kernel<T, true>, grid_for(batch * heads * seq * dh), kThreads, 0, stream,
                                     rows, cell, ld, col0, batch, seq, heads, dh));
  return moxe::check_launch(stream);
}

template <class T>
Status mlstm_to_rows(const T* cell, int64_t batch, int64_t seq, int64_t heads, int64_t dh, T* rows, int64_t ld,
                     int64_t col0, cudaStream_t stream) {
  MOXE_RETURN_IF_ERROR(moxe::launch_kernel(rows_cell_kernel<T, false>, grid_for(batch * heads * seq * dh), kThreads, 0,
                                     stream, cell, rows, ld, col0, batch, seq, heads, dh));
  return moxe::check_launch(stream);
}

/// dst[j, i, :] = src[i, j, :] for src [outer, inner, width]: [B, S, W] <-> [S, B, W] (the
/// sLSTM layout is sequence-major).
template <class T>
__global__ void swap_outer_kernel(const T* src, int64_t outer, int64_t inner, int64_t width, T* dst) {
  for (int64_t x = grid_start(); x < outer * inner * width; x += grid_stride()) {
    const int64_t c = x % width, j = (x / width) % inner, i = x / (width * inner);
    dst[(j * outer + i) * width + c] = src[x];
  }
}

template <class T>
Status swap_outer(const T* src, int64_t outer, int64_t inner, int64_t width, T* dst, cudaStream_t stream) {
  MOXE_RETURN_IF_ERROR(moxe::launch_kernel(swap_outer_kernel<T>, grid_for(outer * inner * width), kThreads, 0, stream,
                                           src, outer, inner, width, dst));
  return moxe::check_launch(stream);
}

// ---- expert-row bookkeeping (from the dispatch's row map, all on the device) --------------

/// sequence_of_row[row_map[t, k]] = t / seq_len: the batch sequence behind each permuted row.
/// (Index = int64_t; a template so that the header can be included by several files.)
template <class Index>
__global__ void sequence_of_row_kernel(const Index* row_map, Index tokens, int top_k, Index seq_len,
                                       Index* sequence_of_row) {
  for (int64_t tk = grid_start(); tk < tokens * top_k; tk += grid_stride()) {
    const Index row = row_map[tk];
    if (row >= 0) sequence_of_row[row] = (tk / top_k) / seq_len;
  }
}

/// segment_offsets[e * B + b] = the first row of expert e that comes from sequence b (rows of
/// an expert are in token order, so their sequences are sorted: a binary search);
/// segment_offsets[E * B] = expert_offsets[E]. Segments (e, b) are the stateful experts'
/// recurrences, and may be empty.
template <class Index>
__global__ void segment_offsets_kernel(const Index* expert_offsets, const Index* sequence_of_row, int experts,
                                       Index batch, Index* segment_offsets) {
  for (int64_t i = grid_start(); i <= experts * batch; i += grid_stride()) {
    if (i == experts * batch) {
      segment_offsets[i] = expert_offsets[experts];
      continue;
    }
    const Index e = i / batch, b = i % batch;
    Index lo = expert_offsets[e], hi = expert_offsets[e + 1];
    while (lo < hi) {  // first row whose sequence is >= b
      const Index mid = lo + (hi - lo) / 2;
      if (sequence_of_row[mid] < b) {
        lo = mid + 1;
      } else {
        hi = mid;
      }
    }
    segment_offsets[i] = lo;
  }
}

inline Status expert_segments(const int64_t* row_map, const int64_t* expert_offsets, int64_t tokens, int top_k,
                              int64_t seq_len, int experts, int64_t batch, int64_t* sequence_of_row,
                              int64_t* segment_offsets, cudaStream_t stream) {
  MOXE_RETURN_IF_ERROR(moxe::launch_kernel(sequence_of_row_kernel<int64_t>, grid_for(tokens * top_k), kThreads, 0, stream,
                                     row_map, tokens, top_k, seq_len, sequence_of_row));
  MOXE_RETURN_IF_ERROR(moxe::launch_kernel(segment_offsets_kernel<int64_t>, grid_for(experts * batch + 1), kThreads, 0,
                                     stream, expert_offsets, sequence_of_row, experts, batch, segment_offsets));
  return moxe::check_launch(stream);
}

/// Expert rows [row0, row0 + n) of rows [*, width]  <->  a padded sLSTM batch cell
/// [longest, B, width]: row r of sequence b goes to step r - segment_offsets[b] (the
/// expert's B + 1 segment offsets). The padding cells are zeroed by the caller.
template <class T, bool kToCell>
__global__ void rows_padded_kernel(const T* src, T* dst, int64_t row0, int64_t n, int64_t width,
                                   const int64_t* sequence_of_row, const int64_t* segment_offsets, int64_t batch) {
  for (int64_t i = grid_start(); i < n * width; i += grid_stride()) {
    const int64_t row = row0 + i / width, c = i % width, b = sequence_of_row[row];
    const int64_t cell = ((row - segment_offsets[b]) * batch + b) * width + c;
    if constexpr (kToCell) {
      dst[cell] = src[row * width + c];
    } else {
      dst[row * width + c] = src[cell];
    }
  }
}

template <class T>
Status rows_to_padded(const T* rows, int64_t row0, int64_t n, int64_t width, const int64_t* sequence_of_row,
                      const int64_t* segment_offsets, int64_t batch, int64_t longest, T* cell, cudaStream_t stream) {
  MOXE_LAYER_CUDA_TRY(cudaMemsetAsync(cell, 0, sizeof(T) * longest * batch * width, stream));
  MOXE_RETURN_IF_ERROR(moxe::launch_kernel(rows_padded_kernel<T, true>, grid_for(n * width), kThreads, 0, stream, rows, cell,
                                     row0, n, width, sequence_of_row, segment_offsets, batch));
  return moxe::check_launch(stream);
}

template <class T>
Status padded_to_rows(const T* cell, int64_t row0, int64_t n, int64_t width, const int64_t* sequence_of_row,
                      const int64_t* segment_offsets, int64_t batch, T* rows, cudaStream_t stream) {
  MOXE_RETURN_IF_ERROR(moxe::launch_kernel(rows_padded_kernel<T, false>, grid_for(n * width), kThreads, 0, stream, cell, rows,
                                     row0, n, width, sequence_of_row, segment_offsets, batch));
  return moxe::check_launch(stream);
}

// =============================================================================================
// Backward. As in ops_reference.hpp the parameter gradients are ADDED into (zero them once);
// the input gradients are added into too unless a function says it writes. Every reduction
// over rows has a fixed order (column_reduce): deterministic, no atomics.
// =============================================================================================

__device__ inline float silu_grad(float x) {
  const float s = moxe::math::sigmoid(x);
  return s * (1.f + x * (1.f - s));
}
__device__ inline float gelu_grad(float x) {
  return 0.5f * (1.f + erff(x * 0.70710678118654752f)) + x * expf(-0.5f * x * x) * 0.39894228040143268f;
}

// ---- column reductions: out[c] += sum_r term(r, c), in two deterministic passes ------------
// Pass 1 sums fixed chunks of rows per column into float partials [chunks, cols]; pass 2
// adds the chunks in order. (One thread per column over all rows would leave the GPU idle.)

inline constexpr int64_t kReduceRowsPerChunk = 256;
inline constexpr int64_t kReduceMaxChunks = 128;

/// Floats of scratch a column reduction over `cols` columns needs (any number of rows).
inline int64_t column_reduce_scratch(int64_t cols) { return kReduceMaxChunks * cols; }

template <class Term>
__global__ void column_partials_kernel(const Term term, int64_t rows, int64_t cols, int64_t chunk_rows,
                                       float* partial) {
  const int64_t chunk = blockIdx.y, r0 = chunk * chunk_rows;
  const int64_t r1 = r0 + chunk_rows < rows ? r0 + chunk_rows : rows;
  for (int64_t c = grid_start(); c < cols; c += grid_stride()) {
    float acc = 0.f;
    for (int64_t r = r0; r < r1; ++r) acc += term(r, c);
    partial[chunk * cols + c] = acc;
  }
}

template <class T>
__global__ void add_column_partials_kernel(const float* partial, int64_t chunks, int64_t cols, T* out) {
  for (int64_t c = grid_start(); c < cols; c += grid_stride()) {
    float acc = 0.f;
    for (int64_t k = 0; k < chunks; ++k) acc += partial[k * cols + c];
    store(out, c, load(out, c) + acc);
  }
}

/// out[c] += sum_r term(r, c) for c < cols; scratch: column_reduce_scratch(cols) floats.
template <class T, class Term>
Status column_reduce(const Term& term, int64_t rows, int64_t cols, float* scratch, T* out, cudaStream_t stream) {
  if (rows == 0 || cols == 0) return Status::ok;
  const int64_t chunks =
      std::clamp<int64_t>((rows + kReduceRowsPerChunk - 1) / kReduceRowsPerChunk, 1, kReduceMaxChunks);
  const int64_t chunk_rows = (rows + chunks - 1) / chunks;
  const dim3 grid(grid_for(cols), static_cast<unsigned>((rows + chunk_rows - 1) / chunk_rows));
  MOXE_RETURN_IF_ERROR(moxe::launch_kernel(column_partials_kernel<Term>, grid, kThreads, 0, stream, term, rows, cols,
                                           chunk_rows, scratch));
  MOXE_RETURN_IF_ERROR(moxe::launch_kernel(add_column_partials_kernel<T>, grid_for(cols), kThreads, 0, stream, scratch,
                                           int64_t(grid.y), cols, out));
  return moxe::check_launch(stream);
}

/// term(r, c) = a[r, c] (* b[r, c] when b is given).
template <class T>
struct ProductTerm {
  const T* a;
  int64_t lda;
  const T* b;
  int64_t ldb;
  __device__ float operator()(int64_t r, int64_t c) const {
    return load(a, r * lda + c) * (b ? load(b, r * ldb + c) : 1.f);
  }
};

/// out[c] += sum_r a[r * lda + c] (* b[r * ldb + c] when b is given), c < cols.
template <class T>
Status column_sums(const T* a, int64_t lda, const no_deduce_t<T>* b, int64_t ldb, int64_t rows, int64_t cols,
                   T* out, float* scratch, cudaStream_t stream) {
  return column_reduce(ProductTerm<T>{a, lda, b, ldb}, rows, cols, scratch, out, stream);
}

/// The backward of linear_forward: dx (+)= dy w (dx may be null; `accumulate_dx` false
/// overwrites it), dw += dy^T x, db += sum_n dy (db may be null; scratch: column_reduce_scratch(out)).
template <class T>
Status linear_backward(cublasHandle_t handle, const T* x, int64_t ldx, int64_t rows, int64_t in, const T* w,
                       int64_t out, const T* dy, int64_t lddy, T* dx, int64_t lddx, bool accumulate_dx, T* dw,
                       T* db, float* scratch, cudaStream_t stream) {
  if (rows == 0) return Status::ok;
  const float one = 1.f, zero = 0.f;
  const cudaDataType_t type = cuda_data_type<T>();
  if (dx != nullptr) {  // column-major dx^T [in, rows] = W^T [in, out] dy^T [out, rows]
    MOXE_LAYER_CUBLAS_TRY(cublasGemmEx(handle, CUBLAS_OP_N, CUBLAS_OP_N, int(in), int(rows), int(out), &one, w, type,
                                       int(in), dy, type, int(lddy), accumulate_dx ? &one : &zero, dx, type,
                                       int(lddx), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  }
  // column-major dw^T [in, out] += x^T [in, rows] dy [rows, out]
  MOXE_LAYER_CUBLAS_TRY(cublasGemmEx(handle, CUBLAS_OP_N, CUBLAS_OP_T, int(in), int(out), int(rows), &one, x, type,
                                     int(ldx), dy, type, int(lddy), &one, dw, type, int(in), CUBLAS_COMPUTE_32F,
                                     CUBLAS_GEMM_DEFAULT));
  if (db != nullptr) return column_sums<T>(dy, lddy, nullptr, 0, rows, out, db, scratch, stream);
  return Status::ok;
}

/// Group norm backward, part 1, one warp per (row, group): the statistics of x again (saved
/// to mean_rstd [rows * groups, 2] for part 2) and dx (+)= rstd (gh - mean(gh) - xhat
/// mean(gh xhat)), gh = dy w.
template <class T>
__global__ void group_norm_backward_kernel(const T* x, int64_t ldx, const T* dy, int64_t lddy, int64_t rows,
                                           int groups, int size, const T* w, float eps, T* dx, int64_t lddx,
                                           bool accumulate, float* mean_rstd) {
  const int lane = int(threadIdx.x) % moxe::kWarpSize;
  const int64_t first = int64_t(blockIdx.x) * kWarpsPerBlock + int(threadIdx.x) / moxe::kWarpSize;
  for (int64_t g = first; g < rows * groups; g += int64_t(gridDim.x) * kWarpsPerBlock) {
    const int64_t row = g / groups, c0 = (g % groups) * int64_t(size);
    const T* xg = x + row * ldx + c0;
    const T* dyg = dy + row * lddy + c0;
    float sum = 0.f;
    for (int i = lane; i < size; i += moxe::kWarpSize) sum += load(xg, i);
    const float mean = moxe::warp_sum(sum) / float(size);
    float sq = 0.f;
    for (int i = lane; i < size; i += moxe::kWarpSize) {
      const float d = load(xg, i) - mean;
      sq += d * d;
    }
    const float rstd = 1.f / sqrtf(moxe::warp_sum(sq) / float(size) + eps);
    float gh_sum = 0.f, gh_xh_sum = 0.f;
    for (int i = lane; i < size; i += moxe::kWarpSize) {
      const float gh = load(dyg, i) * load(w, c0 + i);
      gh_sum += gh;
      gh_xh_sum += gh * (load(xg, i) - mean) * rstd;
    }
    const float mean_gh = moxe::warp_sum(gh_sum) / float(size);
    const float mean_gh_xh = moxe::warp_sum(gh_xh_sum) / float(size);
    for (int i = lane; i < size; i += moxe::kWarpSize) {
      const float xh = (load(xg, i) - mean) * rstd, gh = load(dyg, i) * load(w, c0 + i);
      const int64_t j = row * lddx + c0 + i;
      store(dx, j, (accumulate ? load(dx, j) : 0.f) + rstd * (gh - mean_gh - xh * mean_gh_xh));
    }
    if (lane == 0) {
      mean_rstd[2 * g] = mean;
      mean_rstd[2 * g + 1] = rstd;
    }
  }
}

/// Group norm backward, part 2: term(r, c) = dy xhat (the weight) or dy (the bias).
template <class T>
struct NormParamTerm {
  const T* x;
  int64_t ldx;
  const T* dy;
  int64_t lddy;
  int groups, size;
  const float* mean_rstd;
  bool weight;
  __device__ float operator()(int64_t r, int64_t c) const {
    const float d = load(dy, r * lddy + c);
    if (!weight) return d;
    const float* st = mean_rstd + 2 * (r * groups + c / size);
    return d * (load(x, r * ldx + c) - st[0]) * st[1];
  }
};

/// dx (+)= the gradient through y = group_norm(x); dw += , db += (db may be null).
/// mean_rstd: rows * groups * 2 floats; scratch: column_reduce_scratch(groups * size).
template <class T>
Status group_norm_backward(const T* x, int64_t ldx, const T* dy, int64_t lddy, int64_t rows, int64_t groups,
                           int64_t size, const T* w, float eps, T* dx, int64_t lddx, bool accumulate, T* dw,
                           no_deduce_t<T>* db, float* mean_rstd, float* scratch, cudaStream_t stream) {
  if (rows == 0) return Status::ok;
  MOXE_RETURN_IF_ERROR(moxe::launch_kernel(group_norm_backward_kernel<T>, grid_for(rows * groups, kWarpsPerBlock),
                                           kThreads, 0, stream, x, ldx, dy, lddy, rows, int(groups), int(size), w, eps,
                                           dx, lddx, accumulate, mean_rstd));
  NormParamTerm<T> term{x, ldx, dy, lddy, int(groups), int(size), mean_rstd, true};
  MOXE_RETURN_IF_ERROR(column_reduce(term, rows, groups * size, scratch, dw, stream));
  if (db == nullptr) return Status::ok;
  term.weight = false;
  return column_reduce(term, rows, groups * size, scratch, db, stream);
}

/// dconv = dact * SiLU'(conv(x)) with the conv recomputed (the forward kept only its SiLU).
template <class T>
__global__ void conv_silu_grad_kernel(const T* x, int64_t ldx, int64_t batch, int64_t seq, int64_t channels,
                                      const T* w, const T* bias, int width, const T* dact, T* dconv) {
  for (int64_t i = grid_start(); i < batch * seq * channels; i += grid_stride()) {
    const int64_t c = i % channels, row = i / channels, t = row % seq;
    float acc = load(bias, c);
    for (int j = 0; j < width; ++j) {
      const int64_t src = t - (width - 1) + j;
      if (src >= 0) acc += load(w, c * width + j) * load(x, (row - t + src) * ldx + c);
    }
    store(dconv, i, load(dact, i) * silu_grad(acc));
  }
}

/// dx[b, s, c] += sum_j w[c, j] dconv[b, s + (width - 1) - j, c] (a gather: no atomics).
template <class T>
__global__ void conv_input_grad_kernel(const T* dconv, int64_t batch, int64_t seq, int64_t channels, const T* w,
                                       int width, T* dx, int64_t lddx) {
  for (int64_t i = grid_start(); i < batch * seq * channels; i += grid_stride()) {
    const int64_t c = i % channels, row = i / channels, s = row % seq;
    float acc = 0.f;
    for (int j = 0; j < width; ++j) {
      const int64_t t = s + (width - 1) - j;
      if (t < seq) acc += load(w, c * width + j) * load(dconv, (row - s + t) * channels + c);
    }
    const int64_t k = row * lddx + c;
    store(dx, k, load(dx, k) + acc);
  }
}

/// term(row, c * width + j) = dconv[row, c] x[row - (width - 1) + j, c] (zero before t = 0):
/// the conv weight gradient dw[c, j] as a column reduction over the (b, t) rows.
template <class T>
struct ConvWeightTerm {
  const T* x;
  int64_t ldx;
  const T* dconv;
  int64_t seq, channels;
  int width;
  __device__ float operator()(int64_t row, int64_t cj) const {
    const int64_t c = cj / width, t = row % seq, src = t - (width - 1) + cj % width;
    return src >= 0 ? load(dconv, row * channels + c) * load(x, (row - t + src) * ldx + c) : 0.f;
  }
};

/// The backward of causal_conv_silu_forward: dx += (rows lddx apart), dw +=, dbias +=.
/// dconv: [B * S, C] of T; scratch: column_reduce_scratch(C * width) floats.
template <class T>
Status causal_conv_silu_backward(const T* x, int64_t ldx, int64_t batch, int64_t seq, int64_t channels, const T* w,
                                 const T* bias, int64_t width, const T* dact, T* dconv, T* dx, int64_t lddx, T* dw,
                                 T* dbias, float* scratch, cudaStream_t stream) {
  const int64_t n = batch * seq * channels;
  MOXE_RETURN_IF_ERROR(moxe::launch_kernel(conv_silu_grad_kernel<T>, grid_for(n), kThreads, 0, stream, x, ldx, batch,
                                           seq, channels, w, bias, int(width), dact, dconv));
  MOXE_RETURN_IF_ERROR(moxe::launch_kernel(conv_input_grad_kernel<T>, grid_for(n), kThreads, 0, stream, dconv, batch,
                                           seq, channels, w, int(width), dx, lddx));
  MOXE_RETURN_IF_ERROR(column_reduce(ConvWeightTerm<T>{x, ldx, dconv, seq, channels, int(width)}, batch * seq,
                                     channels * width, scratch, dw, stream));
  return column_sums<T>(dconv, channels, nullptr, 0, batch * seq, channels, dbias, scratch, stream);
}

/// dup[t, j] = dact up[t, F + j] GELU'(up[t, j]);  dup[t, F + j] = dact GELU(up[t, j]) (writes).
template <class T>
__global__ void gated_gelu_backward_kernel(const T* up, const T* dact, int64_t rows, int64_t f, T* dup) {
  for (int64_t i = grid_start(); i < rows * f; i += grid_stride()) {
    const int64_t t = i / f, j = i % f;
    const float g = load(up, t * 2 * f + j), a = load(up, t * 2 * f + f + j), d = load(dact, i);
    store(dup, t * 2 * f + j, d * a * gelu_grad(g));
    store(dup, t * 2 * f + f + j, d * gelu(g));
  }
}

template <class T>
Status gated_gelu_backward(const T* up, const T* dact, int64_t rows, int64_t f, T* dup, cudaStream_t stream) {
  MOXE_RETURN_IF_ERROR(moxe::launch_kernel(gated_gelu_backward_kernel<T>, grid_for(rows * f), kThreads, 0, stream, up,
                                           dact, rows, f, dup));
  return moxe::check_launch(stream);
}

/// The backward of mlstm_block_output (writes): dhs = do SiLU(z); dz = do hs SiLU'(z) into
/// columns [di, 2di) of dup; dxc = dhs skip. (dskip += sum_t dhs xc: column_sums.)
template <class T>
__global__ void mlstm_block_output_backward_kernel(const T* hn, const T* xc, const T* skip, const T* up, const T* d_o,
                                                   int64_t rows, int64_t di, T* dhs, T* dup, T* dxc) {
  for (int64_t i = grid_start(); i < rows * di; i += grid_stride()) {
    const int64_t t = i / di, j = i % di;
    const float z = load(up, t * 2 * di + di + j), d = load(d_o, i);
    const float hs = load(hn, i) + load(skip, j) * load(xc, i);
    const float g = d * silu(z);
    store(dhs, i, g);
    store(dup, t * 2 * di + di + j, d * hs * silu_grad(z));
    store(dxc, i, g * load(skip, j));
  }
}

template <class T>
Status mlstm_block_output_backward(const T* hn, const T* xc, const T* skip, const T* up, const T* d_o, int64_t rows,
                                   int64_t di, T* dhs, T* dup, T* dxc, cudaStream_t stream) {
  MOXE_RETURN_IF_ERROR(moxe::launch_kernel(mlstm_block_output_backward_kernel<T>, grid_for(rows * di), kThreads, 0,
                                           stream, hn, xc, skip, up, d_o, rows, di, dhs, dup, dxc));
  return moxe::check_launch(stream);
}

/// dst[:, col0 : col0 + cols] = src [rows, cols] (a strided 2-D copy on the stream).
template <class T>
Status copy_into_columns(const T* src, int64_t rows, int64_t cols, T* dst, int64_t ldd, int64_t col0,
                         cudaStream_t stream) {
  MOXE_LAYER_CUDA_TRY(cudaMemcpy2DAsync(dst + col0, sizeof(T) * ldd, src, sizeof(T) * cols, sizeof(T) * cols,
                                        std::size_t(rows), cudaMemcpyDeviceToDevice, stream));
  return Status::ok;
}

}  // namespace moxe_layer::device
