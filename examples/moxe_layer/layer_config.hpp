// The configuration of one MoxE layer (arXiv 2505.01459), with the paper's defaults for the
// loss coefficients and the router. The sizes default to a tiny layer that a host reference
// in double runs in microseconds; a real layer changes only the numbers.
#pragma once

#include <cstdint>

#include "moxe/core/status.hpp"
#include "moxe/router/params.hpp"

namespace moxe_layer {

/// How an expert sees the tokens routed to it.
enum class ExpertMode {
  /// The paper's code: each routed token is a length-1 sequence from a zero state.
  per_token,
  /// Each expert runs its recurrence over the tokens routed to it, in token order, one
  /// recurrence per (expert, batch sequence): the mLSTM experts use the reference's
  /// variable-length segments over the permuted buffer, the sLSTM experts a padded batch.
  stateful,
};

inline const char* to_string(ExpertMode m) {
  return m == ExpertMode::per_token ? "per_token" : "stateful";
}

/// The cell of the always-on shared experts (LayerConfig::shared_experts).
enum class SharedExpertKind { mlstm, slstm };

inline const char* to_string(SharedExpertKind k) { return k == SharedExpertKind::mlstm ? "mlstm" : "slstm"; }

struct LayerConfig {
  // ---- sizes -------------------------------------------------------------------------
  int64_t batch = 2;
  int64_t seq_len = 5;
  int64_t d_model = 8;
  int64_t heads = 2;              ///< heads of every xLSTM cell (mixer and experts)
  int64_t mlstm_proj_factor = 2;  ///< the mixer's mLSTM block works at width factor * d_model
  int64_t ffn_hidden = 16;        ///< the gated FFN after the mixer's sLSTM (xLSTM: ~4/3 d_model)
  int64_t conv_width = 4;         ///< causal depthwise conv of both mixer blocks

  // ---- experts and router ------------------------------------------------------------
  int experts = 4;  ///< E: experts [0, E/2) are mLSTM experts, [E/2, E) sLSTM experts
  int top_k = 2;
  ExpertMode expert_mode = ExpertMode::per_token;
  /// Shared experts (DeepSeekMoE): always-on expert blocks beside the routed ones, the same
  /// residual blocks as the routed experts of `shared_expert_kind`, applied to every token
  /// with weight 1 (not routed, not in the gate or its losses):
  ///   y = x3 + combine + sum_s (f_s(u) - u)
  /// i.e. each adds its residual delta. The expert mode applies to them too (stateful: one
  /// recurrence per batch sequence over all its tokens).
  int shared_experts = 0;
  SharedExpertKind shared_expert_kind = SharedExpertKind::mlstm;
  moxe::router::Modulation modulation = moxe::router::Modulation::standard;
  double gamma = 1.0;  ///< modulation strength
  double tau = 0.5;    ///< difficulty threshold (proportional and masked modulation)

  // ---- auxiliary losses: the paper's coefficients -------------------------------------
  double c_z = 0.001;  ///< router z-loss
  double c_lb = 0.01;  ///< load balance
  double c_d = 0.01;   ///< difficulty (d_t against the router entropy)
  double c_g = 0.01;   ///< group balance (mLSTM vs sLSTM experts)

  double norm_eps = 1e-5;  ///< LayerNorm and multi-head norm

  int64_t tokens() const { return batch * seq_len; }
  int mlstm_experts() const { return experts / 2; }
  int shared_mlstm_experts() const { return shared_expert_kind == SharedExpertKind::mlstm ? shared_experts : 0; }
  int shared_slstm_experts() const { return shared_experts - shared_mlstm_experts(); }
  int64_t head_dim() const { return d_model / heads; }
  int64_t inner() const { return mlstm_proj_factor * d_model; }  ///< mixer mLSTM width
  int64_t inner_head_dim() const { return inner() / heads; }

  moxe::Status validate() const {
    MOXE_REQUIRE(batch > 0 && seq_len > 0 && d_model > 0 && heads > 0 && d_model % heads == 0);
    MOXE_REQUIRE(mlstm_proj_factor > 0 && ffn_hidden > 0 && conv_width > 0);
    MOXE_REQUIRE(experts >= 2 && experts % 2 == 0 && top_k >= 1 && top_k <= experts);
    MOXE_REQUIRE(shared_experts >= 0);
    MOXE_REQUIRE(norm_eps > 0.0);
    return moxe::Status::ok;
  }
};

/// The benchmark layer (examples/moxe_layer --bench, benchmarks/compare_torch.py): d_model
/// 1024, 8 heads (head dim 128; the mixer's mLSTM at 2048 = 8 x 256), ~4/3 d_model FFN as in
/// xLSTM, E = 8 (4 mLSTM + 4 sLSTM experts), top-2, B = 4, S = 4096 (16384 tokens).
inline LayerConfig benchmark_config() {
  LayerConfig c;
  c.batch = 4;
  c.seq_len = 4096;
  c.d_model = 1024;
  c.heads = 8;
  c.ffn_hidden = 1344;
  c.experts = 8;
  c.top_k = 2;
  return c;
}

}  // namespace moxe_layer
