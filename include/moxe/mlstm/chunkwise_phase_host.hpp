// moxe::mlstm::chunkwise_phase_host: the PHASE design of the chunkwise algorithm on the host,
// any T/Acc (double included). It runs the very functors of detail/chunkwise_math.hpp that
// the device launchers of chunkwise.cuh run today, in the same order, over a workspace
// carved by the same function, so a CPU test of this file checks the device's current
// chunk decomposition, stabiliser, boundary states and gradients. It goes when the device
// switches to the fused design, whose host twin is chunkwise_fused_host.hpp. Pointers are host
// memory (segment offsets included). Host C++ only.
#pragma once

#include <algorithm>
#include <cstdint>
#include <new>
#include <vector>

#include "moxe/core/status.hpp"
#include "moxe/core/workspace.hpp"
#include "moxe/mlstm/detail/chunkwise_math.hpp"
#include "moxe/mlstm/params.hpp"

namespace moxe::mlstm::chunkwise_phase_host {

namespace impl {

/// The scratch starts as NaN (floats, doubles) and -1 (integers), like the device's
/// uninitialised workspace: a phase that reads scratch no earlier phase wrote (or that a
/// buffer sharing its memory left behind, see carve_chunk_workspace) shows up in the tests.
inline constexpr unsigned char kPoisonByte = 0xFF;

template <class F>
void run(const F& f) {
  const int64_t n = f.size();
  for (int64_t i = 0; i < n; ++i) f(i);
}

/// Host check of the segment offsets (the device cannot read them on the host).
template <class T, class Acc>
Status validate_segments(const ForwardParams<T, Acc>& p) {
  if (p.segment_offsets == nullptr) return Status::ok;
  const int64_t* o = p.segment_offsets;
  MOXE_REQUIRE(o[0] == 0 && o[p.num_segments] == p.dims.seq_len);
  for (int64_t s = 0; s < p.num_segments; ++s) MOXE_REQUIRE(o[s + 1] >= o[s]);
  return Status::ok;
}

/// Runs one phase: every index in order.
struct HostRunner {
  template <class F>
  Status operator()(const F& f) const {
    if constexpr (detail::is_tile_product<F>::value) {
      // An operand the device treats as exact in TF32 that is not would be a library bug
      // (the device would drop its low part); the host reports it, the CPU tests fail.
      if (!detail::exact_operands_hold_host(f)) return Status::unsupported;
      detail::run_tile_product_host(f);
    } else {
      run(f);
    }
    return Status::ok;
  }
};

}  // namespace impl

template <class T, class Acc>
std::size_t forward_workspace_size(const ForwardParams<T, Acc>& p) {
  WorkspaceCarver c;
  detail::carve_chunk_workspace<Acc>(c, detail::pass_dims(p), p.num_segments, p.chunk_size, false);
  return c.required_bytes();
}

template <class T, class Acc>
std::size_t backward_workspace_size(const BackwardParams<T, Acc>& p) {
  WorkspaceCarver c;
  detail::carve_chunk_workspace<Acc>(c, detail::pass_dims(p.fwd), p.fwd.num_segments, p.fwd.chunk_size, true);
  return c.required_bytes();
}

/// h and (when c_last is given) the final states, by the chunkwise algorithm. kTiled
/// selects the device's variant of the chunk matrix products (tile products by default).
template <class T, class Acc, bool kTiled = detail::kChunkwiseTiled>
Status forward(const ForwardParams<T, Acc>& p) {
  MOXE_RETURN_IF_ERROR(detail::validate_chunkwise(p, /*need_h=*/true));
  MOXE_RETURN_IF_ERROR(impl::validate_segments(p));
  try {
    std::vector<unsigned char> storage(forward_workspace_size(p));
    return detail::for_each_batch_pass(p, [&](int64_t b0, int64_t nb) {  // the device's passes
      const ForwardParams<T, Acc> s = detail::batch_slice(p, b0, nb);
      std::fill(storage.begin(), storage.end(), impl::kPoisonByte);  // every pass starts unwritten
      WorkspaceCarver c(storage.data(), storage.size());
      const auto ws = detail::carve_chunk_workspace<Acc>(c, s.dims, s.num_segments, s.chunk_size, false);
      if (!c.fits()) return Status::workspace_too_small;
      const detail::ChunkProblem<T, Acc> cp = detail::make_chunk_problem(s, ws);
      return detail::run_forward<kTiled>(cp, s.h, s.c_last, s.n_last, s.m_last, impl::HostRunner{});
    });
  } catch (const std::bad_alloc&) {
    return Status::unsupported;
  }
}

/// The exact gradient, by the chunkwise algorithm (forward phases recomputed).
template <class T, class Acc, bool kTiled = detail::kChunkwiseTiled>
Status backward(const BackwardParams<T, Acc>& p) {
  MOXE_RETURN_IF_ERROR(validate(p));
  MOXE_RETURN_IF_ERROR(detail::validate_chunkwise(p.fwd, /*need_h=*/false));
  MOXE_RETURN_IF_ERROR(impl::validate_segments(p.fwd));
  try {
    std::vector<unsigned char> storage(backward_workspace_size(p));
    return detail::for_each_batch_pass(p.fwd, [&](int64_t b0, int64_t nb) {  // the device's passes
      const BackwardParams<T, Acc> s = detail::batch_slice(p, b0, nb);
      std::fill(storage.begin(), storage.end(), impl::kPoisonByte);
      WorkspaceCarver c(storage.data(), storage.size());
      const auto ws =
          detail::carve_chunk_workspace<Acc>(c, s.fwd.dims, s.fwd.num_segments, s.fwd.chunk_size, true);
      if (!c.fits()) return Status::workspace_too_small;
      const detail::ChunkProblem<T, Acc> cp = detail::make_chunk_problem(s.fwd, ws);
      return detail::run_backward<kTiled>(cp, detail::make_chunk_grad_io(s), impl::HostRunner{});
    });
  } catch (const std::bad_alloc&) {
    return Status::unsupported;
  }
}

}  // namespace moxe::mlstm::chunkwise_phase_host
