// moxe/core/precision.hpp on the host against CUDA's own conversions: round_to_bf16 and
// round_to_half (float bit arithmetic, so host code needs no CUDA header) give the bits of
// __float2bfloat16_rn / __float2half_rn for every 61st float bit pattern (all exponents,
// signs, subnormals, infinities, NaNs) and the edges; split3 reconstructs its input; the
// half group exponent keeps a group's largest element normal and below 65504. (The
// roundings were also compared over all 2^32 floats once: no difference.) Runs on the host
// (nvcc compiles it for the types; CTest label cpu).
#include <doctest/doctest.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "moxe/core/precision.hpp"

namespace {

bool same_bits(float a, float b) {
  return (std::isnan(a) && std::isnan(b)) || moxe::float_bits(a) == moxe::float_bits(b);
}

}  // namespace

TEST_CASE("round_to_bf16 / round_to_half equal CUDA's round-to-nearest-even conversions") {
  int64_t bad_bf16 = 0, bad_half = 0, bad_dispatch = 0, n = 0;
  auto check = [&](float x) {
    ++n;
    if (!same_bits(moxe::round_to_bf16(x), __bfloat162float(__float2bfloat16_rn(x)))) ++bad_bf16;
    if (!same_bits(moxe::round_to_half(x), __half2float(__float2half_rn(x)))) ++bad_half;
    if (!same_bits(moxe::round_to<__nv_bfloat16>(x), moxe::round_to_bf16(x)) ||
        !same_bits(moxe::round_to<__half>(x), moxe::round_to_half(x)))
      ++bad_dispatch;
  };
  for (uint64_t b = 0; b < (uint64_t(1) << 32); b += 61) check(moxe::float_from_bits(static_cast<uint32_t>(b)));
  const float edges[] = {0.0f, 65504.0f, 65519.99f, 65520.0f, 65536.0f, 6.1035156e-05f, 6.1035152e-05f,
                         5.9604645e-08f, 2.9802322e-08f, 2.9802326e-08f, 3.4028235e38f, 1.0e-45f,
                         std::numeric_limits<float>::infinity(), std::numeric_limits<float>::quiet_NaN()};
  for (float x : edges) check(x), check(-x);
  MESSAGE(n << " floats: " << bad_bf16 << " bf16 and " << bad_half << " half roundings differ");
  CHECK(bad_bf16 == 0);
  CHECK(bad_half == 0);
  CHECK(bad_dispatch == 0);
}

TEST_CASE("split3 and the half group exponent") {
  for (float x : {1.0f, 3.14159265f, -2.7182817e-3f, 1.2345678e20f, 7.654321e-20f}) {
    const moxe::Split3 b = moxe::split3<__nv_bfloat16>(x);
    CHECK(std::abs(double(b.hi) + b.mid + b.lo - x) <= std::ldexp(std::abs(double(x)), -24));
    const int e = moxe::operand_exponent<__half>(std::abs(x));
    const float scaled = x * moxe::exp2_int(e);
    CHECK(std::abs(scaled) >= 16384.0f);
    CHECK(std::abs(scaled) < 32768.0f);
    const moxe::Split3 h = moxe::split3<__half>(scaled);
    CHECK(std::abs(double(h.hi) + h.mid + h.lo - scaled) <= std::ldexp(std::abs(double(scaled)), -24));
    const moxe::OperandParts p = moxe::operand_parts<__half>(x, moxe::OperandForm::split3, e);
    CHECK(p.count == 3);
    CHECK(std::abs(double(p.part[0]) + p.part[1] + p.part[2] - x) <= std::ldexp(std::abs(double(x)), -24));
  }
  CHECK(moxe::operand_exponent<__nv_bfloat16>(1e30f) == 0);  // bf16 has float's range
}
