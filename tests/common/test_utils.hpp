// Host test utilities shared by every moxe test: seeded random tensors, NaN poisoning,
// relative error, and finite-difference gradient checks in double.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <limits>
#include <random>
#include <vector>

namespace moxe::test {

/// A fresh seed per run (so every run draws new inputs) unless MOXE_TEST_SEED pins one.
/// Every seed is printed with the place that drew it, so a failure can be replayed with
/// MOXE_TEST_SEED=<seed> (ctest shows the output of a failing test).
inline std::uint64_t fresh_seed(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  std::uint64_t seed = 0;
  if (const char* s = std::getenv("MOXE_TEST_SEED")) {
    seed = std::strtoull(s, nullptr, 10);
  } else {
    std::random_device rd;
    seed = (static_cast<std::uint64_t>(rd()) << 32) ^ rd();
  }
  const char* base = std::strrchr(file, '/');
  std::printf("[seed] %llu  %s:%d  (MOXE_TEST_SEED=%llu replays it)\n", static_cast<unsigned long long>(seed),
              base != nullptr ? base + 1 : file, line, static_cast<unsigned long long>(seed));
  return seed;
}

/// True when the environment variable `name` is set to something other than "" or "0".
inline bool env_flag(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' && std::strcmp(v, "0") != 0;
}

/// Device tests run at the sizes a functional GPU simulator can afford (MOXE_TEST_SMALL,
/// set by scripts/sim-check.sh): the same edge cases (sizes not multiples of the tiles,
/// size 1, multi-block and multi-launch paths at the smallest sizes that reach them), fewer
/// and smaller of the rest.
inline bool small_sizes() { return env_flag("MOXE_TEST_SMALL"); }

/// The device tests run on the functional simulator (MOXE_TEST_SIMULATOR, set by
/// scripts/sim-check.sh), not on a GPU.
inline bool on_simulator() { return env_flag("MOXE_TEST_SIMULATOR"); }

/// `full` on a GPU, `small` in small-size mode.
template <class T>
std::vector<T> sizes(std::initializer_list<T> full, std::initializer_list<T> small) {
  return small_sizes() ? std::vector<T>(small) : std::vector<T>(full);
}
template <class T>
T size(T full, T small) {
  return small_sizes() ? small : full;
}

/// A doctest decorator value: true (skip) on the simulator, after printing why, so that
/// scripts/sim-check.sh lists every case it does not run with its reason. Use as
///   TEST_CASE("name" * doctest::skip(moxe::test::skip_on_simulator("reason"))) { ... }
inline bool skip_on_simulator(const char* reason) {
  if (!on_simulator()) return false;
  std::printf("[sim-skip] %s\n", reason);
  return true;
}

class Rng {
 public:
  explicit Rng(std::uint64_t seed) : engine_(seed) {}
  double uniform(double lo = -1.0, double hi = 1.0) {
    return std::uniform_real_distribution<double>(lo, hi)(engine_);
  }
  double normal(double mean = 0.0, double stddev = 1.0) {
    return std::normal_distribution<double>(mean, stddev)(engine_);
  }
  std::int64_t integer(std::int64_t lo, std::int64_t hi) {  // inclusive bounds
    return std::uniform_int_distribution<std::int64_t>(lo, hi)(engine_);
  }
  std::mt19937_64& engine() { return engine_; }

 private:
  std::mt19937_64 engine_;
};

template <class T>
std::vector<T> uniform_vector(Rng& rng, std::size_t n, double lo = -1.0, double hi = 1.0) {
  std::vector<T> v(n);
  for (auto& x : v) x = static_cast<T>(rng.uniform(lo, hi));
  return v;
}

template <class T>
std::vector<T> normal_vector(Rng& rng, std::size_t n, double stddev = 1.0) {
  std::vector<T> v(n);
  for (auto& x : v) x = static_cast<T>(rng.normal(0.0, stddev));
  return v;
}

/// Fill with quiet NaN so that any element a kernel fails to write shows up in the error.
template <class T>
void poison(std::vector<T>& v) {
  std::fill(v.begin(), v.end(), std::numeric_limits<T>::quiet_NaN());
}

template <class T>
std::vector<T> poisoned(std::size_t n) {
  return std::vector<T>(n, std::numeric_limits<T>::quiet_NaN());
}

template <class T>
bool all_finite(const std::vector<T>& v) {
  return std::all_of(v.begin(), v.end(), [](T x) { return std::isfinite(static_cast<double>(x)); });
}

/// ||out - ref|| / ||ref|| in double; +inf if any element of `out` is not finite or the
/// sizes differ. With ||ref|| == 0 the absolute norm ||out|| is returned.
template <class A, class B>
double rel_error(const A* out, const B* ref, std::size_t n) {
  double num = 0.0, den = 0.0;
  for (std::size_t i = 0; i < n; ++i) {
    const double o = static_cast<double>(out[i]);
    const double r = static_cast<double>(ref[i]);
    if (!std::isfinite(o)) return std::numeric_limits<double>::infinity();
    num += (o - r) * (o - r);
    den += r * r;
  }
  return den > 0.0 ? std::sqrt(num / den) : std::sqrt(num);
}

template <class A, class B>
double rel_error(const std::vector<A>& out, const std::vector<B>& ref) {
  if (out.size() != ref.size()) return std::numeric_limits<double>::infinity();
  return rel_error(out.data(), ref.data(), out.size());
}

/// ||out - ref|| / max(||ref||, floor) in double (the floor keeps a small reference from
/// turning rounding into a large relative error); +inf if the sizes differ or `out` is not
/// finite.
template <class A, class B>
double rel_error_floor(const std::vector<A>& out, const std::vector<B>& ref, double floor) {
  if (out.size() != ref.size()) return std::numeric_limits<double>::infinity();
  double num = 0.0, den = 0.0;
  for (std::size_t i = 0; i < out.size(); ++i) {
    const double o = static_cast<double>(out[i]), r = static_cast<double>(ref[i]);
    num += (o - r) * (o - r);
    den += r * r;
  }
  if (!std::isfinite(num)) return std::numeric_limits<double>::infinity();
  return std::sqrt(num) / std::max({std::sqrt(den), floor, 1e-30});
}

/// The error of a log-domain quantity (the mLSTM stabiliser m): rel_error_floor with the floor
/// sqrt(n), i.e. relative where |m| > 1 and absolute near 0 (an error e in m scales the
/// stabilised states by exp(e)); a plain relative error of an m near 0 is unbounded.
template <class A, class B>
double log_rel_error(const std::vector<A>& out, const std::vector<B>& ref) {
  return rel_error_floor(out, ref, std::sqrt(static_cast<double>(ref.size())));
}

template <class A>
std::vector<double> to_double(const std::vector<A>& v) {
  return std::vector<double>(v.begin(), v.end());
}

/// Central finite-difference gradient of a scalar function of `x` (double), element by
/// element: g_i = (f(x + h e_i) - f(x - h e_i)) / 2h. `x` is restored afterwards.
inline std::vector<double> finite_difference(const std::function<double()>& f, std::vector<double>& x,
                                             double h = 1e-6) {
  std::vector<double> g(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) {
    const double saved = x[i];
    x[i] = saved + h;
    const double fp = f();
    x[i] = saved - h;
    const double fm = f();
    x[i] = saved;
    g[i] = (fp - fm) / (2.0 * h);
  }
  return g;
}

/// Compare an analytic gradient with finite differences of `f` with respect to `x`:
/// returns ||analytic - fd|| / ||fd|| (see rel_error).
inline double gradient_error(const std::function<double()>& f, std::vector<double>& x,
                             const std::vector<double>& analytic, double h = 1e-6) {
  const std::vector<double> fd = finite_difference(f, x, h);
  return rel_error(analytic, fd);
}

/// sum_i a_i * b_i in double: the scalar loss <out, cotangent> a gradient check differentiates.
template <class A, class B>
double dot(const std::vector<A>& a, const std::vector<B>& b) {
  double s = 0.0;
  for (std::size_t i = 0; i < a.size() && i < b.size(); ++i)
    s += static_cast<double>(a[i]) * static_cast<double>(b[i]);
  return s;
}

}  // namespace moxe::test
