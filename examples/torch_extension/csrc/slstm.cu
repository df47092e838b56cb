// moxe_torch: sLSTM sequence forward and backward (include/moxe/slstm/sequence.cuh).
#include "common.cuh"
#include "moxe/slstm/sequence.cuh"

namespace moxe_torch {

namespace {

moxe::slstm::Dims check_slstm_inputs(const at::Tensor& wx, const at::Tensor& r, const at::Tensor& bias,
                                     const OptTensor& y_init, const OptTensor& c_init, const OptTensor& n_init,
                                     const OptTensor& m_init) {
  TORCH_CHECK(wx.dim() == 5 && wx.size(2) == 4, "wx must be [S, B, 4, NH, DH], got ", wx.sizes());
  const moxe::slstm::Dims d{wx.size(0), wx.size(1), wx.size(3), wx.size(4)};
  const at::ScalarType dtype = wx.scalar_type();
  check_tensor(wx, "wx", dtype, wx);
  check_tensor(r, "r", dtype, wx, {d.heads, 4, d.head_dim, d.head_dim});
  check_tensor(bias, "bias", dtype, wx, {4, d.heads, d.head_dim});
  check_all_or_none({&y_init, &c_init, &n_init, &m_init}, "y_init, c_init, n_init, m_init");
  const std::vector<int64_t> state{d.batch, d.heads, d.head_dim};
  check_optional(y_init, "y_init", at::kFloat, wx, state);
  check_optional(c_init, "c_init", at::kFloat, wx, state);
  check_optional(n_init, "n_init", at::kFloat, wx, state);
  check_optional(m_init, "m_init", at::kFloat, wx, state);
  return d;
}

template <class T>
moxe::slstm::ForwardParams<T, float> forward_params(const moxe::slstm::Dims& d, const at::Tensor& wx,
                                                    const at::Tensor& r, const at::Tensor& bias,
                                                    const OptTensor& y_init, const OptTensor& c_init,
                                                    const OptTensor& n_init, const OptTensor& m_init,
                                                    int64_t units_per_block) {
  moxe::slstm::ForwardParams<T, float> p{};
  p.dims = d;
  p.wx = ptr<const T>(wx);
  p.r = ptr<const T>(r);
  p.bias = ptr<const T>(bias);
  p.y_init = ptr<const float>(y_init);
  p.c_init = ptr<const float>(c_init);
  p.n_init = ptr<const float>(n_init);
  p.m_init = ptr<const float>(m_init);
  p.units_per_block = static_cast<int>(units_per_block);
  return p;
}

}  // namespace

std::vector<at::Tensor> slstm_sequence_forward(const at::Tensor& wx, const at::Tensor& r, const at::Tensor& bias,
                                               const OptTensor& y_init, const OptTensor& c_init,
                                               const OptTensor& n_init, const OptTensor& m_init,
                                               bool return_last_states, int64_t units_per_block) {
  const moxe::slstm::Dims d = check_slstm_inputs(wx, r, bias, y_init, c_init, n_init, m_init);
  const c10::cuda::CUDAGuard guard(wx.device());
  const auto states = wx.options().dtype(at::kFloat);
  at::Tensor y = at::empty({d.seq_len, d.batch, d.heads, d.head_dim}, wx.options());
  std::vector<at::Tensor> last(4);
  for (auto& t : last) t = empty_if(return_last_states, {d.batch, d.heads, d.head_dim}, states);
  dispatch_element(wx.scalar_type(), "slstm_sequence_forward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    auto p = forward_params<T>(d, wx, r, bias, y_init, c_init, n_init, m_init, units_per_block);
    p.y = ptr<T>(y);
    if (return_last_states) {
      p.y_last = ptr<float>(last[0]);
      p.c_last = ptr<float>(last[1]);
      p.n_last = ptr<float>(last[2]);
      p.m_last = ptr<float>(last[3]);
    }
    const Workspace ws = make_workspace(moxe::slstm::sequence_forward_workspace_size(p), wx);
    check_status(moxe::slstm::sequence_forward(p, ws.ptr(), ws.bytes(), current_stream()),
                 "slstm::sequence_forward");
  });
  return {y, last[0], last[1], last[2], last[3]};
}

std::vector<at::Tensor> slstm_sequence_backward(const at::Tensor& wx, const at::Tensor& r, const at::Tensor& bias,
                                                const OptTensor& y_init, const OptTensor& c_init,
                                                const OptTensor& n_init, const OptTensor& m_init,
                                                const at::Tensor& dy, const OptTensor& dy_last,
                                                const OptTensor& dc_last, const OptTensor& dn_last,
                                                const OptTensor& dm_last, bool init_grads, int64_t units_per_block) {
  const moxe::slstm::Dims d = check_slstm_inputs(wx, r, bias, y_init, c_init, n_init, m_init);
  check_tensor(dy, "dy", wx.scalar_type(), wx, {d.seq_len, d.batch, d.heads, d.head_dim});
  check_all_or_none({&dy_last, &dc_last, &dn_last, &dm_last}, "dy_last, dc_last, dn_last, dm_last");
  const std::vector<int64_t> state{d.batch, d.heads, d.head_dim};
  check_optional(dy_last, "dy_last", at::kFloat, wx, state);
  check_optional(dc_last, "dc_last", at::kFloat, wx, state);
  check_optional(dn_last, "dn_last", at::kFloat, wx, state);
  check_optional(dm_last, "dm_last", at::kFloat, wx, state);
  const c10::cuda::CUDAGuard guard(wx.device());
  const auto states = wx.options().dtype(at::kFloat);
  at::Tensor dwx = at::empty_like(wx), dr = at::empty_like(r), dbias = at::empty_like(bias);
  std::vector<at::Tensor> dinit(4);
  for (auto& t : dinit) t = empty_if(init_grads, {d.batch, d.heads, d.head_dim}, states);
  dispatch_element(wx.scalar_type(), "slstm_sequence_backward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    moxe::slstm::BackwardParams<T, float> b{};
    b.fwd = forward_params<T>(d, wx, r, bias, y_init, c_init, n_init, m_init, units_per_block);
    b.dy = ptr<const T>(dy);
    b.dy_last = ptr<const float>(dy_last);
    b.dc_last = ptr<const float>(dc_last);
    b.dn_last = ptr<const float>(dn_last);
    b.dm_last = ptr<const float>(dm_last);
    b.dwx = ptr<T>(dwx);
    b.dr = ptr<T>(dr);
    b.dbias = ptr<T>(dbias);
    if (init_grads) {
      b.dy_init = ptr<float>(dinit[0]);
      b.dc_init = ptr<float>(dinit[1]);
      b.dn_init = ptr<float>(dinit[2]);
      b.dm_init = ptr<float>(dinit[3]);
    }
    const Workspace ws = make_workspace(moxe::slstm::sequence_backward_workspace_size(b), wx);
    check_status(moxe::slstm::sequence_backward(b, ws.ptr(), ws.bytes(), current_stream()),
                 "slstm::sequence_backward");
  });
  return {dwx, dr, dbias, dinit[0], dinit[1], dinit[2], dinit[3]};
}

}  // namespace moxe_torch
