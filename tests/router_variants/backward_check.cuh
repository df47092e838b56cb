// The backward half of the routing-variant device tests: from the forward params of the
// double reference (holding the device's selection) and of the device, both backwards
// with the same dweight; the device gradient against the reference's, then bitwise the
// same on a rerun.
#pragma once

#include <doctest/doctest.h>

#include <cmath>
#include <type_traits>
#include <vector>

#include "device_check.hpp"
#include "device_utils.cuh"
#include "moxe/core/status.hpp"
#include "test_utils.hpp"

namespace moxe::test::variants {

/// Relative error of a device gradient against the double reference (bf16: its rounding).
template <class T>
double backward_tolerance() { return std::is_same_v<T, float> ? 2e-5 : 1e-2; }

inline double l2_norm(const std::vector<double>& v) {
  double s = 0.0;
  for (double x : v) s += x * x;
  return std::sqrt(s);
}

/// BackwardParams<A, Acc> is the variant's {fwd, dweight, dlogits} struct; reference(b)
/// and device(b) run its host reference and its device launcher.
template <template <class, class> class BackwardParams, class T, class RefForward, class DevForward, class Reference,
          class Device>
void check_backward(const RefForward& ref_fwd, const DevForward& dev_fwd, const std::vector<double>& dweight,
                    DeviceBuffer<T>& dgrad, Reference reference, Device device) {
  std::vector<double> want(dgrad.size());
  REQUIRE(reference(BackwardParams<double, double>{ref_fwd, dweight.data(), want.data()}) == Status::ok);
  DeviceBuffer<float> ddw(convert_to<float>(dweight));
  const BackwardParams<T, float> b{dev_fwd, ddw.get(), dgrad.get()};
  REQUIRE(device(b) == Status::ok);
  const auto got_grad = dgrad.download();
  const auto got = convert_to_double(got_grad);
  // An identically zero gradient (renormalised weights over one chosen expert are 1 whatever
  // the logits) leaves only rounding residue, ~1e-16 |dweight| in the double reference, where
  // a relative error means nothing: there the device's must be float residue (a few 2^-24).
  // Otherwise against the reference as stored in T: half's gradients below its range (2^-24;
  // a sigmoid's e^-z past z ~ 17) round to 0 or to a few subnormal steps, as a kernel must
  // store them, where the double reference keeps their digits.
  const double dw_norm = l2_norm(dweight);
  if (l2_norm(want) <= 1e-12 * dw_norm)
    CHECK(l2_norm(got) <= 16 * 0x1p-24 * dw_norm);
  else
    CHECK(rel_error(got, round_through<T>(want)) < backward_tolerance<T>());
  REQUIRE(device(b) == Status::ok);
  CHECK(bitwise_equal(dgrad.download(), got_grad));
}

}  // namespace moxe::test::variants
