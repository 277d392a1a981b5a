#!/usr/bin/env bash
# Install (with test tools), then run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh test,deploy
export OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1
# The suite writes checkpoints, stores and Dagster instances under the temp folder (a few GB at its
# peak; passed tests' folders are removed as it goes): refuse to start on a nearly full disk, where
# tests would fail one by one with "No space left on device" or a storage server's internal error.
temp_dir=${TMPDIR:-/tmp}
need_gib=${CLIPOPT_TEST_MIN_FREE_GIB:-4}
free_kib=$(df -Pk "$temp_dir" | awk 'NR==2 {print $4}')
if [ "$free_kib" -lt $((need_gib * 1024 * 1024)) ]; then
  echo "error: $((free_kib / 1024)) MiB free in $temp_dir; the test suite needs ${need_gib} GiB there." >&2
  echo "Free space (old pytest-of-* folders under $temp_dir are safe to delete) or set TMPDIR to a larger disk." >&2
  exit 2
fi
exec .venv/bin/python -m pytest "$@"
