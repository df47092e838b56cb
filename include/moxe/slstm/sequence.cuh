// moxe::slstm: device sequence forward and backward (see docs/slstm.md).
//
//   size_t sequence_forward_workspace_size(const ForwardParams<T, float>&);   // 0
//   Status sequence_forward(const ForwardParams<T, float>&, void* ws, size_t bytes, cudaStream_t);
//   size_t sequence_backward_workspace_size(const BackwardParams<T, float>&);
//   Status sequence_backward(const BackwardParams<T, float>&, void* ws, size_t bytes, cudaStream_t);
//
// Training: give the forward a tape (ForwardParams::tape_*, sizes from tape_elements) and
// pass the same params, tape and y included, as the backward's fwd: the backward then reads
// the tape instead of replaying the forward (one launch and a forward's work fewer, and a
// smaller workspace) and gets the same bits as without it.
//
// T in {float, __half, __nv_bfloat16}; states and accumulation in float. heads 1..16,
// head_dim a multiple of 16 in [16, 256], any seq_len and batch.
#pragma once

#include <cuda_runtime.h>

#include <type_traits>

#include "moxe/core/launch.cuh"
#include "moxe/core/numeric.cuh"
#include "moxe/core/status.hpp"
#include "moxe/core/workspace.hpp"
#include "moxe/slstm/detail/kernels.cuh"
#include "moxe/slstm/detail/plan.hpp"
#include "moxe/slstm/params.hpp"

namespace moxe::slstm {

namespace detail {

/// The backward's scratch: dgates (float, for dr; without the caller's tape also the replay's
/// raw gates, overwritten step by step), the replayed tape (states, y in T) when the caller
/// gives none, and the partials of the two weight-gradient reductions.
template <class T>
struct BackwardScratch {
  float* dgates;                    // [S, B, 4, NH, DH]
  float *tape_c, *tape_n, *tape_m;  // [S, B, NH, DH]; null with the caller's tape
  T* y_tape;                        // [S, B, NH, DH]; null with the caller's tape
  float* dbias_partial;             // [B, 4, NH, DH]
  float* dr_partial;                // [chunks, NH, 4, DH, DH]
};

/// `replay`: the backward replays the forward (no tape from the caller).
template <class T>
BackwardScratch<T> carve_backward(WorkspaceCarver& c, const Dims& d, bool replay) {
  const std::size_t units = static_cast<std::size_t>(d.seq_len * d.batch * d.heads * d.head_dim);
  const DrSplit split = dr_split(d.seq_len, d.batch, d.heads, d.head_dim);
  BackwardScratch<T> s{};
  s.dgates = c.carve<float>(4 * units);
  if (replay) {
    s.tape_c = c.carve<float>(units);
    s.tape_n = c.carve<float>(units);
    s.tape_m = c.carve<float>(units);
    s.y_tape = c.carve<T>(units);
  }
  s.dbias_partial = c.carve<float>(static_cast<std::size_t>(d.batch * 4 * d.heads * d.head_dim));
  s.dr_partial = c.carve<float>(static_cast<std::size_t>(split.chunks * d.heads * 4 * d.head_dim * d.head_dim));
  return s;
}

/// How a persistent recurrent kernel is launched: units per block, blocks per group, and
/// the groups each (cooperative) launch covers.
struct LaunchPlan {
  int units = 0, splits = 0;
  std::size_t smem = 0;
  int64_t groups = 0, groups_per_launch = 0;
};

/// Checks that the kernel can run (shared memory, co-residency for splits > 1) and fills
/// the plan; `kernel_for(units)` is the kernel instance for that many units per block.
/// `max_groups_per_launch` > 0 caps the groups of one launch (ForwardParams' testing knob).
/// Queries the device; launches nothing.
template <class T, class KernelFor>
Status plan_recurrent(KernelFor kernel_for, const Dims& d, int requested_units, int64_t max_groups_per_launch,
                      bool backward, LaunchPlan* plan) {
  int device = 0, optin = 0, sms = 0, coop = 0;
  MOXE_CUDA_TRY(cudaGetDevice(&device));
  MOXE_CUDA_TRY(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  MOXE_CUDA_TRY(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  MOXE_CUDA_TRY(cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, device));
  const int units = choose_units(d.head_dim, static_cast<int>(sizeof(T)), uses_tensor_cores_v<T>, backward,
                                 static_cast<std::size_t>(optin), requested_units);
  if (units == 0) return Status::unsupported;
  const auto kernel = kernel_for(units);
  if (kernel == nullptr) return Status::unsupported;
  plan->units = units;
  plan->splits = static_cast<int>(d.head_dim / units);
  plan->smem = backward ? backward_smem(d.head_dim, units, sizeof(T), uses_tensor_cores_v<T>).bytes
                        : forward_smem(d.head_dim, units, sizeof(T), uses_tensor_cores_v<T>).bytes;
  plan->groups = num_groups(d.batch, d.heads);
  MOXE_RETURN_IF_ERROR(set_max_dynamic_smem(kernel, plan->smem));
  if (plan->splits == 1) {
    plan->groups_per_launch = plan->groups < 0x7fffffff ? plan->groups : 0x7fffffff;
  } else {
    // The blocks of a group wait for each other every step: all blocks of a launch must be
    // resident at once (cooperative launch); launches take as many whole groups as fit.
    if (!coop) return Status::unsupported;
    int per_sm = 0;
    MOXE_CUDA_TRY(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, plan->smem));
    const int64_t resident = static_cast<int64_t>(per_sm) * sms;
    if (resident < plan->splits) return Status::unsupported;
    plan->groups_per_launch = resident / plan->splits;
  }
  if (max_groups_per_launch > 0 && plan->groups_per_launch > max_groups_per_launch)
    plan->groups_per_launch = max_groups_per_launch;
  return Status::ok;
}

/// Launches `kernel` over all groups of `plan`, in as many launches as co-residency needs.
template <class Kernel, class Args>
Status launch_recurrent(Kernel kernel, Args args, const LaunchPlan& plan, cudaStream_t stream) {
  for (int64_t g0 = 0; g0 < plan.groups; g0 += plan.groups_per_launch) {
    args.group_begin = g0;
    const int64_t count = plan.groups - g0 < plan.groups_per_launch ? plan.groups - g0 : plan.groups_per_launch;
    const dim3 grid(static_cast<unsigned>(count), static_cast<unsigned>(plan.splits));
    // the blocks of a split head wait for each other: a cooperative launch (capturable into a
    // CUDA graph as a kernel node with the cooperative attribute, CUDA 12+)
    MOXE_RETURN_IF_ERROR(plan.splits == 1 ? launch_kernel(kernel, grid, kThreads, plan.smem, stream, args)
                                          : launch_cooperative(kernel, grid, kThreads, plan.smem, stream, args));
  }
  return Status::ok;
}

/// The plan of a cluster kernel (ForwardParams::cluster_size = plan->splits CTAs per group,
/// one cluster each; plan->groups_per_launch only bounds grid.x and honours
/// max_groups_per_launch, clusters need no co-residency with each other). Unsupported below
/// compute capability 9.0, for a cluster size or head_dim that cluster_units rejects, for
/// units_per_block other than 0 or head_dim / cluster_size, for too much shared memory, for
/// a kernel built from PTX older than compute_90 (its body is a trap there), or when the
/// device cannot hold one such cluster. Queries the device; launches nothing.
template <class T, class KernelFor>
Status plan_cluster(KernelFor kernel_for, const Dims& d, int cluster_size, int requested_units,
                    int64_t max_groups_per_launch, bool backward, LaunchPlan* plan) {
  const int units = cluster_units(d.head_dim, cluster_size);
  if (units == 0 || (requested_units != 0 && requested_units != units)) return Status::unsupported;
  int device = 0, major = 0, optin = 0;
  MOXE_CUDA_TRY(cudaGetDevice(&device));
  MOXE_CUDA_TRY(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  if (major < 9) return Status::unsupported;  // clusters and distributed shared memory: sm_90
  MOXE_CUDA_TRY(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  constexpr int kElem = static_cast<int>(sizeof(T));
  const std::size_t smem = backward ? backward_cluster_smem(d.head_dim, units, kElem, uses_tensor_cores_v<T>).bytes
                                    : forward_cluster_smem(d.head_dim, units, kElem, uses_tensor_cores_v<T>).bytes;
  if (smem > static_cast<std::size_t>(optin)) return Status::unsupported;
  const auto kernel = kernel_for(units);
  if (kernel == nullptr) return Status::unsupported;
  // the kernel's body exists where __CUDA_ARCH__ >= 900 only: code the driver JIT-compiles
  // from older PTX (a compute_80 build run on an H100) is the trap stub
  cudaFuncAttributes fa{};
  MOXE_CUDA_TRY(cudaFuncGetAttributes(&fa, kernel));
  if (fa.ptxVersion < 90) return Status::unsupported;
  MOXE_RETURN_IF_ERROR(set_max_dynamic_smem(kernel, smem));
  int clusters = 0;
  MOXE_RETURN_IF_ERROR(max_active_clusters(kernel, static_cast<unsigned>(cluster_size), kThreads, smem, &clusters));
  if (clusters == 0) return Status::unsupported;
  plan->units = units;
  plan->splits = cluster_size;
  plan->smem = smem;
  plan->groups = num_groups(d.batch, d.heads);
  const int64_t max_groups = 0x7fffffff / cluster_size;  // grid.x = groups * cluster_size
  plan->groups_per_launch = plan->groups < max_groups ? plan->groups : max_groups;
  if (max_groups_per_launch > 0 && plan->groups_per_launch > max_groups_per_launch)
    plan->groups_per_launch = max_groups_per_launch;
  return Status::ok;
}

/// Launches a cluster kernel over all groups of `plan` (grid.x = groups * splits, clusters
/// of splits CTAs).
template <class Kernel, class Args>
Status launch_cluster_recurrent(Kernel kernel, Args args, const LaunchPlan& plan, cudaStream_t stream) {
  for (int64_t g0 = 0; g0 < plan.groups; g0 += plan.groups_per_launch) {
    args.group_begin = g0;
    const int64_t count = plan.groups - g0 < plan.groups_per_launch ? plan.groups - g0 : plan.groups_per_launch;
    const dim3 grid(static_cast<unsigned>(count * plan.splits));
    MOXE_RETURN_IF_ERROR(
        launch_cluster(kernel, grid, kThreads, plan.smem, stream, static_cast<unsigned>(plan.splits), args));
  }
  return Status::ok;
}

template <class T, class Acc>
Status check_device_params(const ForwardParams<T, Acc>& p) {
  static_assert(is_device_element_v<T>, "sLSTM device kernels take float, __half or __nv_bfloat16");
  static_assert(std::is_same_v<Acc, float>, "sLSTM device kernels keep states in float");
  if (!device_supports(p.dims.heads, p.dims.head_dim)) return Status::unsupported;
  if (p.units_per_block != 0 &&
      (p.units_per_block % 16 != 0 || p.units_per_block > kMaxUnits || p.dims.head_dim % p.units_per_block != 0))
    return Status::unsupported;
  return Status::ok;
}

template <class T>
ForwardArgs<T> forward_args(const ForwardParams<T, float>& p) {
  ForwardArgs<T> a{};
  a.S = p.dims.seq_len;
  a.B = p.dims.batch;
  a.NH = p.dims.heads;
  a.DH = p.dims.head_dim;
  a.wx = p.wx;
  a.r = p.r;
  a.bias = p.bias;
  a.y_init = p.y_init;
  a.c_init = p.c_init;
  a.n_init = p.n_init;
  a.m_init = p.m_init;
  a.y = p.y;
  a.y_last = p.y_last;
  a.c_last = p.c_last;
  a.n_last = p.n_last;
  a.m_last = p.m_last;
  a.tape_gates = p.tape_gates;
  a.tape_c = p.tape_c;
  a.tape_n = p.tape_n;
  a.tape_m = p.tape_m;
  return a;
}

}  // namespace detail

/// The forward needs no workspace (y itself carries y_t between the blocks of a head).
template <class T, class Acc>
std::size_t sequence_forward_workspace_size(const ForwardParams<T, Acc>& p) {
  (void)p;
  return 0;
}

/// y_t for t = 1..S, (optionally) the final states and (optionally) the tape for the
/// backward, in one persistent kernel. With p.cluster_size (sm_90) a head's blocks form a
/// thread-block cluster and exchange y_t through distributed shared memory; the results
/// are the same bits as the split path's at units_per_block = head_dim / cluster_size.
template <class T, class Acc>
Status sequence_forward(const ForwardParams<T, Acc>& p, void* workspace, std::size_t workspace_bytes,
                        cudaStream_t stream) {
  MOXE_RETURN_IF_ERROR(validate(p));
  MOXE_RETURN_IF_ERROR(detail::check_device_params(p));
  WorkspaceCarver carver(workspace, workspace_bytes);
  if (!carver.fits()) return Status::workspace_too_small;
  const bool cluster = p.cluster_size != 0;
  const bool tape = has_tape(p);
  const auto kernel_for =
      cluster ? (tape ? detail::forward_cluster_kernel_for<T, true> : detail::forward_cluster_kernel_for<T, false>)
              : (tape ? detail::forward_kernel_for<T, true> : detail::forward_kernel_for<T, false>);
  detail::LaunchPlan plan;
  if (cluster) {
    MOXE_RETURN_IF_ERROR(detail::plan_cluster<T>(kernel_for, p.dims, p.cluster_size, p.units_per_block,
                                                 p.max_groups_per_launch, false, &plan));
  } else {
    MOXE_RETURN_IF_ERROR(
        detail::plan_recurrent<T>(kernel_for, p.dims, p.units_per_block, p.max_groups_per_launch, false, &plan));
  }
  detail::ForwardArgs<T> args = detail::forward_args(p);
  args.splits = plan.splits;
  // an output y that overlaps y_init (e.g. step() with y_out == y in float) needs a group
  // barrier between reading y_init and writing y_0 when a head spans several blocks
  const std::size_t state_elems = static_cast<std::size_t>(p.dims.batch * hidden(p.dims));
  args.init_barrier = plan.splits > 1 &&
                      detail::ranges_overlap(p.y, static_cast<std::size_t>(p.dims.seq_len) * state_elems * sizeof(T),
                                             p.y_init, state_elems * sizeof(float));
  MOXE_RETURN_IF_ERROR(cluster ? detail::launch_cluster_recurrent(kernel_for(plan.units), args, plan, stream)
                                : detail::launch_recurrent(kernel_for(plan.units), args, plan, stream));
  return check_launch(stream);  // (MOXE_DEBUG_SYNC: a fault surfaces here, as in the other launchers)
}

template <class T, class Acc>
std::size_t sequence_backward_workspace_size(const BackwardParams<T, Acc>& p) {
  const Dims& d = p.fwd.dims;
  if (d.seq_len <= 0 || d.batch <= 0 || d.heads <= 0 || d.head_dim <= 0) return 0;  // launcher rejects
  WorkspaceCarver carver;
  detail::carve_backward<T>(carver, p.fwd.dims, /*replay=*/!has_tape(p.fwd));
  return carver.required_bytes();
}

/// dwx, dr, dbias and (optionally) dy_init, dc_init, dn_init, dm_init. Without a tape in fwd,
/// replays the forward into the workspace (raw gates, states, y); with it, reads the tape
/// and fwd.y. Walks time backward in one persistent kernel, then reduces dr and dbias
/// deterministically. The workspace is smaller with a tape (sequence_backward_workspace_size
/// sees it). With p.fwd.cluster_size (sm_90) the replay and the backward kernel run as
/// clusters, the same bits as the split path at units_per_block = head_dim / cluster_size.
template <class T, class Acc>
Status sequence_backward(const BackwardParams<T, Acc>& p, void* workspace, std::size_t workspace_bytes,
                         cudaStream_t stream) {
  MOXE_RETURN_IF_ERROR(validate(p));
  MOXE_RETURN_IF_ERROR(detail::check_device_params(p.fwd));
  const Dims& d = p.fwd.dims;
  const bool replay = !has_tape(p.fwd);
  WorkspaceCarver carver(workspace, workspace_bytes);
  const detail::BackwardScratch<T> s = detail::carve_backward<T>(carver, d, replay);
  if (!carver.fits()) return Status::workspace_too_small;

  // with fwd.cluster_size both recurrent kernels (the replay and the backward) run as clusters
  const int cs = p.fwd.cluster_size;
  const auto fwd_kernel_for =
      cs != 0 ? detail::forward_cluster_kernel_for<T, true> : detail::forward_kernel_for<T, true>;
  const auto bwd_kernel_for = cs != 0 ? detail::backward_cluster_kernel_for<T> : detail::backward_kernel_for<T>;
  auto plan = [&](auto kernel_for, bool backward, detail::LaunchPlan* out) {
    return cs != 0 ? detail::plan_cluster<T>(kernel_for, d, cs, p.fwd.units_per_block, p.fwd.max_groups_per_launch,
                                             backward, out)
                   : detail::plan_recurrent<T>(kernel_for, d, p.fwd.units_per_block, p.fwd.max_groups_per_launch,
                                               backward, out);
  };
  auto launch = [&](auto kernel, auto args, const detail::LaunchPlan& pl) {
    return cs != 0 ? detail::launch_cluster_recurrent(kernel, args, pl, stream)
                   : detail::launch_recurrent(kernel, args, pl, stream);
  };
  detail::LaunchPlan fwd_plan, bwd_plan;
  if (replay) MOXE_RETURN_IF_ERROR(plan(fwd_kernel_for, false, &fwd_plan));
  MOXE_RETURN_IF_ERROR(plan(bwd_kernel_for, true, &bwd_plan));

  // 1. the tape: the caller's (from a forward with these inputs), or a forward replay
  const float* tape_gates = p.fwd.tape_gates;
  const float *tape_c = p.fwd.tape_c, *tape_n = p.fwd.tape_n, *tape_m = p.fwd.tape_m;
  const T* y_tape = p.fwd.y;
  if (replay) {
    detail::ForwardArgs<T> fa = detail::forward_args(p.fwd);
    fa.splits = fwd_plan.splits;
    fa.init_barrier = false;  // y is the workspace's: it overlaps nothing
    fa.y = s.y_tape;
    fa.y_last = fa.c_last = fa.n_last = fa.m_last = nullptr;
    fa.tape_gates = s.dgates;  // the raw gates, replaced by the dgates step by step
    fa.tape_c = s.tape_c;
    fa.tape_n = s.tape_n;
    fa.tape_m = s.tape_m;
    MOXE_RETURN_IF_ERROR(launch(fwd_kernel_for(fwd_plan.units), fa, fwd_plan));
    tape_gates = s.dgates;
    tape_c = s.tape_c;
    tape_n = s.tape_n;
    tape_m = s.tape_m;
    y_tape = s.y_tape;
  }

  // 2. backward through time
  detail::BackwardArgs<T> ba{};
  ba.S = d.seq_len;
  ba.B = d.batch;
  ba.NH = d.heads;
  ba.DH = d.head_dim;
  ba.splits = bwd_plan.splits;
  ba.r = p.fwd.r;
  ba.dy = p.dy;
  ba.dy_last = p.dy_last;
  ba.dc_last = p.dc_last;
  ba.dn_last = p.dn_last;
  ba.dm_last = p.dm_last;
  ba.c_init = p.fwd.c_init;
  ba.n_init = p.fwd.n_init;
  ba.m_init = p.fwd.m_init;
  ba.tape_gates = tape_gates;
  ba.tape_c = tape_c;
  ba.tape_n = tape_n;
  ba.tape_m = tape_m;
  ba.dgates = s.dgates;
  ba.dwx = p.dwx;
  ba.dy_init = p.dy_init;
  ba.dc_init = p.dc_init;
  ba.dn_init = p.dn_init;
  ba.dm_init = p.dm_init;
  MOXE_RETURN_IF_ERROR(launch(bwd_kernel_for(bwd_plan.units), ba, bwd_plan));

  // 3. dr = sum_t dgates_t y_{t-1}^T (split-K partials, summed in chunk order), dbias (per
  // batch row in the backward's t order, then the rows in order)
  const detail::DrSplit split = detail::dr_split(d.seq_len, d.batch, d.heads, d.head_dim);
  const int64_t tiles = ((4 * d.head_dim + detail::kDrTile - 1) / detail::kDrTile) *
                        ((d.head_dim + detail::kDrTile - 1) / detail::kDrTile);
  MOXE_RETURN_IF_ERROR(launch_kernel(
      detail::dr_partial_kernel<T>,
      dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(d.heads), static_cast<unsigned>(split.chunks)), 256, 0,
      stream, s.dgates, y_tape, p.fwd.y_init, d.seq_len, d.batch, d.heads, d.head_dim, split.chunk_len,
      s.dr_partial));
  const int64_t dr_count = d.heads * 4 * d.head_dim * d.head_dim;
  MOXE_RETURN_IF_ERROR(launch_kernel(detail::sum_partials_kernel<T>, static_cast<unsigned>((dr_count + 255) / 256), 256,
                                     0, stream, s.dr_partial, split.chunks, dr_count, p.dr));
  const int64_t bias_count = 4 * d.heads * d.head_dim;
  MOXE_RETURN_IF_ERROR(launch_kernel(detail::dbias_rows_kernel<>,
                                     static_cast<unsigned>((d.batch * bias_count + 255) / 256), 256, 0, stream,
                                     static_cast<const float*>(s.dgates), d.seq_len, d.batch, bias_count,
                                     s.dbias_partial));
  MOXE_RETURN_IF_ERROR(launch_kernel(detail::sum_partials_kernel<T>, static_cast<unsigned>((bias_count + 255) / 256),
                                     256, 0, stream, s.dbias_partial, d.batch, bias_count, p.dbias));
  return check_launch(stream);
}

}  // namespace moxe::slstm
