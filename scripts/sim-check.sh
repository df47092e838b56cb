#!/usr/bin/env bash
# Runs moxe's device tests on a functional GPU simulator (GPGPU-Sim in functional mode: a
# GPU's results, not its timing), on a machine without a GPU. Simulated is not silicon:
# timing, the GPU's own tensor-core rounding and co-residency limits are for a GPU run.
#
#   scripts/sim-check.sh [ctest args...]     e.g. -R gpu.router   (default: every device test)
#
# 1. sets the simulator up (built once per set of tests/sim/patches, cached in
#    ~/.cache/moxe-sim-<hash of the patches>, or $SIM_CACHE) and runs its probes
#    (tests/sim/probes: repros of the simulator bugs the patches fix);
# 2. builds the device tests as PTX for compute_80 with a shared cudart (CMake preset `sim`);
# 3. runs them under the simulator at small sizes (ctest preset `sim`; MOXE_TEST_SMALL and
#    MOXE_TEST_SIMULATOR are set, see tests/common/test_utils.hpp);
# 4. prints a summary: per test executable, and a closing "N passed, N failed, N skipped"
#    line over the test cases; cases the simulator cannot run are listed with the reason.
# The simulator comes from $MOXE_SIM_DIR (default ../shared/gpgpu-sim beside the checkout);
# where it is absent, this says so and exits 0 without running anything.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
moxe_root=$root
# shellcheck source=scripts/sim-env.sh
. "$root/scripts/sim-env.sh"
if [ ! -x "$MOXE_SIM_DIR/sim" ]; then
  echo "sim-check: no GPU simulator at $MOXE_SIM_DIR: nothing run (the device tests need a GPU or the simulator)"
  exit 0
fi
start=$(date +%s)

echo "== simulator setup ($SIM_CACHE)"
"$MOXE_SIM_DIR/sim" setup

echo "== simulator probes"
probe_dir=$root/build-sim/sim-probes
mkdir -p "$probe_dir"
probe_fail=0
for src in "$root"/tests/sim/probes/*.cu; do
  [ -e "$src" ] || continue
  name=$(basename "$src" .cu)
  "$MOXE_SIM_DIR/sim" build-test "$src" "$probe_dir/$name" 80 -I "$root/include"
  if TMPDIR=$probe_dir "$MOXE_SIM_DIR/sim" run "$probe_dir/$name" >"$probe_dir/$name.log" 2>&1; then
    echo "probe $name: ok"
  else
    echo "probe $name: FAILED (log: $probe_dir/$name.log)"; tail -5 "$probe_dir/$name.log"; probe_fail=1
  fi
done

echo "== build (preset sim)"
cmake --preset sim >/dev/null
cmake --build --preset sim

echo "== device tests on the simulator"
rm -rf "$root/build-sim/sim-logs"
ctest_rc=0
ctest --preset sim -j "${MOXE_SIM_JOBS:-$(nproc)}" "$@" || ctest_rc=$?

echo "== summary (simulated, not silicon)"
passed=0 failed=0 skipped=0
printf '%-44s %8s %8s %8s\n' "test executable" passed failed skipped
for log in "$root"/build-sim/sim-logs/*.log; do
  [ -e "$log" ] || continue
  line=$(grep '^\[doctest\] test cases:' "$log" | tail -1 || true)
  if [ -z "$line" ]; then
    printf '%-44s %s\n' "$(basename "$log" .log)" "no doctest summary (crashed or timed out): $log"
    failed=$((failed + 1)); continue
  fi
  p=$(sed -E 's/.*\| *([0-9]+) passed.*/\1/' <<<"$line")
  f=$(sed -E 's/.*\| *([0-9]+) failed.*/\1/' <<<"$line")
  s=$(sed -E 's/.*\| *([0-9]+) skipped.*/\1/' <<<"$line")
  printf '%-44s %8s %8s %8s\n' "$(basename "$log" .log)" "$p" "$f" "$s"
  passed=$((passed + p)); failed=$((failed + f)); skipped=$((skipped + s))
done
if grep -h '^\[sim-skip\]' "$root"/build-sim/sim-logs/*.log >/dev/null 2>&1; then
  echo "skipped on the simulator (they run on a GPU):"
  grep -h '^\[sim-skip\]' "$root"/build-sim/sim-logs/*.log | sort | uniq -c | sed 's/^/  /'
fi
[ "$probe_fail" -eq 0 ] || { echo "simulator probes failed"; failed=$((failed + 1)); }
echo "sim-check: $(( $(date +%s) - start )) s"
echo "$passed passed, $failed failed, $skipped skipped"
[ "$failed" -eq 0 ] && [ "$ctest_rc" -eq 0 ]
