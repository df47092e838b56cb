// moxe_layer, the CUDA build: one MoxE layer (arXiv 2505.01459) on the device, checked
// against the host reference path, then timed at a realistic size.
//
//   ./moxe_layer [--dump DIR] [--bench] [--json FILE]
//
// Without a usable CUDA device it prints so and runs the host reference path (host_main.hpp),
// exactly as the build without CUDA does. With one (and no option):
//   1. the device forward and backward in float at a small layer (head dims 16 and 32, the
//      smallest the device cells take) in both expert modes, compared with the host path
//      in double: the routing (the same top-k experts per token; the rest assumes it), the
//      mixer output x3, the gate input u, the rows per expert, the combine,
//      y, the four losses, dx and the weight gradients, one line each with OK / FAILED
//      (max relative error per tensor, tolerance 1e-4); then the same with shared experts
//      (one mLSTM or sLSTM shared expert, in each expert mode);
//   2. tokens/s of the forward and of forward + backward in bf16 at d_model 1024, 8 heads,
//      E = 8, top-2, B = 4, S = 4096, with the time of each stage (CUDA events).
// --bench runs 2. only; --json FILE writes 2.'s timings to FILE (benchmarks/compare_torch.py
// reads them); --dump DIR writes the host path's numbers of a few tiny layers (host_main.hpp).
// The exit status is 0 when every comparison passes.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "device_layer.cuh"
#include "host_main.hpp"
#include "layer_config.hpp"
#include "layer_reference.hpp"

namespace {

using moxe_layer::ExpertMode;
using moxe_layer::LayerCache;
using moxe_layer::LayerConfig;
using moxe_layer::LayerWeights;
using moxe_layer::SharedExpertKind;
using moxe_layer::Vec;
using moxe_layer::device::DeviceLayer;

bool device_usable() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear it: the host path needs no device
    return false;
  }
  return count > 0;
}

bool ok(moxe::Status st, const char* what) {
  if (st == moxe::Status::ok) return true;
  std::printf("  %s failed: %s (%s)\n", what, moxe::to_string(st), cudaGetErrorString(cudaGetLastError()));
  return false;
}

bool ok(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return true;
  std::printf("  %s failed: %s\n", what, cudaGetErrorString(err));
  return false;
}

template <class T>
bool upload(const Vec& host, T* device) {
  std::vector<T> staging(host.size());
  for (std::size_t i = 0; i < host.size(); ++i) staging[i] = moxe::from_float<T>(float(host[i]));
  return ok(cudaMemcpy(device, staging.data(), sizeof(T) * host.size(), cudaMemcpyHostToDevice), "upload");
}

template <class T>
Vec download(const T* device, std::size_t n) {
  std::vector<T> staging(n);
  Vec out(n, std::nan(""));
  if (!ok(cudaMemcpy(staging.data(), device, sizeof(T) * n, cudaMemcpyDeviceToHost), "download")) return out;
  for (std::size_t i = 0; i < n; ++i) out[i] = double(moxe::to_float(staging[i]));
  return out;
}

Vec random_vector(std::mt19937_64& gen, std::size_t n) {
  std::normal_distribution<double> dist(0.0, 1.0);
  Vec v(n);
  for (double& x : v) x = dist(gen);
  return v;
}

/// Prints one compared quantity: max |device - host| / max(max |host|, floor).
bool report(const char* name, const Vec& device, const Vec& host, double floor = 1e-6, double tol = 1e-4) {
  double diff = device.size() == host.size() ? 0.0 : INFINITY, scale = floor;
  for (std::size_t i = 0; i < device.size() && i < host.size(); ++i) {
    const double d = std::fabs(device[i] - host[i]);
    diff = std::isnan(d) ? INFINITY : std::max(diff, d);
    scale = std::max(scale, std::fabs(host[i]));
  }
  const double err = diff / scale;
  const bool pass = err <= tol;
  std::printf("  %-26s max rel err %.2e  %s\n", name, err, pass ? "OK" : "FAILED");
  return pass;
}

/// 1. The device forward and backward in float against the host path in double, with
/// `shared_experts` always-on experts of `shared_kind` beside the routed ones.
int compare(ExpertMode mode, cudaStream_t stream, int shared_experts = 0,
            SharedExpertKind shared_kind = SharedExpertKind::mlstm) {
  LayerConfig c;
  c.batch = 2;
  c.seq_len = 16;
  c.d_model = 32;  // head dim 16 (experts, mixer sLSTM); mixer mLSTM inner head dim 32
  c.heads = 2;
  c.ffn_hidden = 48;
  c.experts = 4;
  c.top_k = 2;
  c.expert_mode = mode;
  c.shared_experts = shared_experts;
  c.shared_expert_kind = shared_kind;
  std::mt19937_64 gen(2505);
  const LayerWeights w = LayerWeights::random(c, gen);
  const Vec x = random_vector(gen, std::size_t(c.tokens() * c.d_model));
  const Vec dy = random_vector(gen, x.size());
  std::printf("[%s experts, float] B=%lld S=%lld D=%lld heads=%lld experts=%d top_k=%d", moxe_layer::to_string(mode),
              (long long)c.batch, (long long)c.seq_len, (long long)c.d_model, (long long)c.heads, c.experts, c.top_k);
  if (c.shared_experts > 0) std::printf(" + %d shared %s", c.shared_experts, moxe_layer::to_string(shared_kind));
  std::printf(": device vs host (double)\n");

  LayerCache host;
  if (!ok(moxe_layer::forward(c, w, x, host), "host forward")) return 1;
  Vec host_dx;
  LayerWeights host_grads;
  if (!ok(moxe_layer::backward(c, w, host, dy, host_dx, host_grads), "host backward")) return 1;

  DeviceLayer<float> layer;
  if (!ok(layer.init(c, w, stream), "device init") || !upload(x, layer.x())) return 1;
  if (!ok(layer.forward(), "device forward") || !ok(cudaStreamSynchronize(stream), "device forward")) return 1;

  // The routing first: every later comparison assumes the same top-k. A token whose k-th and
  // (k+1)-th probabilities are within float rounding may route differently in float than in
  // double; the margin says whether a difference is such a tie (then nothing below can be
  // compared) or a bug.
  const std::size_t slots = std::size_t(c.tokens() * c.top_k);
  std::vector<int32_t> device_idx(slots, -1);
  if (!ok(cudaMemcpy(device_idx.data(), layer.topk_idx(), sizeof(int32_t) * slots, cudaMemcpyDeviceToHost),
          "download top-k"))
    return 1;
  double margin = INFINITY;  // smallest p_(k) - p_(k+1) of the host's probabilities
  int64_t differing = 0;
  for (int64_t t = 0; t < c.tokens(); ++t) {
    std::vector<double> p(host.probs.begin() + t * c.experts, host.probs.begin() + (t + 1) * c.experts);
    std::sort(p.rbegin(), p.rend());
    if (c.top_k < c.experts) margin = std::min(margin, p[std::size_t(c.top_k) - 1] - p[std::size_t(c.top_k)]);
    // the same set of experts (their order only follows the probabilities, and a near-equal
    // pair of chosen experts may swap places without changing anything downstream)
    const auto first = std::size_t(t * c.top_k), last = first + std::size_t(c.top_k);
    std::vector<int32_t> a(device_idx.begin() + first, device_idx.begin() + last);
    std::vector<int32_t> b(host.topk_idx.begin() + first, host.topk_idx.begin() + last);
    std::sort(a.begin(), a.end());
    std::sort(b.begin(), b.end());
    differing += a != b;
  }
  std::printf("  %-26s %s (%lld tokens differ; smallest top-k margin %.2e)\n", "routing (top-k experts)",
              differing == 0 ? "OK" : "FAILED", (long long)differing, margin);
  if (differing > 0) {
    std::printf("  (the comparisons below need the same routing: %s)\n",
                margin < 1e-5 ? "a near-tie, not necessarily a bug" : "the margin is clear: a bug");
    return 1;
  }
  if (!upload(dy, layer.dy())) return 1;
  if (!ok(layer.backward(), "device backward") || !ok(cudaStreamSynchronize(stream), "device backward")) return 1;

  const std::size_t n = std::size_t(c.tokens() * c.d_model);
  bool pass = true;
  pass &= report("x3 (mixer output)", download(layer.x3(), n), host.mlstm_block.out);
  pass &= report("u = LN(x3)", download(layer.u(), n), host.u);
  bool same_routing = true;
  for (int e = 0; e < c.experts; ++e)
    same_routing &= layer.expert_rows(e) == host.expert_offsets[e + 1] - host.expert_offsets[e];
  std::printf("  %-26s %s\n", "rows per expert", same_routing ? "OK" : "FAILED");
  pass &= same_routing;
  pass &= report("combine", download(layer.combine(), n), host.combine);
  pass &= report("y", download(layer.y(), n), host.y);
  const Vec losses = download(layer.losses(), 4);
  const char* names[4] = {"L_z", "L_lb", "L_d", "L_g"};
  for (int i = 0; i < 4; ++i)  // relative to max(|L|, 1e-2): the balance losses can be ~0
    pass &= report(names[i], Vec{losses[i]}, Vec{host.losses[i]}, 1e-2);
  pass &= report("dx", download(layer.dx(), n), host_dx);
  // every weight gradient, by name; the failing ones get a line each
  double worst = 0.0;
  std::string worst_name;
  int failed = 0;
  const auto host_tensors = moxe_layer::named_tensors(c, host_grads);
  for (const auto& t : host_tensors) {
    const Vec d = download(layer.grads()(t.name), t.value->size());
    double diff = 0.0, scale = 1e-6;
    for (std::size_t i = 0; i < d.size(); ++i) {
      const double e = std::fabs(d[i] - (*t.value)[i]);
      diff = std::isnan(e) ? INFINITY : std::max(diff, e);
      scale = std::max(scale, std::fabs((*t.value)[i]));
    }
    const double err = diff / scale;
    if (err > 1e-4) {
      ++failed;
      std::printf("  d%-25s max rel err %.2e  FAILED\n", t.name.c_str(), err);
    }
    if (err >= worst) {
      worst = err;
      worst_name = t.name;
    }
  }
  std::printf("  %-26s max rel err %.2e  %s (%zu tensors, worst d%s)\n", "weight gradients", worst,
              failed == 0 ? "OK" : "FAILED", host_tensors.size(), worst_name.c_str());
  pass &= failed == 0;
  return pass ? 0 : 1;
}

/// One benchmark's timings (milliseconds, means over the timed iterations).
struct BenchResult {
  std::string mode;
  LayerConfig config;
  double device_gib = 0.0;
  std::array<double, moxe_layer::device::kStages> forward_ms{}, backward_ms{};
  double forward_total_ms = 0.0, backward_total_ms = 0.0;
};

/// The timings as one JSON document (for benchmarks/compare_torch.py).
bool write_json(const std::string& path, const char* device, const std::vector<BenchResult>& results) {
  std::FILE* f = std::fopen(path.c_str(), "w");
  if (!f) return false;
  std::fprintf(f, "{\n  \"device\": \"%s\",\n  \"dtype\": \"bf16\",\n  \"results\": [", device);
  for (std::size_t r = 0; r < results.size(); ++r) {
    const BenchResult& b = results[r];
    const LayerConfig& c = b.config;
    std::fprintf(f,
                 "%s\n    {\"expert_mode\": \"%s\", \"batch\": %lld, \"seq_len\": %lld, \"d_model\": %lld, "
                 "\"heads\": %lld, \"ffn_hidden\": %lld, \"experts\": %d, \"top_k\": %d, \"device_gib\": %.3f, "
                 "\"forward_ms\": %.4f, \"backward_ms\": %.4f, \"stages\": {",
                 r ? "," : "", b.mode.c_str(), (long long)c.batch, (long long)c.seq_len, (long long)c.d_model,
                 (long long)c.heads, (long long)c.ffn_hidden, c.experts, c.top_k, b.device_gib, b.forward_total_ms,
                 b.backward_total_ms);
    for (int i = 0; i < moxe_layer::device::kStages; ++i)
      std::fprintf(f, "%s\"%s\": [%.4f, %.4f]", i ? ", " : "", moxe_layer::device::stage_name(i), b.forward_ms[i],
                   b.backward_ms[i]);
    std::fprintf(f, "}}");
  }
  std::fprintf(f, "\n  ]\n}\n");
  return std::fclose(f) == 0;
}

/// 2. Tokens/s of the bf16 forward and forward + backward at a realistic size, with the time
/// of each stage. Appends the timings to `results` (nothing when the layer does not fit).
int benchmark(const LayerConfig& c, const LayerWeights& w, cudaStream_t stream, std::vector<BenchResult>& results) {
  DeviceLayer<__nv_bfloat16> layer;
  const moxe::Status st = layer.init(c, w, stream);
  if (st != moxe::Status::ok) {  // e.g. a smaller GPU: not a correctness failure
    std::printf("  benchmark (%s experts) skipped: init: %s\n", moxe_layer::to_string(c.expert_mode),
                moxe::to_string(st));
    return 0;
  }
  std::mt19937_64 gen(7);
  const std::size_t n = std::size_t(c.tokens() * c.d_model);
  if (!upload(random_vector(gen, n), layer.x()) || !upload(random_vector(gen, n), layer.dy())) return 1;

  constexpr int kWarmup = 2, kIterations = 10;
  constexpr int kStages = moxe_layer::device::kStages;
  std::array<double, kStages> seconds{}, back_seconds{};
  for (int it = 0; it < kWarmup + kIterations; ++it) {
    if (!ok(layer.forward(), "forward") || !ok(layer.backward(), "backward") ||
        !ok(cudaStreamSynchronize(stream), "forward + backward"))
      return 1;
    if (it < kWarmup) continue;
    const auto s = layer.stage_seconds(), b = layer.backward_stage_seconds();
    for (int i = 0; i < kStages; ++i) {
      seconds[i] += s[i] / kIterations;
      back_seconds[i] += b[i] / kIterations;
    }
  }
  double total = 0.0, back_total = 0.0;
  for (int i = 0; i < kStages; ++i) {
    total += seconds[i];
    back_total += back_seconds[i];
  }
  std::printf("[%s experts, bf16] B=%lld S=%lld D=%lld heads=%lld ffn=%lld experts=%d top_k=%d, %.2f GiB device\n",
              moxe_layer::to_string(c.expert_mode), (long long)c.batch, (long long)c.seq_len,
              (long long)c.d_model, (long long)c.heads, (long long)c.ffn_hidden, c.experts, c.top_k,
              double(layer.device_bytes()) / double(1 << 30));
  std::printf("  %-14s %12s %12s %12s\n", "stage", "forward ms", "backward ms", "fwd+bwd %");
  for (int i = 0; i < kStages; ++i)
    std::printf("  %-14s %12.3f %12.3f %11.1f%%\n", moxe_layer::device::stage_name(i), seconds[i] * 1e3,
                back_seconds[i] * 1e3, 100.0 * (seconds[i] + back_seconds[i]) / (total + back_total));
  std::printf("  %-14s %12.3f %12.3f\n", "total", total * 1e3, back_total * 1e3);
  std::printf("  tokens/s: forward %.0f, forward+backward %.0f\n", double(c.tokens()) / total,
              double(c.tokens()) / (total + back_total));
  BenchResult r;
  r.mode = moxe_layer::to_string(c.expert_mode);
  r.config = c;
  r.device_gib = double(layer.device_bytes()) / double(1 << 30);
  for (int i = 0; i < kStages; ++i) {
    r.forward_ms[i] = seconds[i] * 1e3;
    r.backward_ms[i] = back_seconds[i] * 1e3;
  }
  r.forward_total_ms = total * 1e3;
  r.backward_total_ms = back_total * 1e3;
  results.push_back(r);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  namespace ex = moxe_layer::host_example;
  const ex::Options opt = ex::parse_options(argc, argv);
  if (!opt.valid) return 2;
  if (!opt.dump_dir.empty()) return ex::dump_cases(opt.dump_dir);  // host numbers: no device needed
  if (!device_usable()) {
    if (opt.bench || !opt.json_path.empty()) {
      std::printf("moxe_layer: --bench and --json need a usable CUDA device\n");
      return 2;
    }
    std::printf("moxe_layer: no usable CUDA device: running the host reference path\n");
    return ex::host_main();
  }
  cudaDeviceProp prop{};
  cudaGetDeviceProperties(&prop, 0);
  cudaStream_t stream = nullptr;
  if (!ok(cudaStreamCreate(&stream), "cudaStreamCreate")) return 1;

  int rc = 0;
  if (!opt.bench) {
    std::printf("moxe_layer: one MoxE layer on %s (device forward vs the host reference path)\n", prop.name);
    rc |= compare(ExpertMode::per_token, stream);
    rc |= compare(ExpertMode::stateful, stream);
    // the shared experts' four code paths: (per token, stateful) x (mLSTM, sLSTM)
    rc |= compare(ExpertMode::per_token, stream, 1, SharedExpertKind::mlstm);
    rc |= compare(ExpertMode::stateful, stream, 1, SharedExpertKind::slstm);
    rc |= compare(ExpertMode::per_token, stream, 1, SharedExpertKind::slstm);
    rc |= compare(ExpertMode::stateful, stream, 2, SharedExpertKind::mlstm);
  } else {
    std::printf("moxe_layer: the benchmark layer on %s\n", prop.name);
  }

  const LayerConfig big = moxe_layer::benchmark_config();
  std::mt19937_64 gen(1024);
  const LayerWeights w = LayerWeights::random(big, gen);
  std::vector<BenchResult> results;
  for (ExpertMode mode : {ExpertMode::per_token, ExpertMode::stateful}) {
    LayerConfig c = big;
    c.expert_mode = mode;
    rc |= benchmark(c, w, stream, results);
  }
  if (!opt.json_path.empty() && !write_json(opt.json_path, prop.name, results)) {
    std::printf("moxe_layer: cannot write %s\n", opt.json_path.c_str());
    rc |= 1;
  }
  cudaStreamDestroy(stream);
  if (!opt.bench) std::printf("moxe_layer: %s\n", rc == 0 ? "all device checks passed" : "SOME DEVICE CHECKS FAILED");
  return rc;
}
