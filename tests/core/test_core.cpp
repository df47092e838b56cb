// Host tests of moxe/core: scalar math, the workspace carver, Status.
#include <doctest/doctest.h>

#include <cmath>
#include <limits>

#include "moxe/core/math.hpp"
#include "moxe/core/status.hpp"
#include "moxe/core/workspace.hpp"
#include "test_utils.hpp"

namespace m = moxe::math;

TEST_CASE("math: logsigmoid, sigmoid, softplus are exact and finite at large |x|") {
  for (double x : {-800.0, -40.0, -3.0, -1e-3, 0.0, 1e-3, 3.0, 40.0, 800.0}) {
    const double naive_sig = 1.0 / (1.0 + std::exp(-x));
    CHECK(m::sigmoid(x) == doctest::Approx(naive_sig).epsilon(1e-14));
    CHECK(std::isfinite(m::logsigmoid(x)));
    if (std::abs(x) < 30) CHECK(m::logsigmoid(x) == doctest::Approx(std::log(naive_sig)).epsilon(1e-12));
    CHECK(m::softplus(x) == doctest::Approx(-m::logsigmoid(-x)));
    CHECK(m::sigmoid(static_cast<float>(x)) == doctest::Approx(naive_sig).epsilon(1e-6));
  }
  CHECK(m::logsigmoid(-800.0) == doctest::Approx(-800.0));
  CHECK(m::logsigmoid(800.0) == 0.0);
}

TEST_CASE("math: gradients of the activations match finite differences") {
  for (double x : {-5.0, -0.7, 0.0, 0.3, 4.0}) {
    const double h = 1e-6;
    const double fd = (m::logsigmoid(x + h) - m::logsigmoid(x - h)) / (2 * h);
    CHECK(m::logsigmoid_grad(x) == doctest::Approx(fd).epsilon(1e-8));
    const double y = m::sigmoid(x);
    CHECK(m::sigmoid_grad_from_output(y) ==
          doctest::Approx((m::sigmoid(x + h) - m::sigmoid(x - h)) / (2 * h)).epsilon(1e-8));
    const double t = std::tanh(x);
    CHECK(m::tanh_grad_from_output(t) ==
          doctest::Approx((std::tanh(x + h) - std::tanh(x - h)) / (2 * h)).epsilon(1e-8));
  }
}

TEST_CASE("math: sigmoid_grad from x is exact to rounding where y (1 - y) is not") {
  auto rel = [](double a, double b) { return std::abs(a - b) / std::abs(b); };
  for (double x : {-40.0, -16.0, -5.0, 0.0, 0.3, 5.0, 10.0, 16.0, 20.0, 40.0}) {
    CAPTURE(x);
    const double e = std::exp(-std::abs(x)), exact = e / ((1 + e) * (1 + e));
    CHECK(rel(m::sigmoid_grad(x), exact) < 1e-15);
    CHECK(rel(double(m::sigmoid_grad(static_cast<float>(x))), exact) < 1e-6);
    // central differences of sigmoid at -|x| (sigmoid' is even; there sigmoid is exact to
    // rounding relative to its size, near 1 it is not)
    const double xn = -std::abs(x), h = 1e-5;
    CHECK(rel(m::sigmoid_grad(x), (m::sigmoid(xn + h) - m::sigmoid(xn - h)) / (2 * h)) < 1e-9);
  }
  // from the rounded output in float: ~1e-3 off at x = 10, no digit left at 17
  CHECK(rel(m::sigmoid_grad_from_output(m::sigmoid(10.f)), m::sigmoid_grad(10.0)) > 1e-4);
  CHECK(rel(m::sigmoid_grad_from_output(m::sigmoid(17.f)), m::sigmoid_grad(17.0)) > 0.1);
  CHECK(m::sigmoid_grad(std::numeric_limits<double>::infinity()) == 0.0);
  CHECK(m::sigmoid_grad(-std::numeric_limits<double>::infinity()) == 0.0);
}

TEST_CASE("math: tanh_grad from x is exact to rounding where 1 - tanh^2 is not") {
  auto rel = [](double a, double b) { return std::abs(a - b) / std::abs(b); };
  for (double x : {-40.0, -20.0, -9.0, -5.0, -0.3, 0.0, 1e-4, 0.3, 5.0, 9.0, 16.0, 20.0, 40.0}) {
    CAPTURE(x);
    const double e = std::exp(-2 * std::abs(x)), exact = 4 * e / ((1 + e) * (1 + e));  // sech^2
    CHECK(rel(m::tanh_grad(x), exact) < 1e-15);
    CHECK(rel(double(m::tanh_grad(static_cast<float>(x))), exact) < 1e-6);
    CHECK(rel(m::tanh_grad(x), 1 / (std::cosh(x) * std::cosh(x))) < 1e-14);
    // central differences where tanh is not near +-1 (there they cancel)
    const double h = 1e-6;
    if (std::abs(x) < 1) CHECK(rel(m::tanh_grad(x), (std::tanh(x + h) - std::tanh(x - h)) / (2 * h)) < 1e-9);
  }
  // from the rounded output in float: ~1.5e-4 off at x = 5, a factor 2 at 9, nothing left at
  // 10 (tanh(10.f) == 1)
  CHECK(rel(m::tanh_grad_from_output(std::tanh(5.f)), m::tanh_grad(5.0)) > 1e-4);
  CHECK(rel(m::tanh_grad_from_output(std::tanh(9.f)), m::tanh_grad(9.0)) > 0.5);
  CHECK(m::tanh_grad_from_output(std::tanh(10.f)) == 0.f);
  CHECK(m::tanh_grad(std::numeric_limits<double>::infinity()) == 0.0);
  CHECK(m::tanh_grad(-std::numeric_limits<float>::infinity()) == 0.f);
}

TEST_CASE("math: MaxSum is an exact, order-independent log-sum-exp") {
  moxe::test::Rng rng(moxe::test::fresh_seed());
  const auto xs = moxe::test::uniform_vector<double>(rng, 37, -50, 50);
  double mx = -INFINITY;
  for (double x : xs) mx = std::max(mx, x);
  double s = 0;
  for (double x : xs) s += std::exp(x - mx);
  const double lse = mx + std::log(s);

  m::MaxSum<double> seq;
  for (double x : xs) seq.add(x);
  CHECK(seq.log_sum_exp() == doctest::Approx(lse).epsilon(1e-14));

  m::MaxSum<double> left, right;
  for (std::size_t i = 0; i < xs.size(); ++i) (i % 3 ? left : right).add(xs[i]);
  CHECK(m::MaxSum<double>::merge(left, right).log_sum_exp() == doctest::Approx(lse).epsilon(1e-14));
  CHECK(m::MaxSum<double>::merge(m::MaxSum<double>{}, seq).log_sum_exp() == doctest::Approx(lse));
  CHECK(m::MaxSum<double>{}.log_sum_exp() == -m::infinity<double>());
  CHECK(m::log_add_exp(1.0, 2.0) == doctest::Approx(std::log(std::exp(1.0) + std::exp(2.0))));
  CHECK(m::exp_sub(-m::infinity<double>(), -m::infinity<double>()) == 0.0);
}

TEST_CASE("math: clamped entropy term and its gradient") {
  const double floor = 1e-6;
  for (double q : {0.0, 1e-9, 1e-6, 0.01, 0.5, 1.0}) {
    CHECK(m::xlogx_clamped(q, floor) == doctest::Approx(q * std::log(std::max(q, floor))));
  }
  const double q = 0.3, h = 1e-7;
  CHECK(m::xlogx_clamped_grad(q, floor) ==
        doctest::Approx((m::xlogx_clamped(q + h, floor) - m::xlogx_clamped(q - h, floor)) / (2 * h)).epsilon(1e-7));
  CHECK(m::xlogx_clamped_grad(1e-9, floor) == doctest::Approx(std::log(floor)));
}

TEST_CASE("workspace: sizing and carving agree, any base alignment fits") {
  auto plan = [](moxe::WorkspaceCarver& c, float** a, long long** b, char** z) {
    *a = c.carve<float>(1000);
    *z = c.carve<char>(0);
    *b = c.carve<long long>(3);
  };
  moxe::WorkspaceCarver sizing;
  float* a;
  long long* b;
  char* z;
  plan(sizing, &a, &b, &z);
  CHECK(a == nullptr);
  CHECK(sizing.sizing());
  const std::size_t need = sizing.required_bytes();
  CHECK(need >= 4000 + 24);

  std::vector<char> storage(need + 512);
  for (std::size_t shift : {0, 1, 7, 255}) {
    moxe::WorkspaceCarver c(storage.data() + shift, need);
    plan(c, &a, &b, &z);
    REQUIRE(c.fits());
    CHECK(z == nullptr);
    CHECK(reinterpret_cast<std::uintptr_t>(a) % moxe::WorkspaceCarver::kAlignment == 0);
    CHECK(reinterpret_cast<std::uintptr_t>(b) % moxe::WorkspaceCarver::kAlignment == 0);
    CHECK(reinterpret_cast<char*>(a) >= storage.data() + shift);
    CHECK(reinterpret_cast<char*>(b + 3) <= storage.data() + shift + need);
  }
  moxe::WorkspaceCarver small(storage.data(), need / 2);
  plan(small, &a, &b, &z);
  CHECK_FALSE(small.fits());
  CHECK(b == nullptr);

  moxe::WorkspaceCarver empty;
  CHECK(empty.required_bytes() == 0);
  moxe::WorkspaceCarver null_ok(nullptr, 0);
  CHECK(null_ok.fits());
}

TEST_CASE("status: names") {
  CHECK(std::string(moxe::to_string(moxe::Status::ok)) == "ok");
  CHECK(std::string(moxe::to_string(moxe::Status::invalid_argument)) == "invalid_argument");
  CHECK(std::string(moxe::to_string(moxe::Status::unsupported)) == "unsupported");
  CHECK(std::string(moxe::to_string(moxe::Status::workspace_too_small)) == "workspace_too_small");
  CHECK(std::string(moxe::to_string(moxe::Status::cuda_error)) == "cuda_error");
  auto f = [](bool good) -> moxe::Status {
    MOXE_REQUIRE(good);
    return moxe::Status::ok;
  };
  CHECK(f(true) == moxe::Status::ok);
  CHECK(f(false) == moxe::Status::invalid_argument);
}

TEST_CASE("test utilities: rel_error sees NaN, finite differences are accurate") {
  std::vector<double> ref{1, 2, 3};
  auto out = moxe::test::poisoned<double>(3);
  CHECK(moxe::test::rel_error(out, ref) == INFINITY);
  out = ref;
  CHECK(moxe::test::rel_error(out, ref) == 0.0);
  std::vector<double> x{0.3, -1.2};
  auto f = [&] { return std::sin(x[0]) * x[1] * x[1]; };
  std::vector<double> g{std::cos(x[0]) * x[1] * x[1], 2 * std::sin(x[0]) * x[1]};
  CHECK(moxe::test::gradient_error(f, x, g) < 1e-8);
}
