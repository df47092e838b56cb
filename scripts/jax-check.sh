#!/usr/bin/env bash
# The JAX bindings (bindings/jax) from a fresh machine to a test result, in one command:
#
#   scripts/jax-check.sh [pytest args...]
#
# 1. a virtual environment under the build directory with the pinned jax[cpu], flax and
#    pytest from PyPI (kept between runs; rebuilt when the pins below change);
# 2. the handler libraries and the moxe_jax package (CMake, -DMOXE_BUILD_JAX=ON; the CUDA
#    handlers too where nvcc is found: they compile, and run only where a GPU and a CUDA
#    jax are present);
# 3. the C++ host MoxE layer (examples/moxe_layer, host path) for the layer comparison;
# 4. pytest over bindings/jax/tests: every op and its gradient against pure-JAX float64
#    definitions, check_grads, errors, and the Flax layer against the C++ host layer.
# Exits non-zero when anything fails. Environment: MOXE_JAX_BUILD_DIR (default build-jax),
# PYTHON (the interpreter that makes the venv, default python3), MOXE_JAX_JOBS (build jobs),
# MOXE_JAX_CUDA=OFF (skip the CUDA handlers even where nvcc is found).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
build=${MOXE_JAX_BUILD_DIR:-$root/build-jax}
jobs=${MOXE_JAX_JOBS:-$(nproc)}
start=$(date +%s)
mkdir -p "$build"

# Pins: the jax of the FFI API the handlers are written against (jax.ffi, XLA FFI headers
# in jaxlib/include), and a flax of the nnx API the layer uses.
pins="jax[cpu]==0.10.2 flax==0.12.8 pytest==9.2.0"

echo "== python environment ($build/venv)"
venv=$build/venv
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$venv/.moxe-pins" 2>/dev/null)" != "$pins" ]; then
  rm -rf "$venv"
  "${PYTHON:-python3}" -m venv "$venv"
  # shellcheck disable=SC2086
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check $pins
  echo "$pins" > "$venv/.moxe-pins"
fi
"$venv/bin/python" -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__)"

echo "== build (handlers, package, host moxe_layer)"
cmake -S "$root" -B "$build/cmake" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DMOXE_BUILD_JAX=ON -DMOXE_JAX_PYTHON="$venv/bin/python" -DMOXE_ENABLE_CUDA="${MOXE_JAX_CUDA:-ON}" \
  -DMOXE_BUILD_TESTS=OFF -DMOXE_BUILD_BENCHMARKS=OFF -DMOXE_BUILD_EXAMPLES=OFF >"$build/cmake-configure.log" \
  || { cat "$build/cmake-configure.log"; exit 1; }
grep "moxe_jax" "$build/cmake-configure.log" || true
cmake --build "$build/cmake" --target moxe_jax -j "$jobs"
# the host reference path of the layer example: plain C++, no CUDA needed
layer_bin=$build/moxe_layer_host
if [ ! -x "$layer_bin" ] || [ -n "$(find "$root/examples/moxe_layer" "$root/include" -newer "$layer_bin" -print -quit)" ]; then
  "${CXX:-g++}" -std=c++17 -O2 -I "$root/include" "$root/examples/moxe_layer/main.cpp" -o "$layer_bin"
fi

echo "== tests"
export PYTHONPATH=$build/cmake/bindings/jax/python
export MOXE_LAYER_BIN=$layer_bin
unset MOXE_JAX_LIBRARY_DIR MOXE_LAYER_DUMP
rc=0
"$venv/bin/python" -m pytest -q -p no:cacheprovider "$root/bindings/jax/tests" "$@" || rc=$?
echo "jax-check: $(( $(date +%s) - start )) s, pytest exit $rc"
exit $rc
