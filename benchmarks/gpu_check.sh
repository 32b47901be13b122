#!/usr/bin/env bash
# One prepared GPU check (≤ 8 min on one H200): the CUDA paths CPU tests cannot reach (bf16
# autocast, --compile, the prefetcher, DDP wrapping with one rank) and the throughput benchmark at
# the paper's shapes (6L-768 student, BERT-base-shaped random teacher, micro-batch 128, bf16),
# with achieved FLOP/s and MFU. Needs python3 with torch, transformers and tokenizers — not
# `datasets` — and runs from the source tree. Figures go to files under $OUT:
#   $OUT/gpu_check.json      every check: ok / error, tokens/s, FLOP/s, MFU
#   $OUT/throughput.json     benchmarks/throughput.py at the paper's shapes
#   $OUT/*.log               the console output of each part
# Usage (repository root):  OUT=/tmp/gpu bash benchmarks/gpu_check.sh      [--tiny: CPU, tiny shapes]
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false
OUT="${OUT:-/tmp/gpu-check}"
mkdir -p "$OUT"
TINY="${1:-}"
status=0

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia-smi.csv" 2>&1 || true
python3 -c "import torch, transformers, tokenizers; print(torch.__version__, transformers.__version__, tokenizers.__version__, torch.cuda.is_available())" \
  | tee "$OUT/versions.txt"

# 1. the CUDA paths of the real training loop (≈ 3-4 min at paper shapes)
timeout 330 python3 benchmarks/gpu_check.py --out "$OUT" --keep-work ${TINY:+--tiny} 2>&1 | tee "$OUT/gpu_check.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

# 2. the throughput benchmark at the paper's shapes, on the data and teacher made by step 1
if [ -z "$TINY" ]; then
  ROWS=(--student bert-6l-768 --batch-size 128 --micro-batch-size 128 --steps 10 --warmup-steps 3 --device cuda --quiet-wait-s 20 --retries 1)
else
  ROWS=(--student '{"layers":1,"hidden":32,"heads":4,"intermediate":64}' --batch-size 8 --steps 2 --warmup-steps 1 --device cpu --matmul-size 256 --quiet-wait-s 0 --retries 0 --max-other-cores 1000)
fi
timeout 140 python3 benchmarks/throughput.py --data "$OUT/work/data" --teacher "$OUT/work/teacher" \
  "${ROWS[@]}" --strategies hf none vanilla minilm tinybert --dropout 0.1 --json "$OUT/throughput.json" \
  2>&1 | tee "$OUT/throughput.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

rm -rf "$OUT/work"
echo "gpu_check: exit $status; figures in $OUT"
exit $status
