// Random routings for the loss tests (host and device).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

#include "test_utils.hpp"

namespace moxe::test {

/// Random row-stochastic probs [T, E] and a distinct-expert top-k of them.
struct Routing {
  std::vector<double> probs;
  std::vector<int32_t> idx;
  Routing(Rng& rng, int64_t T, int E, int K) : probs(T * E), idx(T * K) {
    for (int64_t t = 0; t < T; ++t) {
      double s = 0;
      for (int e = 0; e < E; ++e) s += probs[t * E + e] = std::exp(rng.normal());
      for (int e = 0; e < E; ++e) probs[t * E + e] /= s;
      std::vector<int> order(E);
      std::iota(order.begin(), order.end(), 0);
      std::shuffle(order.begin(), order.end(), rng.engine());
      for (int k = 0; k < K; ++k) idx[t * K + k] = order[k];
    }
  }
};

}  // namespace moxe::test
