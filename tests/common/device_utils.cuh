// Device test utilities: device detection, an RAII device buffer with upload, download
// and NaN poisoning, and a deliberately misaligned workspace.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "moxe/core/numeric.cuh"

namespace moxe::test {

/// True when a CUDA device can be used. Any error (no driver, no device) means "no device".
inline bool device_available() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return count > 0;
}

#define MOXE_TEST_CUDA(expr)                                                              \
  do {                                                                                    \
    const cudaError_t moxe_err_ = (expr);                                                 \
    if (moxe_err_ != cudaSuccess) {                                                       \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #expr,                  \
                   cudaGetErrorString(moxe_err_));                                        \
      std::abort();                                                                       \
    }                                                                                     \
  } while (0)

/// Owning device allocation of n elements of T.
template <class T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(std::size_t n) : n_(n) {
    if (n_ > 0) MOXE_TEST_CUDA(cudaMalloc(&ptr_, n_ * sizeof(T)));
  }
  explicit DeviceBuffer(const std::vector<T>& host) : DeviceBuffer(host.size()) { upload(host); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& o) noexcept : ptr_(o.ptr_), n_(o.n_) { o.ptr_ = nullptr; o.n_ = 0; }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    if (this != &o) { release(); ptr_ = o.ptr_; n_ = o.n_; o.ptr_ = nullptr; o.n_ = 0; }
    return *this;
  }
  ~DeviceBuffer() { release(); }

  T* get() const { return ptr_; }
  std::size_t size() const { return n_; }
  std::size_t bytes() const { return n_ * sizeof(T); }

  void upload(const std::vector<T>& host) {
    if (host.size() != n_) std::abort();
    if (n_) MOXE_TEST_CUDA(cudaMemcpy(ptr_, host.data(), bytes(), cudaMemcpyHostToDevice));
  }
  std::vector<T> download() const {
    std::vector<T> host(n_);
    if (n_) MOXE_TEST_CUDA(cudaMemcpy(host.data(), ptr_, bytes(), cudaMemcpyDeviceToHost));
    return host;
  }
  /// Every byte 0xFF: NaN for float, half and bf16; -1 for signed integers.
  void poison() { fill_bytes(0xFF); }
  void fill_bytes(int byte) {
    if (n_) MOXE_TEST_CUDA(cudaMemset(ptr_, byte, bytes()));
  }

 private:
  void release() {
    if (ptr_) cudaFree(ptr_);
    ptr_ = nullptr;
  }
  T* ptr_ = nullptr;
  std::size_t n_ = 0;
};

/// Host values (double or float) -> device element type T.
template <class T, class S>
std::vector<T> convert_to(const std::vector<S>& v) {
  std::vector<T> out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) out[i] = moxe::from_float<T>(static_cast<float>(v[i]));
  return out;
}

/// Device element type T -> double.
template <class T>
std::vector<double> convert_to_double(const std::vector<T>& v) {
  std::vector<double> out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) out[i] = static_cast<double>(moxe::to_float(v[i]));
  return out;
}

/// Round values through T and back, so a host reference sees the inputs the device sees.
template <class T>
std::vector<double> round_through(const std::vector<double>& v) {
  return convert_to_double(convert_to<T>(v));
}

/// A workspace whose base pointer is deliberately misaligned by `offset` bytes (one byte
/// by default), to check that launchers align what they carve themselves. Every byte is
/// 0xFF: NaN as float, half and bf16 (and -1 as a signed integer), so a kernel that reads
/// scratch before writing it gets NaN into its result and fails the comparison.
class MisalignedWorkspace {
 public:
  explicit MisalignedWorkspace(std::size_t bytes, std::size_t offset = 1)
      : storage_(bytes + offset + 1), offset_(offset), bytes_(bytes) {
    storage_.poison();
  }
  void* get() const { return bytes_ ? static_cast<void*>(storage_.get() + offset_) : nullptr; }
  std::size_t bytes() const { return bytes_; }

 private:
  DeviceBuffer<unsigned char> storage_;
  std::size_t offset_, bytes_;
};

}  // namespace moxe::test
