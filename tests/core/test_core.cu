// Device tests of moxe/core: conversions, vectorised access, reductions, launch checks.
// Every size is already small (one block, n <= 4097: a ragged multi-pass reduction), so small
// mode (MOXE_TEST_SMALL) runs it all unchanged.
#include <doctest/doctest.h>

#include "device_utils.cuh"
#include "moxe/core/launch.cuh"
#include "moxe/core/numeric.cuh"
#include "moxe/core/reduce.cuh"
#include "moxe/core/workspace.hpp"
#include "moxe/loss/balance.cuh"
#include "test_utils.hpp"

namespace mt = moxe::test;

namespace {

constexpr int kThreads = 256;

__global__ void block_reduce_kernel(const float* x, int n, float* sum, float* mx, float* lse) {
  using Reduce = moxe::BlockAllReduce<float, kThreads>;
  __shared__ Reduce::TempStorage storage;
  float s = 0.f, m = -moxe::math::infinity<float>();
  moxe::math::MaxSum<float> ms;
  for (int i = threadIdx.x; i < n; i += kThreads) {
    s += x[i];
    m = moxe::math::max(m, x[i]);
  }
  for (int i = threadIdx.x; i < n; i += kThreads) ms.add(x[i]);
  Reduce reduce(storage);
  const float total = reduce.sum(s);
  const float top = reduce.max(m);
  ms = moxe::warp_merge(ms);
  if (threadIdx.x == 0) {
    *sum = total;
    *mx = top;
  }
  if (threadIdx.x == 32) *lse = ms.log_sum_exp();  // lane 0 of warp 1: that warp's share
}

template <class T>
__global__ void vec_copy_kernel(const T* in, T* out, int vectors) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < vectors) {
    using V = moxe::Vec16<T>;
    float f[V::kElements];
    V::load_nc(in + i * V::kElements).to_float(f);
    for (float& v : f) v *= 2.f;
    V::from_float(f).store(out + i * V::kElements);
  }
}

__global__ void write_kernel(float* out, float value) {
  if (threadIdx.x == 0) out[0] = value;
}

/// 40 KiB of static shared memory plus `dyn` floats of dynamic: their sum, not the dynamic
/// part alone, is what the default 48 KiB limit holds.
__global__ void static_and_dynamic_smem_kernel(float* out, int dyn) {
  __shared__ float fixed[10 * 1024];
  extern __shared__ float extra[];
  for (int i = threadIdx.x; i < 10 * 1024; i += blockDim.x) fixed[i] = 1.f;
  for (int i = threadIdx.x; i < dyn; i += blockDim.x) extra[i] = 2.f;
  __syncthreads();
  if (threadIdx.x == 0) out[0] = fixed[10 * 1024 - 1] + extra[dyn - 1];
}

}  // namespace

TEST_CASE("block and warp reductions") {
  moxe::test::Rng rng(moxe::test::fresh_seed());
  for (int n : {1, 31, 1000, 4097}) {
    const auto x = moxe::test::uniform_vector<float>(rng, n, -3, 3);
    moxe::test::DeviceBuffer<float> dx(x), sum(1), mx(1), lse(1);
    sum.poison();
    mx.poison();
    lse.poison();
    REQUIRE(moxe::launch_kernel(block_reduce_kernel, 1, kThreads, 0, nullptr, dx.get(), n, sum.get(), mx.get(),
                                lse.get()) == moxe::Status::ok);
    double ref_sum = 0, ref_max = -INFINITY;
    for (float v : x) { ref_sum += v; ref_max = std::max(ref_max, double(v)); }
    CHECK(sum.download()[0] == doctest::Approx(ref_sum).epsilon(1e-4));
    CHECK(mx.download()[0] == float(ref_max));
    double warp1 = 0;
    for (int i = 32; i < n; i += kThreads)
      for (int j = i; j < std::min(i + 32, n); ++j) warp1 += std::exp(double(x[j]));
    if (n > 32) CHECK(lse.download()[0] == doctest::Approx(std::log(warp1)).epsilon(1e-5));
  }
}

TEST_CASE_TEMPLATE("Vec16 round trip", T, float, __half, __nv_bfloat16) {
  moxe::test::Rng rng(moxe::test::fresh_seed());
  constexpr int kPer = moxe::Vec16<T>::kElements;
  const int vectors = 77;
  const auto host = moxe::test::convert_to<T>(moxe::test::uniform_vector<double>(rng, vectors * kPer));
  moxe::test::DeviceBuffer<T> in(host), out(host.size());
  out.poison();
  REQUIRE(moxe::launch_kernel(vec_copy_kernel<T>, 1, 128, 0, nullptr, in.get(), out.get(), vectors) ==
          moxe::Status::ok);
  const auto got = moxe::test::convert_to_double(out.download());
  const auto want = moxe::test::convert_to_double(host);
  for (std::size_t i = 0; i < got.size(); ++i) CHECK(got[i] == 2 * want[i]);
}

TEST_CASE("misaligned workspace helper really is misaligned") {
  moxe::test::MisalignedWorkspace ws(1024);
  CHECK(reinterpret_cast<std::uintptr_t>(ws.get()) % 2 == 1);
  moxe::WorkspaceCarver c(ws.get(), ws.bytes());
  float* p = c.carve<float>(100);
  CHECK(c.fits());
  CHECK(moxe::is_aligned(p, moxe::WorkspaceCarver::kAlignment));
}

TEST_CASE("a launcher reports its own launch errors, never an earlier one") {
  MOXE_TEST_CUDA(cudaDeviceSynchronize());
  (void)cudaGetLastError();
  mt::DeviceBuffer<float> out(1);
  out.poison();
  SUBCASE("its own: a bad configuration is cuda_error and stays readable, nothing runs") {
    // 2048 threads per block: more than any device takes
    CHECK(moxe::launch_kernel(write_kernel, 1, 2048, 0, nullptr, out.get(), 1.f) == moxe::Status::cuda_error);
    CHECK(cudaGetLastError() == cudaErrorInvalidConfiguration);
    CHECK(std::isnan(out.download()[0]));
  }
  SUBCASE("an earlier, unrelated error is neither reported nor cleared") {
    write_kernel<<<1, 2048>>>(out.get(), 1.f);  // the caller's own failed launch, left unchecked
    const int64_t tokens = 3;
    mt::DeviceBuffer<float> d(std::vector<float>{0.1f, 0.5f, 0.9f}), h(std::vector<float>{0.2f, 0.2f, 0.2f}), g(3);
    g.poison();
    moxe::loss::DifficultyLossBackwardParams<float> b{{tokens, d.get(), h.get(), nullptr}, 1.f, g.get()};
    CHECK(moxe::loss::difficulty_loss_backward(b, nullptr, 0, nullptr) == moxe::Status::ok);
    CHECK(cudaGetLastError() == cudaErrorInvalidConfiguration);  // still the caller's to see
    CHECK(cudaGetLastError() == cudaSuccess);
    CHECK(std::isfinite(g.download()[0]));
    CHECK(std::isnan(out.download()[0]));
  }
}

TEST_CASE("set_max_dynamic_smem opts in when static + dynamic shared memory pass 48 KiB") {
  MOXE_TEST_CUDA(cudaDeviceSynchronize());
  (void)cudaGetLastError();
  mt::DeviceBuffer<float> out(1);
  out.poison();
  // 40 KiB static + 16 KiB dynamic = 56 KiB: under every sm_80+ opt-in limit, over the default
  const int dyn = 4 * 1024;
  const std::size_t bytes = dyn * sizeof(float);
  REQUIRE(moxe::set_max_dynamic_smem(static_and_dynamic_smem_kernel, bytes) == moxe::Status::ok);
  CHECK(moxe::launch_kernel(static_and_dynamic_smem_kernel, 1, 128, bytes, nullptr, out.get(), dyn) ==
        moxe::Status::ok);
  CHECK(out.download()[0] == 3.f);
  // more than any device's opt-in limit together: unsupported, nothing set
  CHECK(moxe::set_max_dynamic_smem(static_and_dynamic_smem_kernel, std::size_t(1) << 30) ==
        moxe::Status::unsupported);
}
