#!/usr/bin/env bash
# Distillation speed (issue 19, part 1) in one device call, no payload: the training conv's and the compiled teacher's
# CUDA tests, the conv's kernel rows beside the PyTorch path, `llamba bench distill` with its rivals in one process
# (VARIANTS=...; default: stage 1, stages 2 and 3 eager / compiled / compiled with the teacher), then where a
# micro-step's GPU time goes (tools/device/profile_distill.py).
# Usage: speed_checks.sh   (about 7 minutes; results under $OUT)
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
# (scan_matches is left out: its CUDA cases take minutes; the kernel table's session ran them)
timeout -s KILL 150 python3 -m pytest -q tests/test_kernels.py tests/test_distill_stages.py tests/test_calibrate.py \
  -k "training_conv or training_step or compiled_teacher or on_cuda" 2>&1 | tail -3
timeout -s KILL 60 python3 -c "
import json
from llamba.bench.kernels import bench_train_conv
rows = bench_train_conv()
print(json.dumps(rows, indent=1))
json.dump(rows, open('$OUT/train-conv-h200.json', 'w'), indent=1)"
VARIANTS=${VARIANTS:-stage1 stage2-block stage2-compile stage3 stage3-compile stage3-compile-teacher stage3-compile-mb32}
timeout -s INT 300 python3 -m llamba.cli bench distill --variants $VARIANTS --steps 3 --out $OUT/bench-distill-h200 \
  2>&1 | grep -v "it/s\]" | tail -20
timeout -s KILL 90 python3 tools/device/profile_distill.py --recipe smollm2-135m --stages 3 --steps 3 --compile 2>&1 | tail -40
