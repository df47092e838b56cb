// Host helpers shared by the dispatch tests: router-like random top-k indices and the
// reference routing map with every optional output.
#pragma once

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <vector>

#include <doctest/doctest.h>

#include "moxe/dispatch/params.hpp"
#include "moxe/dispatch/reference.hpp"
#include "test_utils.hpp"

namespace moxe::dispatch::testing {

namespace md = moxe::dispatch;
namespace ref = moxe::dispatch::reference;
using moxe::Status;

struct Map {
  std::vector<int64_t> row_map, offsets;
  std::vector<int32_t> counts, routed;
  int64_t dropped = -7, invalid = -7;
};

inline Map make_map(const md::Dims& d, const std::vector<int32_t>& idx, Status* status = nullptr) {
  Map m;
  m.row_map.assign(d.tokens * d.top_k, -5);
  m.offsets.assign(d.experts + 1, -5);
  m.counts.assign(d.experts, -5);
  m.routed.assign(d.experts, -5);
  md::RoutingMapParams p{d, idx.data(), m.row_map.data(), m.offsets.data(), m.counts.data()};
  p.routed_counts = m.routed.data();
  p.dropped_count = &m.dropped;
  p.invalid_count = &m.invalid;
  const Status s = ref::routing_map(p);
  if (status) *status = s;
  else REQUIRE(s == Status::ok);
  return m;
}

/// Random top-k indices: distinct experts per token (like a router), a fraction of -1.
inline std::vector<int32_t> random_topk(moxe::test::Rng& rng, const md::Dims& d, double unrouted = 0.0,
                                        int hot_experts = 0) {
  std::vector<int32_t> idx(d.tokens * d.top_k);
  std::vector<int32_t> experts(d.experts);
  std::iota(experts.begin(), experts.end(), 0);
  const int pool = hot_experts > 0 ? std::max(hot_experts, d.top_k) : d.experts;
  for (int64_t t = 0; t < d.tokens; ++t) {
    std::shuffle(experts.begin(), experts.begin() + pool, rng.engine());
    for (int k = 0; k < d.top_k; ++k)
      idx[t * d.top_k + k] = rng.uniform(0, 1) < unrouted ? -1 : experts[k];
  }
  return idx;
}

}  // namespace moxe::dispatch::testing
