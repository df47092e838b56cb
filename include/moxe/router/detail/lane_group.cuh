// moxe::router: a token handled by a group of kLanes lanes of one warp (kLanes in {4, 8,
// 16, 32}); each lane holds kPerLane of the token's E values, element e = j * kLanes + lane
// (so a load instruction of the group is contiguous). Group reductions, and the group
// top-k: k rounds of argmax for small k, a radix threshold search (O(E) per token,
// independent of k) for large k. Results land sorted (value desc, index asc) in per-group
// shared-memory slots; slots past the untaken elements, when fewer than k, get (-inf, -1).
//
// The warp primitives come from a policy (`Warp`, CudaWarp by default: the CUDA
// intrinsics), and everything else here is plain C++ apart from the MOXE_DEVICE marks, so a
// host compiler builds the same code over an emulated warp (tests/router/test_lane_group.cpp).
#pragma once

#include "moxe/core/config.hpp"  // MOXE_CUDA_COMPILER, before it is tested

#if MOXE_CUDA_COMPILER
#include <cuda_runtime.h>

#include "moxe/core/reduce.cuh"  // the warp and block reductions of the kernels built on this
#endif

#include <cstdint>
#include <cstring>

#include "moxe/core/config.hpp"
#include "moxe/core/math.hpp"
#include "moxe/core/status.hpp"
#include "moxe/core/warp.hpp"
#include "moxe/router/detail/gate_math.hpp"

namespace moxe::router::detail {

/// top-k up to this k uses argmax rounds; above it, the threshold search.
inline constexpr int kRoundsTopKMax = 8;

/// The warp primitives of the lane-group code: full-warp shuffle, ballot and sync, and the
/// calling thread's index in its block (its lane in the warp is that mod kWarpSize).
/// CudaWarp is the device's; a host test supplies an emulated warp with the same static
/// members.
struct CudaWarp;

#if MOXE_CUDA_COMPILER
struct CudaWarp {
  MOXE_DEVICE static MOXE_FORCEINLINE unsigned thread_in_block() { return threadIdx.x; }
  template <class A>
  MOXE_DEVICE static MOXE_FORCEINLINE A shfl_xor(A x, int offset) { return __shfl_xor_sync(kFullMask, x, offset); }
  MOXE_DEVICE static MOXE_FORCEINLINE unsigned ballot(bool p) { return __ballot_sync(kFullMask, p); }
  MOXE_DEVICE static MOXE_FORCEINLINE void sync() { __syncwarp(); }
};
#endif

/// Bit casts and population count: the intrinsics on the device, their C++ forms on the host.
MOXE_HD MOXE_FORCEINLINE uint32_t float_bits(float x) {
#if MOXE_DEVICE_PASS
  return __float_as_uint(x);
#else
  uint32_t b;
  std::memcpy(&b, &x, sizeof b);
  return b;
#endif
}

MOXE_HD MOXE_FORCEINLINE float bits_float(uint32_t b) {
#if MOXE_DEVICE_PASS
  return __uint_as_float(b);
#else
  float x;
  std::memcpy(&x, &b, sizeof x);
  return x;
#endif
}

MOXE_HD MOXE_FORCEINLINE int popc(unsigned x) {
#if MOXE_DEVICE_PASS
  return __popc(x);
#else
  return __builtin_popcount(x);
#endif
}

/// Order-preserving map float -> uint32 (NaN as -inf, -0 as +0); 0 is below every number.
MOXE_HD MOXE_FORCEINLINE uint32_t float_key(float x) {
  if (x != x) x = -math::infinity<float>();
  uint32_t b = float_bits(x);
  if (b == 0x80000000u) b = 0u;
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

MOXE_HD MOXE_FORCEINLINE float key_float(uint32_t k) {
  return bits_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

template <int kLanes_, class Warp = CudaWarp>
struct LaneGroup {
  static constexpr int kLanes = kLanes_;
  static constexpr int kGroups = kWarpSize / kLanes;
  static_assert(kLanes >= 1 && kLanes <= kWarpSize && kWarpSize % kLanes == 0, "lanes must divide a warp");

  int lane;    // lane within the group
  int group;   // group within the warp
  unsigned group_bits;  // this group's lanes in a warp-wide ballot

  MOXE_DEVICE LaneGroup() {
    const int w = Warp::thread_in_block() % kWarpSize;
    lane = w % kLanes;
    group = w / kLanes;
    group_bits = (kLanes == kWarpSize ? kFullMask : ((1u << kLanes) - 1u)) << (group * kLanes);
  }

  template <class A, class Op>
  MOXE_DEVICE MOXE_FORCEINLINE A allreduce(A x, Op op) const {
    MOXE_PRAGMA_UNROLL
    for (int o = kLanes / 2; o > 0; o /= 2) x = op(x, Warp::shfl_xor(x, o));
    return x;
  }
  template <class A>
  MOXE_DEVICE MOXE_FORCEINLINE A sum(A x) const { return allreduce(x, SumOp{}); }

  MOXE_DEVICE MOXE_FORCEINLINE SplitMaxSum<float> merge(SplitMaxSum<float> s) const {
    MOXE_PRAGMA_UNROLL
    for (int o = kLanes / 2; o > 0; o /= 2) {
      SplitMaxSum<float> other;
      other.max = Warp::shfl_xor(s.max, o);
      other.sum_m = Warp::shfl_xor(s.sum_m, o);
      other.sum_s = Warp::shfl_xor(s.sum_s, o);
      s = SplitMaxSum<float>::merge(s, other);
    }
    return s;
  }

  MOXE_DEVICE MOXE_FORCEINLINE math::MaxSum<float> merge(math::MaxSum<float> s) const {
    MOXE_PRAGMA_UNROLL
    for (int o = kLanes / 2; o > 0; o /= 2) {
      math::MaxSum<float> other;
      other.max = Warp::shfl_xor(s.max, o);
      other.sum = Warp::shfl_xor(s.sum, o);
      s = math::MaxSum<float>::merge(s, other);
    }
    return s;
  }

  /// Number of this group's lanes below me whose bit is set in a warp ballot.
  MOXE_DEVICE MOXE_FORCEINLINE int rank_below(unsigned ballot) const {
    const unsigned below = (1u << (Warp::thread_in_block() % kWarpSize)) - 1u;
    return popc(ballot & group_bits & below);
  }
  MOXE_DEVICE MOXE_FORCEINLINE int count(unsigned ballot) const { return popc(ballot & group_bits); }

  MOXE_DEVICE MOXE_FORCEINLINE int element(int j) const { return j * kLanes + lane; }
};

/// Top-k slots of one group in shared memory. A top-k writes slots [0, k): the winners,
/// value descending and index ascending on ties, each value as it ranks (rank_value: NaN as
/// -inf; the threshold path, which works on float_key, gives -0 as +0); when fewer than k
/// elements are untaken, the slots past them get (-inf, -1), an index every consumer skips.
struct TopKSlots {
  float* value;
  int* index;
};

/// k rounds of group argmax over the values not yet taken (taken bit j: element j excluded).
template <int kLanes, int kPerLane, class Warp>
MOXE_DEVICE void topk_rounds(const LaneGroup<kLanes, Warp>& g, const float (&v)[kPerLane], uint32_t taken, int k,
                             TopKSlots slots) {
  // NaN ranks as -inf and every untaken element ranks before the sentinel (-inf, kNone),
  // so each round's winner is a real element while one is left (a NaN that never won would
  // leave kNone)
  constexpr int kNone = 0x7fffffff;
  auto local_best = [&](float& bv, int& be) {
    bv = -math::infinity<float>();
    be = kNone;
    MOXE_PRAGMA_UNROLL
    for (int j = 0; j < kPerLane; ++j) {
      const int e = g.element(j);
      const float x = rank_value(v[j]);
      if (!((taken >> j) & 1u) && ranks_before(x, e, bv, be)) {
        bv = x;
        be = e;
      }
    }
  };
  float bv;
  int be;
  local_best(bv, be);
  for (int r = 0; r < k; ++r) {
    float wv = bv;
    int we = be;
    MOXE_PRAGMA_UNROLL
    for (int o = kLanes / 2; o > 0; o /= 2) {
      const float ov = Warp::shfl_xor(wv, o);
      const int oe = Warp::shfl_xor(we, o);
      if (ranks_before(ov, oe, wv, we)) {
        wv = ov;
        we = oe;
      }
    }
    if (g.lane == 0) {
      slots.value[r] = wv;
      slots.index[r] = we == kNone ? -1 : we;  // none left: (-inf, -1)
    }
    if (we == be && be != kNone) {  // the winner is mine: take it and look again
      taken |= 1u << ((we - g.lane) / kLanes);
      local_best(bv, be);
    }
  }
  Warp::sync();
}

/// Threshold (radix) search for the k-th largest key, then a stable compaction and a rank
/// sort of the k winners: O(32 * kPerLane) per lane for any k <= 32. With fewer than k
/// untaken elements the threshold stays 0 and all of them win.
template <int kLanes, int kPerLane, class Warp>
MOXE_DEVICE void topk_threshold(const LaneGroup<kLanes, Warp>& g, const float (&v)[kPerLane], uint32_t taken, int k,
                                TopKSlots slots) {
  uint32_t key[kPerLane];
  MOXE_PRAGMA_UNROLL
  for (int j = 0; j < kPerLane; ++j) key[j] = ((taken >> j) & 1u) ? 0u : float_key(v[j]);
  uint32_t tau = 0;
  for (int bit = 31; bit >= 0; --bit) {
    const uint32_t cand = tau | (1u << bit);
    int c = 0;
    MOXE_PRAGMA_UNROLL
    for (int j = 0; j < kPerLane; ++j) c += key[j] >= cand;
    if (g.sum(c) >= k) tau = cand;
  }
  int gt = 0;
  MOXE_PRAGMA_UNROLL
  for (int j = 0; j < kPerLane; ++j) gt += key[j] > tau;
  const int need = k - g.sum(gt);  // ties at the threshold, lowest index first
  int eq_seen = 0, base = 0;
  MOXE_PRAGMA_UNROLL
  for (int j = 0; j < kPerLane; ++j) {
    const bool eq = key[j] == tau && tau != 0u;
    const unsigned eq_ballot = Warp::ballot(eq);
    const bool sel = key[j] > tau || (eq && eq_seen + g.rank_below(eq_ballot) < need);
    eq_seen += g.count(eq_ballot);
    const unsigned sel_ballot = Warp::ballot(sel);
    if (sel) {
      const int pos = base + g.rank_below(sel_ballot);
      slots.value[pos] = key_float(key[j]);
      slots.index[pos] = g.element(j);
    }
    base += g.count(sel_ballot);
  }
  const int n = base;  // the winners: k, or the untaken elements when fewer
  Warp::sync();
  // rank sort of the n (<= 32) winners: value descending, index ascending
  constexpr int kSlotsPerLane = (kMaxTopK + kLanes - 1) / kLanes;
  float sv[kSlotsPerLane];
  int se[kSlotsPerLane], rank[kSlotsPerLane];
  MOXE_PRAGMA_UNROLL
  for (int i = 0; i < kSlotsPerLane; ++i) {
    const int r = g.lane + i * kLanes;
    rank[i] = -1;
    if (r < n) {
      sv[i] = slots.value[r];
      se[i] = slots.index[r];
      int before = 0;
      for (int s = 0; s < n; ++s) before += ranks_before(slots.value[s], slots.index[s], sv[i], se[i]);
      rank[i] = before;
    }
  }
  Warp::sync();
  MOXE_PRAGMA_UNROLL
  for (int i = 0; i < kSlotsPerLane; ++i) {
    const int r = g.lane + i * kLanes;
    if (rank[i] >= 0) {
      slots.value[rank[i]] = sv[i];
      slots.index[rank[i]] = se[i];
    } else if (r < k) {  // past the winners
      slots.value[r] = -math::infinity<float>();
      slots.index[r] = -1;
    }
  }
  Warp::sync();
}

/// The group top-k with the algorithm chosen by k, into slots [0, k) (TopKSlots). Every lane
/// of the warp must call it, with the same k (<= kMaxTopK).
template <int kLanes, int kPerLane, class Warp>
MOXE_DEVICE MOXE_FORCEINLINE void group_topk(const LaneGroup<kLanes, Warp>& g, const float (&v)[kPerLane],
                                             uint32_t taken, int k, TopKSlots slots) {
  if constexpr (kLanes * kPerLane <= kRoundsTopKMax) {
    topk_rounds<kLanes, kPerLane>(g, v, taken, k, slots);  // k <= E <= 8: no threshold code (registers)
  } else {
    if (k <= kRoundsTopKMax) {
      topk_rounds<kLanes, kPerLane>(g, v, taken, k, slots);
    } else {
      topk_threshold<kLanes, kPerLane>(g, v, taken, k, slots);
    }
  }
}

/// Bit j set for the lane's elements e >= E (padding).
template <int kLanes, int kPerLane, class Warp>
MOXE_DEVICE MOXE_FORCEINLINE uint32_t padding_bits(const LaneGroup<kLanes, Warp>& g, int experts) {
  uint32_t bits = 0;
  MOXE_PRAGMA_UNROLL
  for (int j = 0; j < kPerLane; ++j)
    if (g.element(j) >= experts) bits |= 1u << j;
  return bits;
}

/// Lanes per token for E experts (the same ladder dispatch_row_shape uses).
inline int row_lanes(int experts) { return experts <= 8 ? 4 : experts <= 32 ? 8 : 32; }

/// A compile-time row shape: kLanes lanes per token, kPerLane values per lane.
template <int kLanes_, int kPerLane_>
struct RowShape {
  static constexpr int kLanes = kLanes_;
  static constexpr int kPerLane = kPerLane_;
};

/// Call f(RowShape<kLanes, kPerLane>{}) for the smallest shape that holds E experts.
template <class F>
Status dispatch_row_shape(int experts, F&& f) {
  if (experts <= 8) return f(RowShape<4, 2>{});
  if (experts <= 32) return f(RowShape<8, 4>{});
  if (experts <= 128) return f(RowShape<32, 4>{});
  if (experts <= 256) return f(RowShape<32, 8>{});
  if (experts <= 512) return f(RowShape<32, 16>{});
  if (experts <= kMaxExperts) return f(RowShape<32, 32>{});
  return Status::unsupported;
}

/// The fused gate's ladder (router/gate.cuh): as dispatch_row_shape, but 33 <= E <= 64 on
/// (16, 4), two tokens per warp and no empty slot, instead of (32, 4) with half the slots
/// empty (the gate's per-token chain of shuffles is its cost: half the chains per warp).
inline int gate_row_lanes(int experts) { return experts <= 8 ? 4 : experts <= 32 ? 8 : experts <= 64 ? 16 : 32; }

template <class F>
Status dispatch_gate_row_shape(int experts, F&& f) {
  if (experts > 32 && experts <= 64) return f(RowShape<16, 4>{});
  return dispatch_row_shape(experts, static_cast<F&&>(f));
}

}  // namespace moxe::router::detail
