// mlstm_minimal: run a batch of mLSTM heads over a prompt with moxe::mlstm::chunkwise_forward
// (which also returns the final states), then decode token by token with moxe::mlstm::step
// (states updated in place), bf16 inputs and float states throughout; every output is
// checked against the host reference in double.
//
//   mlstm_minimal            prints the relative errors; exit code 1 if any is off
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "moxe/mlstm/chunkwise.cuh"
#include "moxe/mlstm/reference.hpp"
#include "moxe/mlstm/step.cuh"

#define CHECK_CUDA(expr)                                                                  \
  do {                                                                                    \
    const cudaError_t err_ = (expr);                                                      \
    if (err_ != cudaSuccess) {                                                            \
      std::fprintf(stderr, "%s failed: %s\n", #expr, cudaGetErrorString(err_));           \
      return 1;                                                                           \
    }                                                                                     \
  } while (0)

namespace {

using T = __nv_bfloat16;

/// Random values rounded to bf16: `device` for the GPU, `host` (the same numbers) for the
/// reference.
struct Tensor {
  std::vector<T> device;
  std::vector<double> host;
  Tensor(std::mt19937& rng, std::size_t n, float lo, float hi) : device(n), host(n) {
    std::uniform_real_distribution<float> dist(lo, hi);
    for (std::size_t i = 0; i < n; ++i) {
      device[i] = __float2bfloat16_rn(dist(rng));
      host[i] = static_cast<double>(__bfloat162float(device[i]));
    }
  }
};

template <class X>
X* upload(const std::vector<X>& v) {
  X* p = nullptr;
  if (cudaMalloc(&p, v.size() * sizeof(X)) != cudaSuccess) return nullptr;
  if (cudaMemcpy(p, v.data(), v.size() * sizeof(X), cudaMemcpyHostToDevice) != cudaSuccess) return nullptr;
  return p;
}

double rel_error(const std::vector<double>& out, const std::vector<double>& ref) {
  double num = 0.0, den = 0.0;
  for (std::size_t i = 0; i < out.size(); ++i) {
    num += (out[i] - ref[i]) * (out[i] - ref[i]);
    den += ref[i] * ref[i];
  }
  return std::sqrt(num / den);
}

template <class X>
std::vector<double> download(const X* p, std::size_t n, cudaStream_t stream) {
  std::vector<X> host(n);
  std::vector<double> out(n);
  if (cudaMemcpyAsync(host.data(), p, n * sizeof(X), cudaMemcpyDeviceToHost, stream) != cudaSuccess ||
      cudaStreamSynchronize(stream) != cudaSuccess)
    return out;  // the caller's error check fails on it
  for (std::size_t i = 0; i < n; ++i) out[i] = static_cast<double>(static_cast<float>(host[i]));
  return out;
}

}  // namespace

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("mlstm_minimal: no CUDA device\n");
    return 0;
  }
  const int64_t B = 2, NH = 4, DQK = 64, DV = 128, prompt = 40, tokens = 8;
  const int64_t slots = B * NH;
  std::mt19937 rng(2024);
  cudaStream_t stream;
  CHECK_CUDA(cudaStreamCreate(&stream));
  int failures = 0;

  // ---- prefill: the prompt in one chunkwise pass (40 positions: one full chunk of 32 and a
  // partial one), from zero states; the final states land in d_c, d_n, d_m.
  float *d_c = nullptr, *d_n = nullptr, *d_m = nullptr;
  CHECK_CUDA(cudaMalloc(&d_c, slots * DQK * DV * sizeof(float)));
  CHECK_CUDA(cudaMalloc(&d_n, slots * DQK * sizeof(float)));
  CHECK_CUDA(cudaMalloc(&d_m, slots * sizeof(float)));
  std::vector<double> c(slots * DQK * DV), n(slots * DQK), m(slots);
  {
    const Tensor q(rng, slots * prompt * DQK, -1.f, 1.f), k(rng, slots * prompt * DQK, -1.f, 1.f);
    const Tensor v(rng, slots * prompt * DV, -1.f, 1.f);
    const Tensor ig(rng, slots * prompt, -2.f, 2.f), fg(rng, slots * prompt, 0.f, 4.f);
    T *d_q = upload(q.device), *d_k = upload(k.device), *d_v = upload(v.device);
    T *d_ig = upload(ig.device), *d_fg = upload(fg.device), *d_h = nullptr;
    CHECK_CUDA(cudaMalloc(&d_h, slots * prompt * DV * sizeof(T)));
    if (!d_q || !d_k || !d_v || !d_ig || !d_fg) {
      std::fprintf(stderr, "mlstm_minimal: upload failed\n");
      return 1;
    }
    moxe::mlstm::ForwardParams<T> p;
    p.dims = {B, NH, prompt, DQK, DV};
    p.q = d_q;
    p.k = d_k;
    p.v = d_v;
    p.igate = d_ig;
    p.fgate = d_fg;
    p.h = d_h;
    p.c_last = d_c;
    p.n_last = d_n;
    p.m_last = d_m;
    p.chunk_size = 32;
    const std::size_t ws_bytes = moxe::mlstm::chunkwise_forward_workspace_size(p);
    void* ws = nullptr;
    if (ws_bytes) CHECK_CUDA(cudaMalloc(&ws, ws_bytes));
    const moxe::Status status = moxe::mlstm::chunkwise_forward(p, ws, ws_bytes, stream);
    if (status != moxe::Status::ok) {
      std::fprintf(stderr, "mlstm_minimal: chunkwise_forward: %s\n", moxe::to_string(status));
      return 1;
    }

    std::vector<double> h_ref(slots * prompt * DV);
    moxe::mlstm::ForwardParams<double, double> r;
    r.dims = p.dims;
    r.q = q.host.data();
    r.k = k.host.data();
    r.v = v.host.data();
    r.igate = ig.host.data();
    r.fgate = fg.host.data();
    r.h = h_ref.data();
    r.c_last = c.data();
    r.n_last = n.data();
    r.m_last = m.data();
    if (moxe::mlstm::reference::forward(r) != moxe::Status::ok) return 1;

    const double err_h = rel_error(download(d_h, h_ref.size(), stream), h_ref);
    const double err_c = rel_error(download(d_c, c.size(), stream), c);
    const double err_m = rel_error(download(d_m, m.size(), stream), m);
    std::printf("prompt (%lld tokens): relative error of h %.2e, of C %.2e, of m %.2e\n",
                static_cast<long long>(prompt), err_h, err_c, err_m);
    if (!(err_h < 1e-2 && err_c < 1e-4 && err_m < 1e-5)) ++failures;
    if (ws) cudaFree(ws);
    for (T* ptr : {d_q, d_k, d_v, d_ig, d_fg, d_h}) cudaFree(ptr);
  }

  // ---- decode: one token at a time, the states updated in place
  T* d_h = nullptr;
  CHECK_CUDA(cudaMalloc(&d_h, slots * DV * sizeof(T)));
  for (int64_t t = 0; t < tokens; ++t) {
    const Tensor q(rng, slots * DQK, -1.f, 1.f), k(rng, slots * DQK, -1.f, 1.f), v(rng, slots * DV, -1.f, 1.f);
    const Tensor ig(rng, slots, -2.f, 2.f), fg(rng, slots, 0.f, 4.f);
    T *d_q = upload(q.device), *d_k = upload(k.device), *d_v = upload(v.device);
    T *d_ig = upload(ig.device), *d_fg = upload(fg.device);
    if (!d_q || !d_k || !d_v || !d_ig || !d_fg) {
      std::fprintf(stderr, "mlstm_minimal: upload failed\n");
      return 1;
    }

    moxe::mlstm::StepParams<T> p;
    p.batch = B;
    p.heads = NH;
    p.dqk = DQK;
    p.dv = DV;
    p.q = d_q;
    p.k = d_k;
    p.v = d_v;
    p.igate = d_ig;
    p.fgate = d_fg;
    p.c = d_c;
    p.n = d_n;
    p.m = d_m;
    p.h = d_h;
    // The step needs no workspace; a framework would still ask, as for every launcher.
    const std::size_t ws_bytes = moxe::mlstm::step_workspace_size(p);
    void* ws = nullptr;
    if (ws_bytes) CHECK_CUDA(cudaMalloc(&ws, ws_bytes));
    const moxe::Status status = moxe::mlstm::step(p, ws, ws_bytes, stream);
    if (status != moxe::Status::ok) {
      std::fprintf(stderr, "mlstm_minimal: step: %s\n", moxe::to_string(status));
      return 1;
    }
    std::vector<double> h_ref(slots * DV);
    moxe::mlstm::StepParams<double, double> r;
    r.batch = B;
    r.heads = NH;
    r.dqk = DQK;
    r.dv = DV;
    r.q = q.host.data();
    r.k = k.host.data();
    r.v = v.host.data();
    r.igate = ig.host.data();
    r.fgate = fg.host.data();
    r.c = c.data();
    r.n = n.data();
    r.m = m.data();
    r.h = h_ref.data();
    if (moxe::mlstm::reference::step(r) != moxe::Status::ok) return 1;

    const double err = rel_error(download(d_h, h_ref.size(), stream), h_ref);
    std::printf("token %2lld: relative error of h against the double reference %.2e\n",
                static_cast<long long>(t), err);
    if (!(err < 1e-2)) ++failures;  // bf16 output rounding is ~4e-3

    if (ws) cudaFree(ws);
    cudaFree(d_q);
    cudaFree(d_k);
    cudaFree(d_v);
    cudaFree(d_ig);
    cudaFree(d_fg);
  }
  cudaFree(d_c);
  cudaFree(d_n);
  cudaFree(d_m);
  cudaFree(d_h);
  CHECK_CUDA(cudaStreamDestroy(stream));
  std::printf("mlstm_minimal: %s\n", failures ? "FAILED" : "ok");
  return failures ? 1 : 0;
}
