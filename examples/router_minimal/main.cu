// router_minimal: the fused entropy-aware gate in a plain CUDA program.
//
// The caller's gate GEMM makes one [T, E + 1] matrix: the E router logits and, in column E,
// the difficulty pre-activation. The gate reads both from it (logits_stride = E + 1),
// routes every token to its top-k experts, reports the four losses, and the backward turns
// the gradient of the routing weights plus the loss coefficients into the gradient of that
// same matrix. Exits 0 when the device agrees with the host reference (and when no device
// is present).
#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "moxe/router/gate.cuh"
#include "moxe/router/reference.hpp"

#define CHECK_CUDA(x)                                                        \
  do {                                                                       \
    if ((x) != cudaSuccess) {                                                \
      std::printf("CUDA error %s at %s:%d\n", #x, __FILE__, __LINE__);       \
      return 1;                                                              \
    }                                                                        \
  } while (0)

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("router_minimal: no CUDA device, nothing to do\n");
    return 0;
  }
  constexpr int64_t T = 1000;
  constexpr int E = 8, K = 2, Em = E / 2, W = E + 1;
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.f, 1.5f);
  std::vector<__nv_bfloat16> gemm_out(T * W);
  std::vector<double> gemm_ref(T * W);
  for (int64_t i = 0; i < T * W; ++i) {
    gemm_out[i] = __float2bfloat16(normal(rng));
    gemm_ref[i] = __bfloat162float(gemm_out[i]);
  }
  std::vector<float> dweight(T * K, 0.1f);

  __nv_bfloat16 *d_gemm, *d_dgemm;
  float *d_probs, *d_lse, *d_entropy, *d_difficulty, *d_prob_k, *d_weight, *d_losses, *d_dweight;
  int32_t *d_idx, *d_counts;
  CHECK_CUDA(cudaMalloc(&d_gemm, T * W * sizeof(__nv_bfloat16)));
  CHECK_CUDA(cudaMalloc(&d_dgemm, T * W * sizeof(__nv_bfloat16)));
  CHECK_CUDA(cudaMalloc(&d_probs, T * E * sizeof(float)));
  CHECK_CUDA(cudaMalloc(&d_lse, T * sizeof(float)));
  CHECK_CUDA(cudaMalloc(&d_entropy, T * sizeof(float)));
  CHECK_CUDA(cudaMalloc(&d_difficulty, T * sizeof(float)));
  CHECK_CUDA(cudaMalloc(&d_prob_k, T * K * sizeof(float)));
  CHECK_CUDA(cudaMalloc(&d_weight, T * K * sizeof(float)));
  CHECK_CUDA(cudaMalloc(&d_dweight, T * K * sizeof(float)));
  CHECK_CUDA(cudaMalloc(&d_losses, 4 * sizeof(float)));
  CHECK_CUDA(cudaMalloc(&d_idx, T * K * sizeof(int32_t)));
  CHECK_CUDA(cudaMalloc(&d_counts, E * sizeof(int32_t)));
  CHECK_CUDA(cudaMemcpy(d_gemm, gemm_out.data(), T * W * sizeof(__nv_bfloat16), cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(d_dweight, dweight.data(), T * K * sizeof(float), cudaMemcpyHostToDevice));
  cudaStream_t stream;
  CHECK_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));

  moxe::router::GateForwardParams<__nv_bfloat16, float> p{};
  p.dims = {T, E, Em, K};
  p.logits = d_gemm;
  p.logits_stride = W;               // rows of the GEMM output
  p.difficulty_logit = d_gemm + E;   // column E of the same matrix
  p.difficulty_stride = W;
  p.modulation = moxe::router::Modulation::standard;
  p.gamma = 1.f;
  p.tau = 0.5f;
  p.probs = d_probs;
  p.lse = d_lse;
  p.entropy = d_entropy;
  p.difficulty = d_difficulty;
  p.topk_idx = d_idx;
  p.topk_prob = d_prob_k;
  p.topk_weight = d_weight;
  p.expert_counts = d_counts;
  p.losses = d_losses;

  moxe::router::GateBackwardParams<__nv_bfloat16, float> b{};
  b.fwd = p;
  b.dweight = d_dweight;
  b.c_z = 1e-3f;
  b.c_lb = 1e-2f;
  b.c_d = 1e-2f;
  b.c_g = 1e-2f;
  // dlogits is contiguous [T, E]; da goes to its own [T] buffer (here the tail of d_dgemm)
  b.dlogits = d_dgemm;
  b.ddifficulty_logit = d_dgemm + T * E;

  const std::size_t ws_bytes =
      std::max(moxe::router::gate_forward_workspace_size(p), moxe::router::gate_backward_workspace_size(b));
  void* ws = nullptr;
  CHECK_CUDA(cudaMalloc(&ws, ws_bytes));
  moxe::Status s = moxe::router::gate_forward(p, ws, ws_bytes, stream);
  if (s == moxe::Status::ok) s = moxe::router::gate_backward(b, ws, ws_bytes, stream);
  if (s != moxe::Status::ok) {
    std::printf("router_minimal: %s\n", moxe::to_string(s));
    return 1;
  }
  CHECK_CUDA(cudaStreamSynchronize(stream));

  float losses[4];
  std::vector<int32_t> counts(E), idx(T * K);
  CHECK_CUDA(cudaMemcpy(losses, d_losses, sizeof(losses), cudaMemcpyDeviceToHost));
  CHECK_CUDA(cudaMemcpy(counts.data(), d_counts, E * sizeof(int32_t), cudaMemcpyDeviceToHost));
  CHECK_CUDA(cudaMemcpy(idx.data(), d_idx, T * K * sizeof(int32_t), cudaMemcpyDeviceToHost));

  // the host reference on the same matrix, in double
  std::vector<double> probs(T * E), lse(T), ent(T), diff(T), prob_k(T * K), weight(T * K), ref_losses(4);
  std::vector<int32_t> ref_idx(T * K), ref_counts(E);
  moxe::router::GateForwardParams<double, double> r{};
  r.dims = p.dims;
  r.logits = gemm_ref.data();
  r.logits_stride = W;
  r.difficulty_logit = gemm_ref.data() + E;
  r.difficulty_stride = W;
  r.modulation = p.modulation;
  r.gamma = 1.0;
  r.tau = 0.5;
  r.probs = probs.data();
  r.lse = lse.data();
  r.entropy = ent.data();
  r.difficulty = diff.data();
  r.topk_idx = ref_idx.data();
  r.topk_prob = prob_k.data();
  r.topk_weight = weight.data();
  r.expert_counts = ref_counts.data();
  r.losses = ref_losses.data();
  if (moxe::router::reference::gate_forward(r) != moxe::Status::ok) return 1;

  bool ok = idx == ref_idx && counts == ref_counts;
  for (int i = 0; i < 4; ++i) ok = ok && std::abs(losses[i] - ref_losses[i]) <= 1e-4 * (1 + std::abs(ref_losses[i]));
  std::printf("losses: L_z %.5f  L_lb %.5f  L_d %.5f  L_g %.5f\n", losses[0], losses[1], losses[2], losses[3]);
  std::printf("tokens per expert:");
  for (int e = 0; e < E; ++e) std::printf(" %d", counts[e]);
  std::printf("\nrouter_minimal: %s\n", ok ? "ok" : "MISMATCH");
  cudaFree(ws);
  cudaStreamDestroy(stream);
  return ok ? 0 : 1;
}
