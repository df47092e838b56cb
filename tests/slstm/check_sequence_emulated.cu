// The problems of the sLSTM device backward test (tests/slstm/test_sequence.cu: the same
// shapes, draws and tolerances) run through a host emulation of the kernels' arithmetic in
// T (slstm_emulation.hpp: the product operands and the outputs rounded to bf16 / half where
// the kernels hold them) and compared with the reference in double as the device test
// compares. It shows the test's comparison holds for the device's rounding over many seeds,
// without a GPU: MOXE_TEST_SEEDS=N runs N consecutive seeds from the printed first one
// (MOXE_TEST_SEED pins it; a seed here replays the device test's backward case). Runs on
// the host (nvcc compiles it for the bf16 and half types; CTest label cpu).
#include <doctest/doctest.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstdlib>
#include <vector>

#include "moxe/slstm/detail/plan.hpp"
#include "sequence_problem.cuh"
#include "slstm_emulation.hpp"
#include "test_utils.hpp"

namespace {

namespace sl = moxe::slstm;
namespace mt = moxe::test;

std::vector<float> as_float(const std::vector<double>& v) { return std::vector<float>(v.begin(), v.end()); }

/// The emulated device forward and backward of `pb` against the reference, with the device
/// test's tolerances; true when every comparison passes.
template <class T>
bool emulated_case_passes(const mt::SequenceProblem<T>& pb, bool upstream, int units) {
  const int64_t U = pb.units();
  const std::vector<float> wx = as_float(pb.wx), r = as_float(pb.r), bias = as_float(pb.bias), dy = as_float(pb.dy),
                           y0 = as_float(pb.y0), c0 = as_float(pb.c0), n0 = as_float(pb.n0), m0 = as_float(pb.m0),
                           dyl = as_float(pb.dy_last), dcl = as_float(pb.dc_last), dnl = as_float(pb.dn_last),
                           dml = as_float(pb.dm_last);
  const float* none = nullptr;
  const bool init = pb.init;
  const mt::SequenceInputs<float, float> in{pb.d,
                                            wx.data(), r.data(), bias.data(),
                                            init ? y0.data() : none, init ? c0.data() : none,
                                            init ? n0.data() : none, init ? m0.data() : none,
                                            dy.data(),
                                            upstream ? dyl.data() : none, upstream ? dcl.data() : none,
                                            upstream ? dnl.data() : none, upstream ? dml.data() : none};
  if (units == 0)
    units = sl::detail::choose_units(pb.d.head_dim, static_cast<int>(sizeof(T)), !std::is_same_v<T, float>,
                                     /*backward=*/true, 227 * 1024, 0);
  REQUIRE(units > 0);
  const mt::SlstmEmulation e =
      mt::emulate_slstm_device(in, units, [](float x) { return moxe::to_float(moxe::from_float<T>(x)); });

  std::vector<double> y(pb.d.seq_len * U), yl(U), cl(U), nl(U), ml(U);
  REQUIRE(sl::reference::forward(mt::forward_params(pb.host(), y.data(), yl.data(), cl.data(), nl.data(),
                                                    ml.data())) == moxe::Status::ok);
  const mt::ReferenceGradients g = mt::reference_gradients(pb, upstream);
  const double fwd = mt::SlstmTolerance<T>::fwd, bwd = mt::SlstmTolerance<T>::bwd;
  const double errors[][2] = {
      {mt::rel_error(e.y, y), fwd},          {mt::rel_error(e.c_last, cl), fwd},
      {mt::rel_error(e.n_last, nl), fwd},    {mt::rel_error(e.m_last, ml), fwd},
      {mt::rel_error(e.dwx, g.dwx), bwd},    {mt::rel_error(e.dr, g.dr), bwd},
      {mt::rel_error(e.dbias, g.dbias), bwd}, {mt::rel_error(e.dy_init, g.dyi), bwd},
      {mt::rel_error(e.dc_init, g.dci), bwd}, {mt::rel_error(e.dn_init, g.dni), bwd},
      {mt::rel_error(e.dm_init, g.dmi), bwd},
  };
  bool ok = true;
  for (const auto& err : errors) ok = ok && err[0] < err[1];
  return ok;
}

std::uint64_t seed_count() {
  const char* s = std::getenv("MOXE_TEST_SEEDS");
  return s ? std::strtoull(s, nullptr, 10) : 2;
}

}  // namespace

TEST_CASE_TEMPLATE("slstm device backward test, emulated on the host: its problems pass for the device's rounding", T,
                   float, __nv_bfloat16, __half) {
  const std::uint64_t first = mt::fresh_seed(), seeds = seed_count();
  INFO("seeds " << first << " .. " << first + seeds - 1);
  int64_t runs = 0, failed = 0;
  for (std::uint64_t seed = first; seed < first + seeds; ++seed) {
    // the device test's backward case: every shape, then one without upstream gradients
    mt::Rng rng(seed);
    for (const mt::SlstmShape& s : mt::slstm_shapes()) {
      const mt::SequenceProblem<T> pb(rng, s.d, s.init);
      ++runs;
      if (!emulated_case_passes(pb, /*upstream=*/true, s.units)) {
        ++failed;
        MESSAGE("fails: seed " << seed << ", shape S " << s.d.seq_len << " B " << s.d.batch << " NH " << s.d.heads
                               << " DH " << s.d.head_dim);
      }
    }
    const mt::SequenceProblem<T> pb(rng, sl::Dims{7, 5, 2, 32}, true);
    ++runs;
    if (!emulated_case_passes(pb, /*upstream=*/false, 0)) {
      ++failed;
      MESSAGE("fails: seed " << seed << ", no upstream");
    }
  }
  MESSAGE(seeds << " seeds from " << first << ": " << runs - failed << " of " << runs << " shape-runs pass");
  CHECK(failed == 0);
}
