#!/usr/bin/env bash
# Gather what a lent GPU machine lacks (it has no network): doctest (headers and CMake
# package), the Google Benchmark source and the mlstm_kernels wheel, into .carry/ (ignored
# by git). Pass .carry in
# the device tool's `carry` list; scripts/gpu-check.sh builds Google Benchmark there.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
carry=.carry
mkdir -p "$carry/prefix/include" "$carry/prefix/lib/cmake" "$carry/src"

if [ ! -f /usr/include/doctest/doctest.h ]; then
  apt-get update -qq && apt-get install -y -qq doctest-dev
fi
cp -r /usr/include/doctest "$carry/prefix/include/"
cp -r /usr/lib/cmake/doctest "$carry/prefix/lib/cmake/"

if ! ls "$carry"/src/benchmark_*.orig.tar.gz >/dev/null 2>&1; then
  tmp=$(mktemp -d)
  cat >"$tmp/src.sources" <<SRC
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  mkdir -p "$tmp/lists/partial"
  opts=(-o Dir::Etc::SourceList="$tmp/src.sources" -o Dir::Etc::SourceParts=/dev/null -o Dir::State::Lists="$tmp/lists")
  apt-get "${opts[@]}" update -qq
  (cd "$carry/src" && apt-get "${opts[@]}" source --download-only benchmark)
  rm -rf "$tmp"
fi
# NX-AI's mlstm_kernels (pure Python, Triton kernels): benchmarks/compare_torch.py times it
# beside moxe; its dependencies (torch, triton, einops, numpy, ...) are on the GPU machine.
mkdir -p "$carry/wheels"
if ! ls "$carry"/wheels/mlstm_kernels-*.whl >/dev/null 2>&1; then
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$carry/wheels" mlstm_kernels==2.0.6 ||
    echo "gather-carry: mlstm_kernels did not download (compare_torch.py leaves its column empty)"
fi

du -sh "$carry"
