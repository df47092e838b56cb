// Device tests of moxe::dispatch: the routing map bitwise against the reference (and the
// invalid-index count), permute bitwise, permute backward / unpermute / unpermute backward
// against the double reference, poisoned outputs, the scalar path (hidden not a multiple of
// the vector width, misaligned pointers), misaligned workspaces, determinism, graph capture,
// bad input, and the expert-parallel helpers.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "device_utils.cuh"
#include "dispatch_testing.hpp"
#include "moxe/dispatch/expert_parallel.cuh"
#include "moxe/dispatch/permute.cuh"
#include "moxe/dispatch/reference.hpp"
#include "test_utils.hpp"

namespace md = moxe::dispatch;
namespace ref = moxe::dispatch::reference;
using moxe::Status;
using moxe::dispatch::testing::make_map;
using moxe::dispatch::testing::Map;
using moxe::dispatch::testing::random_topk;
using moxe::test::DeviceBuffer;
using moxe::test::MisalignedWorkspace;
namespace mt = moxe::test;

namespace {

/// A device array whose start is `offset` elements past an allocation (misaligned when the
/// offset is not a multiple of 16 bytes).
template <class T>
class OffsetBuffer {
 public:
  explicit OffsetBuffer(std::size_t n, std::size_t offset = 0) : storage_(n + offset), n_(n), offset_(offset) {}
  T* get() const { return storage_.get() + offset_; }
  std::size_t size() const { return n_; }
  void upload(const std::vector<T>& host) {
    REQUIRE(host.size() == n_);
    MOXE_TEST_CUDA(cudaMemcpy(get(), host.data(), n_ * sizeof(T), cudaMemcpyHostToDevice));
  }
  std::vector<T> download() const {
    std::vector<T> host(n_);
    MOXE_TEST_CUDA(cudaMemcpy(host.data(), get(), n_ * sizeof(T), cudaMemcpyDeviceToHost));
    return host;
  }
  void poison() { MOXE_TEST_CUDA(cudaMemset(get(), 0xFF, n_ * sizeof(T))); }

 private:
  DeviceBuffer<T> storage_;
  std::size_t n_, offset_;
};

struct DeviceMap {
  DeviceBuffer<int64_t> row_map, offsets, dropped, invalid;
  DeviceBuffer<int32_t> counts, routed;
  explicit DeviceMap(const md::Dims& d)
      : row_map(d.tokens * d.top_k), offsets(d.experts + 1), dropped(1), invalid(1), counts(d.experts),
        routed(d.experts) {
    row_map.poison();
    offsets.poison();
    dropped.poison();
    invalid.poison();
    counts.poison();
    routed.poison();
  }
  md::RoutingMapParams params(const md::Dims& d, const int32_t* topk) const {
    md::RoutingMapParams p{d, topk, row_map.get(), offsets.get(), counts.get()};
    p.routed_counts = routed.get();
    p.dropped_count = dropped.get();
    p.invalid_count = invalid.get();
    return p;
  }
  Map download() const {
    Map m;
    m.row_map = row_map.download();
    m.offsets = offsets.download();
    m.counts = counts.download();
    m.routed = routed.download();
    m.dropped = dropped.download()[0];
    m.invalid = invalid.download()[0];
    return m;
  }
};

/// Runs the device routing map with a misaligned workspace of exactly the asked size.
Map device_map(const md::Dims& d, const std::vector<int32_t>& idx, cudaStream_t stream = nullptr) {
  DeviceBuffer<int32_t> topk(idx);
  DeviceMap out(d);
  const md::RoutingMapParams p = out.params(d, topk.get());
  MisalignedWorkspace ws(md::routing_map_workspace_size(p));
  REQUIRE(md::routing_map(p, ws.get(), ws.bytes(), stream) == Status::ok);
  MOXE_TEST_CUDA(cudaStreamSynchronize(stream));
  return out.download();
}

void check_same_map(const Map& got, const Map& want) {
  CHECK(got.row_map == want.row_map);
  CHECK(got.offsets == want.offsets);
  CHECK(got.counts == want.counts);
  CHECK(got.routed == want.routed);
  CHECK(got.dropped == want.dropped);
}

/// Element-wise equality where NaN equals NaN (rows left untouched stay poisoned).
bool same_or_both_nan(const std::vector<double>& a, const std::vector<double>& b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i)
    if (!(a[i] == b[i] || (std::isnan(a[i]) && std::isnan(b[i])))) return false;
  return true;
}

template <class T>
double tolerance() {
  return std::is_same_v<T, float> ? 1e-5 : 1e-2;
}

/// All four row passes on the device against the double reference for one configuration.
template <class T>
void check_row_passes(moxe::test::Rng& rng, const md::Dims& d, std::size_t misalign_elements) {
  const int64_t rows = md::permuted_rows(d), H = d.hidden, TK = d.tokens * d.top_k;
  const auto idx = random_topk(rng, d, 0.1);
  const Map m = make_map(d, idx);
  DeviceBuffer<int64_t> row_map(m.row_map), offsets(m.offsets);

  const auto x = moxe::test::round_through<T>(moxe::test::uniform_vector<double>(rng, d.tokens * H));
  const auto yp = moxe::test::round_through<T>(moxe::test::uniform_vector<double>(rng, rows * H));
  const auto dy = moxe::test::round_through<T>(moxe::test::uniform_vector<double>(rng, d.tokens * H));
  const auto w_f = moxe::test::uniform_vector<float>(rng, TK, 0.0, 1.0);
  const std::vector<double> w(w_f.begin(), w_f.end());

  const std::size_t off = misalign_elements;
  OffsetBuffer<T> x_d(d.tokens * H, off), xp_d(rows * H, off), yp_d(rows * H, off), y_d(d.tokens * H, off),
      dy_d(d.tokens * H, off), dyp_d(rows * H, off), dx_d(d.tokens * H, off);
  x_d.upload(moxe::test::convert_to<T>(x));
  yp_d.upload(moxe::test::convert_to<T>(yp));
  dy_d.upload(moxe::test::convert_to<T>(dy));
  DeviceBuffer<float> w_d(w_f), dw_d(TK);
  xp_d.poison();
  y_d.poison();
  dyp_d.poison();
  dx_d.poison();
  dw_d.poison();

  // permute: a copy, so bitwise; with expert_offsets the tail stays poisoned, without it
  // every unused row is zero
  for (bool with_offsets : {true, false}) {
    xp_d.poison();
    const int64_t* offsets_d = with_offsets ? offsets.get() : nullptr;
    md::PermuteParams<T> p{d, x_d.get(), row_map.get(), offsets_d, xp_d.get()};
    MisalignedWorkspace ws(md::permute_workspace_size(p));
    REQUIRE(md::permute(p, ws.get(), ws.bytes(), nullptr) == Status::ok);
    std::vector<double> want = moxe::test::poisoned<double>(rows * H);
    REQUIRE(ref::permute(md::PermuteParams<double>{d, x.data(), m.row_map.data(),
                                                   with_offsets ? m.offsets.data() : nullptr, want.data()}) ==
            Status::ok);
    CHECK(same_or_both_nan(moxe::test::convert_to_double(xp_d.download()), want));
  }
  // permute backward (dxp = yp)
  {
    md::PermuteBackwardParams<T> p{d, yp_d.get(), row_map.get(), dx_d.get()};
    REQUIRE(md::permute_backward(p, nullptr, 0, nullptr) == Status::ok);
    std::vector<double> want(d.tokens * H);
    REQUIRE(ref::permute_backward(md::PermuteBackwardParams<double>{d, yp.data(), m.row_map.data(), want.data()}) ==
            Status::ok);
    CHECK(moxe::test::rel_error(moxe::test::convert_to_double(dx_d.download()), want) < tolerance<T>());
  }
  // unpermute
  {
    md::UnpermuteParams<T, float> p{d, yp_d.get(), row_map.get(), w_d.get(), y_d.get()};
    REQUIRE(md::unpermute(p, nullptr, 0, nullptr) == Status::ok);
    std::vector<double> want(d.tokens * H);
    REQUIRE(ref::unpermute(md::UnpermuteParams<double, double>{d, yp.data(), m.row_map.data(), w.data(),
                                                               want.data()}) == Status::ok);
    CHECK(moxe::test::rel_error(moxe::test::convert_to_double(y_d.download()), want) < tolerance<T>());
  }
  // unpermute backward, twice: deterministic
  {
    md::UnpermuteBackwardParams<T, float> p{{d, yp_d.get(), row_map.get(), w_d.get(), nullptr},
                                            dy_d.get(), dyp_d.get(), dw_d.get()};
    MisalignedWorkspace ws(md::unpermute_backward_workspace_size(p), 3);
    REQUIRE(md::unpermute_backward(p, ws.get(), ws.bytes(), nullptr) == Status::ok);
    const auto dyp1 = dyp_d.download();
    const auto dw1 = dw_d.download();
    std::vector<double> want_dyp(rows * H), want_dw(TK);
    REQUIRE(ref::unpermute_backward(md::UnpermuteBackwardParams<double, double>{
                {d, yp.data(), m.row_map.data(), w.data(), nullptr}, dy.data(), want_dyp.data(),
                want_dw.data()}) == Status::ok);
    CHECK(moxe::test::rel_error(moxe::test::convert_to_double(dyp1), want_dyp) < tolerance<T>());
    CHECK(moxe::test::rel_error(dw1, want_dw) < 1e-4);
    for (int64_t i = 0; i < TK; ++i)
      if (m.row_map[i] < 0) CHECK(dw1[i] == 0.f);
    dyp_d.poison();
    dw_d.poison();
    REQUIRE(md::unpermute_backward(p, ws.get(), ws.bytes(), nullptr) == Status::ok);
    const auto dyp2 = dyp_d.download();
    const auto dw2 = dw_d.download();
    CHECK(std::memcmp(dyp1.data(), dyp2.data(), dyp1.size() * sizeof(T)) == 0);
    CHECK(std::memcmp(dw1.data(), dw2.data(), dw1.size() * sizeof(float)) == 0);
    // with expert_offsets: the same rows below offsets[E], the tail untouched
    dyp_d.poison();
    p.expert_offsets = offsets.get();
    REQUIRE(md::unpermute_backward(p, ws.get(), ws.bytes(), nullptr) == Status::ok);
    const auto dyp3 = moxe::test::convert_to_double(dyp_d.download());
    const auto dyp1_d = moxe::test::convert_to_double(dyp1);
    const int64_t used = m.offsets[d.experts] * H;
    for (int64_t i = 0; i < rows * H; ++i) {
      if (i < used) CHECK(dyp3[i] == dyp1_d[i]);
      else CHECK(std::isnan(dyp3[i]));
    }
  }
}

}  // namespace

TEST_CASE("routing map: device equals the reference bitwise") {
  const auto seed = moxe::test::fresh_seed();
  INFO("seed " << seed);
  moxe::test::Rng rng(seed);
  struct Case { int64_t tokens; int experts, top_k; int64_t capacity; int align; double unrouted; int hot; };
  // Small mode keeps every configuration at the fewest tiles (MapTiling::kTileItems = 4096
  // entries) that reach its path: T = 1, a single partial tile, two tiles with a partial
  // last one (unrouted slots, align 16 and 128, binding capacities, E = 1024 with K = 32,
  // hot experts), capacity 0, and 17 tiles for the scan's second batch of 16 tiles.
  const auto cases = mt::sizes<Case>(
      {
          {1, 4, 2, -1, 1, 0.0, 0},          {3, 2, 1, -1, 1, 0.0, 0},          {511, 8, 8, -1, 1, 0.0, 0},
          {3001, 64, 8, -1, 16, 0.1, 0},     {4097, 128, 4, 100, 8, 0.0, 0},    {2000, 1024, 32, 50, 1, 0.02, 0},
          {9000, 16, 2, 1500, 4, 0.0, 3},    {12345, 256, 8, -1, 128, 0.0, 0},  {700, 5, 1, -1, 1, 0.0, 1},
          {65536, 256, 8, -1, 1, 0.0, 0},    {333, 32, 6, 0, 4, 0.0, 0},
      },
      {
          {1, 4, 2, -1, 1, 0.0, 0},          {3, 2, 1, -1, 1, 0.0, 0},          {511, 8, 8, -1, 1, 0.0, 0},
          {601, 64, 8, -1, 16, 0.1, 0},      {1100, 128, 4, 25, 8, 0.0, 0},     {130, 1024, 32, 3, 1, 0.02, 0},
          {2100, 16, 2, 300, 4, 0.0, 3},     {700, 256, 8, -1, 128, 0.0, 0},    {700, 5, 1, -1, 1, 0.0, 1},
          {8193, 256, 8, -1, 1, 0.0, 0},     {333, 32, 6, 0, 4, 0.0, 0},
      });
  for (const Case& c : cases) {
    const md::Dims d{c.tokens, 1, c.experts, c.top_k, c.capacity, c.align};
    INFO("T=" << c.tokens << " E=" << c.experts << " K=" << c.top_k << " cap=" << c.capacity << " align=" << c.align);
    const auto idx = random_topk(rng, d, c.unrouted, c.hot);
    const Map got = device_map(d, idx);
    check_same_map(got, make_map(d, idx));
    CHECK(got.invalid == 0);
    // deterministic: a second run gives the same bits
    const Map again = device_map(d, idx);
    CHECK(again.row_map == got.row_map);
  }
}

TEST_CASE("routing map: invalid indices are treated as -1 and counted, never written out of bounds") {
  moxe::test::Rng rng(moxe::test::fresh_seed());
  // small: two tiles, the capacity still binding (about 150 entries per expert)
  const md::Dims d = mt::size(md::Dims{5000, 1, 40, 4, 300, 2}, md::Dims{1500, 1, 40, 4, 100, 2});
  auto idx = random_topk(rng, d);
  auto clean = idx;
  int64_t bad = 0;
  for (std::size_t i = 0; i < idx.size(); i += 97, ++bad) {
    idx[i] = (i % 2) ? 40 + int32_t(i % 5) : -2 - int32_t(i % 3);
    clean[i] = -1;
  }
  idx[1] = INT32_MIN;
  idx[2] = INT32_MAX;
  clean[1] = clean[2] = -1;
  bad += 2;
  const Map got = device_map(d, idx);
  check_same_map(got, make_map(d, clean));
  CHECK(got.invalid == bad);
}

TEST_CASE("routing map: bad input and a small workspace launch nothing and write nothing") {
  const md::Dims d{100, 1, 8, 2};
  std::vector<int32_t> idx(200, 1);
  DeviceBuffer<int32_t> topk(idx);
  DeviceMap out(d);
  md::RoutingMapParams p = out.params(d, topk.get());
  const std::size_t need = md::routing_map_workspace_size(p);
  REQUIRE(need > 0);
  MisalignedWorkspace ws(need);
  CHECK(md::routing_map(p, ws.get(), need - 1, nullptr) == Status::workspace_too_small);
  CHECK(md::routing_map(p, nullptr, 0, nullptr) == Status::workspace_too_small);
  md::RoutingMapParams bad = p;
  bad.dims.top_k = 9;
  CHECK(md::routing_map(bad, ws.get(), need, nullptr) == Status::invalid_argument);
  bad = p;
  bad.expert_offsets = nullptr;
  CHECK(md::routing_map(bad, ws.get(), need, nullptr) == Status::invalid_argument);
  bad = p;
  bad.dims.experts = 2048;
  CHECK(md::routing_map(bad, ws.get(), need, nullptr) == Status::unsupported);
  MOXE_TEST_CUDA(cudaDeviceSynchronize());
  for (int64_t v : out.row_map.download()) CHECK(v == -1);  // still the 0xFF poison
  for (int64_t v : out.offsets.download()) CHECK(v == -1);

  // the row passes
  const int64_t rows = md::permuted_rows(d);
  DeviceBuffer<int64_t> row_map(std::vector<int64_t>(200, 0));
  DeviceBuffer<float> x(100), xp(rows);
  xp.poison();
  md::PermuteParams<float> pp{d, x.get(), row_map.get(), nullptr, xp.get()};
  const std::size_t pneed = md::permute_workspace_size(pp);
  MisalignedWorkspace pws(pneed);
  CHECK(md::permute(pp, pws.get(), pneed - 1, nullptr) == Status::workspace_too_small);
  pp.x = nullptr;
  CHECK(md::permute(pp, pws.get(), pneed, nullptr) == Status::invalid_argument);
  MOXE_TEST_CUDA(cudaDeviceSynchronize());
  for (float v : xp.download()) CHECK(std::isnan(v));
}

TEST_CASE_TEMPLATE("permute, unpermute and their backward passes against the reference", T, float, __half,
                   __nv_bfloat16) {
  const auto seed = moxe::test::fresh_seed();
  INFO("seed " << seed);
  moxe::test::Rng rng(seed);
  struct Case { int64_t tokens; int hidden, experts, top_k; int64_t capacity; int align; std::size_t misalign; };
  // Small mode keeps every configuration with fewer tokens and narrower rows: T = 1, the
  // scalar path (H = 7, 33, misaligned pointers), ragged vector rows (H = 1000), padding
  // (align 4, 8, 16), binding capacities, K = E, E = 1024 with K = 32, and one row wide
  // enough (H = 4104: 513 or 1026 vectors) for a second pass of every kernel's loop over
  // the row, in every dtype.
  const auto cases = mt::sizes<Case>(
      {
          {1, 64, 4, 2, -1, 1, 0},       {37, 256, 8, 2, -1, 8, 0},     {100, 7, 16, 4, 10, 4, 0},
          {64, 33, 8, 8, -1, 1, 0},      {50, 1000, 12, 3, -1, 16, 0},  {50, 256, 12, 3, -1, 16, 1},
          {129, 520, 32, 6, 20, 1, 3},   {16, 128, 1024, 32, -1, 2, 0}, {300, 4096, 8, 2, -1, 1, 0},
      },
      {
          {1, 64, 4, 2, -1, 1, 0},       {9, 136, 8, 2, -1, 8, 0},      {30, 7, 16, 4, 3, 4, 0},
          {16, 33, 8, 8, -1, 1, 0},      {13, 1000, 12, 3, -1, 16, 0},  {13, 256, 12, 3, -1, 16, 1},
          {16, 520, 32, 6, 2, 1, 3},     {16, 24, 1024, 32, -1, 2, 0},  {5, 4104, 8, 2, -1, 1, 0},
      });
  for (const Case& c : cases) {
    const md::Dims d{c.tokens, c.hidden, c.experts, c.top_k, c.capacity, c.align};
    INFO("T=" << c.tokens << " H=" << c.hidden << " E=" << c.experts << " K=" << c.top_k << " cap=" << c.capacity
              << " align=" << c.align << " misalign=" << c.misalign);
    check_row_passes<T>(rng, d, c.misalign);
  }
}

TEST_CASE("graph capture of the routing map, permute and unpermute") {
  moxe::test::Rng rng(moxe::test::fresh_seed());
  using T = __nv_bfloat16;
  // small: one tile of the map, still the row mask (align 8) and the vector path
  const md::Dims d = mt::size(md::Dims{777, 512, 64, 4, -1, 8}, md::Dims{100, 72, 64, 4, -1, 8});
  const int64_t rows = md::permuted_rows(d), H = d.hidden, TK = d.tokens * d.top_k;
  const auto idx = random_topk(rng, d, 0.05);
  const auto x = moxe::test::round_through<T>(moxe::test::uniform_vector<double>(rng, d.tokens * H));
  const auto w_f = moxe::test::uniform_vector<float>(rng, TK, 0.0, 1.0);

  DeviceBuffer<int32_t> topk(idx);
  DeviceMap map(d);
  DeviceBuffer<T> x_d(moxe::test::convert_to<T>(x)), xp_d(rows * H), y_d(d.tokens * H);
  DeviceBuffer<float> w_d(w_f);
  xp_d.poison();
  y_d.poison();
  const md::RoutingMapParams mp = map.params(d, topk.get());
  const md::PermuteParams<T> pp{d, x_d.get(), map.row_map.get(), map.offsets.get(), xp_d.get()};
  const md::UnpermuteParams<T, float> up{d, xp_d.get(), map.row_map.get(), w_d.get(), y_d.get()};
  const std::size_t bytes = std::max(md::routing_map_workspace_size(mp), md::permute_workspace_size(pp));
  DeviceBuffer<unsigned char> ws(bytes);

  cudaStream_t stream;
  MOXE_TEST_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cudaGraph_t graph;
  MOXE_TEST_CUDA(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  const Status s1 = md::routing_map(mp, ws.get(), bytes, stream);
  const Status s2 = md::permute(pp, ws.get(), bytes, stream);
  const Status s3 = md::unpermute(up, nullptr, 0, stream);
  MOXE_TEST_CUDA(cudaStreamEndCapture(stream, &graph));
  REQUIRE(s1 == Status::ok);
  REQUIRE(s2 == Status::ok);
  REQUIRE(s3 == Status::ok);
  cudaGraphExec_t exec;
  MOXE_TEST_CUDA(cudaGraphInstantiate(&exec, graph, 0));
  // the uploads and poisons ran on the legacy stream, which a non-blocking stream does not
  // wait for (cudaMemset returns before it is done)
  MOXE_TEST_CUDA(cudaDeviceSynchronize());
  MOXE_TEST_CUDA(cudaGraphLaunch(exec, stream));
  MOXE_TEST_CUDA(cudaStreamSynchronize(stream));

  const Map m = make_map(d, idx);
  check_same_map(map.download(), m);
  std::vector<double> want_xp = moxe::test::poisoned<double>(rows * H), want_y(d.tokens * H);
  const std::vector<double> w(w_f.begin(), w_f.end());
  REQUIRE(ref::permute(md::PermuteParams<double>{d, x.data(), m.row_map.data(), m.offsets.data(), want_xp.data()}) ==
          Status::ok);
  REQUIRE(ref::unpermute(md::UnpermuteParams<double, double>{d, want_xp.data(), m.row_map.data(), w.data(),
                                                             want_y.data()}) == Status::ok);
  CHECK(same_or_both_nan(moxe::test::convert_to_double(xp_d.download()), want_xp));
  CHECK(moxe::test::rel_error(moxe::test::convert_to_double(y_d.download()), want_y) < 1e-2);

  // replaying the graph gives the same bits
  const auto y1 = y_d.download();
  y_d.poison();
  MOXE_TEST_CUDA(cudaDeviceSynchronize());  // the poison must land before the replay writes y
  MOXE_TEST_CUDA(cudaGraphLaunch(exec, stream));
  MOXE_TEST_CUDA(cudaStreamSynchronize(stream));
  const auto y2 = y_d.download();
  CHECK(std::memcmp(y1.data(), y2.data(), y1.size() * sizeof(T)) == 0);
  MOXE_TEST_CUDA(cudaGraphExecDestroy(exec));
  MOXE_TEST_CUDA(cudaGraphDestroy(graph));
  MOXE_TEST_CUDA(cudaStreamDestroy(stream));
}

TEST_CASE_TEMPLATE("expert parallelism: send counts and the chunk reorder against the reference", T, float,
                   __nv_bfloat16, __half) {
  moxe::test::Rng rng(moxe::test::fresh_seed());
  // send counts from a routing map's offsets
  {
    const md::Dims d{1000, 1, 32, 4, -1, 8};
    const Map m = make_map(d, random_topk(rng, d));
    const int ranks = 4;
    DeviceBuffer<int64_t> offsets(m.offsets), counts(ranks), starts(ranks + 1), rows(d.experts);
    counts.poison();
    starts.poison();
    rows.poison();
    md::SendCountsParams p{d.experts, ranks, offsets.get(), counts.get(), starts.get(), rows.get()};
    REQUIRE(md::send_counts(p, nullptr, md::send_counts_workspace_size(p), nullptr) == Status::ok);
    std::vector<int64_t> want_counts(ranks), want_starts(ranks + 1), want_rows(d.experts);
    REQUIRE(ref::send_counts(md::SendCountsParams{d.experts, ranks, m.offsets.data(), want_counts.data(),
                                                  want_starts.data(), want_rows.data()}) == Status::ok);
    CHECK(counts.download() == want_counts);
    CHECK(starts.download() == want_starts);
    CHECK(rows.download() == want_rows);
  }
  // the reorder and its inverse, with a hidden size that takes the scalar path too
  for (int H : {64, 9}) {
    const int R = 4, L = 6;
    std::vector<int64_t> split(R * L);
    for (auto& s : split) s = rng.integer(0, mt::size(40, 5));  // small: ~60 rows, empty chunks likely
    split[5] = 0;  // an empty chunk; the total is summed after, so it counts only real rows
    int64_t total = 0;
    for (int64_t s : split) total += s;
    const int64_t max_rows = total + 11;
    const auto in = moxe::test::round_through<T>(moxe::test::uniform_vector<double>(rng, max_rows * H));
    DeviceBuffer<int64_t> split_d(split), eoff(L + 1);
    DeviceBuffer<T> in_d(moxe::test::convert_to<T>(in)), out_d(max_rows * H), back_d(max_rows * H);
    out_d.poison();
    back_d.poison();
    md::SortChunksParams<T> p{max_rows, H, R, L, split_d.get(), in_d.get(), out_d.get(), eoff.get()};
    MisalignedWorkspace ws(md::sort_chunks_workspace_size(p));
    REQUIRE(md::sort_chunks(p, ws.get(), ws.bytes(), nullptr) == Status::ok);
    md::SortChunksParams<T> q{max_rows, H, R, L, split_d.get(), out_d.get(), back_d.get()};
    REQUIRE(md::sort_chunks_backward(q, ws.get(), ws.bytes(), nullptr) == Status::ok);

    std::vector<double> want(max_rows * H, 0.0);
    std::vector<int64_t> want_eoff(L + 1);
    REQUIRE(ref::sort_chunks(md::SortChunksParams<double>{max_rows, H, R, L, split.data(), in.data(), want.data(),
                                                          want_eoff.data()}) == Status::ok);
    const auto out = moxe::test::convert_to_double(out_d.download());
    const auto back = moxe::test::convert_to_double(back_d.download());
    for (int64_t i = 0; i < total * H; ++i) {
      CHECK(out[i] == want[i]);
      CHECK(back[i] == in[i]);
    }
    for (int64_t i = total * H; i < max_rows * H; ++i) CHECK(std::isnan(out[i]));  // untouched
    CHECK(eoff.download() == want_eoff);
  }
}

TEST_CASE("64-bit row offsets: rows * hidden past 2^31 elements" *
          doctest::skip(mt::skip_on_simulator("dispatch 64-bit row offsets: needs ~7 GB of device memory and "
                                              "2^31 elements copied each way, far past what a simulator run affords"))) {
  using T = __nv_bfloat16;
  const md::Dims d{16384, 33024, 16, 4};  // permuted rows * hidden = 65536 * 33024 > 2^31
  const int64_t rows = md::permuted_rows(d), H = d.hidden, TK = d.tokens * d.top_k;
  REQUIRE(rows * H > (int64_t(1) << 31));
  const std::size_t need = std::size_t(rows + 2 * d.tokens) * H * sizeof(T) + (std::size_t(1) << 28);
  std::size_t free_bytes = 0, total_bytes = 0;
  MOXE_TEST_CUDA(cudaMemGetInfo(&free_bytes, &total_bytes));
  if (free_bytes < need) {
    MESSAGE("skipped: needs " << need / (1 << 20) << " MiB of device memory");
    return;
  }
  moxe::test::Rng rng(moxe::test::fresh_seed());
  const auto idx = random_topk(rng, d);
  const Map m = make_map(d, idx);
  DeviceBuffer<int64_t> row_map(m.row_map), offsets(m.offsets);
  // x[t, j] depends on t and j so that a wrong row or column shows
  std::vector<T> x(d.tokens * H);
  for (int64_t t = 0; t < d.tokens; ++t)
    for (int64_t j = 0; j < H; ++j) x[t * H + j] = moxe::from_float<T>(float((t * 7 + j) % 251) - 125.f);
  DeviceBuffer<T> x_d(x), xp_d(rows * H), y_d(d.tokens * H);
  DeviceBuffer<float> w_d(std::vector<float>(TK, 1.f / d.top_k));  // sums to one: y = x exactly
  md::PermuteParams<T> pp{d, x_d.get(), row_map.get(), offsets.get(), xp_d.get()};
  DeviceBuffer<unsigned char> ws(md::permute_workspace_size(pp));
  REQUIRE(md::permute(pp, ws.get(), ws.bytes(), nullptr) == Status::ok);
  REQUIRE(md::unpermute(md::UnpermuteParams<T, float>{d, xp_d.get(), row_map.get(), w_d.get(), y_d.get()}, nullptr, 0,
                        nullptr) == Status::ok);
  MOXE_TEST_CUDA(cudaDeviceSynchronize());
  auto download_row = [&](const DeviceBuffer<T>& buf, int64_t row) {
    std::vector<T> host(H);
    MOXE_TEST_CUDA(cudaMemcpy(host.data(), buf.get() + row * H, H * sizeof(T), cudaMemcpyDeviceToHost));
    return host;
  };
  auto same = [&](const std::vector<T>& a, const T* b) { return std::memcmp(a.data(), b, H * sizeof(T)) == 0; };
  // rows from rows - 256 on start past 2^31 elements
  int checked = 0;
  for (int64_t i = 0; i < TK; ++i) {
    const int64_t t = i / d.top_k, r = m.row_map[i];
    REQUIRE(r >= 0);
    if (r < rows - 256 || (r % 3 != 0 && t != d.tokens - 1)) continue;
    REQUIRE(r * H > (int64_t(1) << 31));
    CHECK(same(download_row(xp_d, r), x.data() + t * H));
    CHECK(same(download_row(y_d, t), x.data() + t * H));
    ++checked;
  }
  CHECK(checked > 50);
}
