// moxe::mlstm: shapes and parameter structs of the mLSTM cell (see docs/mlstm.md).
//
// Layouts (row-major, outermost first): q, k [B, NH, S, DQK]; v, h [B, NH, S, DV];
// igate, fgate [B, NH, S] (pre-activations); states C [B, NH, DQK, DV], n [B, NH, DQK],
// m [B, NH] in Acc. With segment_offsets (batch 1) the state arrays are per segment:
// [num_segments, NH, ...].
#pragma once

#include <cstddef>
#include <cstdint>

#include "moxe/core/config.hpp"
#include "moxe/core/math.hpp"
#include "moxe/core/precision.hpp"
#include "moxe/core/status.hpp"

namespace moxe::mlstm {

struct Dims {
  int64_t batch, heads, seq_len, dqk, dv;
};

template <class T, class Acc = float>
struct ForwardParams {
  Dims dims;
  const T *q, *k, *v, *igate, *fgate;
  const Acc *c_init = nullptr, *n_init = nullptr, *m_init = nullptr;  // all or none
  T* h;
  Acc *c_last = nullptr, *n_last = nullptr, *m_last = nullptr;  // optional (all or none)
  Acc qk_scale = 0, eps = Acc(1e-6);                              // qk_scale 0: 1/sqrt(DQK)
  int chunk_size = 64;
  const int64_t* segment_offsets = nullptr;  // optional varlen: [num_segments + 1]
  int64_t num_segments = 0;
  /// Chunkwise launchers: > 0 runs the batch in passes of this many entries, one after the
  /// other over one workspace sized for a pass (memory / passes, the same results bit for
  /// bit; no effect with segments). 0: the whole batch in one pass.
  int64_t batch_per_pass = 0;
  /// Chunkwise path, half and bf16 inputs: the intermediate operands of the chunk products
  /// (weighted keys, scores, states, score gradients) rounded to T (fast, one MMA each) or
  /// split into three T parts (accurate, about fp32; three MMAs). States, statistics and
  /// accumulation are fp32 in both. Float inputs: fp32 FMAs in both, unless allow_tf32.
  /// Read by chunkwise_forward, chunkwise_backward (the fused device design) and the fused
  /// host twin (chunkwise_fused_host.hpp). docs/mlstm.md "Fused decomposition", "Fused
  /// device forward" and "Fused device backward" have the measured errors.
  Precision precision = Precision::fast;
  /// Float inputs, chunkwise path: with precision fast, the chunk products may run on TF32
  /// tensor cores (every operand rounded to TF32, inputs included: ~1e-3 relative). Off by
  /// default (fp32, as PyTorch's default); no effect for half, bf16 or the other paths.
  /// Not implemented by the device kernels (float stays fp32 there); the host twin reads it.
  bool allow_tf32 = false;
  /// Optional tape of a training forward (chunkwise_forward / chunkwise_backward, the fused
  /// device design): device memory of tape_bytes >= chunkwise_tape_size(p) bytes. The forward
  /// writes its gate scan, chunk table, per-row gate quantities and fp32 state checkpoints
  /// there (instead of in its workspace, which it then does not need:
  /// chunkwise_forward_workspace_size is 0); the backward reads them instead of running the
  /// gate scan and the state walk again (the same bits, one fewer pass over the states; its
  /// workspace shrinks by the tape's share). The backward must get the tape at the same
  /// address, untouched since the forward, and the forward's dims, chunk_size,
  /// batch_per_pass, segments and precision: the layout depends on them (and on the address
  /// modulo 256), and is not checked. Null: the backward recomputes them. The host reference
  /// and twin ignore it.
  void* tape = nullptr;
  std::size_t tape_bytes = 0;
};

template <class T, class Acc = float>
struct BackwardParams {
  ForwardParams<T, Acc> fwd;  // the forward's inputs (h unused)
  const T* dh;
  const Acc *dc_last = nullptr, *dn_last = nullptr, *dm_last = nullptr;  // optional upstream
  T *dq, *dk, *dv, *digate, *dfgate;
  Acc *dc_init = nullptr, *dn_init = nullptr, *dm_init = nullptr;  // optional
};

/// Number of independent recurrences (state slots): B * NH, or num_segments * NH.
inline int64_t state_slots(const Dims& d, int64_t num_segments) {
  return (num_segments > 0 ? num_segments : d.batch) * d.heads;
}

/// All-or-none check for an optional group of three pointers.
template <class A, class B, class C>
constexpr bool all_or_none(const A* a, const B* b, const C* c) {
  return (a == nullptr) == (b == nullptr) && (b == nullptr) == (c == nullptr);
}

/// eps finite and > 0 (with eps = 0, den = 0 where n . qs = 0 and exp(-m) underflows, m > 104
/// in float: h = 0 / 0); qk_scale finite and >= 0 (0: the default 1/sqrt(DQK)). NaN fails.
template <class Acc>
bool scalars_valid(Acc eps, Acc qk_scale) {
  return eps > Acc(0) && math::is_finite(eps) && qk_scale >= Acc(0) && math::is_finite(qk_scale);
}

/// The checks every mLSTM entry point (reference and device) makes before touching memory:
/// positive sizes, required pointers, all-or-none state groups, a valid eps and qk_scale,
/// and a consistent segment description. Device-specific limits (head dims, chunk size) are
/// checked by the launchers.
template <class T, class Acc>
Status validate(const ForwardParams<T, Acc>& p, bool need_h = true) {
  const Dims& d = p.dims;
  MOXE_REQUIRE(d.batch > 0 && d.heads > 0 && d.seq_len > 0 && d.dqk > 0 && d.dv > 0);
  MOXE_REQUIRE(p.q && p.k && p.v && p.igate && p.fgate);
  MOXE_REQUIRE(!need_h || p.h);
  MOXE_REQUIRE(all_or_none(p.c_init, p.n_init, p.m_init));
  MOXE_REQUIRE(all_or_none(p.c_last, p.n_last, p.m_last));
  MOXE_REQUIRE(scalars_valid(p.eps, p.qk_scale));
  MOXE_REQUIRE(p.batch_per_pass >= 0);
  MOXE_REQUIRE(p.tape != nullptr || p.tape_bytes == 0);
  if (p.segment_offsets != nullptr || p.num_segments != 0) {
    MOXE_REQUIRE(p.segment_offsets != nullptr && p.num_segments > 0 && d.batch == 1);
  }
  return Status::ok;
}

template <class T, class Acc>
Status validate(const BackwardParams<T, Acc>& p) {
  MOXE_RETURN_IF_ERROR(validate(p.fwd, /*need_h=*/false));
  MOXE_REQUIRE(p.dh && p.dq && p.dk && p.dv && p.digate && p.dfgate);
  MOXE_REQUIRE(all_or_none(p.dc_last, p.dn_last, p.dm_last));
  MOXE_REQUIRE(all_or_none(p.dc_init, p.dn_init, p.dm_init));
  // gradients of the initial states exist only when the forward had initial states
  MOXE_REQUIRE(p.dc_init == nullptr || p.fwd.c_init != nullptr);
  return Status::ok;
}

/// One decoding step for a batch of heads (moxe::mlstm::step and reference::step): the
/// states are read and updated in place. Layouts: q, k [B, NH, DQK]; v, h [B, NH, DV];
/// igate, fgate [B, NH]; c [B, NH, DQK, DV], n [B, NH, DQK], m [B, NH] (Acc).
template <class T, class Acc = float>
struct StepParams {
  int64_t batch, heads, dqk, dv;
  const T *q, *k, *v, *igate, *fgate;
  Acc *c, *n, *m;  // in: the states after the previous token; out: after this one
  T* h;
  Acc qk_scale = 0, eps = Acc(1e-6);  // qk_scale 0: 1/sqrt(DQK)
};

template <class T, class Acc>
Status validate(const StepParams<T, Acc>& p) {
  MOXE_REQUIRE(p.batch > 0 && p.heads > 0 && p.dqk > 0 && p.dv > 0);
  MOXE_REQUIRE(p.q && p.k && p.v && p.igate && p.fgate && p.h);
  MOXE_REQUIRE(p.c && p.n && p.m);
  MOXE_REQUIRE(scalars_valid(p.eps, p.qk_scale));
  return Status::ok;
}

/// The scale applied to q: qk_scale, or 1/sqrt(DQK) when given as 0.
template <class Acc>
MOXE_HD inline Acc effective_qk_scale(Acc qk_scale, int64_t dqk) {
  return qk_scale != Acc(0) ? qk_scale : Acc(1) / math::sqrt(static_cast<Acc>(dqk));
}

}  // namespace moxe::mlstm
