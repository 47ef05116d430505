#!/usr/bin/env bash
# The GPU half of what the CPU tested in the fourteenth session, for one device call that needs no payload (no
# teacher, no data): the CUDA tests of the engine on hybrids, the serve slots' CUDA graph, GateLoop on CUDA and the
# fused decode kernel, then `llamba bench` on random SmolLM2-135M shapes (the pure student, hybrids K=2/4, GateLoop,
# the teacher). `llamba bench serve` needs a tokenizer, hence the teacher GGUF: run it after staging that
# (`llamba convert --teacher smollm2-135m --out /root/student`, then `llamba bench serve --model /root/student
# --teacher smollm2-135m`). Usage: gpu_checks.sh
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -m pytest -q -rs tests/test_engine_hybrid.py tests/test_generation_engine.py tests/test_serve_slots.py \
  tests/test_gateloop.py tests/test_kernels.py tests/test_eval_lm.py tests/test_generate.py 2>&1 | tail -25
timeout -s INT 420 python3 -m llamba.cli bench --batches 1,64,256,1024 --prompts 2048 --hf-configs 2048x1 \
  --contexts 1024,8192,32768 --out $OUT/bench-h200 2>&1 | grep -v "it/s\]" | tail -60
