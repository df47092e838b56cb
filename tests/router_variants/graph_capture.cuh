// Runs a launcher under CUDA-graph capture on a fresh stream, then the graph once, and
// returns the launcher's status: the variants must capture (no host sync, no allocation).
#pragma once

#include <cuda_runtime.h>

#include "device_utils.cuh"
#include "moxe/core/status.hpp"

namespace moxe::test::variants {

template <class Launch>
moxe::Status run_captured(Launch launch) {
  cudaStream_t stream;
  MOXE_TEST_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cudaGraph_t graph;
  MOXE_TEST_CUDA(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
  const moxe::Status s = launch(stream);
  MOXE_TEST_CUDA(cudaStreamEndCapture(stream, &graph));
  if (s == moxe::Status::ok) {
    cudaGraphExec_t exec;
    MOXE_TEST_CUDA(cudaGraphInstantiate(&exec, graph, 0));
    MOXE_TEST_CUDA(cudaGraphLaunch(exec, stream));
    MOXE_TEST_CUDA(cudaStreamSynchronize(stream));
    cudaGraphExecDestroy(exec);
  }
  cudaGraphDestroy(graph);
  cudaStreamDestroy(stream);
  return s;
}

}  // namespace moxe::test::variants
