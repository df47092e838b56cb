// Probe of tests/sim/patches/tensor-core-sm80.patch: the asynchronous copy of sm_80 from
// global to shared memory (PTX ISA "cp.async", "cp.async.commit_group",
// "cp.async.wait_group", "cp.async.wait_all"),
//   cp.async.{ca,cg}.shared{::cta}.global{.L2::128B} [dst], [src], cp-size{, src-size | , ignore-src}
// with cp-size 4, 8 (.ca) and 16 (.ca, .cg). Bytes [src-size, cp-size) of the destination
// are zeros (src-size given as a register or an immediate; ignore-src true: all zeros).
// Each thread copies into its own 128 bytes of shared memory, poisoned first; the probe
// waits as the PTX contract asks (commit_group, wait_group 1, wait_group 0, wait_all),
// then copies the shared bytes out. The host checks every byte: copied, zero-filled, or
// (the bytes no copy covers) still the poison.
// Exit 0 when all hold.
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

constexpr int kThreads = 64, kBytes = 128;  // two warps, 128 bytes per thread
constexpr unsigned char kPoison = 0xa5;

// Each thread's 128 bytes: [0,4) cp 4 | [4,8) cp 4, src-size t%4 | [8,16) cp 8 (.shared::cta)
// | [16,24) cp 8, src-size t%8 | [24,32) untouched | [32,48) .cg 16 .L2::128B | [48,64) .cg 16,
// src-size t%16 | [64,80) .ca 16, ignore-src t odd | [80,96) .ca 16, src-size 5 (immediate)
// | [96,128) untouched
__global__ void cp_async_kernel(const unsigned char* src, unsigned char* out) {
  __shared__ alignas(16) unsigned char sm[kThreads * kBytes];
  const int t = threadIdx.x;
  for (int i = 0; i < kBytes; i++) sm[t * kBytes + i] = kPoison;
  __syncthreads();
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(sm + t * kBytes));
  const unsigned char* g = src + t * kBytes;
  const int n4 = t % 4, n8 = t % 8, n16 = t % 16;
  const int odd = t & 1;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(s), "l"(g));
  asm volatile("cp.async.ca.shared.global [%0+4], [%1+4], 4, %2;" ::"r"(s), "l"(g), "r"(n4));
  asm volatile("cp.async.ca.shared::cta.global [%0+8], [%1+8], 8;" ::"r"(s), "l"(g));
  asm volatile("cp.async.ca.shared.global [%0+16], [%1+16], 8, %2;" ::"r"(s), "l"(g), "r"(n8));
  asm volatile("cp.async.commit_group;" ::);
  asm volatile("cp.async.cg.shared.global.L2::128B [%0+32], [%1+32], 16;" ::"r"(s), "l"(g));
  asm volatile("cp.async.cg.shared.global [%0+48], [%1+48], 16, %2;" ::"r"(s), "l"(g), "r"(n16));
  asm volatile(
      "{ .reg .pred p; setp.ne.s32 p, %2, 0;\n"
      "  cp.async.ca.shared.global [%0+64], [%1+64], 16, p; }" ::"r"(s),
      "l"(g), "r"(odd));
  asm volatile("cp.async.ca.shared.global [%0+80], [%1+80], 16, 5;" ::"r"(s), "l"(g));
  asm volatile("cp.async.commit_group;" ::);
  asm volatile("cp.async.wait_group 1;" ::);
  asm volatile("cp.async.wait_group 0;" ::);
  asm volatile("cp.async.wait_all;" ::);
  __syncthreads();
  for (int i = 0; i < kBytes; i++) out[t * kBytes + i] = sm[t * kBytes + i];
}

int main() {
  std::uint64_t seed = std::random_device{}();
  if (const char* s = std::getenv("MOXE_TEST_SEED")) seed = std::strtoull(s, nullptr, 10);
  std::printf("[seed] %llu  (MOXE_TEST_SEED=%llu replays it)\n", static_cast<unsigned long long>(seed),
              static_cast<unsigned long long>(seed));
  std::mt19937_64 rng(seed);
  std::vector<unsigned char> src(kThreads * kBytes), out(kThreads * kBytes);
  for (auto& x : src) x = static_cast<unsigned char>(rng());
  unsigned char *dsrc = nullptr, *dout = nullptr;
  cudaMalloc(&dsrc, src.size());
  cudaMalloc(&dout, out.size());
  cudaMemcpy(dsrc, src.data(), src.size(), cudaMemcpyHostToDevice);
  cudaMemset(dout, 0, out.size());
  cp_async_kernel<<<1, kThreads>>>(dsrc, dout);
  cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) err = cudaMemcpy(out.data(), dout, out.size(), cudaMemcpyDeviceToHost);
  cudaFree(dsrc);
  cudaFree(dout);
  if (err != cudaSuccess) {
    std::printf("FAILED: %s\ncp_async probe: FAILED\n", cudaGetErrorString(err));
    return 1;
  }
  int bad = 0;
  for (int t = 0; t < kThreads; t++) {
    // offset, cp-size, src-size of each copy of thread t
    const int copies[][3] = {{0, 4, 4},   {4, 4, t % 4},   {8, 8, 8},   {16, 8, t % 8},
                             {32, 16, 16}, {48, 16, t % 16}, {64, 16, (t & 1) ? 0 : 16}, {80, 16, 5}};
    std::vector<int> want(kBytes, kPoison);
    for (const auto& c : copies)
      for (int i = 0; i < c[1]; i++) want[c[0] + i] = i < c[2] ? src[t * kBytes + c[0] + i] : 0;
    for (int i = 0; i < kBytes; i++)
      if (out[t * kBytes + i] != want[i]) {
        if (bad < 12)
          std::printf("FAILED: thread %d, byte %d: 0x%02x, expected 0x%02x\n", t, i, out[t * kBytes + i], want[i]);
        bad++;
      }
  }
  if (bad > 0) std::printf("FAILED: %d of %d bytes wrong\n", bad, kThreads * kBytes);
  std::printf("cp_async probe: %s\n", bad == 0 ? "ok" : "FAILED");
  return bad == 0 ? 0 : 1;
}
