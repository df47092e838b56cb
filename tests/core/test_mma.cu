// Device tests of moxe/core/mma.cuh: a one-CTA GEMM C = A B (A: M x K, B: K x N, both of T,
// C fp32) staged with cp.async (rows and 16-byte column blocks past the edges zero-filled
// into shared memory that was NaN before), fragments by ldmatrix (B stored k-major through
// the transposed load, or n-major), or A built in registers from fp32 values by pack2 at the
// fragment positions, multiplied by mma_16816. M, N, K not multiples of the MMA shape, and 1,
// are in every case; each size is small already (one CTA, at most 64 x 64 x 64), so small
// mode (MOXE_TEST_SMALL) runs it all.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "device_utils.cuh"
#include "moxe/core/mma.cuh"
#include "test_utils.hpp"

namespace mt = moxe::test;
namespace mm = moxe::mma;

namespace {

constexpr int kMax = 64;       // largest M, N, K of the test kernel
constexpr int kPad = 8;        // 16 bytes of padding per shared row (ldmatrix rows stay 16-byte aligned)
constexpr int kLd = kMax + kPad;
constexpr int kThreads = 128;  // 4 warps
constexpr int kVec = 8;        // T per 16-byte copy

enum class AFrom { shared, registers };

// Stages rows [0, rows_padded) x columns [0, cols_padded) of a row-major global matrix
// (rows x cols, cols % 8 == 0) into a shared tile with leading dimension kLd; what lies
// past rows / cols is zero-filled by the copy itself.
template <class T>
__device__ void stage(T* tile, const T* src, int rows, int cols, int rows_padded, int cols_padded) {
  const int blocks_per_row = cols_padded / kVec;
  for (int i = threadIdx.x; i < rows_padded * blocks_per_row; i += kThreads) {
    const int r = i / blocks_per_row, c = (i % blocks_per_row) * kVec;
    const bool inside = r < rows && c < cols;
    mm::cp_async_16(tile + r * kLd + c, inside ? src + int64_t(r) * cols + c : src, inside ? 16 : 0);
  }
}

template <class T, AFrom kAFrom>
__global__ void __launch_bounds__(kThreads)
    gemm_kernel(const T* a, const float* a_float, const T* b, bool b_k_major, float* c, int M, int N, int K) {
  __shared__ __align__(16) T sa[kMax * kLd];
  __shared__ __align__(16) T sb[kMax * kLd];
  const int Mp = moxe::round_up(M, mm::kM), Np = moxe::round_up(N, mm::kN), Kp = moxe::round_up(K, mm::kK);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  // NaN everywhere first: a zero-fill that does not happen shows in the result
  const uint16_t nan_bits = 0xFFFF;
  for (int i = threadIdx.x; i < kMax * kLd; i += kThreads) {
    reinterpret_cast<uint16_t*>(sa)[i] = nan_bits;
    reinterpret_cast<uint16_t*>(sb)[i] = nan_bits;
  }
  __syncthreads();
  stage(sa, a, M, K, Mp, Kp);
  if (b_k_major)
    stage(sb, b, K, N, Kp, moxe::round_up(Np, kVec));  // S[k][n]
  else
    stage(sb, b, N, K, Np, Kp);  // S[n][k]: b given as B^T, N x K
  mm::cp_async_commit();
  mm::cp_async_wait<0>();
  __syncthreads();
  for (int tile = warp; tile < (Mp / mm::kM) * (Np / mm::kN); tile += kThreads / 32) {
    const int r0 = (tile / (Np / mm::kN)) * mm::kM, n0 = (tile % (Np / mm::kN)) * mm::kN;
    mm::FragmentC acc;
    for (int k0 = 0; k0 < Kp; k0 += mm::kK) {
      mm::FragmentA fa;
      if constexpr (kAFrom == AFrom::shared) {
        fa = mm::load_a(sa, kLd, r0, k0, lane);
      } else {
        // an operand the kernel computed: fp32 values packed at the fragment positions
        for (int reg = 0; reg < 4; ++reg) {
          float v[2];
          for (int h = 0; h < 2; ++h) {
            const int e = 2 * reg + h;
            const int r = r0 + mm::fragment_a_row(lane, e), k = k0 + mm::fragment_a_col(lane, e);
            v[h] = (r < M && k < K) ? a_float[r * K + k] : 0.f;
          }
          fa.r[reg] = mm::pack2<T>(v[0], v[1]);
        }
      }
      const mm::FragmentB fb = mm::load_b(sb, kLd, k0, n0, lane, b_k_major);
      mm::mma_16816<T>(acc, fa, fb);
    }
    for (int e = 0; e < 4; ++e) {
      const int r = r0 + mm::fragment_c_row(lane, e), n = n0 + mm::fragment_c_col(lane, e);
      if (r < M && n < N) c[r * N + n] = acc.c[e];
    }
  }
}

template <class T>
void check_gemm(int M, int N, int K, bool b_k_major, AFrom a_from, mt::Rng& rng) {
  CAPTURE(M);
  CAPTURE(N);
  CAPTURE(K);
  CAPTURE(b_k_major);
  CAPTURE(int(a_from));
  const auto a = mt::convert_to<T>(mt::uniform_vector<double>(rng, std::size_t(M) * K, -2, 2));
  const auto b = mt::convert_to<T>(mt::uniform_vector<double>(rng, std::size_t(K) * N, -2, 2));
  const auto ad = mt::convert_to_double(a), bd = mt::convert_to_double(b);  // B row-major K x N
  std::vector<float> a_float(ad.begin(), ad.end());
  std::vector<T> b_given = b;  // k-major: B itself; n-major: B^T (N x K)
  if (!b_k_major)
    for (int k = 0; k < K; ++k)
      for (int n = 0; n < N; ++n) b_given[std::size_t(n) * K + k] = b[std::size_t(k) * N + n];
  std::vector<double> ref(std::size_t(M) * N, 0.0);
  for (int r = 0; r < M; ++r)
    for (int n = 0; n < N; ++n)
      for (int k = 0; k < K; ++k) ref[std::size_t(r) * N + n] += ad[std::size_t(r) * K + k] * bd[std::size_t(k) * N + n];
  mt::DeviceBuffer<T> da(a), db(b_given);
  mt::DeviceBuffer<float> daf(a_float), dc(ref.size());
  dc.poison();
  const auto kernel = a_from == AFrom::shared ? gemm_kernel<T, AFrom::shared> : gemm_kernel<T, AFrom::registers>;
  REQUIRE(moxe::launch_kernel(kernel, 1, kThreads, 0, nullptr, da.get(), daf.get(), db.get(), b_k_major, dc.get(), M,
                              N, K) == moxe::Status::ok);
  MOXE_TEST_CUDA(cudaDeviceSynchronize());
  const auto got = dc.download();
  CHECK(mt::all_finite(got));
  // products of two T are exact in fp32; only the fp32 sums of at most 64 terms round
  CHECK(mt::rel_error(got, ref) < 1e-6);
}

}  // namespace

TEST_CASE("mma fragment positions cover each tile once") {
  std::vector<int> a(16 * 16, 0), b(16 * 8, 0), c(16 * 8, 0);
  for (int lane = 0; lane < 32; ++lane) {
    for (int e = 0; e < 8; ++e) ++a[mm::fragment_a_row(lane, e) * 16 + mm::fragment_a_col(lane, e)];
    for (int e = 0; e < 4; ++e) ++b[mm::fragment_b_k(lane, e) * 8 + mm::fragment_b_n(lane, e)];
    for (int e = 0; e < 4; ++e) ++c[mm::fragment_c_row(lane, e) * 8 + mm::fragment_c_col(lane, e)];
  }
  for (int v : a) CHECK(v == 1);
  for (int v : b) CHECK(v == 1);
  for (int v : c) CHECK(v == 1);
}

TEST_CASE_TEMPLATE("cp.async + ldmatrix + mma.sync m16n8k16 against a double GEMM", T, __nv_bfloat16, __half) {
  REQUIRE(mm::sm80_supported(0) == moxe::Status::ok);
  mt::Rng rng(mt::fresh_seed());
  struct Shape {
    int M, N, K;
  };
  // 1, sizes past a multiple of 16 / 8 (zero-filled rows, columns and k blocks), the largest
  for (const Shape s : {Shape{1, 8, 8}, Shape{17, 24, 24}, Shape{33, 40, 48}, Shape{64, 64, 64}, Shape{5, 56, 16}})
    for (const bool b_k_major : {true, false})
      for (const AFrom a_from : {AFrom::shared, AFrom::registers}) check_gemm<T>(s.M, s.N, s.K, b_k_major, a_from, rng);
}
