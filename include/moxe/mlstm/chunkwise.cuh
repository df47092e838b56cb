// moxe::mlstm: the chunkwise mLSTM forward and exact backward on the device.
//
//   size_t chunkwise_forward_workspace_size(const ForwardParams<T, float>&);
//   Status chunkwise_forward(const ForwardParams<T, float>&, void* workspace, size_t bytes,
//                            cudaStream_t stream);
//   size_t chunkwise_backward_workspace_size(const BackwardParams<T, float>&);
//   Status chunkwise_backward(const BackwardParams<T, float>&, void* workspace, size_t bytes,
//                             cudaStream_t stream);
//   size_t chunkwise_tape_size(const ForwardParams<T, float>&);  // ForwardParams::tape
//
// T in {float, __half, __nv_bfloat16}; states and accumulation in float. Float inputs
// compute in fp32 throughout (no TF32). chunk_size a multiple of 16 in [16, 128]; DQK, DV
// multiples of 16 up to 256; any S >= 1; segment_offsets (device memory, batch 1) restart
// the recurrence at every segment.
//
// Both directions are the fused design (detail/fused_device.cuh, fused_device_backward.cuh;
// docs/mlstm.md "Fused device forward" / "Fused device backward"): a gate scan over chunks, a
// state walk writing one fp32 checkpoint per chunk, an output kernel per chunk; the backward
// runs the gate scan and the state walk again (or, given the forward's tape, ForwardParams::
// tape, reads what the forward wrote there), then a row kernel (dq), the reverse
// state-gradient walk, a column kernel (dk, dv) and the gate gradients. half and bf16 run on
// mma.sync with ForwardParams::precision (fast: intermediate operands rounded to T;
// accurate: split in three T parts, about fp32); bf16 and half need sm_80.
//
// The phase design stays as detail::chunkwise_forward_variant / chunkwise_backward_variant
// (tests compare both designs against the reference; its half and bf16 tile products run
// on tensor cores as 3xTF32, about fp32 accuracy, whatever the precision).
//
// The phase design is a sequence of phases (detail/chunkwise_math.hpp): a chunk table built
// on the device from the segment offsets, a scan of the gates (stabiliser m exactly as
// the recurrence computes it), each chunk's local state, the inter-chunk recurrence of the
// boundary states, the intra-chunk scores, and the outputs; the backward adds the reverse
// recurrence of the state gradients, the per-chunk gradients and the gate gradients. The
// phases are MOXE_HD functors (one index per thread here) and tile products (one 16 x 16
// output tile per warp here); the host (chunkwise_host.hpp) runs the same functors and
// tiles in loops, so the CPU tests check this arithmetic, indexing and workspace layout.
// Every output element is written by one thread or warp with a fixed summation order: the
// results are deterministic. No allocation, no synchronisation: safe under graph capture.
#pragma once

#include <cuda_runtime.h>
#include <mma.h>

#include <type_traits>

#include "moxe/core/config.hpp"
#include "moxe/core/launch.cuh"
#include "moxe/core/numeric.cuh"
#include "moxe/core/status.hpp"
#include "moxe/core/workspace.hpp"
#include "moxe/mlstm/detail/chunkwise_math.hpp"
#include "moxe/mlstm/detail/fused_device.cuh"
#include "moxe/mlstm/detail/fused_device_backward.cuh"
#include "moxe/mlstm/params.hpp"

namespace moxe::mlstm {

namespace detail {

inline constexpr int kChunkwiseThreads = 256;
inline constexpr int kWarpSizeForTiles = 32;
inline constexpr int kMaxDeviceHeadDim = 256;
inline constexpr int64_t kMaxChunkwiseBlocks = int64_t(1) << 20;  // grid-stride beyond this

/// One index of a phase functor per thread (grid-stride).
template <class F>
__global__ void __launch_bounds__(kChunkwiseThreads)
    chunkwise_phase_kernel(const __grid_constant__ F phase, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) phase(i);
}

/// Whether F is a long sequential loop per index (F::kSequentialPhase): the gate scan and
/// the stabiliser's gradient recurrence, one (unit, head) per index, thousands of dependent
/// steps each over rows no other index touches.
template <class F, class = void>
struct is_sequential_phase : std::false_type {};
template <class F>
struct is_sequential_phase<F, std::void_t<decltype(F::kSequentialPhase)>>
    : std::integral_constant<bool, F::kSequentialPhase> {};

/// Sequential phases have few indices (U * NH: 128 at B = 8, NH = 16); packed 256 to a
/// block they would share one multiprocessor, whose load/store unit then serves every
/// thread's scattered rows in turn. One index per block (up to kSequentialSpread indices;
/// a block of one thread still takes a warp slot) spreads them over the multiprocessors,
/// so each runs its chain alone; more indices than that go 32 to a block.
inline constexpr int64_t kSequentialSpread = 4096;

template <class F>
Status launch_phase(const F& phase, cudaStream_t stream) {
  const int64_t n = phase.size();
  if (n <= 0) return Status::ok;
  int threads = kChunkwiseThreads;
  if constexpr (is_sequential_phase<F>::value) threads = n <= kSequentialSpread ? 1 : kWarpSizeForTiles;
  int64_t blocks = ceil_div<int64_t>(n, threads);
  if (blocks > kMaxChunkwiseBlocks) blocks = kMaxChunkwiseBlocks;
  MOXE_RETURN_IF_ERROR(
      launch_kernel(chunkwise_phase_kernel<F>, static_cast<unsigned>(blocks), threads, 0, stream, phase, n));
  return check_launch(stream);
}

inline constexpr int kTileWarps = 4;  // one 16 x 16 output tile per warp
inline constexpr int kTileThreads = kTileWarps * kWarpSizeForTiles;

/// The device's tile engine (see "tile products" in detail/chunkwise_math.hpp): each warp
/// computes 16 x 16 output tiles of `op`, staging 16-deep slices of both operands in
/// shared memory through the op's accessors. kTensorCores: tensor-core MMAs with fp32
/// accumulation, operands split into two TF32 parts (3xTF32, about fp32 accuracy) for half
/// and bf16 inputs; otherwise exact fp32 FMAs (float inputs, no TF32).
template <class Op, bool kTensorCores>
__global__ void __launch_bounds__(kTileThreads)
    chunkwise_tile_kernel(const __grid_constant__ Op op, int64_t tiles_per_item, int64_t tiles_n,
                          int64_t total_tiles) {
  // Row pitch of the staged tiles: WMMA needs ldm % 4 == 0 (20: a warp writing down a
  // column touches 16 rows in 8 banks, 2-way, rather than 2 banks at a pitch of 16); the
  // FMA path reads rows and columns, 17 keeps both conflict-free.
  constexpr int kLd = kTensorCores ? kTile + 4 : kTile + 1;
  // the op's hints (TileOpBase): which index of A / B is contiguous (the staging runs its
  // lanes along it, so a warp's loads touch two runs of 16 elements, not 16 rows), and
  // which operand is exact in TF32
  constexpr bool kAX = Op::kAContiguousX, kBZ = Op::kBContiguousZ;
  constexpr bool kAExact = Op::kAExactTF32, kBExact = Op::kBExactTF32;
  __shared__ __align__(32) float a_stage[kTileWarps][kTile * kLd];
  __shared__ __align__(32) float b_stage[kTileWarps][kTile * kLd];
  const int warp = static_cast<int>(threadIdx.x) / kWarpSizeForTiles;
  const int lane = static_cast<int>(threadIdx.x) % kWarpSizeForTiles;
  float* a_tile = a_stage[warp];
  float* b_tile = b_stage[warp];
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kTileWarps;
  for (int64_t tile = static_cast<int64_t>(blockIdx.x) * kTileWarps + warp; tile < total_tiles; tile += stride) {
    const int64_t item = tile / tiles_per_item, within = tile % tiles_per_item;
    const int64_t x0 = (within / tiles_n) * kTile, y0 = (within % tiles_n) * kTile;
    const ChunkItem it = op.context(item);
    const int64_t rows = op.rows(it), cols = op.cols(it), depth = op.depth(it);
    if (x0 >= rows || y0 >= cols) continue;  // uniform across the warp

    // a_tile[r][c] = A(x0 + r, z0 + c), b_tile[r][c] = B(z0 + r, y0 + c); idx % 16 (the
    // fast-moving lane index) runs along each operand's contiguous index
    auto stage = [&](int64_t z0) {
      for (int idx = lane; idx < kTile * kTile; idx += kWarpSizeForTiles) {
        const int hi = idx / kTile, lo = idx % kTile;
        const int ar = kAX ? lo : hi, ac = kAX ? hi : lo;
        const int br = kBZ ? lo : hi, bc = kBZ ? hi : lo;
        a_tile[ar * kLd + ac] = (x0 + ar < rows && z0 + ac < depth) ? op.a(it, x0 + ar, z0 + ac) : 0.f;
        b_tile[br * kLd + bc] = (z0 + br < depth && y0 + bc < cols) ? op.b(it, z0 + br, y0 + bc) : 0.f;
      }
    };

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    if constexpr (kTensorCores) {
      namespace wmma = nvcuda::wmma;
      wmma::fragment<wmma::accumulator, 16, 16, 8, float> acc;
      wmma::fill_fragment(acc, 0.f);
      for (int64_t z0 = 0; z0 < depth; z0 += kTile) {
        stage(z0);
        __syncwarp();
        for (int kk = 0; kk < kTile; kk += 8) {
          // 3xTF32: x = hi + lo with hi, lo in TF32; a b ~ a_hi b_lo + a_lo b_hi + a_hi b_hi
          // (fp32-level accuracy on TF32 tensor cores; the gate gradients are differences of
          // such products and would not survive plain TF32's 2^-11).
          wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major> fa_hi, fa_lo;
          wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major> fb_hi, fb_lo;
          // An operand exact in TF32 (kAExact / kBExact) has a zero low part: its split and
          // the product with it are skipped (the same sum: the skipped products are zeros).
          wmma::load_matrix_sync(fa_hi, a_tile + kk, kLd);        // rows x, columns z = kk..kk+7
          wmma::load_matrix_sync(fb_hi, b_tile + kk * kLd, kLd);  // rows z = kk..kk+7, columns y
          for (int i = 0; i < fa_hi.num_elements; ++i) {
            const float x = fa_hi.x[i], hi = wmma::__float_to_tf32(x);
            fa_hi.x[i] = hi;
            if constexpr (!kAExact) fa_lo.x[i] = wmma::__float_to_tf32(x - hi);
          }
          for (int i = 0; i < fb_hi.num_elements; ++i) {
            const float x = fb_hi.x[i], hi = wmma::__float_to_tf32(x);
            fb_hi.x[i] = hi;
            if constexpr (!kBExact) fb_lo.x[i] = wmma::__float_to_tf32(x - hi);
          }
          if constexpr (!kBExact) wmma::mma_sync(acc, fa_hi, fb_lo, acc);
          if constexpr (!kAExact) wmma::mma_sync(acc, fa_lo, fb_hi, acc);
          wmma::mma_sync(acc, fa_hi, fb_hi, acc);
        }
        __syncwarp();
      }
      wmma::store_matrix_sync(a_tile, acc, kLd, wmma::mem_row_major);
      __syncwarp();
      for (int idx = lane; idx < kTile * kTile; idx += kWarpSizeForTiles) {
        const int r = idx / kTile, c = idx % kTile;
        if (x0 + r < rows && y0 + c < cols) op.epilogue(it, x0 + r, y0 + c, a_tile[r * kLd + c]);
      }
      __syncwarp();  // a_tile is staged again by the next tile
      continue;
    }
#endif
    // fp32 FMA: each lane owns row x and 8 consecutive columns of the tile.
    const int x = lane / 2, yb = (lane % 2) * 8;
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int64_t z0 = 0; z0 < depth; z0 += kTile) {
      stage(z0);
      __syncwarp();
      for (int z = 0; z < kTile; ++z) {
        const float av = a_tile[x * kLd + z];
        MOXE_PRAGMA_UNROLL
        for (int k = 0; k < 8; ++k) acc[k] += av * b_tile[z * kLd + yb + k];
      }
      __syncwarp();
    }
    MOXE_PRAGMA_UNROLL
    for (int k = 0; k < 8; ++k)
      if (x0 + x < rows && y0 + yb + k < cols) op.epilogue(it, x0 + x, y0 + yb + k, acc[k]);
  }
}

template <class Op, class T>
Status launch_tile_product(const Op& op, cudaStream_t stream) {
  const int64_t tiles_m = ceil_div<int64_t>(op.max_rows(), kTile);
  const int64_t tiles_n = ceil_div<int64_t>(op.max_cols(), kTile);
  const int64_t per_item = tiles_m * tiles_n, total = op.items() * per_item;
  if (total <= 0) return Status::ok;
  int64_t blocks = ceil_div<int64_t>(total, kTileWarps);
  if (blocks > kMaxChunkwiseBlocks) blocks = kMaxChunkwiseBlocks;
  constexpr bool kTensorCores = NumericTraits<T>::is_reduced;
  MOXE_RETURN_IF_ERROR(launch_kernel(chunkwise_tile_kernel<Op, kTensorCores>, static_cast<unsigned>(blocks),
                                     kTileThreads, 0, stream, op, per_item, tiles_n, total));
  return check_launch(stream);
}

/// Head dimensions the device supports: multiples of 16 up to 256.
MOXE_HD inline bool device_head_dim_supported(int64_t dim) {
  return dim % 16 == 0 && dim <= kMaxDeviceHeadDim;
}

template <class T, class Acc>
Status validate_device_chunkwise(const ForwardParams<T, Acc>& p, bool need_h) {
  static_assert(is_device_element_v<T>, "chunkwise: T must be float, __half or __nv_bfloat16");
  static_assert(std::is_same_v<Acc, float>, "chunkwise: the device keeps states in float");
  MOXE_RETURN_IF_ERROR(validate_chunkwise(p, need_h));
  if (!device_head_dim_supported(p.dims.dqk) || !device_head_dim_supported(p.dims.dv))
    return Status::unsupported;
  return Status::ok;
}

/// Runs one phase: one kernel on the stream.
template <class T>
struct DeviceRunner {
  cudaStream_t stream;
  template <class F>
  Status operator()(const F& f) const {
    if constexpr (is_tile_product<F>::value) {
      return launch_tile_product<F, T>(f, stream);
    } else {
      return launch_phase(f, stream);
    }
  }
};

}  // namespace detail

namespace detail {
/// Bytes of workspace the phase design's forward (chunkwise_forward_variant) needs.
template <class T, class Acc>
std::size_t phase_forward_workspace_size(const ForwardParams<T, Acc>& p) {
  WorkspaceCarver c;
  carve_chunk_workspace<Acc>(c, pass_dims(p), p.num_segments, p.chunk_size, /*backward=*/false);
  return c.required_bytes();
}
}  // namespace detail

/// Bytes of workspace chunkwise_forward needs (the fused forward's): one pass's
/// (ForwardParams::batch_per_pass); 0 when it writes a tape (ForwardParams::tape), which then
/// holds all of it.
template <class T, class Acc>
std::size_t chunkwise_forward_workspace_size(const ForwardParams<T, Acc>& p) {
  static_assert(std::is_same_v<Acc, float>, "chunkwise: the device keeps states in float");
  return detail::fused_chunkwise_forward_workspace_size(p);
}

/// Bytes of the optional forward tape (ForwardParams::tape, tape_bytes): the gate scan, the
/// chunk table, the fp32 state checkpoints (DQK x (DV + 1) per chunk and head) and the
/// per-row gate quantities, for every batch pass. The backward given it skips its gate scan
/// and state walk. At the benchmark size of benchmarks/NOTES.md it is 1,060 MiB at chunk 128
/// (2,088 at 64), held from the forward to the backward; the forward then needs no workspace
/// and the backward's is as much smaller (1,056 MiB instead of 2,116).
template <class T, class Acc>
std::size_t chunkwise_tape_size(const ForwardParams<T, Acc>& p) {
  static_assert(std::is_same_v<Acc, float>, "chunkwise: the device keeps states in float");
  return detail::fused_tape_size(p);
}

/// Bytes of workspace chunkwise_backward needs (the fused backward's): one pass's
/// (ForwardParams::batch_per_pass), less the tape's share when fwd.tape is given.
template <class T, class Acc>
std::size_t chunkwise_backward_workspace_size(const BackwardParams<T, Acc>& p) {
  static_assert(std::is_same_v<Acc, float>, "chunkwise: the device keeps states in float");
  return detail::fused_backward_workspace_size(p);
}

namespace detail {
/// Bytes of workspace the phase design's backward (chunkwise_backward_variant) needs.
template <class T, class Acc>
std::size_t phase_backward_workspace_size(const BackwardParams<T, Acc>& p) {
  WorkspaceCarver c;
  carve_chunk_workspace<Acc>(c, pass_dims(p.fwd), p.fwd.num_segments, p.fwd.chunk_size, /*backward=*/true);
  return c.required_bytes();
}
}  // namespace detail

namespace detail {

/// The launchers, with the variant of the chunk products as a parameter (tests run both).
template <bool kTiled, class T, class Acc>
Status chunkwise_forward_variant(const ForwardParams<T, Acc>& p, void* workspace, std::size_t workspace_bytes,
                                 cudaStream_t stream) {
  MOXE_RETURN_IF_ERROR(validate_device_chunkwise(p, /*need_h=*/true));
  if (workspace_bytes < phase_forward_workspace_size(p)) return Status::workspace_too_small;
  return for_each_batch_pass(p, [&](int64_t b0, int64_t nb) {  // one pass unless batch_per_pass
    const ForwardParams<T, Acc> s = batch_slice(p, b0, nb);
    WorkspaceCarver carver(workspace, workspace_bytes);
    const auto ws = carve_chunk_workspace<Acc>(carver, s.dims, s.num_segments, s.chunk_size, false);
    if (!carver.fits()) return Status::workspace_too_small;
    const ChunkProblem<T, Acc> cp = make_chunk_problem(s, ws);
    return run_forward<kTiled>(cp, s.h, s.c_last, s.n_last, s.m_last, DeviceRunner<T>{stream});
  });
}

template <bool kTiled, class T, class Acc>
Status chunkwise_backward_variant(const BackwardParams<T, Acc>& p, void* workspace, std::size_t workspace_bytes,
                                  cudaStream_t stream) {
  MOXE_RETURN_IF_ERROR(validate(p));
  MOXE_RETURN_IF_ERROR(validate_device_chunkwise(p.fwd, /*need_h=*/false));
  if (workspace_bytes < phase_backward_workspace_size(p)) return Status::workspace_too_small;
  return for_each_batch_pass(p.fwd, [&](int64_t b0, int64_t nb) {  // one pass unless batch_per_pass
    const BackwardParams<T, Acc> s = batch_slice(p, b0, nb);
    WorkspaceCarver carver(workspace, workspace_bytes);
    const auto ws = carve_chunk_workspace<Acc>(carver, s.fwd.dims, s.fwd.num_segments, s.fwd.chunk_size, true);
    if (!carver.fits()) return Status::workspace_too_small;
    const ChunkProblem<T, Acc> cp = make_chunk_problem(s.fwd, ws);
    return run_backward<kTiled>(cp, make_chunk_grad_io(s), DeviceRunner<T>{stream});
  });
}

}  // namespace detail

/// h, and the final states (c_last, n_last, m_last) when given: the fused forward
/// (detail/fused_device.cuh; ForwardParams::precision picks fast or accurate for half and
/// bf16). The phase design's forward stays as detail::chunkwise_forward_variant.
template <class T, class Acc>
Status chunkwise_forward(const ForwardParams<T, Acc>& p, void* workspace, std::size_t workspace_bytes,
                         cudaStream_t stream) {
  static_assert(std::is_same_v<Acc, float>, "chunkwise: the device keeps states in float");
  return detail::fused_chunkwise_forward(p, workspace, workspace_bytes, stream);
}

/// dq, dk, dv, digate, dfgate, and dc_init, dn_init, dm_init when given: the exact
/// gradient of the recurrent definition (gate scan and checkpoints recomputed, or read from
/// the forward's tape when fwd.tape is given: the same bits; h not read),
/// by the fused backward (detail/fused_device_backward.cuh; the forward's precision).
template <class T, class Acc>
Status chunkwise_backward(const BackwardParams<T, Acc>& p, void* workspace, std::size_t workspace_bytes,
                          cudaStream_t stream) {
  static_assert(std::is_same_v<Acc, float>, "chunkwise: the device keeps states in float");
  return detail::fused_chunkwise_backward(p, workspace, workspace_bytes, stream);
}

}  // namespace moxe::mlstm
