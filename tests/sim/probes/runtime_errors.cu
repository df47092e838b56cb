// Probe of tests/sim/patches/runtime-errors.patch: the simulator must keep CUDA's error
// semantics, which moxe's launch-error tests rely on. Exit 0 when all hold.
//  1. a launch of more than 1024 threads per block fails (cudaErrorInvalidConfiguration),
//     from cudaLaunchKernel's return value and from <<<>>> via cudaGetLastError;
//  2. a later successful call leaves the pending error alone;
//  3. cudaGetLastError returns it once and resets it.
#include <cuda_runtime.h>

#include <cstdio>

__global__ void write_one(float* out) {
  if (threadIdx.x == 0) out[0] = 1.f;
}

int main() {
  float* d = nullptr;
  int fails = 0;
  auto check = [&](bool ok, const char* what) {
    if (!ok) std::printf("FAILED: %s\n", what);
    fails += ok ? 0 : 1;
  };
  check(cudaMalloc(&d, sizeof(float)) == cudaSuccess, "cudaMalloc");
  check(cudaMemset(d, 0, sizeof(float)) == cudaSuccess, "cudaMemset");
  void* args[] = {&d};
  check(cudaLaunchKernel(reinterpret_cast<const void*>(write_one), dim3(1), dim3(2048), args, 0, nullptr) ==
            cudaErrorInvalidConfiguration,
        "cudaLaunchKernel of 2048 threads returns cudaErrorInvalidConfiguration");
  check(cudaGetLastError() == cudaErrorInvalidConfiguration, "the failed launch is the last error");
  check(cudaGetLastError() == cudaSuccess, "cudaGetLastError resets it");
  write_one<<<1, 1025>>>(d);
  float h = -1.f;
  check(cudaMemcpy(&h, d, sizeof(float), cudaMemcpyDeviceToHost) == cudaSuccess, "cudaMemcpy");
  check(h == 0.f, "the failed launches ran nothing");
  check(cudaPeekAtLastError() == cudaErrorInvalidConfiguration, "a successful call leaves the pending error");
  check(cudaGetLastError() == cudaErrorInvalidConfiguration, "cudaGetLastError returns it");
  check(cudaGetLastError() == cudaSuccess, "and resets it");
  write_one<<<1, 32>>>(d);
  check(cudaMemcpy(&h, d, sizeof(float), cudaMemcpyDeviceToHost) == cudaSuccess && h == 1.f, "a valid launch runs");
  std::printf("runtime_errors probe: %s\n", fails == 0 ? "ok" : "FAILED");
  return fails == 0 ? 0 : 1;
}
