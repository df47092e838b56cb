// Shared host-side fixtures of the router tests: a gate problem in double (inputs, outputs,
// the scalar objective a gradient check differentiates) and a naive forward written
// straight from docs/router.md to cross-check the reference.
#pragma once

#include <algorithm>
#include <cmath>
#include <functional>
#include <numeric>
#include <vector>

#include "moxe/router/params.hpp"
#include "moxe/router/reference.hpp"
#include "test_utils.hpp"

namespace moxe::test {

/// GateForwardParams P over a gate's buffers, named as P names them (host vectors here, device
/// buffers in test_gate.cu); `ptr` gives a buffer's element pointer.
template <class P, class Buffers, class Ptr>
P gate_forward_params(Buffers& b, Ptr ptr) {
  P p{};
  p.dims = b.dims;
  p.logits = ptr(b.logits);
  p.difficulty_logit = b.head ? ptr(b.difficulty_logit) : nullptr;
  p.modulation = b.modulation;
  p.gamma = b.gamma;
  p.tau = b.tau;
  p.probs = ptr(b.probs);
  p.lse = ptr(b.lse);
  p.entropy = ptr(b.entropy);
  p.difficulty = ptr(b.difficulty);
  p.topk_idx = ptr(b.topk_idx);
  p.topk_prob = ptr(b.topk_prob);
  p.topk_weight = ptr(b.topk_weight);
  p.expert_counts = ptr(b.expert_counts);
  p.losses = ptr(b.losses);
  return p;
}

struct GateProblem {
  router::GateDims dims{};
  router::Modulation modulation = router::Modulation::standard;
  double gamma = 0.8, tau = 0.5;
  bool head = true;
  std::vector<double> logits, difficulty_logit, dweight;
  double c_z = 0.3, c_lb = 0.7, c_d = 0.5, c_g = 0.9;
  // outputs of the last forward
  std::vector<double> probs, lse, entropy, difficulty, topk_prob, topk_weight, losses;
  std::vector<int32_t> topk_idx, expert_counts;
  std::vector<double> totals;  // [E + 4] GateForwardParams::totals when not empty (else null)

  GateProblem(Rng& rng, int64_t tokens, int experts, int mlstm_experts, int top_k, router::Modulation m,
              bool with_head = true, double logit_scale = 1.0)
      : modulation(m), head(with_head) {
    dims = {tokens, experts, mlstm_experts, top_k};
    logits = normal_vector<double>(rng, tokens * experts, logit_scale);
    difficulty_logit.resize(tokens);
    for (auto& a : difficulty_logit) {  // keep d = sigmoid(a) away from the kink at tau
      do a = rng.uniform(-3, 3);
      while (std::abs(1.0 / (1.0 + std::exp(-a)) - tau) < 0.05);
    }
    dweight = uniform_vector<double>(rng, tokens * top_k);
    allocate();
  }

  void allocate() {
    const auto T = static_cast<size_t>(dims.tokens);
    const auto E = static_cast<size_t>(dims.experts), K = static_cast<size_t>(dims.top_k);
    probs = poisoned<double>(T * E);
    lse = poisoned<double>(T);
    entropy = poisoned<double>(T);
    difficulty = poisoned<double>(T);
    topk_prob = poisoned<double>(T * K);
    topk_weight = poisoned<double>(T * K);
    losses = poisoned<double>(4);
    topk_idx.assign(T * K, -7);
    expert_counts.assign(E, -7);
  }

  router::GateForwardParams<double, double> forward_params() {
    auto p = gate_forward_params<router::GateForwardParams<double, double>>(*this, [](auto& v) { return v.data(); });
    p.totals = totals.empty() ? nullptr : totals.data();
    return p;
  }

  Status forward() { return router::reference::gate_forward(forward_params()); }

  /// sum(w * dw) + c_z L_z + c_lb L_lb + c_d L_d + c_g L_g after a forward.
  double objective() {
    if (forward() != Status::ok) return NAN;
    return dot(topk_weight, dweight) + c_z * losses[0] + c_lb * losses[1] + c_d * losses[2] + c_g * losses[3];
  }

  /// True when some token's K-th and (K+1)-th largest probabilities differ, but by no more
  /// than `gap` (relative): a finite difference or a float evaluation there could flip the
  /// selection (a kink, not a bug).
  bool near_tie(double gap = 1e-4) const {
    const int E = dims.experts, K = dims.top_k;
    if (K >= E) return false;
    for (int64_t t = 0; t < dims.tokens; ++t) {
      std::vector<double> row(probs.begin() + t * E, probs.begin() + (t + 1) * E);
      std::sort(row.begin(), row.end(), std::greater<double>());
      const double d = row[K - 1] - row[K];  // exact ties (equal logits in one group) are fine:
      if (d > 0 && d <= gap * row[K - 1]) return true;  // float and double break them alike

    }
    return false;
  }

  router::GateBackwardParams<double, double> backward_params(std::vector<double>& dlogits, std::vector<double>& da) {
    router::GateBackwardParams<double, double> b{};
    b.fwd = forward_params();
    b.dweight = dweight.data();
    b.c_z = c_z;
    b.c_lb = c_lb;
    b.c_d = c_d;
    b.c_g = c_g;
    b.dlogits = dlogits.data();
    b.ddifficulty_logit = head ? da.data() : nullptr;
    return b;
  }
};

/// A naive forward straight from the definition (no closed forms, no shared helpers).
struct NaiveGate {
  std::vector<double> probs, lse, entropy, difficulty;
  double losses[4] = {0, 0, 0, 0};

  explicit NaiveGate(const GateProblem& g) {
    const int64_t T = g.dims.tokens;
    const int E = g.dims.experts, Em = g.dims.mlstm_experts, K = g.dims.top_k;
    probs.resize(T * E);
    lse.resize(T);
    entropy.resize(T);
    difficulty.resize(T);
    std::vector<double> load(E, 0.0);
    double pm = 0, ps = 0;
    for (int64_t t = 0; t < T; ++t) {
      const double d = g.head ? 1.0 / (1.0 + std::exp(-g.difficulty_logit[t])) : 0.0;
      double s = 0;
      if (g.head) switch (g.modulation) {
          case router::Modulation::standard: s = g.gamma * d; break;
          case router::Modulation::proportional: s = g.gamma * std::max(d - g.tau, 0.0); break;
          case router::Modulation::masked: s = d > g.tau ? g.gamma * d : 0.0; break;
          default: break;
        }
      std::vector<double> zc(E), q(E);
      double sum_c = 0, sum_q = 0;
      for (int e = 0; e < E; ++e) {
        const double z = g.logits[t * E + e];
        zc[e] = e < Em ? z + s : z - s;
        sum_c += std::exp(zc[e]);
        sum_q += std::exp(z);
      }
      lse[t] = std::log(sum_c);
      double h = 0;
      for (int e = 0; e < E; ++e) {
        probs[t * E + e] = std::exp(zc[e]) / sum_c;
        q[e] = std::exp(g.logits[t * E + e]) / sum_q;
        h -= q[e] * std::log(std::max(q[e], 1e-6));
        (e < Em ? pm : ps) += probs[t * E + e];
      }
      entropy[t] = E > 1 ? h / std::log(double(E)) : 0.0;
      difficulty[t] = d;
      std::vector<int> order(E);
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(),
                       [&](int a, int b) { return probs[t * E + a] > probs[t * E + b]; });
      for (int k = 0; k < K; ++k) load[order[k]] += probs[t * E + order[k]];
      losses[0] += lse[t] * lse[t] / double(T);
      if (g.head) losses[2] += (d - entropy[t]) * (d - entropy[t]) / double(T);
    }
    for (int e = 0; e < E; ++e) {
      const double u = load[e] / double(T * K);
      losses[1] += double(E) * (u - 1.0 / E) * (u - 1.0 / E) / double(E);
    }
    pm /= double(T);
    ps /= double(T);
    losses[3] = pm * std::log(2 * pm + 1e-8) + ps * std::log(2 * ps + 1e-8);
  }
};

/// Central differences of f at the listed coordinates of x (x restored afterwards).
inline std::vector<double> finite_difference_at(const std::function<double()>& f, std::vector<double>& x,
                                                const std::vector<size_t>& coords, double h = 1e-6) {
  std::vector<double> g(coords.size());
  for (size_t i = 0; i < coords.size(); ++i) {
    const double saved = x[coords[i]];
    x[coords[i]] = saved + h;
    const double fp = f();
    x[coords[i]] = saved - h;
    const double fm = f();
    x[coords[i]] = saved;
    g[i] = (fp - fm) / (2 * h);
  }
  return g;
}

/// All coordinates when n <= max_count, else a random subset of max_count.
inline std::vector<size_t> sample_coords(Rng& rng, size_t n, size_t max_count) {
  std::vector<size_t> c(n);
  std::iota(c.begin(), c.end(), size_t(0));
  if (n <= max_count) return c;
  std::shuffle(c.begin(), c.end(), rng.engine());
  c.resize(max_count);
  return c;
}

/// rel_error of the analytic gradient `grad` of f against central differences at up to
/// max_coords random coordinates of x (x restored afterwards).
inline double sampled_gradient_error(Rng& rng, const std::function<double()>& f, std::vector<double>& x,
                                     const std::vector<double>& grad, size_t max_coords) {
  const auto coords = sample_coords(rng, x.size(), max_coords);
  const auto fd = finite_difference_at(f, x, coords);
  std::vector<double> an(coords.size());
  for (size_t i = 0; i < coords.size(); ++i) an[i] = grad[coords[i]];
  return rel_error(an, fd);
}

}  // namespace moxe::test
