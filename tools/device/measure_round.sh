#!/usr/bin/env bash
# One device call of measurements with no payload (the teacher's shapes with random weights), each step bounded
# (seconds in the variables below), in the order of STEPS (default: all of them, which needs more than one call):
#   kernels   the CUDA tests of the fused decode step (GateLoop's too)
#   steptable the decode-step kernel table with GateLoop's step by theta route (issue 22: which one a large batch
#             should take; ~1 minute)
#   slots     the CUDA tests of the server's slots
#   serve     issue 24's bars: serve_bench.sh with the flags of results/serve-h100.md at SERVE_LEVELS (default
#             1,16,64,256: all but 1,024; carry .gpu/tok)
#   gateloop  GateLoop's decode against Discrete Mamba-2 (issue 22)
#   distill   on an H200 only: issue 19's stage-1 / stage-2 throughput lines
# Writes under $OUT. Usage: STEPS="kernels serve gateloop" bash tools/device/measure_round.sh
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
SLUG=$(echo "$GPU" | grep -qi h200 && echo h200 || echo h100)
echo "$GPU ($SLUG), $(date -u +%FT%TZ)"
for step in ${STEPS:-kernels slots serve gateloop distill}; do
  echo "== $step ($SECONDS s)"
  case $step in
  kernels)
    timeout -s KILL ${TEST_S:-100} python3 -m pytest -q -p no:cacheprovider -x tests/test_kernels.py \
      -k "decode_step" 2>&1 | tail -2 ;;
  steptable)
    timeout -s KILL ${TABLE_S:-150} python3 benchmarks/bench_kernels.py --only decode_step \
      --out $OUT/decode-step-$SLUG 2>&1 | tail -14 ;;
  slots)
    timeout -s KILL ${TEST_S:-100} python3 -m pytest -q -p no:cacheprovider -x -m gpu tests/test_serve_slots.py \
      2>&1 | tail -2 ;;
  serve)
    SECONDS_LIMIT=${SERVE_S:-330} timeout -s KILL $(( ${SERVE_S:-330} + 60 )) bash tools/device/serve_bench.sh \
      --prompt-tokens 1024 --new-tokens 2048 --requests-per-client 1 --concurrency ${SERVE_LEVELS:-1,16,64,256} \
      --max-batch 256 --stream-interval 4 --api-processes 4 --client-processes 4 2>&1 | tail -22 ;;
  gateloop)
    timeout -s KILL ${BENCH_S:-150} python3 -m llamba.cli bench --skip-kernels --batches 1,64,256 --prompts 2048 \
      --hf-configs 2048x1 --hybrids --mixers gateloop --hybrid-batches 1,64,256 --contexts 1024,32768 \
      --out $OUT/bench-$SLUG-gateloop 2>&1 | grep -v "it/s\]" | tail -25 ;;
  distill)
    [ "$SLUG" = h200 ] && timeout -s KILL ${DISTILL_S:-200} python3 -m llamba.cli bench distill --variants \
      stage1-compile stage2-compile-teacher --out $OUT/bench-distill-stages12-h200 2>&1 | grep -v "it/s\]" \
      | tail -12 ;;
  esac
done
echo "== done ($SECONDS s)"
