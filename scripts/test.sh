#!/usr/bin/env bash
# Install (with test tools), then run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh test,deploy
export OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1
exec .venv/bin/python -m pytest "$@"
