// moxe: one workspace carver that both sizes a workspace and splits it.
//
// A launcher describes its scratch buffers once, in a function templated on nothing but
// the carver:
//
//   struct Scratch { float* partials; int64_t* offsets; };
//   inline Scratch carve_scratch(WorkspaceCarver& c, const Params& p) {
//     Scratch s;
//     s.partials = c.carve<float>(num_blocks(p));
//     s.offsets  = c.carve<int64_t>(p.dims.experts + 1);
//     return s;
//   }
//   size_t foo_workspace_size(const Params& p) {
//     WorkspaceCarver c;                      // sizing mode: no memory, pointers are null
//     carve_scratch(c, p);
//     return c.required_bytes();
//   }
//   Status foo(const Params& p, void* ws, size_t bytes, cudaStream_t s) {
//     WorkspaceCarver c(ws, bytes);
//     Scratch sc = carve_scratch(c, p);
//     if (!c.fits()) return Status::workspace_too_small;
//     ...
//   }
//
// Every buffer is aligned to kAlignment bytes. The size includes kAlignment - 1 bytes of
// slack, so any base address (even a misaligned one) fits a workspace of that size.
#pragma once

#include <cstddef>
#include <cstdint>

#include "moxe/core/config.hpp"

namespace moxe {

class WorkspaceCarver {
 public:
  static constexpr std::size_t kAlignment = 256;

  /// Sizing mode: carve() returns null and only counts bytes.
  WorkspaceCarver() = default;

  /// Carving mode over [base, base + capacity).
  WorkspaceCarver(void* base, std::size_t capacity)
      : base_(static_cast<char*>(base)), capacity_(capacity), sizing_(false) {
    const auto addr = reinterpret_cast<std::uintptr_t>(base_);
    lead_ = base_ ? static_cast<std::size_t>((kAlignment - addr % kAlignment) % kAlignment) : 0;
  }

  /// Reserve `count` elements of T; a zero count reserves nothing and returns null.
  template <class T>
  T* carve(std::size_t count) {
    if (count == 0) return nullptr;
    const std::size_t offset = used_;
    used_ = offset + round_up(count * sizeof(T), kAlignment);
    if (sizing_ || base_ == nullptr || !fits()) return nullptr;
    return reinterpret_cast<T*>(base_ + lead_ + offset);
  }

  /// Bytes a caller must provide for everything carved so far (0 when nothing was).
  std::size_t required_bytes() const { return used_ == 0 ? 0 : used_ + kAlignment - 1; }

  /// In carving mode: whether everything carved so far lies inside the workspace.
  bool fits() const {
    if (used_ == 0) return true;
    return base_ != nullptr && lead_ + used_ <= capacity_;
  }

  bool sizing() const { return sizing_; }

 private:
  char* base_ = nullptr;
  std::size_t capacity_ = 0;
  std::size_t lead_ = 0;
  std::size_t used_ = 0;
  bool sizing_ = true;
};

}  // namespace moxe
