#!/usr/bin/env bash
# Create .venv (once) and install clipopt with the pinned versions of requirements.lock.
# Usage: scripts/install.sh [extra]   (extra: "test" adds the test tools). Idempotent and quiet.
set -euo pipefail
cd "$(dirname "$0")/.."
python_bin=${PYTHON:-$(command -v python3.11 || command -v python3)}
[ -x .venv/bin/python ] || "$python_bin" -m venv .venv
target="."
[ -n "${1:-}" ] && target=".[$1]"
stamp=".venv/.installed-$(cat pyproject.toml requirements.lock | sha256sum | cut -c1-16)-${1:-base}"
if [ ! -f "$stamp" ]; then
  echo "installing clipopt into .venv (first time: ~2-3 minutes)…"
  .venv/bin/pip install -q --disable-pip-version-check -c requirements.lock -e "$target"
  touch "$stamp"
fi
