// moxe::slstm: shapes and parameter structs of the sLSTM cell (see docs/slstm.md).
//
// Layouts (row-major, outermost first; H = NH * DH), as in NX-AI's xlstm:
//   wx    [S, B, 4, NH, DH]  input projections, gate order i, f, z, o (pre-activations)
//   r     [NH, 4, DH, DH]    r[h][g][j][d] maps y_{t-1}[h][d] to gate g, unit j
//   bias  [4, NH, DH]
//   y     [S, B, NH, DH]     output (T)
//   states y, c, n, m        [B, NH, DH] (Acc)
//   tape (optional)          tape_gates [S, B, 4, NH, DH], tape_c/n/m [S, B, NH, DH] (Acc):
//                            the raw gates and the states after each step
#pragma once

#include <cstdint>

#include "moxe/core/config.hpp"
#include "moxe/core/status.hpp"

namespace moxe::slstm {

inline constexpr int kGates = 4;  // i, f, z, o
enum Gate : int { kGateI = 0, kGateF = 1, kGateZ = 2, kGateO = 3 };

struct Dims {
  int64_t seq_len, batch, heads, head_dim;
};

/// Hidden size H = NH * DH.
inline int64_t hidden(const Dims& d) { return d.heads * d.head_dim; }

template <class T, class Acc = float>
struct ForwardParams {
  Dims dims;
  const T* wx;    // [S, B, 4, NH, DH]
  const T* r;     // [NH, 4, DH, DH]
  const T* bias;  // [4, NH, DH]
  const Acc *y_init = nullptr, *c_init = nullptr, *n_init = nullptr,
            *m_init = nullptr;  // [B, NH, DH], all or none (none: zeros)
  T* y;                         // [S, B, NH, DH]
  Acc *y_last = nullptr, *c_last = nullptr, *n_last = nullptr,
      *m_last = nullptr;  // [B, NH, DH], optional (all or none)
  /// Device only: gate units per block (0: chosen by the launcher). When set it must be a
  /// multiple of 16 that divides head_dim; tests use it to force the multi-block path.
  int units_per_block = 0;
  /// Device only, a testing and tuning knob: at most this many (batch tile, head) groups per
  /// launch of a recurrent kernel (0: as many as fit). Tests use it to force several
  /// launches (group_begin > 0) for every element type; the results do not change.
  int64_t max_groups_per_launch = 0;
  /// Optional tape of a training forward (all four or none), written by the forward and
  /// read by the backward, which then skips its own replay of the forward:
  ///   tape_gates [S, B, 4, NH, DH]  raw gate pre-activations raw_g of every step
  ///   tape_c, tape_n, tape_m [S, B, NH, DH]  the states after every step
  /// (tape_elements(dims) gives the sizes). The backward reads it, with fwd.y, as the
  /// forward of the same inputs (wx, r, bias, initial states) wrote them; it writes neither.
  Acc* tape_gates = nullptr;
  Acc *tape_c = nullptr, *tape_n = nullptr, *tape_m = nullptr;
  /// Device only, sm_90 and later (sequence_forward, step, and as the backward's fwd its
  /// replay and its own recurrent kernel): 0 (default) the plan above; 2, 4 or 8 a head's
  /// units split over that many CTAs of one thread-block cluster, exchanging y_t (dgates_t)
  /// through distributed shared memory with one cluster barrier per step. head_dim / cluster_size must be a multiple of
  /// 16 of at most 128 (units_per_block, when set, must equal it); unsupported otherwise,
  /// below compute capability 9.0, or when a cluster of that size cannot be resident.
  int cluster_size = 0;
};

/// Elements of the optional forward tape: `gates` for tape_gates (S*B*4*H), `state` for each
/// of tape_c, tape_n, tape_m (S*B*H); in all 7*S*B*H elements of Acc.
struct TapeElements {
  int64_t gates, state;
};
inline TapeElements tape_elements(const Dims& d) {
  const int64_t state = d.seq_len * d.batch * hidden(d);
  return {4 * state, state};
}

template <class T, class Acc = float>
struct BackwardParams {
  ForwardParams<T, Acc> fwd;  // the forward's inputs; fwd.y and the fwd.tape_* are read when the
                              // tape is given (else unused, as are the *_last)
  const T* dy;                // [S, B, NH, DH]
  const Acc *dy_last = nullptr, *dc_last = nullptr, *dn_last = nullptr,
            *dm_last = nullptr;  // [B, NH, DH], optional upstream (all or none)
  T* dwx;                        // [S, B, 4, NH, DH]
  T* dr;                         // [NH, 4, DH, DH]
  T* dbias;                      // [4, NH, DH]
  Acc *dy_init = nullptr, *dc_init = nullptr, *dn_init = nullptr,
      *dm_init = nullptr;  // [B, NH, DH], optional (all or none)
};

/// One decoding step: the states are read and updated in place.
template <class T, class Acc = float>
struct StepParams {
  int64_t batch, heads, head_dim;
  const T* wx;    // [B, 4, NH, DH]
  const T* r;     // [NH, 4, DH, DH]
  const T* bias;  // [4, NH, DH]
  Acc *y, *c, *n, *m;  // [B, NH, DH] states, in and out
  T* y_out;            // [B, NH, DH] this step's output in T
  int units_per_block = 0;  // as in ForwardParams
  int cluster_size = 0;     // as in ForwardParams (sm_90)
};

/// All-or-none check for an optional group of pointers.
template <class... P>
constexpr bool all_or_none(const P*... p) {
  return ((p != nullptr) && ...) || ((p == nullptr) && ...);
}

/// The checks every sLSTM entry point (reference and device) makes before touching memory:
/// positive sizes, required pointers, all-or-none state groups. Device-specific limits
/// (head_dim, heads) are checked by the launchers.
template <class T, class Acc>
Status validate(const ForwardParams<T, Acc>& p, bool need_y = true) {
  const Dims& d = p.dims;
  MOXE_REQUIRE(d.seq_len > 0 && d.batch > 0 && d.heads > 0 && d.head_dim > 0);
  MOXE_REQUIRE(p.wx && p.r && p.bias);
  MOXE_REQUIRE(!need_y || p.y);
  MOXE_REQUIRE(all_or_none(p.y_init, p.c_init, p.n_init, p.m_init));
  MOXE_REQUIRE(all_or_none(p.y_last, p.c_last, p.n_last, p.m_last));
  MOXE_REQUIRE(p.units_per_block >= 0);
  MOXE_REQUIRE(p.max_groups_per_launch >= 0);
  MOXE_REQUIRE(p.cluster_size >= 0);
  MOXE_REQUIRE(all_or_none(p.tape_gates, p.tape_c, p.tape_n, p.tape_m));
  return Status::ok;
}

/// Whether the forward params carry a tape (validated: then all four pointers are set).
template <class T, class Acc>
bool has_tape(const ForwardParams<T, Acc>& p) {
  return p.tape_gates != nullptr;
}

template <class T, class Acc>
Status validate(const BackwardParams<T, Acc>& p) {
  MOXE_RETURN_IF_ERROR(validate(p.fwd, /*need_y=*/false));
  MOXE_REQUIRE(p.dy && p.dwx && p.dr && p.dbias);
  MOXE_REQUIRE(!has_tape(p.fwd) || p.fwd.y);  // the tape's y_t is the forward's output
  MOXE_REQUIRE(all_or_none(p.dy_last, p.dc_last, p.dn_last, p.dm_last));
  MOXE_REQUIRE(all_or_none(p.dy_init, p.dc_init, p.dn_init, p.dm_init));
  // dy_init etc. without fwd.*_init: the gradients at the zero initial states, taken on the
  // n == 0 branch as the forward is (there m_init does not enter the first step, dm_init = 0)
  return Status::ok;
}

template <class T, class Acc>
Status validate(const StepParams<T, Acc>& p) {
  MOXE_REQUIRE(p.batch > 0 && p.heads > 0 && p.head_dim > 0);
  MOXE_REQUIRE(p.wx && p.r && p.bias && p.y && p.c && p.n && p.m && p.y_out);
  MOXE_REQUIRE(p.units_per_block >= 0);
  MOXE_REQUIRE(p.cluster_size >= 0);
  return Status::ok;
}

/// The sequence forward of length 1 that one decoding step is (states in place).
template <class T, class Acc>
ForwardParams<T, Acc> as_forward(const StepParams<T, Acc>& s) {
  ForwardParams<T, Acc> p{};
  p.dims = Dims{1, s.batch, s.heads, s.head_dim};
  p.wx = s.wx;
  p.r = s.r;
  p.bias = s.bias;
  p.y_init = s.y;
  p.c_init = s.c;
  p.n_init = s.n;
  p.m_init = s.m;
  p.y = s.y_out;
  p.y_last = s.y;
  p.c_last = s.c;
  p.n_last = s.n;
  p.m_last = s.m;
  p.units_per_block = s.units_per_block;
  p.cluster_size = s.cluster_size;
  return p;
}

}  // namespace moxe::slstm
