// moxe::router: the fused entropy-aware gate on the device, forward and backward
// (docs/router.md). One pass over each token's logits: difficulty, modulation, conditioned
// softmax and lse, normalised entropy of the unbiased softmax, top-k with renormalised
// weights; per-expert loads, counts and the loss sums are per-block partials that the last
// blocks to finish add in block order (two levels of the last-block pattern; no float
// atomics: same bits every run). Forward: one kernel (and a memset of its tickets).
// Backward: one kernel given the forward's totals (GateForwardParams::totals), else the
// batch sums again first (two more launches).
//
//   size_t bytes = gate_forward_workspace_size(params);
//   Status s = gate_forward(params, workspace, bytes, stream);
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "moxe/core/launch.cuh"
#include "moxe/core/math.hpp"
#include "moxe/core/numeric.cuh"
#include "moxe/core/reduce.cuh"
#include "moxe/core/status.hpp"
#include "moxe/core/workspace.hpp"
#include "moxe/loss/detail/balance_math.hpp"
#include "moxe/loss/detail/two_stage.cuh"
#include "moxe/router/detail/gate_math.hpp"
#include "moxe/router/detail/lane_group.cuh"
#include "moxe/router/params.hpp"

namespace moxe::router {

namespace detail {

inline constexpr int kGateWarps = 8;
inline constexpr int kGateThreads = kGateWarps * kWarpSize;
inline constexpr int kGateScalars = 4;  // per-block sums: lse^2, (d - H)^2, mass_m, mass_s

inline int64_t gate_tokens_per_block(int experts) {
  return int64_t(kGateWarps) * (kWarpSize / gate_row_lanes(experts));
}

/// Blocks of the batch-statistics kernels (one row of partials each), a function of T and E
/// only, so the bits are the same on every device. The per-token work is a latency-bound
/// chain of group shuffles, so the grid must cover every block a device keeps resident:
/// on an H100 (132 SMs) the E <= 128 shapes (<= 64 registers) hold 4 blocks per SM (528)
/// and the larger ones (~128 registers) 2 (264); these caps give about two waves of each.
/// (A cap of 256, one block per SM pair, would leave 3/4 or 1/2 of the warps idle.)
inline int gate_max_blocks(int experts) { return experts <= 128 ? 1024 : 512; }

inline int gate_partial_blocks(const GateDims& d) {
  return loss::detail::partial_blocks(d.tokens, gate_tokens_per_block(d.experts), gate_max_blocks(d.experts));
}

/// Blocks per first-level group of the forward's finish: the last block of each group to
/// finish adds the group's rows of partials, and the last of those adds the group rows.
/// Two levels of at most 32 rows each (<= 1024 blocks), so neither finisher reads more than
/// 32 rows per column: a single last block reading all 1,024 rows would be bound by one
/// SM's L2 bandwidth (~0.5 MB at E = 64, ~5 us).
inline constexpr int kFinishGroup = 32;

inline int gate_finish_groups(int blocks) { return (blocks + kFinishGroup - 1) / kFinishGroup; }

struct GateForwardScratch {
  float* partials;          // [blocks, E + 4]: routed load sums, lse^2, (d - H)^2, mass_m, mass_s
  int32_t* count_partials;  // [blocks, E]
  float* group_partials;    // [groups, E + 4]: the first-level sums
  int32_t* group_counts;    // [groups, E]
  uint32_t* tickets;        // [groups + 1]: arrivals per group, then of the group finishers
  int blocks, groups;
};

inline GateForwardScratch carve_gate_forward(WorkspaceCarver& c, const GateDims& d) {
  GateForwardScratch s{};
  if (validate_dims(d) != Status::ok) return s;
  s.blocks = gate_partial_blocks(d);
  s.groups = gate_finish_groups(s.blocks);
  const std::size_t width = static_cast<std::size_t>(d.experts) + kGateScalars;
  s.partials = c.carve<float>(s.blocks * width);
  s.count_partials = c.carve<int32_t>(static_cast<std::size_t>(s.blocks) * d.experts);
  s.group_partials = c.carve<float>(s.groups * width);
  s.group_counts = c.carve<int32_t>(static_cast<std::size_t>(s.groups) * d.experts);
  s.tickets = c.carve<uint32_t>(static_cast<std::size_t>(s.groups) + 1);
  return s;
}

struct GateBackwardScratch {
  float* partials;  // [blocks, E + 2]: routed load sums, mass_m, mass_s
  float* totals;    // [E + 2]
  int blocks;
};

/// `recompute`: no totals from the forward (GateForwardParams::totals null); with them the
/// backward needs no workspace.
inline GateBackwardScratch carve_gate_backward(WorkspaceCarver& c, const GateDims& d, bool recompute) {
  GateBackwardScratch s{};
  if (!recompute || validate_dims(d) != Status::ok) return s;
  s.blocks = gate_partial_blocks(d);
  const std::size_t width = static_cast<std::size_t>(d.experts) + 2;
  s.partials = c.carve<float>(s.blocks * width);
  s.totals = c.carve<float>(width);
  return s;
}

/// Per-token state every gate kernel recomputes from the logits.
struct DeviceToken {
  float d, s;
  TokenSoftmax<float> sm;
  GroupScales<float> scale;
};

/// One token's raw inputs, fetched ahead of their use so that the next token's loads are
/// in flight while the current one computes.
template <class T, int kPerLane>
struct TokenInputs {
  T z[kPerLane];
  T a;
};

/// Whether the gate kernels prefetch the next token (not for the largest rows, where the
/// extra registers would cost more occupancy than the prefetch wins).
template <int kPerLane>
inline constexpr bool kGatePrefetch = kPerLane <= 16;

template <class T, int kLanes, int kPerLane>
MOXE_DEVICE MOXE_FORCEINLINE void fetch_token(const LaneGroup<kLanes>& g, const GateForwardParams<T, float>& p,
                                              int64_t t, bool valid, int64_t row_stride, int64_t diff_step,
                                              TokenInputs<T, kPerLane>& in) {
  const int E = p.dims.experts;
  const T* row = p.logits + (valid ? t : 0) * row_stride;
  MOXE_PRAGMA_UNROLL
  for (int j = 0; j < kPerLane; ++j) {
    const int e = g.element(j);
    in.z[j] = (valid && e < E) ? row[e] : from_float<T>(0.f);
  }
  in.a = (p.difficulty_logit != nullptr && valid) ? p.difficulty_logit[t * diff_step] : from_float<T>(0.f);
}

/// Makes a token's softmax state in two passes over its registers (the max, then one
/// exponential per expert). On return v[j] = z - max and ex[j] = exp(v[j]) for the token's
/// experts (-inf and 0 elsewhere, and for a missing token), so q = ex * inv_sum and
/// log q = v - log_sum.
template <class T, int kLanes, int kPerLane>
MOXE_DEVICE MOXE_FORCEINLINE DeviceToken process_token(const LaneGroup<kLanes>& g, const GateForwardParams<T, float>& p,
                                                       bool valid, const TokenInputs<T, kPerLane>& in,
                                                       float (&v)[kPerLane], float (&ex)[kPerLane]) {
  const int E = p.dims.experts, Em = p.dims.mlstm_experts;
  float max = -math::infinity<float>();
  MOXE_PRAGMA_UNROLL
  for (int j = 0; j < kPerLane; ++j) {
    const int e = g.element(j);
    v[j] = (valid && e < E) ? to_float(in.z[j]) : -math::infinity<float>();
    max = math::max(max, v[j]);
  }
  DeviceToken tok{0.f, 0.f, {}, {}};
  if (p.difficulty_logit != nullptr && valid) {
    tok.d = math::sigmoid(to_float(in.a));
    tok.s = modulation_shift(p.modulation, p.gamma, p.tau, tok.d);
  }
  max = g.allreduce(max, MaxOp{});
  float sum_m = 0.f, sum_s = 0.f;
  MOXE_PRAGMA_UNROLL
  for (int j = 0; j < kPerLane; ++j) {
    const int e = g.element(j);
    const bool live = valid && e < E;
    v[j] = live ? v[j] - max : -math::infinity<float>();
    ex[j] = live ? math::exp(v[j]) : 0.f;
    if (e < Em) sum_m += ex[j]; else sum_s += ex[j];
  }
  sum_m = g.sum(sum_m);
  sum_s = g.sum(sum_s);
  tok.sm = token_softmax(max, sum_m, sum_s, tok.s);
  tok.scale = group_scales(tok.sm, tok.s);
  return tok;
}

/// A token loop over this warp's tokens: body(t, valid, inputs) for base = first, first +
/// step, ..., with the next token's inputs fetched before the body runs (kGatePrefetch).
/// Every lane of the warp runs every iteration (the loop bound is uniform over the warp).
template <class T, int kLanes, int kPerLane, class Body>
MOXE_DEVICE MOXE_FORCEINLINE void for_each_token(const LaneGroup<kLanes>& g, const GateForwardParams<T, float>& p,
                                                 int64_t first, int64_t step, int64_t row_stride, int64_t diff_step,
                                                 Body&& body) {
  const int64_t T_ = p.dims.tokens;
  if constexpr (kGatePrefetch<kPerLane>) {
    TokenInputs<T, kPerLane> cur;
    if (first < T_) fetch_token<T, kLanes, kPerLane>(g, p, first + g.group, first + g.group < T_, row_stride, diff_step, cur);
    for (int64_t base = first; base < T_; base += step) {
      TokenInputs<T, kPerLane> next;
      const int64_t nt = base + step + g.group;
      fetch_token<T, kLanes, kPerLane>(g, p, nt, nt < T_, row_stride, diff_step, next);
      body(base + g.group, base + g.group < T_, cur);
      cur = next;
    }
  } else {
    for (int64_t base = first; base < T_; base += step) {
      TokenInputs<T, kPerLane> cur;
      const int64_t t = base + g.group;
      fetch_token<T, kLanes, kPerLane>(g, p, t, t < T_, row_stride, diff_step, cur);
      body(t, t < T_, cur);
    }
  }
}

/// Normalised entropy of q = softmax(z) over the group.
template <int kLanes, int kPerLane>
MOXE_DEVICE MOXE_FORCEINLINE float token_entropy(const LaneGroup<kLanes>& g, const float (&v)[kPerLane],
                                                 const float (&ex)[kPerLane], const TokenSoftmax<float>& sm,
                                                 int experts, bool valid) {
  float h = 0.f;
  MOXE_PRAGMA_UNROLL
  for (int j = 0; j < kPerLane; ++j)
    if (valid && g.element(j) < experts) h += entropy_term_log(ex[j] * sm.inv_sum, v[j] - sm.log_sum);
  return g.sum(h) * inv_log_experts<float>(experts);
}

/// The last-block pattern: every block's writes, then its arrival on `ticket`; true in the
/// block that arrives last of `expected` (block-uniform, through the shared `last`), which
/// also resets the ticket to 0 (every arrival of this call has been counted). All threads
/// of the block call it. The writes of the other blocks are then visible to the last one
/// through L2 (sum_rows reads with ld.cg).
MOXE_DEVICE MOXE_FORCEINLINE bool arrive_last(uint32_t* ticket, int expected, bool& last) {
  __threadfence();  // this block's rows before its ticket
  __syncthreads();
  if (threadIdx.x == 0) {
    last = atomicAdd(ticket, 1u) == static_cast<uint32_t>(expected - 1);
    if (last) atomicExch(ticket, 0u);
  }
  __syncthreads();
  if (last) __threadfence();
  return last;
}

/// out[c] = sum of rows [first, first + n) of a [*, width] matrix at column c, in row order
/// (one column per thread, the block's threads over the columns).
template <class V>
MOXE_DEVICE MOXE_FORCEINLINE void sum_rows(const V* rows, int first, int n, int width, V* out) {
  for (int c = threadIdx.x; c < width; c += kGateThreads) {
    const V* col = rows + int64_t(first) * width + c;
    V acc = V(0);
#pragma unroll 8
    for (int r = 0; r < n; ++r) acc += __ldcg(col + int64_t(r) * width);
    out[c] = acc;
  }
}

template <class T, int kLanes, int kPerLane>
__global__ void __launch_bounds__(kGateThreads)
    gate_forward_kernel(const __grid_constant__ GateForwardParams<T, float> p, int64_t row_stride, int64_t diff_step,
                        const GateForwardScratch ws) {
  using Group = LaneGroup<kLanes>;
  constexpr int kGroups = Group::kGroups;
  constexpr int kMaxE = kLanes * kPerLane;
  __shared__ float load_smem[kGateWarps][kMaxE];
  __shared__ int32_t count_smem[kMaxE];
  __shared__ float slot_value[kGateWarps][kGroups][kMaxTopK];
  __shared__ int slot_index[kGateWarps][kGroups][kMaxTopK];
  __shared__ float scalar_smem[kGateWarps][kGateScalars];

  const Group g;
  const int warp = threadIdx.x / kWarpSize;
  const int E = p.dims.experts, Em = p.dims.mlstm_experts, K = p.dims.top_k;
  const int64_t T_ = p.dims.tokens;
  for (int i = threadIdx.x; i < kGateWarps * kMaxE; i += kGateThreads) (&load_smem[0][0])[i] = 0.f;
  for (int i = threadIdx.x; i < kMaxE; i += kGateThreads) count_smem[i] = 0;
  __syncthreads();

  const bool head = p.difficulty_logit != nullptr;
  const uint32_t padding = padding_bits<kLanes, kPerLane>(g, E);
  const TopKSlots slots{slot_value[warp][g.group], slot_index[warp][g.group]};
  float acc[kGateScalars] = {0.f, 0.f, 0.f, 0.f};
  const int64_t step = int64_t(gridDim.x) * kGateWarps * kGroups;
  const int64_t first = (int64_t(blockIdx.x) * kGateWarps + warp) * kGroups;
  for_each_token<T, kLanes, kPerLane>(g, p, first, step, row_stride, diff_step, [&](int64_t t, bool valid,
                                                                                    const TokenInputs<T, kPerLane>& in) {
    float v[kPerLane], ex[kPerLane];
    const DeviceToken tok = process_token<T, kLanes, kPerLane>(g, p, valid, in, v, ex);
    // one exponential per expert (in process_token): q for the entropy, p = q * its group's scale
    float h = 0.f;
    MOXE_PRAGMA_UNROLL
    for (int j = 0; j < kPerLane; ++j) {
      const int e = g.element(j);
      const bool live = valid && e < E;
      // the largest rows recompute the exponential rather than hold a second register array
      const float q = (kGatePrefetch<kPerLane> ? ex[j] : math::exp(v[j])) * tok.sm.inv_sum;
      if (live) h += entropy_term_log(q, v[j] - tok.sm.log_sum);
      v[j] = live ? q * (e < Em ? tok.scale.mlstm : tok.scale.slstm) : 0.f;
      if (p.probs != nullptr && live) p.probs[t * E + e] = v[j];
    }
    h = g.sum(h) * inv_log_experts<float>(E);
    group_topk<kLanes, kPerLane>(g, v, padding, K, slots);
    if (valid) {
      float total = 0.f;
      for (int r = 0; r < K; ++r) total += slots.value[r];
      for (int r = g.lane; r < K; r += kLanes) {
        p.topk_idx[t * K + r] = slots.index[r];
        p.topk_prob[t * K + r] = slots.value[r];
        p.topk_weight[t * K + r] = slots.value[r] / total;
      }
      if (g.lane == 0) {
        if (p.lse != nullptr) p.lse[t] = tok.sm.lse;
        if (p.entropy != nullptr) p.entropy[t] = h;
        if (p.difficulty != nullptr) p.difficulty[t] = tok.d;
        acc[0] += loss::detail::z_loss_term(tok.sm.lse);
        if (head) acc[1] += loss::detail::difficulty_loss_term(tok.d, h);
        acc[2] += tok.sm.mass_m;
        acc[3] += tok.sm.mass_s;
      }
    }
    // one group at a time, so no two lanes ever add to the same expert together
    for (int gg = 0; gg < kGroups; ++gg) {
      if (gg == g.group && valid)
        for (int r = g.lane; r < K; r += kLanes) {
          const int e = slots.index[r];
          load_smem[warp][e] += slots.value[r];
          atomicAdd(&count_smem[e], 1);  // integer: exact in any order
        }
      __syncwarp();
    }
  });
  MOXE_PRAGMA_UNROLL
  for (int i = 0; i < kGateScalars; ++i) {
    const float s = warp_sum(acc[i]);
    if (threadIdx.x % kWarpSize == 0) scalar_smem[warp][i] = s;
  }
  __syncthreads();
  const int width = E + kGateScalars;
  float* out = ws.partials + int64_t(blockIdx.x) * width;
  for (int e = threadIdx.x; e < width; e += kGateThreads) {
    float sum = 0.f;
    for (int w = 0; w < kGateWarps; ++w) sum += e < E ? load_smem[w][e] : scalar_smem[w][e - E];
    out[e] = sum;
  }
  for (int e = threadIdx.x; e < E; e += kGateThreads) ws.count_partials[int64_t(blockIdx.x) * E + e] = count_smem[e];

  // the finish: the last block of each group of kFinishGroup adds its group's rows, the last
  // of those adds the group rows and forms the losses (rows in index order at both levels:
  // the bits do not depend on which block finishes last)
  __shared__ bool last;
  __shared__ typename BlockAllReduce<float, kGateThreads>::TempStorage reduce_storage;
  const int group = blockIdx.x / kFinishGroup;
  const int first_row = group * kFinishGroup;
  const int rows = min(kFinishGroup, int(gridDim.x) - first_row);
  if (!arrive_last(ws.tickets + group, rows, last)) return;
  sum_rows(ws.partials, first_row, rows, width, ws.group_partials + int64_t(group) * width);
  sum_rows(ws.count_partials, first_row, rows, E, ws.group_counts + int64_t(group) * E);
  if (!arrive_last(ws.tickets + ws.groups, ws.groups, last)) return;
  float* totals = &load_smem[0][0];  // E + 4 <= kGateWarps * kMaxE floats, free by now
  sum_rows(ws.group_partials, 0, ws.groups, width, totals);
  sum_rows(ws.group_counts, 0, ws.groups, E, p.expert_counts);
  __syncthreads();
  const float routed_slots = static_cast<float>(T_) * static_cast<float>(K);
  float lb = 0.f;
  for (int e = threadIdx.x; e < E; e += kGateThreads)
    lb += loss::detail::load_balance_term(totals[e] / routed_slots, static_cast<float>(E));
  lb = BlockAllReduce<float, kGateThreads>(reduce_storage).sum(lb);
  if (threadIdx.x == 0) {
    const float inv_t = 1.f / static_cast<float>(T_);
    p.losses[0] = totals[E] * inv_t;
    p.losses[1] = lb;
    p.losses[2] = totals[E + 1] * inv_t;
    p.losses[3] = loss::detail::group_loss_term(totals[E + 2] * inv_t, 2.f) +
                  loss::detail::group_loss_term(totals[E + 3] * inv_t, 2.f);
  }
  if (p.totals != nullptr)
    for (int e = threadIdx.x; e < width; e += kGateThreads) p.totals[e] = totals[e];
}

/// Backward stage one: per-block sums of the saved top-k probabilities per expert and,
/// when L_g has a gradient, of the group masses.
template <class T, int kLanes, int kPerLane>
__global__ void __launch_bounds__(kGateThreads)
    gate_batch_kernel(const __grid_constant__ GateForwardParams<T, float> p, int64_t row_stride, int64_t diff_step,
                      bool need_mass, float* __restrict__ partials) {
  using Group = LaneGroup<kLanes>;
  constexpr int kGroups = Group::kGroups;
  constexpr int kMaxE = kLanes * kPerLane;
  __shared__ float load_smem[kGateWarps][kMaxE];
  __shared__ float mass_smem[kGateWarps][2];
  const Group g;
  const int warp = threadIdx.x / kWarpSize;
  const int E = p.dims.experts, K = p.dims.top_k;
  const int64_t T_ = p.dims.tokens;
  for (int i = threadIdx.x; i < kGateWarps * kMaxE; i += kGateThreads) (&load_smem[0][0])[i] = 0.f;
  __syncthreads();
  float mass[2] = {0.f, 0.f};
  const int64_t step = int64_t(gridDim.x) * kGateWarps * kGroups;
  for (int64_t base = (int64_t(blockIdx.x) * kGateWarps + warp) * kGroups; base < T_; base += step) {
    const int64_t t = base + g.group;
    const bool valid = t < T_;
    if (need_mass) {  // uniform over the grid
      TokenInputs<T, kPerLane> in;
      fetch_token<T, kLanes, kPerLane>(g, p, t, valid, row_stride, diff_step, in);
      float v[kPerLane], ex[kPerLane];
      const DeviceToken tok = process_token<T, kLanes, kPerLane>(g, p, valid, in, v, ex);
      if (valid && g.lane == 0) {
        mass[0] += tok.sm.mass_m;
        mass[1] += tok.sm.mass_s;
      }
    }
    for (int gg = 0; gg < kGroups; ++gg) {
      if (gg == g.group && valid)
        for (int r = g.lane; r < K; r += kLanes) {
          const int e = p.topk_idx[t * K + r];
          if (e >= 0 && e < E) load_smem[warp][e] += p.topk_prob[t * K + r];
        }
      __syncwarp();
    }
  }
  MOXE_PRAGMA_UNROLL
  for (int i = 0; i < 2; ++i) {
    const float s = warp_sum(mass[i]);
    if (threadIdx.x % kWarpSize == 0) mass_smem[warp][i] = s;
  }
  __syncthreads();
  const int width = E + 2;
  float* out = partials + int64_t(blockIdx.x) * width;
  for (int e = threadIdx.x; e < width; e += kGateThreads) {
    float s = 0.f;
    for (int w = 0; w < kGateWarps; ++w) s += e < E ? load_smem[w][e] : mass_smem[w][e - E];
    out[e] = s;
  }
}

template <class T, int kLanes, int kPerLane>
__global__ void __launch_bounds__(kGateThreads)
    gate_backward_kernel(const __grid_constant__ GateBackwardParams<T, float> b, int64_t row_stride, int64_t diff_step,
                         const float* __restrict__ loads, const float* __restrict__ masses) {
  using Group = LaneGroup<kLanes>;
  constexpr int kGroups = Group::kGroups;
  constexpr int kMaxE = kLanes * kPerLane;
  __shared__ float routed_smem[kGateWarps][kGroups][kMaxE];  // per-expert routed gradient, zero elsewhere
  const Group g;
  const int warp = threadIdx.x / kWarpSize;
  const auto& p = b.fwd;
  const int E = p.dims.experts, Em = p.dims.mlstm_experts, K = p.dims.top_k;
  const int64_t T_ = p.dims.tokens;
  for (int i = threadIdx.x; i < kGateWarps * kGroups * kMaxE; i += kGateThreads) (&routed_smem[0][0][0])[i] = 0.f;
  __syncthreads();
  float* routed = routed_smem[warp][g.group];

  const bool head = p.difficulty_logit != nullptr;
  const float slots = static_cast<float>(T_) * static_cast<float>(K);
  const float inv_t = 1.f / static_cast<float>(T_);
  const float fe = static_cast<float>(E), ft = static_cast<float>(T_);
  const LossCoefficients<float> co = loss_coefficients(b);
  const auto sc = gate_backward_scalars(co.c_z, co.c_g, co.c_d, masses[0] * inv_t, masses[1] * inv_t, T_);
  const float inv_log = inv_log_experts<float>(E);
  const int64_t step = int64_t(gridDim.x) * kGateWarps * kGroups;
  const int64_t first = (int64_t(blockIdx.x) * kGateWarps + warp) * kGroups;
  for_each_token<T, kLanes, kPerLane>(g, p, first, step, row_stride, diff_step, [&](int64_t t, bool valid,
                                                                                    const TokenInputs<T, kPerLane>& in) {
    float v[kPerLane], ex[kPerLane];
    const DeviceToken tok = process_token<T, kLanes, kPerLane>(g, p, valid, in, v, ex);
    const float h = head ? token_entropy<kLanes, kPerLane>(g, v, ex, tok.sm, E, valid) : 0.f;
    float p_dot_gp = tok.sm.mass_m * sc.g_m + tok.sm.mass_s * sc.g_s, routed_signed = 0.f;
    if (valid) {
      const float* prob_k = p.topk_prob + t * K;
      const int32_t* idx_k = p.topk_idx + t * K;
      const float* dw_k = b.dweight != nullptr ? b.dweight + t * K : nullptr;
      float total = 0.f, w_dot = 0.f;
      for (int k = 0; k < K; ++k) total += prob_k[k];
      const float inv_total = 1.f / total;
      if (dw_k != nullptr)
        for (int k = 0; k < K; ++k) w_dot += prob_k[k] * inv_total * dw_k[k];
      for (int k = 0; k < K; ++k) {
        const int e = idx_k[k];
        if (e < 0 || e >= E) continue;
        const float r = renorm_grad(dw_k != nullptr ? dw_k[k] : 0.f, w_dot, inv_total) +
                        co.c_lb * loss::detail::load_balance_grad(loads[e] / slots, fe, slots);
        p_dot_gp += prob_k[k] * r;
        routed_signed += (e < Em ? prob_k[k] : -prob_k[k]) * r;
        if (k % kLanes == g.lane) routed[e] = r;
      }
    }
    __syncwarp();
    const float g_lse = sc.g_z * tok.sm.lse;
    const float g_h = head ? -sc.g_d * loss::detail::difficulty_loss_grad(tok.d, h, ft) * inv_log : 0.f;
    float q_dot_hq = 0.f;
    // v: log q from here on, ex: q
    MOXE_PRAGMA_UNROLL
    for (int j = 0; j < kPerLane; ++j) {
      v[j] -= tok.sm.log_sum;
      ex[j] *= tok.sm.inv_sum;
    }
    if (head) {
      MOXE_PRAGMA_UNROLL
      for (int j = 0; j < kPerLane; ++j)
        if (valid && g.element(j) < E) q_dot_hq += ex[j] * g_h * entropy_term_grad_log(ex[j], v[j]);
      q_dot_hq = g.sum(q_dot_hq);
    }
    if (valid) {
      T* out = b.dlogits + t * E;
      MOXE_PRAGMA_UNROLL
      for (int j = 0; j < kPerLane; ++j) {
        const int e = g.element(j);
        if (e >= E) continue;
        const bool in_m = e < Em;
        const float q = ex[j];
        const float pe = q * (in_m ? tok.scale.mlstm : tok.scale.slstm);
        float grad = softmax_grad(pe, (in_m ? sc.g_m : sc.g_s) + routed[e], p_dot_gp, g_lse);
        if (head) grad += q * (g_h * entropy_term_grad_log(q, v[j]) - q_dot_hq);
        out[e] = from_float<T>(grad);
      }
    }
    __syncwarp();
    if (valid)
      for (int k = g.lane; k < K; k += kLanes) {
        const int e = p.topk_idx[t * K + k];
        if (e >= 0 && e < E) routed[e] = 0.f;
      }
    __syncwarp();
    if (valid && head && g.lane == 0) {
      const float ds = shift_grad(tok.sm.mass_m, tok.sm.mass_s, sc.g_m, sc.g_s, p_dot_gp, g_lse, routed_signed);
      const float dd = sc.g_d * loss::detail::difficulty_loss_grad(tok.d, h, ft) +
                       ds * modulation_shift_grad(p.modulation, p.gamma, p.tau, tok.d);
      b.ddifficulty_logit[t] = from_float<T>(dd * math::sigmoid_grad(to_float(in.a)));  // from a: exact for large a
    }
  });
}

/// Grid of the per-token kernels that need no batch partials.
inline int token_grid(int64_t tokens, int64_t per_block) {
  const int64_t b = (tokens + per_block - 1) / per_block;
  constexpr int64_t kMaxGrid = int64_t(1) << 16;  // the loop covers the rest
  return static_cast<int>(b < kMaxGrid ? b : kMaxGrid);
}

template <class T>
Status check_gate_device_limits(const GateForwardParams<T, float>& p) {
  if (p.dims.experts > kMaxExperts || p.dims.top_k > kMaxTopK) return Status::unsupported;
  return Status::ok;
}

}  // namespace detail

template <class T>
std::size_t gate_forward_workspace_size(const GateForwardParams<T, float>& p) {
  WorkspaceCarver c;
  detail::carve_gate_forward(c, p.dims);
  return c.required_bytes();
}

/// The fused gate forward; see GateForwardParams for what it writes.
template <class T>
Status gate_forward(const GateForwardParams<T, float>& p, void* workspace, std::size_t workspace_bytes,
                    cudaStream_t stream) {
  static_assert(is_device_element_v<T>, "logits must be float, __half or __nv_bfloat16");
  MOXE_RETURN_IF_ERROR(validate(p));
  MOXE_RETURN_IF_ERROR(detail::check_gate_device_limits(p));
  WorkspaceCarver c(workspace, workspace_bytes);
  const detail::GateForwardScratch s = detail::carve_gate_forward(c, p.dims);
  if (!c.fits()) return Status::workspace_too_small;
  const int64_t row_stride = logits_row_stride(p.dims, p.logits_stride);
  const int64_t diff_step = difficulty_step(p.difficulty_stride);
  // the tickets start at 0 in every call (a caller's workspace need not be zeroed; the kernel
  // leaves them 0 as well): a memset node, no kernel
  MOXE_CUDA_TRY(cudaMemsetAsync(s.tickets, 0, sizeof(uint32_t) * (static_cast<std::size_t>(s.groups) + 1), stream));
  return detail::dispatch_gate_row_shape(p.dims.experts, [&](auto shape) {
    using Shape = decltype(shape);
    MOXE_RETURN_IF_ERROR(launch_kernel(detail::gate_forward_kernel<T, Shape::kLanes, Shape::kPerLane>, s.blocks,
                                       detail::kGateThreads, 0, stream, p, row_stride, diff_step, s));
    return check_launch(stream);
  });
}

template <class T>
std::size_t gate_backward_workspace_size(const GateBackwardParams<T, float>& b) {
  WorkspaceCarver c;
  detail::carve_gate_backward(c, b.fwd.dims, b.fwd.totals == nullptr);
  return c.required_bytes();
}

/// The exact gradient of sum(w * dw) + c_z L_z + c_lb L_lb + c_d L_d + c_g L_g with respect to
/// the logits (dlogits, contiguous [T, E]) and the difficulty pre-activation.
template <class T>
Status gate_backward(const GateBackwardParams<T, float>& b, void* workspace, std::size_t workspace_bytes,
                     cudaStream_t stream) {
  static_assert(is_device_element_v<T>, "logits must be float, __half or __nv_bfloat16");
  MOXE_RETURN_IF_ERROR(validate(b));
  MOXE_RETURN_IF_ERROR(detail::check_gate_device_limits(b.fwd));
  WorkspaceCarver c(workspace, workspace_bytes);
  const detail::GateBackwardScratch s = detail::carve_gate_backward(c, b.fwd.dims, b.fwd.totals == nullptr);
  if (!c.fits()) return Status::workspace_too_small;
  const int64_t row_stride = logits_row_stride(b.fwd.dims, b.fwd.logits_stride);
  const int64_t diff_step = difficulty_step(b.fwd.difficulty_stride);
  const int E = b.fwd.dims.experts;
  const float* totals = b.fwd.totals;  // the forward's: [loads (E), lse^2, (d - H)^2, mass_m, mass_s]
  return detail::dispatch_gate_row_shape(E, [&](auto shape) {
    using Shape = decltype(shape);
    const float* loads = totals;
    const float* masses = totals != nullptr ? totals + E + 2 : nullptr;
    if (totals == nullptr) {  // no totals from the forward: the batch sums again, from the saved top-k and the logits
      MOXE_RETURN_IF_ERROR(launch_kernel(detail::gate_batch_kernel<T, Shape::kLanes, Shape::kPerLane>, s.blocks,
                                         detail::kGateThreads, 0, stream, b.fwd, row_stride, diff_step,
                                         /*need_mass=*/b.loss_grad != nullptr || b.c_g != 0.f, s.partials));
      MOXE_RETURN_IF_ERROR(loss::detail::launch_column_sum<float>(s.partials, s.blocks, E + 2, s.totals, stream));
      loads = s.totals;
      masses = s.totals + E;
    }
    const int grid = detail::token_grid(b.fwd.dims.tokens, detail::gate_tokens_per_block(E));
    MOXE_RETURN_IF_ERROR(launch_kernel(detail::gate_backward_kernel<T, Shape::kLanes, Shape::kPerLane>, grid,
                                       detail::kGateThreads, 0, stream, b, row_stride, diff_step, loads, masses));
    return check_launch(stream);
  });
}

}  // namespace moxe::router
