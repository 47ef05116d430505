#!/usr/bin/env bash
# Hybrid study, call 3: the eval wheels and files; the rest of the training (hybrid_runs.sh); then `llamba eval`
# of the teacher and both hybrids, as the pure student was evaluated (results/eval-smollm2-135m-gpu.md).
# Usage: hybrid_call3.sh TRAIN_SECONDS EVAL_SECONDS
set -uo pipefail
export PYTHONPATH=/root/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --target /root/site .gpu/s3/*.whl 2>&1 | grep -v "already exists"
tar xJf .gpu/s3/eval.tar.xz -C /root/data
bash tools/device/hybrid_runs.sh ${1:-300}
models="smollm2-135m"
for k in k2 k4; do [ -f /root/runs/$k/summary.json ] && models="$models /root/runs/$k/stage3/final"; done
timeout -s KILL ${2:-240} python3 -m llamba.cli eval --models $models --tasks arc_easy piqa lambada_openai hellaswag ppl \
  --data-dir /root/data/eval --ppl-text /root/data/corpus/gutenberg-val.jsonl.xz --ppl-tokens 262144 --ppl-seq-len 1024 \
  --batch-size 128 --device cuda --dtype bfloat16 --out /root/eval 2>&1 | tr '\r' '\n' | grep -v "it/s\]\|%|" | tail -25
mkdir -p $OUT/eval && cp /root/eval/eval.* $OUT/eval/ 2>/dev/null
exit 0
