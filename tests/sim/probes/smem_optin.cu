// Probe of tests/sim/patches/runtime-errors.patch: the simulated runtime must reject the
// launches whose shared memory a GPU rejects, which moxe::set_max_dynamic_smem and its
// launchers rely on (a skipped opt-in once passed on the simulator). Exit 0 when all hold.
//  1. 40 KiB static + 16 KiB dynamic without cudaFuncSetAttribute(
//     cudaFuncAttributeMaxDynamicSharedMemorySize) fails with cudaErrorInvalidValue, runs
//     nothing and is the last error: cudaLaunchKernel, <<<>>>, cudaLaunchCooperativeKernel;
//  2. with the opt-in (>= the dynamic bytes) it runs, and both arrays hold their own data;
//  3. 60 KiB dynamic alone fails without the opt-in, runs with it;
//  4. past the opt-in limit (cudaDevAttrMaxSharedMemoryPerBlockOptin): cudaFuncSetAttribute
//     fails (value alone, or static + value), and so does the launch.
#include <cuda_runtime.h>

#include <cstdio>

constexpr int kThreads = 256;
constexpr int kStaticFloats = 40 * 1024 / 4;  // 40 KiB

// out[t] = the sum of the static column and the dynamic column of thread t + 1 (40 ones and
// dyn_rows twos: 40 + 2 * dyn_rows), so an overlap of the two arrays changes it.
template <int Tag>
__global__ void static_and_dynamic(float* out, int dyn_rows) {
  __shared__ float s[kStaticFloats];
  extern __shared__ float d[];
  const int t = threadIdx.x;
  for (int k = 0; k < kStaticFloats / kThreads; ++k) s[t + kThreads * k] = 1.f;
  for (int k = 0; k < dyn_rows; ++k) d[t + kThreads * k] = 2.f;
  __syncthreads();
  const int u = (t + 1) % kThreads;
  float sum = 0.f;
  for (int k = 0; k < kStaticFloats / kThreads; ++k) sum += s[u + kThreads * k];
  for (int k = 0; k < dyn_rows; ++k) sum += d[u + kThreads * k];
  out[t] = sum;
}

// out[t] = sum of k over the dynamic column of thread t + 1: rows * (rows - 1) / 2.
__global__ void dynamic_only(float* out, int rows) {
  extern __shared__ float d[];
  const int t = threadIdx.x;
  for (int k = 0; k < rows; ++k) d[t + kThreads * k] = static_cast<float>(k);
  __syncthreads();
  const int u = (t + 1) % kThreads;
  float sum = 0.f;
  for (int k = 0; k < rows; ++k) sum += d[u + kThreads * k];
  out[t] = sum;
}

int main() {
  int fails = 0;
  auto check = [&](bool ok, const char* what) {
    std::printf("%s: %s\n", ok ? "ok" : "FAILED", what);
    fails += ok ? 0 : 1;
  };
  float* d_out = nullptr;
  check(cudaMalloc(&d_out, kThreads * sizeof(float)) == cudaSuccess, "cudaMalloc");
  float h[kThreads];
  auto clear = [&] { return cudaMemset(d_out, 0, kThreads * sizeof(float)) == cudaSuccess; };
  auto all = [&](float want) {
    if (cudaMemcpy(h, d_out, sizeof(h), cudaMemcpyDeviceToHost) != cudaSuccess) return false;
    for (int i = 0; i < kThreads; ++i)
      if (h[i] != want) return false;
    return true;
  };
  int optin = 0;
  check(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, 0) == cudaSuccess &&
            optin > 64 * 1024,
        "cudaDevAttrMaxSharedMemoryPerBlockOptin past 64 KiB");
  cudaFuncAttributes fa{};
  check(cudaFuncGetAttributes(&fa, static_and_dynamic<0>) == cudaSuccess &&
            fa.sharedSizeBytes >= static_cast<size_t>(kStaticFloats * 4),
        "the kernel's static shared memory is 40 KiB");

  const int dyn16_rows = 16 * 1024 / 4 / kThreads;
  const size_t dyn16 = 16 * 1024;
  int rows = dyn16_rows;
  void* args[] = {&d_out, &rows};
  const void* sd0 = reinterpret_cast<const void*>(static_and_dynamic<0>);
  const void* sd1 = reinterpret_cast<const void*>(static_and_dynamic<1>);
  const void* dyn = reinterpret_cast<const void*>(dynamic_only);

  // 1. 40 KiB static + 16 KiB dynamic, no opt-in: every launch path fails, runs nothing
  check(clear(), "cudaMemset");
  check(cudaLaunchKernel(sd0, dim3(1), dim3(kThreads), args, dyn16, nullptr) == cudaErrorInvalidValue,
        "cudaLaunchKernel of 40 KiB static + 16 KiB dynamic without opt-in: cudaErrorInvalidValue");
  check(cudaGetLastError() == cudaErrorInvalidValue, "it is the last error");
  check(cudaGetLastError() == cudaSuccess, "cudaGetLastError resets it");
  static_and_dynamic<0><<<1, kThreads, dyn16>>>(d_out, dyn16_rows);
  check(cudaGetLastError() == cudaErrorInvalidValue, "<<<>>> of the same: cudaErrorInvalidValue");
  check(cudaLaunchCooperativeKernel(sd1, dim3(1), dim3(kThreads), args, dyn16, nullptr) ==
            cudaErrorInvalidValue,
        "cudaLaunchCooperativeKernel of the same: cudaErrorInvalidValue");
  check(cudaGetLastError() == cudaErrorInvalidValue, "it is the last error");
  check(all(0.f), "the failed launches ran nothing");

  // 2. with the opt-in: runs, the two arrays apart
  check(cudaFuncSetAttribute(sd0, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(dyn16)) ==
            cudaSuccess,
        "cudaFuncSetAttribute(MaxDynamicSharedMemorySize, 16 KiB)");
  check(cudaLaunchKernel(sd0, dim3(1), dim3(kThreads), args, dyn16, nullptr) == cudaSuccess,
        "cudaLaunchKernel of 40 + 16 KiB with opt-in");
  check(all(40.f + 2.f * dyn16_rows), "it ran and wrote: static and dynamic arrays apart");
  check(clear(), "cudaMemset");
  static_and_dynamic<0><<<1, kThreads, dyn16>>>(d_out, dyn16_rows);
  check(cudaGetLastError() == cudaSuccess && all(40.f + 2.f * dyn16_rows), "<<<>>> with opt-in runs");
  check(cudaFuncGetAttributes(&fa, sd0) == cudaSuccess && fa.maxDynamicSharedSizeBytes == static_cast<int>(dyn16),
        "cudaFuncGetAttributes reports the opt-in");
  // an opt-in smaller than the dynamic bytes is no opt-in
  check(clear(), "cudaMemset");
  check(cudaFuncSetAttribute(sd1, cudaFuncAttributeMaxDynamicSharedMemorySize, 8 * 1024) == cudaSuccess,
        "cudaFuncSetAttribute(8 KiB)");
  check(cudaLaunchCooperativeKernel(sd1, dim3(1), dim3(kThreads), args, dyn16, nullptr) ==
            cudaErrorInvalidValue,
        "cooperative launch of 40 + 16 KiB with an 8 KiB opt-in: cudaErrorInvalidValue");
  check(cudaGetLastError() == cudaErrorInvalidValue && all(0.f), "last error, nothing ran");
  check(cudaFuncSetAttribute(sd1, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(dyn16)) ==
                cudaSuccess &&
            cudaLaunchCooperativeKernel(sd1, dim3(1), dim3(kThreads), args, dyn16, nullptr) == cudaSuccess,
        "cooperative launch with the opt-in");
  check(all(40.f + 2.f * dyn16_rows), "it ran and wrote");

  // 3. 60 KiB dynamic alone
  const size_t dyn60 = 60 * 1024;
  rows = static_cast<int>(dyn60 / 4 / kThreads);
  const float want60 = rows * (rows - 1) / 2.f;
  check(clear(), "cudaMemset");
  check(cudaLaunchKernel(dyn, dim3(1), dim3(kThreads), args, dyn60, nullptr) == cudaErrorInvalidValue,
        "60 KiB dynamic without opt-in: cudaErrorInvalidValue");
  check(cudaGetLastError() == cudaErrorInvalidValue && all(0.f), "last error, nothing ran");
  check(cudaFuncSetAttribute(dyn, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(dyn60)) ==
            cudaSuccess,
        "cudaFuncSetAttribute(60 KiB)");
  check(cudaLaunchKernel(dyn, dim3(1), dim3(kThreads), args, dyn60, nullptr) == cudaSuccess && all(want60),
        "60 KiB dynamic with opt-in runs and writes");

  // 4. past the opt-in limit
  check(cudaFuncSetAttribute(dyn, cudaFuncAttributeMaxDynamicSharedMemorySize, optin + 1024) ==
            cudaErrorInvalidValue,
        "cudaFuncSetAttribute past the opt-in limit: cudaErrorInvalidValue");
  check(cudaGetLastError() == cudaErrorInvalidValue, "it is the last error");
  check(cudaFuncSetAttribute(sd0, cudaFuncAttributeMaxDynamicSharedMemorySize, optin - kStaticFloats * 4 + 1024) ==
            cudaErrorInvalidValue,
        "cudaFuncSetAttribute with static + value past the opt-in limit: cudaErrorInvalidValue");
  check(cudaGetLastError() == cudaErrorInvalidValue, "it is the last error");
  check(clear(), "cudaMemset");
  check(cudaLaunchKernel(dyn, dim3(1), dim3(kThreads), args, static_cast<size_t>(optin) + 1024, nullptr) ==
            cudaErrorInvalidValue,
        "a launch past the opt-in limit: cudaErrorInvalidValue");
  check(cudaGetLastError() == cudaErrorInvalidValue && all(0.f), "last error, nothing ran");
  rows = dyn16_rows;
  check(cudaLaunchKernel(sd0, dim3(1), dim3(kThreads), args, dyn16, nullptr) == cudaSuccess &&
            all(40.f + 2.f * dyn16_rows),
        "a rejected attribute leaves the earlier opt-in");

  std::printf("smem_optin probe: %s\n", fails == 0 ? "ok" : "FAILED");
  return fails == 0 ? 0 : 1;
}
