// Host tests of moxe::dispatch: properties of the reference routing map, permute and
// unpermute, gradients against finite differences, the expert-parallel reorder, bad input,
// and a host emulation of the device counting sort (same tiles, same phases) against the
// reference.
#include <doctest/doctest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

#include "moxe/dispatch/detail/chunk_sort.hpp"
#include "moxe/dispatch/detail/counting_sort.hpp"
#include "moxe/dispatch/params.hpp"
#include "moxe/dispatch/reference.hpp"
#include "dispatch_testing.hpp"
#include "test_utils.hpp"

namespace md = moxe::dispatch;
namespace ref = moxe::dispatch::reference;
using moxe::Status;

using moxe::dispatch::testing::make_map;
using moxe::dispatch::testing::Map;
using moxe::dispatch::testing::random_topk;

namespace {

/// Every property the routing map promises, checked from first principles.
void check_map_properties(const md::Dims& d, const std::vector<int32_t>& idx, const Map& m) {
  const int64_t entries = d.tokens * d.top_k, rows = md::permuted_rows(d);
  std::vector<int64_t> routed(d.experts, 0);
  for (int32_t e : idx)
    if (e >= 0) ++routed[e];
  CHECK(m.offsets[0] == 0);
  int64_t dropped = 0;
  for (int e = 0; e < d.experts; ++e) {
    const int64_t kept = d.capacity < 0 ? routed[e] : std::min(routed[e], d.capacity);
    dropped += routed[e] - kept;
    CHECK(m.counts[e] == kept);
    CHECK(m.routed[e] == routed[e]);
    const int64_t seg = m.offsets[e + 1] - m.offsets[e];
    CHECK(seg % d.align == 0);
    CHECK(seg >= kept);
    CHECK(seg < kept + d.align);
  }
  CHECK(m.dropped == dropped);
  CHECK(m.invalid == 0);
  CHECK(m.offsets[d.experts] <= rows);
  // every kept (t, k) lands exactly once, inside its expert's data rows, in token order;
  // the capacity drops the last ones in token order
  std::vector<int> hits(rows, 0);
  std::vector<int64_t> seen(d.experts, 0);
  for (int64_t i = 0; i < entries; ++i) {
    const int e = idx[i];
    const int64_t r = m.row_map[i];
    if (e < 0) {
      CHECK(r == -1);
      continue;
    }
    const int64_t pos = seen[e]++;
    if (d.capacity >= 0 && pos >= d.capacity) {
      CHECK(r == -1);
      continue;
    }
    REQUIRE(r >= 0);
    REQUIRE(r < rows);
    CHECK(r == m.offsets[e] + pos);  // stable: the pos-th in token order gets the pos-th row
    ++hits[r];
  }
  for (int e = 0; e < d.experts; ++e)
    for (int64_t r = m.offsets[e]; r < m.offsets[e + 1]; ++r)
      CHECK(hits[r] == (r < m.offsets[e] + m.counts[e] ? 1 : 0));
  for (int64_t r = m.offsets[d.experts]; r < rows; ++r) CHECK(hits[r] == 0);
}

/// permute into a poisoned buffer; with offsets the rows from offsets[E] on stay poisoned.
std::vector<double> do_permute(const md::Dims& d, const std::vector<double>& x, const Map& m,
                               bool with_offsets = false) {
  std::vector<double> xp = moxe::test::poisoned<double>(md::permuted_rows(d) * d.hidden);
  REQUIRE(ref::permute(md::PermuteParams<double>{d, x.data(), m.row_map.data(),
                                                 with_offsets ? m.offsets.data() : nullptr, xp.data()}) ==
          Status::ok);
  return xp;
}

std::vector<double> do_unpermute(const md::Dims& d, const std::vector<double>& yp, const Map& m,
                                 const std::vector<double>& w) {
  std::vector<double> y = moxe::test::poisoned<double>(d.tokens * d.hidden);
  REQUIRE(ref::unpermute(md::UnpermuteParams<double, double>{d, yp.data(), m.row_map.data(), w.data(),
                                                             y.data()}) == Status::ok);
  return y;
}

// ---- host emulation of the device counting sort -------------------------------------------
// The same tiles, warps, chunks and lanes as the kernels in permute.cuh, the same three
// phases (per-tile histograms, a per-expert scan over tiles plus a scan over experts, a
// stable rank), with the warp's match-any ranking replaced by a lane-ordered loop.

/// __match_any_sync over one warp: for each lane, the mask of lanes holding the same value.
std::array<unsigned, 32> match_any(const std::array<int, 32>& value) {
  std::array<unsigned, 32> peers{};
  for (int l = 0; l < 32; ++l)
    for (int m = 0; m < 32; ++m)
      if (value[m] == value[l]) peers[l] |= 1u << m;
  return peers;
}

int lowest_lane(unsigned mask) {  // __ffs(mask) - 1
  int l = 0;
  while (!(mask & (1u << l))) ++l;
  return l;
}

int popcount(unsigned mask) {
  int n = 0;
  for (; mask; mask &= mask - 1) ++n;
  return n;
}

Map emulate_device_map(const md::Dims& d, const std::vector<int32_t>& idx) {
  using Tiling = md::detail::MapTiling;
  const int E = d.experts;
  const int64_t entries = d.tokens * d.top_k, tiles = Tiling::tiles(entries);
  // load_warp_experts: lane l's value in chunk c (sanitized; -1 past the end)
  auto chunk_experts = [&](int64_t b, int w, int c) {
    std::array<int, 32> e{};
    for (int l = 0; l < 32; ++l) {
      const int64_t i = Tiling::entry(b, w, c, l);
      e[l] = i < entries ? md::detail::sanitize_expert(idx[i], E) : -1;
    }
    return e;
  };
  // count_warp_experts: the lowest lane of each group of equal experts adds the group size
  auto warp_counts = [&](int64_t b, std::vector<int32_t>& counts) {  // [kWarps][E]
    counts.assign(std::size_t(Tiling::kWarps) * E, 0);
    for (int w = 0; w < Tiling::kWarps; ++w)
      for (int c = 0; c < Tiling::kChunksPerWarp; ++c) {
        const auto e = chunk_experts(b, w, c);
        const auto peers = match_any(e);
        for (int l = 0; l < 32; ++l)
          if (e[l] >= 0 && l == lowest_lane(peers[l])) counts[w * E + e[l]] += popcount(peers[l]);
      }
  };
  // phase 1 (map_histogram_kernel): histograms [tiles][E] and invalid counts per tile
  std::vector<int32_t> hist(tiles * E), tile_invalid(tiles, 0), counts;
  for (int64_t b = 0; b < tiles; ++b) {
    warp_counts(b, counts);
    for (int e = 0; e < E; ++e) {
      int32_t s = 0;
      for (int w = 0; w < Tiling::kWarps; ++w) s += counts[w * E + e];
      hist[b * E + e] = s;
    }
    for (int w = 0; w < Tiling::kWarps; ++w)
      for (int c = 0; c < Tiling::kChunksPerWarp; ++c)
        for (int l = 0; l < Tiling::kLanes; ++l) {
          const int64_t i = Tiling::entry(b, w, c, l);
          if (i < entries && md::detail::is_invalid_expert(idx[i], E)) ++tile_invalid[b];
        }
  }
  // phase 2 (map_scan_kernel): batched exclusive prefix over tiles per expert, the segments
  Map m;
  m.offsets.assign(E + 1, 0);
  m.counts.assign(E, 0);
  m.routed.assign(E, 0);
  m.dropped = 0;
  m.invalid = 0;
  constexpr int kBatch = 16;
  for (int e = 0; e < E; ++e) {
    int64_t running = 0;
    for (int64_t b0 = 0; b0 < tiles; b0 += kBatch) {
      int32_t c[kBatch];
      for (int q = 0; q < kBatch; ++q) c[q] = b0 + q < tiles ? hist[(b0 + q) * E + e] : 0;
      for (int q = 0; q < kBatch; ++q) {
        if (b0 + q < tiles) hist[(b0 + q) * E + e] = static_cast<int32_t>(running);
        running += c[q];
      }
    }
    const int64_t kept = md::detail::kept_rows(running, d.capacity);
    m.routed[e] = static_cast<int32_t>(running);
    m.counts[e] = static_cast<int32_t>(kept);
    m.dropped += running - kept;
    m.offsets[e + 1] = m.offsets[e] + md::detail::padded_rows(kept, d.align);
  }
  for (int64_t b = 0; b < tiles; ++b) m.invalid += tile_invalid[b];
  // phase 3 (map_rank_kernel): warp bases, then per chunk the leader reads and advances
  // the base and every lane adds the peers below it
  m.row_map.assign(entries, -5);
  for (int64_t b = 0; b < tiles; ++b) {
    warp_counts(b, counts);
    std::vector<int32_t> base(std::size_t(Tiling::kWarps) * E);
    for (int e = 0; e < E; ++e) {
      int32_t running = hist[b * E + e];
      for (int w = 0; w < Tiling::kWarps; ++w) {
        base[w * E + e] = running;
        running += counts[w * E + e];
      }
    }
    for (int w = 0; w < Tiling::kWarps; ++w)
      for (int c = 0; c < Tiling::kChunksPerWarp; ++c) {
        const auto e = chunk_experts(b, w, c);
        const auto peers = match_any(e);
        std::array<int32_t, 32> first{};
        for (int l = 0; l < 32; ++l)
          if (e[l] >= 0 && l == lowest_lane(peers[l])) {
            first[l] = base[w * E + e[l]];
            base[w * E + e[l]] = first[l] + popcount(peers[l]);
          }
        for (int l = 0; l < 32; ++l) {
          const int64_t i = Tiling::entry(b, w, c, l);
          if (i >= entries) continue;
          const int64_t position = int64_t(first[lowest_lane(peers[l])]) + popcount(peers[l] & ((1u << l) - 1u));
          m.row_map[i] = e[l] < 0 ? -1 : md::detail::row_of(m.offsets[e[l]], position, d.capacity);
        }
      }
  }
  return m;
}

}  // namespace

TEST_CASE("routing map: properties over sizes, capacities and alignments") {
  const auto seed = moxe::test::fresh_seed();
  INFO("seed " << seed);
  moxe::test::Rng rng(seed);
  struct Case { int64_t tokens; int experts, top_k; int64_t capacity; int align; double unrouted; int hot; };
  const Case cases[] = {
      {1, 4, 2, -1, 1, 0.0, 0},      {1, 1, 1, -1, 1, 0.0, 0},      {37, 8, 2, -1, 1, 0.0, 0},
      {37, 8, 2, -1, 8, 0.0, 0},     {100, 16, 4, 10, 1, 0.0, 0},   {100, 16, 4, 10, 16, 0.2, 0},
      {513, 64, 8, -1, 128, 0.1, 0}, {333, 32, 6, 0, 4, 0.0, 0},    {200, 8, 1, -1, 1, 0.0, 1},
      {200, 8, 2, 50, 3, 0.0, 2},    {1025, 300, 32, 70, 7, 0.05, 0}, {64, 1024, 3, -1, 2, 0.0, 0},
  };
  for (const Case& c : cases) {
    md::Dims d{c.tokens, 3, c.experts, c.top_k, c.capacity, c.align};
    INFO("T=" << c.tokens << " E=" << c.experts << " K=" << c.top_k << " cap=" << c.capacity
              << " align=" << c.align);
    const auto idx = random_topk(rng, d, c.unrouted, c.hot);
    const Map m = make_map(d, idx);
    check_map_properties(d, idx, m);
    // data rows hold their token; padding rows are zero; past offsets[E] rows are untouched
    // when the offsets are given and zero when they are not
    const auto x = moxe::test::uniform_vector<double>(rng, d.tokens * d.hidden, 0.5, 1.5);
    for (bool with_offsets : {true, false}) {
      const auto xp = do_permute(d, x, m, with_offsets);
      std::vector<char> data_row(md::permuted_rows(d), 0);
      for (int64_t i = 0; i < d.tokens * d.top_k; ++i)
        if (m.row_map[i] >= 0) {
          data_row[m.row_map[i]] = 1;
          for (int j = 0; j < d.hidden; ++j)
            CHECK(xp[m.row_map[i] * d.hidden + j] == x[(i / d.top_k) * d.hidden + j]);
        }
      for (int64_t r = 0; r < md::permuted_rows(d); ++r)
        if (!data_row[r])
          for (int j = 0; j < d.hidden; ++j) {
            if (with_offsets && r >= m.offsets[d.experts]) CHECK(std::isnan(xp[r * d.hidden + j]));
            else CHECK(xp[r * d.hidden + j] == 0.0);
          }
    }
  }
}

TEST_CASE("routing map: edge cases") {
  SUBCASE("an expert with no token and all tokens to one expert") {
    md::Dims d{50, 2, 5, 1, -1, 4};
    std::vector<int32_t> idx(50, 3);
    const Map m = make_map(d, idx);
    check_map_properties(d, idx, m);
    CHECK(m.counts == std::vector<int32_t>{0, 0, 0, 50, 0});
    CHECK(m.offsets == std::vector<int64_t>{0, 0, 0, 0, 52, 52});
    for (int t = 0; t < 50; ++t) CHECK(m.row_map[t] == t);
  }
  SUBCASE("all entries -1") {
    md::Dims d{7, 2, 3, 2, -1, 1};
    std::vector<int32_t> idx(14, -1);
    const Map m = make_map(d, idx);
    check_map_properties(d, idx, m);
    CHECK(m.offsets[3] == 0);
  }
  SUBCASE("capacity drops the last tokens in token order") {
    md::Dims d{6, 1, 2, 2, 4, 1};
    // token t routes to (0, 1) or (1, 0): expert 0 sees tokens 0..5 in order
    std::vector<int32_t> idx = {0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 1, 0};
    const Map m = make_map(d, idx);
    check_map_properties(d, idx, m);
    CHECK(m.dropped == 4);
    CHECK(m.row_map == std::vector<int64_t>{0, 4, 5, 1, 2, 6, 7, 3, -1, -1, -1, -1});
  }
  SUBCASE("duplicate experts in one token keep k order") {
    md::Dims d{2, 1, 3, 3, -1, 1};
    std::vector<int32_t> idx = {1, 1, 0, 1, 0, 0};
    const Map m = make_map(d, idx);
    CHECK(m.row_map == std::vector<int64_t>{3, 4, 0, 5, 1, 2});
  }
}

TEST_CASE("unpermute of permute with weights summing to one gives the input back") {
  moxe::test::Rng rng(moxe::test::fresh_seed());
  md::Dims d{77, 5, 12, 4, -1, 8};
  const auto idx = random_topk(rng, d);
  const Map m = make_map(d, idx);
  const auto x = moxe::test::uniform_vector<double>(rng, d.tokens * d.hidden);
  auto w = moxe::test::uniform_vector<double>(rng, d.tokens * d.top_k, 0.1, 1.0);
  for (int64_t t = 0; t < d.tokens; ++t) {
    double s = 0;
    for (int k = 0; k < d.top_k; ++k) s += w[t * d.top_k + k];
    for (int k = 0; k < d.top_k; ++k) w[t * d.top_k + k] /= s;
  }
  const auto y = do_unpermute(d, do_permute(d, x, m), m, w);
  CHECK(moxe::test::rel_error(y, x) < 1e-14);
}

TEST_CASE("gradients of permute and unpermute match finite differences") {
  const auto seed = moxe::test::fresh_seed();
  INFO("seed " << seed);
  moxe::test::Rng rng(seed);
  // capacity and -1 entries so that dropped rows and padding rows are part of the check
  md::Dims d{9, 3, 4, 2, 4, 3};
  const auto idx = random_topk(rng, d, 0.15);
  const Map m = make_map(d, idx);
  const int64_t rows = md::permuted_rows(d);
  const int64_t H = d.hidden, TK = d.tokens * d.top_k;

  SUBCASE("permute: dx = permute_backward(dxp)") {
    auto x = moxe::test::uniform_vector<double>(rng, d.tokens * H);
    const auto cot = moxe::test::uniform_vector<double>(rng, rows * H);
    std::vector<double> dx = moxe::test::poisoned<double>(d.tokens * H);
    REQUIRE(ref::permute_backward(md::PermuteBackwardParams<double>{d, cot.data(), m.row_map.data(),
                                                                    dx.data()}) == Status::ok);
    auto loss = [&] { return moxe::test::dot(do_permute(d, x, m), cot); };
    CHECK(moxe::test::gradient_error(loss, x, dx) < 1e-8);
  }
  SUBCASE("permute backward: d(dxp) = permute(cotangent)") {
    auto dxp = moxe::test::uniform_vector<double>(rng, rows * H);
    const auto cot = moxe::test::uniform_vector<double>(rng, d.tokens * H);
    auto loss = [&] {
      std::vector<double> dx(d.tokens * H);
      REQUIRE(ref::permute_backward(md::PermuteBackwardParams<double>{d, dxp.data(), m.row_map.data(),
                                                                      dx.data()}) == Status::ok);
      return moxe::test::dot(dx, cot);
    };
    CHECK(moxe::test::gradient_error(loss, dxp, do_permute(d, cot, m)) < 1e-8);
  }
  SUBCASE("unpermute: rows and weights") {
    auto yp = moxe::test::uniform_vector<double>(rng, rows * H);
    auto w = moxe::test::uniform_vector<double>(rng, TK);
    const auto dy = moxe::test::uniform_vector<double>(rng, d.tokens * H);
    std::vector<double> dyp = moxe::test::poisoned<double>(rows * H), dw = moxe::test::poisoned<double>(TK);
    md::UnpermuteBackwardParams<double, double> bp{{d, yp.data(), m.row_map.data(), w.data(), nullptr},
                                                   dy.data(), dyp.data(), dw.data()};
    REQUIRE(ref::unpermute_backward(bp) == Status::ok);
    auto loss = [&] { return moxe::test::dot(do_unpermute(d, yp, m, w), dy); };
    CHECK(moxe::test::gradient_error(loss, yp, dyp) < 1e-8);
    CHECK(moxe::test::gradient_error(loss, w, dw) < 1e-8);
    for (int64_t i = 0; i < TK; ++i)
      if (m.row_map[i] < 0) CHECK(dw[i] == 0.0);
  }
}

TEST_CASE("unpermute backward with expert_offsets leaves the tail untouched") {
  moxe::test::Rng rng(moxe::test::fresh_seed());
  md::Dims d{20, 4, 6, 2, 3, 4};
  const Map m = make_map(d, random_topk(rng, d, 0.2));
  const int64_t rows = md::permuted_rows(d), H = d.hidden, TK = d.tokens * d.top_k;
  const auto yp = moxe::test::uniform_vector<double>(rng, rows * H);
  const auto w = moxe::test::uniform_vector<double>(rng, TK);
  const auto dy = moxe::test::uniform_vector<double>(rng, d.tokens * H);
  std::vector<double> full = moxe::test::poisoned<double>(rows * H), part = full, dw(TK);
  md::UnpermuteBackwardParams<double, double> p{{d, yp.data(), m.row_map.data(), w.data(), nullptr},
                                                dy.data(), full.data(), dw.data()};
  REQUIRE(ref::unpermute_backward(p) == Status::ok);
  p.dyp = part.data();
  p.expert_offsets = m.offsets.data();
  REQUIRE(ref::unpermute_backward(p) == Status::ok);
  const int64_t used = m.offsets[d.experts];
  REQUIRE(used < rows);
  for (int64_t i = 0; i < rows * H; ++i) {
    CHECK(full[i] == full[i]);  // defined everywhere
    if (i < used * H) CHECK(part[i] == full[i]);
    else CHECK(std::isnan(part[i]));
  }
}

TEST_CASE("float references agree with double") {
  moxe::test::Rng rng(moxe::test::fresh_seed());
  md::Dims d{31, 17, 6, 3, -1, 4};
  const Map m = make_map(d, random_topk(rng, d, 0.1));
  const int64_t rows = md::permuted_rows(d);
  const auto yp = moxe::test::uniform_vector<double>(rng, rows * d.hidden);
  const auto w = moxe::test::uniform_vector<double>(rng, d.tokens * d.top_k);
  std::vector<float> ypf(yp.begin(), yp.end()), wf(w.begin(), w.end()), yf(d.tokens * d.hidden);
  REQUIRE(ref::unpermute(md::UnpermuteParams<float, float>{d, ypf.data(), m.row_map.data(), wf.data(),
                                                           yf.data()}) == Status::ok);
  CHECK(moxe::test::rel_error(yf, do_unpermute(d, yp, m, w)) < 1e-6);
}

TEST_CASE("host emulation of the device counting sort equals the reference") {
  const auto seed = moxe::test::fresh_seed();
  INFO("seed " << seed);
  moxe::test::Rng rng(seed);
  struct Case { int64_t tokens; int experts, top_k; int64_t capacity; int align; double unrouted; int hot; };
  const Case cases[] = {
      {1, 4, 2, -1, 1, 0.0, 0},         {3, 2, 1, -1, 1, 0.0, 0},         {511, 8, 8, -1, 1, 0.0, 0},
      {512, 8, 8, -1, 1, 0.0, 0},       {3001, 64, 8, -1, 16, 0.1, 0},    {4097, 128, 4, 100, 8, 0.0, 0},
      {2000, 1024, 32, 50, 1, 0.02, 0}, {9000, 16, 2, 1500, 4, 0.0, 3},   {12345, 256, 8, -1, 128, 0.0, 0},
  };
  for (const Case& c : cases) {
    md::Dims d{c.tokens, 1, c.experts, c.top_k, c.capacity, c.align};
    INFO("T=" << c.tokens << " E=" << c.experts << " K=" << c.top_k);
    const auto idx = random_topk(rng, d, c.unrouted, c.hot);
    const Map r = make_map(d, idx);
    const Map e = emulate_device_map(d, idx);
    CHECK(e.row_map == r.row_map);
    CHECK(e.offsets == r.offsets);
    CHECK(e.counts == r.counts);
    CHECK(e.routed == r.routed);
    CHECK(e.dropped == r.dropped);
    CHECK(e.invalid == 0);
  }
  SUBCASE("invalid indices are treated as -1 and counted") {
    md::Dims d{5000, 1, 40, 4, -1, 2};
    auto idx = random_topk(rng, d);
    int64_t bad = 0;
    auto clean = idx;
    for (std::size_t i = 0; i < idx.size(); i += 97) {
      idx[i] = (i % 2) ? 40 + int32_t(i % 5) : -2 - int32_t(i % 3);
      clean[i] = -1;
      ++bad;
    }
    const Map e = emulate_device_map(d, idx);
    const Map r = make_map(d, clean);
    CHECK(e.invalid == bad);
    CHECK(e.row_map == r.row_map);
    CHECK(e.offsets == r.offsets);
  }
}

TEST_CASE("host emulation of the device scatter grid: every row below the end written once") {
  // permute / unpermute_backward (permute.cuh): block b of ceil(permuted_rows / K) blocks
  // copies token b (b < T) to its K rows and zeros its candidate rows b*K + j that are below
  // `end` (expert_offsets[E], or permuted_rows without offsets) and unmarked in the used-row
  // mask. With align 1 and offsets given the launcher skips the mask: then no row below
  // offsets[E] may be unused.
  const auto seed = moxe::test::fresh_seed();
  INFO("seed " << seed);
  moxe::test::Rng rng(seed);
  struct Case { int64_t tokens; int experts, top_k; int64_t capacity; int align; double unrouted; };
  const Case cases[] = {
      {1, 4, 2, -1, 1, 0.0},     {37, 8, 2, -1, 8, 0.0},   {100, 16, 4, 10, 4, 0.2}, {129, 32, 6, 20, 1, 0.1},
      {16, 1024, 32, -1, 2, 0.0}, {5, 300, 1, -1, 128, 0.0}, {333, 32, 6, 0, 4, 0.0},  {64, 8, 8, 3, 1, 0.5},
  };
  for (const Case& c : cases) {
    const md::Dims d{c.tokens, 1, c.experts, c.top_k, c.capacity, c.align};
    INFO("T=" << c.tokens << " E=" << c.experts << " K=" << c.top_k << " cap=" << c.capacity << " align=" << c.align);
    const Map m = make_map(d, random_topk(rng, d, c.unrouted));
    const int64_t rows = md::permuted_rows(d), blocks = (rows + d.top_k - 1) / d.top_k;
    REQUIRE(blocks >= d.tokens);
    std::vector<char> used(rows, 0);
    for (int64_t r : m.row_map)
      if (r >= 0 && r < rows) used[r] = 1;
    for (bool with_offsets : {true, false}) {
      const int64_t end = with_offsets ? std::min(m.offsets[d.experts], rows) : rows;
      const bool masked = d.align > 1 || !with_offsets;
      std::vector<int> writes(rows, 0);
      for (int64_t b = 0; b < blocks; ++b) {
        if (b < d.tokens)
          for (int k = 0; k < d.top_k; ++k) {
            const int64_t r = m.row_map[b * d.top_k + k];
            if (r >= 0 && r < rows) ++writes[r];
          }
        for (int j = 0; j < d.top_k; ++j) {
          const int64_t r = b * d.top_k + j;
          if (masked && r < end && !used[r]) ++writes[r];
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        if (r < end) CHECK(writes[r] == 1);
        else CHECK(writes[r] == 0);
      }
    }
  }
}

TEST_CASE("expert parallelism: send counts and the chunk reorder round trip") {
  moxe::test::Rng rng(moxe::test::fresh_seed());
  SUBCASE("send counts") {
    const std::vector<int64_t> offsets = {0, 3, 3, 8, 16, 16, 20};  // 6 experts, 3 ranks
    std::vector<int64_t> counts(3, -1), starts(4, -1), rows(6, -1);
    md::SendCountsParams p{6, 3, offsets.data(), counts.data(), starts.data(), rows.data()};
    REQUIRE(ref::send_counts(p) == Status::ok);
    CHECK(counts == std::vector<int64_t>{3, 13, 4});
    CHECK(starts == std::vector<int64_t>{0, 3, 16, 20});
    CHECK(rows == std::vector<int64_t>{3, 0, 5, 8, 0, 4});
    p.ranks = 4;  // experts not divisible by ranks
    CHECK(ref::send_counts(p) == Status::invalid_argument);
  }
  SUBCASE("sort chunks: a hand-checked case and the round trip") {
    // 2 ranks, 2 local experts: splits (s0: 1, 2), (s1: 3, 0); rows tagged by their index
    const std::vector<int64_t> split = {1, 2, 3, 0};
    const int H = 2, max_rows = 8;
    std::vector<double> in(max_rows * H), out(max_rows * H, -1.0), back(max_rows * H, -1.0);
    for (int i = 0; i < max_rows * H; ++i) in[i] = i / H;
    std::vector<int64_t> eoff(3, -1);
    md::SortChunksParams<double> p{max_rows, H, 2, 2, split.data(), in.data(), out.data(), eoff.data()};
    REQUIRE(ref::sort_chunks(p) == Status::ok);
    // rank-major rows: [s0e0: 0] [s0e1: 1 2] [s1e0: 3 4 5]; expert-major: e0: 0, 3 4 5; e1: 1 2
    const std::vector<double> want = {0, 3, 4, 5, 1, 2};
    for (int r = 0; r < 6; ++r) CHECK(out[r * H] == want[r]);
    CHECK(out[6 * H] == -1.0);  // past the total: untouched
    CHECK(eoff == std::vector<int64_t>{0, 4, 6});
    md::SortChunksParams<double> q{max_rows, H, 2, 2, split.data(), out.data(), back.data()};
    REQUIRE(ref::sort_chunks_backward(q) == Status::ok);
    for (int i = 0; i < 6 * H; ++i) CHECK(back[i] == in[i]);
  }
  SUBCASE("random round trip and the gradient is the inverse") {
    const int R = 4, L = 3, H = 5;
    std::vector<int64_t> split(R * L);
    int64_t total = 0;
    for (auto& s : split) total += (s = rng.integer(0, 6));
    const int64_t max_rows = total + 3;
    auto in = moxe::test::uniform_vector<double>(rng, max_rows * H);
    std::vector<double> out(max_rows * H, 0.0), back(max_rows * H, 0.0);
    REQUIRE(ref::sort_chunks(md::SortChunksParams<double>{max_rows, H, R, L, split.data(), in.data(),
                                                          out.data()}) == Status::ok);
    REQUIRE(ref::sort_chunks_backward(md::SortChunksParams<double>{max_rows, H, R, L, split.data(),
                                                                   out.data(), back.data()}) == Status::ok);
    for (int64_t i = 0; i < total * H; ++i) CHECK(back[i] == in[i]);
    // <sort(in), c> = <in, sort_backward(c)>: the backward is the adjoint
    const auto cot = moxe::test::uniform_vector<double>(rng, max_rows * H);
    std::vector<double> din(max_rows * H, 0.0);
    REQUIRE(ref::sort_chunks_backward(md::SortChunksParams<double>{max_rows, H, R, L, split.data(),
                                                                   cot.data(), din.data()}) == Status::ok);
    CHECK(moxe::test::dot(out, cot) == doctest::Approx(moxe::test::dot(in, din)).epsilon(1e-12));
  }
  SUBCASE("bad split sizes") {
    const std::vector<int64_t> split = {1, -1};
    std::vector<double> in(4), out(4, 7.0);
    CHECK(ref::sort_chunks(md::SortChunksParams<double>{4, 1, 1, 2, split.data(), in.data(), out.data()}) ==
          Status::invalid_argument);
    const std::vector<int64_t> big = {3, 2};
    CHECK(ref::sort_chunks(md::SortChunksParams<double>{4, 1, 1, 2, big.data(), in.data(), out.data()}) ==
          Status::invalid_argument);
    CHECK(out == std::vector<double>(4, 7.0));
  }
}

TEST_CASE("host emulation of the device chunk reorder equals the reference") {
  moxe::test::Rng rng(moxe::test::fresh_seed());
  for (int trial = 0; trial < 20; ++trial) {
    const int R = int(rng.integer(1, 9)), L = int(rng.integer(1, 7)), H = 3;
    std::vector<int64_t> split(R * L);
    int64_t total = 0;
    for (auto& n : split) total += (n = rng.integer(0, 5) == 0 ? 0 : rng.integer(1, 9));
    const int64_t max_rows = total + 2;
    const auto in = moxe::test::uniform_vector<double>(rng, max_rows * H);
    // chunk_starts_kernel: exclusive scans in both orders, indexed by position
    std::vector<int64_t> starts[2];
    for (int order = 0; order < 2; ++order) {
      starts[order].assign(R * L + 1, 0);
      for (int q = 0; q < R * L; ++q) {
        const auto c = md::detail::chunk_at(q, order == 1, R, L);
        starts[order][q + 1] = starts[order][q] + split[c.rank * L + c.expert];
      }
    }
    for (bool to_expert_major : {true, false}) {
      std::vector<double> want(max_rows * H, 0.0), got(max_rows * H, 0.0);
      md::SortChunksParams<double> p{max_rows, H, R, L, split.data(), in.data(), want.data()};
      REQUIRE((to_expert_major ? ref::sort_chunks(p) : ref::sort_chunks_backward(p)) == Status::ok);
      for (int64_t r = 0; r < total; ++r) {  // sort_chunks_kernel, one output row at a time
        const int64_t src = md::detail::chunk_source_row(r, starts[0].data(), starts[1].data(), R, L, to_expert_major);
        REQUIRE(src >= 0);
        REQUIRE(src < total);
        for (int j = 0; j < H; ++j) got[r * H + j] = in[src * H + j];
      }
      CHECK(got == want);
    }
  }
}

TEST_CASE("bad input returns invalid_argument and writes nothing") {
  const md::Dims good{4, 2, 3, 2, -1, 1};
  std::vector<int32_t> idx = {0, 1, 2, 0, 1, 2, 0, 1};
  std::vector<int64_t> row_map(8, 99), offsets(4, 99);
  std::vector<int32_t> counts(3, 99);
  auto untouched = [&] {
    return std::all_of(row_map.begin(), row_map.end(), [](int64_t v) { return v == 99; }) &&
           std::all_of(offsets.begin(), offsets.end(), [](int64_t v) { return v == 99; }) &&
           std::all_of(counts.begin(), counts.end(), [](int32_t v) { return v == 99; });
  };
  auto run = [&](md::Dims d, const int32_t* ti, int64_t* rm) {
    return ref::routing_map(md::RoutingMapParams{d, ti, rm, offsets.data(), counts.data()});
  };
  auto with = [&](auto f) { md::Dims d = good; f(d); return d; };
  CHECK(run(with([](md::Dims& d) { d.top_k = 4; }), idx.data(), row_map.data()) == Status::invalid_argument);
  CHECK(run(with([](md::Dims& d) { d.top_k = 0; }), idx.data(), row_map.data()) == Status::invalid_argument);
  CHECK(run(with([](md::Dims& d) { d.experts = 0; }), idx.data(), row_map.data()) == Status::invalid_argument);
  CHECK(run(with([](md::Dims& d) { d.tokens = 0; }), idx.data(), row_map.data()) == Status::invalid_argument);
  CHECK(run(with([](md::Dims& d) { d.hidden = 0; }), idx.data(), row_map.data()) == Status::invalid_argument);
  CHECK(run(with([](md::Dims& d) { d.align = 0; }), idx.data(), row_map.data()) == Status::invalid_argument);
  CHECK(run(with([](md::Dims& d) { d.capacity = -2; }), idx.data(), row_map.data()) == Status::invalid_argument);
  CHECK(run(good, nullptr, row_map.data()) == Status::invalid_argument);
  CHECK(run(good, idx.data(), nullptr) == Status::invalid_argument);
  idx[5] = 3;  // out of range
  CHECK(run(good, idx.data(), row_map.data()) == Status::invalid_argument);
  idx[5] = -2;
  CHECK(run(good, idx.data(), row_map.data()) == Status::invalid_argument);
  CHECK(untouched());
  CHECK(run(with([](md::Dims& d) { d.tokens = int64_t(1) << 40; }), idx.data(), row_map.data()) ==
        Status::unsupported);

  // permute family: bad row maps and null pointers
  idx[5] = 2;
  REQUIRE(run(good, idx.data(), row_map.data()) == Status::ok);
  std::vector<double> x(8, 1.0), xp(16, 5.0), y(8, 5.0), w(8, 0.5), dw(8, 5.0);
  auto bad_map = row_map;
  bad_map[3] = bad_map[2];  // duplicate row
  CHECK(ref::permute(md::PermuteParams<double>{good, x.data(), bad_map.data(), nullptr, xp.data()}) ==
        Status::invalid_argument);
  bad_map = row_map;
  bad_map[0] = 8;  // past the buffer
  CHECK(ref::permute(md::PermuteParams<double>{good, x.data(), bad_map.data(), nullptr, xp.data()}) ==
        Status::invalid_argument);
  CHECK(ref::permute(md::PermuteParams<double>{good, nullptr, row_map.data(), nullptr, xp.data()}) ==
        Status::invalid_argument);
  CHECK(ref::unpermute(md::UnpermuteParams<double, double>{good, xp.data(), row_map.data(), nullptr,
                                                           y.data()}) == Status::invalid_argument);
  CHECK(ref::unpermute_backward(md::UnpermuteBackwardParams<double, double>{
            {good, xp.data(), row_map.data(), w.data(), nullptr}, y.data(), nullptr, dw.data()}) ==
        Status::invalid_argument);
  CHECK(ref::permute_backward(md::PermuteBackwardParams<double>{good, xp.data(), bad_map.data(), y.data()}) ==
        Status::invalid_argument);
  CHECK(std::all_of(xp.begin(), xp.end(), [](double v) { return v == 5.0; }));
  CHECK(std::all_of(y.begin(), y.end(), [](double v) { return v == 5.0; }));
  CHECK(std::all_of(dw.begin(), dw.end(), [](double v) { return v == 5.0; }));
}

TEST_CASE("sizes: the permuted buffer and 64-bit row offsets") {
  const md::Dims d{int64_t(1) << 20, 7168, 256, 8, -1, 128};
  CHECK(md::permuted_rows(d) == (int64_t(1) << 23) + 256 * 127);
  CHECK(md::validate(d) == Status::ok);
  // rows * hidden passes 2^31 by far: the offsets the kernels form are int64
  CHECK(md::permuted_rows(d) * d.hidden > (int64_t(1) << 31));
  CHECK(md::validate(md::Dims{int64_t(1) << 28, 1, 8, 8}) == Status::unsupported);
  CHECK(md::validate_device_limits(md::Dims{4, 1, 1025, 2}) == Status::unsupported);
  CHECK(md::validate_device_limits(md::Dims{4, 1, 64, 33}) == Status::unsupported);
}
