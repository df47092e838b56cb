// moxe_jax: what every XLA FFI handler shares, on the CPU and on CUDA: buffer checks with
// messages, absent optional buffers, element-type dispatch and moxe::Status -> ffi::Error.
//
// Bindings stay thin (FlashInfer style, docs STYLE.md): check shapes and dtypes, get the
// stream and the scratch, call the library, turn its Status into the framework's error. No
// math lives here.
//
// Conventions of every handler:
//   - an optional input or output is a buffer of shape (0,) when absent (Python passes
//     jnp.zeros((0,)) and asks for a (0,)-shaped result);
//   - index arrays (row_map, expert_offsets, segment_offsets) are int64, or int32 where JAX
//     runs without x64: the handler widens/narrows them through a scratch copy;
//   - floating-point state arrays are Acc: the element type on the CPU (float32, float64),
//     float32 on CUDA.
#pragma once

#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "moxe/core/status.hpp"
#include "xla/ffi/api/ffi.h"

namespace moxe_jax {

namespace ffi = xla::ffi;
using ffi::AnyBuffer;
using ffi::DataType;

/// The element type (T) and the state/accumulator type (Acc) a handler runs with.
template <class T, class Acc>
struct Types {
  using type = T;
  using acc = Acc;
};

inline const char* dtype_name(DataType t) {
  switch (t) {
    case DataType::F16: return "float16";
    case DataType::BF16: return "bfloat16";
    case DataType::F32: return "float32";
    case DataType::F64: return "float64";
    case DataType::S32: return "int32";
    case DataType::S64: return "int64";
    case DataType::PRED: return "bool";
    default: return "an unsupported dtype";
  }
}

inline std::string shape_string(AnyBuffer::Dimensions dims) {
  std::ostringstream s;
  s << "(";
  for (size_t i = 0; i < dims.size(); ++i) s << (i ? ", " : "") << dims[i];
  s << (dims.size() == 1 ? ",)" : ")");
  return s.str();
}

inline std::string shape_string(std::initializer_list<int64_t> dims) {
  std::ostringstream s;
  s << "(";
  size_t i = 0;
  for (int64_t d : dims) s << (i++ ? ", " : "") << d;
  s << (dims.size() == 1 ? ",)" : ")");
  return s.str();
}

/// An optional buffer is absent when it is the (0,)-shaped placeholder.
inline bool present(const AnyBuffer& b) { return !(b.dimensions().size() == 1 && b.dimensions()[0] == 0); }

/// Collects the first failed check of a handler, with the op's name in the message.
class Check {
 public:
  explicit Check(const char* op) : op_(op) {}

  bool ok() const { return message_.empty(); }
  ffi::Error error() const { return ffi::Error::InvalidArgument(message_); }

  void fail(const std::string& what) {
    if (ok()) message_ = std::string("moxe ") + op_ + ": " + what;
  }
  void require(bool cond, const std::string& what) {
    if (!cond) fail(what);
  }

  void rank(const AnyBuffer& b, const char* name, size_t rank, const char* layout) {
    if (b.dimensions().size() != rank)
      fail(std::string(name) + " must be " + layout + ", got shape " + shape_string(b.dimensions()));
  }
  void dtype(const AnyBuffer& b, const char* name, DataType t) {
    if (b.element_type() != t)
      fail(std::string(name) + " must be " + dtype_name(t) + ", got " + dtype_name(b.element_type()));
  }
  void shape(const AnyBuffer& b, const char* name, std::initializer_list<int64_t> dims) {
    const auto got = b.dimensions();
    bool same = got.size() == dims.size();
    size_t i = 0;
    for (int64_t d : dims) same = same && got[i++] == d;
    if (!same) fail(std::string(name) + " must have shape " + shape_string(dims) + ", got " + shape_string(got));
  }
  void tensor(const AnyBuffer& b, const char* name, DataType t, std::initializer_list<int64_t> dims) {
    dtype(b, name, t);
    shape(b, name, dims);
  }
  /// An optional buffer: absent, or of this dtype and shape.
  void optional(const AnyBuffer& b, const char* name, DataType t, std::initializer_list<int64_t> dims) {
    if (present(b)) tensor(b, name, t, dims);
  }
  /// int32 or int64 index array of this shape.
  void indices(const AnyBuffer& b, const char* name, std::initializer_list<int64_t> dims) {
    if (b.element_type() != DataType::S32 && b.element_type() != DataType::S64)
      fail(std::string(name) + " must be int32 or int64, got " + dtype_name(b.element_type()));
    shape(b, name, dims);
  }
  /// A group the library takes all or none of.
  void all_or_none(std::initializer_list<const AnyBuffer*> group, const char* names) {
    size_t given = 0;
    for (const AnyBuffer* b : group) given += present(*b) ? 1 : 0;
    if (given != 0 && given != group.size()) fail(std::string(names) + ": give all of them or none");
  }

 private:
  const char* op_;
  std::string message_;
};

/// The library's Status as an FFI error carrying the op's name and the status.
inline ffi::Error status_error(moxe::Status s, const char* op) {
  if (s == moxe::Status::ok) return ffi::Error::Success();
  const std::string message = std::string("moxe ") + op + " failed: " + moxe::to_string(s);
  switch (s) {
    case moxe::Status::invalid_argument: return ffi::Error(ffi::ErrorCode::kInvalidArgument, message);
    case moxe::Status::unsupported: return ffi::Error(ffi::ErrorCode::kUnimplemented, message);
    case moxe::Status::workspace_too_small: return ffi::Error(ffi::ErrorCode::kResourceExhausted, message);
    default: return ffi::Error::Internal(message);
  }
}

template <class T>
T* data(const AnyBuffer& b) {
  return present(b) ? reinterpret_cast<T*>(b.untyped_data()) : nullptr;
}
template <class T>
T* data(ffi::Result<AnyBuffer> b) {
  return data<T>(*b);
}

/// The ffi::DataType of Acc (the state and statistics arrays).
template <class Acc>
constexpr DataType acc_dtype() {
  return std::is_same_v<Acc, double> ? DataType::F64 : DataType::F32;
}

}  // namespace moxe_jax
