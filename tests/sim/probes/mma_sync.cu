// Probe of tests/sim/patches/tensor-core-sm80.patch: the warp-level MMA of sm_80,
//   mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32
//   mma.sync.aligned.m16n8k8.row.col.f32.{bf16,f16,tf32}.{bf16,f16,tf32}.f32
// D (16x8) = A (16xK) B (Kx8) + C. One warp builds its a/b/c fragments from random
// matrices with the layouts of the PTX ISA ("Matrix Fragments for mma.m16n8k8" and
// "... for mma.m16n8k16 with floating point type"; g = lane / 4, t = lane % 4):
//   bf16/f16 a: element i (register i/2, low half first) at row g + 8*((i/2)%2),
//               column 2t + i%2 + 8*(i/4);   b: element i at k = 2t + i%2 + 8*(i/2), n = g
//   tf32     a: register i at row g + 8*(i%2), column t + 4*(i/2); b: register i at k = t + 4i, n = g
//   c, d:       register i at row g + 8*(i/2), column 2t + i%2
// runs the mma with the accumulator registers as both c and d (as kernels do) and
// stores every lane's d fragment; the host checks every element of D against a sum in
// double. The products of bf16/f16/tf32 inputs are exact in f32 and only the f32
// rounding of the sum (whose order is unspecified) may differ: the bound is
// (K + 1) 2^-23 (|c| + sum |a b|), far below what a misplaced fragment element, a
// product rounded to the input precision or a sum kept in half precision gives.
// Exit 0 when all hold.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

enum Kind { kBf16, kF16, kTf32 };

// A: 16xK row-major, B: Kx8 row-major, as the bits of one element each (16-bit types in
// the low half); C, D: 16x8 row-major.
template <int K, Kind T>
__global__ void mma_kernel(const unsigned* A, const unsigned* B, const float* C, float* D) {
  const int lane = threadIdx.x, g = lane / 4, t = lane % 4;
  unsigned a[4] = {0, 0, 0, 0}, b[2] = {0, 0};
  float d[4];
  for (int i = 0; i < 4; i++) d[i] = C[(g + 8 * (i / 2)) * 8 + 2 * t + i % 2];
  if constexpr (T == kTf32) {
    for (int i = 0; i < 4; i++) a[i] = A[(g + 8 * (i % 2)) * K + t + 4 * (i / 2)];
    for (int i = 0; i < 2; i++) b[i] = B[(t + 4 * i) * 8 + g];
  } else {
    for (int i = 0; i < K / 2; i++)
      a[i / 2] |= (A[(g + 8 * ((i / 2) % 2)) * K + 2 * t + i % 2 + 8 * (i / 4)] & 0xffffu) << (16 * (i % 2));
    for (int i = 0; i < K / 4; i++) b[i / 2] |= (B[(2 * t + i % 2 + 8 * (i / 2)) * 8 + g] & 0xffffu) << (16 * (i % 2));
  }
  if constexpr (K == 16 && T == kBf16)
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  if constexpr (K == 16 && T == kF16)
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  if constexpr (K == 8 && T == kBf16)
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(b[0]));
  if constexpr (K == 8 && T == kF16)
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(b[0]));
  if constexpr (K == 8 && T == kTf32)
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  for (int i = 0; i < 4; i++) D[(g + 8 * (i / 2)) * 8 + 2 * t + i % 2] = d[i];
}

// A random input element: a full-precision significand of the type, exponent in [-4, 3].
struct Elem {
  unsigned bits;
  double value;
};
static Elem random_elem(Kind t, std::mt19937_64& rng) {
  const int e = static_cast<int>(rng() % 8) - 4, s = (rng() & 1) ? -1 : 1;
  const int mbits = t == kBf16 ? 7 : 10;
  const unsigned m = static_cast<unsigned>(rng() % (1u << mbits));
  const double v = s * std::ldexp(1.0 + std::ldexp(m, -mbits), e);
  unsigned bits;
  if (t == kF16) {
    bits = (s < 0 ? 0x8000u : 0u) | static_cast<unsigned>(e + 15) << 10 | m;
  } else {  // bf16 and tf32 are the top bits of the f32 of the same value
    const float f = static_cast<float>(v);
    std::memcpy(&bits, &f, 4);
    if (t == kBf16) bits >>= 16;
  }
  return {bits, v};
}

template <int K, Kind T>
static int run_case(const char* name, std::mt19937_64& rng) {
  std::vector<Elem> a(16 * K), b(K * 8);
  for (auto& x : a) x = random_elem(T, rng);
  for (auto& x : b) x = random_elem(T, rng);
  std::uniform_real_distribution<float> uc(-4.f, 4.f);
  std::vector<float> c(16 * 8), d(16 * 8);
  for (auto& x : c) x = uc(rng);
  std::vector<unsigned> abits(a.size()), bbits(b.size());
  for (size_t i = 0; i < a.size(); i++) abits[i] = a[i].bits;
  for (size_t i = 0; i < b.size(); i++) bbits[i] = b[i].bits;
  unsigned *dA = nullptr, *dB = nullptr;
  float *dC = nullptr, *dD = nullptr;
  cudaMalloc(&dA, abits.size() * 4);
  cudaMalloc(&dB, bbits.size() * 4);
  cudaMalloc(&dC, c.size() * 4);
  cudaMalloc(&dD, d.size() * 4);
  cudaMemcpy(dA, abits.data(), abits.size() * 4, cudaMemcpyHostToDevice);
  cudaMemcpy(dB, bbits.data(), bbits.size() * 4, cudaMemcpyHostToDevice);
  cudaMemcpy(dC, c.data(), c.size() * 4, cudaMemcpyHostToDevice);
  cudaMemset(dD, 0xff, d.size() * 4);  // NaN
  mma_kernel<K, T><<<1, 32>>>(dA, dB, dC, dD);
  cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) err = cudaMemcpy(d.data(), dD, d.size() * 4, cudaMemcpyDeviceToHost);
  cudaFree(dA);
  cudaFree(dB);
  cudaFree(dC);
  cudaFree(dD);
  if (err != cudaSuccess) {
    std::printf("FAILED: %s: %s\n", name, cudaGetErrorString(err));
    return 1;
  }
  int bad = 0;
  for (int m = 0; m < 16; m++)
    for (int n = 0; n < 8; n++) {
      double ref = c[m * 8 + n], mag = std::fabs(ref);
      for (int k = 0; k < K; k++) {
        ref += a[m * K + k].value * b[k * 8 + n].value;
        mag += std::fabs(a[m * K + k].value * b[k * 8 + n].value);
      }
      const double got = d[m * 8 + n], bound = (K + 1) * std::ldexp(mag, -23);
      if (!(std::fabs(got - ref) <= bound)) {
        if (bad < 8)
          std::printf("FAILED: %s: D[%d][%d] (lane %d, d%d) = %.9g, expected %.9g (bound %.3g)\n", name, m, n,
                      (m % 8) * 4 + n / 2, (m / 8) * 2 + n % 2, got, ref, bound);
        bad++;
      }
    }
  if (bad > 0) std::printf("FAILED: %s: %d of 128 elements wrong\n", name, bad);
  return bad > 0 ? 1 : 0;
}

int main() {
  std::uint64_t seed = std::random_device{}();
  if (const char* s = std::getenv("MOXE_TEST_SEED")) seed = std::strtoull(s, nullptr, 10);
  std::printf("[seed] %llu  (MOXE_TEST_SEED=%llu replays it)\n", static_cast<unsigned long long>(seed),
              static_cast<unsigned long long>(seed));
  std::mt19937_64 rng(seed);
  int fails = 0;
  fails += run_case<16, kBf16>("m16n8k16.row.col.f32.bf16.bf16.f32", rng);
  fails += run_case<16, kF16>("m16n8k16.row.col.f32.f16.f16.f32", rng);
  fails += run_case<8, kBf16>("m16n8k8.row.col.f32.bf16.bf16.f32", rng);
  fails += run_case<8, kF16>("m16n8k8.row.col.f32.f16.f16.f32", rng);
  fails += run_case<8, kTf32>("m16n8k8.row.col.f32.tf32.tf32.f32", rng);
  std::printf("mma_sync probe: %s\n", fails == 0 ? "ok" : "FAILED");
  return fails == 0 ? 0 : 1;
}
