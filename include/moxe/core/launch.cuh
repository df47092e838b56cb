// moxe: launch helpers. CUDA errors become moxe::Status; nothing here synchronises unless
// MOXE_DEBUG_SYNC is defined (and then never while the stream is being captured).
#pragma once

#include <cuda_runtime.h>

#include "moxe/core/config.hpp"
#include "moxe/core/status.hpp"

namespace moxe {

inline Status from_cuda(cudaError_t e) { return e == cudaSuccess ? Status::ok : Status::cuda_error; }

/// Check the launch that just happened on `stream`. With MOXE_DEBUG_SYNC defined the
/// stream is also synchronised (outside graph capture) so asynchronous faults surface at
/// the launch that caused them.
inline Status check_launch(cudaStream_t stream) {
  if (cudaGetLastError() != cudaSuccess) return Status::cuda_error;
#if defined(MOXE_DEBUG_SYNC)
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(stream, &capture) != cudaSuccess) return Status::cuda_error;
  if (capture == cudaStreamCaptureStatusNone && cudaStreamSynchronize(stream) != cudaSuccess)
    return Status::cuda_error;
#else
  (void)stream;
#endif
  return Status::ok;
}

/// Raise a kernel's dynamic shared memory limit when it needs more than the default 48 KB.
template <class Kernel>
inline Status set_max_dynamic_smem(Kernel kernel, std::size_t bytes) {
  if (bytes <= 48 * 1024) return Status::ok;
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return Status::cuda_error;
  int optin = 0;
  if (cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess)
    return Status::cuda_error;
  if (bytes > static_cast<std::size_t>(optin)) return Status::unsupported;
  return from_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(bytes)));
}

/// Number of multiprocessors of the current device (persistent grids size themselves by it).
inline Status multiprocessor_count(int* count) {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return Status::cuda_error;
  return from_cuda(cudaDeviceGetAttribute(count, cudaDevAttrMultiProcessorCount, device));
}

}  // namespace moxe

/// Return Status::cuda_error from the enclosing function if a CUDA call fails.
#define MOXE_CUDA_TRY(expr)                                           \
  do {                                                                \
    if ((expr) != cudaSuccess) return ::moxe::Status::cuda_error;     \
  } while (0)
