#!/usr/bin/env bash
# The one script to run when a GPU is lent (issue 22): ≤ 8 min wall clock on one H200, start-up
# included. Every check of benchmarks/gpu_check.py is time-boxed and appended to
# $OUT/gpu_check.json (one JSON line per check, written when it ends: a killed run keeps every
# check before it); the table (one line per check, PASS/FAIL/SKIP/ERROR and its figure) is
# printed last — also when the python part is killed by the outer timeout.
# Needs python3 with torch, transformers, tokenizers, numpy — not `datasets` — from the source tree.
# Usage (repository root):  OUT=/tmp/gpu bash benchmarks/gpu_check.sh [--cpu]
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false
OUT="${OUT:-/tmp/gpu-check}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia-smi.csv" 2>&1 || true
# 450 s of checks (the script stops starting checks then), 470 s hard limit, then the table
timeout -k 5 470 "$PY" benchmarks/gpu_check.py --out "$OUT" --deadline-s 450 "$@" 2>&1 | tee "$OUT/gpu_check.log"
status=${PIPESTATUS[0]}
if [ "$status" -ne 0 ] && [ "$status" -ne 1 ]; then
  echo "gpu_check.py ended with status $status (124: the outer timeout); the checks that finished:"
  "$PY" benchmarks/gpu_check.py --out "$OUT" --table
fi
echo "gpu_check: exit $status; results in $OUT/gpu_check.json"
exit "$status"
