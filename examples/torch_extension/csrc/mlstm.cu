// moxe_torch: mLSTM chunkwise forward and backward (include/moxe/mlstm/chunkwise.cuh).
#include "common.cuh"
#include "moxe/mlstm/chunkwise.cuh"

namespace moxe_torch {

namespace {

struct MlstmShape {
  int64_t batch, heads, seq_len, dqk, dv;
  int64_t num_segments;  // 0: no segment_offsets
  int64_t slots() const { return num_segments > 0 ? num_segments : batch; }
};

MlstmShape check_mlstm_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& igate,
                              const at::Tensor& fgate, const OptTensor& c_init, const OptTensor& n_init,
                              const OptTensor& m_init, const OptTensor& segment_offsets) {
  TORCH_CHECK(q.dim() == 4, "q must be [B, NH, S, DQK], got ", q.sizes());
  TORCH_CHECK(v.dim() == 4, "v must be [B, NH, S, DV], got ", v.sizes());
  MlstmShape s{q.size(0), q.size(1), q.size(2), q.size(3), v.size(3), 0};
  const at::ScalarType dtype = q.scalar_type();
  check_tensor(q, "q", dtype, q);
  check_tensor(k, "k", dtype, q, {s.batch, s.heads, s.seq_len, s.dqk});
  check_tensor(v, "v", dtype, q, {s.batch, s.heads, s.seq_len, s.dv});
  check_tensor(igate, "igate", dtype, q, {s.batch, s.heads, s.seq_len});
  check_tensor(fgate, "fgate", dtype, q, {s.batch, s.heads, s.seq_len});
  if (segment_offsets.has_value()) {
    TORCH_CHECK(segment_offsets->dim() == 1 && segment_offsets->size(0) >= 2,
                "segment_offsets must be [num_segments + 1], got ", segment_offsets->sizes());
    check_tensor(*segment_offsets, "segment_offsets", at::kLong, q);
    TORCH_CHECK(s.batch == 1, "segment_offsets needs batch 1, got ", s.batch);
    s.num_segments = segment_offsets->size(0) - 1;
  }
  check_all_or_none({&c_init, &n_init, &m_init}, "c_init, n_init, m_init");
  check_optional(c_init, "c_init", at::kFloat, q, {s.slots(), s.heads, s.dqk, s.dv});
  check_optional(n_init, "n_init", at::kFloat, q, {s.slots(), s.heads, s.dqk});
  check_optional(m_init, "m_init", at::kFloat, q, {s.slots(), s.heads});
  return s;
}

template <class T>
moxe::mlstm::ForwardParams<T, float> forward_params(const MlstmShape& s, const at::Tensor& q, const at::Tensor& k,
                                                    const at::Tensor& v, const at::Tensor& igate,
                                                    const at::Tensor& fgate, const OptTensor& c_init,
                                                    const OptTensor& n_init, const OptTensor& m_init,
                                                    const OptTensor& segment_offsets, double qk_scale, double eps,
                                                    int64_t chunk_size, int64_t batch_per_pass) {
  moxe::mlstm::ForwardParams<T, float> p{};
  p.dims = moxe::mlstm::Dims{s.batch, s.heads, s.seq_len, s.dqk, s.dv};
  p.q = ptr<const T>(q);
  p.k = ptr<const T>(k);
  p.v = ptr<const T>(v);
  p.igate = ptr<const T>(igate);
  p.fgate = ptr<const T>(fgate);
  p.c_init = ptr<const float>(c_init);
  p.n_init = ptr<const float>(n_init);
  p.m_init = ptr<const float>(m_init);
  p.qk_scale = static_cast<float>(qk_scale);
  p.eps = static_cast<float>(eps);
  p.chunk_size = static_cast<int>(chunk_size);
  p.batch_per_pass = batch_per_pass;
  p.segment_offsets = ptr<const int64_t>(segment_offsets);
  p.num_segments = s.num_segments;
  return p;
}

}  // namespace

std::vector<at::Tensor> mlstm_chunkwise_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                const at::Tensor& igate, const at::Tensor& fgate,
                                                const OptTensor& c_init, const OptTensor& n_init,
                                                const OptTensor& m_init, const OptTensor& segment_offsets,
                                                double qk_scale, double eps, int64_t chunk_size,
                                                bool return_last_states, int64_t batch_per_pass, bool keep_tape) {
  const MlstmShape s = check_mlstm_inputs(q, k, v, igate, fgate, c_init, n_init, m_init, segment_offsets);
  const c10::cuda::CUDAGuard guard(q.device());
  const auto states = q.options().dtype(at::kFloat);
  at::Tensor h = at::empty({s.batch, s.heads, s.seq_len, s.dv}, q.options());
  at::Tensor c_last = empty_if(return_last_states, {s.slots(), s.heads, s.dqk, s.dv}, states);
  at::Tensor n_last = empty_if(return_last_states, {s.slots(), s.heads, s.dqk}, states);
  at::Tensor m_last = empty_if(return_last_states, {s.slots(), s.heads}, states);
  at::Tensor tape;
  dispatch_element(q.scalar_type(), "mlstm_chunkwise_forward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    auto p = forward_params<T>(s, q, k, v, igate, fgate, c_init, n_init, m_init, segment_offsets, qk_scale, eps,
                               chunk_size, batch_per_pass);
    p.h = ptr<T>(h);
    if (return_last_states) {
      p.c_last = ptr<float>(c_last);
      p.n_last = ptr<float>(n_last);
      p.m_last = ptr<float>(m_last);
    }
    if (keep_tape) {
      tape = at::empty({static_cast<int64_t>(moxe::mlstm::chunkwise_tape_size(p))}, q.options().dtype(at::kByte));
      p.tape = tape.data_ptr();
      p.tape_bytes = static_cast<size_t>(tape.numel());
    }
    const Workspace ws = make_workspace(moxe::mlstm::chunkwise_forward_workspace_size(p), q);
    check_status(moxe::mlstm::chunkwise_forward(p, ws.ptr(), ws.bytes(), current_stream()),
                 "mlstm::chunkwise_forward");
  });
  return {h, c_last, n_last, m_last, tape};
}

std::vector<at::Tensor> mlstm_chunkwise_backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 const at::Tensor& igate, const at::Tensor& fgate,
                                                 const OptTensor& c_init, const OptTensor& n_init,
                                                 const OptTensor& m_init, const OptTensor& segment_offsets,
                                                 const at::Tensor& dh, const OptTensor& dc_last,
                                                 const OptTensor& dn_last, const OptTensor& dm_last,
                                                 double qk_scale, double eps, int64_t chunk_size, bool init_grads,
                                                 int64_t batch_per_pass, const OptTensor& tape) {
  const MlstmShape s = check_mlstm_inputs(q, k, v, igate, fgate, c_init, n_init, m_init, segment_offsets);
  check_tensor(dh, "dh", q.scalar_type(), q, {s.batch, s.heads, s.seq_len, s.dv});
  check_all_or_none({&dc_last, &dn_last, &dm_last}, "dc_last, dn_last, dm_last");
  check_optional(dc_last, "dc_last", at::kFloat, q, {s.slots(), s.heads, s.dqk, s.dv});
  check_optional(dn_last, "dn_last", at::kFloat, q, {s.slots(), s.heads, s.dqk});
  check_optional(dm_last, "dm_last", at::kFloat, q, {s.slots(), s.heads});
  TORCH_CHECK(!init_grads || c_init.has_value(), "gradients of the initial states need the initial states");
  if (tape.has_value()) {
    check_tensor(*tape, "tape", at::kByte, q);
    TORCH_CHECK(tape->dim() == 1, "tape must be the forward's (1-D uint8), got ", tape->sizes());
  }
  const c10::cuda::CUDAGuard guard(q.device());
  const auto states = q.options().dtype(at::kFloat);
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  at::Tensor digate = at::empty_like(igate), dfgate = at::empty_like(fgate);
  at::Tensor dc_init = empty_if(init_grads, {s.slots(), s.heads, s.dqk, s.dv}, states);
  at::Tensor dn_init = empty_if(init_grads, {s.slots(), s.heads, s.dqk}, states);
  at::Tensor dm_init = empty_if(init_grads, {s.slots(), s.heads}, states);
  dispatch_element(q.scalar_type(), "mlstm_chunkwise_backward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    moxe::mlstm::BackwardParams<T, float> b{};
    b.fwd = forward_params<T>(s, q, k, v, igate, fgate, c_init, n_init, m_init, segment_offsets, qk_scale, eps,
                              chunk_size, batch_per_pass);
    b.dh = ptr<const T>(dh);
    b.dc_last = ptr<const float>(dc_last);
    b.dn_last = ptr<const float>(dn_last);
    b.dm_last = ptr<const float>(dm_last);
    if (tape.has_value()) {  // (its size is checked by the launcher: workspace_too_small)
      b.fwd.tape = tape->data_ptr();
      b.fwd.tape_bytes = static_cast<size_t>(tape->numel());
    }
    b.dq = ptr<T>(dq);
    b.dk = ptr<T>(dk);
    b.dv = ptr<T>(dv);
    b.digate = ptr<T>(digate);
    b.dfgate = ptr<T>(dfgate);
    if (init_grads) {
      b.dc_init = ptr<float>(dc_init);
      b.dn_init = ptr<float>(dn_init);
      b.dm_init = ptr<float>(dm_init);
    }
    const Workspace ws = make_workspace(moxe::mlstm::chunkwise_backward_workspace_size(b), q);
    check_status(moxe::mlstm::chunkwise_backward(b, ws.ptr(), ws.bytes(), current_stream()),
                 "mlstm::chunkwise_backward");
  });
  return {dq, dk, dv, digate, dfgate, dc_init, dn_init, dm_init};
}

}  // namespace moxe_torch
