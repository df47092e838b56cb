// moxe::router::variants: parameter structs of the routing variants from the MoE
// literature (docs/router_variants.md): top-p (dynamic-k) routing, expert-choice routing,
// group-restricted routing, expert choice inside groups (MoMa) and sigmoid scoring with a
// selection bias (DeepSeek-V3).
//
// Layouts (row-major): logits [T, E] (row stride E), per-token top-k style outputs
// [T, K] with -1 / 0 in unused slots (moxe::dispatch skips -1), per-expert outputs [E].
// Host references take any size; the device launchers take E <= kMaxExperts (1024) and
// K <= kMaxTopK (32), like moxe::router::topk.
#pragma once

#include <cstdint>
#include <limits>

#include "moxe/core/config.hpp"
#include "moxe/core/status.hpp"
#include "moxe/router/params.hpp"

namespace moxe::router::variants {

// ---- top-p (dynamic-k) ----------------------------------------------------------------

/// Per token: p = softmax(z); the smallest prefix of the experts in descending p (ties to
/// the lower index) whose cumulative probability reaches top_p, capped at max_k. Weights
/// are the chosen p themselves, as in the paper that defines top-p routing (Huang et al.
/// 2024, "Harder Tasks Need More Experts") and its released code; renormalize = true
/// gives p / sum(p over the chosen prefix) instead. Slots past the chosen count hold
/// idx -1, prob 0, weight 0.
struct TopPDims {
  int64_t tokens;
  int experts, max_k;
};

template <class T, class Acc = float>
struct TopPForwardParams {
  TopPDims dims;
  const T* logits;                      // [T, E]
  Acc top_p = Acc(0.9);                 // in (0, 1]
  int32_t* topk_idx = nullptr;          // [T, max_k] required, descending p, -1 unused
  Acc* topk_prob = nullptr;             // [T, max_k] optional, p before renormalisation
  Acc* topk_weight = nullptr;           // [T, max_k] required
  int32_t* expert_count = nullptr;      // [T] optional: experts chosen per token (1..max_k)
  int64_t* total_count = nullptr;       // [1] optional: sum of expert_count (mean = total / T)
  bool renormalize = false;             // weight = p (the paper's), or p / sum(p chosen);
                                        // last, so aggregate initialisers keep their meaning
};

/// dlogits [T, E] from dweight [T, max_k] (entries of unused slots are ignored).
template <class T, class Acc = float>
struct TopPBackwardParams {
  TopPForwardParams<T, Acc> fwd;  // logits and the saved topk_idx
  const Acc* dweight = nullptr;   // [T, max_k] required
  T* dlogits = nullptr;           // [T, E] required
};

// ---- expert choice --------------------------------------------------------------------

/// Each expert takes the `capacity` tokens of largest score s = softmax(z) over experts
/// (ties to the lower token index); capacity is clamped to T. See expert_choice_capacity.
struct ExpertChoiceDims {
  int64_t tokens;
  int experts;
  int64_t capacity;  // C >= 1 tokens per expert (clamped to T)
};

/// C = ceil(capacity_factor * T * top_k / E): with capacity_factor 1 each token gets
/// top_k experts on average.
inline int64_t expert_choice_capacity(int64_t tokens, int experts, double capacity_factor, int top_k = 1) {
  const double c = capacity_factor * static_cast<double>(tokens) * top_k / static_cast<double>(experts);
  int64_t r = static_cast<int64_t>(c);
  if (static_cast<double>(r) < c) ++r;
  return r < 1 ? 1 : r;
}

/// The capacity actually used: min(C, T).
MOXE_HD inline int64_t effective_capacity(const ExpertChoiceDims& d) {
  return d.capacity < d.tokens ? d.capacity : d.tokens;
}

template <class T, class Acc = float>
struct ExpertChoiceForwardParams {
  ExpertChoiceDims dims;
  const T* logits;                       // [T, E]
  Acc* scores = nullptr;                 // [T, E] optional: s = softmax(z)
  int32_t* expert_tokens = nullptr;      // [E, Ce] required: chosen tokens, ascending token index
  Acc* expert_weights = nullptr;         // [E, Ce] optional: s[token, e]
  int64_t* row_map = nullptr;            // [T, E] required: e*Ce + position, or -1
  Acc* token_weight = nullptr;           // [T, E] required: s[t, e] where chosen, else 0
  int64_t* expert_offsets = nullptr;     // [E + 1] optional: e * Ce
  int32_t* experts_per_token = nullptr;  // [T] optional: 0..E
};

/// dlogits from dweight [T, E] (the gradient of token_weight; unchosen entries ignored).
template <class T, class Acc = float>
struct ExpertChoiceBackwardParams {
  ExpertChoiceForwardParams<T, Acc> fwd;  // logits and the saved row_map
  const Acc* dweight = nullptr;           // [T, E] required
  T* dlogits = nullptr;                   // [T, E] required
};

// ---- group-restricted expert choice (MoMa) ----------------------------------------------

/// How an expert-choice router scores a (token, expert) pair.
enum class ChoiceScore {
  sigmoid,  // s = sigmoid(z), each pair on its own (MoMa)
  softmax,  // s = softmax of z over the experts that may choose the token (Zhou et al. 2022)
};

/// Expert choice inside groups (MoMa, Lin et al. 2024): token t carries a group id g_t (a
/// modality); expert e belongs to a pool: the shared pool when in [shared_begin,
/// shared_end), else the lowest group g with e in [group_offsets[g], group_offsets[g+1]),
/// else none. The shared pool sees every token, a group's pool the tokens of that group,
/// no pool no token. Each expert takes the C_e tokens of largest score s among those its
/// pool sees (ties to the lower token index); a token gets 0..E experts. A pool of E_P
/// experts that sees N_P tokens gives each of its experts (detail::pool_capacity)
///   C_e = min(capacity, N_P)                                   capacity > 0
///   C_e = clamp(ceil(capacity_factor * N_P * top_k / E_P), 1, N_P)   capacity == 0
/// (0 when N_P = 0): MoMa's rule with capacity_factor 1 and top_k 1, each expert the mean
/// load N_P / E_P of its group. N_P depends on the group ids, so the layout is made on the
/// device: expert e's rows are [expert_offsets[e], expert_offsets[e+1]).
struct GroupExpertChoiceDims {
  int64_t tokens;
  int experts, num_groups;
  int shared_begin = 0, shared_end = 0;
  int64_t capacity = 0;          // > 0: tokens per expert (clamped to what its pool sees)
  double capacity_factor = 1.0;  // with capacity 0: the factor of the rule above
  int top_k = 1;                 // with capacity 0: experts per token per pool, on average
};

/// Rows of expert_tokens / expert_weights that the forward fills at most, for any group
/// ids and offsets (the total, expert_offsets[E], stays on the device): E * min(C, T) with
/// a given capacity, else (1 + [shared pool]) * ceil(capacity_factor * T * top_k) + E
/// (each pool fills at most capacity_factor * N_P * top_k + E_P rows), at most E * T.
inline int64_t group_expert_choice_max_rows(const GroupExpertChoiceDims& d) {
  const double all = static_cast<double>(d.experts) * static_cast<double>(d.tokens);
  if (d.capacity > 0) return static_cast<int64_t>(d.experts) * (d.capacity < d.tokens ? d.capacity : d.tokens);
  const int pools = d.shared_end > d.shared_begin ? 2 : 1;
  const double per_pool = d.capacity_factor * static_cast<double>(d.tokens) * d.top_k * (1.0 + 1e-12);
  const double rows = pools * (per_pool + 1.0) + d.experts;
  return static_cast<int64_t>(rows < all ? rows : all);
}

template <class T, class Acc = float>
struct GroupExpertChoiceForwardParams {
  GroupExpertChoiceDims dims;
  const T* logits;                       // [T, E]
  const int32_t* group_id;               // [T]; an id outside [0, num_groups): no group
  const int32_t* group_offsets;          // [num_groups + 1], non-decreasing, in [0, E]
  ChoiceScore score = ChoiceScore::sigmoid;
  Acc* scores = nullptr;                 // [T, E] optional: s where e's pool sees t, else 0
  int32_t* expert_tokens = nullptr;      // [max_rows] required: expert e's tokens at rows
                                         // [off[e], off[e+1]), ascending token index
  Acc* expert_weights = nullptr;         // [max_rows] optional: s[token, e]
  int64_t* row_map = nullptr;            // [T, E] required: the row of (t, e), or -1
  Acc* token_weight = nullptr;           // [T, E] required: s[t, e] where chosen, else 0
  int64_t* expert_offsets = nullptr;     // [E + 1] required: off[e] = sum of C_e' for e' < e
  int32_t* experts_per_token = nullptr;  // [T] optional: 0..E
};

/// dlogits from dweight [T, E] (the gradient of token_weight; unchosen entries ignored).
template <class T, class Acc = float>
struct GroupExpertChoiceBackwardParams {
  GroupExpertChoiceForwardParams<T, Acc> fwd;  // logits, groups, score and the saved row_map
  const Acc* dweight = nullptr;                // [T, E] required
  T* dlogits = nullptr;                        // [T, E] required (0 where unchosen: sigmoid;
                                               // 0 outside the token's experts: softmax)
};

// ---- group-restricted -----------------------------------------------------------------

/// Per token: the allowed experts are its group's contiguous range
/// [group_offsets[g], group_offsets[g+1]) plus the shared pool [shared_begin, shared_end)
/// (empty when equal). p = softmax of z over the allowed experts (0 elsewhere), top-k of p
/// among them (ties to the lower index); weight p / sum(p chosen) (renormalize) or p.
/// A token whose allowed set holds fewer than top_k experts fills the rest with -1 / 0;
/// a group id outside [0, num_groups) allows the shared pool only.
/// Optionally composed with DeepSeek-V3 group-limited routing: the expert axis splits
/// into n_groups equal contiguous groups, each scored by the sum of its top-2 allowed p
/// (its top-1 with one allowed expert, -inf with none), and only the topk_groups best
/// (ties: lower group) stay allowed. The limit steers selection only: p stays the
/// softmax over the group-restricted set.
struct GroupRestrictedDims {
  int64_t tokens;
  int experts, top_k, num_groups;
  int shared_begin = 0, shared_end = 0;
  int n_groups = 1, topk_groups = 1;
};

template <class T, class Acc = float>
struct GroupRestrictedForwardParams {
  GroupRestrictedDims dims;
  const T* logits;                      // [T, E]
  const int32_t* group_id;              // [T]
  const int32_t* group_offsets;         // [num_groups + 1], non-decreasing, in [0, E]
  bool renormalize = true;
  int32_t* topk_idx = nullptr;          // [T, K] required, descending p, -1 unused
  Acc* topk_prob = nullptr;             // [T, K] optional, p (masked softmax)
  Acc* topk_weight = nullptr;           // [T, K] required
};

template <class T, class Acc = float>
struct GroupRestrictedBackwardParams {
  GroupRestrictedForwardParams<T, Acc> fwd;  // inputs and the saved topk_idx
  const Acc* dweight = nullptr;              // [T, K] required
  T* dlogits = nullptr;                      // [T, E] required (0 outside the allowed set)
};

// ---- sigmoid scoring with selection bias (DeepSeek-V3) -----------------------------------

/// s = sigmoid(z); the top-k of s + bias is chosen (optionally group-limited: n_groups
/// equal contiguous groups scored by the sum of their top-2 of s + bias, topk_groups
/// kept, as moxe::router::topk); weight = routed_scaling * s / sum(s chosen) (renormalize)
/// or routed_scaling * s. The bias steers selection only; it gets no gradient.
struct SigmoidBiasDims {
  int64_t tokens;
  int experts, top_k;
  int n_groups = 1, topk_groups = 1;
};

template <class T, class Acc = float>
struct SigmoidBiasForwardParams {
  SigmoidBiasDims dims;
  const T* logits;                    // [T, E]
  const Acc* bias = nullptr;          // [E] optional (null: 0)
  Acc routed_scaling = Acc(1);
  bool renormalize = true;
  int32_t* topk_idx = nullptr;        // [T, K] required, descending s + bias
  Acc* topk_score = nullptr;          // [T, K] optional: s (without bias)
  Acc* topk_weight = nullptr;         // [T, K] required
  int32_t* expert_counts = nullptr;   // [E] optional: tokens routed to each expert
};

template <class T, class Acc = float>
struct SigmoidBiasBackwardParams {
  SigmoidBiasForwardParams<T, Acc> fwd;  // logits and the saved topk_idx
  const Acc* dweight = nullptr;          // [T, K] required
  T* dlogits = nullptr;                  // [T, E] required
};

/// The auxiliary-loss-free balance step: b_e += rate * sign(mean_e' load - load_e), with
/// load = expert_counts (device memory, e.g. the forward's). Deterministic, integer exact.
template <class Acc = float>
struct BiasUpdateParams {
  int experts;
  const int32_t* expert_counts;  // [E]
  Acc* bias;                     // [E] updated in place
  Acc rate = Acc(1e-3);
};

// ---- checks shared by the references and the launchers ----------------------------------

inline Status validate_dims(const TopPDims& d) {
  MOXE_REQUIRE(d.tokens > 0 && d.experts > 0);
  MOXE_REQUIRE(d.max_k >= 1 && d.max_k <= d.experts);
  return Status::ok;
}

template <class T, class Acc>
Status validate(const TopPForwardParams<T, Acc>& p, bool need_outputs = true) {
  MOXE_RETURN_IF_ERROR(validate_dims(p.dims));
  MOXE_REQUIRE(p.logits != nullptr);
  MOXE_REQUIRE(p.top_p > Acc(0) && p.top_p <= Acc(1));  // also rejects NaN
  if (need_outputs) MOXE_REQUIRE(p.topk_idx && p.topk_weight);
  return Status::ok;
}

template <class T, class Acc>
Status validate(const TopPBackwardParams<T, Acc>& b) {
  MOXE_RETURN_IF_ERROR(validate(b.fwd, false));
  MOXE_REQUIRE(b.fwd.topk_idx && b.dweight && b.dlogits);
  return Status::ok;
}

inline Status validate_dims(const ExpertChoiceDims& d) {
  MOXE_REQUIRE(d.tokens > 0 && d.experts > 0 && d.capacity >= 1);
  return Status::ok;
}

template <class T, class Acc>
Status validate(const ExpertChoiceForwardParams<T, Acc>& p, bool need_outputs = true) {
  MOXE_RETURN_IF_ERROR(validate_dims(p.dims));
  MOXE_REQUIRE(p.logits != nullptr);
  if (need_outputs) MOXE_REQUIRE(p.expert_tokens && p.row_map && p.token_weight);
  return Status::ok;
}

template <class T, class Acc>
Status validate(const ExpertChoiceBackwardParams<T, Acc>& b) {
  MOXE_RETURN_IF_ERROR(validate(b.fwd, false));
  MOXE_REQUIRE(b.fwd.row_map && b.dweight && b.dlogits);
  return Status::ok;
}

inline Status validate_dims(const GroupExpertChoiceDims& d) {
  MOXE_REQUIRE(d.tokens > 0 && d.experts > 0 && d.num_groups >= 1);
  MOXE_REQUIRE(d.shared_begin >= 0 && d.shared_begin <= d.shared_end && d.shared_end <= d.experts);
  MOXE_REQUIRE(d.capacity >= 0 && d.top_k >= 1);
  // the factor matters without a given capacity: positive and finite (rejects NaN too)
  if (d.capacity == 0)
    MOXE_REQUIRE(d.capacity_factor > 0.0 && d.capacity_factor <= std::numeric_limits<double>::max());
  return Status::ok;
}

template <class T, class Acc>
Status validate(const GroupExpertChoiceForwardParams<T, Acc>& p, bool need_outputs = true) {
  MOXE_RETURN_IF_ERROR(validate_dims(p.dims));
  MOXE_REQUIRE(p.logits && p.group_id && p.group_offsets);
  MOXE_REQUIRE(p.score == ChoiceScore::sigmoid || p.score == ChoiceScore::softmax);
  if (need_outputs) MOXE_REQUIRE(p.expert_tokens && p.row_map && p.token_weight && p.expert_offsets);
  return Status::ok;
}

template <class T, class Acc>
Status validate(const GroupExpertChoiceBackwardParams<T, Acc>& b) {
  MOXE_RETURN_IF_ERROR(validate(b.fwd, false));
  MOXE_REQUIRE(b.fwd.row_map && b.dweight && b.dlogits);
  return Status::ok;
}

inline Status validate_dims(const GroupRestrictedDims& d) {
  MOXE_REQUIRE(d.tokens > 0 && d.experts > 0 && d.num_groups >= 1);
  MOXE_REQUIRE(d.top_k >= 1 && d.top_k <= d.experts);
  MOXE_REQUIRE(d.shared_begin >= 0 && d.shared_begin <= d.shared_end && d.shared_end <= d.experts);
  MOXE_REQUIRE(d.n_groups >= 1 && d.experts % d.n_groups == 0);
  MOXE_REQUIRE(d.topk_groups >= 1 && d.topk_groups <= d.n_groups);
  return Status::ok;
}

template <class T, class Acc>
Status validate(const GroupRestrictedForwardParams<T, Acc>& p, bool need_outputs = true) {
  MOXE_RETURN_IF_ERROR(validate_dims(p.dims));
  MOXE_REQUIRE(p.logits && p.group_id && p.group_offsets);
  if (need_outputs) MOXE_REQUIRE(p.topk_idx && p.topk_weight);
  return Status::ok;
}

template <class T, class Acc>
Status validate(const GroupRestrictedBackwardParams<T, Acc>& b) {
  MOXE_RETURN_IF_ERROR(validate(b.fwd, false));
  MOXE_REQUIRE(b.fwd.topk_idx && b.dweight && b.dlogits);
  return Status::ok;
}

/// Host check of group offsets the caller can read (the references; the launchers cannot
/// read device memory and treat bad offsets per token as an empty group).
inline Status validate_group_offsets(const int32_t* offsets, int num_groups, int experts) {
  MOXE_REQUIRE(offsets != nullptr && offsets[0] >= 0 && offsets[num_groups] <= experts);
  for (int g = 0; g < num_groups; ++g) MOXE_REQUIRE(offsets[g] <= offsets[g + 1]);
  return Status::ok;
}

/// The selection is moxe::router::topk's (group-limited top-k of s + bias): its checks.
inline Status validate_dims(const SigmoidBiasDims& d) {
  return router::validate_dims(TopKDims{d.tokens, d.experts, d.top_k, d.n_groups, d.topk_groups});
}

template <class T, class Acc>
Status validate(const SigmoidBiasForwardParams<T, Acc>& p, bool need_outputs = true) {
  MOXE_RETURN_IF_ERROR(validate_dims(p.dims));
  MOXE_REQUIRE(p.logits != nullptr);
  MOXE_REQUIRE(p.routed_scaling == p.routed_scaling);  // not NaN
  if (need_outputs) MOXE_REQUIRE(p.topk_idx && p.topk_weight);
  return Status::ok;
}

template <class T, class Acc>
Status validate(const SigmoidBiasBackwardParams<T, Acc>& b) {
  MOXE_RETURN_IF_ERROR(validate(b.fwd, false));
  MOXE_REQUIRE(b.fwd.topk_idx && b.dweight && b.dlogits);
  return Status::ok;
}

template <class Acc>
Status validate(const BiasUpdateParams<Acc>& p) {
  MOXE_REQUIRE(p.experts > 0 && p.expert_counts && p.bias);
  MOXE_REQUIRE(p.rate == p.rate);
  return Status::ok;
}

}  // namespace moxe::router::variants
