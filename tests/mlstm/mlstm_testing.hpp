// Shared fixtures of the mLSTM tests (host and device): the shape of one decoding step, its
// inputs, the StepParams that point at them, and the error measure of dfgate.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "moxe/mlstm/params.hpp"

namespace moxe::test {

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
