// moxe_jax: the backend of the platform "CUDA" handlers: the moxe device launchers, float32,
// bfloat16 and float16 (states and router statistics float32), on XLA's stream with scratch
// from XLA's allocator (no cudaMalloc, no host synchronisation: every launcher is
// stream-ordered and graph-capture safe). The handlers are defined one family per file
// (cuda_<family>.cu, compiled side by side), exported as MoxeJax<Op>Cuda; the Python package
// registers each under "moxe_<op>" with platform="CUDA".
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "moxe/core/launch.cuh"
#include "moxe/dispatch/permute.cuh"
#include "moxe/dispatch/routing_map.cuh"
#include "moxe/mlstm/chunkwise.cuh"
#include "moxe/router/gate.cuh"
#include "moxe/slstm/sequence.cuh"
#include "ops.hpp"

namespace moxe_jax {

namespace detail {

/// int32 <-> int64 index copies (JAX without x64 has no int64 arrays; the library's row maps
/// and offsets are int64). Grid-stride, one element per thread.
template <class To, class From>
__global__ void convert_indices(const From* src, To* dst, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    dst[i] = static_cast<To>(src[i]);
}

template <class To, class From>
moxe::Status launch_convert(const From* src, To* dst, int64_t n, cudaStream_t stream) {
  if (n == 0) return moxe::Status::ok;
  const int64_t blocks = (n + 255) / 256;
  const unsigned grid = static_cast<unsigned>(blocks < 4096 ? blocks : 4096);
  return moxe::launch_kernel(convert_indices<To, From>, dim3(grid), dim3(256), 0, stream, src, dst, n);
}

}  // namespace detail

/// Runs the device launchers on XLA's stream; every workspace comes from XLA's scratch
/// allocator, freed when the handler returns (XLA keeps it valid for the work queued on the
/// stream).
class DeviceBackend {
 public:
  DeviceBackend(cudaStream_t stream, ffi::ScratchAllocator& scratch) : stream_(stream), scratch_(scratch) {}

  template <class F>
  ffi::Error dispatch_float(DataType t, const char* op, F&& f) {
    switch (t) {
      case DataType::F32: return f(Types<float, float>{});
      case DataType::BF16: return f(Types<__nv_bfloat16, float>{});
      case DataType::F16: return f(Types<__half, float>{});
      default:
        return ffi::Error::InvalidArgument(std::string("moxe ") + op +
                                           ": on CUDA the dtype must be float32, bfloat16 or float16, got " +
                                           dtype_name(t));
    }
  }

  moxe::Status indices_in(const AnyBuffer& b, const int64_t** out) {
    *out = nullptr;
    if (!present(b)) return moxe::Status::ok;
    if (b.element_type() == DataType::S64) {
      *out = data<const int64_t>(b);
      return moxe::Status::ok;
    }
    int64_t* wide = nullptr;
    MOXE_RETURN_IF_ERROR(allocate(b.element_count() * sizeof(int64_t), reinterpret_cast<void**>(&wide)));
    MOXE_RETURN_IF_ERROR(
        detail::launch_convert(data<const int32_t>(b), wide, static_cast<int64_t>(b.element_count()), stream_));
    *out = wide;
    return moxe::Status::ok;
  }

  moxe::Status indices_out(const AnyBuffer& b, int64_t** out) {
    if (b.element_type() == DataType::S64) {
      *out = data<int64_t>(b);
      return moxe::Status::ok;
    }
    return allocate(b.element_count() * sizeof(int64_t), reinterpret_cast<void**>(out));
  }

  moxe::Status finish_indices(const int64_t* wide, const AnyBuffer& b) {
    if (b.element_type() != DataType::S32) return moxe::Status::ok;
    return detail::launch_convert(wide, data<int32_t>(b), static_cast<int64_t>(b.element_count()), stream_);
  }

  moxe::Status zero(void* ptr, size_t bytes) {
    return bytes ? moxe::from_cuda(cudaMemsetAsync(ptr, 0, bytes, stream_)) : moxe::Status::ok;
  }

  template <class T, class Acc>
  moxe::Status run(const moxe::mlstm::ForwardParams<T, Acc>& p) {
    return with_workspace(moxe::mlstm::chunkwise_forward_workspace_size(p),
                          [&](void* ws, size_t n) { return moxe::mlstm::chunkwise_forward(p, ws, n, stream_); });
  }
  template <class T, class Acc>
  moxe::Status run(const moxe::mlstm::BackwardParams<T, Acc>& p) {
    return with_workspace(moxe::mlstm::chunkwise_backward_workspace_size(p),
                          [&](void* ws, size_t n) { return moxe::mlstm::chunkwise_backward(p, ws, n, stream_); });
  }
  template <class T, class Acc>
  moxe::Status run(const moxe::slstm::ForwardParams<T, Acc>& p) {
    return with_workspace(moxe::slstm::sequence_forward_workspace_size(p),
                          [&](void* ws, size_t n) { return moxe::slstm::sequence_forward(p, ws, n, stream_); });
  }
  template <class T, class Acc>
  moxe::Status run(const moxe::slstm::BackwardParams<T, Acc>& p) {
    return with_workspace(moxe::slstm::sequence_backward_workspace_size(p),
                          [&](void* ws, size_t n) { return moxe::slstm::sequence_backward(p, ws, n, stream_); });
  }
  template <class T, class Acc>
  moxe::Status run(const moxe::router::GateForwardParams<T, Acc>& p) {
    return with_workspace(moxe::router::gate_forward_workspace_size(p),
                          [&](void* ws, size_t n) { return moxe::router::gate_forward(p, ws, n, stream_); });
  }
  template <class T, class Acc>
  moxe::Status run(const moxe::router::GateBackwardParams<T, Acc>& p) {
    return with_workspace(moxe::router::gate_backward_workspace_size(p),
                          [&](void* ws, size_t n) { return moxe::router::gate_backward(p, ws, n, stream_); });
  }
  moxe::Status run(const moxe::dispatch::RoutingMapParams& p) {
    return with_workspace(moxe::dispatch::routing_map_workspace_size(p),
                          [&](void* ws, size_t n) { return moxe::dispatch::routing_map(p, ws, n, stream_); });
  }
  template <class T>
  moxe::Status run(const moxe::dispatch::PermuteParams<T>& p) {
    return with_workspace(moxe::dispatch::permute_workspace_size(p),
                          [&](void* ws, size_t n) { return moxe::dispatch::permute(p, ws, n, stream_); });
  }
  template <class T>
  moxe::Status run(const moxe::dispatch::PermuteBackwardParams<T>& p) {
    return with_workspace(moxe::dispatch::permute_backward_workspace_size(p), [&](void* ws, size_t n) {
      return moxe::dispatch::permute_backward(p, ws, n, stream_);
    });
  }
  template <class T, class Acc>
  moxe::Status run(const moxe::dispatch::UnpermuteParams<T, Acc>& p) {
    return with_workspace(moxe::dispatch::unpermute_workspace_size(p),
                          [&](void* ws, size_t n) { return moxe::dispatch::unpermute(p, ws, n, stream_); });
  }
  template <class T, class Acc>
  moxe::Status run(const moxe::dispatch::UnpermuteBackwardParams<T, Acc>& p) {
    return with_workspace(moxe::dispatch::unpermute_backward_workspace_size(p), [&](void* ws, size_t n) {
      return moxe::dispatch::unpermute_backward(p, ws, n, stream_);
    });
  }

 private:
  /// Scratch from XLA (256-byte aligned); workspace_too_small when XLA has none to give.
  moxe::Status allocate(size_t bytes, void** out) {
    *out = nullptr;
    if (bytes == 0) return moxe::Status::ok;
    const std::optional<void*> ptr = scratch_.Allocate(bytes, 256);
    if (!ptr.has_value()) return moxe::Status::workspace_too_small;
    *out = *ptr;
    return moxe::Status::ok;
  }

  template <class F>
  moxe::Status with_workspace(size_t bytes, F&& launch) {
    void* ws = nullptr;
    MOXE_RETURN_IF_ERROR(allocate(bytes, &ws));
    return launch(ws, bytes);
  }

  cudaStream_t stream_;
  ffi::ScratchAllocator& scratch_;
};

}  // namespace moxe_jax

#define MOXE_JAX_CUDA_HANDLER(Name, body, binding)                                                            \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(                                                                              \
      MoxeJax##Name##Cuda,                                                                                    \
      [](cudaStream_t stream, xla::ffi::ScratchAllocator scratch, auto... args) {                             \
        moxe_jax::DeviceBackend be(stream, scratch);                                                          \
        return moxe_jax::body(be, std::move(args)...);                                                        \
      },                                                                                                      \
      moxe_jax::binding(                                                                                      \
          xla::ffi::Ffi::Bind().Ctx<xla::ffi::PlatformStream<cudaStream_t>>().Ctx<xla::ffi::ScratchAllocator>()));

