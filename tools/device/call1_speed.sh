#!/usr/bin/env bash
# Call 1: stage the first half of the teacher and the proxy data; measure distillation throughput per stage on a
# random SmolLM2-shaped teacher (llamba.bench.distill), solo and as 4 concurrent processes; the CUDA loss test.
set -uo pipefail
export PYTHONPATH=/root/site:$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4 TOKENIZERS_PARALLELISM=false
mkdir -p /root/stage /root/data /root/site
cp .gpu/c1/gguf.a /root/stage/
python3 -m pip install -q --no-index --no-deps --no-compile --target /root/site .gpu/c1/*.whl
tar xJf .gpu/c1/data-mix.tar.xz -C /root/data && rm -rf /root/data/mix && mv /root/data/data /root/data/mix
tar xJf .gpu/c1/eval.tar.xz -C /root/data
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader
python3 -m pytest -q tests/test_distill_stages.py -k cuda 2>&1 | tail -3
python3 -m llamba.cli bench distill --recipe results/distill-ablations/proxy.yaml --steps 4 --out $OUT/bench-distill-h200 2>&1 | grep -v "it/s\]\|tok/s\]"
for i in 1 2 3 4; do
  python3 -m llamba.cli bench distill --recipe results/distill-ablations/proxy.yaml --variants stage3 stage2-attention --steps 4 > $OUT/concurrent-$i.log 2>&1 &
done
wait
grep -h "bench distill\]" $OUT/concurrent-*.log
