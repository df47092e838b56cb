// moxe: the warp-level tensor-core toolkit of sm_80 and newer, written once for every
// kernel that stages tiles and multiplies them: 16-byte asynchronous copies into shared
// memory (cp.async, zero-filling what lies past a tile's edge), fragment loads from shared
// memory (ldmatrix, plain and transposed) and the bf16 / half MMA m16n8k16 with fp32
// accumulation (mma.sync).
//
// Fragments of mma.sync.aligned.m16n8k16.row.col.f32.T.T.f32, for lane l of a warp,
// g = l / 4 (the lane's group) and q = l % 4 (its place in the group):
//   A, 16 x 16 (m x k), four 32-bit registers of two T each:
//     a[0] = A(g, 2q..2q+1)  a[1] = A(g+8, 2q..2q+1)  a[2] = A(g, 2q+8..2q+9)  a[3] = A(g+8, 2q+8..2q+9)
//   B, 16 x 8 (k x n), two registers:  b[0] = B(2q..2q+1, g)  b[1] = B(2q+8..2q+9, g)
//   C, 16 x 8 fp32, four floats:  c[0..1] = C(g, 2q..2q+1)  c[2..3] = C(g+8, 2q..2q+1)
// (the first of each pair in the low half of a register). fragment_a_row/col,
// fragment_b_k/n and fragment_c_row/col give these positions; they are MOXE_HD, so host
// emulations and epilogues use the same index map.
//
// ldmatrix loads such fragments from shared memory: each of the 8 / 16 / 32 lanes gives the
// address of one 16-byte row (8 T) of an 8 x 8 matrix; register i of every lane receives
// matrix i. From a row-major tile S (rows of T, each row 16-byte aligned):
//   A of rows r0.. and columns k0..:  lane l gives &S[r0 + l % 16][k0 + (l / 16) * 8]  (x4)
//   B stored n-major (S[n][k], k contiguous):  lane l gives &S[n0 + l % 8][k0 + ((l / 8) % 2) * 8]  (x2)
//   B stored k-major (S[k][n], n contiguous):  lane l gives &S[k0 + l % 16][n0]  (x2, trans)
// (ldmatrix_a_offset / ldmatrix_b_offset compute these). The x2 forms read the addresses of
// lanes 0-15; the others are ignored but must be valid shared addresses.
//
// Everything here needs sm_80 or newer; on older architectures the device functions trap
// (launchers check the compute capability first: sm80_supported).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "moxe/core/config.hpp"
#include "moxe/core/launch.cuh"
#include "moxe/core/status.hpp"

namespace moxe::mma {

/// Whether the device code of this compilation pass can use the sm_80 instructions.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define MOXE_MMA_SM80 0
#else
#define MOXE_MMA_SM80 1
#endif

inline constexpr int kM = 16, kN = 8, kK = 16;

struct FragmentA {
  uint32_t r[4];
};
struct FragmentB {
  uint32_t r[2];
};
struct FragmentC {
  float c[4] = {0.f, 0.f, 0.f, 0.f};
};

// ---- positions (the layout above) ---------------------------------------------------------

/// Row / column of element e (0..7: register e / 2, half e % 2) of lane's A fragment.
MOXE_HD constexpr int fragment_a_row(int lane, int e) { return lane / 4 + ((e / 2) % 2) * 8; }
MOXE_HD constexpr int fragment_a_col(int lane, int e) { return 2 * (lane % 4) + e % 2 + (e / 4) * 8; }
/// k / n of element e (0..3) of lane's B fragment.
MOXE_HD constexpr int fragment_b_k(int lane, int e) { return 2 * (lane % 4) + e % 2 + (e / 2) * 8; }
MOXE_HD constexpr int fragment_b_n(int lane, int /*e*/) { return lane / 4; }
/// Row / column of accumulator c[e] (0..3) of lane.
MOXE_HD constexpr int fragment_c_row(int lane, int e) { return lane / 4 + (e / 2) * 8; }
MOXE_HD constexpr int fragment_c_col(int lane, int e) { return 2 * (lane % 4) + e % 2; }

/// The element offset (row * ld + column) whose address lane gives to ldmatrix for an A
/// fragment (x4) at (r0, k0) of a row-major tile with leading dimension ld.
MOXE_HD constexpr int ldmatrix_a_offset(int lane, int r0, int k0, int ld) {
  return (r0 + lane % 16) * ld + k0 + (lane / 16) * 8;
}
/// The same for a B fragment (x2): n-major storage S[n][k] (trans false) or k-major
/// storage S[k][n] (trans true; the x2.trans form).
MOXE_HD constexpr int ldmatrix_b_offset(int lane, int k0, int n0, int ld, bool k_major) {
  return k_major ? (k0 + lane % 16) * ld + n0 : (n0 + lane % 8) * ld + k0 + ((lane / 8) % 2) * 8;
}

// ---- instructions ---------------------------------------------------------------------------

template <class T>
inline constexpr bool is_mma_element_v = std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>;

MOXE_DEVICE MOXE_FORCEINLINE uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

/// 16 bytes from global to shared memory without passing through registers; src_bytes < 16
/// copies that many and zero-fills the rest (0: all zeros, src then is not read but must be
/// a valid address expression). Both addresses 16-byte aligned. Completes at the next
/// cp_async_wait that covers its group.
MOXE_DEVICE MOXE_FORCEINLINE void cp_async_16(void* dst_shared, const void* src_global, int src_bytes = 16) {
#if MOXE_MMA_SM80
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(dst_shared)),
               "l"(src_global), "r"(src_bytes));
#else
  __trap();
#endif
}

/// 4 bytes from global to shared memory (cp.async.ca: through L1); src_bytes 0 writes a zero
/// and reads nothing (src must still be a valid address expression). Both addresses 4-byte
/// aligned. Completes at the next cp_async_wait that covers its group.
MOXE_DEVICE MOXE_FORCEINLINE void cp_async_4(void* dst_shared, const void* src_global, int src_bytes = 4) {
#if MOXE_MMA_SM80
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(shared_address(dst_shared)),
               "l"(src_global), "r"(src_bytes));
#else
  __trap();
#endif
}

/// Closes the group of the cp.async copies this thread issued since the last commit.
MOXE_DEVICE MOXE_FORCEINLINE void cp_async_commit() {
#if MOXE_MMA_SM80
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

/// Waits until at most `pending` of this thread's committed groups are still in flight
/// (0: all done). Other threads' copies need a barrier after it.
template <int pending>
MOXE_DEVICE MOXE_FORCEINLINE void cp_async_wait() {
#if MOXE_MMA_SM80
  asm volatile("cp.async.wait_group %0;\n" ::"n"(pending));
#endif
}

MOXE_DEVICE MOXE_FORCEINLINE void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
#if MOXE_MMA_SM80
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(row)));
#else
  __trap();
#endif
}

MOXE_DEVICE MOXE_FORCEINLINE void ldmatrix_x2(uint32_t (&r)[2], const void* row) {
#if MOXE_MMA_SM80
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(shared_address(row)));
#else
  __trap();
#endif
}

MOXE_DEVICE MOXE_FORCEINLINE void ldmatrix_x2_trans(uint32_t (&r)[2], const void* row) {
#if MOXE_MMA_SM80
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(shared_address(row)));
#else
  __trap();
#endif
}

/// A fragment (rows r0..r0+15, columns k0..k0+15) of a row-major shared tile of T.
template <class T>
MOXE_DEVICE MOXE_FORCEINLINE FragmentA load_a(const T* tile, int ld, int r0, int k0, int lane) {
  static_assert(is_mma_element_v<T>, "mma operands are __nv_bfloat16 or __half");
  FragmentA a;
  ldmatrix_x4(a.r, tile + ldmatrix_a_offset(lane, r0, k0, ld));
  return a;
}

/// B fragment (k0..k0+15, n0..n0+7) of a shared tile stored k-major (S[k][n]: the second
/// operand as a row-major K x N matrix) or n-major (S[n][k]: e.g. keys for Q K^T).
template <class T>
MOXE_DEVICE MOXE_FORCEINLINE FragmentB load_b(const T* tile, int ld, int k0, int n0, int lane, bool k_major) {
  static_assert(is_mma_element_v<T>, "mma operands are __nv_bfloat16 or __half");
  FragmentB b;
  const T* row = tile + ldmatrix_b_offset(lane, k0, n0, ld, k_major);
  if (k_major)
    ldmatrix_x2_trans(b.r, row);
  else
    ldmatrix_x2(b.r, row);
  return b;
}

/// d += a b (16 x 8 x 16, fp32 accumulation).
template <class T>
MOXE_DEVICE MOXE_FORCEINLINE void mma_16816(FragmentC& d, const FragmentA& a, const FragmentB& b) {
  static_assert(is_mma_element_v<T>, "mma operands are __nv_bfloat16 or __half");
#if MOXE_MMA_SM80
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d.c[0]), "+f"(d.c[1]), "+f"(d.c[2]), "+f"(d.c[3])
        : "r"(a.r[0]), "r"(a.r[1]), "r"(a.r[2]), "r"(a.r[3]), "r"(b.r[0]), "r"(b.r[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d.c[0]), "+f"(d.c[1]), "+f"(d.c[2]), "+f"(d.c[3])
        : "r"(a.r[0]), "r"(a.r[1]), "r"(a.r[2]), "r"(a.r[3]), "r"(b.r[0]), "r"(b.r[1]));
  }
#else
  __trap();
#endif
}

/// Two T (lo, hi) in one register: how a kernel builds a fragment from values it computed
/// (an intermediate operand in registers) instead of loading it with ldmatrix. Two scalar
/// round-to-nearest conversions (the paired cvt.rn.bf16x2.f32 is one instruction on a GPU but
/// unknown to the functional simulator's PTX parser; the results are the same bits).
template <class T>
MOXE_DEVICE MOXE_FORCEINLINE uint32_t pack2(float lo, float hi) {
  static_assert(is_mma_element_v<T>, "mma operands are __nv_bfloat16 or __half");
  uint16_t l, h;
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    l = __bfloat16_as_ushort(__float2bfloat16_rn(lo));
    h = __bfloat16_as_ushort(__float2bfloat16_rn(hi));
  } else {
    l = __half_as_ushort(__float2half_rn(lo));
    h = __half_as_ushort(__float2half_rn(hi));
  }
  return uint32_t(l) | (uint32_t(h) << 16);
}

/// Whether `device` runs this toolkit (compute capability 8.0 or newer): launchers of kernels
/// built on it return Status::unsupported otherwise, before launching anything.
inline Status sm80_supported(int device) {
  int major = 0;
  const cudaError_t e = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (e != cudaSuccess) return from_cuda(e);
  return major >= 8 ? Status::ok : Status::unsupported;
}

}  // namespace moxe::mma
