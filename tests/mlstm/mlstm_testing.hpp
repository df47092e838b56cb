// Shared fixtures of the mLSTM step tests (host and device): the shape of one decoding
// step, its inputs, and the StepParams that point at them.
#pragma once

#include <cstdint>
#include <vector>

#include "moxe/mlstm/params.hpp"

namespace moxe::test {

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
