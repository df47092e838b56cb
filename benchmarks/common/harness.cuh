// moxe benchmark harness: CUDA-event timing for Google Benchmark (UseManualTime), input
// rotation past L2, and counters that read as fractions of the device's ceilings.
//
//   static void BM_op(benchmark::State& state) {
//     moxe::bench::Rotation<Inputs> inputs(bytes_per_set, [&](int i) { return make(i); });
//     moxe::bench::EventTimer timer;
//     for (auto _ : state) {
//       const Inputs& in = inputs.next();
//       timer.start(stream);
//       launch(in, stream);
//       state.SetIterationTime(timer.stop_seconds(stream));
//     }
//     moxe::bench::set_counters(state, bytes, flops);
//   }
//   BENCHMARK(BM_op)->UseManualTime()->Unit(benchmark::kMicrosecond);
//   MOXE_BENCHMARK_MAIN();
//
// The ceilings come from bench_ceilings (device-to-device copy bandwidth and a cuBLAS bf16
// GEMM rate); scripts/gpu-check.sh measures them first and passes them to every other
// benchmark as MOXE_COPY_BW_GBPS and MOXE_BF16_TFLOPS, which turn into the counters
// frac_copy_bw and frac_bf16_peak.
#pragma once

#include <benchmark/benchmark.h>
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

namespace moxe::bench {

#define MOXE_BENCH_CUDA(expr)                                                               \
  do {                                                                                      \
    const cudaError_t moxe_err_ = (expr);                                                   \
    if (moxe_err_ != cudaSuccess) {                                                         \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #expr,                    \
                   cudaGetErrorString(moxe_err_));                                          \
      std::exit(1);                                                                         \
    }                                                                                       \
  } while (0)

inline bool device_available() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return count > 0;
}

/// L2 size of the current device (bytes), 50 MiB if it cannot be read.
inline std::size_t l2_bytes() {
  int device = 0, l2 = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, device) != cudaSuccess || l2 <= 0)
    return std::size_t(50) << 20;
  return static_cast<std::size_t>(l2);
}

/// Times one region of device work on a stream with a pair of CUDA events.
class EventTimer {
 public:
  EventTimer() {
    MOXE_BENCH_CUDA(cudaEventCreate(&start_));
    MOXE_BENCH_CUDA(cudaEventCreate(&stop_));
  }
  ~EventTimer() {
    cudaEventDestroy(start_);
    cudaEventDestroy(stop_);
  }
  EventTimer(const EventTimer&) = delete;
  EventTimer& operator=(const EventTimer&) = delete;

  void start(cudaStream_t stream) { MOXE_BENCH_CUDA(cudaEventRecord(start_, stream)); }
  /// Stops, waits for the stop event, and returns the elapsed time in seconds.
  double stop_seconds(cudaStream_t stream) {
    MOXE_BENCH_CUDA(cudaEventRecord(stop_, stream));
    MOXE_BENCH_CUDA(cudaEventSynchronize(stop_));
    MOXE_BENCH_CUDA(cudaGetLastError());
    float ms = 0.f;
    MOXE_BENCH_CUDA(cudaEventElapsedTime(&ms, start_, stop_));
    return ms * 1e-3;
  }

 private:
  cudaEvent_t start_{}, stop_{};
};

/// Enough copies of an input set that consecutive iterations never find their inputs in
/// L2: at least 2 sets, and together at least 3x the L2 size.
template <class Set>
class Rotation {
 public:
  Rotation(std::size_t bytes_per_set, const std::function<Set(int)>& make, int max_sets = 64) {
    const std::size_t want = 3 * l2_bytes();
    int n = bytes_per_set > 0 ? static_cast<int>((want + bytes_per_set - 1) / bytes_per_set) : 1;
    n = std::max(2, std::min(n, max_sets));
    sets_.reserve(n);
    for (int i = 0; i < n; ++i) sets_.push_back(make(i));
  }
  Set& next() {
    Set& s = sets_[cursor_];
    cursor_ = (cursor_ + 1) % sets_.size();
    return s;
  }
  std::size_t size() const { return sets_.size(); }

 private:
  std::vector<Set> sets_;
  std::size_t cursor_ = 0;
};

/// Untyped device allocation for benchmark inputs, filled with random bits of a given
/// pattern (never zeros: zeros can run faster than real data).
class DeviceMemory {
 public:
  DeviceMemory() = default;
  explicit DeviceMemory(std::size_t bytes) : bytes_(bytes) {
    if (bytes_) MOXE_BENCH_CUDA(cudaMalloc(&ptr_, bytes_));
  }
  DeviceMemory(DeviceMemory&& o) noexcept : ptr_(o.ptr_), bytes_(o.bytes_) { o.ptr_ = nullptr; o.bytes_ = 0; }
  DeviceMemory& operator=(DeviceMemory&& o) noexcept {
    std::swap(ptr_, o.ptr_);
    std::swap(bytes_, o.bytes_);
    return *this;
  }
  DeviceMemory(const DeviceMemory&) = delete;
  DeviceMemory& operator=(const DeviceMemory&) = delete;
  ~DeviceMemory() {
    if (ptr_) cudaFree(ptr_);
  }
  template <class T>
  T* as() const { return static_cast<T*>(ptr_); }
  std::size_t bytes() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  std::size_t bytes_ = 0;
};

/// Upload host values into a new device allocation.
template <class T>
DeviceMemory upload(const std::vector<T>& host) {
  DeviceMemory m(host.size() * sizeof(T));
  if (!host.empty()) MOXE_BENCH_CUDA(cudaMemcpy(m.as<void>(), host.data(), m.bytes(), cudaMemcpyHostToDevice));
  return m;
}

inline double env_double(const char* name) {
  const char* s = std::getenv(name);
  return s ? std::atof(s) : 0.0;
}

/// Report bytes moved and FLOPs done per iteration: rates (bytes/s, FLOP/s) and, when the
/// ceilings are known (environment), the fractions of them.
inline void set_counters(benchmark::State& state, double bytes_per_iter, double flops_per_iter) {
  using benchmark::Counter;
  if (bytes_per_iter > 0) {
    state.counters["bytes/s"] = Counter(bytes_per_iter, Counter::kIsIterationInvariantRate, Counter::kIs1000);
    const double bw = env_double("MOXE_COPY_BW_GBPS") * 1e9;
    if (bw > 0) state.counters["frac_copy_bw"] = Counter(bytes_per_iter / bw, Counter::kIsIterationInvariantRate);
  }
  if (flops_per_iter > 0) {
    state.counters["FLOP/s"] = Counter(flops_per_iter, Counter::kIsIterationInvariantRate, Counter::kIs1000);
    const double peak = env_double("MOXE_BF16_TFLOPS") * 1e12;
    if (peak > 0) state.counters["frac_bf16_peak"] = Counter(flops_per_iter / peak, Counter::kIsIterationInvariantRate);
  }
}

/// A main() that skips (exit 0, one line) where no CUDA device can be used.
inline int run_main(int argc, char** argv) {
  if (!device_available()) {
    std::printf("no CUDA device: benchmarks skipped\n");
    return 0;
  }
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  cudaDeviceProp prop{};
  int device = 0;
  if (cudaGetDevice(&device) == cudaSuccess && cudaGetDeviceProperties(&prop, device) == cudaSuccess) {
    benchmark::AddCustomContext("device", prop.name);
    benchmark::AddCustomContext("sm_count", std::to_string(prop.multiProcessorCount));
  }
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}

}  // namespace moxe::bench

#define MOXE_BENCHMARK_MAIN() \
  int main(int argc, char** argv) { return ::moxe::bench::run_main(argc, argv); }
