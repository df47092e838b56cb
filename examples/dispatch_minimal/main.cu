// dispatch_minimal: the dispatch round trip of an MoE layer with moxe::dispatch, in plain CUDA.
//   topk_idx -> routing_map -> permute -> (expert e scales its rows by e + 1) -> unpermute
// and a check against the same computation on the host. No host synchronisation between
// the steps: the segment sizes (expert_offsets) stay on the device.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <vector>

#include "moxe/dispatch/permute.cuh"

namespace md = moxe::dispatch;

#define CHECK_CUDA(expr)                                                                   \
  do {                                                                                     \
    const cudaError_t err_ = (expr);                                                       \
    if (err_ != cudaSuccess) {                                                             \
      std::fprintf(stderr, "%s failed: %s\n", #expr, cudaGetErrorString(err_));            \
      return 1;                                                                            \
    }                                                                                      \
  } while (0)

#define CHECK_MOXE(expr)                                                                   \
  do {                                                                                     \
    const moxe::Status s_ = (expr);                                                        \
    if (s_ != moxe::Status::ok) {                                                          \
      std::fprintf(stderr, "%s failed: %s\n", #expr, moxe::to_string(s_));                 \
      return 1;                                                                            \
    }                                                                                      \
  } while (0)

// The stand-in expert: each row of expert e's segment is multiplied by (e + 1). It reads the
// segments from expert_offsets on the device, as a grouped GEMM would.
__global__ void scale_by_expert(const float* xp, const int64_t* expert_offsets, int experts, int hidden, float* yp) {
  const int64_t row = blockIdx.x;
  if (row >= expert_offsets[experts]) return;
  int e = 0;
  while (expert_offsets[e + 1] <= row) ++e;
  for (int j = threadIdx.x; j < hidden; j += blockDim.x) yp[row * hidden + j] = xp[row * hidden + j] * float(e + 1);
}

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("no CUDA device: dispatch_minimal skipped\n");
    return 0;
  }
  // 6 tokens, hidden 8, 4 experts, top-2, segments padded to multiples of 4 rows
  const md::Dims dims{6, 8, 4, 2, /*capacity=*/-1, /*align=*/4};
  const std::vector<int32_t> topk = {0, 2, 1, 0, 3, 2, 0, 1, 2, -1, 1, 3};
  const std::vector<float> weight = {0.7f, 0.3f, 0.5f, 0.5f, 0.9f, 0.1f, 0.6f, 0.4f, 1.0f, 0.0f, 0.2f, 0.8f};
  std::vector<float> x(dims.tokens * dims.hidden);
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = 0.01f * float(i);
  const int64_t rows = md::permuted_rows(dims);  // worst case: T*K + E*(align-1)

  cudaStream_t stream;
  CHECK_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  int32_t *d_topk, *d_counts;
  int64_t *d_row_map, *d_offsets;
  float *d_x, *d_xp, *d_yp, *d_y, *d_w;
  CHECK_CUDA(cudaMalloc(&d_topk, topk.size() * sizeof(int32_t)));
  CHECK_CUDA(cudaMalloc(&d_counts, dims.experts * sizeof(int32_t)));
  CHECK_CUDA(cudaMalloc(&d_row_map, topk.size() * sizeof(int64_t)));
  CHECK_CUDA(cudaMalloc(&d_offsets, (dims.experts + 1) * sizeof(int64_t)));
  CHECK_CUDA(cudaMalloc(&d_x, x.size() * sizeof(float)));
  CHECK_CUDA(cudaMalloc(&d_xp, rows * dims.hidden * sizeof(float)));
  CHECK_CUDA(cudaMalloc(&d_yp, rows * dims.hidden * sizeof(float)));
  CHECK_CUDA(cudaMalloc(&d_y, x.size() * sizeof(float)));
  CHECK_CUDA(cudaMalloc(&d_w, weight.size() * sizeof(float)));
  // on `stream`: a non-blocking stream does not wait for the legacy stream, and a plain
  // cudaMemcpy from pageable memory can return before the data has landed
  CHECK_CUDA(cudaMemcpyAsync(d_topk, topk.data(), topk.size() * sizeof(int32_t), cudaMemcpyHostToDevice, stream));
  CHECK_CUDA(cudaMemcpyAsync(d_x, x.data(), x.size() * sizeof(float), cudaMemcpyHostToDevice, stream));
  CHECK_CUDA(cudaMemcpyAsync(d_w, weight.data(), weight.size() * sizeof(float), cudaMemcpyHostToDevice, stream));

  const md::RoutingMapParams map{dims, d_topk, d_row_map, d_offsets, d_counts};
  const md::PermuteParams<float> permute{dims, d_x, d_row_map, d_offsets, d_xp};
  const md::UnpermuteParams<float> unpermute{dims, d_yp, d_row_map, d_w, d_y};
  // one workspace serves every step (ask each, take the largest)
  const std::size_t ws_bytes = std::max(md::routing_map_workspace_size(map), md::permute_workspace_size(permute));
  void* ws = nullptr;
  CHECK_CUDA(cudaMalloc(&ws, ws_bytes));

  CHECK_MOXE(md::routing_map(map, ws, ws_bytes, stream));
  CHECK_MOXE(md::permute(permute, ws, ws_bytes, stream));
  scale_by_expert<<<static_cast<unsigned>(rows), 32, 0, stream>>>(d_xp, d_offsets, dims.experts, dims.hidden, d_yp);
  CHECK_CUDA(cudaGetLastError());
  CHECK_MOXE(md::unpermute(unpermute, nullptr, 0, stream));

  std::vector<float> y(x.size());
  std::vector<int64_t> offsets(dims.experts + 1);
  CHECK_CUDA(cudaMemcpyAsync(y.data(), d_y, y.size() * sizeof(float), cudaMemcpyDeviceToHost, stream));
  CHECK_CUDA(cudaMemcpyAsync(offsets.data(), d_offsets, offsets.size() * sizeof(int64_t), cudaMemcpyDeviceToHost,
                             stream));
  CHECK_CUDA(cudaStreamSynchronize(stream));

  // y[t] = sum_k w[t,k] * (idx[t,k] + 1) * x[t]
  double max_error = 0;
  for (int t = 0; t < dims.tokens; ++t) {
    double scale = 0;
    for (int k = 0; k < dims.top_k; ++k) {
      const int e = topk[t * dims.top_k + k];
      if (e >= 0) scale += weight[t * dims.top_k + k] * (e + 1);
    }
    for (int j = 0; j < dims.hidden; ++j) {
      const std::size_t i = std::size_t(t) * dims.hidden + j;
      max_error = std::max(max_error, std::abs(double(y[i]) - scale * x[i]));
    }
  }
  std::printf("expert segments (padded to %d rows):", dims.align);
  for (int e = 0; e < dims.experts; ++e) std::printf(" [%lld, %lld)", (long long)offsets[e], (long long)offsets[e + 1]);
  std::printf("\nmax |y - reference| = %.3g\n", max_error);

  cudaFree(ws);
  cudaFree(d_topk);
  cudaFree(d_counts);
  cudaFree(d_row_map);
  cudaFree(d_offsets);
  cudaFree(d_x);
  cudaFree(d_xp);
  cudaFree(d_yp);
  cudaFree(d_y);
  cudaFree(d_w);
  cudaStreamDestroy(stream);
  return max_error < 1e-5 ? 0 : 1;
}
