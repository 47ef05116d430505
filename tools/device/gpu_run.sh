#!/usr/bin/env bash
# The real SmolLM2-135M run on one lent GPU, in phases that each fit one 10-minute device call (the machine keeps
# $HOME between back-to-back calls; the run resumes from its checkpoints). Expects what the staging calls left:
#   ~/site (wheels: gguf, lm-eval, datasets ...), ~/.cache/llamba/smollm2-135m/*.gguf, ~/data/{corpus,eval}.
#   bash tools/device/gpu_run.sh distill SECONDS   # distill (resumes), stopping cleanly before SECONDS
#   bash tools/device/gpu_run.sh eval              # teacher and student on the zero-shot suite + ppl/KL
# Copies logs, summaries and plots to $OUT (the device tool brings them back).
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH="$HOME/site:$PWD" PYTHONUNBUFFERED=1 HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
RUN=$HOME/runs/smollm2-135m
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" "$RUN"
phase=${1:?usage: gpu_run.sh distill SECONDS | eval}
case $phase in
  distill)
    timeout --signal=KILL "${2:-540}" python3 -m llamba.cli distill --teacher smollm2-135m --data "$HOME/data/corpus" \
      --out "$RUN" --stage1-tokens 4e6 --stage2-tokens 8e6 --stage3-tokens ${STAGE3_TOKENS:-16e6} --max-tokens 46e6 \
      --checkpoint-every 10 2>&1 | grep --line-buffered -v "it/s\]$" | tee -a "$OUT/distill.log"
    echo "distill exit: ${PIPESTATUS[0]}"
    ;;
  eval)
    DATA_DIR=$HOME/data BATCH_SIZE=64 timeout 560 bash tools/device/gpu_eval.sh "$RUN/stage3/final" "$RUN/eval" 2>&1 \
      | tee "$OUT/eval.log"
    cp "$RUN"/eval/eval.* "$OUT/" 2>/dev/null
    ;;
esac
cp "$RUN"/summary.* "$RUN"/metrics.jsonl "$RUN"/*.png "$OUT/" 2>/dev/null
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
ls "$RUN"
