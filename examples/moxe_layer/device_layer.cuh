// One MoxE layer (arXiv 2505.01459) on the DEVICE, forward and backward: the same layer as
// layer_reference.hpp (read that first: this file follows it stage by stage), composed of
// moxe's device launchers (slstm::sequence_forward/backward, mlstm::chunkwise_forward/
// backward and per_token_forward/backward, router::gate_forward/backward, dispatch::routing_map / permute / unpermute and
// their backwards), cuBLAS for the dense projections, and the small kernels of
// device_ops.cuh.
//
//   DeviceLayer<T> layer;                        // T = float or __nv_bfloat16
//   layer.init(config, host_weights, stream);    // uploads the weights, allocates everything
//   copy the input into layer.x();  layer.forward();
//   read layer.y() [T, D] and layer.losses() [4] = L_z, L_lb, L_d, L_g (float)
//   copy dJ/dy into layer.dy();  layer.backward();
//   read layer.dx() [T, D] and layer.grads()("<weight name>") (the names of LayerWeights)
//
// Every buffer and every workspace is allocated in init(); forward() and backward()
// allocate nothing.
//
// One host synchronisation per forward: after the routing map, the E * B + 1 segment
// offsets (where each expert's rows of each batch sequence start in the permuted buffer;
// expert e's rows start at segment e * B) are copied to the host, because the per-expert
// GEMMs (cuBLAS takes m on the host) and the padded sLSTM batches of the stateful mode need
// each expert's row count. A framework that wants no sync uses a grouped GEMM with device
// sizes, or a fixed capacity per expert (dispatch::Dims::capacity), instead; the moxe
// launchers themselves never read the counts back.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "device_ops.cuh"
#include "layer_config.hpp"
#include "layer_reference.hpp"
#include "moxe/dispatch/permute.cuh"
#include "moxe/dispatch/routing_map.cuh"
#include "moxe/mlstm/chunkwise.cuh"
#include "moxe/mlstm/per_token.cuh"
#include "moxe/slstm/per_token.cuh"
#include "moxe/router/gate.cuh"
#include "moxe/slstm/sequence.cuh"

namespace moxe_layer::device {

/// Device memory owned by the example: each block allocated once, freed with the owner.
class DeviceArena {
 public:
  DeviceArena() = default;
  DeviceArena(const DeviceArena&) = delete;
  DeviceArena& operator=(const DeviceArena&) = delete;
  ~DeviceArena() {
    for (void* p : blocks_) cudaFree(p);
  }

  template <class U>
  Status allocate(U*& p, int64_t count) {
    void* raw = nullptr;
    const std::size_t bytes = sizeof(U) * static_cast<std::size_t>(std::max<int64_t>(count, 1));
    MOXE_RETURN_IF_ERROR(moxe::from_cuda(cudaMalloc(&raw, bytes)));
    blocks_.push_back(raw);
    bytes_ += bytes;
    p = static_cast<U*>(raw);
    return Status::ok;
  }

  std::size_t bytes() const { return bytes_; }

 private:
  std::vector<void*> blocks_;
  std::size_t bytes_ = 0;
};

/// The layer's tensors on the device, in T, in one block, found by the host tensors' names
/// (LayerWeights::visit), e.g. weights("mlstm_expert0.w_qkv"): the weights (uploaded) and
/// their gradients (zeroed before each backward) both use it.
template <class T>
class DeviceTensors {
 public:
  /// Lays out every tensor of `w`; copies w's values (converted to T) when `upload`.
  Status init(const LayerConfig& c, const LayerWeights& w, DeviceArena& arena, bool upload) {
    MOXE_REQUIRE(w.has_sizes(c));
    constexpr int64_t kAlign = 64;  // elements: keeps every tensor 128-byte aligned for cuBLAS
    std::vector<std::pair<std::string, const Vec*>> tensors;
    // visit() only reads here: has_sizes() holds, so it resizes nothing
    const_cast<LayerWeights&>(w).visit(c, [&](const std::string& name, Vec& v, const TensorSpec&) {
      offsets_[name] = count_;
      sizes_[name] = int64_t(v.size());
      names_.push_back(name);
      tensors.emplace_back(name, &v);
      count_ += (int64_t(v.size()) + kAlign - 1) / kAlign * kAlign;
    });
    MOXE_RETURN_IF_ERROR(arena.allocate(base_, count_));
    if (!upload) return Status::ok;
    std::vector<T> staging(std::size_t(count_), moxe::from_float<T>(0.f));
    for (const auto& [name, v] : tensors)
      for (std::size_t i = 0; i < v->size(); ++i) staging[offsets_[name] + i] = moxe::from_float<T>(float((*v)[i]));
    MOXE_LAYER_CUDA_TRY(cudaMemcpy(base_, staging.data(), sizeof(T) * count_, cudaMemcpyHostToDevice));
    return Status::ok;
  }

  Status zero(cudaStream_t stream) {
    MOXE_LAYER_CUDA_TRY(cudaMemsetAsync(base_, 0, sizeof(T) * count_, stream));
    return Status::ok;
  }

  /// The tensor `name`, or null when there is none (the launchers then reject the call).
  T* operator()(const std::string& name) const {
    const auto it = offsets_.find(name);
    return it == offsets_.end() ? nullptr : base_ + it->second;
  }
  int64_t size(const std::string& name) const { return sizes_.at(name); }
  const std::vector<std::string>& names() const { return names_; }

 private:
  T* base_ = nullptr;
  int64_t count_ = 0;
  std::map<std::string, int64_t> offsets_, sizes_;
  std::vector<std::string> names_;  // visit() order
};

/// The stages of one forward, timed with CUDA events (the four losses are computed inside
/// the fused gate kernel, so they are part of `gate`).
enum Stage : int { kMixer, kGate, kDispatch, kExperts, kCombine, kStages };

inline const char* stage_name(int s) {
  constexpr const char* names[kStages] = {"mixer", "gate+losses", "dispatch", "experts", "combine"};
  return s >= 0 && s < kStages ? names[s] : "?";
}

template <class T>
class DeviceLayer {
 public:
  DeviceLayer() = default;
  DeviceLayer(const DeviceLayer&) = delete;
  DeviceLayer& operator=(const DeviceLayer&) = delete;
  ~DeviceLayer() {
    for (cudaEvent_t e : marks_)
      if (e) cudaEventDestroy(e);
    for (cudaEvent_t e : back_marks_)
      if (e) cudaEventDestroy(e);
    if (cublas_) cublasDestroy(cublas_);
    if (host_segments_) cudaFreeHost(host_segments_);
  }


  /// Uploads the weights, allocates every buffer and workspace, and binds the layer to
  /// `stream` (its cuBLAS handle too).
  Status init(const LayerConfig& c, const LayerWeights& w, cudaStream_t stream);

  /// y = layer(x) and the four losses, on the bound stream. One host sync (see the top).
  Status forward();

  /// dx and every weight gradient of J = sum(y * dy) + c_z L_z + c_lb L_lb + c_d L_d + c_g L_g
  /// (the config's coefficients), from the last forward's buffers. No host sync.
  Status backward();

  T* x() { return x_; }                        ///< [T, D] the input, filled by the caller
  T* dy() { return dy_; }                      ///< [T, D] the output's gradient, filled by the caller
  const T* dx() const { return dx_; }          ///< [T, D] written by backward()
  const DeviceTensors<T>& grads() const { return grads_; }  ///< by weight name, written by backward()
  const T* y() const { return y_; }            ///< [T, D]
  const float* losses() const { return losses_; }  ///< [4]: L_z, L_lb, L_d, L_g
  const T* u() const { return u_; }            ///< [T, D] the gate's input LN(x3)
  const T* x3() const { return x3_; }          ///< [T, D] the mixer's output
  const T* combine() const { return combine_; }  ///< [T, D] the weighted expert mixture
  const int32_t* topk_idx() const { return topk_idx_; }  ///< [T, K] the gate's chosen experts
  std::size_t device_bytes() const { return arena_.bytes(); }

  /// Rows routed to expert e in the last forward (from the synchronised offsets).
  int64_t expert_rows(int e) const { return expert_offset(e + 1) - expert_offset(e); }

  /// Seconds of each stage of the last forward; call after the stream is synchronised.
  std::array<double, kStages> stage_seconds() const {
    std::array<double, kStages> s{};
    for (int i = 0; i < kStages; ++i) s[i] = seconds_between(marks_[i], marks_[i + 1]);
    return s;
  }

  /// The same for the last backward (which runs the stages in reverse order).
  std::array<double, kStages> backward_stage_seconds() const {
    std::array<double, kStages> s{};
    for (int i = 0; i < kStages; ++i) s[kStages - 1 - i] = seconds_between(back_marks_[i], back_marks_[i + 1]);
    return s;
  }

 private:
  Status slstm_block();
  Status mlstm_block();
  Status gate();
  Status dispatch();
  Status experts();
  Status shared_experts();
  Status combine_output();
  Status slstm_block_backward();
  Status mlstm_block_backward();
  Status experts_backward();
  Status shared_experts_backward();

  static double seconds_between(cudaEvent_t a, cudaEvent_t b) {
    float ms = 0.f;
    cudaEventElapsedTime(&ms, a, b);
    return ms * 1e-3;
  }

  /// The chunk size of the chunkwise mLSTM cells (length-1 sequences take the per-token
  /// path, which has no chunks).
  static int mlstm_chunk_size(int64_t seq) { return seq == 1 ? 16 : 64; }

  /// The mLSTM cell: length-1 sequences from the zero state (per token) take the closed
  /// form of mlstm::per_token_forward (no state per row, no workspace); longer sequences
  /// and varlen segments the chunkwise path.
  Status mlstm_cell_forward(const moxe::mlstm::ForwardParams<T, float>& p) {
    if (p.num_segments == 0 && p.dims.seq_len == 1) return moxe::mlstm::per_token_forward(p, nullptr, 0, stream_);
    return moxe::mlstm::chunkwise_forward(p, workspace_, workspace_bytes_, stream_);
  }
  /// The sLSTM cell: length-1 sequences from the zero state (per token) take the pointwise
  /// closed form of slstm::per_token_forward (r is not read); longer ones the sequence path.
  Status slstm_cell_forward(const moxe::slstm::ForwardParams<T, float>& p) {
    if (p.dims.seq_len == 1 && p.y_init == nullptr)
      return moxe::slstm::per_token_forward(p, workspace_, workspace_bytes_, stream_);
    return moxe::slstm::sequence_forward(p, workspace_, workspace_bytes_, stream_);
  }
  /// The backward of slstm_cell_forward, on the same path.
  Status slstm_cell_backward(const moxe::slstm::BackwardParams<T, float>& b) {
    if (b.fwd.dims.seq_len == 1 && b.fwd.y_init == nullptr && b.dy_init == nullptr && b.dy_last == nullptr)
      return moxe::slstm::per_token_backward(b, workspace_, workspace_bytes_, stream_);
    return moxe::slstm::sequence_backward(b, workspace_, workspace_bytes_, stream_);
  }
  /// The backward of mlstm_cell_forward, on the same path.
  Status mlstm_cell_backward(const moxe::mlstm::BackwardParams<T, float>& b) {
    if (b.fwd.num_segments == 0 && b.fwd.dims.seq_len == 1)
      return moxe::mlstm::per_token_backward(b, nullptr, 0, stream_);
    return moxe::mlstm::chunkwise_backward(b, workspace_, workspace_bytes_, stream_);
  }

  // the cells' parameters (the forward and the backward use the same)
  moxe::mlstm::ForwardParams<T, float> mixer_mlstm_params() const {
    moxe::mlstm::ForwardParams<T, float> p{};
    p.dims = moxe::mlstm::Dims{c_.batch, c_.heads, c_.seq_len, c_.inner_head_dim(), c_.inner_head_dim()};
    p.q = m_q_;
    p.k = m_k_;
    p.v = m_v_;
    p.igate = m_ig_;
    p.fgate = m_fg_;
    p.h = m_h_cell_;
    p.tape = m_tape_;  // the forward writes its checkpoints there, the backward reads them
    p.tape_bytes = m_tape_bytes_;
    return p;
  }
  /// All mLSTM experts' rows in one call: per token as that many length-1 sequences,
  /// stateful as one varlen sequence with a segment per (expert, batch sequence).
  moxe::mlstm::ForwardParams<T, float> expert_mlstm_params() const {
    const bool stateful = c_.expert_mode == ExpertMode::stateful;
    const int64_t rows = expert_offset(c_.mlstm_experts());
    moxe::mlstm::ForwardParams<T, float> p{};
    p.dims = moxe::mlstm::Dims{stateful ? 1 : rows, c_.heads, stateful ? rows : 1, c_.head_dim(), c_.head_dim()};
    p.chunk_size = mlstm_chunk_size(p.dims.seq_len);
    p.q = e_q_;
    p.k = e_k_;
    p.v = e_v_;
    p.igate = e_ig_;
    p.fgate = e_fg_;
    p.h = e_h_cell_;
    if (stateful) {  // segments [0, E/2 * B): the mLSTM experts' rows, from row 0
      p.segment_offsets = segments_;
      p.num_segments = int64_t(c_.mlstm_experts()) * c_.batch;
    }
    return p;
  }
  moxe::slstm::ForwardParams<T, float> mixer_slstm_params() const {
    moxe::slstm::ForwardParams<T, float> p{};
    p.dims = moxe::slstm::Dims{c_.seq_len, c_.batch, c_.heads, c_.head_dim()};
    p.wx = s_wx_cell_;
    p.r = w_("slstm_block.r");
    p.bias = w_("slstm_block.bias");
    p.y = s_h_cell_;
    return p;
  }
  /// The sLSTM cell of the expert block named `prefix` over `seq` x `batch` cells of wx.
  moxe::slstm::ForwardParams<T, float> slstm_cell_params(const std::string& prefix, int64_t seq, int64_t batch,
                                                         const T* wx, T* y) const {
    moxe::slstm::ForwardParams<T, float> p{};
    p.dims = moxe::slstm::Dims{seq, batch, c_.heads, c_.head_dim()};
    p.wx = wx;
    p.r = w_(prefix + "r");
    p.bias = w_(prefix + "bias");
    p.y = y;
    return p;
  }
  /// sLSTM expert e over `seq` x `batch` cells of wx (rows, or its padded batch).
  moxe::slstm::ForwardParams<T, float> expert_slstm_params(int e, int64_t seq, int64_t batch, const T* wx,
                                                           T* y) const {
    return slstm_cell_params(slstm_expert(e), seq, batch, wx, y);
  }
  /// The shared experts' cells run over all T token rows: per token as T length-1
  /// sequences, stateful as the B batch sequences of S tokens (no segments, no padding).
  int64_t shared_cell_batch() const { return c_.expert_mode == ExpertMode::stateful ? c_.batch : c_.tokens(); }
  int64_t shared_cell_seq() const { return c_.expert_mode == ExpertMode::stateful ? c_.seq_len : 1; }
  moxe::mlstm::ForwardParams<T, float> shared_mlstm_params(int s) const {
    const SharedExpertTape& t = shared_[std::size_t(s)];
    moxe::mlstm::ForwardParams<T, float> p{};
    p.dims = moxe::mlstm::Dims{shared_cell_batch(), c_.heads, shared_cell_seq(), c_.head_dim(), c_.head_dim()};
    p.chunk_size = mlstm_chunk_size(p.dims.seq_len);
    p.q = t.q;
    p.k = t.k;
    p.v = t.v;
    p.igate = t.ig;
    p.fgate = t.fg;
    p.h = t.h_cell;
    return p;
  }
  /// Per token the token rows are the [1, T, 4, NH, DH] layout already; stateful the rows
  /// [B, S] are transposed to the sequence-major [S, B].
  moxe::slstm::ForwardParams<T, float> shared_slstm_params(int s) const {
    const SharedExpertTape& t = shared_[std::size_t(s)];
    if (c_.expert_mode == ExpertMode::stateful)
      return slstm_cell_params(shared_expert(s), c_.seq_len, c_.batch, t.wx_cell, t.h_cell);
    return slstm_cell_params(shared_expert(s), 1, c_.tokens(), t.proj, t.h);
  }
  /// Longest run of one batch sequence's rows in sLSTM expert e (stateful padded batch).
  int64_t longest_run(int e) const {
    int64_t longest = 0;
    for (int64_t b = 0; b < c_.batch; ++b)
      longest = std::max(longest, host_segments_[e * c_.batch + b + 1] - host_segments_[e * c_.batch + b]);
    return longest;
  }

  /// linear_backward with the weight (and bias, unless "") gradients of the named tensors.
  Status linear_bwd(const T* x, int64_t ldx, int64_t rows, int64_t in, const std::string& weight,
                    const std::string& bias, int64_t out, const T* dy, int64_t lddy, T* dx, int64_t lddx,
                    bool accumulate_dx) {
    return linear_backward(cublas_, x, ldx, rows, in, w_(weight), out, dy, lddy, dx, lddx, accumulate_dx,
                           grads_(weight), bias.empty() ? nullptr : grads_(bias), reduce_scratch_, stream_);
  }
  /// group_norm_backward with the named weight (and bias, unless "") gradients.
  Status norm_bwd(const T* x, int64_t ldx, const T* dy, int64_t lddy, int64_t rows, int64_t groups, int64_t size,
                  const std::string& weight, const std::string& bias, T* dx, int64_t lddx, bool accumulate) {
    return group_norm_backward(x, ldx, dy, lddy, rows, groups, size, w_(weight), eps(), dx, lddx, accumulate,
                               grads_(weight), bias.empty() ? nullptr : grads_(bias), norm_stats_, reduce_scratch_,
                               stream_);
  }

  int64_t expert_offset(int e) const { return host_segments_[int64_t(e) * c_.batch]; }
  std::string mlstm_expert(int e) const { return "mlstm_expert" + std::to_string(e) + "."; }
  std::string slstm_expert(int e) const { return "slstm_expert" + std::to_string(e - c_.mlstm_experts()) + "."; }
  bool shared_mlstm() const { return c_.shared_expert_kind == SharedExpertKind::mlstm; }
  std::string shared_expert(int s) const {
    return (shared_mlstm() ? "shared_mlstm_expert" : "shared_slstm_expert") + std::to_string(s) + ".";
  }
  float eps() const { return float(c_.norm_eps); }
  Status linear(const T* x, int64_t ldx, int64_t rows, int64_t in, const T* w, const T* b, int64_t out, T* y,
                int64_t ldy, bool accumulate = false) {
    return linear_forward(cublas_, x, ldx, rows, in, w, b, out, y, ldy, accumulate, stream_);
  }

  LayerConfig c_{};
  cudaStream_t stream_ = nullptr;
  cublasHandle_t cublas_ = nullptr;
  DeviceArena arena_;
  DeviceTensors<T> w_;      // the weights
  DeviceTensors<T> grads_;  // their gradients (backward)
  void* workspace_ = nullptr;  // shared by all launchers (they run one after another)
  std::size_t workspace_bytes_ = 0;
  std::array<cudaEvent_t, kStages + 1> marks_{}, back_marks_{};
  int64_t* host_segments_ = nullptr;  // pinned [E * B + 1]

  // mixer, sLSTM block
  T *x_ = nullptr, *s_xn_ = nullptr, *s_act_ = nullptr, *s_wx_rows_ = nullptr, *s_wx_cell_ = nullptr;
  T *s_h_cell_ = nullptr, *s_h_ = nullptr, *s_hn_ = nullptr, *x1_ = nullptr, *f_n_ = nullptr, *f_up_ = nullptr;
  T *f_act_ = nullptr, *x2_ = nullptr;
  // mixer, mLSTM block
  T *m_xn_ = nullptr, *m_up_ = nullptr, *m_xc_ = nullptr, *m_qkv_ = nullptr, *m_gates_ = nullptr;
  T *m_q_ = nullptr, *m_k_ = nullptr, *m_v_ = nullptr, *m_ig_ = nullptr, *m_fg_ = nullptr, *m_h_cell_ = nullptr;
  T *m_h_ = nullptr, *m_hn_ = nullptr, *m_o_ = nullptr, *x3_ = nullptr, *u_ = nullptr;
  // the mixer cell's forward tape (mlstm::chunkwise_tape_size): its gate scan and state
  // checkpoints, kept for the backward, which then does not recompute them
  char* m_tape_ = nullptr;
  std::size_t m_tape_bytes_ = 0;
  // gate
  T* router_out_ = nullptr;  // [T, E + 1]: logits, then the difficulty pre-activation
  float *probs_ = nullptr, *lse_ = nullptr, *entropy_ = nullptr, *difficulty_ = nullptr;
  int32_t *topk_idx_ = nullptr, *routed_counts_ = nullptr;
  float *topk_prob_ = nullptr, *topk_weight_ = nullptr, *losses_ = nullptr;
  float* gate_totals_ = nullptr;  // [E + 4] the gate forward's batch sums, read by its backward
  // dispatch
  int64_t *row_map_ = nullptr, *expert_offsets_ = nullptr, *sequence_of_row_ = nullptr, *segments_ = nullptr;
  int32_t* expert_counts_ = nullptr;
  T* xp_ = nullptr;
  // experts (all over the permuted rows)
  T *e_xn_ = nullptr, *e_qkv_ = nullptr, *e_gates_ = nullptr, *e_wx_ = nullptr, *e_q_ = nullptr, *e_k_ = nullptr;
  T *e_v_ = nullptr, *e_ig_ = nullptr, *e_fg_ = nullptr, *e_h_cell_ = nullptr, *e_h_ = nullptr, *e_hn_ = nullptr;
  T *e_wx_pad_ = nullptr, *e_y_pad_ = nullptr, *yp_ = nullptr;
  // shared experts: the forward's tape of each, over all T token rows
  struct SharedExpertTape {
    T* xn = nullptr;       // [T, D] LN(u)
    T* proj = nullptr;     // mLSTM: [T, 3D] q, k, v;  sLSTM: [T, 4D] wx
    T* gates = nullptr;    // mLSTM: [T, 2NH] input gates, then forget gates
    T *q = nullptr, *k = nullptr, *v = nullptr, *ig = nullptr, *fg = nullptr;  // mLSTM cell layout
    T* wx_cell = nullptr;  // stateful sLSTM: [S, B, 4D]
    T* h_cell = nullptr;   // the cell's output in its layout (per-token sLSTM: unused, h is it)
    T *h = nullptr, *hn = nullptr;  // [T, D] the cell's output rows, MHNorm(h)
  };
  std::vector<SharedExpertTape> shared_;
  // combine
  T *combine_ = nullptr, *y_ = nullptr;

  // backward: the gradients of the buffers above (d<name>), the scratch of the ops
  T *dy_ = nullptr, *dx_ = nullptr, *dx1_ = nullptr, *dx2_ = nullptr, *dx3_ = nullptr, *du_ = nullptr;
  T *dyp_ = nullptr, *dxp_ = nullptr, *dlogits_ = nullptr, *ddifficulty_ = nullptr, *drouter_ = nullptr;
  float* dweight_ = nullptr;  // [T, K] the gradient of the top-k weights
  float* norm_stats_ = nullptr;  // group_norm_backward's (mean, rstd) per (row, group)
  float* reduce_scratch_ = nullptr;  // the column reductions' partial sums (bias, norm, conv)
  T *sd_act_ = nullptr, *sd_up_ = nullptr, *sd_fn_ = nullptr, *sd_h_ = nullptr, *sd_h_cell_ = nullptr;
  T *sd_wx_cell_ = nullptr, *sd_wx_ = nullptr, *sd_xn_ = nullptr, *sd_conv_act_ = nullptr, *sd_conv_ = nullptr;
  T *md_o_ = nullptr, *md_hs_ = nullptr, *md_h_ = nullptr, *md_h_cell_ = nullptr, *md_q_ = nullptr, *md_k_ = nullptr;
  T *md_v_ = nullptr, *md_ig_ = nullptr, *md_fg_ = nullptr, *md_qkv_ = nullptr, *md_gates_ = nullptr;
  T *md_xc_ = nullptr, *md_up_ = nullptr, *md_conv_ = nullptr, *md_xn_ = nullptr;
  T *ed_hn_ = nullptr, *ed_h_ = nullptr, *ed_h_cell_ = nullptr, *ed_q_ = nullptr, *ed_k_ = nullptr, *ed_v_ = nullptr;
  T *ed_ig_ = nullptr, *ed_fg_ = nullptr, *ed_qkv_ = nullptr, *ed_gates_ = nullptr, *ed_wx_ = nullptr;
  T *ed_xn_ = nullptr, *ed_y_pad_ = nullptr, *ed_wx_pad_ = nullptr;
  T* du_shared_ = nullptr;  // [T, D] the shared experts' part of du (permute_backward overwrites du)

  moxe::router::GateForwardParams<T, float> gate_params_{};
  moxe::dispatch::Dims dispatch_dims_{};
};

// =============================================================================================
// init: every allocation of the layer.
// =============================================================================================

template <class T>
Status DeviceLayer<T>::init(const LayerConfig& c, const LayerWeights& w, cudaStream_t stream) {
  MOXE_RETURN_IF_ERROR(c.validate());
  c_ = c;
  stream_ = stream;
  const int64_t B = c.batch, S = c.seq_len, T_ = c.tokens(), D = c.d_model, NH = c.heads, F = c.ffn_hidden;
  const int64_t Di = c.inner(), E = c.experts, K = c.top_k, Em = c.mlstm_experts();
  MOXE_RETURN_IF_ERROR(w_.init(c, w, arena_, /*upload=*/true));
  MOXE_RETURN_IF_ERROR(grads_.init(c, w, arena_, /*upload=*/false));

  DeviceArena& a = arena_;
  for (T** p : {&x_, &s_xn_, &s_act_, &s_h_cell_, &s_h_, &s_hn_, &x1_, &f_n_, &x2_, &m_xn_, &x3_, &u_, &combine_,
                &y_})
    MOXE_RETURN_IF_ERROR(a.allocate(*p, T_ * D));
  MOXE_RETURN_IF_ERROR(a.allocate(s_wx_rows_, T_ * 4 * D));
  MOXE_RETURN_IF_ERROR(a.allocate(s_wx_cell_, T_ * 4 * D));
  MOXE_RETURN_IF_ERROR(a.allocate(f_up_, T_ * 2 * F));
  MOXE_RETURN_IF_ERROR(a.allocate(f_act_, T_ * F));
  MOXE_RETURN_IF_ERROR(a.allocate(m_up_, T_ * 2 * Di));
  MOXE_RETURN_IF_ERROR(a.allocate(m_qkv_, T_ * 3 * Di));
  for (T** p : {&m_xc_, &m_q_, &m_k_, &m_v_, &m_h_cell_, &m_h_, &m_hn_, &m_o_})
    MOXE_RETURN_IF_ERROR(a.allocate(*p, T_ * Di));
  MOXE_RETURN_IF_ERROR(a.allocate(m_gates_, T_ * 2 * NH));
  MOXE_RETURN_IF_ERROR(a.allocate(m_ig_, T_ * NH));
  MOXE_RETURN_IF_ERROR(a.allocate(m_fg_, T_ * NH));

  MOXE_RETURN_IF_ERROR(a.allocate(router_out_, T_ * (E + 1)));
  MOXE_RETURN_IF_ERROR(a.allocate(probs_, T_ * E));
  for (float** p : {&lse_, &entropy_, &difficulty_}) MOXE_RETURN_IF_ERROR(a.allocate(*p, T_));
  MOXE_RETURN_IF_ERROR(a.allocate(topk_idx_, T_ * K));
  MOXE_RETURN_IF_ERROR(a.allocate(topk_prob_, T_ * K));
  MOXE_RETURN_IF_ERROR(a.allocate(topk_weight_, T_ * K));
  MOXE_RETURN_IF_ERROR(a.allocate(routed_counts_, E));
  MOXE_RETURN_IF_ERROR(a.allocate(losses_, 4));
  MOXE_RETURN_IF_ERROR(a.allocate(gate_totals_, E + 4));

  dispatch_dims_.tokens = T_;
  dispatch_dims_.hidden = int(D);
  dispatch_dims_.experts = int(E);
  dispatch_dims_.top_k = int(K);
  const int64_t R = moxe::dispatch::permuted_rows(dispatch_dims_);  // T * K: no capacity, no padding
  MOXE_RETURN_IF_ERROR(a.allocate(row_map_, T_ * K));
  MOXE_RETURN_IF_ERROR(a.allocate(expert_offsets_, E + 1));
  MOXE_RETURN_IF_ERROR(a.allocate(expert_counts_, E));
  MOXE_RETURN_IF_ERROR(a.allocate(sequence_of_row_, R));
  MOXE_RETURN_IF_ERROR(a.allocate(segments_, E * B + 1));
  for (T** p : {&xp_, &e_xn_, &e_q_, &e_k_, &e_v_, &e_h_cell_, &e_h_, &e_hn_, &yp_})
    MOXE_RETURN_IF_ERROR(a.allocate(*p, R * D));
  MOXE_RETURN_IF_ERROR(a.allocate(e_qkv_, R * 3 * D));
  MOXE_RETURN_IF_ERROR(a.allocate(e_wx_, R * 4 * D));
  MOXE_RETURN_IF_ERROR(a.allocate(e_gates_, R * 2 * NH));
  MOXE_RETURN_IF_ERROR(a.allocate(e_ig_, R * NH));
  MOXE_RETURN_IF_ERROR(a.allocate(e_fg_, R * NH));
  // a stateful sLSTM expert's padded batch: [longest run, B], and a run is at most S long
  MOXE_RETURN_IF_ERROR(a.allocate(e_wx_pad_, S * B * 4 * D));
  MOXE_RETURN_IF_ERROR(a.allocate(e_y_pad_, S * B * D));
  MOXE_LAYER_CUDA_TRY(cudaMallocHost(&host_segments_, sizeof(int64_t) * (E * B + 1)));
  shared_.assign(std::size_t(c.shared_experts), SharedExpertTape{});
  for (SharedExpertTape& t : shared_) {
    for (T** p : {&t.xn, &t.h_cell, &t.h, &t.hn}) MOXE_RETURN_IF_ERROR(a.allocate(*p, T_ * D));
    if (shared_mlstm()) {
      MOXE_RETURN_IF_ERROR(a.allocate(t.proj, T_ * 3 * D));
      MOXE_RETURN_IF_ERROR(a.allocate(t.gates, T_ * 2 * NH));
      for (T** p : {&t.q, &t.k, &t.v}) MOXE_RETURN_IF_ERROR(a.allocate(*p, T_ * D));
      for (T** p : {&t.ig, &t.fg}) MOXE_RETURN_IF_ERROR(a.allocate(*p, T_ * NH));
    } else {
      MOXE_RETURN_IF_ERROR(a.allocate(t.proj, T_ * 4 * D));
      MOXE_RETURN_IF_ERROR(a.allocate(t.wx_cell, T_ * 4 * D));
    }
  }

  // backward
  for (T** p : {&dy_, &dx_, &dx1_, &dx2_, &dx3_, &du_, &sd_fn_, &sd_h_, &sd_h_cell_, &sd_xn_, &sd_conv_act_,
                &sd_conv_, &md_xn_})
    MOXE_RETURN_IF_ERROR(a.allocate(*p, T_ * D));
  MOXE_RETURN_IF_ERROR(a.allocate(dlogits_, T_ * E));
  MOXE_RETURN_IF_ERROR(a.allocate(ddifficulty_, T_));
  MOXE_RETURN_IF_ERROR(a.allocate(drouter_, T_ * (E + 1)));
  MOXE_RETURN_IF_ERROR(a.allocate(dweight_, T_ * K));
  MOXE_RETURN_IF_ERROR(a.allocate(norm_stats_, 2 * R * NH));  // rows * groups <= max(T, R) * NH
  // the widest column reduction: a bias, a norm weight, or the conv weight [Di, width]
  const int64_t widest = std::max({4 * D, 2 * Di, 2 * F, E + 1, Di * c.conv_width, 2 * NH});
  MOXE_RETURN_IF_ERROR(a.allocate(reduce_scratch_, column_reduce_scratch(widest)));
  MOXE_RETURN_IF_ERROR(a.allocate(sd_act_, T_ * F));
  MOXE_RETURN_IF_ERROR(a.allocate(sd_up_, T_ * 2 * F));
  MOXE_RETURN_IF_ERROR(a.allocate(sd_wx_cell_, T_ * 4 * D));
  MOXE_RETURN_IF_ERROR(a.allocate(sd_wx_, T_ * 4 * D));
  for (T** p : {&md_o_, &md_hs_, &md_h_, &md_h_cell_, &md_q_, &md_k_, &md_v_, &md_xc_, &md_conv_})
    MOXE_RETURN_IF_ERROR(a.allocate(*p, T_ * Di));
  MOXE_RETURN_IF_ERROR(a.allocate(md_ig_, T_ * NH));
  MOXE_RETURN_IF_ERROR(a.allocate(md_fg_, T_ * NH));
  MOXE_RETURN_IF_ERROR(a.allocate(md_qkv_, T_ * 3 * Di));
  MOXE_RETURN_IF_ERROR(a.allocate(md_gates_, T_ * 2 * NH));
  MOXE_RETURN_IF_ERROR(a.allocate(md_up_, T_ * 2 * Di));
  for (T** p : {&dyp_, &dxp_, &ed_hn_, &ed_h_, &ed_h_cell_, &ed_q_, &ed_k_, &ed_v_, &ed_xn_})
    MOXE_RETURN_IF_ERROR(a.allocate(*p, R * D));
  MOXE_RETURN_IF_ERROR(a.allocate(ed_ig_, R * NH));
  MOXE_RETURN_IF_ERROR(a.allocate(ed_fg_, R * NH));
  MOXE_RETURN_IF_ERROR(a.allocate(ed_qkv_, R * 3 * D));
  MOXE_RETURN_IF_ERROR(a.allocate(ed_gates_, R * 2 * NH));
  MOXE_RETURN_IF_ERROR(a.allocate(ed_wx_, R * 4 * D));
  MOXE_RETURN_IF_ERROR(a.allocate(ed_y_pad_, S * B * D));
  MOXE_RETURN_IF_ERROR(a.allocate(ed_wx_pad_, S * B * 4 * D));
  // the shared experts' backward reuses the ed_* scratch above (R = T * K >= T rows) and
  // ed_y_pad_ / ed_wx_pad_ (S * B = T) for the stateful sLSTM cell's layout
  if (c.shared_experts > 0) MOXE_RETURN_IF_ERROR(a.allocate(du_shared_, T_ * D));

  // the gate's parameters: fixed pointers into the buffers above
  auto& g = gate_params_;
  g.dims = moxe::router::GateDims{T_, int(E), int(Em), int(K)};
  g.logits = router_out_;
  g.logits_stride = E + 1;
  g.difficulty_logit = router_out_ + E;
  g.difficulty_stride = E + 1;
  g.modulation = c.modulation;
  g.gamma = float(c.gamma);
  g.tau = float(c.tau);
  g.probs = probs_;
  g.lse = lse_;
  g.entropy = entropy_;
  g.difficulty = difficulty_;
  g.topk_idx = topk_idx_;
  g.topk_prob = topk_prob_;
  g.topk_weight = topk_weight_;
  g.expert_counts = routed_counts_;
  g.losses = losses_;
  g.totals = gate_totals_;  // the gate backward then takes u, P_m, P_s from the forward: one launch

  // One workspace, the largest any launcher asks for. The cells' sizes depend on the
  // routing (rows per expert), so they are asked at their bounds, in this expert mode only:
  // per token, every expert row as a length-1 sequence (mLSTM: the per-token closed form,
  // no workspace; sLSTM: a batch of every row) and the shared experts' T length-1
  // sequences; stateful, every expert row in one varlen mLSTM call, an sLSTM batch of B runs
  // of at most S, and the shared experts' B sequences of S.
  const bool stateful = c.expert_mode == ExpertMode::stateful;
  std::size_t ws = 0;
  auto need = [&ws](std::size_t bytes) { ws = std::max(ws, bytes); };
  {
    auto need_cell = [&need](const moxe::mlstm::ForwardParams<T, float>& p) {
      need(moxe::mlstm::chunkwise_forward_workspace_size(p));
      moxe::mlstm::BackwardParams<T, float> bp{};
      bp.fwd = p;
      need(moxe::mlstm::chunkwise_backward_workspace_size(bp));
    };
    auto need_mlstm = [&need_cell](const moxe::mlstm::Dims& dims, int64_t num_segments) {
      moxe::mlstm::ForwardParams<T, float> p{};
      p.dims = dims;
      p.chunk_size = mlstm_chunk_size(dims.seq_len);
      p.num_segments = num_segments;
      need_cell(p);
    };
    // the mixer with its tape: no forward workspace, the backward's less the tape's share
    m_tape_bytes_ = moxe::mlstm::chunkwise_tape_size(mixer_mlstm_params());
    MOXE_RETURN_IF_ERROR(a.allocate(m_tape_, int64_t(m_tape_bytes_)));
    need_cell(mixer_mlstm_params());
    if (stateful) {
      need_mlstm(moxe::mlstm::Dims{1, NH, R, c.head_dim(), c.head_dim()}, Em * B);
      need_mlstm(moxe::mlstm::Dims{B, NH, S, c.head_dim(), c.head_dim()}, 0);
    }
  }
  {
    auto need_slstm = [&need](const moxe::slstm::Dims& dims) {
      moxe::slstm::ForwardParams<T, float> p{};
      p.dims = dims;
      need(moxe::slstm::sequence_forward_workspace_size(p));
      moxe::slstm::BackwardParams<T, float> bp{};
      bp.fwd = p;
      need(moxe::slstm::sequence_backward_workspace_size(bp));
    };
    need_slstm(moxe::slstm::Dims{S, B, NH, c.head_dim()});  // the mixer; stateful experts and shared experts
    if (!stateful) {  // length-1 sequences: the per-token path (slstm_cell_forward)
      auto need_per_token = [&need](const moxe::slstm::Dims& dims) {
        moxe::slstm::BackwardParams<T, float> bp{};
        bp.fwd.dims = dims;
        need(moxe::slstm::per_token_backward_workspace_size(bp));
      };
      need_per_token(moxe::slstm::Dims{1, R, NH, c.head_dim()});
      need_per_token(moxe::slstm::Dims{1, T_, NH, c.head_dim()});
    }
  }
  need(moxe::router::gate_forward_workspace_size(gate_params_));
  {
    moxe::router::GateBackwardParams<T, float> gb{};
    gb.fwd = gate_params_;
    need(moxe::router::gate_backward_workspace_size(gb));
  }
  {
    moxe::dispatch::RoutingMapParams rm{};
    rm.dims = dispatch_dims_;
    need(moxe::dispatch::routing_map_workspace_size(rm));
    moxe::dispatch::PermuteParams<T> pp{};
    pp.dims = dispatch_dims_;
    pp.expert_offsets = expert_offsets_;  // the size depends on whether it is given
    need(moxe::dispatch::permute_workspace_size(pp));
    moxe::dispatch::UnpermuteParams<T, float> up{};
    up.dims = dispatch_dims_;
    need(moxe::dispatch::unpermute_workspace_size(up));
    moxe::dispatch::UnpermuteBackwardParams<T, float> ub{};
    ub.fwd = up;
    need(moxe::dispatch::unpermute_backward_workspace_size(ub));
    moxe::dispatch::PermuteBackwardParams<T> pb{};
    pb.dims = dispatch_dims_;
    need(moxe::dispatch::permute_backward_workspace_size(pb));
  }
  char* workspace = nullptr;
  MOXE_RETURN_IF_ERROR(a.allocate(workspace, int64_t(ws)));
  workspace_ = workspace;
  workspace_bytes_ = ws;

  // cuBLAS: bound to the stream, with its own workspace (no allocation on first use)
  MOXE_LAYER_CUBLAS_TRY(cublasCreate(&cublas_));
  MOXE_LAYER_CUBLAS_TRY(cublasSetStream(cublas_, stream_));
  constexpr std::size_t kCublasWorkspace = std::size_t(32) << 20;
  char* cublas_ws = nullptr;
  MOXE_RETURN_IF_ERROR(a.allocate(cublas_ws, int64_t(kCublasWorkspace)));
  MOXE_LAYER_CUBLAS_TRY(cublasSetWorkspace(cublas_, cublas_ws, kCublasWorkspace));

  for (cudaEvent_t& e : marks_) MOXE_LAYER_CUDA_TRY(cudaEventCreate(&e));
  for (cudaEvent_t& e : back_marks_) MOXE_LAYER_CUDA_TRY(cudaEventCreate(&e));
  return Status::ok;
}

// =============================================================================================
// forward, stage by stage (layer_reference.hpp's forward()).
// =============================================================================================

template <class T>
Status DeviceLayer<T>::forward() {
  MOXE_LAYER_CUDA_TRY(cudaEventRecord(marks_[kMixer], stream_));
  // 1. sequence mixer, then u = LN(x3)
  MOXE_RETURN_IF_ERROR(slstm_block());
  MOXE_RETURN_IF_ERROR(mlstm_block());
  MOXE_RETURN_IF_ERROR(layer_norm_forward(x3_, c_.tokens(), c_.d_model, w_("post_norm_w"), w_("post_norm_b"), eps(),
                                          u_, stream_));
  MOXE_LAYER_CUDA_TRY(cudaEventRecord(marks_[kGate], stream_));
  // 2. entropy-aware gate (and the four losses)
  MOXE_RETURN_IF_ERROR(gate());
  MOXE_LAYER_CUDA_TRY(cudaEventRecord(marks_[kDispatch], stream_));
  // 3. experts on their routed rows
  MOXE_RETURN_IF_ERROR(dispatch());
  MOXE_LAYER_CUDA_TRY(cudaEventRecord(marks_[kExperts], stream_));
  MOXE_RETURN_IF_ERROR(experts());
  // 5. the shared experts on every token (their W_down is added to y in combine_output)
  MOXE_RETURN_IF_ERROR(shared_experts());
  MOXE_LAYER_CUDA_TRY(cudaEventRecord(marks_[kCombine], stream_));
  // 4. y = x3 + combine (+ the shared experts' deltas)
  MOXE_RETURN_IF_ERROR(combine_output());
  MOXE_LAYER_CUDA_TRY(cudaEventRecord(marks_[kStages], stream_));
  return Status::ok;
}

/// xn = LN(x); wx = [W_if SiLU(conv4(xn)) ; W_zo xn]; h = sLSTM(wx); x1 = x + MHNorm(h);
/// x2 = x1 + W_down (GELU(g) * a), [g ; a] = W_up LN(x1).
template <class T>
Status DeviceLayer<T>::slstm_block() {
  const int64_t B = c_.batch, S = c_.seq_len, T_ = c_.tokens(), D = c_.d_model, F = c_.ffn_hidden;
  const std::string p = "slstm_block.";
  MOXE_RETURN_IF_ERROR(layer_norm_forward(x_, T_, D, w_(p + "norm_w"), w_(p + "norm_b"), eps(), s_xn_, stream_));
  MOXE_RETURN_IF_ERROR(causal_conv_silu_forward(s_xn_, D, B, S, D, w_(p + "conv_w"), w_(p + "conv_b"),
                                                c_.conv_width, s_act_, stream_));
  // the gate inputs in (gate, head, unit) order: i, f from the conv, z, o from the normed input
  MOXE_RETURN_IF_ERROR(linear(s_act_, D, T_, D, w_(p + "w_if"), nullptr, 2 * D, s_wx_rows_, 4 * D));
  MOXE_RETURN_IF_ERROR(linear(s_xn_, D, T_, D, w_(p + "w_zo"), nullptr, 2 * D, s_wx_rows_ + 2 * D, 4 * D));
  MOXE_RETURN_IF_ERROR(swap_outer(s_wx_rows_, B, S, 4 * D, s_wx_cell_, stream_));  // [B, S] -> [S, B]
  MOXE_RETURN_IF_ERROR(moxe::slstm::sequence_forward(mixer_slstm_params(), workspace_, workspace_bytes_, stream_));
  MOXE_RETURN_IF_ERROR(swap_outer(s_h_cell_, S, B, D, s_h_, stream_));  // [S, B] -> [B, S]
  MOXE_RETURN_IF_ERROR(group_norm_forward(s_h_, D, T_, c_.heads, c_.head_dim(), w_(p + "out_norm_w"), nullptr,
                                          eps(), s_hn_, D, stream_));
  MOXE_RETURN_IF_ERROR(add(x_, s_hn_, T_ * D, x1_, stream_));
  // gated FFN with its own residual
  MOXE_RETURN_IF_ERROR(
      layer_norm_forward(x1_, T_, D, w_(p + "ffn_norm_w"), w_(p + "ffn_norm_b"), eps(), f_n_, stream_));
  MOXE_RETURN_IF_ERROR(linear(f_n_, D, T_, D, w_(p + "ffn_up_w"), w_(p + "ffn_up_b"), 2 * F, f_up_, 2 * F));
  MOXE_RETURN_IF_ERROR(gated_gelu_forward(f_up_, T_, F, f_act_, stream_));
  MOXE_LAYER_CUDA_TRY(cudaMemcpyAsync(x2_, x1_, sizeof(T) * T_ * D, cudaMemcpyDeviceToDevice, stream_));
  return linear(f_act_, F, T_, F, w_(p + "ffn_down_w"), w_(p + "ffn_down_b"), D, x2_, D, /*accumulate=*/true);
}

/// xn = LN(x2); [xm ; z] = W_up xn; xc = SiLU(conv4(xm)); q = W_q xc, k = W_k xc, v = W_v xm;
/// [i ; f] = W_g [q ; k ; v] + b_g; h = mLSTM; x3 = x2 + W_down ((MHNorm(h) + skip xc) SiLU(z)).
template <class T>
Status DeviceLayer<T>::mlstm_block() {
  const int64_t B = c_.batch, S = c_.seq_len, T_ = c_.tokens(), D = c_.d_model, Di = c_.inner(), NH = c_.heads;
  const int64_t DHi = c_.inner_head_dim();
  const std::string p = "mlstm_block.";
  MOXE_RETURN_IF_ERROR(layer_norm_forward(x2_, T_, D, w_(p + "norm_w"), w_(p + "norm_b"), eps(), m_xn_, stream_));
  MOXE_RETURN_IF_ERROR(linear(m_xn_, D, T_, D, w_(p + "w_up"), w_(p + "b_up"), 2 * Di, m_up_, 2 * Di));
  // xm is columns [0, Di) of up, read in place (rows 2Di apart)
  MOXE_RETURN_IF_ERROR(causal_conv_silu_forward(m_up_, 2 * Di, B, S, Di, w_(p + "conv_w"), w_(p + "conv_b"),
                                                c_.conv_width, m_xc_, stream_));
  MOXE_RETURN_IF_ERROR(linear(m_xc_, Di, T_, Di, w_(p + "w_q"), nullptr, Di, m_qkv_, 3 * Di));
  MOXE_RETURN_IF_ERROR(linear(m_xc_, Di, T_, Di, w_(p + "w_k"), nullptr, Di, m_qkv_ + Di, 3 * Di));
  MOXE_RETURN_IF_ERROR(linear(m_up_, 2 * Di, T_, Di, w_(p + "w_v"), nullptr, Di, m_qkv_ + 2 * Di, 3 * Di));
  MOXE_RETURN_IF_ERROR(linear(m_qkv_, 3 * Di, T_, 3 * Di, w_(p + "w_gates"), w_(p + "b_gates"), 2 * NH, m_gates_,
                              2 * NH));
  // token rows -> the cell's [B, NH, S, dh] (gates: dh = 1, inputs then forgets)
  MOXE_RETURN_IF_ERROR(rows_to_mlstm(m_qkv_, 3 * Di, 0, B, S, NH, DHi, m_q_, stream_));
  MOXE_RETURN_IF_ERROR(rows_to_mlstm(m_qkv_, 3 * Di, Di, B, S, NH, DHi, m_k_, stream_));
  MOXE_RETURN_IF_ERROR(rows_to_mlstm(m_qkv_, 3 * Di, 2 * Di, B, S, NH, DHi, m_v_, stream_));
  MOXE_RETURN_IF_ERROR(rows_to_mlstm(m_gates_, 2 * NH, 0, B, S, NH, int64_t(1), m_ig_, stream_));
  MOXE_RETURN_IF_ERROR(rows_to_mlstm(m_gates_, 2 * NH, NH, B, S, NH, int64_t(1), m_fg_, stream_));
  MOXE_RETURN_IF_ERROR(moxe::mlstm::chunkwise_forward(mixer_mlstm_params(), workspace_, workspace_bytes_, stream_));
  MOXE_RETURN_IF_ERROR(mlstm_to_rows(m_h_cell_, B, S, NH, DHi, m_h_, Di, 0, stream_));
  MOXE_RETURN_IF_ERROR(group_norm_forward(m_h_, Di, T_, NH, DHi, w_(p + "out_norm_w"), nullptr, eps(), m_hn_, Di,
                                          stream_));
  MOXE_RETURN_IF_ERROR(mlstm_block_output(m_hn_, m_xc_, w_(p + "skip"), m_up_, T_, Di, m_o_, stream_));
  MOXE_LAYER_CUDA_TRY(cudaMemcpyAsync(x3_, x2_, sizeof(T) * T_ * D, cudaMemcpyDeviceToDevice, stream_));
  return linear(m_o_, Di, T_, Di, w_(p + "w_down"), w_(p + "b_down"), D, x3_, D, /*accumulate=*/true);
}

/// One linear u -> [T, E + 1] (logits, then the difficulty pre-activation), read in place by
/// the fused gate through its row strides: probs, top-k, weights, counts, the four losses.
template <class T>
Status DeviceLayer<T>::gate() {
  const int64_t E = c_.experts;
  MOXE_RETURN_IF_ERROR(linear(u_, c_.d_model, c_.tokens(), c_.d_model, w_("w_router"), w_("b_router"), E + 1,
                              router_out_, E + 1));
  return moxe::router::gate_forward(gate_params_, workspace_, workspace_bytes_, stream_);
}

/// The expert-major row map, xp = permute(u), and the per-(expert, sequence) segments; then
/// the one host sync of the forward (the segment offsets, for the per-expert row counts).
template <class T>
Status DeviceLayer<T>::dispatch() {
  moxe::dispatch::RoutingMapParams rm{};
  rm.dims = dispatch_dims_;
  rm.topk_idx = topk_idx_;
  rm.row_map = row_map_;
  rm.expert_offsets = expert_offsets_;
  rm.expert_counts = expert_counts_;
  MOXE_RETURN_IF_ERROR(moxe::dispatch::routing_map(rm, workspace_, workspace_bytes_, stream_));
  moxe::dispatch::PermuteParams<T> pp{};
  pp.dims = dispatch_dims_;
  pp.x = u_;
  pp.row_map = row_map_;
  pp.expert_offsets = expert_offsets_;
  pp.xp = xp_;
  MOXE_RETURN_IF_ERROR(moxe::dispatch::permute(pp, workspace_, workspace_bytes_, stream_));
  MOXE_RETURN_IF_ERROR(expert_segments(row_map_, expert_offsets_, c_.tokens(), c_.top_k, c_.seq_len, c_.experts,
                                       c_.batch, sequence_of_row_, segments_, stream_));
  MOXE_LAYER_CUDA_TRY(cudaMemcpyAsync(host_segments_, segments_, sizeof(int64_t) * (c_.experts * c_.batch + 1),
                                      cudaMemcpyDeviceToHost, stream_));
  MOXE_LAYER_CUDA_TRY(cudaStreamSynchronize(stream_));
  return Status::ok;
}

/// The experts, each a residual block on its rows [r0, r0 + n) of xp:
///   mLSTM expert  ye = xe + W_down MHNorm(mLSTM(W_qkv LN(xe), W_g LN(xe) + b_g))
///   sLSTM expert  ye = xe + W_down MHNorm(sLSTM(W_x LN(xe)))
/// The mLSTM cell has no weights of its own, so all mLSTM experts' rows (the first
/// expert_offsets[E/2] rows) run through one call: per token mlstm::per_token_forward
/// (each row a length-1 sequence from the zero state), stateful one chunkwise varlen
/// sequence with a segment per (expert, batch sequence). Each sLSTM expert has its own
/// recurrent weights r: one call per expert, per token as a batch of n length-1 sequences
/// (the token rows are already the sLSTM layout), stateful as a [longest run, B] batch
/// padded at the end, as the host path does.
template <class T>
Status DeviceLayer<T>::experts() {
  const int64_t B = c_.batch, D = c_.d_model, NH = c_.heads, DH = c_.head_dim();
  const int E = c_.experts, Em = c_.mlstm_experts();
  const bool stateful = c_.expert_mode == ExpertMode::stateful;

  for (int e = 0; e < E; ++e) {  // the input norm and projections of every expert
    const int64_t r0 = expert_offset(e), n = expert_rows(e);
    if (n == 0) continue;  // no token chose this expert
    const std::string p = e < Em ? mlstm_expert(e) : slstm_expert(e);
    MOXE_RETURN_IF_ERROR(
        layer_norm_forward(xp_ + r0 * D, n, D, w_(p + "norm_w"), w_(p + "norm_b"), eps(), e_xn_ + r0 * D, stream_));
    if (e < Em) {
      MOXE_RETURN_IF_ERROR(
          linear(e_xn_ + r0 * D, D, n, D, w_(p + "w_qkv"), nullptr, 3 * D, e_qkv_ + r0 * 3 * D, 3 * D));
      MOXE_RETURN_IF_ERROR(linear(e_xn_ + r0 * D, D, n, D, w_(p + "w_gates"), w_(p + "b_gates"), 2 * NH,
                                  e_gates_ + r0 * 2 * NH, 2 * NH));
    } else {
      MOXE_RETURN_IF_ERROR(linear(e_xn_ + r0 * D, D, n, D, w_(p + "w_x"), nullptr, 4 * D, e_wx_ + r0 * 4 * D, 4 * D));
    }
  }

  const int64_t mlstm_rows = expert_offset(Em);
  if (mlstm_rows > 0) {
    const int64_t cb = stateful ? 1 : mlstm_rows, cs = stateful ? mlstm_rows : 1;  // the cell's batch and seq
    MOXE_RETURN_IF_ERROR(rows_to_mlstm(e_qkv_, 3 * D, 0, cb, cs, NH, DH, e_q_, stream_));
    MOXE_RETURN_IF_ERROR(rows_to_mlstm(e_qkv_, 3 * D, D, cb, cs, NH, DH, e_k_, stream_));
    MOXE_RETURN_IF_ERROR(rows_to_mlstm(e_qkv_, 3 * D, 2 * D, cb, cs, NH, DH, e_v_, stream_));
    MOXE_RETURN_IF_ERROR(rows_to_mlstm(e_gates_, 2 * NH, 0, cb, cs, NH, int64_t(1), e_ig_, stream_));
    MOXE_RETURN_IF_ERROR(rows_to_mlstm(e_gates_, 2 * NH, NH, cb, cs, NH, int64_t(1), e_fg_, stream_));
    MOXE_RETURN_IF_ERROR(mlstm_cell_forward(expert_mlstm_params()));
    MOXE_RETURN_IF_ERROR(mlstm_to_rows(e_h_cell_, cb, cs, NH, DH, e_h_, D, 0, stream_));
  }

  for (int e = Em; e < E; ++e) {
    const int64_t r0 = expert_offset(e), n = expert_rows(e);
    if (n == 0) continue;
    if (!stateful) {  // n sequences of one token: the rows are the [1, n, 4, NH, DH] layout
      MOXE_RETURN_IF_ERROR(slstm_cell_forward(expert_slstm_params(e, 1, n, e_wx_ + r0 * 4 * D, e_h_ + r0 * D)));
      continue;
    }
    const int64_t* seg = segments_ + int64_t(e) * B;  // this expert's B + 1 segment offsets
    const int64_t longest = longest_run(e);
    MOXE_RETURN_IF_ERROR(rows_to_padded(e_wx_, r0, n, 4 * D, sequence_of_row_, seg, B, longest, e_wx_pad_, stream_));
    const auto cell = expert_slstm_params(e, longest, B, e_wx_pad_, e_y_pad_);
    MOXE_RETURN_IF_ERROR(moxe::slstm::sequence_forward(cell, workspace_, workspace_bytes_, stream_));
    MOXE_RETURN_IF_ERROR(padded_to_rows(e_y_pad_, r0, n, D, sequence_of_row_, seg, B, e_h_, stream_));
  }

  for (int e = 0; e < E; ++e) {  // ye = xe + W_down MHNorm(h)
    const int64_t r0 = expert_offset(e), n = expert_rows(e);
    if (n == 0) continue;
    const std::string p = e < Em ? mlstm_expert(e) : slstm_expert(e);
    MOXE_RETURN_IF_ERROR(group_norm_forward(e_h_ + r0 * D, D, n, NH, DH, w_(p + "out_norm_w"), nullptr, eps(),
                                            e_hn_ + r0 * D, D, stream_));
    MOXE_LAYER_CUDA_TRY(
        cudaMemcpyAsync(yp_ + r0 * D, xp_ + r0 * D, sizeof(T) * n * D, cudaMemcpyDeviceToDevice, stream_));
    MOXE_RETURN_IF_ERROR(
        linear(e_hn_ + r0 * D, D, n, D, w_(p + "w_down"), w_(p + "b_down"), D, yp_ + r0 * D, D, /*accumulate=*/true));
  }
  return Status::ok;
}

/// The shared experts (LayerConfig::shared_experts), each the expert block of its kind on all
/// T rows of u, up to hn = MHNorm(h): f_s(u) - u = W_down hn + b_down is added to y by
/// combine_output. The cells: per token T length-1 sequences (for the sLSTM the token rows
/// are its layout), stateful the B batch sequences of S tokens ([B, NH, S, DH] for the mLSTM,
/// [S, B] for the sLSTM): one chunkwise_forward or sequence_forward per shared expert.
template <class T>
Status DeviceLayer<T>::shared_experts() {
  const int64_t B = c_.batch, S = c_.seq_len, T_ = c_.tokens(), D = c_.d_model, NH = c_.heads, DH = c_.head_dim();
  const int64_t cb = shared_cell_batch(), cs = shared_cell_seq();
  const bool stateful = c_.expert_mode == ExpertMode::stateful;
  for (int s = 0; s < c_.shared_experts; ++s) {
    const SharedExpertTape& t = shared_[std::size_t(s)];
    const std::string p = shared_expert(s);
    MOXE_RETURN_IF_ERROR(layer_norm_forward(u_, T_, D, w_(p + "norm_w"), w_(p + "norm_b"), eps(), t.xn, stream_));
    if (shared_mlstm()) {
      MOXE_RETURN_IF_ERROR(linear(t.xn, D, T_, D, w_(p + "w_qkv"), nullptr, 3 * D, t.proj, 3 * D));
      MOXE_RETURN_IF_ERROR(linear(t.xn, D, T_, D, w_(p + "w_gates"), w_(p + "b_gates"), 2 * NH, t.gates, 2 * NH));
      MOXE_RETURN_IF_ERROR(rows_to_mlstm(t.proj, 3 * D, 0, cb, cs, NH, DH, t.q, stream_));
      MOXE_RETURN_IF_ERROR(rows_to_mlstm(t.proj, 3 * D, D, cb, cs, NH, DH, t.k, stream_));
      MOXE_RETURN_IF_ERROR(rows_to_mlstm(t.proj, 3 * D, 2 * D, cb, cs, NH, DH, t.v, stream_));
      MOXE_RETURN_IF_ERROR(rows_to_mlstm(t.gates, 2 * NH, 0, cb, cs, NH, int64_t(1), t.ig, stream_));
      MOXE_RETURN_IF_ERROR(rows_to_mlstm(t.gates, 2 * NH, NH, cb, cs, NH, int64_t(1), t.fg, stream_));
      MOXE_RETURN_IF_ERROR(mlstm_cell_forward(shared_mlstm_params(s)));
      MOXE_RETURN_IF_ERROR(mlstm_to_rows(t.h_cell, cb, cs, NH, DH, t.h, D, 0, stream_));
    } else {
      MOXE_RETURN_IF_ERROR(linear(t.xn, D, T_, D, w_(p + "w_x"), nullptr, 4 * D, t.proj, 4 * D));
      if (stateful) MOXE_RETURN_IF_ERROR(swap_outer(t.proj, B, S, 4 * D, t.wx_cell, stream_));  // [B, S] -> [S, B]
      MOXE_RETURN_IF_ERROR(slstm_cell_forward(shared_slstm_params(s)));
      if (stateful) MOXE_RETURN_IF_ERROR(swap_outer(t.h_cell, S, B, D, t.h, stream_));  // [S, B] -> [B, S]
    }
    MOXE_RETURN_IF_ERROR(
        group_norm_forward(t.h, D, T_, NH, DH, w_(p + "out_norm_w"), nullptr, eps(), t.hn, D, stream_));
  }
  return Status::ok;
}

/// combine = sum_k w_k yp[row_map[t, k]] (fp32 accumulation); y = x3 + combine, then
/// y += W_down hn + b_down (= f_s(u) - u) of every shared expert.
template <class T>
Status DeviceLayer<T>::combine_output() {
  const int64_t T_ = c_.tokens(), D = c_.d_model;
  moxe::dispatch::UnpermuteParams<T, float> up{};
  up.dims = dispatch_dims_;
  up.yp = yp_;
  up.row_map = row_map_;
  up.weight = topk_weight_;
  up.y = combine_;
  MOXE_RETURN_IF_ERROR(moxe::dispatch::unpermute(up, workspace_, workspace_bytes_, stream_));
  MOXE_RETURN_IF_ERROR(add(x3_, combine_, T_ * D, y_, stream_));
  for (int s = 0; s < c_.shared_experts; ++s) {
    const std::string p = shared_expert(s);
    MOXE_RETURN_IF_ERROR(linear(shared_[std::size_t(s)].hn, D, T_, D, w_(p + "w_down"), w_(p + "b_down"), D, y_, D,
                                /*accumulate=*/true));
  }
  return Status::ok;
}

// =============================================================================================
// backward, stage by stage in reverse (layer_reference.hpp's backward()).
// =============================================================================================

template <class T>
Status DeviceLayer<T>::backward() {
  const int64_t T_ = c_.tokens(), D = c_.d_model, E = c_.experts;
  MOXE_RETURN_IF_ERROR(grads_.zero(stream_));
  MOXE_LAYER_CUDA_TRY(cudaEventRecord(back_marks_[0], stream_));
  // 4. y = x3 + combine: the residual, and the combine -> expert rows and dweight
  MOXE_LAYER_CUDA_TRY(cudaMemcpyAsync(dx3_, dy_, sizeof(T) * T_ * D, cudaMemcpyDeviceToDevice, stream_));
  moxe::dispatch::UnpermuteBackwardParams<T, float> ub{};
  ub.fwd.dims = dispatch_dims_;
  ub.fwd.yp = yp_;
  ub.fwd.row_map = row_map_;
  ub.fwd.weight = topk_weight_;
  ub.fwd.y = combine_;
  ub.dy = dy_;
  ub.dyp = dyp_;
  ub.dweight = dweight_;
  MOXE_RETURN_IF_ERROR(moxe::dispatch::unpermute_backward(ub, workspace_, workspace_bytes_, stream_));
  MOXE_LAYER_CUDA_TRY(cudaEventRecord(back_marks_[1], stream_));
  // 3. the experts, then the rows back to their tokens: du[t] = sum_k dxp[row_map[t, k]]
  MOXE_RETURN_IF_ERROR(experts_backward());
  MOXE_RETURN_IF_ERROR(shared_experts_backward());  // dy -> du_shared_ and their weights
  MOXE_LAYER_CUDA_TRY(cudaEventRecord(back_marks_[2], stream_));
  moxe::dispatch::PermuteBackwardParams<T> pb{};
  pb.dims = dispatch_dims_;
  pb.dxp = dxp_;
  pb.row_map = row_map_;
  pb.dx = du_;
  MOXE_RETURN_IF_ERROR(moxe::dispatch::permute_backward(pb, workspace_, workspace_bytes_, stream_));
  if (c_.shared_experts > 0) MOXE_RETURN_IF_ERROR(add(du_, du_shared_, T_ * D, du_, stream_));
  MOXE_LAYER_CUDA_TRY(cudaEventRecord(back_marks_[3], stream_));
  // 2. the gate: dweight and the loss coefficients -> router logits and difficulty
  moxe::router::GateBackwardParams<T, float> gb{};
  gb.fwd = gate_params_;
  gb.dweight = dweight_;
  gb.c_z = float(c_.c_z);
  gb.c_lb = float(c_.c_lb);
  gb.c_d = float(c_.c_d);
  gb.c_g = float(c_.c_g);
  gb.dlogits = dlogits_;
  gb.ddifficulty_logit = ddifficulty_;
  MOXE_RETURN_IF_ERROR(moxe::router::gate_backward(gb, workspace_, workspace_bytes_, stream_));
  MOXE_RETURN_IF_ERROR(copy_into_columns(dlogits_, T_, E, drouter_, E + 1, 0, stream_));
  MOXE_RETURN_IF_ERROR(copy_into_columns(ddifficulty_, T_, int64_t(1), drouter_, E + 1, E, stream_));
  MOXE_RETURN_IF_ERROR(linear_bwd(u_, D, T_, D, "w_router", "b_router", E + 1, drouter_, E + 1, du_, D, true));
  MOXE_LAYER_CUDA_TRY(cudaEventRecord(back_marks_[4], stream_));
  // 1. u = LN(x3), the mLSTM block, the sLSTM block
  MOXE_RETURN_IF_ERROR(norm_bwd(x3_, D, du_, D, T_, 1, D, "post_norm_w", "post_norm_b", dx3_, D, true));
  MOXE_RETURN_IF_ERROR(mlstm_block_backward());
  MOXE_RETURN_IF_ERROR(slstm_block_backward());
  MOXE_LAYER_CUDA_TRY(cudaEventRecord(back_marks_[5], stream_));
  return Status::ok;
}

/// dyp (the expert outputs' gradient) -> dxp (their inputs') and the experts' weight gradients.
template <class T>
Status DeviceLayer<T>::experts_backward() {
  const int64_t B = c_.batch, D = c_.d_model, NH = c_.heads, DH = c_.head_dim();
  const int E = c_.experts, Em = c_.mlstm_experts();
  const bool stateful = c_.expert_mode == ExpertMode::stateful;

  for (int e = 0; e < E; ++e) {  // ye = xe + W_down MHNorm(h)
    const int64_t r0 = expert_offset(e), n = expert_rows(e);
    if (n == 0) continue;
    const std::string p = e < Em ? mlstm_expert(e) : slstm_expert(e);
    MOXE_LAYER_CUDA_TRY(
        cudaMemcpyAsync(dxp_ + r0 * D, dyp_ + r0 * D, sizeof(T) * n * D, cudaMemcpyDeviceToDevice, stream_));
    MOXE_RETURN_IF_ERROR(linear_bwd(e_hn_ + r0 * D, D, n, D, p + "w_down", p + "b_down", D, dyp_ + r0 * D, D,
                                    ed_hn_ + r0 * D, D, false));
    MOXE_RETURN_IF_ERROR(norm_bwd(e_h_ + r0 * D, D, ed_hn_ + r0 * D, D, n, NH, DH, p + "out_norm_w", "",
                                  ed_h_ + r0 * D, D, false));
  }

  const int64_t mlstm_rows = expert_offset(Em);
  if (mlstm_rows > 0) {  // the mLSTM experts' cell, one call as in the forward
    const int64_t cb = stateful ? 1 : mlstm_rows, cs = stateful ? mlstm_rows : 1;
    MOXE_RETURN_IF_ERROR(rows_to_mlstm(ed_h_, D, 0, cb, cs, NH, DH, ed_h_cell_, stream_));
    moxe::mlstm::BackwardParams<T, float> cell{};
    cell.fwd = expert_mlstm_params();
    cell.dh = ed_h_cell_;
    cell.dq = ed_q_;
    cell.dk = ed_k_;
    cell.dv = ed_v_;
    cell.digate = ed_ig_;
    cell.dfgate = ed_fg_;
    MOXE_RETURN_IF_ERROR(mlstm_cell_backward(cell));
    MOXE_RETURN_IF_ERROR(mlstm_to_rows(ed_q_, cb, cs, NH, DH, ed_qkv_, 3 * D, 0, stream_));
    MOXE_RETURN_IF_ERROR(mlstm_to_rows(ed_k_, cb, cs, NH, DH, ed_qkv_, 3 * D, D, stream_));
    MOXE_RETURN_IF_ERROR(mlstm_to_rows(ed_v_, cb, cs, NH, DH, ed_qkv_, 3 * D, 2 * D, stream_));
    MOXE_RETURN_IF_ERROR(mlstm_to_rows(ed_ig_, cb, cs, NH, int64_t(1), ed_gates_, 2 * NH, 0, stream_));
    MOXE_RETURN_IF_ERROR(mlstm_to_rows(ed_fg_, cb, cs, NH, int64_t(1), ed_gates_, 2 * NH, NH, stream_));
  }

  for (int e = Em; e < E; ++e) {  // each sLSTM expert's cell (dr, dbias: its own, written)
    const int64_t r0 = expert_offset(e), n = expert_rows(e);
    if (n == 0) continue;
    const std::string p = slstm_expert(e);
    moxe::slstm::BackwardParams<T, float> cell{};
    cell.dr = grads_(p + "r");
    cell.dbias = grads_(p + "bias");
    if (!stateful) {
      cell.fwd = expert_slstm_params(e, 1, n, e_wx_ + r0 * 4 * D, e_h_ + r0 * D);
      cell.dy = ed_h_ + r0 * D;
      cell.dwx = ed_wx_ + r0 * 4 * D;
      MOXE_RETURN_IF_ERROR(slstm_cell_backward(cell));
      continue;
    }
    // the padded batch again (the forward's buffer holds the last sLSTM expert's)
    const int64_t* seg = segments_ + int64_t(e) * B;
    const int64_t longest = longest_run(e);
    MOXE_RETURN_IF_ERROR(rows_to_padded(e_wx_, r0, n, 4 * D, sequence_of_row_, seg, B, longest, e_wx_pad_, stream_));
    MOXE_RETURN_IF_ERROR(rows_to_padded(ed_h_, r0, n, D, sequence_of_row_, seg, B, longest, ed_y_pad_, stream_));
    cell.fwd = expert_slstm_params(e, longest, B, e_wx_pad_, e_y_pad_);
    cell.dy = ed_y_pad_;
    cell.dwx = ed_wx_pad_;
    MOXE_RETURN_IF_ERROR(moxe::slstm::sequence_backward(cell, workspace_, workspace_bytes_, stream_));
    MOXE_RETURN_IF_ERROR(padded_to_rows(ed_wx_pad_, r0, n, 4 * D, sequence_of_row_, seg, B, ed_wx_, stream_));
  }

  for (int e = 0; e < E; ++e) {  // the input projections and LN(xe): dxp += 
    const int64_t r0 = expert_offset(e), n = expert_rows(e);
    if (n == 0) continue;
    const std::string p = e < Em ? mlstm_expert(e) : slstm_expert(e);
    const T* xn = e_xn_ + r0 * D;
    T* dxn = ed_xn_ + r0 * D;
    if (e < Em) {
      MOXE_RETURN_IF_ERROR(linear_bwd(xn, D, n, D, p + "w_qkv", "", 3 * D, ed_qkv_ + r0 * 3 * D, 3 * D, dxn, D, false));
      MOXE_RETURN_IF_ERROR(linear_bwd(xn, D, n, D, p + "w_gates", p + "b_gates", 2 * NH, ed_gates_ + r0 * 2 * NH,
                                      2 * NH, dxn, D, true));
    } else {
      MOXE_RETURN_IF_ERROR(linear_bwd(xn, D, n, D, p + "w_x", "", 4 * D, ed_wx_ + r0 * 4 * D, 4 * D, dxn, D, false));
    }
    MOXE_RETURN_IF_ERROR(
        norm_bwd(xp_ + r0 * D, D, dxn, D, n, 1, D, p + "norm_w", p + "norm_b", dxp_ + r0 * D, D, true));
  }
  return Status::ok;
}

/// dy -> du_shared_ (written) through every shared expert's f_s(u) - u = W_down hn + b_down
/// (no residual: the delta only), and their weight gradients. Scratch: the routed experts'
/// ed_* buffers (they are done with them; R = T * K >= T rows).
template <class T>
Status DeviceLayer<T>::shared_experts_backward() {
  const int64_t B = c_.batch, S = c_.seq_len, T_ = c_.tokens(), D = c_.d_model, NH = c_.heads, DH = c_.head_dim();
  const int64_t cb = shared_cell_batch(), cs = shared_cell_seq();
  const bool stateful = c_.expert_mode == ExpertMode::stateful;
  for (int s = 0; s < c_.shared_experts; ++s) {
    const SharedExpertTape& t = shared_[std::size_t(s)];
    const std::string p = shared_expert(s);
    MOXE_RETURN_IF_ERROR(linear_bwd(t.hn, D, T_, D, p + "w_down", p + "b_down", D, dy_, D, ed_hn_, D, false));
    MOXE_RETURN_IF_ERROR(norm_bwd(t.h, D, ed_hn_, D, T_, NH, DH, p + "out_norm_w", "", ed_h_, D, false));
    if (shared_mlstm()) {
      MOXE_RETURN_IF_ERROR(rows_to_mlstm(ed_h_, D, 0, cb, cs, NH, DH, ed_h_cell_, stream_));
      moxe::mlstm::BackwardParams<T, float> cell{};
      cell.fwd = shared_mlstm_params(s);
      cell.dh = ed_h_cell_;
      cell.dq = ed_q_;
      cell.dk = ed_k_;
      cell.dv = ed_v_;
      cell.digate = ed_ig_;
      cell.dfgate = ed_fg_;
      MOXE_RETURN_IF_ERROR(mlstm_cell_backward(cell));
      MOXE_RETURN_IF_ERROR(mlstm_to_rows(ed_q_, cb, cs, NH, DH, ed_qkv_, 3 * D, 0, stream_));
      MOXE_RETURN_IF_ERROR(mlstm_to_rows(ed_k_, cb, cs, NH, DH, ed_qkv_, 3 * D, D, stream_));
      MOXE_RETURN_IF_ERROR(mlstm_to_rows(ed_v_, cb, cs, NH, DH, ed_qkv_, 3 * D, 2 * D, stream_));
      MOXE_RETURN_IF_ERROR(mlstm_to_rows(ed_ig_, cb, cs, NH, int64_t(1), ed_gates_, 2 * NH, 0, stream_));
      MOXE_RETURN_IF_ERROR(mlstm_to_rows(ed_fg_, cb, cs, NH, int64_t(1), ed_gates_, 2 * NH, NH, stream_));
      MOXE_RETURN_IF_ERROR(linear_bwd(t.xn, D, T_, D, p + "w_qkv", "", 3 * D, ed_qkv_, 3 * D, ed_xn_, D, false));
      MOXE_RETURN_IF_ERROR(linear_bwd(t.xn, D, T_, D, p + "w_gates", p + "b_gates", 2 * NH, ed_gates_, 2 * NH, ed_xn_,
                                      D, true));
    } else {
      moxe::slstm::BackwardParams<T, float> cell{};
      cell.fwd = shared_slstm_params(s);
      cell.dr = grads_(p + "r");
      cell.dbias = grads_(p + "bias");
      if (stateful) {  // [B, S] -> [S, B] and back, in the padded-batch scratch (S * B = T rows)
        MOXE_RETURN_IF_ERROR(swap_outer(ed_h_, B, S, D, ed_y_pad_, stream_));
        cell.dy = ed_y_pad_;
        cell.dwx = ed_wx_pad_;
      } else {
        cell.dy = ed_h_;
        cell.dwx = ed_wx_;
      }
      MOXE_RETURN_IF_ERROR(slstm_cell_backward(cell));
      if (stateful) MOXE_RETURN_IF_ERROR(swap_outer(ed_wx_pad_, S, B, 4 * D, ed_wx_, stream_));
      MOXE_RETURN_IF_ERROR(linear_bwd(t.xn, D, T_, D, p + "w_x", "", 4 * D, ed_wx_, 4 * D, ed_xn_, D, false));
    }
    MOXE_RETURN_IF_ERROR(norm_bwd(u_, D, ed_xn_, D, T_, 1, D, p + "norm_w", p + "norm_b", du_shared_, D,
                                  /*accumulate=*/s > 0));
  }
  return Status::ok;
}

/// dx3 -> dx2 through the mixer's mLSTM block.
template <class T>
Status DeviceLayer<T>::mlstm_block_backward() {
  const int64_t B = c_.batch, S = c_.seq_len, T_ = c_.tokens(), D = c_.d_model, Di = c_.inner(), NH = c_.heads;
  const int64_t DHi = c_.inner_head_dim();
  const std::string p = "mlstm_block.";
  MOXE_LAYER_CUDA_TRY(cudaMemcpyAsync(dx2_, dx3_, sizeof(T) * T_ * D, cudaMemcpyDeviceToDevice, stream_));
  MOXE_RETURN_IF_ERROR(linear_bwd(m_o_, Di, T_, Di, p + "w_down", p + "b_down", D, dx3_, D, md_o_, Di, false));
  // o = (MHNorm(h) + skip xc) SiLU(z): dhs, dz (into dup's z columns), dxc = dhs skip, dskip
  MOXE_RETURN_IF_ERROR(
      mlstm_block_output_backward(m_hn_, m_xc_, w_(p + "skip"), m_up_, md_o_, T_, Di, md_hs_, md_up_, md_xc_, stream_));
  MOXE_RETURN_IF_ERROR(column_sums(md_hs_, Di, m_xc_, Di, T_, Di, grads_(p + "skip"), reduce_scratch_, stream_));
  MOXE_RETURN_IF_ERROR(norm_bwd(m_h_, Di, md_hs_, Di, T_, NH, DHi, p + "out_norm_w", "", md_h_, Di, false));
  // the cell
  MOXE_RETURN_IF_ERROR(rows_to_mlstm(md_h_, Di, 0, B, S, NH, DHi, md_h_cell_, stream_));
  moxe::mlstm::BackwardParams<T, float> cell{};
  cell.fwd = mixer_mlstm_params();
  cell.dh = md_h_cell_;
  cell.dq = md_q_;
  cell.dk = md_k_;
  cell.dv = md_v_;
  cell.digate = md_ig_;
  cell.dfgate = md_fg_;
  MOXE_RETURN_IF_ERROR(moxe::mlstm::chunkwise_backward(cell, workspace_, workspace_bytes_, stream_));
  MOXE_RETURN_IF_ERROR(mlstm_to_rows(md_q_, B, S, NH, DHi, md_qkv_, 3 * Di, 0, stream_));
  MOXE_RETURN_IF_ERROR(mlstm_to_rows(md_k_, B, S, NH, DHi, md_qkv_, 3 * Di, Di, stream_));
  MOXE_RETURN_IF_ERROR(mlstm_to_rows(md_v_, B, S, NH, DHi, md_qkv_, 3 * Di, 2 * Di, stream_));
  MOXE_RETURN_IF_ERROR(mlstm_to_rows(md_ig_, B, S, NH, int64_t(1), md_gates_, 2 * NH, 0, stream_));
  MOXE_RETURN_IF_ERROR(mlstm_to_rows(md_fg_, B, S, NH, int64_t(1), md_gates_, 2 * NH, NH, stream_));
  // the gates read [q ; k ; v] too
  MOXE_RETURN_IF_ERROR(linear_bwd(m_qkv_, 3 * Di, T_, 3 * Di, p + "w_gates", p + "b_gates", 2 * NH, md_gates_, 2 * NH,
                                  md_qkv_, 3 * Di, true));
  MOXE_RETURN_IF_ERROR(linear_bwd(m_xc_, Di, T_, Di, p + "w_q", "", Di, md_qkv_, 3 * Di, md_xc_, Di, true));
  MOXE_RETURN_IF_ERROR(linear_bwd(m_xc_, Di, T_, Di, p + "w_k", "", Di, md_qkv_ + Di, 3 * Di, md_xc_, Di, true));
  // v reads xm (columns [0, Di) of up): dxm goes straight into dup's xm columns
  MOXE_RETURN_IF_ERROR(
      linear_bwd(m_up_, 2 * Di, T_, Di, p + "w_v", "", Di, md_qkv_ + 2 * Di, 3 * Di, md_up_, 2 * Di, false));
  MOXE_RETURN_IF_ERROR(causal_conv_silu_backward(m_up_, 2 * Di, B, S, Di, w_(p + "conv_w"), w_(p + "conv_b"),
                                                 c_.conv_width, md_xc_, md_conv_, md_up_, 2 * Di,
                                                 grads_(p + "conv_w"), grads_(p + "conv_b"), reduce_scratch_, stream_));
  MOXE_RETURN_IF_ERROR(linear_bwd(m_xn_, D, T_, D, p + "w_up", p + "b_up", 2 * Di, md_up_, 2 * Di, md_xn_, D, false));
  return norm_bwd(x2_, D, md_xn_, D, T_, 1, D, p + "norm_w", p + "norm_b", dx2_, D, true);
}

/// dx2 -> dx through the mixer's sLSTM block (FFN first).
template <class T>
Status DeviceLayer<T>::slstm_block_backward() {
  const int64_t B = c_.batch, S = c_.seq_len, T_ = c_.tokens(), D = c_.d_model, F = c_.ffn_hidden;
  const int64_t NH = c_.heads, DH = c_.head_dim();
  const std::string p = "slstm_block.";
  // x2 = x1 + W_down (GELU(g) * a)
  MOXE_LAYER_CUDA_TRY(cudaMemcpyAsync(dx1_, dx2_, sizeof(T) * T_ * D, cudaMemcpyDeviceToDevice, stream_));
  MOXE_RETURN_IF_ERROR(
      linear_bwd(f_act_, F, T_, F, p + "ffn_down_w", p + "ffn_down_b", D, dx2_, D, sd_act_, F, false));
  MOXE_RETURN_IF_ERROR(gated_gelu_backward(f_up_, sd_act_, T_, F, sd_up_, stream_));
  MOXE_RETURN_IF_ERROR(
      linear_bwd(f_n_, D, T_, D, p + "ffn_up_w", p + "ffn_up_b", 2 * F, sd_up_, 2 * F, sd_fn_, D, false));
  MOXE_RETURN_IF_ERROR(norm_bwd(x1_, D, sd_fn_, D, T_, 1, D, p + "ffn_norm_w", p + "ffn_norm_b", dx1_, D, true));
  // x1 = x + MHNorm(h)
  MOXE_LAYER_CUDA_TRY(cudaMemcpyAsync(dx_, dx1_, sizeof(T) * T_ * D, cudaMemcpyDeviceToDevice, stream_));
  MOXE_RETURN_IF_ERROR(norm_bwd(s_h_, D, dx1_, D, T_, NH, DH, p + "out_norm_w", "", sd_h_, D, false));
  MOXE_RETURN_IF_ERROR(swap_outer(sd_h_, B, S, D, sd_h_cell_, stream_));  // [B, S] -> [S, B]
  moxe::slstm::BackwardParams<T, float> cell{};
  cell.fwd = mixer_slstm_params();
  cell.dy = sd_h_cell_;
  cell.dwx = sd_wx_cell_;
  cell.dr = grads_(p + "r");
  cell.dbias = grads_(p + "bias");
  MOXE_RETURN_IF_ERROR(moxe::slstm::sequence_backward(cell, workspace_, workspace_bytes_, stream_));
  MOXE_RETURN_IF_ERROR(swap_outer(sd_wx_cell_, S, B, 4 * D, sd_wx_, stream_));  // [S, B] -> [B, S]
  // wx = [W_if SiLU(conv4(xn)) ; W_zo xn]
  MOXE_RETURN_IF_ERROR(linear_bwd(s_xn_, D, T_, D, p + "w_zo", "", 2 * D, sd_wx_ + 2 * D, 4 * D, sd_xn_, D, false));
  MOXE_RETURN_IF_ERROR(linear_bwd(s_act_, D, T_, D, p + "w_if", "", 2 * D, sd_wx_, 4 * D, sd_conv_act_, D, false));
  MOXE_RETURN_IF_ERROR(causal_conv_silu_backward(s_xn_, D, B, S, D, w_(p + "conv_w"), w_(p + "conv_b"),
                                                 c_.conv_width, sd_conv_act_, sd_conv_, sd_xn_, D,
                                                 grads_(p + "conv_w"), grads_(p + "conv_b"), reduce_scratch_, stream_));
  return norm_bwd(x_, D, sd_xn_, D, T_, 1, D, p + "norm_w", p + "norm_b", dx_, D, true);
}

}  // namespace moxe_layer::device
