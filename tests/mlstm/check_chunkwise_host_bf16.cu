// The host chunkwise path with the device's element types (bf16, half inputs; float
// states): the arithmetic the device's tensor-core tiles run (3xTF32 products, the
// operands the ops declare exact in TF32 taken without their low part), checked against
// the recurrent reference in double on the same rounded inputs, forward and backward.
// The host path verifies each exactness claim (chunkwise_phase_host returns unsupported if an
// operand declared exact is not), so a wrong claim fails here. Runs on the host (nvcc
// compiles it for the bf16 type; CTest label cpu).
#include <doctest/doctest.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "device_utils.cuh"
#include "mlstm_testing.hpp"
#include "moxe/mlstm/chunkwise_phase_host.hpp"
#include "moxe/mlstm/reference.hpp"
#include "test_utils.hpp"

namespace mlstm = moxe::mlstm;
namespace mt = moxe::test;
using moxe::Status;

namespace {

template <class T>
void check(mt::Rng& rng, int64_t batch, int64_t heads, int64_t seq, int64_t dqk, int64_t dv, int chunk,
           bool check_dqk = true) {
  CAPTURE(seq);
  CAPTURE(chunk);
  const int64_t rows = batch * heads * seq;
  // inputs on T's grid, the same numbers for both paths
  auto q = mt::round_through<T>(mt::normal_vector<double>(rng, rows * dqk));
  auto k = mt::round_through<T>(mt::normal_vector<double>(rng, rows * dqk));
  auto v = mt::round_through<T>(mt::normal_vector<double>(rng, rows * dv));
  auto ig = mt::round_through<T>(mt::uniform_vector<double>(rng, rows, -3.0, 3.0));
  auto fg = mt::round_through<T>(mt::uniform_vector<double>(rng, rows, -2.0, 6.0));
  auto dh = mt::round_through<T>(mt::normal_vector<double>(rng, rows * dv));
  const auto qe = mt::convert_to<T>(q), ke = mt::convert_to<T>(k), ve = mt::convert_to<T>(v);
  const auto ige = mt::convert_to<T>(ig), fge = mt::convert_to<T>(fg), dhe = mt::convert_to<T>(dh);

  mlstm::ForwardParams<T, float> p{};
  p.dims = mlstm::Dims{batch, heads, seq, dqk, dv};
  p.q = qe.data();
  p.k = ke.data();
  p.v = ve.data();
  p.igate = ige.data();
  p.fgate = fge.data();
  std::vector<T> h(rows * dv);
  p.h = h.data();
  p.chunk_size = chunk;
  REQUIRE(mlstm::chunkwise_phase_host::forward(p) == Status::ok);

  mlstm::ForwardParams<double, double> r{};
  r.dims = p.dims;
  r.q = q.data();
  r.k = k.data();
  r.v = v.data();
  r.igate = ig.data();
  r.fgate = fg.data();
  std::vector<double> h_ref(rows * dv);
  r.h = h_ref.data();
  REQUIRE(mlstm::reference::forward(r) == Status::ok);
  CHECK(mt::rel_error(mt::convert_to_double(h), h_ref) < 1e-2);  // h rounded to T once

  std::vector<T> dq(rows * dqk), dk(rows * dqk), dvv(rows * dv), di(rows), df(rows);
  mlstm::BackwardParams<T, float> b{};
  b.fwd = p;
  b.dh = dhe.data();
  b.dq = dq.data();
  b.dk = dk.data();
  b.dv = dvv.data();
  b.digate = di.data();
  b.dfgate = df.data();
  REQUIRE(mlstm::chunkwise_phase_host::backward(b) == Status::ok);
  std::vector<double> rdq(dq.size()), rdk(dk.size()), rdv(dvv.size()), rdi(rows), rdf(rows);
  mlstm::BackwardParams<double, double> rb{};
  rb.fwd = r;
  rb.dh = dh.data();
  rb.dq = rdq.data();
  rb.dk = rdk.data();
  rb.dv = rdv.data();
  rb.digate = rdi.data();
  rb.dfgate = rdf.data();
  REQUIRE(mlstm::reference::backward(rb) == Status::ok);
  if (check_dqk) {
    CHECK(mt::rel_error(mt::convert_to_double(dq), rdq) < 1e-2);
    CHECK(mt::rel_error(mt::convert_to_double(dk), rdk) < 1e-2);
  }
  CHECK(mt::rel_error(mt::convert_to_double(dvv), rdv) < 1e-2);
  CHECK(mt::rel_error(mt::convert_to_double(di), rdi) < 1e-2);
  if (check_dqk) {
    CHECK(mt::rel_error(mt::convert_to_double(df), rdf) < 1e-2);
  } else {  // length 1: dfgate is a difference of terms the size of digate (mt::dfgate_error)
    CHECK(mt::dfgate_error(mt::convert_to_double(df), rdf, rdi) < 1e-2);
  }
}

}  // namespace

TEST_CASE_TEMPLATE("chunkwise host with bf16 and half inputs: the device's tile arithmetic == reference", T,
                   __nv_bfloat16, __half) {
  mt::Rng rng(mt::fresh_seed());
  check<T>(rng, 2, 2, 37, 16, 32, 16);   // partial last chunk
  check<T>(rng, 1, 3, 64, 32, 16, 64);   // one full chunk
  // sequences of size 1: h, dv, digate, and dfgate on digate's scale. On the |n.q| branch of the normaliser
  // the gradient of q and k at a sequence's first position is eps / den^2 times terms of
  // size 1, which float arithmetic (this path's and the device's) gets as a difference of
  // those terms: an absolute error ~1e-7, so no relative accuracy (docs/mlstm.md,
  // "Precision"; mlstm::per_token_* computes length-1 sequences without the difference).
  check<T>(rng, 6, 3, 1, 16, 16, 16, /*check_dqk=*/false);
  check<T>(rng, 2, 1, 150, 48, 64, 32);  // several chunks
}
