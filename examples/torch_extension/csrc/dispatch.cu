// moxe_torch: the routing map, permute and unpermute with their backward passes
// (include/moxe/dispatch/routing_map.cuh, permute.cuh).
#include "common.cuh"
#include "moxe/dispatch/permute.cuh"
#include "moxe/dispatch/routing_map.cuh"

namespace moxe_torch {

namespace {

/// Dims from row_map [T, K] and hidden H; the permuted buffers hold permuted_rows(dims) rows.
moxe::dispatch::Dims dispatch_dims(const at::Tensor& row_map, int64_t hidden, int64_t experts, int64_t align,
                                   int64_t capacity = -1) {
  TORCH_CHECK(row_map.dim() == 2, "row_map must be [T, K], got ", row_map.sizes());
  TORCH_CHECK(hidden > 0 && hidden <= INT32_MAX, "hidden size must be in [1, 2^31), got ", hidden);
  TORCH_CHECK(experts > 0 && experts <= INT32_MAX, "experts must be positive, got ", experts);
  TORCH_CHECK(align >= 1 && align <= INT32_MAX, "align must be >= 1, got ", align);
  TORCH_CHECK(row_map.size(1) <= INT32_MAX, "top_k too large");
  moxe::dispatch::Dims d{};
  d.tokens = row_map.size(0);
  d.hidden = static_cast<int>(hidden);
  d.experts = static_cast<int>(experts);
  d.top_k = static_cast<int>(row_map.size(1));
  d.capacity = capacity;
  d.align = static_cast<int>(align);
  return d;
}

void check_row_map(const at::Tensor& row_map, const at::Tensor& like) {
  check_tensor(row_map, "row_map", at::kLong, like);
}

void check_offsets(const OptTensor& expert_offsets, const moxe::dispatch::Dims& d, const at::Tensor& like) {
  check_optional(expert_offsets, "expert_offsets", at::kLong, like, {int64_t(d.experts) + 1});
}

}  // namespace

std::vector<at::Tensor> routing_map(const at::Tensor& topk_idx, int64_t experts, int64_t capacity, int64_t align) {
  TORCH_CHECK(topk_idx.dim() == 2, "topk_idx must be [T, K], got ", topk_idx.sizes());
  check_tensor(topk_idx, "topk_idx", at::kInt, topk_idx);
  TORCH_CHECK(capacity >= -1, "capacity must be -1 (no limit) or >= 0, got ", capacity);
  const c10::cuda::CUDAGuard guard(topk_idx.device());
  moxe::dispatch::RoutingMapParams p{};
  p.dims = dispatch_dims(topk_idx, 1, experts, align, capacity);
  at::Tensor row_map = at::empty(topk_idx.sizes(), topk_idx.options().dtype(at::kLong));
  at::Tensor expert_offsets = at::empty({experts + 1}, topk_idx.options().dtype(at::kLong));
  at::Tensor expert_counts = at::empty({experts}, topk_idx.options().dtype(at::kInt));
  p.topk_idx = ptr<const int32_t>(topk_idx);
  p.row_map = ptr<int64_t>(row_map);
  p.expert_offsets = ptr<int64_t>(expert_offsets);
  p.expert_counts = ptr<int32_t>(expert_counts);
  const Workspace ws = make_workspace(moxe::dispatch::routing_map_workspace_size(p), topk_idx);
  check_status(moxe::dispatch::routing_map(p, ws.ptr(), ws.bytes(), current_stream()), "dispatch::routing_map");
  return {row_map, expert_offsets, expert_counts};
}

at::Tensor permute(const at::Tensor& x, const at::Tensor& row_map, const OptTensor& expert_offsets, int64_t experts,
                   int64_t align) {
  TORCH_CHECK(x.dim() == 2, "x must be [T, H], got ", x.sizes());
  check_tensor(x, "x", x.scalar_type(), x);
  check_row_map(row_map, x);
  const moxe::dispatch::Dims d = dispatch_dims(row_map, x.size(1), experts, align);
  TORCH_CHECK(row_map.size(0) == x.size(0), "row_map must have ", x.size(0), " rows, got ", row_map.size(0));
  check_offsets(expert_offsets, d, x);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor xp = at::empty({moxe::dispatch::permuted_rows(d), x.size(1)}, x.options());
  dispatch_element(x.scalar_type(), "permute", [&](auto tag) {
    using T = typename decltype(tag)::type;
    moxe::dispatch::PermuteParams<T> p{d, ptr<const T>(x), ptr<const int64_t>(row_map),
                                       ptr<const int64_t>(expert_offsets), ptr<T>(xp)};
    const Workspace ws = make_workspace(moxe::dispatch::permute_workspace_size(p), x);
    check_status(moxe::dispatch::permute(p, ws.ptr(), ws.bytes(), current_stream()), "dispatch::permute");
  });
  return xp;
}

at::Tensor permute_backward(const at::Tensor& dxp, const at::Tensor& row_map, int64_t experts, int64_t align) {
  TORCH_CHECK(dxp.dim() == 2, "dxp must be [rows, H], got ", dxp.sizes());
  check_tensor(dxp, "dxp", dxp.scalar_type(), dxp);
  check_row_map(row_map, dxp);
  const moxe::dispatch::Dims d = dispatch_dims(row_map, dxp.size(1), experts, align);
  check_shape(dxp, "dxp", {moxe::dispatch::permuted_rows(d), dxp.size(1)});
  const c10::cuda::CUDAGuard guard(dxp.device());
  at::Tensor dx = at::empty({d.tokens, dxp.size(1)}, dxp.options());
  dispatch_element(dxp.scalar_type(), "permute_backward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    moxe::dispatch::PermuteBackwardParams<T> p{d, ptr<const T>(dxp), ptr<const int64_t>(row_map), ptr<T>(dx)};
    const Workspace ws = make_workspace(moxe::dispatch::permute_backward_workspace_size(p), dxp);
    check_status(moxe::dispatch::permute_backward(p, ws.ptr(), ws.bytes(), current_stream()),
                 "dispatch::permute_backward");
  });
  return dx;
}

namespace {

moxe::dispatch::Dims check_unpermute_inputs(const at::Tensor& yp, const at::Tensor& row_map,
                                            const at::Tensor& weight, int64_t experts, int64_t align) {
  TORCH_CHECK(yp.dim() == 2, "yp must be [rows, H], got ", yp.sizes());
  check_tensor(yp, "yp", yp.scalar_type(), yp);
  check_row_map(row_map, yp);
  const moxe::dispatch::Dims d = dispatch_dims(row_map, yp.size(1), experts, align);
  check_shape(yp, "yp", {moxe::dispatch::permuted_rows(d), yp.size(1)});
  check_tensor(weight, "weight", at::kFloat, yp, {d.tokens, d.top_k});
  return d;
}

}  // namespace

at::Tensor unpermute(const at::Tensor& yp, const at::Tensor& row_map, const at::Tensor& weight, int64_t experts,
                     int64_t align) {
  const moxe::dispatch::Dims d = check_unpermute_inputs(yp, row_map, weight, experts, align);
  const c10::cuda::CUDAGuard guard(yp.device());
  at::Tensor y = at::empty({d.tokens, yp.size(1)}, yp.options());
  dispatch_element(yp.scalar_type(), "unpermute", [&](auto tag) {
    using T = typename decltype(tag)::type;
    moxe::dispatch::UnpermuteParams<T, float> p{d, ptr<const T>(yp), ptr<const int64_t>(row_map),
                                                ptr<const float>(weight), ptr<T>(y)};
    const Workspace ws = make_workspace(moxe::dispatch::unpermute_workspace_size(p), yp);
    check_status(moxe::dispatch::unpermute(p, ws.ptr(), ws.bytes(), current_stream()), "dispatch::unpermute");
  });
  return y;
}

std::vector<at::Tensor> unpermute_backward(const at::Tensor& yp, const at::Tensor& row_map, const at::Tensor& weight,
                                           const at::Tensor& dy, const OptTensor& expert_offsets, int64_t experts,
                                           int64_t align) {
  const moxe::dispatch::Dims d = check_unpermute_inputs(yp, row_map, weight, experts, align);
  check_tensor(dy, "dy", yp.scalar_type(), yp, {d.tokens, yp.size(1)});
  check_offsets(expert_offsets, d, yp);
  const c10::cuda::CUDAGuard guard(yp.device());
  at::Tensor dyp = at::empty_like(yp);
  at::Tensor dweight = at::empty({d.tokens, d.top_k}, weight.options());
  dispatch_element(yp.scalar_type(), "unpermute_backward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    moxe::dispatch::UnpermuteBackwardParams<T, float> b{};
    b.fwd = moxe::dispatch::UnpermuteParams<T, float>{d, ptr<const T>(yp), ptr<const int64_t>(row_map),
                                                      ptr<const float>(weight), nullptr};
    b.dy = ptr<const T>(dy);
    b.dyp = ptr<T>(dyp);
    b.dweight = ptr<float>(dweight);
    b.expert_offsets = ptr<const int64_t>(expert_offsets);
    const Workspace ws = make_workspace(moxe::dispatch::unpermute_backward_workspace_size(b), yp);
    check_status(moxe::dispatch::unpermute_backward(b, ws.ptr(), ws.bytes(), current_stream()),
                 "dispatch::unpermute_backward");
  });
  return {dyp, dweight};
}

}  // namespace moxe_torch
