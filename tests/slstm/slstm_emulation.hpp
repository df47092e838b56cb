// The sLSTM device kernels' decomposition and arithmetic run on the host in float, so the
// host tests can check (and stress) what the device computes without a GPU: groups of
// kBatchTile rows per head, blocks of `units` units, y_t and dgates_t exchanged through the
// global buffers step by step, the recurrent product (one fma chain per column), dbias
// partials per batch row summed in row order, dr as split-K partials summed in chunk order.
//
// The element type T enters through `round_t`, a float -> float rounding to T applied
// exactly where the kernels hold a value in T: the product operands y_{t-1} (forward) and
// dgates (backward), the outputs y, dwx, dr and dbias. The identity gives the float
// kernels; rounding to bf16 or half gives theirs (their tensor-core products accumulate in
// float in an order the hardware picks; the emulation's fma chain differs from it only at
// float rounding). The inputs are taken as given: round them through T beforehand.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "moxe/slstm/detail/cell.hpp"
#include "moxe/slstm/detail/plan.hpp"
#include "slstm_testing.hpp"

namespace moxe::test {

/// Everything the device forward and backward write, in float (T outputs rounded to T).
struct SlstmEmulation {
  std::vector<float> y, y_last, c_last, n_last, m_last;  // forward
  std::vector<float> dwx, dr, dbias, dy_init, dc_init, dn_init, dm_init;
};

/// The forward (y, final states) and the backward (every gradient, the initial-state ones
/// at the zero states when `in` has none) of `in` as the device computes them with `units`
/// units per block. The upstream gradients of the final states are used when in.dy_last is
/// set (then all four are).
template <class RoundT>
SlstmEmulation emulate_slstm_device(const SequenceInputs<float, float>& in, int units, RoundT round_t) {
  namespace dt = moxe::slstm::detail;
  const int64_t S = in.dims.seq_len, B = in.dims.batch, NH = in.dims.heads, DH = in.dims.head_dim;
  const int64_t U1 = B * NH * DH;
  const int U = units, splits = static_cast<int>(DH / U);
  const int64_t groups = dt::num_groups(B, NH);
  const bool init = in.y_init != nullptr, upstream = in.dy_last != nullptr;
  SlstmEmulation e;
  e.y.assign(S * U1, 0.f);
  std::vector<float> tape_gates(S * 4 * U1), tape_c(S * U1), tape_n(S * U1), tape_m(S * U1);
  std::vector<float> c(U1, 0.f), n(U1, 0.f), m(U1, 0.f), ylast(U1, 0.f);
  if (init) {
    c.assign(in.c_init, in.c_init + U1);
    n.assign(in.n_init, in.n_init + U1);
    m.assign(in.m_init, in.m_init + U1);
    ylast.assign(in.y_init, in.y_init + U1);
  }

  // ---- forward_kernel -------------------------------------------------------------------
  for (int64_t t = 0; t < S; ++t) {
    std::vector<float> y_step(e.y.begin() + t * U1, e.y.begin() + (t + 1) * U1);  // written this step
    for (int64_t group = 0; group < groups; ++group) {
      for (int split = 0; split < splits; ++split) {
        const dt::BlockTile tile = dt::block_tile(group, split, U, NH);
        const int64_t h = tile.h, b0 = tile.b0, j0 = tile.j0;
        // y tile (in T) and the block's r rows (row n = g*U + jl)
        std::vector<float> y_s(dt::kBatchTile * DH, 0.f), r_s(4 * U * DH);
        for (int bl = 0; bl < dt::kBatchTile; ++bl)
          for (int64_t d = 0; d < DH; ++d) {
            const int64_t b = b0 + bl;
            if (b >= B) continue;
            y_s[bl * DH + d] = t == 0 ? (init ? round_t(in.y_init[dt::unit_index(0, b, h, d, B, NH, DH)]) : 0.f)
                                      : e.y[dt::unit_index(t - 1, b, h, d, B, NH, DH)];
          }
        for (int nn = 0; nn < 4 * U; ++nn)
          for (int64_t d = 0; d < DH; ++d) r_s[nn * DH + d] = in.r[dt::r_index(h, nn / U, j0 + nn % U, d, DH)];
        for (int pr = 0; pr < dt::kBatchTile * U; ++pr) {
          const int bl = pr / U, jl = pr % U;
          const int64_t b = b0 + bl, j = j0 + jl;
          if (b >= B) continue;
          float raw[4];
          for (int g = 0; g < 4; ++g) {
            float acc = 0.f;
            for (int64_t k = 0; k < DH; ++k) acc = std::fma(y_s[bl * DH + k], r_s[(g * U + jl) * DH + k], acc);
            raw[g] = dt::gate_preactivation(in.wx[dt::gate_index(t, b, g, h, j, B, NH, DH)], acc,
                                            in.bias[dt::bias_index(g, h, j, NH, DH)]);
          }
          const int64_t u0 = dt::unit_index(0, b, h, j, B, NH, DH), u = dt::unit_index(t, b, h, j, B, NH, DH);
          const auto o = dt::cell_forward(dt::GatesRaw<float>{raw[0], raw[1], raw[2], raw[3]}, c[u0], n[u0], m[u0]);
          c[u0] = o.c, n[u0] = o.n, m[u0] = o.m, ylast[u0] = o.y;
          y_step[u0] = round_t(o.y);
          for (int g = 0; g < 4; ++g) tape_gates[dt::gate_index(t, b, g, h, j, B, NH, DH)] = raw[g];
          tape_c[u] = o.c, tape_n[u] = o.n, tape_m[u] = o.m;
        }
      }
    }
    std::copy(y_step.begin(), y_step.end(), e.y.begin() + t * U1);  // the step barrier
  }
  e.y_last = ylast, e.c_last = c, e.n_last = n, e.m_last = m;

  // ---- backward_kernel ------------------------------------------------------------------
  e.dwx.assign(S * 4 * U1, 0.f);
  std::vector<float> dc(U1, 0.f), dn(U1, 0.f), dm(U1, 0.f), dbias_partial(4 * U1, 0.f);
  e.dy_init.assign(U1, 0.f);
  if (upstream) {
    dc.assign(in.dc_last, in.dc_last + U1);
    dn.assign(in.dn_last, in.dn_last + U1);
    dm.assign(in.dm_last, in.dm_last + U1);
  }
  auto recurrent_dy = [&](int64_t t_src, const dt::BlockTile& tile, int bl, int jl) {
    // dg_s row bl (all 4*DH gate units of head h at step t_src, in T) times the transposed slice
    const int64_t h = tile.h, b = tile.b0 + bl;
    float acc = 0.f;
    for (int64_t col = 0; col < 4 * DH; ++col) {
      const int g = static_cast<int>(col / DH);
      const float dg = b < B ? round_t(tape_gates[dt::gate_index(t_src, b, g, h, col % DH, B, NH, DH)]) : 0.f;
      acc = std::fma(dg, in.r[(h * 4 * DH + col) * DH + tile.j0 + jl], acc);
    }
    return acc;
  };
  for (int64_t t = S - 1; t >= 0; --t) {
    std::vector<float> dgates_step(4 * U1);
    for (int64_t group = 0; group < groups; ++group) {
      for (int split = 0; split < splits; ++split) {
        const dt::BlockTile tile = dt::block_tile(group, split, U, NH);
        const int64_t h = tile.h;
        for (int pr = 0; pr < dt::kBatchTile * U; ++pr) {
          const int bl = pr / U, jl = pr % U;
          const int64_t b = tile.b0 + bl, j = tile.j0 + jl;
          if (b >= B) continue;
          const int64_t u0 = dt::unit_index(0, b, h, j, B, NH, DH), u = dt::unit_index(t, b, h, j, B, NH, DH);
          float dy = in.dy[u];
          if (t < S - 1) {
            dy += recurrent_dy(t + 1, tile, bl, jl);
          } else if (upstream) {
            dy += in.dy_last[u0];
          }
          float raw[4];
          for (int g = 0; g < 4; ++g) raw[g] = tape_gates[dt::gate_index(t, b, g, h, j, B, NH, DH)];
          float c0 = 0.f, n0 = 0.f, m0 = 0.f;
          if (t > 0) {
            const int64_t up = dt::unit_index(t - 1, b, h, j, B, NH, DH);
            c0 = tape_c[up], n0 = tape_n[up], m0 = tape_m[up];
          } else if (init) {
            c0 = in.c_init[u0], n0 = in.n_init[u0], m0 = in.m_init[u0];
          }
          const auto gd = dt::cell_backward(dt::GatesRaw<float>{raw[0], raw[1], raw[2], raw[3]}, c0, n0, m0, dy,
                                            dc[u0], dn[u0], dm[u0]);
          dc[u0] = gd.dc0, dn[u0] = gd.dn0, dm[u0] = gd.dm0;
          const float d4[4] = {gd.d.i, gd.d.f, gd.d.z, gd.d.o};
          for (int g = 0; g < 4; ++g) {
            const int64_t gi = dt::gate_index(t, b, g, h, j, B, NH, DH);
            dgates_step[gi - t * 4 * U1] = d4[g];
            e.dwx[gi] = round_t(d4[g]);
            dbias_partial[dt::gate_index(0, b, g, h, j, B, NH, DH)] += d4[g];
          }
        }
      }
    }
    // the step barrier: dgates_t (float) replaces the raw gates of step t in the tape
    std::copy(dgates_step.begin(), dgates_step.end(), tape_gates.begin() + t * 4 * U1);
  }
  for (int64_t group = 0; group < groups; ++group)
    for (int split = 0; split < splits; ++split) {
      const dt::BlockTile tile = dt::block_tile(group, split, U, NH);
      for (int pr = 0; pr < dt::kBatchTile * U; ++pr) {
        const int bl = pr / U, jl = pr % U;
        const int64_t b = tile.b0 + bl, j = tile.j0 + jl;
        if (b < B) e.dy_init[dt::unit_index(0, b, tile.h, j, B, NH, DH)] = recurrent_dy(0, tile, bl, jl);
      }
    }
  e.dc_init = dc, e.dn_init = dn, e.dm_init = dm;
  // sum_partials_kernel over batch rows
  e.dbias.assign(4 * NH * DH, 0.f);
  for (int64_t i = 0; i < 4 * NH * DH; ++i) {
    float s = 0.f;
    for (int64_t b = 0; b < B; ++b) s += dbias_partial[b * 4 * NH * DH + i];
    e.dbias[i] = round_t(s);
  }
  // dr_partial_kernel (dgates in float, y_{t-1} in T, y_init in float) + sum_partials_kernel
  const dt::DrSplit split = dt::dr_split(S, B, NH, DH);
  const int64_t M = 4 * DH, H = NH * DH, K = S * B;
  std::vector<float> partial(split.chunks * NH * M * DH, 0.f);
  for (int64_t chunk = 0; chunk < split.chunks; ++chunk)
    for (int64_t h = 0; h < NH; ++h)
      for (int64_t mm = 0; mm < M; ++mm)
        for (int64_t nn = 0; nn < DH; ++nn) {
          float acc = 0.f;
          const int64_t k_end = std::min(K, (chunk + 1) * split.chunk_len);
          for (int64_t k = chunk * split.chunk_len; k < k_end; ++k) {
            const float av = tape_gates[k * 4 * H + (mm / DH) * H + h * DH + mm % DH];
            const float bv = k >= B ? e.y[(k - B) * H + h * DH + nn] : (init ? in.y_init[k * H + h * DH + nn] : 0.f);
            acc = std::fma(av, bv, acc);
          }
          partial[((chunk * NH + h) * M + mm) * DH + nn] = acc;
        }
  e.dr.assign(NH * M * DH, 0.f);
  for (int64_t i = 0; i < NH * M * DH; ++i) {
    float s = 0.f;
    for (int64_t chunk = 0; chunk < split.chunks; ++chunk) s += partial[chunk * NH * M * DH + i];
    e.dr[i] = round_t(s);
  }
  return e;
}

}  // namespace moxe::test
