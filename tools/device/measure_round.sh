#!/usr/bin/env bash
# One device call of measurements with no payload (the teacher's shapes with random weights), each step bounded:
# the CUDA tests of what changed (the fused decode step, GateLoop, the server's slots), GateLoop's decode against
# Discrete Mamba-2, and on an H200 issue 19's stage-1 / stage-2 throughput lines. Writes under $OUT.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
SLUG=$(echo "$GPU" | grep -qi h200 && echo h200 || echo h100)
echo "$GPU ($SLUG)"
timeout -s KILL ${TEST_S:-150} python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "decode_step" \
  2>&1 | tail -3
timeout -s KILL ${TEST_S:-150} python3 -m pytest -q -p no:cacheprovider tests/test_serve_slots.py tests/test_gateloop.py \
  2>&1 | tail -3
timeout -s KILL ${BENCH_S:-200} python3 -m llamba.cli bench --skip-kernels --batches 1,64,256 --prompts 2048 \
  --hf-configs 2048x1 --hybrids --mixers gateloop --hybrid-batches 1,64,256 --contexts 1024,32768 \
  --out $OUT/bench-$SLUG-gateloop 2>&1 | grep -v "it/s\]" | tail -25
if [ "$SLUG" = h200 ]; then
  timeout -s KILL ${DISTILL_S:-220} python3 -m llamba.cli bench distill --variants stage1-compile \
    stage2-compile-teacher --out $OUT/bench-distill-stages12-h200 2>&1 | grep -v "it/s\]" | tail -12
fi
