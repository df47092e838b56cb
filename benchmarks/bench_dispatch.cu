// Dispatch benchmarks: permute, unpermute and both backward passes in bf16 as bytes moved per
// second (and frac_copy_bw against the device copy bandwidth; target >= 0.8), at
// (T, K, E, H) = (4096, 8, 128, 7168) and (16384, 2, 8, 4096); the routing map at
// T = 65536, K = 8, E = 256; the expert-parallel chunk reorder. Bytes count each row read and
// written once (row maps, weights and the used-row mask are left out: under 0.2% of the
// traffic at these sizes).
#include <cuda_bf16.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

#include "harness.cuh"
#include "moxe/dispatch/expert_parallel.cuh"
#include "moxe/dispatch/permute.cuh"

namespace {

namespace md = moxe::dispatch;
using moxe::bench::DeviceMemory;
using moxe::bench::EventTimer;
using Element = __nv_bfloat16;

__global__ void fill_bf16(uint32_t* p, std::size_t n, uint32_t seed) {
  for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < n;
       i += std::size_t(gridDim.x) * blockDim.x) {
    uint32_t x = static_cast<uint32_t>(i) * 2654435761u ^ seed;
    x ^= x >> 13;
    const uint32_t lo = (x & 0x807Fu) | 0x3C00u, hi = ((x >> 16) & 0x807Fu) | 0x3C00u;  // |v| in [2^-7, 1)
    p[i] = lo | (hi << 16);
  }
}

DeviceMemory random_bf16(std::size_t elements, uint32_t seed) {
  DeviceMemory m(elements * sizeof(Element));
  fill_bf16<<<1024, 256>>>(m.as<uint32_t>(), elements / 2, seed);
  MOXE_BENCH_CUDA(cudaGetLastError());
  return m;
}

/// Router-like top-k indices: K distinct experts per token, uniformly at random.
std::vector<int32_t> random_topk(int64_t tokens, int experts, int top_k, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<int32_t> all(experts), idx(tokens * top_k);
  std::iota(all.begin(), all.end(), 0);
  for (int64_t t = 0; t < tokens; ++t) {
    for (int k = 0; k < top_k; ++k) std::swap(all[k], all[k + rng() % (experts - k)]);
    std::copy(all.begin(), all.begin() + top_k, idx.begin() + t * top_k);
  }
  return idx;
}

/// A routing map built on the device (kept for the row benchmarks).
struct RoutingMap {
  DeviceMemory topk, row_map, offsets, counts;
  RoutingMap(const md::Dims& d, uint32_t seed, cudaStream_t stream)
      : topk(moxe::bench::upload(random_topk(d.tokens, d.experts, d.top_k, seed))),
        row_map(d.tokens * d.top_k * sizeof(int64_t)),
        offsets((d.experts + 1) * sizeof(int64_t)),
        counts(d.experts * sizeof(int32_t)) {}
  md::RoutingMapParams params(const md::Dims& d) const {
    return {d, topk.as<int32_t>(), row_map.as<int64_t>(), offsets.as<int64_t>(), counts.as<int32_t>()};
  }
};

enum class Op { permute, permute_backward, unpermute, unpermute_backward };

struct RowSet {
  DeviceMemory tokens_in, rows_in, tokens_out, rows_out, weight, dweight;
};

template <Op kOp>
void BM_rows(benchmark::State& state) {
  const md::Dims d{state.range(0), static_cast<int>(state.range(3)), static_cast<int>(state.range(2)),
                   static_cast<int>(state.range(1))};
  const int64_t rows = md::permuted_rows(d), H = d.hidden, TK = d.tokens * d.top_k;
  cudaStream_t stream;
  MOXE_BENCH_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));

  RoutingMap map(d, 7u, stream);
  const md::RoutingMapParams mp = map.params(d);
  DeviceMemory map_ws(md::routing_map_workspace_size(mp));
  MOXE_BENCH_CUDA(cudaDeviceSynchronize());  // the upload is done before `stream` reads it
  if (md::routing_map(mp, map_ws.as<void>(), map_ws.bytes(), stream) != moxe::Status::ok) {
    state.SkipWithError("routing_map failed");
    return;
  }
  std::vector<float> w(TK, 1.f / d.top_k);

  const std::size_t token_bytes = d.tokens * H * sizeof(Element), row_bytes = rows * H * sizeof(Element);
  moxe::bench::Rotation<RowSet> sets(2 * (token_bytes + row_bytes), [&](int i) {
    RowSet s;
    s.tokens_in = random_bf16(d.tokens * H, 11u + i);
    s.rows_in = random_bf16(rows * H, 23u + i);
    s.tokens_out = DeviceMemory(token_bytes);
    s.rows_out = DeviceMemory(row_bytes);
    s.weight = moxe::bench::upload(w);
    s.dweight = DeviceMemory(TK * sizeof(float));
    return s;
  });
  const int64_t* row_map = map.row_map.as<int64_t>();
  const md::PermuteParams<Element> probe{d};
  DeviceMemory ws(std::max(md::permute_workspace_size(probe),
                           md::unpermute_backward_workspace_size(md::UnpermuteBackwardParams<Element>{{d}})));
  // the fills ran on the legacy stream, which the non-blocking `stream` does not wait for
  MOXE_BENCH_CUDA(cudaDeviceSynchronize());

  auto launch = [&](RowSet& s) {
    switch (kOp) {
      case Op::permute:
        return md::permute(md::PermuteParams<Element>{d, s.tokens_in.as<Element>(), row_map,
                                                      map.offsets.as<int64_t>(), s.rows_out.as<Element>()},
                           ws.as<void>(), ws.bytes(), stream);
      case Op::permute_backward:
        return md::permute_backward(md::PermuteBackwardParams<Element>{d, s.rows_in.as<Element>(), row_map,
                                                                       s.tokens_out.as<Element>()},
                                    nullptr, 0, stream);
      case Op::unpermute:
        return md::unpermute(md::UnpermuteParams<Element>{d, s.rows_in.as<Element>(), row_map, s.weight.as<float>(),
                                                          s.tokens_out.as<Element>()},
                             nullptr, 0, stream);
      case Op::unpermute_backward:
        return md::unpermute_backward(
            md::UnpermuteBackwardParams<Element>{
                {d, s.rows_in.as<Element>(), row_map, s.weight.as<float>(), nullptr},
                s.tokens_in.as<Element>(), s.rows_out.as<Element>(), s.dweight.as<float>()},
            ws.as<void>(), ws.bytes(), stream);
    }
    return moxe::Status::invalid_argument;
  };
  if (launch(sets.next()) != moxe::Status::ok) {
    state.SkipWithError("launch failed");
    return;
  }
  EventTimer timer;
  for (auto _ : state) {
    RowSet& s = sets.next();
    timer.start(stream);
    launch(s);
    state.SetIterationTime(timer.stop_seconds(stream));
  }
  // every (t, k) row is used here (align 1, no capacity, no -1): rows == T*K
  // (unpermute backward reads yp and writes dyp: two row passes, and dy once)
  const double row_passes = kOp == Op::unpermute_backward ? 2.0 : 1.0;
  moxe::bench::set_counters(state, double(token_bytes) + row_passes * double(row_bytes), 0);
  MOXE_BENCH_CUDA(cudaStreamDestroy(stream));
}

void BM_routing_map(benchmark::State& state) {
  const md::Dims d{state.range(0), 1, static_cast<int>(state.range(2)), static_cast<int>(state.range(1))};
  cudaStream_t stream;
  MOXE_BENCH_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  RoutingMap map(d, 5u, stream);
  const md::RoutingMapParams mp = map.params(d);
  DeviceMemory ws(md::routing_map_workspace_size(mp));
  MOXE_BENCH_CUDA(cudaDeviceSynchronize());  // the upload is done before `stream` reads it
  if (md::routing_map(mp, ws.as<void>(), ws.bytes(), stream) != moxe::Status::ok) {
    state.SkipWithError("routing_map failed");
    return;
  }
  EventTimer timer;
  for (auto _ : state) {
    timer.start(stream);
    md::routing_map(mp, ws.as<void>(), ws.bytes(), stream);
    state.SetIterationTime(timer.stop_seconds(stream));
  }
  // topk read twice (histogram and rank passes), row_map written once
  const double entries = double(d.tokens) * d.top_k;
  moxe::bench::set_counters(state, entries * (2 * sizeof(int32_t) + sizeof(int64_t)), 0);
  MOXE_BENCH_CUDA(cudaStreamDestroy(stream));
}

/// The expert-parallel reorder of received rows: R ranks x L local experts, rows split
/// evenly with some jitter; every row read once and written once.
void BM_sort_chunks(benchmark::State& state) {
  const int64_t total_rows = state.range(0);
  const int hidden = static_cast<int>(state.range(1)), ranks = static_cast<int>(state.range(2)),
            local = static_cast<int>(state.range(3));
  std::mt19937 rng(3);
  std::vector<int64_t> split(ranks * local, total_rows / (ranks * local));
  for (std::size_t c = 0; c + 1 < split.size(); c += 2) {  // move rows between neighbours
    const int64_t moved = rng() % (split[c] / 2 + 1);
    split[c] -= moved;
    split[c + 1] += moved;
  }
  int64_t rows = 0;
  for (int64_t n : split) rows += n;
  cudaStream_t stream;
  MOXE_BENCH_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  DeviceMemory split_d = moxe::bench::upload(split);
  const std::size_t bytes = rows * hidden * sizeof(Element);
  struct Set { DeviceMemory in, out; };
  moxe::bench::Rotation<Set> sets(2 * bytes, [&](int i) {
    return Set{random_bf16(rows * hidden, 31u + i), DeviceMemory(bytes)};
  });
  const md::SortChunksParams<Element> probe{rows, hidden, ranks, local};
  DeviceMemory ws(md::sort_chunks_workspace_size(probe));
  MOXE_BENCH_CUDA(cudaDeviceSynchronize());  // the fills (legacy stream) are done
  auto launch = [&](Set& s) {
    return md::sort_chunks(md::SortChunksParams<Element>{rows, hidden, ranks, local, split_d.as<int64_t>(),
                                                         s.in.as<Element>(), s.out.as<Element>()},
                           ws.as<void>(), ws.bytes(), stream);
  };
  if (launch(sets.next()) != moxe::Status::ok) {
    state.SkipWithError("sort_chunks failed");
    return;
  }
  EventTimer timer;
  for (auto _ : state) {
    Set& s = sets.next();
    timer.start(stream);
    launch(s);
    state.SetIterationTime(timer.stop_seconds(stream));
  }
  moxe::bench::set_counters(state, 2.0 * double(bytes), 0);
  MOXE_BENCH_CUDA(cudaStreamDestroy(stream));
}

#define MOXE_DISPATCH_SHAPES ->Args({4096, 8, 128, 7168})->Args({16384, 2, 8, 4096})
#define MOXE_DISPATCH_RUN ->ArgNames({"T", "K", "E", "H"})->UseManualTime()->Unit(benchmark::kMicrosecond)

BENCHMARK_TEMPLATE(BM_rows, Op::permute) MOXE_DISPATCH_SHAPES MOXE_DISPATCH_RUN;
BENCHMARK_TEMPLATE(BM_rows, Op::permute_backward) MOXE_DISPATCH_SHAPES MOXE_DISPATCH_RUN;
BENCHMARK_TEMPLATE(BM_rows, Op::unpermute) MOXE_DISPATCH_SHAPES MOXE_DISPATCH_RUN;
BENCHMARK_TEMPLATE(BM_rows, Op::unpermute_backward) MOXE_DISPATCH_SHAPES MOXE_DISPATCH_RUN;
BENCHMARK(BM_sort_chunks)->Args({32768, 7168, 8, 16})->ArgNames({"rows", "H", "R", "L"})->UseManualTime()->Unit(
    benchmark::kMicrosecond);
BENCHMARK(BM_routing_map)->Args({65536, 8, 256})->ArgNames({"T", "K", "E"})->UseManualTime()->Unit(
    benchmark::kMicrosecond);

}  // namespace

MOXE_BENCHMARK_MAIN();
