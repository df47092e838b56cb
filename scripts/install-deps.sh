#!/usr/bin/env bash
# Install what a fresh Debian/Ubuntu machine lacks to build and test moxe: a C++17 compiler,
# CMake >= 3.25, Ninja, doctest and Google Benchmark. The CUDA toolkit is not installed
# here: without nvcc the host references and CPU tests still build and run.
set -euo pipefail
need=()
[ -f /usr/include/doctest/doctest.h ] || need+=(doctest-dev)
[ -f /usr/include/benchmark/benchmark.h ] || need+=(libbenchmark-dev)
command -v ninja >/dev/null || need+=(ninja-build)
command -v cmake >/dev/null || need+=(cmake)
command -v g++ >/dev/null || need+=(g++)
if [ ${#need[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}"
fi
