#!/usr/bin/env bash
# Everything a lent GPU machine should run, in one call: build for sm_90, run every test
# (the gpu tests for real), run the device tests under compute-sanitizer (memcheck,
# racecheck), run the benchmarks with the measured ceilings, and leave logs and a short
# summary under $OUT (or ./gpu-check-out).
#
#   scripts/gather-carry.sh                      # here, once: doctest + Google Benchmark source
#   scripts/gpu-check.sh [--quick] [phases...]   # there, with .carry carried along
#
# Phases (default: all, in this order): test, examples, sanitize, bench, torch, compare. The
# build always runs first and is incremental, so a long check can be split over several
# calls of a time-limited machine, e.g. `gpu-check.sh test examples`, then
# `gpu-check.sh sanitize`, then `gpu-check.sh bench`, then `gpu-check.sh torch compare`.
# compare: benchmarks/compare_torch.py (moxe beside PyTorch eager and mlstm_kernels, one
# table in compare.md; the mlstm_kernels wheel comes from .carry/wheels), after checking
# its eager layer against the host reference (moxe_layer --dump).
# --quick skips racecheck, caps each sanitizer run at 60 s and runs the benchmarks with a
# short minimum time.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD
out=${OUT:-$root/gpu-check-out}
mkdir -p "$out"
logs=$(mktemp -d)
quick=0
phases=()
for arg in "$@"; do
  case $arg in
    --quick) quick=1 ;;
    test | examples | sanitize | bench | torch | compare) phases+=("$arg") ;;
    *) echo "usage: $0 [--quick] [test|examples|sanitize|bench|torch|compare ...]" >&2; exit 2 ;;
  esac
done
[ ${#phases[@]} -eq 0 ] && phases=(test examples sanitize bench torch compare)
want() { [[ " ${phases[*]} " == *" $1 "* ]]; }
jobs=$(nproc)
summary=$out/summary.md
: >"$summary"
say() { echo "$*" | tee -a "$summary"; }

say "# moxe gpu-check $(date -u +%Y-%m-%dT%H:%MZ)"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1 | tee "$logs/nvidia-smi.txt" | sed 's/^/device: /' | tee -a "$summary"
nvcc --version | tail -1 | sed 's/^/nvcc: /' | tee -a "$summary"

# ---- dependencies carried from the development machine ----------------------------------
prefix=$root/.carry/prefix
have_benchmark=0
for f in "$prefix"/lib*/cmake/benchmark/benchmarkConfig.cmake /usr/lib/*/cmake/benchmark/benchmarkConfig.cmake; do
  [ -f "$f" ] && have_benchmark=1
done
if [ $have_benchmark -eq 0 ]; then
  src=$(ls "$root"/.carry/src/benchmark_*.orig.tar.gz 2>/dev/null | head -1)
  if [ -n "$src" ]; then
    work=$(mktemp -d)
    tar xzf "$src" -C "$work"
    cmake -S "$work"/benchmark-* -B "$work/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
      -DBENCHMARK_ENABLE_TESTING=OFF -DBENCHMARK_ENABLE_GTEST_TESTS=OFF -DBENCHMARK_ENABLE_WERROR=OFF \
      -DCMAKE_INSTALL_PREFIX="$prefix" >"$logs/benchmark-build.log" 2>&1 &&
      cmake --build "$work/build" -j "$jobs" >>"$logs/benchmark-build.log" 2>&1 &&
      cmake --install "$work/build" >>"$logs/benchmark-build.log" 2>&1 ||
      say "warning: Google Benchmark did not build (see benchmark-build.log)"
  else
    say "warning: no Google Benchmark: run scripts/gather-carry.sh and carry .carry"
  fi
fi

# ---- build ------------------------------------------------------------------------------
build=$root/build-gpu
t0=$(date +%s)
cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90 \
  -DCMAKE_PREFIX_PATH="$prefix" >"$logs/configure.log" 2>&1
cmake --build "$build" -j "$jobs" >"$logs/build.log" 2>&1
build_rc=$?
say "build: rc=$build_rc ($(( $(date +%s) - t0 )) s)"
if [ $build_rc -ne 0 ]; then
  grep -E "error|FAILED" "$logs/build.log" | head -40 | tee -a "$summary"
fi

# ---- tests ------------------------------------------------------------------------------
if want test; then
  (cd "$build" && ctest --output-on-failure -j 4 --timeout 900) >"$logs/ctest.log" 2>&1
  say "ctest: $(grep -E 'tests passed|tests failed' "$logs/ctest.log" | tail -1)"
  grep -E "\(Failed\)|\(Timeout\)|\(SEGFAULT\)|\(Subprocess aborted\)|Not Run" "$logs/ctest.log" | sed 's/^/  /' | tee -a "$summary"
fi

# ---- examples: the per-family programs and the full layer (device vs host, timings) ------
if want examples; then
  for exe in "$build"/examples/*/*; do
    [ -f "$exe" ] && [ -x "$exe" ] || continue
    name=$(basename "$exe")
    timeout 420 "$exe" >"$logs/example-$name.log" 2>&1
    say "example $name: rc=$?"
  done
  [ -f "$logs/example-moxe_layer.log" ] && tail -40 "$logs/example-moxe_layer.log" | sed 's/^/    /' >>"$summary"
fi

# ---- compute-sanitizer on the device tests ---------------------------------------------
tools=""
want sanitize && tools="memcheck"
want sanitize && [ $quick -eq 0 ] && tools="memcheck racecheck"
limit=300
[ $quick -eq 1 ] && limit=60
for tool in $tools; do
  for exe in "$build"/tests/test_gpu_*; do
    [ -x "$exe" ] || continue
    name=$(basename "$exe")
    timeout $limit compute-sanitizer --tool "$tool" --error-exitcode 99 "$exe" \
      >"$logs/sanitizer-$tool-$name.log" 2>&1
    rc=$?
    case $rc in
      0) status=clean ;;
      99) status="ERRORS" ;;
      124) status="timeout ($limit s)" ;;
      *) status="test failed (rc=$rc)" ;;
    esac
    say "compute-sanitizer $tool $name: $status"
  done
done

# ---- benchmarks -------------------------------------------------------------------------
min_time=0.5
[ $quick -eq 1 ] && min_time=0.1
if ! want bench; then
  :
elif [ -x "$build/benchmarks/bench_ceilings" ]; then
  "$build/benchmarks/bench_ceilings" --benchmark_format=json --benchmark_out="$logs/bench_ceilings.json" \
    --benchmark_out_format=json --benchmark_min_time=${min_time}s >"$logs/bench_ceilings.txt" 2>&1
  read -r bw tflops < <(python3 - "$logs/bench_ceilings.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
bw = max((b.get("bytes/s", 0) for b in d["benchmarks"] if b["name"].startswith("BM_copy")), default=0)
fl = max((b.get("FLOP/s", 0) for b in d["benchmarks"] if b["name"].startswith("BM_gemm")), default=0)
print(f"{bw/1e9:.1f} {fl/1e12:.1f}")
PY
)
  export MOXE_COPY_BW_GBPS=$bw MOXE_BF16_TFLOPS=$tflops
  say "ceilings: copy ${bw} GB/s (read+write), bf16 GEMM ${tflops} TFLOP/s"
  for exe in "$build"/benchmarks/bench_*; do
    name=$(basename "$exe")
    [ "$name" = bench_ceilings ] && continue
    [ -x "$exe" ] || continue
    timeout 400 "$exe" --benchmark_min_time=${min_time}s --benchmark_out="$logs/$name.json" \
      --benchmark_out_format=json >"$logs/$name.txt" 2>&1
    say "benchmark $name: rc=$?"
  done
  python3 - "$logs" >>"$summary" <<'PY'
import glob, json, os, sys
print("\n| benchmark | time (us) | GB/s | TFLOP/s | frac copy bw | frac bf16 peak |")
print("|---|---|---|---|---|---|")
for f in sorted(glob.glob(os.path.join(sys.argv[1], "bench_*.json"))):
    try:
        d = json.load(open(f))
    except Exception:
        continue
    for b in d.get("benchmarks", []):
        t = b.get("real_time", 0) * {"ns": 1e-3, "us": 1, "ms": 1e3, "s": 1e6}[b.get("time_unit", "ns")]
        g = lambda k, s=1.0: f'{b[k]*s:.3g}' if k in b else ""
        print(f'| {b["name"]} | {t:.1f} | {g("bytes/s", 1e-9)} | {g("FLOP/s", 1e-12)} | {g("frac_copy_bw")} | {g("frac_bf16_peak")} |')
PY
else
  say "benchmarks: not built"
fi

# ---- the PyTorch extension (torch is on the GPU machine) ---------------------------------
if ! want torch; then
  :
elif python3 -c "import torch" >/dev/null 2>&1; then
  examples/torch_extension/run_tests.sh "$logs/torch_extension" >"$logs/torch_extension.log" 2>&1
  say "torch extension: rc=$? ($(grep -E "passed|failed|skipped" "$logs/torch_extension.log" | tail -1))"
else
  say "torch extension: no torch on this machine: skipped"
fi

# ---- moxe beside PyTorch eager and mlstm_kernels (benchmarks/compare_torch.py) -------------
if ! want compare; then
  :
elif ! python3 -c "import torch; assert torch.cuda.is_available()" >/dev/null 2>&1; then
  say "compare: no CUDA-enabled torch on this machine: skipped"
else
  if ls "$root"/.carry/wheels/*.whl >/dev/null 2>&1; then
    site=$(mktemp -d)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
      "$root"/.carry/wheels/*.whl >"$logs/compare-wheels.log" 2>&1 &&
      export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH} ||
      say "compare: the carried wheels did not install (see compare-wheels.log)"
  fi
  if ! ls examples/torch_extension/moxe_torch/_C*.so >/dev/null 2>&1; then
    (cd examples/torch_extension && TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=$jobs \
      python3 setup.py build_ext --inplace) >"$logs/compare-extension-build.log" 2>&1 ||
      say "compare: the torch extension did not build (see compare-extension-build.log)"
  fi
  dump=$(mktemp -d)
  "$build/examples/moxe_layer/moxe_layer" --dump "$dump" >"$logs/compare-check-layer.log" 2>&1 &&
    python3 benchmarks/compare_torch.py --check-layer "$dump" >>"$logs/compare-check-layer.log" 2>&1
  say "compare: eager layer vs the host reference (float64): rc=$? ($(grep -c ': OK' "$logs/compare-check-layer.log") cases OK)"
  quick_flag=()
  [ $quick -eq 1 ] && quick_flag=(--quick)
  timeout 560 python3 benchmarks/compare_torch.py --moxe-layer "$build/examples/moxe_layer/moxe_layer" \
    --markdown "$out/compare.md" "${quick_flag[@]}" >"$logs/compare.log" 2>&1
  say "compare: rc=$?"
  if [ -f "$out/compare.md" ]; then
    cat "$out/compare.md" >>"$summary"
  else
    tail -20 "$logs/compare.log" | sed 's/^/    /' >>"$summary"
  fi
fi

tar czf "$out/logs.tar.gz" -C "$logs" . 2>/dev/null
echo
cat "$summary"
