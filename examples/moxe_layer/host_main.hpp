// The host reference path of the moxe_layer example, shared by main.cpp (no CUDA) and
// main.cu (no usable device): one MoxE layer (arXiv 2505.01459) forward and backward in
// double, the sLSTM + mLSTM sequence mixer, the entropy-aware gate, E/2 mLSTM and E/2 sLSTM
// experts, the weighted combine, the four auxiliary losses, and the gradient of the whole
// layer checked against finite differences at a few coordinates.
//
// See layer_reference.hpp for the layer, top to bottom.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <random>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#include "layer_config.hpp"
#include "layer_reference.hpp"

namespace moxe_layer::host_example {

using moxe_layer::ExpertMode;
using moxe_layer::LayerCache;
using moxe_layer::LayerConfig;
using moxe_layer::LayerWeights;
using moxe_layer::Vec;

inline Vec random_vector(std::mt19937_64& gen, std::size_t n) {
  std::normal_distribution<double> dist(0.0, 1.0);
  Vec v(n);
  for (double& x : v) x = dist(gen);
  return v;
}

/// The largest |analytic - finite difference| / max(|fd|, 1e-2) over `samples` random
/// coordinates of `value`: central differences at h and h/2, Richardson-extrapolated
/// ((4 D(h/2) - D(h)) / 3, exact to O(h^4)).
inline double spot_check(const LayerConfig& c, const LayerWeights& w, Vec& x, const Vec& dy, Vec& value,
                  const Vec& analytic, std::mt19937_64& gen, int samples) {
  LayerCache probe;
  auto objective = [&]() {
    moxe_layer::forward(c, w, x, probe);
    return moxe_layer::objective(c, probe, dy);
  };
  std::uniform_int_distribution<std::size_t> pick(0, value.size() - 1);
  double worst = 0.0;
  const double h = 1e-5;
  for (int s = 0; s < samples; ++s) {
    const std::size_t i = pick(gen);
    const double saved = value[i];
    auto central = [&](double step) {
      value[i] = saved + step;
      const double jp = objective();
      value[i] = saved - step;
      const double jm = objective();
      value[i] = saved;
      return (jp - jm) / (2.0 * step);
    };
    const double coarse = central(h), fine = central(h / 2);
    const double fd = (4.0 * fine - coarse) / 3.0;
    worst = std::max(worst, std::fabs(analytic[i] - fd) / std::max(std::fabs(fd), 1e-2));
  }
  return worst;
}

inline int run(ExpertMode mode, int shared_experts = 0) {
  LayerConfig c;  // tiny defaults: B=2, S=5, D=8, 2 heads, E=4 (2 mLSTM + 2 sLSTM), top-2
  c.expert_mode = mode;
  c.shared_experts = shared_experts;  // always-on mLSTM experts beside the routed ones
  std::mt19937_64 gen(2505);
  LayerWeights w = LayerWeights::random(c, gen);
  Vec x = random_vector(gen, std::size_t(c.tokens() * c.d_model));
  Vec dy = random_vector(gen, x.size());

  LayerCache cache;
  moxe::Status st = moxe_layer::forward(c, w, x, cache);
  if (st != moxe::Status::ok) {
    std::printf("forward failed: %s\n", moxe::to_string(st));
    return 1;
  }
  Vec dx;
  LayerWeights grads;
  st = moxe_layer::backward(c, w, cache, dy, dx, grads);
  if (st != moxe::Status::ok) {
    std::printf("backward failed: %s\n", moxe::to_string(st));
    return 1;
  }

  double y_norm = 0.0;
  for (double v : cache.y) y_norm += v * v;
  std::printf("[%s experts] B=%lld S=%lld D=%lld heads=%lld experts=%d (mLSTM %d, sLSTM %d) top_k=%d",
              moxe_layer::to_string(mode), (long long)c.batch, (long long)c.seq_len, (long long)c.d_model,
              (long long)c.heads, c.experts, c.mlstm_experts(), c.experts - c.mlstm_experts(), c.top_k);
  if (c.shared_experts > 0)
    std::printf(" + %d shared %s expert%s", c.shared_experts, moxe_layer::to_string(c.shared_expert_kind),
                c.shared_experts > 1 ? "s" : "");
  std::printf("\n");
  std::printf("  |y| = %.6f   losses: L_z = %.6f  L_lb = %.6f  L_d = %.6f  L_g = %.6f\n", std::sqrt(y_norm),
              cache.losses[0], cache.losses[1], cache.losses[2], cache.losses[3]);
  std::printf("  rows per expert:");
  for (int e = 0; e < c.experts; ++e)
    std::printf(" %s%d=%lld", e < c.mlstm_experts() ? "m" : "s", e,
                (long long)(cache.expert_offsets[e + 1] - cache.expert_offsets[e]));
  std::printf("   objective J = sum(y*dy) + c.L = %.9f\n", moxe_layer::objective(c, cache, dy));

  // a few coordinates of dx and of some weights against finite differences
  std::vector<moxe_layer::NamedTensor> wt = moxe_layer::named_tensors(c, w);
  std::vector<moxe_layer::NamedTensor> gt = moxe_layer::named_tensors(c, grads);
  double worst = spot_check(c, w, x, dy, x, dx, gen, 8);
  std::size_t tensors = 0;
  for (std::size_t i = 0; i < wt.size(); i += 3, ++tensors)
    worst = std::max(worst, spot_check(c, w, x, dy, *wt[i].value, *gt[i].value, gen, 2));
  const bool ok = worst < 1e-5;
  std::printf("  gradient check (dx and %zu of %zu weight tensors, finite differences): max rel err %.2e  %s\n",
              tensors, wt.size(), worst, ok ? "OK" : "FAILED");
  return ok ? 0 : 1;
}

// ---- --dump: the layer's numbers for checks outside C++ ------------------------------------

inline const char* modulation_name(moxe::router::Modulation m) {
  switch (m) {
    case moxe::router::Modulation::none: return "none";
    case moxe::router::Modulation::standard: return "standard";
    case moxe::router::Modulation::proportional: return "proportional";
    case moxe::router::Modulation::masked: return "masked";
  }
  return "?";
}

/// One tiny layer, forward and backward in double, written to `dir` for a check outside
/// C++ (benchmarks/compare_torch.py --check-layer compares its PyTorch eager layer with
/// them): manifest.json (the configuration, and each tensor's name, offset and size in
/// doubles) and data.bin (the doubles, native byte order): the input x, the upstream
/// gradient dy, every weight (w.<name>), the output y, the losses, the top-k experts, dx and
/// every weight gradient (grad.<name>). Returns false when a file cannot be written.
inline bool dump_case(const std::string& dir, const LayerConfig& c, std::uint64_t seed) {
  std::mt19937_64 gen(seed);
  LayerWeights w = LayerWeights::random(c, gen);
  const Vec x = random_vector(gen, std::size_t(c.tokens() * c.d_model));
  const Vec dy = random_vector(gen, x.size());
  LayerCache cache;
  Vec dx;
  LayerWeights grads;
  if (moxe_layer::forward(c, w, x, cache) != moxe::Status::ok ||
      moxe_layer::backward(c, w, cache, dy, dx, grads) != moxe::Status::ok)
    return false;

  std::vector<std::pair<std::string, Vec>> tensors;
  tensors.emplace_back("x", x);
  tensors.emplace_back("dy", dy);
  tensors.emplace_back("y", cache.y);
  tensors.emplace_back("losses", Vec(cache.losses.begin(), cache.losses.end()));
  tensors.emplace_back("topk_idx", Vec(cache.topk_idx.begin(), cache.topk_idx.end()));
  tensors.emplace_back("dx", dx);
  for (const auto& t : moxe_layer::named_tensors(c, w)) tensors.emplace_back("w." + t.name, *t.value);
  for (const auto& t : moxe_layer::named_tensors(c, grads)) tensors.emplace_back("grad." + t.name, *t.value);

  std::FILE* data = std::fopen((dir + "/data.bin").c_str(), "wb");
  std::FILE* manifest = std::fopen((dir + "/manifest.json").c_str(), "w");
  bool ok = data && manifest;
  if (ok) {
    std::fprintf(manifest,
                 "{\n  \"config\": {\"batch\": %lld, \"seq_len\": %lld, \"d_model\": %lld, \"heads\": %lld, "
                 "\"mlstm_proj_factor\": %lld, \"ffn_hidden\": %lld, \"conv_width\": %lld, \"experts\": %d, "
                 "\"top_k\": %d, \"expert_mode\": \"%s\", \"shared_experts\": %d, \"shared_expert_kind\": \"%s\", "
                 "\"modulation\": \"%s\", \"gamma\": %.17g, \"tau\": %.17g, \"c_z\": %.17g, \"c_lb\": %.17g, "
                 "\"c_d\": %.17g, \"c_g\": %.17g, \"norm_eps\": %.17g},\n  \"tensors\": [",
                 (long long)c.batch, (long long)c.seq_len, (long long)c.d_model, (long long)c.heads,
                 (long long)c.mlstm_proj_factor, (long long)c.ffn_hidden, (long long)c.conv_width, c.experts,
                 c.top_k, moxe_layer::to_string(c.expert_mode), c.shared_experts,
                 moxe_layer::to_string(c.shared_expert_kind), modulation_name(c.modulation), c.gamma,
                 c.tau, c.c_z, c.c_lb, c.c_d, c.c_g, c.norm_eps);
    std::size_t offset = 0;
    for (std::size_t i = 0; i < tensors.size() && ok; ++i) {
      const Vec& v = tensors[i].second;
      std::fprintf(manifest, "%s\n    {\"name\": \"%s\", \"offset\": %zu, \"size\": %zu}", i ? "," : "",
                   tensors[i].first.c_str(), offset, v.size());
      ok = std::fwrite(v.data(), sizeof(double), v.size(), data) == v.size();
      offset += v.size();
    }
    std::fprintf(manifest, "\n  ]\n}\n");
  }
  if (data) ok = std::fclose(data) == 0 && ok;
  if (manifest) ok = std::fclose(manifest) == 0 && ok;
  return ok;
}

/// --dump DIR: the tiny layer in both expert modes, with and without shared experts, one
/// subdirectory of DIR each (created).
inline const char* const kDumpCases[] = {"per_token", "stateful", "stateful_shared_mlstm", "per_token_shared_slstm"};

inline LayerConfig dump_config(int which) {
  LayerConfig c;  // tiny defaults
  c.seq_len = 7;
  c.expert_mode = which % 2 == 0 ? ExpertMode::per_token : ExpertMode::stateful;
  if (which >= 2) {
    c.shared_experts = 1;
    c.shared_expert_kind = which == 2 ? moxe_layer::SharedExpertKind::mlstm : moxe_layer::SharedExpertKind::slstm;
  }
  return c;
}

inline int dump_cases(const std::string& dir) {
  int rc = 0;
  for (int i = 0; i < 4; ++i) {
    const std::string sub = dir + "/" + kDumpCases[i];
    std::error_code ec;
    std::filesystem::create_directories(sub, ec);
    const bool ok = !ec && dump_case(sub, dump_config(i), 2505 + std::uint64_t(i));
    std::printf("moxe_layer: dump %s: %s\n", sub.c_str(), ok ? "written" : "FAILED");
    rc |= ok ? 0 : 1;
  }
  return rc;
}

// ---- the command line ----------------------------------------------------------------------

/// moxe_layer [--dump DIR] [--bench] [--json FILE]
struct Options {
  std::string dump_dir;   ///< --dump DIR: write the tiny layers' numbers (dump_cases) and exit
  bool bench = false;     ///< --bench: the device benchmark only (no comparisons)
  std::string json_path;  ///< --json FILE: the benchmark's timings as JSON
  bool valid = true;
};

inline Options parse_options(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const bool has_value = i + 1 < argc;
    if (std::strcmp(argv[i], "--dump") == 0 && has_value) {
      o.dump_dir = argv[++i];
    } else if (std::strcmp(argv[i], "--json") == 0 && has_value) {
      o.json_path = argv[++i];
    } else if (std::strcmp(argv[i], "--bench") == 0) {
      o.bench = true;
    } else {
      o.valid = false;
    }
  }
  if (!o.valid)
    std::fprintf(stderr,
                 "usage: moxe_layer [--dump DIR] [--bench] [--json FILE]\n"
                 "  (none)       host: the reference path; device: device vs host, then the benchmark\n"
                 "  --dump DIR   write tiny layers' inputs, weights, outputs, gradients (double) under DIR\n"
                 "  --bench      device only: the benchmark, without the comparisons\n"
                 "  --json FILE  device: write the benchmark's timings to FILE\n");
  return o;
}

/// The host reference path of the example: both expert modes, then the stateful one with a
/// shared expert (y = x3 + combine + f_s(u) - u); 0 when every check passes.
inline int host_main() {
  std::printf("moxe_layer: one MoxE layer on the host reference path (double, no GPU)\n");
  int rc = 0;
  rc |= run(ExpertMode::per_token);
  rc |= run(ExpertMode::stateful);
  rc |= run(ExpertMode::stateful, 1);
  return rc;
}

}  // namespace moxe_layer::host_example
