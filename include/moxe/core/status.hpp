// moxe: the library's error type. Launchers never throw, abort or print; they return a Status.
#pragma once

namespace moxe {

enum class Status {
  ok = 0,
  invalid_argument,     ///< a null pointer that is needed, a non-positive size, a bad index, ...
  unsupported,          ///< valid input that this build or this kernel does not handle
  workspace_too_small,  ///< the workspace is smaller than <name>_workspace_size() asked for
  cuda_error,           ///< the CUDA runtime reported an error (launch or configuration)
};

constexpr const char* to_string(Status s) noexcept {
  switch (s) {
    case Status::ok: return "ok";
    case Status::invalid_argument: return "invalid_argument";
    case Status::unsupported: return "unsupported";
    case Status::workspace_too_small: return "workspace_too_small";
    case Status::cuda_error: return "cuda_error";
  }
  return "unknown";
}

constexpr bool is_ok(Status s) noexcept { return s == Status::ok; }

}  // namespace moxe

/// Return early with the status of `expr` if it is not ok.
#define MOXE_RETURN_IF_ERROR(expr)                         \
  do {                                                     \
    const ::moxe::Status moxe_status_ = (expr);            \
    if (moxe_status_ != ::moxe::Status::ok) return moxe_status_; \
  } while (0)

/// Return Status::invalid_argument unless `cond` holds.
#define MOXE_REQUIRE(cond)                                           \
  do {                                                               \
    if (!(cond)) return ::moxe::Status::invalid_argument;            \
  } while (0)
