// Helpers of the routing-variant device tests: selection comparison that tolerates
// disagreement only where the double reference sits within a hair of a selection change
// (float and double may round to different sides there), and bitwise comparison.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace moxe::test::variants {

/// Relative gap below which float and double may order two scores differently.
inline constexpr double kDeviceTieMargin = 1e-5;

inline bool close_but_distinct(double a, double b) {
  const double d = std::abs(a - b);
  return d > 0 && d <= kDeviceTieMargin * std::max(std::abs(a), std::abs(b));
}

/// Whether some pair of the values is close but distinct (ties are exact on both sides).
inline bool ambiguous_order(const std::vector<double>& v) {
  for (size_t i = 0; i < v.size(); ++i)
    for (size_t j = i + 1; j < v.size(); ++j)
      if (close_but_distinct(v[i], v[j])) return true;
  return false;
}

template <class A>
bool bitwise_equal(const std::vector<A>& a, const std::vector<A>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(A)) == 0);
}

}  // namespace moxe::test::variants
