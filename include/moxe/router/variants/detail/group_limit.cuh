// moxe::router::variants: DeepSeek-V3's group limit on one token per group of lanes, the
// rule of moxe::router::topk: the experts form n_groups equal contiguous groups, each
// scored from its values, the topk_groups best (ties: lower group) stay, and the experts
// of the other groups leave the selection.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "moxe/core/config.hpp"
#include "moxe/router/detail/gate_math.hpp"
#include "moxe/router/variants/detail/device.cuh"

namespace moxe::router::variants::detail {

/// One token per group of kLanes lanes holding kPerLane values each (moxe::router's row
/// layout); the limit's parameters are uniform over the grid.
template <int kLanes, int kPerLane>
class GroupLimit {
 public:
  static constexpr int kMaxE = kLanes * kPerLane;

  /// Per group of lanes of a block; the kernel puts it in shared memory.
  struct TempStorage {
    float row[kRowWarps][LaneGroup<kLanes>::kGroups][kMaxE];    // a token's values, then kept-group flags
    float score[kRowWarps][LaneGroup<kLanes>::kGroups][kMaxE];  // group scores
  };

  MOXE_DEVICE GroupLimit(TempStorage& storage, const LaneGroup<kLanes>& g, int experts, int n_groups, int topk_groups)
      : g_(g),
        row_(storage.row[threadIdx.x / kWarpSize][g.group]),
        score_(storage.score[threadIdx.x / kWarpSize][g.group]),
        experts_(experts),
        n_groups_(n_groups),
        group_size_(experts / n_groups),
        topk_groups_(topk_groups) {}

  /// Whether the limit excludes anything (uniform over the grid).
  MOXE_DEVICE MOXE_FORCEINLINE bool active() const { return n_groups_ > 1 && topk_groups_ < n_groups_; }

  /// Sets the bits of `excluded` of the experts outside the kept groups. value(j): the
  /// value the group scores see for the lane's element j; group_score(values, size) scores
  /// one group from its values. All lanes of the warp call it.
  template <class Value, class GroupScore>
  MOXE_DEVICE MOXE_FORCEINLINE void exclude_unkept(Value value, GroupScore group_score, uint32_t& excluded) const {
    if (!active()) return;
    MOXE_PRAGMA_UNROLL
    for (int j = 0; j < kPerLane; ++j)
      if (g_.element(j) < experts_) row_[g_.element(j)] = value(j);
    __syncwarp();
    for (int gi = g_.lane; gi < n_groups_; gi += kLanes) score_[gi] = group_score(row_ + gi * group_size_, group_size_);
    __syncwarp();
    for (int gi = g_.lane; gi < n_groups_; gi += kLanes) {
      int before = 0;
      for (int o = 0; o < n_groups_; ++o) before += router::detail::ranks_before(score_[o], o, score_[gi], gi);
      row_[gi] = before < topk_groups_ ? 1.f : 0.f;
    }
    __syncwarp();
    MOXE_PRAGMA_UNROLL
    for (int j = 0; j < kPerLane; ++j) {
      const int e = g_.element(j);
      if (e < experts_ && row_[e / group_size_] == 0.f) excluded |= 1u << j;
    }
    __syncwarp();
  }

 private:
  LaneGroup<kLanes> g_;
  float* row_;
  float* score_;
  int experts_, n_groups_, group_size_, topk_groups_;
};

}  // namespace moxe::router::variants::detail
