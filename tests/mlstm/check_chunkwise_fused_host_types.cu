// The fused host twin with the device's element types (bf16 and half inputs and outputs,
// float states): T = __nv_bfloat16 / __half, the operand format taken from T, against the
// same run in float storage emulating the format (chunkwise_fused_host::forward<Fmt> on
// float inputs on T's grid, the way the host tests run it). The only difference is the
// store: rounding the emulation's float outputs to T must give the same bits, for both
// Precision modes, so the emulation's roundings (precision.hpp's float bit arithmetic)
// are the conversions of cuda_fp16.h / cuda_bf16.h. Runs on the host (nvcc compiles it
// for the types; CTest label cpu).
#include <doctest/doctest.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>
#include <vector>

#include "device_utils.cuh"
#include "moxe/core/precision.hpp"
#include "moxe/mlstm/chunkwise_fused_host.hpp"
#include "test_utils.hpp"

namespace mlstm = moxe::mlstm;
namespace mt = moxe::test;
using moxe::Precision;
using moxe::Status;

namespace {

template <class T>
float as_float(T x) {
  return static_cast<float>(x);
}

/// Element-wise equality of T outputs with float outputs rounded to T (bit patterns).
template <class T>
int64_t mismatches(const std::vector<T>& got, const std::vector<float>& emulated) {
  int64_t bad = 0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    const float e = moxe::round_to<T>(emulated[i]);
    if (moxe::float_bits(as_float(got[i])) != moxe::float_bits(e)) ++bad;
  }
  return bad;
}

template <class T>
void check(mt::Rng& rng, Precision precision, int64_t seq, int chunk, const std::vector<int64_t>& offsets) {
  CAPTURE(seq);
  CAPTURE(chunk);
  CAPTURE(static_cast<int>(precision));
  const int64_t batch = 1, heads = 2, dqk = 24, dv = 20, rows = batch * heads * seq;
  const int64_t segments = offsets.empty() ? 0 : static_cast<int64_t>(offsets.size()) - 1;
  const int64_t slots = (segments > 0 ? segments : batch) * heads;
  auto grid = [&](std::vector<double> v) { return mt::round_through<T>(v); };
  const auto q = grid(mt::normal_vector<double>(rng, rows * dqk)), k = grid(mt::normal_vector<double>(rng, rows * dqk));
  const auto v = grid(mt::normal_vector<double>(rng, rows * dv)), dh = grid(mt::normal_vector<double>(rng, rows * dv));
  const auto ig = grid(mt::uniform_vector<double>(rng, rows, -3.0, 3.0));
  const auto fg = grid(mt::uniform_vector<double>(rng, rows, -2.0, 6.0));
  const auto c0 = mt::uniform_vector<float>(rng, slots * dqk * dv), n0 = mt::uniform_vector<float>(rng, slots * dqk);
  const auto m0 = mt::uniform_vector<float>(rng, slots), dcl = mt::uniform_vector<float>(rng, slots * dqk * dv);
  const auto dnl = mt::uniform_vector<float>(rng, slots * dqk), dml = mt::uniform_vector<float>(rng, slots);

  // the same inputs as T and as float
  const auto qt = mt::convert_to<T>(q), kt = mt::convert_to<T>(k), vt = mt::convert_to<T>(v);
  const auto igt = mt::convert_to<T>(ig), fgt = mt::convert_to<T>(fg), dht = mt::convert_to<T>(dh);
  auto f32 = [](const std::vector<double>& x) { return std::vector<float>(x.begin(), x.end()); };
  const auto qf = f32(q), kf = f32(k), vf = f32(v), igf = f32(ig), fgf = f32(fg), dhf = f32(dh);

  auto params = [&](auto* tag, const auto& qq, const auto& kk, const auto& vv, const auto& ii, const auto& ff) {
    using X = std::remove_pointer_t<decltype(tag)>;
    mlstm::ForwardParams<X, float> p{};
    p.dims = mlstm::Dims{batch, heads, seq, dqk, dv};
    p.q = qq.data(), p.k = kk.data(), p.v = vv.data(), p.igate = ii.data(), p.fgate = ff.data();
    p.c_init = c0.data(), p.n_init = n0.data(), p.m_init = m0.data();
    p.chunk_size = chunk;
    p.precision = precision;
    if (segments > 0) {
      p.segment_offsets = offsets.data();
      p.num_segments = segments;
    }
    return p;
  };
  auto pt = params(static_cast<T*>(nullptr), qt, kt, vt, igt, fgt);
  auto pf = params(static_cast<float*>(nullptr), qf, kf, vf, igf, fgf);
  std::vector<T> ht(rows * dv);
  std::vector<float> hf(rows * dv), cl_t(slots * dqk * dv), cl_f(slots * dqk * dv), nl_t(slots * dqk),
      nl_f(slots * dqk), ml_t(slots), ml_f(slots);
  pt.h = ht.data(), pt.c_last = cl_t.data(), pt.n_last = nl_t.data(), pt.m_last = ml_t.data();
  pf.h = hf.data(), pf.c_last = cl_f.data(), pf.n_last = nl_f.data(), pf.m_last = ml_f.data();
  REQUIRE(mlstm::chunkwise_fused_host::forward(pt) == Status::ok);
  REQUIRE(mlstm::chunkwise_fused_host::forward<T>(pf) == Status::ok);
  CHECK(mismatches(ht, hf) == 0);
  CHECK(cl_t == cl_f);  // states stay float: the same numbers
  CHECK(nl_t == nl_f);
  CHECK(ml_t == ml_f);

  std::vector<T> dqt(rows * dqk), dkt(rows * dqk), dvt(rows * dv), dit(rows), dft(rows);
  std::vector<float> dqf(rows * dqk), dkf(rows * dqk), dvf(rows * dv), dif(rows), dff(rows);
  std::vector<float> dc_t(slots * dqk * dv), dc_f(slots * dqk * dv), dn_t(slots * dqk), dn_f(slots * dqk),
      dm_t(slots), dm_f(slots);
  auto grads = [&](auto p, const auto& dhx, auto& dq, auto& dk, auto& dvx, auto& di, auto& df, auto& dc, auto& dn,
                   auto& dm) {
    mlstm::BackwardParams<typename std::decay_t<decltype(dq)>::value_type, float> b{};
    b.fwd = p;
    b.dh = dhx.data();
    b.dc_last = dcl.data(), b.dn_last = dnl.data(), b.dm_last = dml.data();
    b.dq = dq.data(), b.dk = dk.data(), b.dv = dvx.data(), b.digate = di.data(), b.dfgate = df.data();
    b.dc_init = dc.data(), b.dn_init = dn.data(), b.dm_init = dm.data();
    return b;
  };
  REQUIRE(mlstm::chunkwise_fused_host::backward(grads(pt, dht, dqt, dkt, dvt, dit, dft, dc_t, dn_t, dm_t)) ==
          Status::ok);
  REQUIRE(mlstm::chunkwise_fused_host::backward<T>(grads(pf, dhf, dqf, dkf, dvf, dif, dff, dc_f, dn_f, dm_f)) ==
          Status::ok);
  CHECK(mismatches(dqt, dqf) == 0);
  CHECK(mismatches(dkt, dkf) == 0);
  CHECK(mismatches(dvt, dvf) == 0);
  CHECK(mismatches(dit, dif) == 0);
  CHECK(mismatches(dft, dff) == 0);
  CHECK(dc_t == dc_f);
  CHECK(dn_t == dn_f);
  CHECK(dm_t == dm_f);
}

}  // namespace

TEST_CASE_TEMPLATE("fused host twin with T = bf16 / half equals its float emulation, stored to T", T, __nv_bfloat16,
                   __half) {
  const auto seed = mt::fresh_seed();
  INFO("seed " << seed);
  MESSAGE("seed " << seed);
  mt::Rng rng(seed);
  for (Precision precision : {Precision::fast, Precision::accurate}) {
    check<T>(rng, precision, 1, 16, {});
    check<T>(rng, precision, 45, 16, {});
    check<T>(rng, precision, 70, 32, {0, 1, 18, 18, 70});
  }
}
