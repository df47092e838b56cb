// One MoxE layer (arXiv 2505.01459) on the host in double, forward and backward, composed of
// the moxe host references (mlstm, slstm, router, dispatch) and the small ops of
// ops_reference.hpp. It is the executable description of the layer: read it top to bottom.
//
// Input x [B, S, D] (rows t = b * S + s, T = B * S tokens).
//
// 1. Sequence mixer, xLSTM style (pre-norm residual blocks):
//    sLSTM block   xn = LN(x); c = SiLU(conv4(xn)); wx = [W_if c ; W_zo xn] (gates i, f from
//                  the conv, z, o from the normed input); h = sLSTM(wx); x1 = x + MHNorm(h)
//                  then a gated FFN: x2 = x1 + W_down (GELU(g) * a), [g ; a] = W_up LN(x1)
//    mLSTM block   xn = LN(x2); [xm ; z] = W_up xn; xc = SiLU(conv4(xm));
//                  q = W_q xc, k = W_k xc, v = W_v xm; [i ; f] = W_g [q ; k ; v] + b_g
//                  (the gates read the concatenation, as in xLSTM's mLSTMLayer);
//                  h = mLSTM(q, k, v, i, f); x3 = x2 + W_down ((MHNorm(h) + skip * xc) * SiLU(z))
//    u = LN(x3): the normed input of the mixture.
// 2. Entropy-aware gate: one linear u -> [T, E + 1] (columns 0..E-1 the router logits z,
//    column E the difficulty pre-activation a), then router::reference::gate_forward: probs,
//    top-k indices and renormalised weights, and the four losses L_z, L_lb, L_d, L_g.
// 3. Experts: dispatch::reference::routing_map + permute give the expert-major buffer xp;
//    experts [0, E/2) are mLSTM blocks, [E/2, E) sLSTM blocks, each residual:
//       mLSTM expert  ye = xe + W_down MHNorm(mLSTM(W_qkv LN(xe), W_g LN(xe) + b_g))
//       sLSTM expert  ye = xe + W_down MHNorm(sLSTM(W_x LN(xe)))
//    on its segment of rows (ExpertMode: per token from a zero state, or stateful over the
//    expert's tokens of each sequence in order); dispatch::reference::unpermute combines the
//    rows with the top-k weights.
// 4. y = x3 + combine: the mixture is a residual branch of the layer's residual stream x3,
//    as the feed-forward of a pre-norm transformer block (the experts are residual on u, so
//    combine = u + sum_k w_k f_k(u), since the weights sum to one).
// 5. Shared experts (LayerConfig::shared_experts, DeepSeekMoE): always-on expert blocks of
//    one kind (the same residual blocks as the routed experts) on every token's u, weight 1,
//    not routed: each adds its residual delta,
//       y = x3 + combine + sum_s (f_s(u) - u).
//    They run on all T rows as the routed experts run on theirs: per token from a zero
//    state, or stateful over each batch sequence in order (CellGrid::identity(B, S)).
//
// Backward: the exact gradient of J = sum(y * dy) + c_z L_z + c_lb L_lb + c_d L_d + c_g L_g
// with respect to x and every weight, chaining the families' reference backwards
// (unpermute_backward's dweight feeds gate_backward) and the ops' backwards. The loss is
// piecewise smooth: the top-k selection is constant between ties.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <functional>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "layer_config.hpp"
#include "moxe/core/status.hpp"
#include "moxe/dispatch/reference.hpp"
#include "moxe/mlstm/reference.hpp"
#include "moxe/router/reference.hpp"
#include "moxe/slstm/reference.hpp"
#include "ops_reference.hpp"

namespace moxe_layer {

using ops::Vec;
using moxe::Status;

/// Size and random initialisation of one weight tensor: normal(mean, stddev).
struct TensorSpec {
  int64_t size;
  double mean, stddev;
};

namespace spec {
inline TensorSpec linear(int64_t out, int64_t in) { return {out * in, 0.0, 1.0 / std::sqrt(double(in))}; }
inline TensorSpec bias(int64_t n) { return {n, 0.0, 0.1}; }
inline TensorSpec norm_weight(int64_t n) { return {n, 1.0, 0.1}; }
}  // namespace spec

// =============================================================================================
// Weights. Each struct lists its tensors once, in visit(); allocation, initialisation, the
// gradient buffers and the tests' finite differences all walk that list.
// =============================================================================================

struct SlstmBlockWeights {
  Vec norm_w, norm_b;          // [D]
  Vec conv_w, conv_b;          // [D, W], [D]
  Vec w_if;                    // [2D, D]: i, f gate inputs from the conv output
  Vec w_zo;                    // [2D, D]: z, o gate inputs from the normed input
  Vec r, bias;                 // [NH, 4, DH, DH], [4, NH, DH]: the cell's own
  Vec out_norm_w;              // [D] multi-head norm
  Vec ffn_norm_w, ffn_norm_b;  // [D]
  Vec ffn_up_w, ffn_up_b;      // [2F, D], [2F]: the GELU gate, then the up branch
  Vec ffn_down_w, ffn_down_b;  // [D, F], [D]

  template <class F>
  void visit(const LayerConfig& c, const std::string& p, F&& f) {
    const int64_t D = c.d_model, NH = c.heads, DH = c.head_dim(), F2 = 2 * c.ffn_hidden;
    f(p + "norm_w", norm_w, spec::norm_weight(D));
    f(p + "norm_b", norm_b, spec::bias(D));
    f(p + "conv_w", conv_w, TensorSpec{D * c.conv_width, 0.0, 1.0 / std::sqrt(double(c.conv_width))});
    f(p + "conv_b", conv_b, spec::bias(D));
    f(p + "w_if", w_if, spec::linear(2 * D, D));
    f(p + "w_zo", w_zo, spec::linear(2 * D, D));
    f(p + "r", r, TensorSpec{NH * 4 * DH * DH, 0.0, 1.0 / std::sqrt(double(DH))});
    f(p + "bias", bias, TensorSpec{4 * D, 0.0, 0.5});
    f(p + "out_norm_w", out_norm_w, spec::norm_weight(D));
    f(p + "ffn_norm_w", ffn_norm_w, spec::norm_weight(D));
    f(p + "ffn_norm_b", ffn_norm_b, spec::bias(D));
    f(p + "ffn_up_w", ffn_up_w, spec::linear(F2, D));
    f(p + "ffn_up_b", ffn_up_b, spec::bias(F2));
    f(p + "ffn_down_w", ffn_down_w, spec::linear(D, c.ffn_hidden));
    f(p + "ffn_down_b", ffn_down_b, spec::bias(D));
  }
};

struct MlstmBlockWeights {
  Vec norm_w, norm_b;     // [D]
  Vec w_up, b_up;         // [2Di, D], [2Di]: the mLSTM branch, then the output-gate branch
  Vec conv_w, conv_b;     // [Di, W], [Di]
  Vec w_q, w_k, w_v;      // [Di, Di]: q, k from the conv output, v from the branch
  Vec w_gates, b_gates;   // [2NH, 3Di], [2NH]: input gates, then forget gates
  Vec out_norm_w;         // [Di] multi-head norm
  Vec skip;               // [Di] learnable skip of the conv output
  Vec w_down, b_down;     // [D, Di], [D]

  template <class F>
  void visit(const LayerConfig& c, const std::string& p, F&& f) {
    const int64_t D = c.d_model, Di = c.inner(), NH = c.heads;
    f(p + "norm_w", norm_w, spec::norm_weight(D));
    f(p + "norm_b", norm_b, spec::bias(D));
    f(p + "w_up", w_up, spec::linear(2 * Di, D));
    f(p + "b_up", b_up, spec::bias(2 * Di));
    f(p + "conv_w", conv_w, TensorSpec{Di * c.conv_width, 0.0, 1.0 / std::sqrt(double(c.conv_width))});
    f(p + "conv_b", conv_b, spec::bias(Di));
    f(p + "w_q", w_q, spec::linear(Di, Di));
    f(p + "w_k", w_k, spec::linear(Di, Di));
    f(p + "w_v", w_v, spec::linear(Di, Di));
    f(p + "w_gates", w_gates, spec::linear(2 * NH, 3 * Di));
    f(p + "b_gates", b_gates, TensorSpec{2 * NH, 0.5, 1.0});
    f(p + "out_norm_w", out_norm_w, spec::norm_weight(Di));
    f(p + "skip", skip, spec::norm_weight(Di));
    f(p + "w_down", w_down, spec::linear(D, Di));
    f(p + "b_down", b_down, spec::bias(D));
  }
};

struct MlstmExpertWeights {
  Vec norm_w, norm_b;    // [D]
  Vec w_qkv;             // [3D, D]: q, k, v from the normed input
  Vec w_gates, b_gates;  // [2NH, D], [2NH]: input gates, then forget gates
  Vec out_norm_w;        // [D]
  Vec w_down, b_down;    // [D, D], [D]

  template <class F>
  void visit(const LayerConfig& c, const std::string& p, F&& f) {
    const int64_t D = c.d_model, NH = c.heads;
    f(p + "norm_w", norm_w, spec::norm_weight(D));
    f(p + "norm_b", norm_b, spec::bias(D));
    f(p + "w_qkv", w_qkv, spec::linear(3 * D, D));
    f(p + "w_gates", w_gates, spec::linear(2 * NH, D));
    f(p + "b_gates", b_gates, TensorSpec{2 * NH, 0.5, 1.0});
    f(p + "out_norm_w", out_norm_w, spec::norm_weight(D));
    f(p + "w_down", w_down, spec::linear(D, D));
    f(p + "b_down", b_down, spec::bias(D));
  }
};

struct SlstmExpertWeights {
  Vec norm_w, norm_b;  // [D]
  Vec w_x;             // [4D, D]: i, f, z, o gate inputs from the normed input
  Vec r, bias;         // [NH, 4, DH, DH], [4, NH, DH]
  Vec out_norm_w;      // [D]
  Vec w_down, b_down;  // [D, D], [D]

  template <class F>
  void visit(const LayerConfig& c, const std::string& p, F&& f) {
    const int64_t D = c.d_model, NH = c.heads, DH = c.head_dim();
    f(p + "norm_w", norm_w, spec::norm_weight(D));
    f(p + "norm_b", norm_b, spec::bias(D));
    f(p + "w_x", w_x, spec::linear(4 * D, D));
    f(p + "r", r, TensorSpec{NH * 4 * DH * DH, 0.0, 1.0 / std::sqrt(double(DH))});
    f(p + "bias", bias, TensorSpec{4 * D, 0.0, 0.5});
    f(p + "out_norm_w", out_norm_w, spec::norm_weight(D));
    f(p + "w_down", w_down, spec::linear(D, D));
    f(p + "b_down", b_down, spec::bias(D));
  }
};

struct LayerWeights {
  SlstmBlockWeights slstm_block;
  MlstmBlockWeights mlstm_block;
  Vec post_norm_w, post_norm_b;  // [D]: u = LN(x3)
  Vec w_router, b_router;        // [E + 1, D], [E + 1]: E router logits, then difficulty
  std::vector<MlstmExpertWeights> mlstm_experts;  // E / 2
  std::vector<SlstmExpertWeights> slstm_experts;  // E / 2
  std::vector<MlstmExpertWeights> shared_mlstm_experts;  // shared_experts when their kind is mLSTM
  std::vector<SlstmExpertWeights> shared_slstm_experts;  // shared_experts when their kind is sLSTM

  /// f(name, tensor, spec) for every weight tensor, in a fixed order.
  template <class F>
  void visit(const LayerConfig& c, F&& f) {
    mlstm_experts.resize(c.mlstm_experts());
    slstm_experts.resize(c.experts - c.mlstm_experts());
    shared_mlstm_experts.resize(c.shared_mlstm_experts());
    shared_slstm_experts.resize(c.shared_slstm_experts());
    slstm_block.visit(c, "slstm_block.", f);
    mlstm_block.visit(c, "mlstm_block.", f);
    f("post_norm_w", post_norm_w, spec::norm_weight(c.d_model));
    f("post_norm_b", post_norm_b, spec::bias(c.d_model));
    f("w_router", w_router, spec::linear(c.experts + 1, c.d_model));
    f("b_router", b_router, spec::bias(c.experts + 1));
    for (std::size_t e = 0; e < mlstm_experts.size(); ++e)
      mlstm_experts[e].visit(c, "mlstm_expert" + std::to_string(e) + ".", f);
    for (std::size_t e = 0; e < slstm_experts.size(); ++e)
      slstm_experts[e].visit(c, "slstm_expert" + std::to_string(e) + ".", f);
    for (std::size_t e = 0; e < shared_mlstm_experts.size(); ++e)
      shared_mlstm_experts[e].visit(c, "shared_mlstm_expert" + std::to_string(e) + ".", f);
    for (std::size_t e = 0; e < shared_slstm_experts.size(); ++e)
      shared_slstm_experts[e].visit(c, "shared_slstm_expert" + std::to_string(e) + ".", f);
  }

  /// Whether every tensor has the size `c` asks for (forward and backward check it).
  bool has_sizes(const LayerConfig& c) const {
    if (mlstm_experts.size() != std::size_t(c.mlstm_experts()) ||
        slstm_experts.size() != std::size_t(c.experts - c.mlstm_experts()) ||
        shared_mlstm_experts.size() != std::size_t(c.shared_mlstm_experts()) ||
        shared_slstm_experts.size() != std::size_t(c.shared_slstm_experts()))
      return false;
    bool ok = true;  // visit() only reads here: the expert counts already match
    const_cast<LayerWeights*>(this)->visit(
        c, [&ok](const std::string&, Vec& v, const TensorSpec& s) { ok = ok && int64_t(v.size()) == s.size; });
    return ok;
  }

  /// All tensors at their sizes, filled with zeros (the layout of the gradients).
  static LayerWeights zeros(const LayerConfig& c) {
    LayerWeights w;
    w.visit(c, [](const std::string&, Vec& v, const TensorSpec& s) { v.assign(s.size, 0.0); });
    return w;
  }

  /// All tensors at their sizes, drawn from their TensorSpec.
  static LayerWeights random(const LayerConfig& c, std::mt19937_64& gen) {
    LayerWeights w;
    w.visit(c, [&gen](const std::string&, Vec& v, const TensorSpec& s) {
      std::normal_distribution<double> dist(s.mean, s.stddev);
      v.resize(s.size);
      for (double& x : v) x = dist(gen);
    });
    return w;
  }
};

struct NamedTensor {
  std::string name;
  Vec* value;
};

/// The weight tensors by name, in visit() order (pointers into `w`).
inline std::vector<NamedTensor> named_tensors(const LayerConfig& c, LayerWeights& w) {
  std::vector<NamedTensor> out;
  w.visit(c, [&out](const std::string& name, Vec& v, const TensorSpec&) { out.push_back({name, &v}); });
  return out;
}

// =============================================================================================
// Cell layouts. The projections work on token rows [n, NH * DH]; the cells want
// mLSTM [batch, NH, seq, DH] and sLSTM [seq, batch, NH, DH]. A CellGrid says where each row
// sits in the cell's (batch, seq) grid.
// =============================================================================================

struct CellGrid {
  int64_t batch = 0, seq_len = 0;
  std::vector<int64_t> cell_of_row;      // [n]: b * seq_len + s
  std::vector<int64_t> segment_offsets;  // mLSTM varlen segments (batch 1); empty: none

  int64_t cells() const { return batch * seq_len; }

  /// n rows that are n independent sequences of one token (also: a [B, S] batch when
  /// batch/seq_len are set to B/S, since then cell = row).
  static CellGrid identity(int64_t batch, int64_t seq_len) {
    CellGrid g;
    g.batch = batch;
    g.seq_len = seq_len;
    g.cell_of_row.resize(batch * seq_len);
    for (int64_t r = 0; r < batch * seq_len; ++r) g.cell_of_row[r] = r;
    return g;
  }
};

/// rows[r, col0 + h * dh + d] -> cell[b, h, s, d], for every row (the mLSTM grids cover
/// every cell exactly once).
inline void rows_to_mlstm(const double* rows, int64_t stride, int64_t col0, const CellGrid& g,
                          int64_t heads, int64_t dh, double* cell) {
  for (std::size_t r = 0; r < g.cell_of_row.size(); ++r) {
    const int64_t b = g.cell_of_row[r] / g.seq_len, s = g.cell_of_row[r] % g.seq_len;
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t d = 0; d < dh; ++d)
        cell[((b * heads + h) * g.seq_len + s) * dh + d] = rows[int64_t(r) * stride + col0 + h * dh + d];
  }
}

/// The inverse of rows_to_mlstm: cell[b, h, s, d] -> rows[r, col0 + h * dh + d].
inline void mlstm_to_rows(const double* cell, const CellGrid& g, int64_t heads, int64_t dh,
                          double* rows, int64_t stride, int64_t col0) {
  for (std::size_t r = 0; r < g.cell_of_row.size(); ++r) {
    const int64_t b = g.cell_of_row[r] / g.seq_len, s = g.cell_of_row[r] % g.seq_len;
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t d = 0; d < dh; ++d)
        rows[int64_t(r) * stride + col0 + h * dh + d] = cell[((b * heads + h) * g.seq_len + s) * dh + d];
  }
}

/// rows[r, :width] -> cell[s, b, :width]; cells no row maps to (padding) are zero.
inline void rows_to_slstm(const double* rows, int64_t width, const CellGrid& g, double* cell) {
  for (int64_t i = 0; i < g.cells() * width; ++i) cell[i] = 0.0;
  for (std::size_t r = 0; r < g.cell_of_row.size(); ++r) {
    const int64_t b = g.cell_of_row[r] / g.seq_len, s = g.cell_of_row[r] % g.seq_len;
    for (int64_t j = 0; j < width; ++j) cell[(s * g.batch + b) * width + j] = rows[int64_t(r) * width + j];
  }
}

/// cell[s, b, :width] -> rows[r, :width] (padding cells are dropped).
inline void slstm_to_rows(const double* cell, int64_t width, const CellGrid& g, double* rows) {
  for (std::size_t r = 0; r < g.cell_of_row.size(); ++r) {
    const int64_t b = g.cell_of_row[r] / g.seq_len, s = g.cell_of_row[r] % g.seq_len;
    for (int64_t j = 0; j < width; ++j) rows[int64_t(r) * width + j] = cell[(s * g.batch + b) * width + j];
  }
}

/// The grid of an expert's rows. `sequence_of_row[r]` is the batch sequence of the token
/// behind row r; rows are in token order (dispatch is token-stable).
///   per_token:          n sequences of length 1 (zero state each).
///   stateful, mLSTM:    batch 1, seq n, one varlen segment per batch sequence.
///   stateful, sLSTM:    batch B, seq = the longest run, each sequence's rows in order,
///                       padded at the end (padding never reaches a valid row: causal).
inline CellGrid expert_grid(ExpertMode mode, bool mlstm, const std::vector<int64_t>& sequence_of_row,
                            int64_t batch) {
  const int64_t n = int64_t(sequence_of_row.size());
  if (mode == ExpertMode::per_token) return CellGrid::identity(n, 1);
  std::vector<int64_t> offsets(batch + 1, 0);
  for (int64_t b : sequence_of_row) ++offsets[b + 1];
  int64_t longest = 0;
  for (int64_t b = 0; b < batch; ++b) {
    longest = std::max(longest, offsets[b + 1]);
    offsets[b + 1] += offsets[b];
  }
  if (mlstm) {
    CellGrid g = CellGrid::identity(1, n);
    g.segment_offsets = offsets;
    return g;
  }
  CellGrid g;
  g.batch = batch;
  g.seq_len = longest;
  g.cell_of_row.resize(n);
  for (int64_t r = 0; r < n; ++r) {
    const int64_t b = sequence_of_row[r];
    g.cell_of_row[r] = b * longest + (r - offsets[b]);
  }
  return g;
}

// ---- the two cells on token rows ----------------------------------------------------------

/// The mLSTM cell's tensors in its own layout, kept for the backward.
struct MlstmCellCache {
  CellGrid grid;
  int64_t heads = 0, dh = 0;
  Vec q, k, v, igate, fgate, h;  // [batch, NH, seq, dh] and [batch, NH, seq]

  moxe::mlstm::ForwardParams<double, double> params() const {
    moxe::mlstm::ForwardParams<double, double> p{};
    p.dims = moxe::mlstm::Dims{grid.batch, heads, grid.seq_len, dh, dh};
    p.q = q.data();
    p.k = k.data();
    p.v = v.data();
    p.igate = igate.data();
    p.fgate = fgate.data();
    p.h = const_cast<double*>(h.data());  // written by the forward only
    if (!grid.segment_offsets.empty()) {
      p.segment_offsets = grid.segment_offsets.data();
      p.num_segments = int64_t(grid.segment_offsets.size()) - 1;
    }
    return p;
  }
};

/// h_rows [n, NH * dh] = mLSTM(q, k, v from qkv_rows [n, qkv_stride] at columns q0, k0, v0;
/// igate, fgate from gate_rows [n, 2NH]: input gates then forget gates).
inline Status mlstm_rows_forward(const double* qkv_rows, int64_t qkv_stride, int64_t q0, int64_t k0,
                                 int64_t v0, const double* gate_rows, CellGrid grid, int64_t heads,
                                 int64_t dh, MlstmCellCache& cc, double* h_rows) {
  cc.grid = std::move(grid);
  cc.heads = heads;
  cc.dh = dh;
  const int64_t cells = cc.grid.cells();
  cc.q.assign(cells * heads * dh, 0.0);
  cc.k.assign(cells * heads * dh, 0.0);
  cc.v.assign(cells * heads * dh, 0.0);
  cc.igate.assign(cells * heads, 0.0);
  cc.fgate.assign(cells * heads, 0.0);
  cc.h.assign(cells * heads * dh, 0.0);
  rows_to_mlstm(qkv_rows, qkv_stride, q0, cc.grid, heads, dh, cc.q.data());
  rows_to_mlstm(qkv_rows, qkv_stride, k0, cc.grid, heads, dh, cc.k.data());
  rows_to_mlstm(qkv_rows, qkv_stride, v0, cc.grid, heads, dh, cc.v.data());
  rows_to_mlstm(gate_rows, 2 * heads, 0, cc.grid, heads, 1, cc.igate.data());
  rows_to_mlstm(gate_rows, 2 * heads, heads, cc.grid, heads, 1, cc.fgate.data());
  MOXE_RETURN_IF_ERROR(moxe::mlstm::reference::forward(cc.params()));
  mlstm_to_rows(cc.h.data(), cc.grid, heads, dh, h_rows, heads * dh, 0);
  return Status::ok;
}

/// dqkv_rows (+=, same columns as the forward) and dgate_rows (+=) from dh_rows [n, NH*dh].
inline Status mlstm_rows_backward(const MlstmCellCache& cc, const double* dh_rows, double* dqkv_rows,
                                  int64_t qkv_stride, int64_t q0, int64_t k0, int64_t v0,
                                  double* dgate_rows) {
  const int64_t n = int64_t(cc.grid.cell_of_row.size()), H = cc.heads, dh = cc.dh;
  const int64_t cells = cc.grid.cells();
  Vec dh_cell(cells * H * dh), dq(dh_cell.size()), dk(dh_cell.size()), dv(dh_cell.size());
  Vec dig(cells * H), dfg(cells * H);
  rows_to_mlstm(dh_rows, H * dh, 0, cc.grid, H, dh, dh_cell.data());
  moxe::mlstm::BackwardParams<double, double> p{};
  p.fwd = cc.params();
  p.dh = dh_cell.data();
  p.dq = dq.data();
  p.dk = dk.data();
  p.dv = dv.data();
  p.digate = dig.data();
  p.dfgate = dfg.data();
  MOXE_RETURN_IF_ERROR(moxe::mlstm::reference::backward(p));
  Vec rows(n * H * dh), grows(n * 2 * H, 0.0);
  const std::pair<const Vec*, int64_t> parts[3] = {{&dq, q0}, {&dk, k0}, {&dv, v0}};
  for (const auto& part : parts) {
    mlstm_to_rows(part.first->data(), cc.grid, H, dh, rows.data(), H * dh, 0);
    ops::add_columns(rows.data(), n, H * dh, qkv_stride, part.second, dqkv_rows);
  }
  mlstm_to_rows(dig.data(), cc.grid, H, 1, grows.data(), 2 * H, 0);
  mlstm_to_rows(dfg.data(), cc.grid, H, 1, grows.data(), 2 * H, H);
  for (int64_t i = 0; i < n * 2 * H; ++i) dgate_rows[i] += grows[i];
  return Status::ok;
}

struct SlstmCellCache {
  CellGrid grid;
  int64_t heads = 0, dh = 0;
  Vec wx, y;  // [seq, batch, 4, NH, dh], [seq, batch, NH, dh]
  const double* r = nullptr;
  const double* bias = nullptr;

  moxe::slstm::ForwardParams<double, double> params() const {
    moxe::slstm::ForwardParams<double, double> p{};
    p.dims = moxe::slstm::Dims{grid.seq_len, grid.batch, heads, dh};
    p.wx = wx.data();
    p.r = r;
    p.bias = bias;
    p.y = const_cast<double*>(y.data());  // written by the forward only
    return p;
  }
};

/// y_rows [n, NH*dh] = sLSTM(wx_rows [n, 4 * NH * dh] in the order (gate, head, unit)).
inline Status slstm_rows_forward(const double* wx_rows, const double* r, const double* bias, CellGrid grid,
                                 int64_t heads, int64_t dh, SlstmCellCache& cc, double* y_rows) {
  cc.grid = std::move(grid);
  cc.heads = heads;
  cc.dh = dh;
  cc.r = r;
  cc.bias = bias;
  const int64_t H = heads * dh;
  cc.wx.assign(cc.grid.cells() * 4 * H, 0.0);
  cc.y.assign(cc.grid.cells() * H, 0.0);
  rows_to_slstm(wx_rows, 4 * H, cc.grid, cc.wx.data());
  MOXE_RETURN_IF_ERROR(moxe::slstm::reference::forward(cc.params()));
  slstm_to_rows(cc.y.data(), H, cc.grid, y_rows);
  return Status::ok;
}

/// dwx_rows (+=), dr (+=), dbias (+=) from dy_rows [n, NH*dh].
inline Status slstm_rows_backward(const SlstmCellCache& cc, const double* dy_rows, double* dwx_rows,
                                  double* dr, double* dbias) {
  const int64_t n = int64_t(cc.grid.cell_of_row.size()), H = cc.heads * cc.dh;
  Vec dy_cell(cc.grid.cells() * H), dwx(cc.grid.cells() * 4 * H);
  Vec dr_cell(cc.heads * 4 * cc.dh * cc.dh), dbias_cell(4 * H);
  rows_to_slstm(dy_rows, H, cc.grid, dy_cell.data());
  moxe::slstm::BackwardParams<double, double> p{};
  p.fwd = cc.params();
  p.dy = dy_cell.data();
  p.dwx = dwx.data();
  p.dr = dr_cell.data();
  p.dbias = dbias_cell.data();
  MOXE_RETURN_IF_ERROR(moxe::slstm::reference::backward(p));
  Vec rows(n * 4 * H);
  slstm_to_rows(dwx.data(), 4 * H, cc.grid, rows.data());
  for (int64_t i = 0; i < n * 4 * H; ++i) dwx_rows[i] += rows[i];
  for (std::size_t i = 0; i < dr_cell.size(); ++i) dr[i] += dr_cell[i];
  for (std::size_t i = 0; i < dbias_cell.size(); ++i) dbias[i] += dbias_cell[i];
  return Status::ok;
}

// =============================================================================================
// The mixer's sLSTM block.
// =============================================================================================

struct SlstmBlockCache {
  Vec x;                 // [T, D] input
  ops::NormCache norm;
  Vec xn, conv, conv_act;  // [T, D]
  Vec wx_rows;           // [T, 4D]: i, f (from conv_act), z, o (from xn)
  SlstmCellCache cell;
  Vec h;                 // [T, D] cell output
  ops::NormCache out_norm;
  Vec hn, x1;            // [T, D]
  ops::NormCache ffn_norm;
  Vec fn;                // [T, D]
  Vec up;                // [T, 2F]
  Vec act;               // [T, F] GELU(gate) * up
  Vec out;               // [T, D] x2
};

inline Status slstm_block_forward(const LayerConfig& c, const SlstmBlockWeights& w, const Vec& x,
                                  SlstmBlockCache& k) {
  const int64_t B = c.batch, S = c.seq_len, T = c.tokens(), D = c.d_model, F = c.ffn_hidden;
  k.x = x;
  k.xn.assign(T * D, 0.0);
  ops::layer_norm_forward(x.data(), T, D, w.norm_w.data(), w.norm_b.data(), c.norm_eps, k.xn.data(), k.norm);
  k.conv.assign(T * D, 0.0);
  ops::causal_conv_forward(k.xn.data(), B, S, D, w.conv_w.data(), w.conv_b.data(), c.conv_width, k.conv.data());
  k.conv_act.assign(T * D, 0.0);
  ops::silu_forward(k.conv.data(), T * D, k.conv_act.data());
  Vec g_if(T * 2 * D), g_zo(T * 2 * D);
  ops::linear_forward(k.conv_act.data(), T, D, w.w_if.data(), nullptr, 2 * D, g_if.data());
  ops::linear_forward(k.xn.data(), T, D, w.w_zo.data(), nullptr, 2 * D, g_zo.data());
  k.wx_rows.assign(T * 4 * D, 0.0);
  ops::add_columns(g_if.data(), T, 2 * D, 4 * D, 0, k.wx_rows.data());
  ops::add_columns(g_zo.data(), T, 2 * D, 4 * D, 2 * D, k.wx_rows.data());
  k.h.assign(T * D, 0.0);
  MOXE_RETURN_IF_ERROR(slstm_rows_forward(k.wx_rows.data(), w.r.data(), w.bias.data(), CellGrid::identity(B, S),
                                          c.heads, c.head_dim(), k.cell, k.h.data()));
  k.hn.assign(T * D, 0.0);
  ops::group_norm_forward(k.h.data(), T, c.heads, c.head_dim(), w.out_norm_w.data(), nullptr, c.norm_eps,
                          k.hn.data(), k.out_norm);
  k.x1.resize(T * D);
  for (int64_t i = 0; i < T * D; ++i) k.x1[i] = x[i] + k.hn[i];

  // gated FFN
  k.fn.assign(T * D, 0.0);
  ops::layer_norm_forward(k.x1.data(), T, D, w.ffn_norm_w.data(), w.ffn_norm_b.data(), c.norm_eps, k.fn.data(),
                          k.ffn_norm);
  k.up.assign(T * 2 * F, 0.0);
  ops::linear_forward(k.fn.data(), T, D, w.ffn_up_w.data(), w.ffn_up_b.data(), 2 * F, k.up.data());
  k.act.assign(T * F, 0.0);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < F; ++j) k.act[t * F + j] = ops::gelu(k.up[t * 2 * F + j]) * k.up[t * 2 * F + F + j];
  k.out.assign(T * D, 0.0);
  ops::linear_forward(k.act.data(), T, F, w.ffn_down_w.data(), w.ffn_down_b.data(), D, k.out.data());
  for (int64_t i = 0; i < T * D; ++i) k.out[i] += k.x1[i];
  return Status::ok;
}

/// dx (+=) and the weight gradients (+=) from dout = dL/dx2.
inline Status slstm_block_backward(const LayerConfig& c, const SlstmBlockWeights& w, const SlstmBlockCache& k,
                                   const Vec& dout, Vec& dx, SlstmBlockWeights& g) {
  const int64_t B = c.batch, S = c.seq_len, T = c.tokens(), D = c.d_model, F = c.ffn_hidden;
  // x2 = x1 + down(act)
  Vec dx1 = dout, dact(T * F, 0.0);
  ops::linear_backward(k.act.data(), T, F, w.ffn_down_w.data(), D, dout.data(), dact.data(), g.ffn_down_w.data(),
                       g.ffn_down_b.data());
  Vec dup(T * 2 * F, 0.0);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < F; ++j) {
      const double gate = k.up[t * 2 * F + j], up = k.up[t * 2 * F + F + j], da = dact[t * F + j];
      dup[t * 2 * F + j] = da * up * ops::gelu_grad(gate);
      dup[t * 2 * F + F + j] = da * ops::gelu(gate);
    }
  Vec dfn(T * D, 0.0);
  ops::linear_backward(k.fn.data(), T, D, w.ffn_up_w.data(), 2 * F, dup.data(), dfn.data(), g.ffn_up_w.data(),
                       g.ffn_up_b.data());
  ops::layer_norm_backward(dfn.data(), T, D, w.ffn_norm_w.data(), k.ffn_norm, dx1.data(), g.ffn_norm_w.data(),
                           g.ffn_norm_b.data());

  // x1 = x + MHNorm(h)
  for (int64_t i = 0; i < T * D; ++i) dx[i] += dx1[i];
  Vec dh(T * D, 0.0);
  ops::group_norm_backward(dx1.data(), T, c.heads, c.head_dim(), w.out_norm_w.data(), k.out_norm, dh.data(),
                           g.out_norm_w.data(), nullptr);
  Vec dwx_rows(T * 4 * D, 0.0);
  MOXE_RETURN_IF_ERROR(slstm_rows_backward(k.cell, dh.data(), dwx_rows.data(), g.r.data(), g.bias.data()));
  Vec dg_if(T * 2 * D), dg_zo(T * 2 * D);
  ops::copy_columns(dwx_rows.data(), T, 4 * D, 0, 2 * D, dg_if.data());
  ops::copy_columns(dwx_rows.data(), T, 4 * D, 2 * D, 2 * D, dg_zo.data());
  Vec dxn(T * D, 0.0), dconv_act(T * D, 0.0), dconv(T * D, 0.0);
  ops::linear_backward(k.xn.data(), T, D, w.w_zo.data(), 2 * D, dg_zo.data(), dxn.data(), g.w_zo.data(), nullptr);
  ops::linear_backward(k.conv_act.data(), T, D, w.w_if.data(), 2 * D, dg_if.data(), dconv_act.data(),
                       g.w_if.data(), nullptr);
  ops::silu_backward(k.conv.data(), T * D, dconv_act.data(), dconv.data());
  ops::causal_conv_backward(k.xn.data(), B, S, D, w.conv_w.data(), c.conv_width, dconv.data(), dxn.data(),
                            g.conv_w.data(), g.conv_b.data());
  ops::layer_norm_backward(dxn.data(), T, D, w.norm_w.data(), k.norm, dx.data(), g.norm_w.data(), g.norm_b.data());
  return Status::ok;
}

// =============================================================================================
// The mixer's mLSTM block.
// =============================================================================================

struct MlstmBlockCache {
  Vec x;                   // [T, D]
  ops::NormCache norm;
  Vec xn;                  // [T, D]
  Vec up;                  // [T, 2Di]: xm, then z
  Vec xm, z, conv, xc;     // [T, Di]
  Vec qkv;                 // [T, 3Di]: q, k, v
  Vec gates;               // [T, 2NH]
  MlstmCellCache cell;
  Vec h;                   // [T, Di]
  ops::NormCache out_norm;
  Vec hn, hs, o;           // [T, Di]: normed, + skip, * SiLU(z)
  Vec out;                 // [T, D] x3
};

inline Status mlstm_block_forward(const LayerConfig& c, const MlstmBlockWeights& w, const Vec& x,
                                  MlstmBlockCache& k) {
  const int64_t B = c.batch, S = c.seq_len, T = c.tokens(), D = c.d_model, Di = c.inner(), NH = c.heads;
  k.x = x;
  k.xn.assign(T * D, 0.0);
  ops::layer_norm_forward(x.data(), T, D, w.norm_w.data(), w.norm_b.data(), c.norm_eps, k.xn.data(), k.norm);
  k.up.assign(T * 2 * Di, 0.0);
  ops::linear_forward(k.xn.data(), T, D, w.w_up.data(), w.b_up.data(), 2 * Di, k.up.data());
  k.xm.assign(T * Di, 0.0);
  k.z.assign(T * Di, 0.0);
  ops::copy_columns(k.up.data(), T, 2 * Di, 0, Di, k.xm.data());
  ops::copy_columns(k.up.data(), T, 2 * Di, Di, Di, k.z.data());
  k.conv.assign(T * Di, 0.0);
  ops::causal_conv_forward(k.xm.data(), B, S, Di, w.conv_w.data(), w.conv_b.data(), c.conv_width, k.conv.data());
  k.xc.assign(T * Di, 0.0);
  ops::silu_forward(k.conv.data(), T * Di, k.xc.data());
  Vec q(T * Di), kk(T * Di), v(T * Di);
  ops::linear_forward(k.xc.data(), T, Di, w.w_q.data(), nullptr, Di, q.data());
  ops::linear_forward(k.xc.data(), T, Di, w.w_k.data(), nullptr, Di, kk.data());
  ops::linear_forward(k.xm.data(), T, Di, w.w_v.data(), nullptr, Di, v.data());
  k.qkv.assign(T * 3 * Di, 0.0);
  ops::add_columns(q.data(), T, Di, 3 * Di, 0, k.qkv.data());
  ops::add_columns(kk.data(), T, Di, 3 * Di, Di, k.qkv.data());
  ops::add_columns(v.data(), T, Di, 3 * Di, 2 * Di, k.qkv.data());
  k.gates.assign(T * 2 * NH, 0.0);
  ops::linear_forward(k.qkv.data(), T, 3 * Di, w.w_gates.data(), w.b_gates.data(), 2 * NH, k.gates.data());
  k.h.assign(T * Di, 0.0);
  MOXE_RETURN_IF_ERROR(mlstm_rows_forward(k.qkv.data(), 3 * Di, 0, Di, 2 * Di, k.gates.data(),
                                          CellGrid::identity(B, S), NH, c.inner_head_dim(), k.cell, k.h.data()));
  k.hn.assign(T * Di, 0.0);
  ops::group_norm_forward(k.h.data(), T, NH, c.inner_head_dim(), w.out_norm_w.data(), nullptr, c.norm_eps,
                          k.hn.data(), k.out_norm);
  k.hs.resize(T * Di);
  k.o.resize(T * Di);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < Di; ++j) {
      const int64_t i = t * Di + j;
      k.hs[i] = k.hn[i] + w.skip[j] * k.xc[i];
      k.o[i] = k.hs[i] * ops::silu(k.z[i]);
    }
  k.out.assign(T * D, 0.0);
  ops::linear_forward(k.o.data(), T, Di, w.w_down.data(), w.b_down.data(), D, k.out.data());
  for (int64_t i = 0; i < T * D; ++i) k.out[i] += x[i];
  return Status::ok;
}

inline Status mlstm_block_backward(const LayerConfig& c, const MlstmBlockWeights& w, const MlstmBlockCache& k,
                                   const Vec& dout, Vec& dx, MlstmBlockWeights& g) {
  const int64_t B = c.batch, S = c.seq_len, T = c.tokens(), D = c.d_model, Di = c.inner(), NH = c.heads;
  for (int64_t i = 0; i < T * D; ++i) dx[i] += dout[i];  // residual
  Vec d_o(T * Di, 0.0);
  ops::linear_backward(k.o.data(), T, Di, w.w_down.data(), D, dout.data(), d_o.data(), g.w_down.data(),
                       g.b_down.data());
  Vec dhs(T * Di), dz(T * Di), dxc(T * Di, 0.0);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < Di; ++j) {
      const int64_t i = t * Di + j;
      dhs[i] = d_o[i] * ops::silu(k.z[i]);
      dz[i] = d_o[i] * k.hs[i] * ops::silu_grad(k.z[i]);
      g.skip[j] += dhs[i] * k.xc[i];
      dxc[i] += dhs[i] * w.skip[j];
    }
  Vec dh(T * Di, 0.0);
  ops::group_norm_backward(dhs.data(), T, NH, c.inner_head_dim(), w.out_norm_w.data(), k.out_norm, dh.data(),
                           g.out_norm_w.data(), nullptr);
  // the cell and the gates both read qkv
  Vec dqkv(T * 3 * Di, 0.0), dgates(T * 2 * NH, 0.0);
  MOXE_RETURN_IF_ERROR(mlstm_rows_backward(k.cell, dh.data(), dqkv.data(), 3 * Di, 0, Di, 2 * Di, dgates.data()));
  ops::linear_backward(k.qkv.data(), T, 3 * Di, w.w_gates.data(), 2 * NH, dgates.data(), dqkv.data(),
                       g.w_gates.data(), g.b_gates.data());
  Vec dq(T * Di), dk(T * Di), dv(T * Di);
  ops::copy_columns(dqkv.data(), T, 3 * Di, 0, Di, dq.data());
  ops::copy_columns(dqkv.data(), T, 3 * Di, Di, Di, dk.data());
  ops::copy_columns(dqkv.data(), T, 3 * Di, 2 * Di, Di, dv.data());
  Vec dxm(T * Di, 0.0);
  ops::linear_backward(k.xc.data(), T, Di, w.w_q.data(), Di, dq.data(), dxc.data(), g.w_q.data(), nullptr);
  ops::linear_backward(k.xc.data(), T, Di, w.w_k.data(), Di, dk.data(), dxc.data(), g.w_k.data(), nullptr);
  ops::linear_backward(k.xm.data(), T, Di, w.w_v.data(), Di, dv.data(), dxm.data(), g.w_v.data(), nullptr);
  Vec dconv(T * Di, 0.0);
  ops::silu_backward(k.conv.data(), T * Di, dxc.data(), dconv.data());
  ops::causal_conv_backward(k.xm.data(), B, S, Di, w.conv_w.data(), c.conv_width, dconv.data(), dxm.data(),
                            g.conv_w.data(), g.conv_b.data());
  Vec dup(T * 2 * Di, 0.0);
  ops::add_columns(dxm.data(), T, Di, 2 * Di, 0, dup.data());
  ops::add_columns(dz.data(), T, Di, 2 * Di, Di, dup.data());
  Vec dxn(T * D, 0.0);
  ops::linear_backward(k.xn.data(), T, D, w.w_up.data(), 2 * Di, dup.data(), dxn.data(), g.w_up.data(),
                       g.b_up.data());
  ops::layer_norm_backward(dxn.data(), T, D, w.norm_w.data(), k.norm, dx.data(), g.norm_w.data(), g.norm_b.data());
  return Status::ok;
}

// =============================================================================================
// Experts: residual blocks on an expert's rows [n, D].
// =============================================================================================

struct ExpertCache {
  Vec x;                // [n, D] the expert's input rows
  ops::NormCache norm;
  Vec xn;               // [n, D]
  Vec proj;             // mLSTM: [n, 3D] q, k, v;  sLSTM: [n, 4D] wx
  Vec gates;            // mLSTM: [n, 2NH]
  MlstmCellCache mcell;
  SlstmCellCache scell;
  Vec h;                // [n, D] cell output
  ops::NormCache out_norm;
  Vec hn;               // [n, D]
  Vec out;              // [n, D]
};

// Both expert kinds wrap their cell alike: x -> layer norm -> cell -> group norm -> down
// projection + x. These helpers are the shared ends; W is either expert's weights.

/// k.x = x; k.xn = layer_norm(x).
template <class W>
void expert_input_forward(const LayerConfig& c, const W& w, const double* x, int64_t n, ExpertCache& k) {
  const int64_t D = c.d_model;
  k.x.assign(x, x + n * D);
  k.xn.assign(n * D, 0.0);
  ops::layer_norm_forward(x, n, D, w.norm_w.data(), w.norm_b.data(), c.norm_eps, k.xn.data(), k.norm);
}

/// k.out = down(group_norm(k.h)) + x.
template <class W>
void expert_output_forward(const LayerConfig& c, const W& w, const double* x, int64_t n, ExpertCache& k) {
  const int64_t D = c.d_model;
  k.hn.assign(n * D, 0.0);
  ops::group_norm_forward(k.h.data(), n, c.heads, c.head_dim(), w.out_norm_w.data(), nullptr, c.norm_eps,
                          k.hn.data(), k.out_norm);
  k.out.assign(n * D, 0.0);
  ops::linear_forward(k.hn.data(), n, D, w.w_down.data(), w.b_down.data(), D, k.out.data());
  for (int64_t i = 0; i < n * D; ++i) k.out[i] += x[i];
}

/// dx += dout (the residual); returns dh, the gradient at the cell output k.h.
template <class W>
Vec expert_output_backward(const LayerConfig& c, const W& w, const ExpertCache& k, const double* dout, double* dx,
                           W& g) {
  const int64_t D = c.d_model, n = int64_t(k.x.size()) / D;
  for (int64_t i = 0; i < n * D; ++i) dx[i] += dout[i];
  Vec dhn(n * D, 0.0), dh(n * D, 0.0);
  ops::linear_backward(k.hn.data(), n, D, w.w_down.data(), D, dout, dhn.data(), g.w_down.data(), g.b_down.data());
  ops::group_norm_backward(dhn.data(), n, c.heads, c.head_dim(), w.out_norm_w.data(), k.out_norm, dh.data(),
                           g.out_norm_w.data(), nullptr);
  return dh;
}

inline Status mlstm_expert_forward(const LayerConfig& c, const MlstmExpertWeights& w, const double* x, int64_t n,
                                   CellGrid grid, ExpertCache& k) {
  const int64_t D = c.d_model, NH = c.heads;
  expert_input_forward(c, w, x, n, k);
  k.proj.assign(n * 3 * D, 0.0);
  ops::linear_forward(k.xn.data(), n, D, w.w_qkv.data(), nullptr, 3 * D, k.proj.data());
  k.gates.assign(n * 2 * NH, 0.0);
  ops::linear_forward(k.xn.data(), n, D, w.w_gates.data(), w.b_gates.data(), 2 * NH, k.gates.data());
  k.h.assign(n * D, 0.0);
  MOXE_RETURN_IF_ERROR(mlstm_rows_forward(k.proj.data(), 3 * D, 0, D, 2 * D, k.gates.data(), std::move(grid), NH,
                                          c.head_dim(), k.mcell, k.h.data()));
  expert_output_forward(c, w, x, n, k);
  return Status::ok;
}

inline Status mlstm_expert_backward(const LayerConfig& c, const MlstmExpertWeights& w, const ExpertCache& k,
                                    const double* dout, double* dx, MlstmExpertWeights& g) {
  const int64_t D = c.d_model, NH = c.heads, n = int64_t(k.x.size()) / D;
  const Vec dh = expert_output_backward(c, w, k, dout, dx, g);
  Vec dproj(n * 3 * D, 0.0), dgates(n * 2 * NH, 0.0);
  MOXE_RETURN_IF_ERROR(mlstm_rows_backward(k.mcell, dh.data(), dproj.data(), 3 * D, 0, D, 2 * D, dgates.data()));
  Vec dxn(n * D, 0.0);
  ops::linear_backward(k.xn.data(), n, D, w.w_qkv.data(), 3 * D, dproj.data(), dxn.data(), g.w_qkv.data(), nullptr);
  ops::linear_backward(k.xn.data(), n, D, w.w_gates.data(), 2 * NH, dgates.data(), dxn.data(), g.w_gates.data(),
                       g.b_gates.data());
  ops::layer_norm_backward(dxn.data(), n, D, w.norm_w.data(), k.norm, dx, g.norm_w.data(), g.norm_b.data());
  return Status::ok;
}

inline Status slstm_expert_forward(const LayerConfig& c, const SlstmExpertWeights& w, const double* x, int64_t n,
                                   CellGrid grid, ExpertCache& k) {
  const int64_t D = c.d_model, NH = c.heads;
  expert_input_forward(c, w, x, n, k);
  k.proj.assign(n * 4 * D, 0.0);
  ops::linear_forward(k.xn.data(), n, D, w.w_x.data(), nullptr, 4 * D, k.proj.data());
  k.h.assign(n * D, 0.0);
  MOXE_RETURN_IF_ERROR(slstm_rows_forward(k.proj.data(), w.r.data(), w.bias.data(), std::move(grid), NH,
                                          c.head_dim(), k.scell, k.h.data()));
  expert_output_forward(c, w, x, n, k);
  return Status::ok;
}

inline Status slstm_expert_backward(const LayerConfig& c, const SlstmExpertWeights& w, const ExpertCache& k,
                                    const double* dout, double* dx, SlstmExpertWeights& g) {
  const int64_t D = c.d_model, n = int64_t(k.x.size()) / D;
  const Vec dh = expert_output_backward(c, w, k, dout, dx, g);
  Vec dproj(n * 4 * D, 0.0);
  MOXE_RETURN_IF_ERROR(slstm_rows_backward(k.scell, dh.data(), dproj.data(), g.r.data(), g.bias.data()));
  Vec dxn(n * D, 0.0);
  ops::linear_backward(k.xn.data(), n, D, w.w_x.data(), 4 * D, dproj.data(), dxn.data(), g.w_x.data(), nullptr);
  ops::layer_norm_backward(dxn.data(), n, D, w.norm_w.data(), k.norm, dx, g.norm_w.data(), g.norm_b.data());
  return Status::ok;
}

/// The grid of the shared experts, over all T token rows: T length-1 sequences (per_token),
/// or the B batch sequences in order (stateful; cell = row for both cells' layouts).
inline CellGrid shared_expert_grid(const LayerConfig& c) {
  return c.expert_mode == ExpertMode::per_token ? CellGrid::identity(c.tokens(), 1)
                                                : CellGrid::identity(c.batch, c.seq_len);
}

/// Shared expert s (of LayerConfig::shared_expert_kind) on u [T, D]: k.out = f_s(u).
inline Status shared_expert_forward(const LayerConfig& c, const LayerWeights& w, int s, const double* u,
                                    ExpertCache& k) {
  if (c.shared_expert_kind == SharedExpertKind::mlstm)
    return mlstm_expert_forward(c, w.shared_mlstm_experts[s], u, c.tokens(), shared_expert_grid(c), k);
  return slstm_expert_forward(c, w.shared_slstm_experts[s], u, c.tokens(), shared_expert_grid(c), k);
}

/// du += J_{f_s}(u)^T dout, and shared expert s's weight gradients (+=) into `grads`.
inline Status shared_expert_backward(const LayerConfig& c, const LayerWeights& w, int s, const ExpertCache& k,
                                     const double* dout, double* du, LayerWeights& grads) {
  if (c.shared_expert_kind == SharedExpertKind::mlstm)
    return mlstm_expert_backward(c, w.shared_mlstm_experts[s], k, dout, du, grads.shared_mlstm_experts[s]);
  return slstm_expert_backward(c, w.shared_slstm_experts[s], k, dout, du, grads.shared_slstm_experts[s]);
}

// =============================================================================================
// The layer.
// =============================================================================================

/// Everything the forward computes and the backward reads.
struct LayerCache {
  SlstmBlockCache slstm_block;
  MlstmBlockCache mlstm_block;
  ops::NormCache post_norm;
  Vec u;                                // [T, D]
  Vec router_out;                       // [T, E + 1]: logits z, then the difficulty a
  // gate outputs
  Vec probs, lse, entropy, difficulty;  // [T, E], [T], [T], [T]
  std::vector<int32_t> topk_idx;        // [T, K]
  Vec topk_prob, topk_weight;           // [T, K]
  std::vector<int32_t> routed_counts;   // [E] from the gate
  std::array<double, 4> losses{};       // L_z, L_lb, L_d, L_g
  // dispatch
  moxe::dispatch::Dims dispatch_dims{};
  std::vector<int64_t> row_map;         // [T, K]
  std::vector<int64_t> expert_offsets;  // [E + 1]
  std::vector<int32_t> expert_counts;   // [E]
  Vec xp, yp;                           // [T * K, D]
  std::vector<ExpertCache> experts;     // [E]
  Vec combine;                          // [T, D]
  std::vector<ExpertCache> shared;      // [shared_experts] on all T rows
  Vec y;                                // [T, D] the layer's output
};

/// The gate's parameters over the cache's buffers (the backward reads them only).
inline moxe::router::GateForwardParams<double, double> gate_params(const LayerConfig& c, const LayerCache& k) {
  auto* m = const_cast<LayerCache*>(&k);
  moxe::router::GateForwardParams<double, double> p{};
  p.dims = moxe::router::GateDims{c.tokens(), c.experts, c.mlstm_experts(), c.top_k};
  p.logits = k.router_out.data();
  p.logits_stride = c.experts + 1;
  p.difficulty_logit = k.router_out.data() + c.experts;
  p.difficulty_stride = c.experts + 1;
  p.modulation = c.modulation;
  p.gamma = c.gamma;
  p.tau = c.tau;
  p.probs = m->probs.data();
  p.lse = m->lse.data();
  p.entropy = m->entropy.data();
  p.difficulty = m->difficulty.data();
  p.topk_idx = m->topk_idx.data();
  p.topk_prob = m->topk_prob.data();
  p.topk_weight = m->topk_weight.data();
  p.expert_counts = m->routed_counts.data();
  p.losses = m->losses.data();
  return p;
}

/// The forward: k.y = the layer's output, k.losses = (L_z, L_lb, L_d, L_g).
inline Status forward(const LayerConfig& c, const LayerWeights& w, const Vec& x, LayerCache& k) {
  MOXE_RETURN_IF_ERROR(c.validate());
  const int64_t T = c.tokens(), D = c.d_model, E = c.experts, K = c.top_k;
  MOXE_REQUIRE(int64_t(x.size()) == T * D && w.has_sizes(c));

  // 1. sequence mixer, then u = LN(x3)
  MOXE_RETURN_IF_ERROR(slstm_block_forward(c, w.slstm_block, x, k.slstm_block));
  MOXE_RETURN_IF_ERROR(mlstm_block_forward(c, w.mlstm_block, k.slstm_block.out, k.mlstm_block));
  const Vec& x3 = k.mlstm_block.out;
  k.u.assign(T * D, 0.0);
  ops::layer_norm_forward(x3.data(), T, D, w.post_norm_w.data(), w.post_norm_b.data(), c.norm_eps, k.u.data(),
                          k.post_norm);

  // 2. entropy-aware gate
  k.router_out.assign(T * (E + 1), 0.0);
  ops::linear_forward(k.u.data(), T, D, w.w_router.data(), w.b_router.data(), E + 1, k.router_out.data());
  k.probs.assign(T * E, 0.0);
  k.lse.assign(T, 0.0);
  k.entropy.assign(T, 0.0);
  k.difficulty.assign(T, 0.0);
  k.topk_idx.assign(T * K, 0);
  k.topk_prob.assign(T * K, 0.0);
  k.topk_weight.assign(T * K, 0.0);
  k.routed_counts.assign(E, 0);
  MOXE_RETURN_IF_ERROR(moxe::router::reference::gate_forward(gate_params(c, k)));

  // 3. experts on their routed rows
  moxe::dispatch::Dims dd{};
  dd.tokens = T;
  dd.hidden = int(D);
  dd.experts = int(E);
  dd.top_k = int(K);
  k.dispatch_dims = dd;
  k.row_map.assign(T * K, 0);
  k.expert_offsets.assign(E + 1, 0);
  k.expert_counts.assign(E, 0);
  moxe::dispatch::RoutingMapParams rm{};
  rm.dims = dd;
  rm.topk_idx = k.topk_idx.data();
  rm.row_map = k.row_map.data();
  rm.expert_offsets = k.expert_offsets.data();
  rm.expert_counts = k.expert_counts.data();
  MOXE_RETURN_IF_ERROR(moxe::dispatch::reference::routing_map(rm));

  const int64_t rows = moxe::dispatch::permuted_rows(dd);
  k.xp.assign(rows * D, 0.0);
  moxe::dispatch::PermuteParams<double> pp{};
  pp.dims = dd;
  pp.x = k.u.data();
  pp.row_map = k.row_map.data();
  pp.expert_offsets = k.expert_offsets.data();
  pp.xp = k.xp.data();
  MOXE_RETURN_IF_ERROR(moxe::dispatch::reference::permute(pp));

  std::vector<int64_t> sequence_of_row(rows, 0);  // the batch sequence behind each row
  for (int64_t tk = 0; tk < T * K; ++tk)
    if (k.row_map[tk] >= 0) sequence_of_row[k.row_map[tk]] = (tk / K) / c.seq_len;

  k.yp.assign(rows * D, 0.0);
  k.experts.assign(E, ExpertCache{});
  for (int e = 0; e < E; ++e) {
    const int64_t r0 = k.expert_offsets[e], n = k.expert_offsets[e + 1] - r0;
    if (n == 0) continue;  // no token chose this expert
    const bool is_mlstm = e < c.mlstm_experts();
    CellGrid grid = expert_grid(c.expert_mode, is_mlstm,
                                std::vector<int64_t>(sequence_of_row.begin() + r0, sequence_of_row.begin() + r0 + n),
                                c.batch);
    const double* xe = k.xp.data() + r0 * D;
    if (is_mlstm) {
      MOXE_RETURN_IF_ERROR(mlstm_expert_forward(c, w.mlstm_experts[e], xe, n, std::move(grid), k.experts[e]));
    } else {
      MOXE_RETURN_IF_ERROR(
          slstm_expert_forward(c, w.slstm_experts[e - c.mlstm_experts()], xe, n, std::move(grid), k.experts[e]));
    }
    std::copy(k.experts[e].out.begin(), k.experts[e].out.end(), k.yp.begin() + r0 * D);
  }

  k.combine.assign(T * D, 0.0);
  moxe::dispatch::UnpermuteParams<double, double> up{};
  up.dims = dd;
  up.yp = k.yp.data();
  up.row_map = k.row_map.data();
  up.weight = k.topk_weight.data();
  up.y = k.combine.data();
  MOXE_RETURN_IF_ERROR(moxe::dispatch::reference::unpermute(up));

  // 4. y = x3 + combine
  k.y.resize(T * D);
  for (int64_t i = 0; i < T * D; ++i) k.y[i] = x3[i] + k.combine[i];

  // 5. shared experts on every token: y += f_s(u) - u
  k.shared.assign(c.shared_experts, ExpertCache{});
  for (int s = 0; s < c.shared_experts; ++s) {
    MOXE_RETURN_IF_ERROR(shared_expert_forward(c, w, s, k.u.data(), k.shared[s]));
    for (int64_t i = 0; i < T * D; ++i) k.y[i] += k.shared[s].out[i] - k.u[i];
  }
  return Status::ok;
}

/// The scalar the backward differentiates: sum(y * dy) + c_z L_z + c_lb L_lb + c_d L_d + c_g L_g.
inline double objective(const LayerConfig& c, const LayerCache& k, const Vec& dy) {
  double s = 0.0;
  for (std::size_t i = 0; i < k.y.size() && i < dy.size(); ++i) s += k.y[i] * dy[i];
  return s + c.c_z * k.losses[0] + c.c_lb * k.losses[1] + c.c_d * k.losses[2] + c.c_g * k.losses[3];
}

/// The backward: dx and every weight gradient of objective(c, k, dy), from the forward's cache.
/// `grads` is (re)allocated with zeros first; dx is overwritten.
inline Status backward(const LayerConfig& c, const LayerWeights& w, const LayerCache& k, const Vec& dy, Vec& dx,
                       LayerWeights& grads) {
  MOXE_RETURN_IF_ERROR(c.validate());
  const int64_t T = c.tokens(), D = c.d_model, E = c.experts, K = c.top_k;
  MOXE_REQUIRE(int64_t(dy.size()) == T * D && int64_t(k.y.size()) == T * D && w.has_sizes(c));
  grads = LayerWeights::zeros(c);
  const moxe::dispatch::Dims& dd = k.dispatch_dims;
  const int64_t rows = moxe::dispatch::permuted_rows(dd);

  // 4. y = x3 + combine
  Vec dx3 = dy;

  // 3. combine -> expert rows and the gradient of the top-k weights
  Vec dyp(rows * D, 0.0), dweight(T * K, 0.0);
  moxe::dispatch::UnpermuteBackwardParams<double, double> ub{};
  ub.fwd.dims = dd;
  ub.fwd.yp = k.yp.data();
  ub.fwd.row_map = k.row_map.data();
  ub.fwd.weight = k.topk_weight.data();
  ub.dy = dy.data();
  ub.dyp = dyp.data();
  ub.dweight = dweight.data();
  MOXE_RETURN_IF_ERROR(moxe::dispatch::reference::unpermute_backward(ub));

  Vec dxp(rows * D, 0.0);
  for (int e = 0; e < E; ++e) {
    const int64_t r0 = k.expert_offsets[e], n = k.expert_offsets[e + 1] - r0;
    if (n == 0) continue;
    if (e < c.mlstm_experts()) {
      MOXE_RETURN_IF_ERROR(mlstm_expert_backward(c, w.mlstm_experts[e], k.experts[e], dyp.data() + r0 * D,
                                                 dxp.data() + r0 * D, grads.mlstm_experts[e]));
    } else {
      const int s = e - c.mlstm_experts();
      MOXE_RETURN_IF_ERROR(slstm_expert_backward(c, w.slstm_experts[s], k.experts[e], dyp.data() + r0 * D,
                                                 dxp.data() + r0 * D, grads.slstm_experts[s]));
    }
  }
  Vec du(T * D, 0.0);
  moxe::dispatch::PermuteBackwardParams<double> pb{};
  pb.dims = dd;
  pb.dxp = dxp.data();
  pb.row_map = k.row_map.data();
  pb.dx = du.data();
  MOXE_RETURN_IF_ERROR(moxe::dispatch::reference::permute_backward(pb));

  // 5. shared experts: y += f_s(u) - u, so du += J_{f_s}^T dy - dy
  for (int s = 0; s < c.shared_experts; ++s) {
    MOXE_RETURN_IF_ERROR(shared_expert_backward(c, w, s, k.shared[s], dy.data(), du.data(), grads));
    for (int64_t i = 0; i < T * D; ++i) du[i] -= dy[i];
  }

  // 2. the gate: dweight and the loss coefficients -> router logits and difficulty
  Vec dlogits(T * E, 0.0), ddifficulty(T, 0.0);
  moxe::router::GateBackwardParams<double, double> gb{};
  gb.fwd = gate_params(c, k);
  gb.dweight = dweight.data();
  gb.c_z = c.c_z;
  gb.c_lb = c.c_lb;
  gb.c_d = c.c_d;
  gb.c_g = c.c_g;
  gb.dlogits = dlogits.data();
  gb.ddifficulty_logit = ddifficulty.data();
  MOXE_RETURN_IF_ERROR(moxe::router::reference::gate_backward(gb));
  Vec drouter(T * (E + 1), 0.0);
  ops::add_columns(dlogits.data(), T, E, E + 1, 0, drouter.data());
  ops::add_columns(ddifficulty.data(), T, 1, E + 1, E, drouter.data());
  ops::linear_backward(k.u.data(), T, D, w.w_router.data(), E + 1, drouter.data(), du.data(), grads.w_router.data(),
                       grads.b_router.data());

  // 1. u = LN(x3), the mLSTM block, the sLSTM block
  ops::layer_norm_backward(du.data(), T, D, w.post_norm_w.data(), k.post_norm, dx3.data(), grads.post_norm_w.data(),
                           grads.post_norm_b.data());
  Vec dx2(T * D, 0.0);
  MOXE_RETURN_IF_ERROR(mlstm_block_backward(c, w.mlstm_block, k.mlstm_block, dx3, dx2, grads.mlstm_block));
  dx.assign(T * D, 0.0);
  MOXE_RETURN_IF_ERROR(slstm_block_backward(c, w.slstm_block, k.slstm_block, dx2, dx, grads.slstm_block));
  return Status::ok;
}

}  // namespace moxe_layer
