// Shared fixtures of the mLSTM tests (host and device): gate patterns at the edges of the
// domain, the shape of one decoding step, its inputs, the StepParams that point at them, and
// the error measures of dfgate and of float evaluation (norms, the dot-product rounding bound).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <vector>

#include "moxe/mlstm/params.hpp"
#include "test_utils.hpp"

namespace moxe::test {

/// Gate patterns at the edges of the cell's domain (apply_extreme_gates).
enum class ExtremeGates {
  none,
  resets,  ///< fgate = -inf or -1e30 (resets), igate = -inf (no input), fgate = +inf (no decay)
  low_m,   ///< m falls ~4 per step: exp(-m) overflows float (m < -88.7) after ~20 steps
  high_m,  ///< m ~ 100: exp(-m) underflows float
};

inline const char* name(ExtremeGates x) {
  switch (x) {
    case ExtremeGates::none: return "none";
    case ExtremeGates::resets: return "resets";
    case ExtremeGates::low_m: return "low_m";
    case ExtremeGates::high_m: return "high_m";
  }
  return "?";
}

/// Writes the pattern over the gates of `units` runs of `len` rows (row = unit * len + t):
///   resets: fgate = -inf at t = 0, 15, 16 (mod 16; the first and last positions of chunks of
///           16, 32, ..., back to back), fgate = -1e30 (a finite reset: f_scale underflows)
///           at t = 4 (mod 9); else igate = -inf at t = 2 (mod 7); else fgate = +inf at
///           t = 6 (mod 10). With `both`, t = 9 (mod 16) has igate = fgate = -inf (no source
///           at all: m = -inf, the zero state).
///   low_m:  from t = len / 3: fgate in [-5, -3] (logsigmoid ~ -4) and igate following the
///           decay down, -20 - 4 (t - len / 3) + [-2, 2]: both branches of the stabiliser,
///           inputs of weight ~1 while m sinks far below -88.7.
///   high_m: from t = len / 3: igate in [97, 103], m ~ 100.
inline void apply_extreme_gates(ExtremeGates x, Rng& rng, int64_t units, int64_t len, std::vector<double>& igate,
                                std::vector<double>& fgate, bool both = false) {
  const double inf = std::numeric_limits<double>::infinity();
  for (int64_t u = 0; u < units; ++u) {
    for (int64_t t = 0; t < len; ++t) {
      double& ig = igate[u * len + t];
      double& fg = fgate[u * len + t];
      const int64_t tail = t - len / 3;
      switch (x) {
        case ExtremeGates::none: break;
        case ExtremeGates::resets:
          if (both && t % 16 == 9) {
            ig = -inf;
            fg = -inf;
          } else if (t % 16 == 0 || t % 16 == 15) {
            fg = -inf;
          } else if (t % 9 == 4) {
            fg = -1e30;
          } else if (t % 7 == 2) {
            ig = -inf;
          } else if (t % 10 == 6) {
            fg = inf;
          }
          break;
        case ExtremeGates::low_m:
          if (tail >= 0) {
            fg = rng.uniform(-5.0, -3.0);
            ig = -20.0 - 4.0 * double(tail) + rng.uniform(-2.0, 2.0);
          }
          break;
        case ExtremeGates::high_m:
          if (tail >= 0) ig = rng.uniform(97.0, 103.0);
          break;
      }
    }
  }
}

/// ||df - df_ref|| / ||(df_ref, di_ref)||: the error of dfgate on digate's scale. Where m
/// has a single source (a sequence's first position, a length-1 sequence) dfgate reaches
/// the gate through m only, which cancels out of h except through eps and the exp(-m)
/// floor: a difference of terms the size of digate, whose rounding is that size too.
inline double dfgate_error(const std::vector<double>& df, const std::vector<double>& df_ref,
                           const std::vector<double>& di_ref) {
  double diff = 0, scale = 0;
  for (std::size_t r = 0; r < df.size(); ++r) {
    diff += (df[r] - df_ref[r]) * (df[r] - df_ref[r]);
    scale += df_ref[r] * df_ref[r] + di_ref[r] * di_ref[r];
  }
  return std::sqrt(diff / scale);  // NaN (an unwritten element) fails any bound
}

/// ||v||.
inline double l2_norm(const std::vector<double>& v) {
  double sum = 0;
  for (double x : v) sum += x * x;
  return std::sqrt(sum);
}

/// ||got - ref||; +inf if got has an element that is not finite or the sizes differ.
inline double error_norm(const std::vector<double>& got, const std::vector<double>& ref) {
  if (got.size() != ref.size()) return std::numeric_limits<double>::infinity();
  double sum = 0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    if (!std::isfinite(got[i])) return std::numeric_limits<double>::infinity();
    sum += (got[i] - ref[i]) * (got[i] - ref[i]);
  }
  return std::sqrt(sum);
}

/// The rounding error bound of a float dot product of n terms whose magnitudes sum to
/// `abs_sum`, in any summation order: gamma_n abs_sum, gamma_n = n u / (1 - n u), u = 2^-24.
inline double dot_rounding_bound(int64_t n, double abs_sum) {
  constexpr double u = 0x1p-24;
  return double(n) * u / (1.0 - double(n) * u) * abs_sum;
}

/// Gates at the edges of the domain row by row (rows independent: per-token rows, or the
/// state slots of one step), by row index mod 7: 1: both gates ~ -100 (from the zero state
/// m < -88.7: exp(-m) beyond float's range); 2: a hard reset (fgate = -inf); 3: no input
/// (igate = -inf); 4: no decay (fgate = +inf); 5: igate ~ 100 (exp(-m) below float's range);
/// 6 (every other time): no source at all (both -inf: m = -inf). 0: as drawn.
inline void apply_extreme_rows(Rng& rng, std::vector<double>& igate, std::vector<double>& fgate) {
  const double inf = std::numeric_limits<double>::infinity();
  for (std::size_t r = 0; r < igate.size(); ++r) {
    switch (r % 7) {
      case 1: igate[r] = rng.uniform(-103.0, -97.0), fgate[r] = rng.uniform(-103.0, -97.0); break;
      case 2: fgate[r] = -inf; break;
      case 3: igate[r] = -inf; break;
      case 4: fgate[r] = inf; break;
      case 5: igate[r] = rng.uniform(97.0, 103.0); break;
      case 6: if (r % 14 == 6) igate[r] = fgate[r] = -inf; break;
      default: break;
    }
  }
}

/// The sizes of one decoding step: batch * heads state slots.
struct StepShape {
  int64_t batch, heads, dqk, dv;
  int64_t slots() const { return batch * heads; }
};

/// Host copies (double) of one step's inputs: q, k [slots, DQK]; v [slots, DV]; gates [slots].
struct StepInputs {
  std::vector<double> q, k, v, igate, fgate;
};

/// The first element of a host vector or of a device buffer (anything with get()).
template <class X>
const X* data_of(const std::vector<X>& v) {
  return v.data();
}
template <class Buffer>
auto data_of(const Buffer& b) -> decltype(b.get()) {
  return b.get();
}

/// StepParams of one step of shape `s`: q, k, v, igate, fgate from `in` (host vectors or
/// device buffers), the states c, n, m (updated in place) and the output h.
template <class T, class Acc, class Inputs>
mlstm::StepParams<T, Acc> step_params(const StepShape& s, const Inputs& in, Acc* c, Acc* n, Acc* m, T* h) {
  mlstm::StepParams<T, Acc> p;
  p.batch = s.batch;
  p.heads = s.heads;
  p.dqk = s.dqk;
  p.dv = s.dv;
  p.q = data_of(in.q);
  p.k = data_of(in.k);
  p.v = data_of(in.v);
  p.igate = data_of(in.igate);
  p.fgate = data_of(in.fgate);
  p.c = c;
  p.n = n;
  p.m = m;
  p.h = h;
  return p;
}

}  // namespace moxe::test
