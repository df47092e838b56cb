// moxe_torch: what every binding shares: tensor checks, element-type dispatch, the
// workspace from PyTorch's caching allocator, and Status -> a PyTorch error.
//
// Bindings stay thin (docs STYLE.md, FlashInfer): check shapes, get the stream, call the
// launcher, turn the Status into the framework's error. No math lives here.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>

#include "moxe/core/status.hpp"
#include "ops.h"

namespace moxe_torch {

/// A device tensor of `dtype`, contiguous, on the same device as `like`.
inline void check_tensor(const at::Tensor& t, const char* name, at::ScalarType dtype, const at::Tensor& like) {
  TORCH_CHECK(t.defined(), name, " is undefined");
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == like.device(), name, " must be on ", like.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

inline void check_shape(const at::Tensor& t, const char* name, at::IntArrayRef shape) {
  TORCH_CHECK(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
}

inline void check_tensor(const at::Tensor& t, const char* name, at::ScalarType dtype, const at::Tensor& like,
                         at::IntArrayRef shape) {
  check_tensor(t, name, dtype, like);
  check_shape(t, name, shape);
}

inline void check_optional(const OptTensor& t, const char* name, at::ScalarType dtype, const at::Tensor& like,
                           at::IntArrayRef shape) {
  if (t.has_value()) check_tensor(*t, name, dtype, like, shape);
}

/// Optional groups the library takes all or none of (initial states, upstream gradients).
inline void check_all_or_none(std::initializer_list<const OptTensor*> group, const char* what) {
  size_t given = 0;
  for (const OptTensor* t : group) given += t->has_value() ? 1 : 0;
  TORCH_CHECK(given == 0 || given == group.size(), what, ": give all of them or none");
}

/// The launcher's Status as a PyTorch error (RuntimeError in Python).
inline void check_status(moxe::Status s, const char* op) {
  TORCH_CHECK(s == moxe::Status::ok, "moxe ", op, " failed: ", moxe::to_string(s));
}

/// Scratch for one launcher call from the caching allocator (stream-ordered, no sync).
/// Freed when the tensor dies; the allocator keeps it valid for work queued on `stream`.
struct Workspace {
  at::Tensor buffer;
  void* ptr() const { return buffer.defined() ? buffer.data_ptr() : nullptr; }
  size_t bytes() const { return buffer.defined() ? static_cast<size_t>(buffer.numel()) : 0; }
};

inline Workspace make_workspace(size_t bytes, const at::Tensor& like) {
  if (bytes == 0) return {};
  return {at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte))};
}

inline cudaStream_t current_stream() { return at::cuda::getCurrentCUDAStream().stream(); }

/// The element type a tensor dtype stands for on the device.
template <class T>
struct ElementTag {
  using type = T;
};

/// Calls f(ElementTag<T>{}) with T = float, __half or __nv_bfloat16. There is no double
/// path: the device launchers take float, half and bf16 only.
template <class F>
void dispatch_element(at::ScalarType dtype, const char* op, F&& f) {
  switch (dtype) {
    case at::kFloat: f(ElementTag<float>{}); return;
    case at::kHalf: f(ElementTag<__half>{}); return;
    case at::kBFloat16: f(ElementTag<__nv_bfloat16>{}); return;
    default: TORCH_CHECK(false, "moxe ", op, ": dtype must be float32, float16 or bfloat16, got ", dtype);
  }
}

/// Raw pointers in the library's types (at::Half and __half share a layout, as do
/// at::BFloat16 and __nv_bfloat16).
template <class T>
T* ptr(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}
template <class T>
T* ptr(const OptTensor& t) {
  return t.has_value() ? ptr<T>(*t) : nullptr;
}

/// An undefined tensor unless `want` (None in Python).
inline at::Tensor empty_if(bool want, at::IntArrayRef shape, const at::TensorOptions& options) {
  return want ? at::empty(shape, options) : at::Tensor();
}

}  // namespace moxe_torch
