// moxe_jax: the body of every FFI handler, written once for both platforms.
//
// Each function takes a Backend (HostBackend in cpu_handlers.cpp: the host references;
// DeviceBackend in cuda_handlers.cu: the device launchers on XLA's stream with XLA's
// scratch) and the decoded buffers and attributes. It checks shapes and dtypes, fills the
// library's params struct and hands it to `be.run(params)`. The backend supplies:
//   dispatch_float(dtype, op, f)  calls f(Types<T, Acc>{}) for the element types it runs
//   indices_in(buffer, &ptr)      an int64 view of an int32/int64 index array (scratch copy
//                                 for int32), nullptr for an absent buffer
//   indices_out(buffer, &ptr)     where the library writes int64 indices for that result;
//   finish_indices(ptr, buffer)   narrows them into an int32 result
//   zero(ptr, bytes)              zero-fills a result
//   run(params)                   the library call (reference, or launcher with workspace)
#pragma once

#include <cstdint>
#include <limits>
#include <utility>

#include "ffi_common.hpp"
#include "moxe/dispatch/params.hpp"
#include "moxe/mlstm/params.hpp"
#include "moxe/router/params.hpp"
#include "moxe/slstm/params.hpp"

namespace moxe_jax {

#define MOXE_JAX_RETURN_IF_FAILED(check) \
  do {                                   \
    if (!(check).ok()) return (check).error(); \
  } while (0)

#define MOXE_JAX_RETURN_IF_STATUS(expr, op)                       \
  do {                                                            \
    const ::moxe::Status moxe_jax_status_ = (expr);               \
    if (moxe_jax_status_ != ::moxe::Status::ok) return status_error(moxe_jax_status_, op); \
  } while (0)

// ---- mLSTM: chunkwise forward / backward (docs/mlstm.md) --------------------------------

struct MlstmShape {
  int64_t batch, heads, seq_len, dqk, dv, num_segments;
  int64_t slots() const { return num_segments > 0 ? num_segments : batch; }
};

template <class Acc>
inline MlstmShape check_mlstm_inputs(Check& c, DataType t, const AnyBuffer& q, const AnyBuffer& k,
                                     const AnyBuffer& v, const AnyBuffer& igate, const AnyBuffer& fgate,
                                     const AnyBuffer& c0, const AnyBuffer& n0, const AnyBuffer& m0,
                                     const AnyBuffer& seg) {
  MlstmShape s{};
  c.rank(q, "q", 4, "[B, NH, S, DQK]");
  c.rank(v, "v", 4, "[B, NH, S, DV]");
  if (!c.ok()) return s;
  const auto qd = q.dimensions();
  s = MlstmShape{qd[0], qd[1], qd[2], qd[3], v.dimensions()[3], 0};
  c.dtype(q, "q", t);
  c.tensor(k, "k", t, {s.batch, s.heads, s.seq_len, s.dqk});
  c.tensor(v, "v", t, {s.batch, s.heads, s.seq_len, s.dv});
  c.tensor(igate, "igate", t, {s.batch, s.heads, s.seq_len});
  c.tensor(fgate, "fgate", t, {s.batch, s.heads, s.seq_len});
  if (present(seg)) {
    c.rank(seg, "segment_offsets", 1, "[num_segments + 1]");
    if (!c.ok()) return s;
    s.num_segments = seg.dimensions()[0] - 1;
    c.indices(seg, "segment_offsets", {s.num_segments + 1});
    c.require(s.num_segments >= 1, "segment_offsets needs at least one segment ([num_segments + 1])");
    c.require(s.batch == 1, "segment_offsets needs batch 1, got " + std::to_string(s.batch));
  }
  const DataType a = acc_dtype<Acc>();
  c.all_or_none({&c0, &n0, &m0}, "c_init, n_init, m_init");
  c.optional(c0, "c_init", a, {s.slots(), s.heads, s.dqk, s.dv});
  c.optional(n0, "n_init", a, {s.slots(), s.heads, s.dqk});
  c.optional(m0, "m_init", a, {s.slots(), s.heads});
  return s;
}

template <class T, class Acc>
moxe::mlstm::ForwardParams<T, Acc> mlstm_params(const MlstmShape& s, const AnyBuffer& q, const AnyBuffer& k,
                                                const AnyBuffer& v, const AnyBuffer& igate, const AnyBuffer& fgate,
                                                const AnyBuffer& c0, const AnyBuffer& n0, const AnyBuffer& m0,
                                                const int64_t* segment_offsets, double qk_scale, double eps,
                                                int64_t chunk_size) {
  moxe::mlstm::ForwardParams<T, Acc> p{};
  p.dims = moxe::mlstm::Dims{s.batch, s.heads, s.seq_len, s.dqk, s.dv};
  p.q = data<const T>(q);
  p.k = data<const T>(k);
  p.v = data<const T>(v);
  p.igate = data<const T>(igate);
  p.fgate = data<const T>(fgate);
  p.c_init = data<const Acc>(c0);
  p.n_init = data<const Acc>(n0);
  p.m_init = data<const Acc>(m0);
  p.qk_scale = static_cast<Acc>(qk_scale);
  p.eps = static_cast<Acc>(eps);
  p.chunk_size = static_cast<int>(chunk_size);
  p.segment_offsets = segment_offsets;
  p.num_segments = s.num_segments;
  return p;
}

template <class Backend>
ffi::Error mlstm_forward(Backend& be, AnyBuffer q, AnyBuffer k, AnyBuffer v, AnyBuffer igate, AnyBuffer fgate,
                         AnyBuffer c0, AnyBuffer n0, AnyBuffer m0, AnyBuffer seg, double qk_scale, double eps,
                         int64_t chunk_size, ffi::Result<AnyBuffer> h, ffi::Result<AnyBuffer> c_last,
                         ffi::Result<AnyBuffer> n_last, ffi::Result<AnyBuffer> m_last) {
  constexpr const char* op = "mlstm_forward";
  return be.dispatch_float(q.element_type(), op, [&](auto types) -> ffi::Error {
    using T = typename decltype(types)::type;
    using Acc = typename decltype(types)::acc;
    Check c(op);
    const MlstmShape s = check_mlstm_inputs<Acc>(c, q.element_type(), q, k, v, igate, fgate, c0, n0, m0, seg);
    MOXE_JAX_RETURN_IF_FAILED(c);
    const DataType a = acc_dtype<Acc>();
    c.tensor(*h, "h", q.element_type(), {s.batch, s.heads, s.seq_len, s.dv});
    c.all_or_none({&*c_last, &*n_last, &*m_last}, "c_last, n_last, m_last");
    c.optional(*c_last, "c_last", a, {s.slots(), s.heads, s.dqk, s.dv});
    c.optional(*n_last, "n_last", a, {s.slots(), s.heads, s.dqk});
    c.optional(*m_last, "m_last", a, {s.slots(), s.heads});
    MOXE_JAX_RETURN_IF_FAILED(c);
    c.require(chunk_size >= 0 && chunk_size <= std::numeric_limits<int>::max(), "chunk_size out of range");
    MOXE_JAX_RETURN_IF_FAILED(c);
    const int64_t* offsets = nullptr;
    MOXE_JAX_RETURN_IF_STATUS(be.indices_in(seg, &offsets), op);
    // with segments, rows outside every segment (offsets that do not cover [0, S], which
    // the device cannot check) are left unwritten by the library: zeros, not stale memory
    if (present(seg)) MOXE_JAX_RETURN_IF_STATUS(be.zero(data<T>(h), (*h).size_bytes()), op);
    auto p = mlstm_params<T, Acc>(s, q, k, v, igate, fgate, c0, n0, m0, offsets, qk_scale, eps, chunk_size);
    p.h = data<T>(h);
    p.c_last = data<Acc>(c_last);
    p.n_last = data<Acc>(n_last);
    p.m_last = data<Acc>(m_last);
    return status_error(be.run(p), op);
  });
}

template <class Backend>
ffi::Error mlstm_backward(Backend& be, AnyBuffer q, AnyBuffer k, AnyBuffer v, AnyBuffer igate, AnyBuffer fgate,
                          AnyBuffer c0, AnyBuffer n0, AnyBuffer m0, AnyBuffer seg, AnyBuffer dh, AnyBuffer dc_last,
                          AnyBuffer dn_last, AnyBuffer dm_last, double qk_scale, double eps, int64_t chunk_size,
                          ffi::Result<AnyBuffer> dq, ffi::Result<AnyBuffer> dk, ffi::Result<AnyBuffer> dv,
                          ffi::Result<AnyBuffer> digate, ffi::Result<AnyBuffer> dfgate,
                          ffi::Result<AnyBuffer> dc_init, ffi::Result<AnyBuffer> dn_init,
                          ffi::Result<AnyBuffer> dm_init) {
  constexpr const char* op = "mlstm_backward";
  return be.dispatch_float(q.element_type(), op, [&](auto types) -> ffi::Error {
    using T = typename decltype(types)::type;
    using Acc = typename decltype(types)::acc;
    Check c(op);
    const DataType t = q.element_type(), a = acc_dtype<Acc>();
    const MlstmShape s = check_mlstm_inputs<Acc>(c, t, q, k, v, igate, fgate, c0, n0, m0, seg);
    MOXE_JAX_RETURN_IF_FAILED(c);
    c.tensor(dh, "dh", t, {s.batch, s.heads, s.seq_len, s.dv});
    c.all_or_none({&dc_last, &dn_last, &dm_last}, "dc_last, dn_last, dm_last");
    c.optional(dc_last, "dc_last", a, {s.slots(), s.heads, s.dqk, s.dv});
    c.optional(dn_last, "dn_last", a, {s.slots(), s.heads, s.dqk});
    c.optional(dm_last, "dm_last", a, {s.slots(), s.heads});
    c.tensor(*dq, "dq", t, {s.batch, s.heads, s.seq_len, s.dqk});
    c.tensor(*dk, "dk", t, {s.batch, s.heads, s.seq_len, s.dqk});
    c.tensor(*dv, "dv", t, {s.batch, s.heads, s.seq_len, s.dv});
    c.tensor(*digate, "digate", t, {s.batch, s.heads, s.seq_len});
    c.tensor(*dfgate, "dfgate", t, {s.batch, s.heads, s.seq_len});
    c.all_or_none({&*dc_init, &*dn_init, &*dm_init}, "dc_init, dn_init, dm_init");
    c.optional(*dc_init, "dc_init", a, {s.slots(), s.heads, s.dqk, s.dv});
    c.optional(*dn_init, "dn_init", a, {s.slots(), s.heads, s.dqk});
    c.optional(*dm_init, "dm_init", a, {s.slots(), s.heads});
    c.require(!present(*dc_init) || present(c0), "gradients of the initial states need the initial states");
    c.require(chunk_size >= 0 && chunk_size <= std::numeric_limits<int>::max(), "chunk_size out of range");
    MOXE_JAX_RETURN_IF_FAILED(c);
    const int64_t* offsets = nullptr;
    MOXE_JAX_RETURN_IF_STATUS(be.indices_in(seg, &offsets), op);
    if (present(seg))  // rows outside every segment are left unwritten by the library: zeros
      for (auto* g : {&dq, &dk, &dv, &digate, &dfgate})
        MOXE_JAX_RETURN_IF_STATUS(be.zero(data<T>(*g), (**g).size_bytes()), op);
    moxe::mlstm::BackwardParams<T, Acc> b{};
    b.fwd = mlstm_params<T, Acc>(s, q, k, v, igate, fgate, c0, n0, m0, offsets, qk_scale, eps, chunk_size);
    b.dh = data<const T>(dh);
    b.dc_last = data<const Acc>(dc_last);
    b.dn_last = data<const Acc>(dn_last);
    b.dm_last = data<const Acc>(dm_last);
    b.dq = data<T>(dq);
    b.dk = data<T>(dk);
    b.dv = data<T>(dv);
    b.digate = data<T>(digate);
    b.dfgate = data<T>(dfgate);
    b.dc_init = data<Acc>(dc_init);
    b.dn_init = data<Acc>(dn_init);
    b.dm_init = data<Acc>(dm_init);
    return status_error(be.run(b), op);
  });
}

// ---- sLSTM: sequence forward / backward (docs/slstm.md) ---------------------------------

template <class Acc>
inline moxe::slstm::Dims check_slstm_inputs(Check& c, const AnyBuffer& wx, const AnyBuffer& r,
                                            const AnyBuffer& bias, const AnyBuffer& y0, const AnyBuffer& c0,
                                            const AnyBuffer& n0, const AnyBuffer& m0) {
  moxe::slstm::Dims d{};
  c.rank(wx, "wx", 5, "[S, B, 4, NH, DH]");
  if (!c.ok()) return d;
  const auto w = wx.dimensions();
  c.require(w[2] == 4, "wx must be [S, B, 4, NH, DH] (gates i, f, z, o), got shape " + shape_string(w));
  d = moxe::slstm::Dims{w[0], w[1], w[3], w[4]};
  const DataType t = wx.element_type(), a = acc_dtype<Acc>();
  c.tensor(r, "r", t, {d.heads, 4, d.head_dim, d.head_dim});
  c.tensor(bias, "bias", t, {4, d.heads, d.head_dim});
  c.all_or_none({&y0, &c0, &n0, &m0}, "y_init, c_init, n_init, m_init");
  c.optional(y0, "y_init", a, {d.batch, d.heads, d.head_dim});
  c.optional(c0, "c_init", a, {d.batch, d.heads, d.head_dim});
  c.optional(n0, "n_init", a, {d.batch, d.heads, d.head_dim});
  c.optional(m0, "m_init", a, {d.batch, d.heads, d.head_dim});
  return d;
}

template <class T, class Acc>
moxe::slstm::ForwardParams<T, Acc> slstm_params(const moxe::slstm::Dims& d, const AnyBuffer& wx, const AnyBuffer& r,
                                                const AnyBuffer& bias, const AnyBuffer& y0, const AnyBuffer& c0,
                                                const AnyBuffer& n0, const AnyBuffer& m0, int64_t units_per_block) {
  moxe::slstm::ForwardParams<T, Acc> p{};
  p.dims = d;
  p.wx = data<const T>(wx);
  p.r = data<const T>(r);
  p.bias = data<const T>(bias);
  p.y_init = data<const Acc>(y0);
  p.c_init = data<const Acc>(c0);
  p.n_init = data<const Acc>(n0);
  p.m_init = data<const Acc>(m0);
  p.units_per_block = static_cast<int>(units_per_block);
  return p;
}

template <class Backend>
ffi::Error slstm_forward(Backend& be, AnyBuffer wx, AnyBuffer r, AnyBuffer bias, AnyBuffer y0, AnyBuffer c0,
                         AnyBuffer n0, AnyBuffer m0, int64_t units_per_block, ffi::Result<AnyBuffer> y,
                         ffi::Result<AnyBuffer> y_last, ffi::Result<AnyBuffer> c_last,
                         ffi::Result<AnyBuffer> n_last, ffi::Result<AnyBuffer> m_last) {
  constexpr const char* op = "slstm_forward";
  return be.dispatch_float(wx.element_type(), op, [&](auto types) -> ffi::Error {
    using T = typename decltype(types)::type;
    using Acc = typename decltype(types)::acc;
    Check c(op);
    const moxe::slstm::Dims d = check_slstm_inputs<Acc>(c, wx, r, bias, y0, c0, n0, m0);
    MOXE_JAX_RETURN_IF_FAILED(c);
    const DataType a = acc_dtype<Acc>();
    c.tensor(*y, "y", wx.element_type(), {d.seq_len, d.batch, d.heads, d.head_dim});
    c.all_or_none({&*y_last, &*c_last, &*n_last, &*m_last}, "y_last, c_last, n_last, m_last");
    c.optional(*y_last, "y_last", a, {d.batch, d.heads, d.head_dim});
    c.optional(*c_last, "c_last", a, {d.batch, d.heads, d.head_dim});
    c.optional(*n_last, "n_last", a, {d.batch, d.heads, d.head_dim});
    c.optional(*m_last, "m_last", a, {d.batch, d.heads, d.head_dim});
    MOXE_JAX_RETURN_IF_FAILED(c);
    c.require(units_per_block >= 0 && units_per_block <= std::numeric_limits<int>::max(),
              "units_per_block out of range");
    MOXE_JAX_RETURN_IF_FAILED(c);
    auto p = slstm_params<T, Acc>(d, wx, r, bias, y0, c0, n0, m0, units_per_block);
    p.y = data<T>(y);
    p.y_last = data<Acc>(y_last);
    p.c_last = data<Acc>(c_last);
    p.n_last = data<Acc>(n_last);
    p.m_last = data<Acc>(m_last);
    return status_error(be.run(p), op);
  });
}

template <class Backend>
ffi::Error slstm_backward(Backend& be, AnyBuffer wx, AnyBuffer r, AnyBuffer bias, AnyBuffer y0, AnyBuffer c0,
                          AnyBuffer n0, AnyBuffer m0, AnyBuffer dy, AnyBuffer dy_last, AnyBuffer dc_last,
                          AnyBuffer dn_last, AnyBuffer dm_last, int64_t units_per_block,
                          ffi::Result<AnyBuffer> dwx, ffi::Result<AnyBuffer> dr, ffi::Result<AnyBuffer> dbias,
                          ffi::Result<AnyBuffer> dy_init, ffi::Result<AnyBuffer> dc_init,
                          ffi::Result<AnyBuffer> dn_init, ffi::Result<AnyBuffer> dm_init) {
  constexpr const char* op = "slstm_backward";
  return be.dispatch_float(wx.element_type(), op, [&](auto types) -> ffi::Error {
    using T = typename decltype(types)::type;
    using Acc = typename decltype(types)::acc;
    Check c(op);
    const moxe::slstm::Dims d = check_slstm_inputs<Acc>(c, wx, r, bias, y0, c0, n0, m0);
    MOXE_JAX_RETURN_IF_FAILED(c);
    const DataType t = wx.element_type(), a = acc_dtype<Acc>();
    const std::initializer_list<int64_t> state = {d.batch, d.heads, d.head_dim};
    c.tensor(dy, "dy", t, {d.seq_len, d.batch, d.heads, d.head_dim});
    c.all_or_none({&dy_last, &dc_last, &dn_last, &dm_last}, "dy_last, dc_last, dn_last, dm_last");
    c.optional(dy_last, "dy_last", a, state);
    c.optional(dc_last, "dc_last", a, state);
    c.optional(dn_last, "dn_last", a, state);
    c.optional(dm_last, "dm_last", a, state);
    c.tensor(*dwx, "dwx", t, {d.seq_len, d.batch, 4, d.heads, d.head_dim});
    c.tensor(*dr, "dr", t, {d.heads, 4, d.head_dim, d.head_dim});
    c.tensor(*dbias, "dbias", t, {4, d.heads, d.head_dim});
    c.all_or_none({&*dy_init, &*dc_init, &*dn_init, &*dm_init}, "dy_init, dc_init, dn_init, dm_init");
    c.optional(*dy_init, "dy_init", a, state);
    c.optional(*dc_init, "dc_init", a, state);
    c.optional(*dn_init, "dn_init", a, state);
    c.optional(*dm_init, "dm_init", a, state);
    MOXE_JAX_RETURN_IF_FAILED(c);
    moxe::slstm::BackwardParams<T, Acc> b{};
    c.require(units_per_block >= 0 && units_per_block <= std::numeric_limits<int>::max(),
              "units_per_block out of range");
    MOXE_JAX_RETURN_IF_FAILED(c);
    b.fwd = slstm_params<T, Acc>(d, wx, r, bias, y0, c0, n0, m0, units_per_block);
    b.dy = data<const T>(dy);
    b.dy_last = data<const Acc>(dy_last);
    b.dc_last = data<const Acc>(dc_last);
    b.dn_last = data<const Acc>(dn_last);
    b.dm_last = data<const Acc>(dm_last);
    b.dwx = data<T>(dwx);
    b.dr = data<T>(dr);
    b.dbias = data<T>(dbias);
    b.dy_init = data<Acc>(dy_init);
    b.dc_init = data<Acc>(dc_init);
    b.dn_init = data<Acc>(dn_init);
    b.dm_init = data<Acc>(dm_init);
    return status_error(be.run(b), op);
  });
}

// ---- the fused entropy-aware gate (docs/router.md) ----------------------------------------

template <class T, class Acc>
moxe::router::GateForwardParams<T, Acc> gate_params(const AnyBuffer& logits, const AnyBuffer& difficulty_logit,
                                                    int64_t mlstm_experts, int64_t top_k, int64_t modulation,
                                                    double gamma, double tau) {
  moxe::router::GateForwardParams<T, Acc> p{};
  const auto ld = logits.dimensions();
  p.dims = moxe::router::GateDims{ld[0], static_cast<int>(ld[1]), static_cast<int>(mlstm_experts),
                                  static_cast<int>(top_k)};
  p.logits = data<const T>(logits);
  p.difficulty_logit = data<const T>(difficulty_logit);
  p.modulation = static_cast<moxe::router::Modulation>(modulation);
  p.gamma = static_cast<Acc>(gamma);
  p.tau = static_cast<Acc>(tau);
  return p;
}

inline void check_gate_inputs(Check& c, const AnyBuffer& logits, const AnyBuffer& difficulty_logit,
                              int64_t mlstm_experts, int64_t modulation) {
  c.rank(logits, "logits", 2, "[T, E]");
  if (!c.ok()) return;
  const auto ld = logits.dimensions();
  c.require(ld[0] >= 1 && ld[1] >= 1 && ld[1] <= INT32_MAX, "logits must be [T, E] with T, E >= 1");
  c.optional(difficulty_logit, "difficulty_logit", logits.element_type(), {ld[0]});
  c.require(mlstm_experts >= 0 && mlstm_experts <= ld[1],
            "mlstm_experts must be in [0, " + std::to_string(ld[1]) + "], got " + std::to_string(mlstm_experts));
  c.require(modulation >= 0 && modulation <= 3,
            "modulation must be 0 (none), 1 (standard), 2 (proportional) or 3 (masked), got " +
                std::to_string(modulation));
}

template <class Backend>
ffi::Error gate_forward(Backend& be, AnyBuffer logits, AnyBuffer difficulty_logit, int64_t mlstm_experts,
                        int64_t top_k, int64_t modulation, double gamma, double tau, ffi::Result<AnyBuffer> probs,
                        ffi::Result<AnyBuffer> lse, ffi::Result<AnyBuffer> entropy,
                        ffi::Result<AnyBuffer> difficulty, ffi::Result<AnyBuffer> topk_idx,
                        ffi::Result<AnyBuffer> topk_prob, ffi::Result<AnyBuffer> topk_weight,
                        ffi::Result<AnyBuffer> expert_counts, ffi::Result<AnyBuffer> losses,
                        ffi::Result<AnyBuffer> totals) {
  constexpr const char* op = "gate_forward";
  return be.dispatch_float(logits.element_type(), op, [&](auto types) -> ffi::Error {
    using T = typename decltype(types)::type;
    using Acc = typename decltype(types)::acc;
    Check c(op);
    check_gate_inputs(c, logits, difficulty_logit, mlstm_experts, modulation);
    MOXE_JAX_RETURN_IF_FAILED(c);
    const int64_t tokens = logits.dimensions()[0], experts = logits.dimensions()[1];
    c.require(top_k >= 1 && top_k <= experts,
              "top_k must be in [1, " + std::to_string(experts) + "], got " + std::to_string(top_k));
    const DataType a = acc_dtype<Acc>();
    c.tensor(*probs, "probs", a, {tokens, experts});
    c.tensor(*lse, "lse", a, {tokens});
    c.tensor(*entropy, "entropy", a, {tokens});
    c.tensor(*difficulty, "difficulty", a, {tokens});
    c.tensor(*topk_idx, "topk_idx", DataType::S32, {tokens, top_k});
    c.tensor(*topk_prob, "topk_prob", a, {tokens, top_k});
    c.tensor(*topk_weight, "topk_weight", a, {tokens, top_k});
    c.tensor(*expert_counts, "expert_counts", DataType::S32, {experts});
    c.tensor(*losses, "losses", a, {4});
    c.tensor(*totals, "totals", a, {experts + 4});
    MOXE_JAX_RETURN_IF_FAILED(c);
    auto p = gate_params<T, Acc>(logits, difficulty_logit, mlstm_experts, top_k, modulation, gamma, tau);
    p.probs = data<Acc>(probs);
    p.lse = data<Acc>(lse);
    p.entropy = data<Acc>(entropy);
    p.topk_idx = data<int32_t>(topk_idx);
    p.topk_prob = data<Acc>(topk_prob);
    p.topk_weight = data<Acc>(topk_weight);
    p.expert_counts = data<int32_t>(expert_counts);
    p.losses = data<Acc>(losses);
    p.totals = data<Acc>(totals);
    if (present(difficulty_logit)) {
      p.difficulty = data<Acc>(difficulty);
    } else {  // no difficulty head: d = 0 (the library leaves the output alone)
      MOXE_JAX_RETURN_IF_STATUS(be.zero(data<Acc>(difficulty), (*difficulty).size_bytes()), op);
    }
    return status_error(be.run(p), op);
  });
}

/// dlosses [4] is the upstream gradient of the losses: the library reads it as the four
/// coefficients (GateBackwardParams::loss_grad), on the device without a host copy. totals
/// [E + 4] are the forward's batch sums (GateForwardParams::totals): the backward reads them
/// instead of the logits and the top-k a second time (one launch on the device, no scratch).
template <class Backend>
ffi::Error gate_backward(Backend& be, AnyBuffer logits, AnyBuffer difficulty_logit, AnyBuffer topk_idx,
                         AnyBuffer topk_prob, AnyBuffer dweight, AnyBuffer dlosses, AnyBuffer totals,
                         int64_t mlstm_experts,
                         int64_t modulation, double gamma, double tau, ffi::Result<AnyBuffer> dlogits,
                         ffi::Result<AnyBuffer> ddifficulty_logit) {
  constexpr const char* op = "gate_backward";
  return be.dispatch_float(logits.element_type(), op, [&](auto types) -> ffi::Error {
    using T = typename decltype(types)::type;
    using Acc = typename decltype(types)::acc;
    Check c(op);
    check_gate_inputs(c, logits, difficulty_logit, mlstm_experts, modulation);
    c.rank(topk_idx, "topk_idx", 2, "[T, K]");
    MOXE_JAX_RETURN_IF_FAILED(c);
    const int64_t tokens = logits.dimensions()[0], experts = logits.dimensions()[1];
    const int64_t top_k = topk_idx.dimensions()[1];
    const DataType a = acc_dtype<Acc>();
    c.tensor(topk_idx, "topk_idx", DataType::S32, {tokens, top_k});
    c.tensor(topk_prob, "topk_prob", a, {tokens, top_k});
    c.tensor(dweight, "dweight", a, {tokens, top_k});
    c.tensor(dlosses, "dlosses", a, {4});
    c.tensor(totals, "totals", a, {experts + 4});
    c.tensor(*dlogits, "dlogits", logits.element_type(), {tokens, experts});
    if (present(difficulty_logit))
      c.tensor(*ddifficulty_logit, "ddifficulty_logit", logits.element_type(), {tokens});
    else
      c.require(!present(*ddifficulty_logit), "ddifficulty_logit is asked for without a difficulty_logit");
    MOXE_JAX_RETURN_IF_FAILED(c);
    moxe::router::GateBackwardParams<T, Acc> b{};
    b.fwd = gate_params<T, Acc>(logits, difficulty_logit, mlstm_experts, top_k, modulation, gamma, tau);
    b.fwd.topk_idx = data<int32_t>(topk_idx);
    b.fwd.topk_prob = data<Acc>(topk_prob);
    b.fwd.totals = data<Acc>(totals);
    b.dweight = data<const Acc>(dweight);
    b.loss_grad = data<const Acc>(dlosses);
    b.dlogits = data<T>(dlogits);
    b.ddifficulty_logit = data<T>(ddifficulty_logit);
    return status_error(be.run(b), op);
  });
}

// ---- dispatch: routing map, permute, unpermute and their backwards (docs/dispatch.md) -----

inline moxe::dispatch::Dims dispatch_dims(Check& c, const AnyBuffer& row_map, int64_t hidden, int64_t experts,
                                          int64_t align, int64_t capacity = -1) {
  moxe::dispatch::Dims d{};
  c.rank(row_map, "row_map", 2, "[T, K]");
  c.require(hidden >= 1 && hidden <= INT32_MAX, "the hidden size must be in [1, 2^31), got " + std::to_string(hidden));
  c.require(experts >= 1 && experts <= INT32_MAX, "experts must be >= 1, got " + std::to_string(experts));
  c.require(align >= 1 && align <= INT32_MAX, "align must be >= 1, got " + std::to_string(align));
  c.require(capacity >= -1, "capacity must be -1 (no limit) or >= 0, got " + std::to_string(capacity));
  if (!c.ok()) return d;
  d.tokens = row_map.dimensions()[0];
  d.hidden = static_cast<int>(hidden);
  d.experts = static_cast<int>(experts);
  d.top_k = static_cast<int>(row_map.dimensions()[1]);
  d.capacity = capacity;
  d.align = static_cast<int>(align);
  return d;
}

template <class Backend>
ffi::Error routing_map(Backend& be, AnyBuffer topk_idx, int64_t experts, int64_t capacity, int64_t align,
                       ffi::Result<AnyBuffer> row_map, ffi::Result<AnyBuffer> expert_offsets,
                       ffi::Result<AnyBuffer> expert_counts) {
  constexpr const char* op = "routing_map";
  Check c(op);
  c.rank(topk_idx, "topk_idx", 2, "[T, K]");
  c.dtype(topk_idx, "topk_idx", DataType::S32);
  const moxe::dispatch::Dims d = dispatch_dims(c, topk_idx, /*hidden (unused)=*/1, experts, align, capacity);
  MOXE_JAX_RETURN_IF_FAILED(c);
  c.indices(*row_map, "row_map", {d.tokens, d.top_k});
  c.indices(*expert_offsets, "expert_offsets", {experts + 1});
  c.tensor(*expert_counts, "expert_counts", DataType::S32, {experts});
  MOXE_JAX_RETURN_IF_FAILED(c);
  moxe::dispatch::RoutingMapParams p{};
  p.dims = d;
  p.topk_idx = data<const int32_t>(topk_idx);
  MOXE_JAX_RETURN_IF_STATUS(be.indices_out(*row_map, &p.row_map), op);
  MOXE_JAX_RETURN_IF_STATUS(be.indices_out(*expert_offsets, &p.expert_offsets), op);
  p.expert_counts = data<int32_t>(expert_counts);
  MOXE_JAX_RETURN_IF_STATUS(be.run(p), op);
  MOXE_JAX_RETURN_IF_STATUS(be.finish_indices(p.row_map, *row_map), op);
  return status_error(be.finish_indices(p.expert_offsets, *expert_offsets), op);
}

template <class Backend>
ffi::Error permute(Backend& be, AnyBuffer x, AnyBuffer row_map, int64_t experts, int64_t align,
                   ffi::Result<AnyBuffer> xp) {
  constexpr const char* op = "permute";
  return be.dispatch_float(x.element_type(), op, [&](auto types) -> ffi::Error {
    using T = typename decltype(types)::type;
    Check c(op);
    c.rank(x, "x", 2, "[T, H]");
    MOXE_JAX_RETURN_IF_FAILED(c);
    const moxe::dispatch::Dims d = dispatch_dims(c, row_map, x.dimensions()[1], experts, align);
    MOXE_JAX_RETURN_IF_FAILED(c);
    c.indices(row_map, "row_map", {x.dimensions()[0], d.top_k});
    c.tensor(*xp, "xp", x.element_type(), {moxe::dispatch::permuted_rows(d), d.hidden});
    MOXE_JAX_RETURN_IF_FAILED(c);
    moxe::dispatch::PermuteParams<T> p{};
    p.dims = d;
    p.x = data<const T>(x);
    MOXE_JAX_RETURN_IF_STATUS(be.indices_in(row_map, &p.row_map), op);
    p.expert_offsets = nullptr;  // every unused row is zero: the result is fully defined
    p.xp = data<T>(xp);
    return status_error(be.run(p), op);
  });
}

template <class Backend>
ffi::Error permute_backward(Backend& be, AnyBuffer dxp, AnyBuffer row_map, int64_t experts, int64_t align,
                            ffi::Result<AnyBuffer> dx) {
  constexpr const char* op = "permute_backward";
  return be.dispatch_float(dxp.element_type(), op, [&](auto types) -> ffi::Error {
    using T = typename decltype(types)::type;
    Check c(op);
    c.rank(dxp, "dxp", 2, "[rows, H]");
    MOXE_JAX_RETURN_IF_FAILED(c);
    const moxe::dispatch::Dims d = dispatch_dims(c, row_map, dxp.dimensions()[1], experts, align);
    MOXE_JAX_RETURN_IF_FAILED(c);
    c.indices(row_map, "row_map", {d.tokens, d.top_k});
    c.shape(dxp, "dxp", {moxe::dispatch::permuted_rows(d), d.hidden});
    c.tensor(*dx, "dx", dxp.element_type(), {d.tokens, d.hidden});
    MOXE_JAX_RETURN_IF_FAILED(c);
    moxe::dispatch::PermuteBackwardParams<T> p{};
    p.dims = d;
    p.dxp = data<const T>(dxp);
    MOXE_JAX_RETURN_IF_STATUS(be.indices_in(row_map, &p.row_map), op);
    p.dx = data<T>(dx);
    return status_error(be.run(p), op);
  });
}

template <class Acc>
inline moxe::dispatch::Dims check_unpermute_inputs(Check& c, const AnyBuffer& yp, const AnyBuffer& row_map,
                                                   const AnyBuffer& weight, int64_t experts, int64_t align) {
  c.rank(yp, "yp", 2, "[rows, H]");
  if (!c.ok()) return {};
  const moxe::dispatch::Dims d = dispatch_dims(c, row_map, yp.dimensions()[1], experts, align);
  if (!c.ok()) return d;
  c.indices(row_map, "row_map", {d.tokens, d.top_k});
  c.shape(yp, "yp", {moxe::dispatch::permuted_rows(d), d.hidden});
  c.tensor(weight, "weight", acc_dtype<Acc>(), {d.tokens, d.top_k});
  return d;
}

template <class Backend>
ffi::Error unpermute(Backend& be, AnyBuffer yp, AnyBuffer row_map, AnyBuffer weight, int64_t experts, int64_t align,
                     ffi::Result<AnyBuffer> y) {
  constexpr const char* op = "unpermute";
  return be.dispatch_float(yp.element_type(), op, [&](auto types) -> ffi::Error {
    using T = typename decltype(types)::type;
    using Acc = typename decltype(types)::acc;
    Check c(op);
    const moxe::dispatch::Dims d = check_unpermute_inputs<Acc>(c, yp, row_map, weight, experts, align);
    MOXE_JAX_RETURN_IF_FAILED(c);
    c.tensor(*y, "y", yp.element_type(), {d.tokens, d.hidden});
    MOXE_JAX_RETURN_IF_FAILED(c);
    moxe::dispatch::UnpermuteParams<T, Acc> p{};
    p.dims = d;
    p.yp = data<const T>(yp);
    MOXE_JAX_RETURN_IF_STATUS(be.indices_in(row_map, &p.row_map), op);
    p.weight = data<const Acc>(weight);
    p.y = data<T>(y);
    return status_error(be.run(p), op);
  });
}

template <class Backend>
ffi::Error unpermute_backward(Backend& be, AnyBuffer yp, AnyBuffer row_map, AnyBuffer weight, AnyBuffer dy,
                              int64_t experts, int64_t align, ffi::Result<AnyBuffer> dyp,
                              ffi::Result<AnyBuffer> dweight) {
  constexpr const char* op = "unpermute_backward";
  return be.dispatch_float(yp.element_type(), op, [&](auto types) -> ffi::Error {
    using T = typename decltype(types)::type;
    using Acc = typename decltype(types)::acc;
    Check c(op);
    const moxe::dispatch::Dims d = check_unpermute_inputs<Acc>(c, yp, row_map, weight, experts, align);
    MOXE_JAX_RETURN_IF_FAILED(c);
    c.tensor(dy, "dy", yp.element_type(), {d.tokens, d.hidden});
    c.tensor(*dyp, "dyp", yp.element_type(), {moxe::dispatch::permuted_rows(d), d.hidden});
    c.tensor(*dweight, "dweight", acc_dtype<Acc>(), {d.tokens, d.top_k});
    MOXE_JAX_RETURN_IF_FAILED(c);
    moxe::dispatch::UnpermuteBackwardParams<T, Acc> b{};
    b.fwd.dims = d;
    b.fwd.yp = data<const T>(yp);
    MOXE_JAX_RETURN_IF_STATUS(be.indices_in(row_map, &b.fwd.row_map), op);
    b.fwd.weight = data<const Acc>(weight);
    b.dy = data<const T>(dy);
    b.dyp = data<T>(dyp);
    b.dweight = data<Acc>(dweight);
    b.expert_offsets = nullptr;  // every unused row of dyp is zero
    return status_error(be.run(b), op);
  });
}

// ---- the bindings: the same arguments, attributes and results on every platform ----------
// `base` is ffi::Ffi::Bind() on the CPU, and Bind() with the stream and the scratch
// allocator as context on CUDA.

template <class B>
auto mlstm_forward_binding(B base) {
  return std::move(base).template Arg<AnyBuffer>()  // q
      .template Arg<AnyBuffer>()         // k
      .template Arg<AnyBuffer>()         // v
      .template Arg<AnyBuffer>()         // igate
      .template Arg<AnyBuffer>()         // fgate
      .template Arg<AnyBuffer>()         // c_init
      .template Arg<AnyBuffer>()         // n_init
      .template Arg<AnyBuffer>()         // m_init
      .template Arg<AnyBuffer>()         // segment_offsets
      .template Attr<double>("qk_scale")
      .template Attr<double>("eps")
      .template Attr<int64_t>("chunk_size")
      .template Ret<AnyBuffer>()   // h
      .template Ret<AnyBuffer>()   // c_last
      .template Ret<AnyBuffer>()   // n_last
      .template Ret<AnyBuffer>();  // m_last
}

template <class B>
auto mlstm_backward_binding(B base) {
  return std::move(base).template Arg<AnyBuffer>()  // q
      .template Arg<AnyBuffer>()         // k
      .template Arg<AnyBuffer>()         // v
      .template Arg<AnyBuffer>()         // igate
      .template Arg<AnyBuffer>()         // fgate
      .template Arg<AnyBuffer>()         // c_init
      .template Arg<AnyBuffer>()         // n_init
      .template Arg<AnyBuffer>()         // m_init
      .template Arg<AnyBuffer>()         // segment_offsets
      .template Arg<AnyBuffer>()         // dh
      .template Arg<AnyBuffer>()         // dc_last
      .template Arg<AnyBuffer>()         // dn_last
      .template Arg<AnyBuffer>()         // dm_last
      .template Attr<double>("qk_scale")
      .template Attr<double>("eps")
      .template Attr<int64_t>("chunk_size")
      .template Ret<AnyBuffer>()   // dq
      .template Ret<AnyBuffer>()   // dk
      .template Ret<AnyBuffer>()   // dv
      .template Ret<AnyBuffer>()   // digate
      .template Ret<AnyBuffer>()   // dfgate
      .template Ret<AnyBuffer>()   // dc_init
      .template Ret<AnyBuffer>()   // dn_init
      .template Ret<AnyBuffer>();  // dm_init
}

template <class B>
auto slstm_forward_binding(B base) {
  return std::move(base).template Arg<AnyBuffer>()  // wx
      .template Arg<AnyBuffer>()         // r
      .template Arg<AnyBuffer>()         // bias
      .template Arg<AnyBuffer>()         // y_init
      .template Arg<AnyBuffer>()         // c_init
      .template Arg<AnyBuffer>()         // n_init
      .template Arg<AnyBuffer>()         // m_init
      .template Attr<int64_t>("units_per_block")
      .template Ret<AnyBuffer>()   // y
      .template Ret<AnyBuffer>()   // y_last
      .template Ret<AnyBuffer>()   // c_last
      .template Ret<AnyBuffer>()   // n_last
      .template Ret<AnyBuffer>();  // m_last
}

template <class B>
auto slstm_backward_binding(B base) {
  return std::move(base).template Arg<AnyBuffer>()  // wx
      .template Arg<AnyBuffer>()         // r
      .template Arg<AnyBuffer>()         // bias
      .template Arg<AnyBuffer>()         // y_init
      .template Arg<AnyBuffer>()         // c_init
      .template Arg<AnyBuffer>()         // n_init
      .template Arg<AnyBuffer>()         // m_init
      .template Arg<AnyBuffer>()         // dy
      .template Arg<AnyBuffer>()         // dy_last
      .template Arg<AnyBuffer>()         // dc_last
      .template Arg<AnyBuffer>()         // dn_last
      .template Arg<AnyBuffer>()         // dm_last
      .template Attr<int64_t>("units_per_block")
      .template Ret<AnyBuffer>()   // dwx
      .template Ret<AnyBuffer>()   // dr
      .template Ret<AnyBuffer>()   // dbias
      .template Ret<AnyBuffer>()   // dy_init
      .template Ret<AnyBuffer>()   // dc_init
      .template Ret<AnyBuffer>()   // dn_init
      .template Ret<AnyBuffer>();  // dm_init
}

template <class B>
auto gate_forward_binding(B base) {
  return std::move(base).template Arg<AnyBuffer>()  // logits
      .template Arg<AnyBuffer>()         // difficulty_logit
      .template Attr<int64_t>("mlstm_experts")
      .template Attr<int64_t>("top_k")
      .template Attr<int64_t>("modulation")
      .template Attr<double>("gamma")
      .template Attr<double>("tau")
      .template Ret<AnyBuffer>()   // probs
      .template Ret<AnyBuffer>()   // lse
      .template Ret<AnyBuffer>()   // entropy
      .template Ret<AnyBuffer>()   // difficulty
      .template Ret<AnyBuffer>()   // topk_idx
      .template Ret<AnyBuffer>()   // topk_prob
      .template Ret<AnyBuffer>()   // topk_weight
      .template Ret<AnyBuffer>()   // expert_counts
      .template Ret<AnyBuffer>()   // losses
      .template Ret<AnyBuffer>();  // totals
}

template <class B>
auto gate_backward_binding(B base) {
  return std::move(base).template Arg<AnyBuffer>()  // logits
      .template Arg<AnyBuffer>()         // difficulty_logit
      .template Arg<AnyBuffer>()         // topk_idx
      .template Arg<AnyBuffer>()         // topk_prob
      .template Arg<AnyBuffer>()         // dweight
      .template Arg<AnyBuffer>()         // dlosses
      .template Arg<AnyBuffer>()         // totals
      .template Attr<int64_t>("mlstm_experts")
      .template Attr<int64_t>("modulation")
      .template Attr<double>("gamma")
      .template Attr<double>("tau")
      .template Ret<AnyBuffer>()   // dlogits
      .template Ret<AnyBuffer>();  // ddifficulty_logit
}

template <class B>
auto routing_map_binding(B base) {
  return std::move(base).template Arg<AnyBuffer>()  // topk_idx
      .template Attr<int64_t>("experts")
      .template Attr<int64_t>("capacity")
      .template Attr<int64_t>("align")
      .template Ret<AnyBuffer>()   // row_map
      .template Ret<AnyBuffer>()   // expert_offsets
      .template Ret<AnyBuffer>();  // expert_counts
}

template <class B>
auto permute_binding(B base) {  // also permute_backward: (x or dxp, row_map) -> xp or dx
  return std::move(base).template Arg<AnyBuffer>()
      .template Arg<AnyBuffer>()
      .template Attr<int64_t>("experts")
      .template Attr<int64_t>("align")
      .template Ret<AnyBuffer>();
}

template <class B>
auto unpermute_binding(B base) {
  return std::move(base).template Arg<AnyBuffer>()  // yp
      .template Arg<AnyBuffer>()         // row_map
      .template Arg<AnyBuffer>()         // weight
      .template Attr<int64_t>("experts")
      .template Attr<int64_t>("align")
      .template Ret<AnyBuffer>();  // y
}

template <class B>
auto unpermute_backward_binding(B base) {
  return std::move(base).template Arg<AnyBuffer>()  // yp
      .template Arg<AnyBuffer>()         // row_map
      .template Arg<AnyBuffer>()         // weight
      .template Arg<AnyBuffer>()         // dy
      .template Attr<int64_t>("experts")
      .template Attr<int64_t>("align")
      .template Ret<AnyBuffer>()   // dyp
      .template Ret<AnyBuffer>();  // dweight
}

/// Every handler: (symbol suffix, the body above, its binding), by family. Each platform's
/// files turn the lists into `MoxeJax<Name><Platform>` symbols.
#define MOXE_JAX_MLSTM_HANDLERS(X)                         \
  X(MlstmForward, mlstm_forward, mlstm_forward_binding)    \
  X(MlstmBackward, mlstm_backward, mlstm_backward_binding)
#define MOXE_JAX_SLSTM_HANDLERS(X)                         \
  X(SlstmForward, slstm_forward, slstm_forward_binding)    \
  X(SlstmBackward, slstm_backward, slstm_backward_binding)
#define MOXE_JAX_GATE_HANDLERS(X)                          \
  X(GateForward, gate_forward, gate_forward_binding)       \
  X(GateBackward, gate_backward, gate_backward_binding)
#define MOXE_JAX_DISPATCH_HANDLERS(X)                                \
  X(RoutingMap, routing_map, routing_map_binding)                    \
  X(Permute, permute, permute_binding)                               \
  X(PermuteBackward, permute_backward, permute_binding)              \
  X(Unpermute, unpermute, unpermute_binding)                         \
  X(UnpermuteBackward, unpermute_backward, unpermute_backward_binding)
#define MOXE_JAX_FOR_EACH_HANDLER(X) \
  MOXE_JAX_MLSTM_HANDLERS(X)         \
  MOXE_JAX_SLSTM_HANDLERS(X)         \
  MOXE_JAX_GATE_HANDLERS(X)          \
  MOXE_JAX_DISPATCH_HANDLERS(X)

}  // namespace moxe_jax
