#!/usr/bin/env bash
# One call on a GPU machine (no network needed, nothing installed): the GPU benchmark first, then
# training the bundled model further with the time that remains. Run from a checkout:
#
#     scripts/gpu-run.sh [--quick] [TOTAL_MINUTES [BENCH_OPTIONS...]]     # default 9 minutes
#
# It needs only python3 with torch and transformers (the GPU image has them; diffu-lsp need not be
# installed: the checkout goes on PYTHONPATH, and `bench gpu` imports nothing else). Results go to
# $OUT when that is set, else to the checkout, each file written as soon as it is known: the JSON
# and BENCHMARKS.md's "On a GPU" section after every shape and context, the log line by line, so a run cut
# short keeps what it measured (the device tool ends a command at 10 minutes: hence 9). Exit status:
# the benchmark's (else training's).
#
# --quick: the tiny shape on whatever device there is, and no training (tests/test_gpu_traps.py
# runs it on a CPU with no network). The benchmark's time limit is the whole budget less a minute
# and a half for copying: the first shape includes torch.compile of the 7B network (minutes).
# Training (if at least 2 minutes remain) resumes from .train/checkpoint.pt if it exists, else
# starts from the bundled weights (5,000 steps of 96x256 tokens: ~123M tokens, ~20 per parameter).
set -u -o pipefail
cd "$(dirname "$0")/.."
quick=
if [ "${1:-}" = "--quick" ]; then quick=--quick; shift; fi
total=${1:-9}
[ $# -gt 0 ] && shift
start=$(date +%s)
[ -f .venv/bin/activate ] && . .venv/bin/activate
python=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
out=${OUT:-$PWD}
[ -n "$quick" ] && [ -z "${OUT:-}" ] && out=$(mktemp -d)   # tiny CPU figures never land in the checkout's BENCHMARKS.md
mkdir -p "$out"
[ "$out" != "$PWD" ] && cp -f BENCHMARKS.md "$out/BENCHMARKS.md"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
"$python" -c 'import sys, torch, transformers; print("python", sys.version.split()[0], "torch", torch.__version__, "transformers", transformers.__version__, "cuda", torch.cuda.is_available())'

elapsed() { echo $(( $(date +%s) - start )); }
timeout -k 20 $(( total * 60 - 90 )) "$python" -m diffu_lsp.bench gpu $quick --write --out "$out/BENCHMARKS.md" \
  --json "$out/bench-gpu.json" "$@" 2>&1 | tee "$out/bench-gpu.log"
status=$?
echo "bench gpu: exit $status after $(elapsed) s"

left=$(( total * 60 - $(elapsed) - 60 ))   # a minute for the export and copying back
if [ -z "$quick" ] && [ "$left" -gt 120 ]; then
  timeout -k 20 $(( left + 45 )) "$python" -m diffu_lsp.train --device cuda --threads 8 --work .train \
    --init-from diffu_lsp/assets/tiny-dream --out diffu_lsp/assets/tiny-dream \
    --steps 5000 --batch 96 --save-every 200 --export-every 500 --max-minutes $(( left / 60 )) 2>&1 \
    | tail -40 | tee "$out/train-gpu.log"
  trained=$?
  [ "$status" -eq 0 ] && status=$trained
  if [ "$out" != "$PWD" ]; then
    mkdir -p "$out/assets"
    cp -rf diffu_lsp/assets/tiny-dream "$out/assets/"
    cp -f .train/checkpoint.pt "$out"/ 2>/dev/null   # to resume elsewhere (.train/checkpoint.pt)
  fi
fi
echo "gpu-run: exit $status after $(elapsed) s"
exit "$status"
