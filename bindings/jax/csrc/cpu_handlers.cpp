// moxe_jax: the XLA FFI handlers of platform "cpu": the moxe host references (the math of
// docs/, any T/Acc), float32 and float64. Exported as MoxeJax<Op>Cpu; the Python package
// registers each under "moxe_<op>" with jax.ffi.register_ffi_target(..., platform="cpu").
#include <cstring>
#include <vector>

#include "moxe/dispatch/reference.hpp"
#include "moxe/mlstm/reference.hpp"
#include "moxe/router/reference.hpp"
#include "moxe/slstm/reference.hpp"
#include "ops.hpp"

namespace moxe_jax {

/// Runs the host references on host buffers. int32 index arrays go through int64 copies
/// that live as long as the backend (one handler call).
class HostBackend {
 public:
  template <class F>
  ffi::Error dispatch_float(DataType t, const char* op, F&& f) {
    switch (t) {
      case DataType::F32: return f(Types<float, float>{});
      case DataType::F64: return f(Types<double, double>{});
      default:
        return ffi::Error::InvalidArgument(std::string("moxe ") + op +
                                           ": on the CPU the dtype must be float32 or float64, got " +
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
    const int32_t* src = data<const int32_t>(b);
    std::vector<int64_t>& wide = copies_.emplace_back(src, src + b.element_count());
    *out = wide.data();
    return moxe::Status::ok;
  }

  moxe::Status indices_out(const AnyBuffer& b, int64_t** out) {
    if (b.element_type() == DataType::S64) {
      *out = data<int64_t>(b);
    } else {
      *out = copies_.emplace_back(b.element_count(), int64_t(0)).data();
    }
    return moxe::Status::ok;
  }

  moxe::Status finish_indices(const int64_t* wide, const AnyBuffer& b) {
    if (b.element_type() == DataType::S32) {
      int32_t* dst = data<int32_t>(b);
      for (size_t i = 0; i < b.element_count(); ++i) dst[i] = static_cast<int32_t>(wide[i]);
    }
    return moxe::Status::ok;
  }

  moxe::Status zero(void* ptr, size_t bytes) {
    if (bytes) std::memset(ptr, 0, bytes);
    return moxe::Status::ok;
  }

  template <class T, class Acc>
  moxe::Status run(const moxe::mlstm::ForwardParams<T, Acc>& p) {
    return moxe::mlstm::reference::forward(p);
  }
  template <class T, class Acc>
  moxe::Status run(const moxe::mlstm::BackwardParams<T, Acc>& p) {
    return moxe::mlstm::reference::backward(p);
  }
  template <class T, class Acc>
  moxe::Status run(const moxe::slstm::ForwardParams<T, Acc>& p) {
    return moxe::slstm::reference::forward(p);
  }
  template <class T, class Acc>
  moxe::Status run(const moxe::slstm::BackwardParams<T, Acc>& p) {
    return moxe::slstm::reference::backward(p);
  }
  template <class T, class Acc>
  moxe::Status run(const moxe::router::GateForwardParams<T, Acc>& p) {
    return moxe::router::reference::gate_forward(p);
  }
  template <class T, class Acc>
  moxe::Status run(const moxe::router::GateBackwardParams<T, Acc>& p) {
    return moxe::router::reference::gate_backward(p);
  }
  moxe::Status run(const moxe::dispatch::RoutingMapParams& p) { return moxe::dispatch::reference::routing_map(p); }
  template <class T>
  moxe::Status run(const moxe::dispatch::PermuteParams<T>& p) {
    return moxe::dispatch::reference::permute(p);
  }
  template <class T>
  moxe::Status run(const moxe::dispatch::PermuteBackwardParams<T>& p) {
    return moxe::dispatch::reference::permute_backward(p);
  }
  template <class T, class Acc>
  moxe::Status run(const moxe::dispatch::UnpermuteParams<T, Acc>& p) {
    return moxe::dispatch::reference::unpermute(p);
  }
  template <class T, class Acc>
  moxe::Status run(const moxe::dispatch::UnpermuteBackwardParams<T, Acc>& p) {
    return moxe::dispatch::reference::unpermute_backward(p);
  }

 private:
  std::vector<std::vector<int64_t>> copies_;
};

}  // namespace moxe_jax

#define MOXE_JAX_CPU_HANDLER(Name, body, binding)                                                   \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(MoxeJax##Name##Cpu,                                                   \
                                [](auto... args) {                                                   \
                                  moxe_jax::HostBackend be;                                          \
                                  return moxe_jax::body(be, std::move(args)...);                     \
                                },                                                                   \
                                moxe_jax::binding(xla::ffi::Ffi::Bind()));

MOXE_JAX_FOR_EACH_HANDLER(MOXE_JAX_CPU_HANDLER)
