# Sourced by scripts/sim-check.sh and scripts/sim-run.sh: where the simulator is, and which
# build of it to use. moxe's own fixes of the simulator (tests/sim/patches/*.patch, applied
# in name order after the simulator's own patches) select the build: each patch set gets its
# own cache directory, so trees with different patch sets never rebuild each other's.
moxe_root=${moxe_root:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
export MOXE_SIM_DIR=${MOXE_SIM_DIR:-$moxe_root/../shared/gpgpu-sim}
SIM_EXTRA_PATCHES=$(find "$moxe_root/tests/sim/patches" -name '*.patch' 2>/dev/null | LC_ALL=C sort | tr '\n' ' ')
export SIM_EXTRA_PATCHES
if [ -z "${SIM_CACHE:-}" ]; then
  # shellcheck disable=SC2086
  patch_set=$(cat /dev/null $SIM_EXTRA_PATCHES | md5sum | cut -c1-12)
  export SIM_CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/moxe-sim-$patch_set
fi
