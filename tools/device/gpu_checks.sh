#!/usr/bin/env bash
# Issues 22 and 23's speed bars (and the CUDA tests of the code behind them), no payload, random SmolLM2-135M
# shapes (speed does not depend on the weights). Calls, each within the 10-minute limit:
#   gpu_checks.sh tests      the CUDA tests of the hybrid engine, serve's CUDA graph, GateLoop and the kernels
#   gpu_checks.sh variants [hybrids|gateloop|all]   `llamba bench` for the pure student, the hybrids K=2 (evenly
#                            spaced) and K=4 (the layers auto:4 chose: HYBRID4, default 20,23,24,26) and/or GateLoop
#                            beside the teacher, in one process: decode at batch 1/64/256 (+ the largest batch in
#                            16 GiB), prompt 2048, and the batch-16 context sweep 1K -> 32K (the kernel rows skipped:
#                            kernels-h200.md has them)
# `llamba bench serve` is serve_bench.sh.
set -uo pipefail
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
case "${1:-}" in
tests)
  timeout -s KILL 540 python3 -m pytest -q -rs tests/test_engine_hybrid.py tests/test_generation_engine.py \
    tests/test_serve_slots.py tests/test_gateloop.py tests/test_kernels.py tests/test_bench_hybrid.py \
    tests/test_generate.py "tests/test_distill_stages.py::test_compiled_block_is_the_eager_block" 2>&1 | tail -25
  ;;
variants)
  # which: hybrids (issue 23), gateloop (issue 22) or all (both: ~9 minutes by an estimate never timed, past one
  # call's limit); the pure student and the teacher are measured in each run, since the bars are ratios within one
  # run. Rows come back as they are measured ($OUT/bench-*.partial.json) if the time limit cuts the run.
  case "${2:-all}" in
    hybrids) variant_flags="--hybrids 2 ${HYBRID4:-20,23,24,26} --mixers" ;;
    gateloop) variant_flags="--hybrids --mixers gateloop" ;;
    all) variant_flags="--hybrids 2 ${HYBRID4:-20,23,24,26} --mixers gateloop" ;;
    *) echo "usage: gpu_checks.sh variants hybrids|gateloop|all"; exit 2 ;;
  esac
  gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | awk '{print tolower($2)}')
  timeout -s INT 560 python3 -m llamba.cli bench --skip-kernels --batches 1,64,256 --prompts 2048 --hf-configs 2048x1 \
    $variant_flags --hybrid-batches 1,64,256 --contexts 1024,8192,32768 --out $OUT/bench-$gpu-${2:-all} 2>&1 \
    | grep -v "it/s\]" | tail -60
  ;;
*)
  echo "usage: gpu_checks.sh tests | variants"; exit 2
  ;;
esac
