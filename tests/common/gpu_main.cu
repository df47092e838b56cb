// doctest main for the device (`gpu`) test executables: with no usable CUDA device the
// executable exits with kSkipReturnCode, which CTest reports as skipped.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <cstdio>

#include "device_utils.cuh"

namespace {
constexpr int kSkipReturnCode = 77;
}

int main(int argc, char** argv) {
  if (!moxe::test::device_available()) {
    std::printf("no CUDA device: skipped\n");
    return kSkipReturnCode;
  }
  doctest::Context context(argc, argv);
  return context.run();
}
