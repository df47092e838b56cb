// moxe::slstm: one decoding step on the device; the states (y, c, n, m) are updated in
// place. The same kernel as sequence_forward with seq_len 1 (see docs/slstm.md).
#pragma once

#include <cuda_runtime.h>

#include "moxe/slstm/params.hpp"
#include "moxe/slstm/sequence.cuh"

namespace moxe::slstm {

/// One step needs no workspace (0): y_out carries y_t between the blocks of a head.
template <class T, class Acc>
std::size_t step_workspace_size(const StepParams<T, Acc>& p) {
  return sequence_forward_workspace_size(as_forward(p));
}

template <class T, class Acc>
Status step(const StepParams<T, Acc>& p, void* workspace, std::size_t workspace_bytes, cudaStream_t stream) {
  MOXE_RETURN_IF_ERROR(validate(p));
  return sequence_forward(as_forward(p), workspace, workspace_bytes, stream);
}

}  // namespace moxe::slstm
