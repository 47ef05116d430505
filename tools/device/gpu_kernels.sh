#!/usr/bin/env bash
# The GPU kernel results, in steps that fit 10-minute device calls; results under $OUT:
#   --tests        the kernel tests (tests/test_kernels.py) and the padded-scoring tests on CUDA: ~3.5 min once
#                  Triton's cache on the machine holds the kernels; on a fresh machine the compiles alone take
#                  longer than one call (the float32 one-pass cases: 35-60 s each), so run it twice, back to back
#   --variants     the backward variants (benchmarks/scan_backward.py: results/scan-backward-<gpu>.*)
#   --table        the kernel table (benchmarks/bench_kernels.py: results/kernels-<gpu>.*)
#   --small-batch  the scan's routes at small batch x heads (benchmarks/scan_small_batch.py:
#                  results/scan-small-batch-<gpu>.*)
# fla (the rival) and lm-eval (for the scoring tests) travel as wheels in .whl (carry it):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
#   PYTHONPATH=/tmp/site:$PWD bash tools/device/gpu_kernels.sh --tests
#   PYTHONPATH=/tmp/site:$PWD bash tools/device/gpu_kernels.sh --variants --table --small-batch   # ~5 min, right after:
#                                                           # Triton's cache on the machine keeps the compiled kernels
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH="${PYTHONPATH:-$PWD}" PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader | tee "$OUT/device.txt"
# results are named by the card, as in results/: kernels-h100, kernels-h200, ...
GPU=$(head -1 "$OUT/device.txt" | grep -o -E '[A-Z][0-9]{2,3}' | head -1 | tr 'A-Z' 'a-z')
GPU=${GPU:-gpu}
for step in "$@"; do
  case $step in
    --tests) timeout 520 python3 -m pytest -q tests/test_kernels.py \
               "tests/test_eval_lm.py::test_padded_scoring_on_cuda_matches_the_pytorch_scan" \
               -p no:cacheprovider --durations=5 2>&1 | tee "$OUT/tests.log" | tail -12 ;;
    --variants) timeout 300 python3 benchmarks/scan_backward.py --out "$OUT/scan-backward-$GPU" 2>&1 | tail -8 \
                  | tee "$OUT/variants.log" ;;
    --table) timeout 300 python3 benchmarks/bench_kernels.py --out "$OUT/kernels-$GPU" 2>&1 | tail -20 \
               | tee "$OUT/kernels.log" ;;
    --small-batch) timeout 150 python3 benchmarks/scan_small_batch.py --out "$OUT/scan-small-batch-$GPU" 2>&1 \
                     | tail -12 | tee "$OUT/small-batch.log" ;;
    *) echo "unknown step $step (--tests, --variants, --table, --small-batch)" >&2; exit 2 ;;
  esac
done
