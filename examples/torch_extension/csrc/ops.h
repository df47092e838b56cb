// moxe_torch: the operators the extension exposes, in ATen types (one .cu file per family).
// Absent optionals are None in Python; undefined tensors in the results come back as None.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace moxe_torch {

using OptTensor = std::optional<at::Tensor>;

// ---- mLSTM (moxe::mlstm::chunkwise_forward / chunkwise_backward) ------------------------
// q, k [B, NH, S, DQK]; v [B, NH, S, DV]; igate, fgate [B, NH, S] (float/half/bf16);
// states float32: c [N, NH, DQK, DV], n [N, NH, DQK], m [N, NH] with N = B, or the number
// of segments when segment_offsets (int64 [N + 1], batch 1) is given.
// batch_per_pass > 0: the batch in passes of that many entries (workspace / passes).
// keep_tape: the forward also returns its tape (ForwardParams::tape: uint8
// [chunkwise_tape_size]), which the backward takes to skip its gate scan and state walk.
// Returns h, c_last, n_last, m_last, tape (c/n/m_last None unless return_last_states, tape
// None unless keep_tape).
std::vector<at::Tensor> mlstm_chunkwise_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                const at::Tensor& igate, const at::Tensor& fgate,
                                                const OptTensor& c_init, const OptTensor& n_init,
                                                const OptTensor& m_init, const OptTensor& segment_offsets,
                                                double qk_scale, double eps, int64_t chunk_size,
                                                bool return_last_states, int64_t batch_per_pass, bool keep_tape);

// tape: the forward's (keep_tape), untouched since, with the same inputs and settings; None:
// the backward recomputes it. Returns dq, dk, dv, digate, dfgate, dc_init, dn_init, dm_init
// (the last three None unless init_grads, which needs the initial states).
std::vector<at::Tensor> mlstm_chunkwise_backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 const at::Tensor& igate, const at::Tensor& fgate,
                                                 const OptTensor& c_init, const OptTensor& n_init,
                                                 const OptTensor& m_init, const OptTensor& segment_offsets,
                                                 const at::Tensor& dh, const OptTensor& dc_last,
                                                 const OptTensor& dn_last, const OptTensor& dm_last,
                                                 double qk_scale, double eps, int64_t chunk_size, bool init_grads,
                                                 int64_t batch_per_pass, const OptTensor& tape);

// ---- sLSTM (moxe::slstm::sequence_forward / sequence_backward) --------------------------
// wx [S, B, 4, NH, DH]; r [NH, 4, DH, DH]; bias [4, NH, DH] (float/half/bf16); states
// y, c, n, m float32 [B, NH, DH]. Returns y [S, B, NH, DH], y_last, c_last, n_last, m_last.
std::vector<at::Tensor> slstm_sequence_forward(const at::Tensor& wx, const at::Tensor& r, const at::Tensor& bias,
                                               const OptTensor& y_init, const OptTensor& c_init,
                                               const OptTensor& n_init, const OptTensor& m_init,
                                               bool return_last_states, int64_t units_per_block);

// dy_last, dc_last, dn_last, dm_last: upstream gradients of the final states (all or none).
// Returns dwx, dr, dbias, dy_init, dc_init, dn_init, dm_init (the last four None unless
// init_grads).
std::vector<at::Tensor> slstm_sequence_backward(const at::Tensor& wx, const at::Tensor& r, const at::Tensor& bias,
                                                const OptTensor& y_init, const OptTensor& c_init,
                                                const OptTensor& n_init, const OptTensor& m_init,
                                                const at::Tensor& dy, const OptTensor& dy_last,
                                                const OptTensor& dc_last, const OptTensor& dn_last,
                                                const OptTensor& dm_last, bool init_grads, int64_t units_per_block);

// ---- the MoxE gate (moxe::router::gate_forward / gate_backward) ------------------------
// logits [T, E] (unit stride along E, any row stride >= E), difficulty_logit [T] (any
// stride) or None; modulation 0 none, 1 standard, 2 proportional, 3 masked.
// Returns probs [T, E], lse, entropy, difficulty [T] (float32), topk_idx [T, K] (int32),
// topk_prob, topk_weight [T, K] (float32), expert_counts [E] (int32), losses [4] (float32:
// L_z, L_lb, L_d, L_g).
std::vector<at::Tensor> gate_forward(const at::Tensor& logits, const OptTensor& difficulty_logit,
                                     int64_t mlstm_experts, int64_t top_k, int64_t modulation, double gamma,
                                     double tau);

// The loss coefficients: dlosses (float32 [4] on the device: the upstream gradient of
// the losses, read by the kernel, no host sync) when given, else c_z, c_lb, c_d, c_g.
// Returns dlogits [T, E] (contiguous) and ddifficulty_logit [T] (None without the head).
std::vector<at::Tensor> gate_backward(const at::Tensor& logits, const OptTensor& difficulty_logit,
                                      const at::Tensor& topk_idx, const at::Tensor& topk_prob,
                                      const OptTensor& dweight, double c_z, double c_lb, double c_d, double c_g,
                                      const OptTensor& dlosses, int64_t mlstm_experts, int64_t modulation,
                                      double gamma, double tau);

// ---- dispatch (moxe::dispatch) ------------------------------------------------------------
// topk_idx [T, K] int32 (expert or -1). capacity -1: no limit. Returns row_map [T, K]
// int64, expert_offsets [E + 1] int64, expert_counts [E] int32.
std::vector<at::Tensor> routing_map(const at::Tensor& topk_idx, int64_t experts, int64_t capacity, int64_t align);

// xp [T*K + E*(align-1), H]: xp[row_map[t,k]] = x[t]. With expert_offsets, rows from
// expert_offsets[E] on are left uninitialised; without, every unused row is zero.
at::Tensor permute(const at::Tensor& x, const at::Tensor& row_map, const OptTensor& expert_offsets,
                   int64_t experts, int64_t align);

// dx [T, H] = sum_k dxp[row_map[t,k]].
at::Tensor permute_backward(const at::Tensor& dxp, const at::Tensor& row_map, int64_t experts, int64_t align);

// y [T, H] = sum_k weight[t,k] yp[row_map[t,k]]; weight float32 [T, K].
at::Tensor unpermute(const at::Tensor& yp, const at::Tensor& row_map, const at::Tensor& weight, int64_t experts,
                     int64_t align);

// Returns dyp (unused rows zero; with expert_offsets only below expert_offsets[E]) and
// dweight [T, K] float32.
std::vector<at::Tensor> unpermute_backward(const at::Tensor& yp, const at::Tensor& row_map, const at::Tensor& weight,
                                           const at::Tensor& dy, const OptTensor& expert_offsets, int64_t experts,
                                           int64_t align);

}  // namespace moxe_torch
