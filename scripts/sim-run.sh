#!/usr/bin/env bash
# Runs one device test executable on the functional GPU simulator (CTest's emulator for the
# device tests in the `sim` preset; scripts/sim-check.sh sets the simulator up first).
#   scripts/sim-run.sh BINARY [args...]
# Small sizes and the simulator's skips are on (MOXE_TEST_SMALL, MOXE_TEST_SIMULATOR); the
# binary's whole output (without the simulator's own lines) is printed, and kept in
# build-sim/sim-logs/<binary>.log; the exit status is the binary's.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
moxe_root=$(dirname "$here")
# shellcheck source=scripts/sim-env.sh
. "$here/sim-env.sh"
sim_dir=$MOXE_SIM_DIR
export MOXE_TEST_SMALL=${MOXE_TEST_SMALL:-1} MOXE_TEST_SIMULATOR=1 SIM_TAIL=1000000
bin=$(readlink -f "$1")
shift
logs=$(dirname "$(dirname "$bin")")/sim-logs
mkdir -p "$logs/runs"
export TMPDIR=$logs/runs  # the simulator's working directory (config and raw log) per run
log=$logs/$(basename "$bin").log
rc=0
"$sim_dir/sim" run "$bin" "$@" >"$log" 2>&1 || rc=$?
# drop the simulator's banner (configuration dump) up to the program's first line of output
sed -n '/^\[doctest\]\|^\[seed\]\|^\[sim-skip\]\|^no CUDA device/,$p' "$log" | grep -v '^\(GPGPU-Sim\|gpgpu\|Destroy\|Calculate Maxium Active Block\|Maximum size is\)' || cat "$log"
exit $rc
