#!/usr/bin/env bash
# Install what a fresh Debian/Ubuntu machine lacks to build and test moxe: a C++17 compiler,
# CMake >= 3.25, Ninja, doctest, Google Benchmark, and python3 with venv (the JAX tests).
# The CUDA toolkit is not installed here: without nvcc the host references and CPU tests
# still build and run.
set -euo pipefail
need=()
[ -f /usr/include/doctest/doctest.h ] || need+=(doctest-dev)
[ -f /usr/include/benchmark/benchmark.h ] || need+=(libbenchmark-dev)
command -v ninja >/dev/null || need+=(ninja-build)
command -v cmake >/dev/null || need+=(cmake)
command -v g++ >/dev/null || need+=(g++)
# scripts/jax-check.sh makes a virtual environment (python3 -m venv, with pip)
command -v python3 >/dev/null || need+=(python3)
python3 -c "import venv, ensurepip" 2>/dev/null || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}"
fi
