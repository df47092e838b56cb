// Host coverage of the lane-group device code (moxe/router/detail/lane_group.cuh): the very
// functions the kernels run (LaneGroup's reductions, rank_below and count, padding_bits,
// float_key/key_float, the argmax rounds and the threshold top-k with its ballots and rank
// sort), built by the host compiler over an emulated warp (emulated_warp.hpp) and checked
// against moxe::router::reference's top-k for every row shape dispatch_row_shape and the
// fused gate's dispatch_gate_row_shape pick.
#include <doctest/doctest.h>

#include <array>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "emulated_warp.hpp"
#include "moxe/router/detail/lane_group.cuh"
#include "moxe/router/reference.hpp"
#include "test_utils.hpp"

namespace {

namespace rd = moxe::router::detail;
using moxe::test::EmulatedWarp;
using moxe::test::Rng;

template <int kLanes>
using Group = rd::LaneGroup<kLanes, EmulatedWarp>;

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kDenorm = std::numeric_limits<float>::denorm_min();

uint32_t bits_of(float x) {
  uint32_t b;
  std::memcpy(&b, &x, sizeof b);
  return b;
}

float float_of(uint32_t b) {
  float x;
  std::memcpy(&x, &b, sizeof x);
  return x;
}

template <class T>
T pick(Rng& rng, const std::vector<T>& from) {
  return from[static_cast<std::size_t>(rng.integer(0, static_cast<int64_t>(from.size()) - 1))];
}

// ---- float_key ------------------------------------------------------------------------

TEST_CASE("lane_group: float_key orders floats as the top-k ranks them") {
  const uint64_t seed = moxe::test::fresh_seed();
  MESSAGE("seed " << seed);
  Rng rng(seed);
  std::vector<float> xs = {kNaN, -kNaN,   -kInf,   -FLT_MAX, -1.f, -FLT_MIN, -kDenorm, -0.f,
                           0.f,  kDenorm, FLT_MIN, 0.5f,     1.f,  FLT_MAX,  kInf};
  for (int i = 0; i < 400; ++i) xs.push_back(float_of(static_cast<uint32_t>(rng.engine()())));  // any bits
  int bad_order = 0, bad_back = 0;
  std::string example;
  for (float a : xs) {
    const uint32_t ka = rd::float_key(a);
    const float ra = rd::rank_value(a);
    // back to the value it ranks as, -0 as +0; never the key 0 (a taken element)
    const float want = ra == 0.f ? 0.f : ra;
    if (ka == 0u || bits_of(rd::key_float(ka)) != bits_of(want)) {
      ++bad_back;
      if (example.empty()) example = "key_float(float_key(" + std::to_string(a) + "))";
    }
    for (float b : xs) {
      const uint32_t kb = rd::float_key(b);
      const float rb = rd::rank_value(b);
      if ((ka < kb) != (ra < rb) || (ka == kb) != (ra == rb)) {
        ++bad_order;
        if (example.empty()) example = "order of " + std::to_string(a) + " and " + std::to_string(b);
      }
    }
  }
  CHECK_MESSAGE(bad_back == 0, example);
  CHECK_MESSAGE(bad_order == 0, example);
}

// ---- the group reductions, rank_below and count -----------------------------------------

template <int kLanes>
void check_group_primitives(Rng& rng, EmulatedWarp& warp) {
  constexpr int kW = EmulatedWarp::kLanes;
  struct In {
    int i;
    float f;
    int n_ms;  // 0..3 values in the lane's MaxSum / SplitMaxSum (0: the empty state)
    float ms[3];
    bool in_m[3];
    bool pred;
  };
  struct Out {
    int lane, group, element2;
    unsigned group_bits;
    int isum, imax;
    float fsum;
    moxe::math::MaxSum<float> ms;
    rd::SplitMaxSum<float> split;
    int rank_below, count;
  };
  std::array<In, kW> in{};
  std::array<Out, kW> out{};
  for (In& x : in) {
    x.i = static_cast<int>(rng.integer(-1000, 1000));
    x.f = static_cast<float>(rng.normal(0.0, 10.0));
    x.n_ms = static_cast<int>(rng.integer(0, 3));
    for (int j = 0; j < 3; ++j) {
      x.ms[j] = rng.integer(0, 7) == 0 ? -kInf : static_cast<float>(rng.normal(0.0, 4.0));
      x.in_m[j] = rng.integer(0, 1) == 1;
    }
    x.pred = rng.integer(0, 2) == 0;
  }
  warp.run([&] {
    const Group<kLanes> g;
    const In& x = in[EmulatedWarp::thread_in_block()];
    Out& o = out[EmulatedWarp::thread_in_block()];
    o.lane = g.lane;
    o.group = g.group;
    o.element2 = g.element(2);
    o.group_bits = g.group_bits;
    o.isum = g.sum(x.i);
    o.imax = g.allreduce(x.i, moxe::MaxOp{});
    o.fsum = g.sum(x.f);
    moxe::math::MaxSum<float> ms;
    rd::SplitMaxSum<float> split;
    for (int j = 0; j < x.n_ms; ++j) {
      ms.add(x.ms[j]);
      split.add(x.ms[j], x.in_m[j]);
    }
    o.ms = g.merge(ms);
    o.split = g.merge(split);
    const unsigned ballot = EmulatedWarp::ballot(x.pred);
    o.rank_below = g.rank_below(ballot);
    o.count = g.count(ballot);
  });
  // log of a sum of exp over the group's values (of one kind), in double; -inf when empty
  const auto group_lse = [&](int group, int kind) {  // kind 0: all, 1: mLSTM, 2: sLSTM
    double m = -HUGE_VAL, s = 0.0;
    for (int pass = 0; pass < 2; ++pass)
      for (int w = group * kLanes; w < (group + 1) * kLanes; ++w)
        for (int j = 0; j < in[w].n_ms; ++j) {
          if (kind == 1 && !in[w].in_m[j]) continue;
          if (kind == 2 && in[w].in_m[j]) continue;
          if (pass == 0) m = std::max(m, static_cast<double>(in[w].ms[j]));
          else if (m > -HUGE_VAL) s += std::exp(in[w].ms[j] - m);
        }
    return s > 0.0 ? m + std::log(s) : -HUGE_VAL;
  };
  const auto near = [](double got, double want) {
    return got == want || std::abs(got - want) <= 1e-5 * (1.0 + std::abs(want));
  };
  for (int w = 0; w < kW; ++w) {
    INFO("kLanes " << kLanes << ", warp lane " << w);
    const int group = w / kLanes, lane = w % kLanes, first = group * kLanes;
    CHECK(out[w].lane == lane);
    CHECK(out[w].group == group);
    CHECK(out[w].element2 == 2 * kLanes + lane);
    CHECK(out[w].group_bits == static_cast<unsigned>((uint64_t{1} << kLanes) - 1u) << first);
    int isum = 0, imax = std::numeric_limits<int>::min(), below = 0, count = 0;
    double fsum = 0.0, fabs_sum = 0.0;
    for (int o = first; o < first + kLanes; ++o) {
      isum += in[o].i;
      imax = std::max(imax, in[o].i);
      fsum += in[o].f;
      fabs_sum += std::abs(in[o].f);
      count += in[o].pred;
      below += o < w && in[o].pred;
    }
    CHECK(out[w].isum == isum);
    CHECK(out[w].imax == imax);
    CHECK(out[w].rank_below == below);
    CHECK(out[w].count == count);
    CHECK(std::abs(out[w].fsum - fsum) <= 1e-6 * fabs_sum);
    CHECK(near(out[w].ms.log_sum_exp(), group_lse(group, 0)));
    const auto& sp = out[w].split;
    CHECK(near(sp.sum_m > 0.f ? sp.max + std::log(double(sp.sum_m)) : -HUGE_VAL, group_lse(group, 1)));
    CHECK(near(sp.sum_s > 0.f ? sp.max + std::log(double(sp.sum_s)) : -HUGE_VAL, group_lse(group, 2)));
    // the butterfly gives every lane of the group the same bits
    CHECK(bits_of(out[w].fsum) == bits_of(out[first].fsum));
    CHECK(bits_of(out[w].ms.max) == bits_of(out[first].ms.max));
    CHECK(bits_of(out[w].ms.sum) == bits_of(out[first].ms.sum));
    CHECK(bits_of(sp.sum_m) == bits_of(out[first].split.sum_m));
    CHECK(bits_of(sp.sum_s) == bits_of(out[first].split.sum_s));
  }
}

TEST_CASE("lane_group: lanes, elements, sum, allreduce, merges, rank_below and count") {
  const uint64_t seed = moxe::test::fresh_seed();
  MESSAGE("seed " << seed);
  Rng rng(seed);
  EmulatedWarp warp(seed);
  for (int rep = 0; rep < 4; ++rep) {
    check_group_primitives<1>(rng, warp);
    check_group_primitives<2>(rng, warp);
    check_group_primitives<4>(rng, warp);
    check_group_primitives<8>(rng, warp);
    check_group_primitives<16>(rng, warp);
    check_group_primitives<32>(rng, warp);
  }
}

// ---- group_topk against the reference -------------------------------------------------

enum class Values { distinct, probabilities, few_values, all_equal, specials, all_nan, kCount };
enum class Taken { padding_only, random, most, all, kCount };

const char* name(Values v) {
  static const char* names[] = {"distinct", "probabilities", "few_values", "all_equal", "specials", "all_nan"};
  return names[static_cast<int>(v)];
}
const char* name(Taken t) {
  static const char* names[] = {"padding_only", "random", "most", "all"};
  return names[static_cast<int>(t)];
}

/// One token's row: values[0, E) the token's, [E, kMaxE) padding (garbage: never chosen),
/// taken[e] (e < E) excluded besides the padding.
struct Row {
  Values values;
  Taken taken_kind;
  std::vector<float> v;
  std::vector<char> taken;
};

Row make_row(Rng& rng, int experts, int max_e, Values values, Taken taken_kind) {
  Row r{values, taken_kind, std::vector<float>(max_e), std::vector<char>(experts, 0)};
  const std::vector<float> specials = {kNaN, -kInf,    kInf,     -0.f,    0.f,     -1.f,
                                       1.f,  0.5f,     FLT_MAX,  -FLT_MAX, kDenorm, -kDenorm};
  const float same = pick<float>(rng, {0.25f, -0.f, 0.f, -kInf, kInf});
  for (int e = 0; e < experts; ++e) {
    switch (values) {
      case Values::distinct: r.v[e] = static_cast<float>(rng.normal(0.0, 3.0)); break;
      case Values::probabilities: r.v[e] = static_cast<float>(rng.uniform(0.0, 1.0 / experts)); break;
      case Values::few_values: r.v[e] = pick<float>(rng, {-1.f, 0.f, 0.25f, 1.f}); break;
      case Values::all_equal: r.v[e] = same; break;
      case Values::specials: r.v[e] = pick(rng, specials); break;
      default: r.v[e] = kNaN; break;
    }
  }
  for (int e = experts; e < max_e; ++e) r.v[e] = pick<float>(rng, {kInf, FLT_MAX, kNaN, 0.f});
  switch (taken_kind) {
    case Taken::random:
      for (auto& t : r.taken) t = rng.integer(0, 2) == 0;
      break;
    case Taken::most: {  // a few left (often fewer than k)
      std::fill(r.taken.begin(), r.taken.end(), 1);
      const int left = static_cast<int>(rng.integer(0, std::min(experts, 40)));
      for (int i = 0; i < left; ++i) r.taken[static_cast<std::size_t>(rng.integer(0, experts - 1))] = 0;
      break;
    }
    case Taken::all: std::fill(r.taken.begin(), r.taken.end(), 1); break;
    default: break;
  }
  return r;
}

struct TopKStats {
  long rows[2][2] = {};  // [threshold path][fewer candidates than k]
  long calls = 0, steps = 0;
  int failures = 0;
};

constexpr uint32_t kPoisonIndex = 0x5eed5eed;
const float kPoisonValue = float_of(0x7fc0beefu);  // a NaN

/// All k from 1 to kMaxTopK (also k > E and k > the untaken count: slots past it get
/// (-inf, -1)) on rows of E experts in the shape (kLanes, kPerLane); `calls` warp runs per k,
/// each with kGroups rows cycling through every kind of values and of taken mask.
template <int kLanes, int kPerLane>
void check_topk(int experts, int calls, Rng& rng, EmulatedWarp& warp, TopKStats& stats) {
  constexpr int kGroups = Group<kLanes>::kGroups, kMaxE = kLanes * kPerLane, kW = EmulatedWarp::kLanes;
  constexpr int kSlots = moxe::router::kMaxTopK;
  constexpr int kValueKinds = static_cast<int>(Values::kCount), kTakenKinds = static_cast<int>(Taken::kCount);
  for (int k = 1; k <= kSlots; ++k) {
    const bool threshold = kMaxE > rd::kRoundsTopKMax && k > rd::kRoundsTopKMax;
    for (int call = 0; call < calls; ++call) {
      std::array<Row, kGroups> rows;
      for (int g = 0; g < kGroups; ++g) {
        const int c = ((k - 1) * calls + call) * kGroups + g;
        rows[g] = make_row(rng, experts, kMaxE, static_cast<Values>(c % kValueKinds),
                           static_cast<Taken>((c / kValueKinds) % kTakenKinds));
      }
      float value[kGroups][kSlots];
      int index[kGroups][kSlots];
      for (int g = 0; g < kGroups; ++g)
        for (int r = 0; r < kSlots; ++r) {
          value[g][r] = kPoisonValue;
          index[g][r] = static_cast<int>(kPoisonIndex);
        }
      std::array<uint32_t, kW> padding{};
      stats.steps += warp.run([&] {
        const Group<kLanes> g;
        const Row& row = rows[g.group];
        float v[kPerLane];
        const uint32_t pad = rd::padding_bits<kLanes, kPerLane>(g, experts);
        padding[EmulatedWarp::thread_in_block()] = pad;
        uint32_t taken = pad;
        for (int j = 0; j < kPerLane; ++j) {
          const int e = g.element(j);
          v[j] = row.v[e];
          if (e < experts && row.taken[e]) taken |= 1u << j;
        }
        rd::group_topk<kLanes, kPerLane>(g, v, taken, k, rd::TopKSlots{value[g.group], index[g.group]});
      });
      ++stats.calls;
      for (int w = 0; w < kW; ++w)
        for (int j = 0; j < kPerLane; ++j) {
          const bool want = j * kLanes + w % kLanes >= experts;
          if (((padding[w] >> j) & 1u) != static_cast<uint32_t>(want)) {
            CHECK_MESSAGE(false, "padding_bits: E " << experts << ", lane " << w << ", j " << j);
            ++stats.failures;
          }
        }
      for (int g = 0; g < kGroups; ++g) {
        const Row& row = rows[g];
        std::vector<char> allowed(experts);
        int candidates = 0;
        for (int e = 0; e < experts; ++e) {
          allowed[e] = !row.taken[e];
          candidates += allowed[e];
        }
        std::vector<int32_t> want_index(k);
        moxe::router::reference::detail::select_topk(row.v.data(), experts, k, allowed, want_index.data());
        ++stats.rows[threshold][candidates < k];
        std::ostringstream bad;
        for (int r = 0; r < kSlots && bad.str().empty(); ++r) {
          if (r >= k) {  // nothing written past k
            if (bits_of(value[g][r]) != bits_of(kPoisonValue) || index[g][r] != static_cast<int>(kPoisonIndex))
              bad << "slot " << r << " >= k written: (" << value[g][r] << ", " << index[g][r] << ")";
            continue;
          }
          const int e = want_index[r];
          float want = e >= 0 ? rd::rank_value(row.v[e]) : -kInf;
          if (threshold && want == 0.f) want = 0.f;  // the threshold path's values come back from keys: -0 as +0
          if (index[g][r] != e || bits_of(value[g][r]) != bits_of(want))
            bad << "slot " << r << ": (" << value[g][r] << ", " << index[g][r] << "), reference (" << want << ", "
                << e << ")";
        }
        if (!bad.str().empty() && stats.failures < 8) {
          std::ostringstream what;
          what << "shape (" << kLanes << ", " << kPerLane << "), E " << experts << ", k " << k << " ("
               << (threshold ? "threshold" : "rounds") << "), group " << g << ", " << name(row.values) << " / "
               << name(row.taken_kind) << ", " << candidates << " candidates: " << bad.str()
               << "\n  row (x: taken; the first 64): ";
          for (int e = 0; e < experts && e < 64; ++e) what << (row.taken[e] ? "x" : "") << row.v[e] << " ";
          CHECK_MESSAGE(false, what.str());
        }
        stats.failures += !bad.str().empty();
      }
    }
  }
}

TEST_CASE("lane_group: group_topk (rounds and threshold) matches the reference top-k") {
  const uint64_t seed = moxe::test::fresh_seed();
  MESSAGE("seed " << seed);
  Rng rng(seed);
  EmulatedWarp warp(seed);
  TopKStats stats;
  // every shape dispatch_row_shape picks, E = 1, E at and between the shape boundaries
  for (int experts : {1, 2, 3, 5, 8, 9, 17, 31, 32, 33, 100, 128, 129, 200, 256, 257, 400, 512, 513, 777, 1024}) {
    const moxe::Status st = rd::dispatch_row_shape(experts, [&](auto shape) {
      using Shape = decltype(shape);
      constexpr int kGroups = Group<Shape::kLanes>::kGroups;
      // the smallest of (4, 2), (8, 4), (32, 4), (32, 8), (32, 16), (32, 32) that holds E
      int want_max_e = 0;
      for (int max_e : {1024, 512, 256, 128, 32, 8})
        if (experts <= max_e) want_max_e = max_e;
      CHECK(Shape::kLanes * Shape::kPerLane == want_max_e);
      CHECK(Shape::kLanes == rd::row_lanes(experts));
      check_topk<Shape::kLanes, Shape::kPerLane>(experts, kGroups >= 4 ? 1 : 3, rng, warp, stats);
      return moxe::Status::ok;
    });
    CHECK(st == moxe::Status::ok);
  }
  MESSAGE("rows checked (k candidates or more / fewer): rounds " << stats.rows[0][0] << " / " << stats.rows[0][1]
          << ", threshold " << stats.rows[1][0] << " / " << stats.rows[1][1] << "; " << stats.calls << " warp runs, "
          << stats.steps << " warp primitives");
  CHECK(stats.failures == 0);
}

TEST_CASE("lane_group: the fused gate's ladder, (16, 4) for 33 <= E <= 64, matches the reference top-k") {
  const uint64_t seed = moxe::test::fresh_seed();
  MESSAGE("seed " << seed);
  Rng rng(seed);
  EmulatedWarp warp(seed);
  TopKStats stats;
  // the (16, 4) shape: two tokens a warp, no empty slot at E = 64; around it, the ladder
  // of dispatch_row_shape
  for (int experts : {1, 8, 9, 32, 33, 40, 63, 64, 65, 128, 129, 1024}) {
    CAPTURE(experts);
    const moxe::Status st = rd::dispatch_gate_row_shape(experts, [&](auto shape) {
      using Shape = decltype(shape);
      constexpr int kGroups = Group<Shape::kLanes>::kGroups;
      int want_max_e = 0;
      for (int max_e : {1024, 512, 256, 128, 64, 32, 8})
        if (experts <= max_e) want_max_e = max_e;
      CHECK(Shape::kLanes * Shape::kPerLane == want_max_e);
      CHECK(Shape::kLanes == rd::gate_row_lanes(experts));
      if (experts > 32 && experts <= 64) {
        CHECK(Shape::kLanes == 16);
        CHECK(Shape::kPerLane == 4);
        check_topk<Shape::kLanes, Shape::kPerLane>(experts, 3, rng, warp, stats);  // 2 tokens a warp run
      }
      return moxe::Status::ok;
    });
    CHECK(st == moxe::Status::ok);
  }
  MESSAGE("rows checked (k candidates or more / fewer): rounds " << stats.rows[0][0] << " / " << stats.rows[0][1]
          << ", threshold " << stats.rows[1][0] << " / " << stats.rows[1][1] << "; " << stats.calls << " warp runs");
  CHECK(stats.rows[0][0] > 0);
  CHECK(stats.rows[1][0] > 0);
  CHECK(stats.failures == 0);
}

}  // namespace
