// Probe of tests/sim/patches/tensor-core-sm80.patch: ldmatrix, the warp-collective load
// of 8x8 matrices of 16-bit elements from shared memory (PTX ISA "Warp-level matrix load
// instruction: ldmatrix"),
//   ldmatrix.sync.aligned.m8n8.{x1,x2,x4}{.trans}{.shared,.shared::cta,(generic)}.b16
// Matrix j's rows 0..7 start at the addresses given by lanes 8j..8j+7 (rows need not be
// contiguous); lane l receives in register j the two elements of row l/4 at columns
// 2(l%4) and 2(l%4)+1 (low half first), or with .trans those of column l/4 at rows
// 2(l%4) and 2(l%4)+1. Every lane points at a different random row of a shared tile of
// random values, at a random 16-byte-aligned column offset, so a row taken from the wrong
// lane (also from the lanes .x1/.x2 ignore), a wrong element or a swapped half shows.
// Last, the usual idiom: ldmatrix.x4 of a row-major A and ldmatrix.x2.trans of a
// row-major (k-major) B feeding mma.sync.m16n8k16 bf16 must give A B, which checks the
// ldmatrix layouts against those of the mma fragments.
// Exit 0 when all hold.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

constexpr int kRows = 40, kStride = 24;  // the shared tile: 40 rows of 24 elements (48 bytes)
enum Space { kShared, kSharedCta, kGeneric };

// tile: kRows x kStride values; row[l], col[l]: where lane l's row starts; out: 32 x 4.
template <int N, bool Trans, Space S>
__global__ void ldmatrix_kernel(const unsigned short* tile, const int* row, const int* col, unsigned* out) {
  __shared__ alignas(16) unsigned short sm[kRows * kStride];
  const int lane = threadIdx.x;
  for (int i = lane; i < kRows * kStride; i += 32) sm[i] = tile[i];
  __syncwarp();
  const unsigned short* p = sm + row[lane] * kStride + col[lane];
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(p));
  unsigned r[4] = {0xdeadbeef, 0xdeadbeef, 0xdeadbeef, 0xdeadbeef};
  if constexpr (N == 1 && !Trans && S == kShared)
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];" : "=r"(r[0]) : "r"(s));
  if constexpr (N == 1 && Trans && S == kShared)
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];" : "=r"(r[0]) : "r"(s));
  if constexpr (N == 2 && !Trans && S == kShared)
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];" : "=r"(r[0]), "=r"(r[1]) : "r"(s));
  if constexpr (N == 2 && Trans && S == kShared)
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];" : "=r"(r[0]), "=r"(r[1]) : "r"(s));
  if constexpr (N == 4 && !Trans && S == kShared)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];" : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s));
  if constexpr (N == 4 && Trans && S == kShared)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];" : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s));
  if constexpr (N == 1 && !Trans && S == kSharedCta)
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared::cta.b16 {%0}, [%1];" : "=r"(r[0]) : "r"(s));
  if constexpr (N == 2 && Trans && S == kSharedCta)
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared::cta.b16 {%0,%1}, [%2];" : "=r"(r[0]), "=r"(r[1]) : "r"(s));
  if constexpr (N == 4 && !Trans && S == kSharedCta)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared::cta.b16 {%0,%1,%2,%3}, [%4];" : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s));
  if constexpr (N == 4 && !Trans && S == kGeneric)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.b16 {%0,%1,%2,%3}, [%4];" : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "l"(p));
  if constexpr (N == 4 && Trans && S == kGeneric)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.b16 {%0,%1,%2,%3}, [%4];" : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "l"(p));
  for (int j = 0; j < 4; j++) out[lane * 4 + j] = r[j];
}

template <int N, bool Trans, Space S>
static int run_case(const char* name, std::mt19937_64& rng) {
  std::vector<unsigned short> tile(kRows * kStride);
  for (auto& x : tile) x = static_cast<unsigned short>(rng());
  std::vector<int> rows(kRows), row(32), col(32);
  for (int i = 0; i < kRows; i++) rows[i] = i;
  std::shuffle(rows.begin(), rows.end(), rng);
  for (int l = 0; l < 32; l++) {
    row[l] = rows[l];
    col[l] = 8 * static_cast<int>(rng() % 3);  // 0, 8 or 16: 16-byte aligned, inside the row
  }
  unsigned short* dtile = nullptr;
  int *drow = nullptr, *dcol = nullptr;
  unsigned* dout = nullptr;
  cudaMalloc(&dtile, tile.size() * 2);
  cudaMalloc(&drow, 32 * 4);
  cudaMalloc(&dcol, 32 * 4);
  cudaMalloc(&dout, 32 * 4 * 4);
  cudaMemcpy(dtile, tile.data(), tile.size() * 2, cudaMemcpyHostToDevice);
  cudaMemcpy(drow, row.data(), 32 * 4, cudaMemcpyHostToDevice);
  cudaMemcpy(dcol, col.data(), 32 * 4, cudaMemcpyHostToDevice);
  cudaMemset(dout, 0, 32 * 4 * 4);
  ldmatrix_kernel<N, Trans, S><<<1, 32>>>(dtile, drow, dcol, dout);
  std::vector<unsigned> out(32 * 4);
  cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) err = cudaMemcpy(out.data(), dout, out.size() * 4, cudaMemcpyDeviceToHost);
  cudaFree(dtile);
  cudaFree(drow);
  cudaFree(dcol);
  cudaFree(dout);
  if (err != cudaSuccess) {
    std::printf("FAILED: %s: %s\n", name, cudaGetErrorString(err));
    return 1;
  }
  // element (r, c) of matrix j: column c of the row whose address lane 8j + r gave
  auto M = [&](int j, int r, int c) -> unsigned { return tile[row[8 * j + r] * kStride + col[8 * j + r] + c]; };
  int bad = 0;
  for (int l = 0; l < 32; l++)
    for (int j = 0; j < N; j++) {
      const int a = l / 4, b = 2 * (l % 4);
      const unsigned lo = Trans ? M(j, b, a) : M(j, a, b), hi = Trans ? M(j, b + 1, a) : M(j, a, b + 1);
      const unsigned want = lo | hi << 16;
      if (out[l * 4 + j] != want) {
        if (bad < 8) std::printf("FAILED: %s: lane %d r%d = 0x%08x, expected 0x%08x\n", name, l, j, out[l * 4 + j], want);
        bad++;
      }
    }
  if (bad > 0) std::printf("FAILED: %s: %d of %d registers wrong\n", name, bad, 32 * N);
  return bad > 0 ? 1 : 0;
}

// D (16x8) = A (16x16) B (16x8), bf16 in, f32 out, A and B row-major in shared memory
// (row strides 24 and 16 elements), the fragments loaded with ldmatrix.
__global__ void ldmatrix_mma_kernel(const unsigned short* A, const unsigned short* B, float* D) {
  __shared__ alignas(16) unsigned short sa[16 * 24], sb[16 * 16];
  const int lane = threadIdx.x;
  for (int i = lane; i < 16 * 16; i += 32) {
    sa[(i / 16) * 24 + i % 16] = A[i];
    sb[i] = i % 16 < 8 ? B[(i / 16) * 8 + i % 16] : 0;  // B (16x8): element (k, n) at sb[k * 16 + n]
  }
  __syncwarp();
  const unsigned pa = static_cast<unsigned>(__cvta_generic_to_shared(sa + (lane % 16) * 24 + (lane / 16) * 8));
  const unsigned pb = static_cast<unsigned>(__cvta_generic_to_shared(sb + (lane % 16) * 16));
  unsigned a[4], b[2];
  float d[4] = {0.f, 0.f, 0.f, 0.f};
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(a[0]), "=r"(a[1]), "=r"(a[2]), "=r"(a[3])
               : "r"(pa));
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];" : "=r"(b[0]), "=r"(b[1]) : "r"(pb));
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  const int g = lane / 4, t = lane % 4;
  for (int i = 0; i < 4; i++) D[(g + 8 * (i / 2)) * 8 + 2 * t + i % 2] = d[i];
}

static int run_mma_case(std::mt19937_64& rng) {
  const char* name = "ldmatrix.x4 (A) + ldmatrix.x2.trans (B) -> mma.m16n8k16 bf16";
  // small integers (|x| <= 8) in bf16: every sum is exact, so D must equal A B exactly
  auto bf16 = [](int v) {
    const float f = static_cast<float>(v);
    unsigned u;
    std::memcpy(&u, &f, 4);
    return static_cast<unsigned short>(u >> 16);
  };
  std::vector<int> a(16 * 16), b(16 * 8);
  std::vector<unsigned short> ab(a.size()), bb(b.size());
  for (size_t i = 0; i < a.size(); i++) ab[i] = bf16(a[i] = static_cast<int>(rng() % 17) - 8);
  for (size_t i = 0; i < b.size(); i++) bb[i] = bf16(b[i] = static_cast<int>(rng() % 17) - 8);
  unsigned short *dA = nullptr, *dB = nullptr;
  float* dD = nullptr;
  cudaMalloc(&dA, ab.size() * 2);
  cudaMalloc(&dB, bb.size() * 2);
  cudaMalloc(&dD, 16 * 8 * 4);
  cudaMemcpy(dA, ab.data(), ab.size() * 2, cudaMemcpyHostToDevice);
  cudaMemcpy(dB, bb.data(), bb.size() * 2, cudaMemcpyHostToDevice);
  cudaMemset(dD, 0xff, 16 * 8 * 4);
  ldmatrix_mma_kernel<<<1, 32>>>(dA, dB, dD);
  std::vector<float> d(16 * 8);
  cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) err = cudaMemcpy(d.data(), dD, d.size() * 4, cudaMemcpyDeviceToHost);
  cudaFree(dA);
  cudaFree(dB);
  cudaFree(dD);
  if (err != cudaSuccess) {
    std::printf("FAILED: %s: %s\n", name, cudaGetErrorString(err));
    return 1;
  }
  int bad = 0;
  for (int m = 0; m < 16; m++)
    for (int n = 0; n < 8; n++) {
      int ref = 0;
      for (int k = 0; k < 16; k++) ref += a[m * 16 + k] * b[k * 8 + n];
      if (d[m * 8 + n] != static_cast<float>(ref)) {
        if (bad < 8) std::printf("FAILED: %s: D[%d][%d] = %g, expected %d\n", name, m, n, d[m * 8 + n], ref);
        bad++;
      }
    }
  return bad > 0 ? 1 : 0;
}

int main() {
  std::uint64_t seed = std::random_device{}();
  if (const char* s = std::getenv("MOXE_TEST_SEED")) seed = std::strtoull(s, nullptr, 10);
  std::printf("[seed] %llu  (MOXE_TEST_SEED=%llu replays it)\n", static_cast<unsigned long long>(seed),
              static_cast<unsigned long long>(seed));
  std::mt19937_64 rng(seed);
  int fails = 0;
  fails += run_case<1, false, kShared>("x1.shared", rng);
  fails += run_case<1, true, kShared>("x1.trans.shared", rng);
  fails += run_case<2, false, kShared>("x2.shared", rng);
  fails += run_case<2, true, kShared>("x2.trans.shared", rng);
  fails += run_case<4, false, kShared>("x4.shared", rng);
  fails += run_case<4, true, kShared>("x4.trans.shared", rng);
  fails += run_case<1, false, kSharedCta>("x1.shared::cta", rng);
  fails += run_case<2, true, kSharedCta>("x2.trans.shared::cta", rng);
  fails += run_case<4, false, kSharedCta>("x4.shared::cta", rng);
  fails += run_case<4, false, kGeneric>("x4 (generic address)", rng);
  fails += run_case<4, true, kGeneric>("x4.trans (generic address)", rng);
  fails += run_mma_case(rng);
  std::printf("ldmatrix probe: %s\n", fails == 0 ? "ok" : "FAILED");
  return fails == 0 ? 0 : 1;
}
