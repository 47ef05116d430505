#!/usr/bin/env bash
# Distillation speed (issue 19, part 1) in one device call, no payload: the training conv's CUDA tests, its kernel
# rows beside the PyTorch path, `llamba bench distill` with its rivals (plain logits, every op in PyTorch, compiled
# blocks, the teacher on flex attention) in one process, then where a micro-step's GPU time goes (tools/device/profile_distill.py).
# Usage: speed_checks.sh   (about 7 minutes; results under $OUT)
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout -s KILL 120 python3 -m pytest -q tests/test_kernels.py -k "training_conv or training_step or scan_matches" 2>&1 | tail -3
timeout -s KILL 60 python3 -c "
import json
from llamba.bench.kernels import bench_train_conv
rows = bench_train_conv()
print(json.dumps(rows, indent=1))
json.dump(rows, open('$OUT/train-conv-h200.json', 'w'), indent=1)"
timeout -s INT 360 python3 -m llamba.cli bench distill --variants stage2-block stage3 stage3-plain stage3-torch \
  stage3-compile stage3-pieces stage3-flex --steps 3 --out $OUT/bench-distill-h200 2>&1 | grep -v "it/s\]" | tail -20
timeout -s KILL 120 python3 tools/device/profile_distill.py --recipe smollm2-135m --stages 3 --steps 3 2>&1 | tail -40
