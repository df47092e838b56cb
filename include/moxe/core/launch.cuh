// moxe: launch helpers. CUDA errors become moxe::Status; nothing here synchronises unless
// MOXE_DEBUG_SYNC is defined (and then never while the stream is being captured).
//
// Errors are the call's own. Every kernel launch goes through launch_kernel (or
// launch_cooperative, launch_cluster), which takes the error code that this very launch returns: a launcher
// never reads, reports or clears an error left in the runtime by earlier, unrelated work
// (CUDA's cudaGetLastError would hand it over as if it were ours). When one of a launcher's
// own runtime calls fails, the launcher returns Status::cuda_error and, as after any failed
// CUDA call, the runtime's last-error state holds that call's error code, for a caller who
// wants the detail (cudaGetLastError). Sticky errors (a kernel that faulted earlier in the
// context) make every later call fail; they are then reported as cuda_error too, as the
// context can no longer run anything.
//
// What a failed launcher may have written: the arguments are checked on the host before
// anything is enqueued, so invalid input (any non-ok Status other than cuda_error) launches
// nothing and writes nothing. A launcher that enqueues several kernels and gets cuda_error
// from the k-th may have enqueued the first k - 1: its workspace and any of its outputs may
// then hold partial results (its inputs are never written). Treat them as undefined.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <tuple>
#include <type_traits>
#include <utility>

#include "moxe/core/config.hpp"
#include "moxe/core/status.hpp"

namespace moxe {

/// cudaSuccess -> ok; anything else -> cuda_error.
inline Status from_cuda(cudaError_t e) { return e == cudaSuccess ? Status::ok : Status::cuda_error; }

/// After the launches of a launcher: with MOXE_DEBUG_SYNC defined the stream is
/// synchronised (outside graph capture) so asynchronous faults surface at the launcher that
/// caused them. Otherwise nothing: launch errors were already taken from each launch.
inline Status check_launch(cudaStream_t stream) {
#if defined(MOXE_DEBUG_SYNC)
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  MOXE_RETURN_IF_ERROR(from_cuda(cudaStreamIsCapturing(stream, &capture)));
  if (capture == cudaStreamCaptureStatusNone) return from_cuda(cudaStreamSynchronize(stream));
#else
  (void)stream;
#endif
  return Status::ok;
}

namespace detail {

/// How a kernel is launched: plainly, cooperatively, or as thread-block clusters of
/// `cluster` CTAs along x (cluster > 0; sm_90).
struct LaunchKind {
  bool cooperative = false;
  unsigned cluster = 0;
};

/// A launch configuration of clusters of `cluster` CTAs along x (grid.x a multiple of it).
struct ClusterConfig {
  cudaLaunchConfig_t config{};
  cudaLaunchAttribute attribute[1]{};
  ClusterConfig(dim3 grid, dim3 block, std::size_t smem, cudaStream_t stream, unsigned cluster) {
    attribute[0].id = cudaLaunchAttributeClusterDimension;
    attribute[0].val.clusterDim.x = cluster;
    attribute[0].val.clusterDim.y = 1;
    attribute[0].val.clusterDim.z = 1;
    config.gridDim = grid;
    config.blockDim = block;
    config.dynamicSmemBytes = smem;
    config.stream = stream;
    config.attrs = attribute;
    config.numAttrs = 1;
  }
  ClusterConfig(const ClusterConfig&) = delete;  // config.attrs points into this object
  ClusterConfig& operator=(const ClusterConfig&) = delete;
};

template <class Args, std::size_t... I>
inline cudaError_t launch_with_tuple(const void* kernel, dim3 grid, dim3 block, std::size_t smem,
                                     cudaStream_t stream, LaunchKind kind, Args& args,
                                     std::index_sequence<I...>) {
  void* pointers[sizeof...(I) + 1] = {const_cast<void*>(static_cast<const void*>(&std::get<I>(args)))...,
                                      nullptr};
  if (kind.cluster > 0) {
    const ClusterConfig c(grid, block, smem, stream, kind.cluster);
    return cudaLaunchKernelExC(&c.config, kernel, pointers);
  }
  return kind.cooperative ? cudaLaunchCooperativeKernel(kernel, grid, block, pointers, smem, stream)
                          : cudaLaunchKernel(kernel, grid, block, pointers, smem, stream);
}

template <class... Params, class... Args>
inline Status launch_impl(void (*kernel)(Params...), dim3 grid, dim3 block, std::size_t smem, cudaStream_t stream,
                          LaunchKind kind, Args&&... args) {
  static_assert(sizeof...(Params) == sizeof...(Args), "launch_kernel: wrong number of kernel arguments");
  // a reference parameter would be passed as the address <<<>>> takes, not the value stored here
  static_assert((!std::is_reference_v<Params> && ...), "launch_kernel: kernel parameters must be by value");
  // implicit conversions only, as the copy-initialisation of a <<<>>> call
  static_assert((std::is_convertible_v<Args&&, std::remove_cv_t<Params>> && ...),
                "launch_kernel: an argument does not convert implicitly to its kernel parameter");
  // each argument converted to the kernel's parameter type, as a <<<>>> call would
  std::tuple<std::remove_cv_t<std::remove_reference_t<Params>>...> values(std::forward<Args>(args)...);
  return from_cuda(launch_with_tuple(reinterpret_cast<const void*>(kernel), grid, block, smem, stream, kind, values,
                                     std::index_sequence_for<Params...>{}));
}

}  // namespace detail

/// kernel<<<grid, block, smem, stream>>>(args...), returning this launch's own error.
template <class... Params, class... Args>
inline Status launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, std::size_t smem, cudaStream_t stream,
                            Args&&... args) {
  return detail::launch_impl(kernel, grid, block, smem, stream, detail::LaunchKind{}, std::forward<Args>(args)...);
}

/// A cooperative launch (all blocks co-resident, grid-wide barriers allowed); capturable
/// into a CUDA graph (a kernel node with the cooperative attribute, CUDA 12+).
template <class... Params, class... Args>
inline Status launch_cooperative(void (*kernel)(Params...), dim3 grid, dim3 block, std::size_t smem,
                                 cudaStream_t stream, Args&&... args) {
  return detail::launch_impl(kernel, grid, block, smem, stream, detail::LaunchKind{true, 0},
                             std::forward<Args>(args)...);
}

/// A launch of thread-block clusters of `cluster` CTAs along x (sm_90;
/// cudaLaunchKernelEx with cudaLaunchAttributeClusterDimension): grid.x must be a multiple
/// of `cluster`. The CTAs of a cluster are co-resident and may use cluster barriers and
/// distributed shared memory. Capturable into a CUDA graph (a kernel node with the cluster
/// attribute). Returns this launch's own error.
template <class... Params, class... Args>
inline Status launch_cluster(void (*kernel)(Params...), dim3 grid, dim3 block, std::size_t smem, cudaStream_t stream,
                             unsigned cluster, Args&&... args) {
  return detail::launch_impl(kernel, grid, block, smem, stream, detail::LaunchKind{false, cluster},
                             std::forward<Args>(args)...);
}

/// How many clusters of `cluster` CTAs (of `block` threads and `smem` dynamic shared memory)
/// the device can hold at once (cudaOccupancyMaxActiveClusters); 0: such a cluster cannot be
/// resident. Launches nothing.
template <class Kernel>
inline Status max_active_clusters(Kernel kernel, unsigned cluster, dim3 block, std::size_t smem, int* count) {
  const detail::ClusterConfig c(dim3(cluster), block, smem, nullptr, cluster);
  return from_cuda(cudaOccupancyMaxActiveClusters(count, kernel, &c.config));
}

/// The current device's shared memory a block may opt in to (static and dynamic together).
inline Status optin_smem_per_block(int* bytes) {
  int device = 0;
  MOXE_RETURN_IF_ERROR(from_cuda(cudaGetDevice(&device)));
  return from_cuda(cudaDeviceGetAttribute(bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
}

/// Raise a kernel's dynamic shared memory limit to `bytes` when its static and dynamic shared
/// memory together exceed the default 48 KB a block may use without opting in (the driver
/// rejects such a launch otherwise, even with `bytes` alone under 48 KB); Status::unsupported
/// when the two together exceed the device's opt-in limit. Only ever raises the limit. No
/// synchronisation; legal during graph capture. Call it before the first launch of the
/// instance with these bytes.
template <class Kernel>
inline Status set_max_dynamic_smem(Kernel kernel, std::size_t bytes) {
  if (bytes == 0) return Status::ok;
  cudaFuncAttributes fa{};
  MOXE_RETURN_IF_ERROR(from_cuda(cudaFuncGetAttributes(&fa, kernel)));
  const std::size_t total = bytes + fa.sharedSizeBytes;
  // never lowered: an instance serves several sizes, and a smaller call must not undo the
  // setting a larger one (another host thread's, say) made for its launch
  if (total <= 48 * 1024 || static_cast<std::size_t>(fa.maxDynamicSharedSizeBytes) >= bytes) return Status::ok;
  int optin = 0;
  MOXE_RETURN_IF_ERROR(optin_smem_per_block(&optin));
  if (total > static_cast<std::size_t>(optin)) return Status::unsupported;
  return from_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(bytes)));
}

/// *fits = whether `kernel` can be launched with `bytes` of dynamic shared memory on the
/// current device (its static shared memory included, against the opt-in limit); no
/// attribute is set. For kernels that pick a deeper pipeline where the memory allows it.
template <class Kernel>
inline Status dynamic_smem_fits(Kernel kernel, std::size_t bytes, bool* fits) {
  cudaFuncAttributes fa{};
  MOXE_RETURN_IF_ERROR(from_cuda(cudaFuncGetAttributes(&fa, kernel)));
  int optin = 0;
  MOXE_RETURN_IF_ERROR(optin_smem_per_block(&optin));
  *fits = bytes + fa.sharedSizeBytes <= static_cast<std::size_t>(optin);
  return Status::ok;
}

/// Number of multiprocessors of the current device (persistent grids size themselves by it).
inline Status multiprocessor_count(int* count) {
  int device = 0;
  MOXE_RETURN_IF_ERROR(from_cuda(cudaGetDevice(&device)));
  return from_cuda(cudaDeviceGetAttribute(count, cudaDevAttrMultiProcessorCount, device));
}

}  // namespace moxe

/// Return Status::cuda_error from the enclosing function if a CUDA call fails.
#define MOXE_CUDA_TRY(expr) MOXE_RETURN_IF_ERROR(::moxe::from_cuda(expr))
