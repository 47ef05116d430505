#!/usr/bin/env bash
# Hybrid study's training (results/hybrid-smollm2-135m.md), the pure winner's recipe and budget (5M + 17M tokens):
# stage 2 on the pure student, the layer ranking and K=4 (auto:4), then stage 3 of K=4 and of K=2 (the ranking's
# top two, from the same stage-2 student) side by side. Idempotent: a later call resumes where this one stopped.
# Usage: hybrid_runs.sh SECONDS (everything is interrupted, checkpoints kept, after that many seconds).
set -uo pipefail
export PYTHONPATH=/root/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
end=$((SECONDS + ${1:-480}))
R=/root/runs
COMMON="--teacher smollm2-135m --recipe results/distill-ablations/proxy.yaml --data /root/data/d24 --stage2-align block
  --inherited-lr-scale 1 --stage2-tokens 5e6 --stage3-tokens 17e6 --checkpoint-every 5"
train() {  # NAME FLAGS...: one distill run, interrupted (Ctrl-C: resumable) at the deadline
  local name=$1; shift
  [ -f $R/$name/summary.json ] && return 0
  timeout -s INT -k 20 $((end - SECONDS)) python3 -m llamba.cli distill $COMMON "$@" --out $R/$name >> $R/$name.log 2>&1
}
mkdir -p $R
train k4 --stages 2,3 --attention-layers auto:4 &
k4=$!
while [ ! -f $R/k4/select/final/config.json ] && kill -0 $k4 2>/dev/null; do sleep 3; done
if [ -f $R/k4/select/ranking.json ]; then
  top2=$(python3 -c "import json; print(','.join(map(str, sorted(json.load(open('$R/k4/select/ranking.json'))['ranking'][:2]))))")
  train k2 --stages 3 --student $R/k4/stage2/final --attention-layers $top2 &
fi
wait
for name in k4 k2; do
  echo "== $name"; tr '\r' '\n' < $R/$name.log 2>/dev/null | grep -v "^\s*$" | grep -E "^\[distill\]|error|Error|stage 3:|it/s" | tail -4
done
cp $R/k4/select/ranking.json $R/k4/select/ranking.md $OUT/ 2>/dev/null
for name in k4 k2; do [ -f $R/$name/summary.json ] && cp $R/$name/summary.json $OUT/summary-$name.json; done
exit 0
