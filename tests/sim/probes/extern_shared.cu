// Probe of the simulator's placement of dynamic shared memory (extern __shared__), which
// moxe's routing map and losses combine with static __shared__ variables: the dynamic array
// must start past every static shared variable of the kernel, declared in the kernel or in a
// device function it calls, and be reached the same through generic pointers. Upstream
// GPGPU-Sim gave every extern array address 0, on top of the statics (the routing map then
// miscounted); the simulator's own extern_shared.patch fixes it, this probe keeps it fixed.
// Exit 0 when every value written survives the writes to the other arrays.
#include <cuda_runtime.h>

#include <cstdio>

constexpr int kThreads = 128;

__device__ int* function_static() {
  __shared__ int in_function[kThreads];
  return in_function;
}

__device__ __forceinline__ int* inlined_static() {
  __shared__ int in_inlined[kThreads];
  return in_inlined;
}

__global__ void mixed(int* out, int* scratch, int odd_to_shared) {
  extern __shared__ int dyn[];         // [kThreads]
  __shared__ int in_kernel[kThreads];  // static, kernel scope
  int* f = function_static();
  int* g = inlined_static();
  const int t = threadIdx.x;
  // odd threads store through a generic pointer (its space known only at run time: cvta)
  int* generic = (t % 2 == 1 && odd_to_shared) ? dyn + t : scratch + t;
  if (t % 2 == 0) dyn[t] = 1000 + t;
  *generic = 1000 + t;
  __syncthreads();
  in_kernel[t] = 2000 + t;
  f[t] = 3000 + t;
  g[t] = 4000 + t;
  __syncthreads();
  out[t] = dyn[t];
  out[kThreads + t] = in_kernel[t];
  out[2 * kThreads + t] = f[t];
  out[3 * kThreads + t] = g[t];
}

int main() {
  int *d = nullptr, *scratch = nullptr;
  int h[4 * kThreads];
  if (cudaMalloc(&d, sizeof h) != cudaSuccess || cudaMalloc(&scratch, kThreads * sizeof(int)) != cudaSuccess) return 1;
  mixed<<<2, kThreads, kThreads * sizeof(int)>>>(d, scratch, 1);
  if (cudaMemcpy(h, d, sizeof h, cudaMemcpyDeviceToHost) != cudaSuccess) return 1;
  const char* names[] = {"extern (dynamic)", "kernel static", "function static", "forceinline function static"};
  int fails = 0;
  for (int a = 0; a < 4; ++a) {
    int bad = 0;
    for (int t = 0; t < kThreads; ++t) bad += h[a * kThreads + t] != (a + 1) * 1000 + t;
    if (bad) std::printf("FAILED: %s: %d of %d values overwritten (first %d)\n", names[a], bad, kThreads, h[a * kThreads]);
    fails += bad;
  }
  std::printf("extern_shared probe: %s\n", fails == 0 ? "ok" : "FAILED");
  return fails == 0 ? 0 : 1;
}
