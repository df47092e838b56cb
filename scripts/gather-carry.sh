#!/usr/bin/env bash
# Gather what a lent GPU machine lacks (it has no network): doctest (headers and CMake
# package) and the Google Benchmark source, into .carry/ (ignored by git). Pass .carry in
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
du -sh "$carry"
