#!/usr/bin/env bash
# Call 3: the proxies' winner (attention init, block alignment, one learning rate) on the larger data mix,
# for what one call allows. Usage: call3_winner.sh SECONDS
set -uo pipefail
export PYTHONPATH=/root/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
tar xJf .gpu/c3/data-full.tar.xz -C /root/data && rm -rf /root/data/full && mv /root/data/data /root/data/full
sed -i 's/8d525772602f0d24/e0b296955d8cdf13/' /root/data/full/manifest.json
timeout -s KILL ${1:-430} python3 -m llamba.cli distill --teacher smollm2-135m --recipe results/distill-ablations/proxy.yaml \
  --data /root/data/full --stages 2,3 --stage2-align block --inherited-lr-scale 1 --stage2-tokens 5e6 --stage3-tokens 17e6 \
  --checkpoint-every 5 --out /root/runs/winner 2>&1 | grep --line-buffered -v "it/s\]\|tok/s\]" | tee $OUT/winner.log
cp /root/runs/winner/summary.* /root/runs/winner/metrics.jsonl /root/runs/winner/*.png $OUT/ 2>/dev/null
