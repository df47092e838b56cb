// The two ceilings every other moxe figure is read against: device-to-device copy
// bandwidth (bytes read + bytes written) and the cuBLAS bf16 GEMM rate (fp32 accumulate).
#include <cublas_v2.h>
#include <cuda_bf16.h>

#include "harness.cuh"

namespace {

using moxe::bench::DeviceMemory;
using moxe::bench::EventTimer;

__global__ void fill_pattern(uint32_t* p, std::size_t n, uint32_t seed) {
  for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < n;
       i += std::size_t(gridDim.x) * blockDim.x) {
    uint32_t x = static_cast<uint32_t>(i) * 2654435761u ^ seed;
    x ^= x >> 13;
    // keep the bf16 halves in a sane range: sign, exponent 120..127, random mantissa
    const uint32_t lo = (x & 0x807Fu) | 0x3C00u, hi = ((x >> 16) & 0x807Fu) | 0x3C00u;
    p[i] = lo | (hi << 16);
  }
}

void BM_copy_d2d(benchmark::State& state) {
  const std::size_t bytes = static_cast<std::size_t>(state.range(0)) << 20;
  DeviceMemory src(bytes), dst(bytes);
  fill_pattern<<<1024, 256>>>(src.as<uint32_t>(), bytes / 4, 1u);
  MOXE_BENCH_CUDA(cudaDeviceSynchronize());
  cudaStream_t stream;
  MOXE_BENCH_CUDA(cudaStreamCreate(&stream));
  EventTimer timer;
  for (auto _ : state) {
    timer.start(stream);
    MOXE_BENCH_CUDA(cudaMemcpyAsync(dst.as<void>(), src.as<void>(), bytes, cudaMemcpyDeviceToDevice, stream));
    state.SetIterationTime(timer.stop_seconds(stream));
  }
  moxe::bench::set_counters(state, 2.0 * bytes, 0);
  MOXE_BENCH_CUDA(cudaStreamDestroy(stream));
}
BENCHMARK(BM_copy_d2d)->Arg(256)->Arg(1024)->Arg(4096)->UseManualTime()->Unit(benchmark::kMicrosecond);

void BM_gemm_bf16(benchmark::State& state) {
  const int n = static_cast<int>(state.range(0));
  const std::size_t elems = std::size_t(n) * n;
  DeviceMemory a(elems * 2), b(elems * 2), c(elems * 2);
  fill_pattern<<<1024, 256>>>(a.as<uint32_t>(), elems / 2, 3u);
  fill_pattern<<<1024, 256>>>(b.as<uint32_t>(), elems / 2, 5u);
  MOXE_BENCH_CUDA(cudaDeviceSynchronize());
  cublasHandle_t handle;
  if (cublasCreate(&handle) != CUBLAS_STATUS_SUCCESS) {
    state.SkipWithError("cublasCreate failed");
    return;
  }
  cudaStream_t stream;
  MOXE_BENCH_CUDA(cudaStreamCreate(&stream));
  cublasSetStream(handle, stream);
  const float alpha = 1.f, beta = 0.f;
  auto gemm = [&] {
    return cublasGemmEx(handle, CUBLAS_OP_N, CUBLAS_OP_N, n, n, n, &alpha, a.as<void>(), CUDA_R_16BF, n,
                        b.as<void>(), CUDA_R_16BF, n, &beta, c.as<void>(), CUDA_R_16BF, n,
                        CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
  };
  if (gemm() != CUBLAS_STATUS_SUCCESS) state.SkipWithError("cublasGemmEx failed");
  EventTimer timer;
  for (auto _ : state) {
    timer.start(stream);
    gemm();
    state.SetIterationTime(timer.stop_seconds(stream));
  }
  moxe::bench::set_counters(state, 3.0 * elems * 2, 2.0 * n * double(n) * n);
  cublasDestroy(handle);
  MOXE_BENCH_CUDA(cudaStreamDestroy(stream));
}
BENCHMARK(BM_gemm_bf16)->Arg(4096)->Arg(8192)->UseManualTime()->Unit(benchmark::kMicrosecond);

}  // namespace

MOXE_BENCHMARK_MAIN();
