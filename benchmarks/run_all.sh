#!/usr/bin/env bash
# Run every benchmark; extra arguments go to each script (e.g. --smoke, or --device cuda).
#   benchmarks/run_all.sh            # real defaults (minutes on the 2-vCPU CPU machines)
#   benchmarks/run_all.sh --smoke    # tiny sizes, seconds each, no targets
# Prints each script's command and output; exits non-zero if any script failed.
set -u
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}" HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
failed=0
for script in train_step realign_step embed_throughput caption_mining orchestration index_recall; do
  args=("$@")
  if [ "$script" = index_recall ]; then  # index_recall has no --device/--model: pass only --smoke
    args=(); for a in "$@"; do [ "$a" = --smoke ] && args+=(--smoke); done
  fi
  echo "=== $script: $PYTHON benchmarks/$script.py ${args[*]:-}"
  start=$(date +%s)
  if ! "$PYTHON" "benchmarks/$script.py" "${args[@]}"; then
    echo "!!! $script failed"; failed=1
  fi
  echo "=== $script: $(( $(date +%s) - start )) s"
done
exit $failed
