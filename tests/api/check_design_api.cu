// The public names of DESIGN.md, spelled as a user spells them: host references in double,
// device launchers in float and bf16 (every entry point is instantiated), Params filled in
// the documented field order. Runs on the host: launchers must reject bad input before
// touching the device, so this test needs no GPU (CTest label cpu).
#include <doctest/doctest.h>

#include <cmath>
#include <vector>

#include "moxe/moxe.cuh"

using moxe::Status;

namespace {

template <class V>
bool finite(const V& v) {
  for (double x : v)
    if (!std::isfinite(x)) return false;
  return true;
}

}  // namespace

TEST_CASE("mlstm: DESIGN names, double reference, device validation") {
  const moxe::mlstm::Dims d{1, 2, 5, 4, 3};
  const size_t nqk = 1 * 2 * 5 * 4, nv = 1 * 2 * 5 * 3, ng = 1 * 2 * 5;
  std::vector<double> q(nqk, 0.1), k(nqk, -0.2), v(nv, 0.3), ig(ng, 0.5), fg(ng, 2.0), h(nv);
  for (size_t i = 0; i < nqk; ++i) q[i] += 0.01 * i;
  moxe::mlstm::ForwardParams<double, double> f{d, q.data(), k.data(), v.data(), ig.data(), fg.data()};
  f.h = h.data();
  CHECK(moxe::mlstm::reference::forward(f) == Status::ok);
  CHECK(finite(h));

  std::vector<double> dh(nv, 1.0), dq(nqk), dk(nqk), dv(nv), di(ng), df(ng);
  moxe::mlstm::BackwardParams<double, double> b{f, dh.data()};
  b.dq = dq.data(); b.dk = dk.data(); b.dv = dv.data(); b.digate = di.data(); b.dfgate = df.data();
  CHECK(moxe::mlstm::reference::backward(b) == Status::ok);
  CHECK(finite(dq));

  moxe::mlstm::ForwardParams<float> ff{};
  ff.dims = {8, 16, 8192, 128, 256};
  CHECK(moxe::mlstm::chunkwise_forward_workspace_size(ff) > 0);  // reads sizes only
  CHECK(moxe::mlstm::chunkwise_tape_size(ff) > 0);  // the optional forward tape
  CHECK(moxe::mlstm::chunkwise_forward(ff, nullptr, 0, nullptr) == Status::invalid_argument);
  moxe::mlstm::ForwardParams<__nv_bfloat16> fb{};
  fb.dims = ff.dims;
  moxe::mlstm::BackwardParams<__nv_bfloat16> bb{};
  bb.fwd = fb;
  (void)moxe::mlstm::chunkwise_backward_workspace_size(bb);
  CHECK(moxe::mlstm::chunkwise_forward(fb, nullptr, 0, nullptr) == Status::invalid_argument);
  CHECK(moxe::mlstm::chunkwise_backward(bb, nullptr, 0, nullptr) == Status::invalid_argument);
  moxe::mlstm::StepParams<__nv_bfloat16> sp{};
  CHECK(moxe::mlstm::step(sp, nullptr, 0, nullptr) == Status::invalid_argument);
}

TEST_CASE("slstm: DESIGN names, double reference, device validation") {
  const moxe::slstm::Dims d{3, 2, 2, 4};  // seq_len, batch, heads, head_dim
  const size_t H = 2 * 4;
  std::vector<double> wx(3 * 2 * 4 * H, 0.1), r(2 * 4 * 4 * 4, 0.05), bias(4 * H, 0.0), y(3 * 2 * H);
  for (size_t i = 0; i < wx.size(); ++i) wx[i] = 0.01 * double(i % 17) - 0.08;
  moxe::slstm::ForwardParams<double, double> f{d, wx.data(), r.data(), bias.data()};
  f.y = y.data();
  CHECK(moxe::slstm::reference::forward(f) == Status::ok);
  CHECK(finite(y));
  std::vector<double> dy(y.size(), 1.0), dwx(wx.size()), dr(r.size()), dbias(bias.size());
  moxe::slstm::BackwardParams<double, double> b{f, dy.data()};
  b.dwx = dwx.data(); b.dr = dr.data(); b.dbias = dbias.data();
  CHECK(moxe::slstm::reference::backward(b) == Status::ok);
  CHECK(finite(dr));

  moxe::slstm::ForwardParams<__nv_bfloat16> fb{};
  fb.dims = {1024, 16, 4, 128};
  (void)moxe::slstm::sequence_forward_workspace_size(fb);
  CHECK(moxe::slstm::sequence_forward(fb, nullptr, 0, nullptr) == Status::invalid_argument);
  moxe::slstm::BackwardParams<float> bf{};
  bf.fwd.dims = {1024, 16, 4, 128};
  (void)moxe::slstm::sequence_backward_workspace_size(bf);
  CHECK(moxe::slstm::sequence_backward(bf, nullptr, 0, nullptr) == Status::invalid_argument);
  moxe::slstm::StepParams<float> sp{};
  CHECK(moxe::slstm::step(sp, nullptr, 0, nullptr) == Status::invalid_argument);
}

TEST_CASE("router: DESIGN names, double reference, device validation") {
  const int T = 3, E = 4, K = 2;
  std::vector<double> z{0.1, -0.3, 0.7, 0.2, 1.1, 0.0, -0.5, 0.4, -0.2, 0.3, 0.9, -1.0};
  std::vector<double> a{0.5, -1.0, 2.0}, probs(T * E), lse(T), ent(T), diff(T);
  std::vector<int32_t> idx(T * K), counts(E);
  std::vector<double> tp(T * K), tw(T * K), losses(4);
  moxe::router::GateForwardParams<double, double> f{
      {T, E, E / 2, K}, z.data(), a.data(), moxe::router::Modulation::standard, 1.0, 0.5,
      probs.data(), lse.data(), ent.data(), diff.data(), idx.data(), tp.data(), tw.data(),
      counts.data(), losses.data()};
  CHECK(moxe::router::reference::gate_forward(f) == Status::ok);
  CHECK(finite(losses));
  std::vector<double> dw(T * K, 0.5), dz(T * E), da(T);
  moxe::router::GateBackwardParams<double, double> b{f, dw.data(), 0.001, 0.01, 0.01, 0.01, dz.data(), da.data()};
  CHECK(moxe::router::reference::gate_backward(b) == Status::ok);
  CHECK(finite(dz));

  moxe::router::GateForwardParams<__nv_bfloat16> fb{};
  fb.dims = {65536, 8, 4, 2};
  (void)moxe::router::gate_forward_workspace_size(fb);
  CHECK(moxe::router::gate_forward(fb, nullptr, 0, nullptr) == Status::invalid_argument);
  moxe::router::GateBackwardParams<float> bf{};
  bf.fwd.dims = {65536, 8, 4, 2};
  (void)moxe::router::gate_backward_workspace_size(bf);
  CHECK(moxe::router::gate_backward(bf, nullptr, 0, nullptr) == Status::invalid_argument);
  fb.dims = {16, 4, 2, 5};  // k > E
  CHECK(moxe::router::gate_forward(fb, nullptr, 0, nullptr) == Status::invalid_argument);
}

TEST_CASE("dispatch: DESIGN names, double reference, device validation") {
  const moxe::dispatch::Dims d{3, 2, 4, 2};  // tokens, hidden, experts, top_k
  std::vector<int32_t> topk{0, 2, 2, -1, 3, 0};
  std::vector<int64_t> row_map(6), offsets(5);
  std::vector<int32_t> counts(4);
  moxe::dispatch::RoutingMapParams m{d, topk.data(), row_map.data(), offsets.data(), counts.data()};
  CHECK(moxe::dispatch::reference::routing_map(m) == Status::ok);
  CHECK(offsets[4] == 5);
  std::vector<double> x{1, 2, 3, 4, 5, 6}, xp(2 * offsets[4]), dx(6), y(6), w{0.6, 0.4, 1.0, 0.0, 0.3, 0.7};
  CHECK(moxe::dispatch::reference::permute(moxe::dispatch::PermuteParams<double>{d, x.data(), row_map.data(), offsets.data(), xp.data()}) == Status::ok);
  CHECK(moxe::dispatch::reference::permute_backward(moxe::dispatch::PermuteBackwardParams<double>{d, xp.data(), row_map.data(), dx.data()}) == Status::ok);
  moxe::dispatch::UnpermuteParams<double, double> u{d, xp.data(), row_map.data(), w.data(), y.data()};
  CHECK(moxe::dispatch::reference::unpermute(u) == Status::ok);
  std::vector<double> dyv(6, 1.0), dyp(xp.size()), dwv(6);
  CHECK(moxe::dispatch::reference::unpermute_backward(moxe::dispatch::UnpermuteBackwardParams<double, double>{u, dyv.data(), dyp.data(), dwv.data()}) == Status::ok);
  CHECK(y[0] == doctest::Approx(1.0));

  moxe::dispatch::Dims big{65536, 7168, 256, 8};
  moxe::dispatch::RoutingMapParams mb{big, nullptr, nullptr, nullptr, nullptr};
  (void)moxe::dispatch::routing_map_workspace_size(mb);
  CHECK(moxe::dispatch::routing_map(mb, nullptr, 0, nullptr) == Status::invalid_argument);
  moxe::dispatch::PermuteParams<__nv_bfloat16> pb{big, nullptr, nullptr, nullptr, nullptr};
  (void)moxe::dispatch::permute_workspace_size(pb);
  CHECK(moxe::dispatch::permute(pb, nullptr, 0, nullptr) == Status::invalid_argument);
  moxe::dispatch::PermuteBackwardParams<float> pbb{big, nullptr, nullptr, nullptr};
  CHECK(moxe::dispatch::permute_backward(pbb, nullptr, 0, nullptr) == Status::invalid_argument);
  moxe::dispatch::UnpermuteParams<__nv_bfloat16> ub{big, nullptr, nullptr, nullptr, nullptr};
  CHECK(moxe::dispatch::unpermute(ub, nullptr, 0, nullptr) == Status::invalid_argument);
  moxe::dispatch::UnpermuteBackwardParams<float> ubb{};
  ubb.fwd.dims = big;
  CHECK(moxe::dispatch::unpermute_backward(ubb, nullptr, 0, nullptr) == Status::invalid_argument);
}
