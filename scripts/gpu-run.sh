#!/usr/bin/env bash
# One call on a GPU machine (no network needed): the GPU benchmark first, then training the bundled
# model further with the time that remains. Run from the repository root with the venv carried:
#
#     scripts/gpu-run.sh [TOTAL_MINUTES]     # default 14
#
# Writes BENCHMARKS.md's "On a GPU" section, and diffu_lsp/assets/tiny-dream (the bundled weights,
# exported whenever training stops); training resumes from .train/checkpoint.pt if it exists, else
# starts from the bundled weights (5,000 steps of 96x256 tokens: ~123M tokens, ~20 per parameter). Everything it writes is also copied to $OUT when that is set.
set -u
cd "$(dirname "$0")/.."
total=${1:-14}
start=$(date +%s)
[ -f .venv/bin/activate ] && . .venv/bin/activate
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true

timeout 480 diffu-lsp bench gpu --write --json bench-gpu.json 2>&1 | tee bench-gpu.log
echo "bench gpu: exit $? after $(( $(date +%s) - start )) s"

left=$(( total * 60 - ($(date +%s) - start) - 60 ))   # a minute for the export and copying back
if [ "$left" -gt 60 ]; then
  timeout $(( left + 45 )) python -m diffu_lsp.train --device cuda --threads 8 --work .train \
    --init-from diffu_lsp/assets/tiny-dream --out diffu_lsp/assets/tiny-dream \
    --steps 5000 --batch 96 --save-every 200 --export-every 500 --max-minutes $(( left / 60 )) 2>&1 | tail -40 | tee train-gpu.log
fi

if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT/assets"
  cp -f BENCHMARKS.md bench-gpu.json bench-gpu.log train-gpu.log "$OUT"/ 2>/dev/null
  cp -rf diffu_lsp/assets/tiny-dream "$OUT/assets/"
  cp -f .train/checkpoint.pt "$OUT"/ 2>/dev/null   # to resume elsewhere (.train/checkpoint.pt)
fi
