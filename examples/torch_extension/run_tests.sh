#!/usr/bin/env bash
# Build moxe_torch in place against the installed torch and run its pytest suite; print a
# short summary. Needs python with torch (CUDA build) and pytest, and nvcc (CUDA_HOME).
#
#   examples/torch_extension/run_tests.sh [LOG_DIR]
#
# LOG_DIR (default examples/torch_extension/build/logs) receives build.log and pytest.log.
# Environment: PYTHON (default python3), TORCH_CUDA_ARCH_LIST (default 9.0), MAX_JOBS
# (default nproc). Exit status: 0 all passed (or skipped: no torch / no GPU, see summary),
# 1 test failures, 2 build failure.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-python3}
logs=${1:-$here/build/logs}
mkdir -p "$logs" && logs=$(cd "$logs" && pwd)
cd "$here"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}

if ! versions=$("$python" -c "import torch; print(torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available())" 2>/dev/null); then
  echo "torch_extension: skipped ($python cannot import torch)"
  exit 0
fi
echo "torch_extension: torch $versions, arch $TORCH_CUDA_ARCH_LIST"

t0=$(date +%s)
"$python" setup.py build_ext --inplace >"$logs/build.log" 2>&1
build_rc=$?
echo "torch_extension: build rc=$build_rc ($(( $(date +%s) - t0 )) s)"
if [ $build_rc -ne 0 ]; then
  grep -E "error|Error" "$logs/build.log" | head -30
  exit 2
fi

t0=$(date +%s)
"$python" -m pytest -q -rs -p no:cacheprovider tests >"$logs/pytest.log" 2>&1
test_rc=$?
echo "torch_extension: pytest rc=$test_rc ($(( $(date +%s) - t0 )) s): $(tail -1 "$logs/pytest.log")"
grep -E "^(FAILED|ERROR|SKIPPED)" "$logs/pytest.log" | head -40
case $test_rc in
  0) exit 0 ;;
  5) exit 0 ;;  # no tests collected
  *) exit 1 ;;
esac
