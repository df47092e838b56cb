// slstm_minimal: run the sLSTM recurrence of one layer on the device (bf16 inputs, float
// states): the sequence forward, the backward for a given dy, and a few decoding steps
// that continue from the final state. The forward is checked against the host reference.
//
// Build: part of the moxe build (examples/), or `nvcc -std=c++17 -arch=sm_90 -I include main.cu`.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "moxe/slstm/reference.hpp"
#include "moxe/slstm/sequence.cuh"
#include "moxe/slstm/step.cuh"

namespace sl = moxe::slstm;
using T = __nv_bfloat16;

#define CHECK_CUDA(expr)                                                                      \
  do {                                                                                        \
    cudaError_t e_ = (expr);                                                                  \
    if (e_ != cudaSuccess) {                                                                  \
      std::fprintf(stderr, "%s failed: %s\n", #expr, cudaGetErrorString(e_));                 \
      return 1;                                                                               \
    }                                                                                         \
  } while (0)
#define CHECK_MOXE(expr)                                                                      \
  do {                                                                                        \
    moxe::Status s_ = (expr);                                                                 \
    if (s_ != moxe::Status::ok) {                                                             \
      std::fprintf(stderr, "%s failed: %s\n", #expr, moxe::to_string(s_));                    \
      return 1;                                                                               \
    }                                                                                         \
  } while (0)

template <class V>
V* upload(const std::vector<V>& host) {
  V* d = nullptr;
  if (cudaMalloc(&d, host.size() * sizeof(V)) != cudaSuccess) return nullptr;
  cudaMemcpy(d, host.data(), host.size() * sizeof(V), cudaMemcpyHostToDevice);
  return d;
}

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("no CUDA device: nothing to run\n");
    return 0;
  }
  const sl::Dims dims{/*seq_len=*/32, /*batch=*/4, /*heads=*/2, /*head_dim=*/64};
  const int64_t H = dims.heads * dims.head_dim, units = dims.batch * H, steps = dims.seq_len * units;

  std::mt19937 rng(7);
  std::uniform_real_distribution<float> uni(-1.f, 1.f);
  auto random = [&](std::size_t n, float scale) {
    std::vector<float> v(n);
    for (float& x : v) x = static_cast<float>(__float2bfloat16(uni(rng) * scale));  // exactly representable
    return v;
  };
  const std::vector<float> wx = random(steps * 4, 1.f), r = random(dims.heads * 4 * dims.head_dim * dims.head_dim, 0.125f),
                           bias = random(4 * H, 0.5f), dy = random(steps, 1.f);
  auto to_bf16 = [](const std::vector<float>& v) {
    std::vector<T> out(v.size());
    for (std::size_t i = 0; i < v.size(); ++i) out[i] = __float2bfloat16(v[i]);
    return out;
  };
  T *d_wx = upload(to_bf16(wx)), *d_r = upload(to_bf16(r)), *d_bias = upload(to_bf16(bias)), *d_dy = upload(to_bf16(dy));
  T *d_y = nullptr, *d_dwx = nullptr, *d_dr = nullptr, *d_dbias = nullptr, *d_y_step = nullptr;
  float *d_state = nullptr;  // y, c, n, m: [4][B, NH, DH]
  CHECK_CUDA(cudaMalloc(&d_y, steps * sizeof(T)));
  CHECK_CUDA(cudaMalloc(&d_dwx, steps * 4 * sizeof(T)));
  CHECK_CUDA(cudaMalloc(&d_dr, r.size() * sizeof(T)));
  CHECK_CUDA(cudaMalloc(&d_dbias, bias.size() * sizeof(T)));
  CHECK_CUDA(cudaMalloc(&d_y_step, units * sizeof(T)));
  CHECK_CUDA(cudaMalloc(&d_state, 4 * units * sizeof(float)));
  cudaStream_t stream;
  CHECK_CUDA(cudaStreamCreate(&stream));

  // 1. the sequence forward, keeping the final states for decoding
  sl::ForwardParams<T, float> fwd{};
  fwd.dims = dims;
  fwd.wx = d_wx;
  fwd.r = d_r;
  fwd.bias = d_bias;
  fwd.y = d_y;
  fwd.y_last = d_state;
  fwd.c_last = d_state + units;
  fwd.n_last = d_state + 2 * units;
  fwd.m_last = d_state + 3 * units;
  CHECK_MOXE(sl::sequence_forward(fwd, nullptr, sl::sequence_forward_workspace_size(fwd), stream));

  // 2. the backward: workspace sized by the library, carved by the launcher
  sl::BackwardParams<T, float> bwd{};
  bwd.fwd = fwd;
  bwd.dy = d_dy;
  bwd.dwx = d_dwx;
  bwd.dr = d_dr;
  bwd.dbias = d_dbias;
  const std::size_t ws_bytes = sl::sequence_backward_workspace_size(bwd);
  void* ws = nullptr;
  CHECK_CUDA(cudaMalloc(&ws, ws_bytes));
  CHECK_MOXE(sl::sequence_backward(bwd, ws, ws_bytes, stream));

  // 3. decoding: each step reads and updates the states in place (here reusing step 0's wx)
  sl::StepParams<T, float> step{};
  step.batch = dims.batch;
  step.heads = dims.heads;
  step.head_dim = dims.head_dim;
  step.wx = d_wx;
  step.r = d_r;
  step.bias = d_bias;
  step.y = d_state;
  step.c = d_state + units;
  step.n = d_state + 2 * units;
  step.m = d_state + 3 * units;
  step.y_out = d_y_step;
  for (int i = 0; i < 4; ++i) CHECK_MOXE(sl::step(step, nullptr, sl::step_workspace_size(step), stream));
  CHECK_CUDA(cudaStreamSynchronize(stream));

  // check the forward against the host reference (float, same bf16-representable inputs)
  std::vector<T> y_dev(steps);
  CHECK_CUDA(cudaMemcpy(y_dev.data(), d_y, steps * sizeof(T), cudaMemcpyDeviceToHost));
  std::vector<float> y_ref(steps);
  sl::ForwardParams<float, float> ref{};
  ref.dims = dims;
  ref.wx = wx.data();
  ref.r = r.data();
  ref.bias = bias.data();
  ref.y = y_ref.data();
  CHECK_MOXE(sl::reference::forward(ref));
  double num = 0, den = 0;
  for (int64_t i = 0; i < steps; ++i) {
    const double d = static_cast<double>(__bfloat162float(y_dev[i])) - y_ref[i];
    num += d * d;
    den += double(y_ref[i]) * y_ref[i];
  }
  const double rel = std::sqrt(num / den);
  std::printf("slstm forward S=%lld B=%lld NH=%lld DH=%lld: relative error vs reference %.3e\n",
              static_cast<long long>(dims.seq_len), static_cast<long long>(dims.batch),
              static_cast<long long>(dims.heads), static_cast<long long>(dims.head_dim), rel);
  std::printf("backward workspace: %zu bytes; 4 decoding steps done\n", ws_bytes);

  for (void* p : {static_cast<void*>(d_wx), static_cast<void*>(d_r), static_cast<void*>(d_bias),
                  static_cast<void*>(d_dy), static_cast<void*>(d_y), static_cast<void*>(d_dwx),
                  static_cast<void*>(d_dr), static_cast<void*>(d_dbias), static_cast<void*>(d_y_step),
                  static_cast<void*>(d_state), ws})
    cudaFree(p);
  cudaStreamDestroy(stream);
  return rel < 3e-2 ? 0 : 1;
}
