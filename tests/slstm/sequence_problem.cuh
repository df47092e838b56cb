// The random problems of the sLSTM device tests, host side (nvcc: T may be __half or
// __nv_bfloat16): inputs rounded through T, float states, upstream gradients, tolerances,
// shapes. tests/slstm/test_sequence.cu uploads them; tests/slstm/check_sequence_emulated.cu
// runs the same problems through a host emulation of the kernels' arithmetic.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <vector>

#include "device_utils.cuh"
#include "moxe/slstm/params.hpp"
#include "moxe/slstm/reference.hpp"
#include "slstm_testing.hpp"
#include "test_utils.hpp"

namespace moxe::test {

template <class T>
struct SlstmTolerance;
template <>
struct SlstmTolerance<float> {
  static constexpr double fwd = 2e-5, bwd = 2e-4;
};
template <>
struct SlstmTolerance<__nv_bfloat16> {
  static constexpr double fwd = 2e-2, bwd = 5e-2;
};
template <>
struct SlstmTolerance<__half> {
  static constexpr double fwd = 5e-3, bwd = 2e-2;
};

/// One sequence problem on the host: inputs rounded through T (double copies of the values
/// the device sees), initial states and upstream gradients in float.
///
/// The upstream gradient of the final m is gauge-consistent: dm_last = dc_last c_last +
/// dn_last n_last per unit, with the reference's final states. (c, n, m) -> (c e^d, n e^d,
/// m - d) leaves the true state unchanged, and this dm_last makes the loss invariant to it,
/// so the exact gradient does not depend on which argument the stabiliser's max selects.
/// With independent random dc_last / dn_last and no such dm_last it does: near a tie of the
/// max a device in bf16 and the reference in double can select different arguments and
/// route the carried m gradient to different gates, a difference no tolerance covers.
template <class T>
struct SequenceProblem {
  slstm::Dims d;
  bool init;
  std::vector<double> wx, r, bias, y0, c0, n0, m0, dy, dy_last, dc_last, dn_last, dm_last;

  int64_t units() const { return d.batch * d.heads * d.head_dim; }

  SequenceProblem(Rng& rng, slstm::Dims dims, bool with_init, double wx_scale = 1.0) : d(dims), init(with_init) {
    const int64_t H = d.heads * d.head_dim, U = units();
    const double r_scale = 1.0 / std::sqrt(static_cast<double>(d.head_dim));
    wx = round_through<T>(uniform_vector<double>(rng, d.seq_len * d.batch * 4 * H, -wx_scale, wx_scale));
    r = round_through<T>(uniform_vector<double>(rng, d.heads * 4 * d.head_dim * d.head_dim, -r_scale, r_scale));
    bias = round_through<T>(uniform_vector<double>(rng, 4 * H, -0.5, 0.5));
    dy = round_through<T>(uniform_vector<double>(rng, d.seq_len * U));
    y0 = to_float_grid(uniform_vector<double>(rng, U));
    c0 = to_float_grid(uniform_vector<double>(rng, U));
    n0 = to_float_grid(uniform_vector<double>(rng, U, 0.5, 2.0));
    m0 = to_float_grid(uniform_vector<double>(rng, U));
    dy_last = to_float_grid(uniform_vector<double>(rng, U));
    dc_last = to_float_grid(uniform_vector<double>(rng, U));
    dn_last = to_float_grid(uniform_vector<double>(rng, U));
    std::vector<double> y(d.seq_len * U), yl(U), cl(U), nl(U), ml(U);
    dm_last.assign(U, 0.0);  // the reference forward below reads no upstream gradient
    if (slstm::reference::forward(forward_params(host(), y.data(), yl.data(), cl.data(), nl.data(), ml.data())) !=
        Status::ok)
      std::abort();
    for (int64_t u = 0; u < U; ++u) dm_last[u] = static_cast<float>(dc_last[u] * cl[u] + dn_last[u] * nl[u]);
  }

  /// The inputs on the host, in double: what the reference runs on.
  SequenceInputs<double, double> host() const {
    const double* none = nullptr;
    return {d,
            wx.data(), r.data(), bias.data(),
            init ? y0.data() : none, init ? c0.data() : none, init ? n0.data() : none, init ? m0.data() : none,
            dy.data(), dy_last.data(), dc_last.data(), dn_last.data(), dm_last.data()};
  }

  static std::vector<double> to_float_grid(std::vector<double> v) {
    for (double& x : v) x = static_cast<float>(x);
    return v;
  }
};

/// The reference's gradients of a SequenceProblem in double (the initial-state ones at the
/// zero states when the problem has none).
struct ReferenceGradients {
  std::vector<double> dwx, dr, dbias, dyi, dci, dni, dmi;
};

template <class T>
ReferenceGradients reference_gradients(const SequenceProblem<T>& pb, bool upstream) {
  const int64_t U = pb.units();
  ReferenceGradients g{std::vector<double>(pb.wx.size()), std::vector<double>(pb.r.size()),
                       std::vector<double>(pb.bias.size()), std::vector<double>(U), std::vector<double>(U),
                       std::vector<double>(U), std::vector<double>(U)};
  if (slstm::reference::backward(backward_params(pb.host(), upstream, g.dwx.data(), g.dr.data(), g.dbias.data(),
                                                 g.dyi.data(), g.dci.data(), g.dni.data(), g.dmi.data())) !=
      Status::ok)
    std::abort();
  return g;
}

// ---- gate derivatives at large pre-activations, entry by entry -------------------------

/// `v` rounded to the grid of 2^-8. Pre-activations there up to |x| < 32 and biases below 1
/// add exactly in float (13 significant bits), and T in {bf16, half} keeps them on the grid:
/// the raw gates are then the same numbers on the device and in the double reference.
inline std::vector<double> on_preactivation_grid(std::vector<double> v) {
  for (double& x : v) x = std::round(x * 256.0) / 256.0;
  return v;
}

/// From the zero state (no recurrent term) d raw_o = dy tanh(z) sigmoid'(o) and d raw_z =
/// dy sigmoid(o) tanh'(z): products of factors each exact to rounding (sigmoid' and tanh'
/// taken from the raw gates), so every entry is checked on its own, relative to itself:
/// float to a few ulps (2e-6 bounds ~8 roundings of 2^-24 and expf's ulps), bf16 and half to
/// the rounding of the output (unit roundoff 2^-8 and 2^-11) plus float's 2e-6; half's
/// subnormals (below 2^-14) to half their spacing, 2^-25, as relative errors with that floor.
template <class T>
struct GateGradTolerance;
template <>
struct GateGradTolerance<float> {
  static constexpr double rel = 2e-6, floor = 1.1754943508222875e-38;  // FLT_MIN
};
template <>
struct GateGradTolerance<__nv_bfloat16> {
  static constexpr double rel = 1.0 / 256 + 2e-6, floor = 1.1754943508222875e-38;
};
template <>
struct GateGradTolerance<__half> {
  static constexpr double rel = 1.0 / 2048 + 2e-6, floor = 1.0 / 16384;
};

/// The largest |out - ref| / max(|ref|, floor) over gate g's entries of dwx [positions, 4, H].
inline double worst_gate_error(const std::vector<double>& out, const std::vector<double>& ref, int64_t positions,
                               int64_t H, int g, double floor) {
  double worst = 0;
  for (int64_t r = 0; r < positions; ++r)
    for (int64_t u = 0; u < H; ++u) {
      const int64_t i = (r * 4 + g) * H + u;
      const double e = std::abs(out[i] - ref[i]) / std::max(std::abs(ref[i]), floor);
      worst = e > worst || e != e ? e : worst;
    }
  return worst;
}

struct SlstmShape {
  slstm::Dims d;
  bool init;
  int units;                      // 0: the launcher's choice
  int64_t max_groups_per_launch;  // 0: as many as fit
};

// S in {1, 7, 64, 300}; head_dim 16..256; batch not a multiple of the 16-row tile; forced
// multi-block (cooperative) groups via units. {3, 150, 4, 64} with U = 16: 40 groups of 4
// blocks, more than fit at once on an H100 (one block per SM, 132 SMs: 33 groups), so the
// launcher splits it into several cooperative launches; max_groups_per_launch forces
// several launches (group_begin > 0) elsewhere too, one block per group or several, for
// every element type.
inline const std::vector<SlstmShape>& slstm_shapes() {
  static const std::vector<SlstmShape> shapes = {
      {{1, 3, 2, 16}, true, 0, 0},    {{7, 17, 3, 16}, false, 0, 4}, {{64, 5, 2, 64}, true, 0, 1},
      {{7, 2, 2, 64}, true, 16, 1},   {{300, 17, 1, 32}, true, 0, 0}, {{7, 3, 1, 128}, true, 0, 0},
      {{7, 3, 2, 192}, false, 0, 1},  {{7, 3, 2, 256}, true, 0, 0},  {{64, 1, 1, 256}, true, 0, 0},
      {{3, 150, 4, 64}, true, 16, 7},
      // batch tiles: 12 rows (a partly filled 16-row tile), 25 = 16 + 9 (a full tile and a
      // 9-row one: both tile kinds at their boundary), 8 and 9 (the narrow m16n8k16 path's
      // largest, the 16-row path's smallest); U = 48 at DH 96 (8 warps over 12 tiles: some
      // warps with fewer tiles) and DH 112 (the launcher's U = 112)
      {{3, 12, 1, 32}, true, 0, 0},   {{3, 25, 2, 16}, true, 0, 0},  {{4, 8, 1, 96}, true, 48, 0},
      {{3, 9, 1, 112}, true, 0, 0},
  };
  // MOXE_TEST_SMALL: the smallest shapes only (the GPU simulator), still with a size-1
  // sequence, a batch past one tile, both batch-tile kinds (<= 8 rows, 9-16 rows), warps
  // with unequal tile counts (U = 48), multi-block groups (forced, and the launchers' own plan
  // where the r slice does not fit one block), several launches, and the largest head dims:
  // 176 (16 x 11: U = 16, 11 blocks; the largest a float backward block fits in 96 KB, the
  // simulated GPU's opt-in shared memory) and 256 (there float backward needs 130 KB and
  // returns unsupported on a 96 KB device: test_sequence.cu checks that instead)
  static const std::vector<SlstmShape> small = {
      {{1, 3, 2, 16}, true, 0, 0},   {{7, 17, 3, 16}, false, 0, 4}, {{5, 2, 2, 64}, true, 16, 1},
      {{4, 3, 1, 32}, true, 0, 0},   {{2, 3, 1, 176}, false, 0, 0}, {{2, 3, 1, 256}, true, 0, 0},
      {{2, 12, 1, 32}, true, 0, 0},  {{2, 9, 1, 96}, true, 48, 0},
  };
  return std::getenv("MOXE_TEST_SMALL") ? small : shapes;
}

}  // namespace moxe::test
