#!/usr/bin/env bash
# The GPU kernel results in one device call (~6 min with compiles): the kernel tests and the padded-scoring test
# on CUDA; then with --variants the backward variants (benchmarks/scan_backward.py), with --table the kernel table
# (benchmarks/bench_kernels.py, what results/kernels-h100.* hold). Results under $OUT. fla (the table's rival) and
# its einops travel as wheels in .whl (carry it):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
#   PYTHONPATH=/tmp/site:$PWD bash scripts/gpu_kernels.sh --variants --table
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="${PYTHONPATH:-$PWD}" PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader | tee "$OUT/device.txt"
timeout 360 python3 -m pytest -q -x tests/test_kernels.py tests/test_eval_lm.py -p no:cacheprovider > "$OUT/tests.log" 2>&1
tail -3 "$OUT/tests.log"
for step in "$@"; do
  case $step in
    --variants) timeout 300 python3 benchmarks/scan_backward.py --out "$OUT/scan-backward-h100" 2>&1 | tail -8 \
                  | tee "$OUT/variants.log" ;;
    --table) timeout 150 python3 benchmarks/bench_kernels.py --out "$OUT/kernels-h100" 2>&1 | tail -20 \
               | tee "$OUT/kernels.log" ;;
    *) echo "unknown step $step (--variants, --table)" >&2; exit 2 ;;
  esac
done
