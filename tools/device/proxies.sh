#!/usr/bin/env bash
# The proxy runs of results/distill-ablations.md, all at once on one GPU (each process alone leaves most of the
# GPU idle). Re-running resumes each from its checkpoints. Usage: proxies.sh SECONDS (stop cleanly before then).
set -uo pipefail
export PYTHONPATH=/root/site:$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2 TOKENIZERS_PARALLELISM=false
LIMIT=${1:-500}
P=results/distill-ablations/proxy.yaml
COMMON="--teacher smollm2-135m --sample-tokens 40 --checkpoint-every 5 --stage2-tokens 2e6 --stage3-tokens 3e6"
declare -A RUNS=(
  [A-old-recipe]="--recipe smollm2-135m --data /root/data/mix --stage1-tokens 5e5"
  [B-identity-init]="--recipe $P --data /root/data/mix --stages 2,3 --init identity"
  [C-candidate]="--recipe $P --data /root/data/mix --stages 2,3"
  [D-one-lr]="--recipe $P --data /root/data/mix --stages 2,3 --inherited-lr-scale 1"
  [G-block-align]="--recipe $P --data /root/data/mix --stages 2,3 --stage2-align block"
)
mkdir -p /root/runs
for name in "${!RUNS[@]}"; do
  if [ -f /root/runs/$name/summary.json ]; then continue; fi
  echo "llamba distill $COMMON ${RUNS[$name]} --out /root/runs/$name" > /root/runs/$name.cmd
  timeout -s KILL $LIMIT python3 -m llamba.cli distill $COMMON ${RUNS[$name]} --out /root/runs/$name \
    >> /root/runs/$name.log 2>&1 &
done
wait
python3 - <<'PY'
import json, pathlib
rows = []
for cmd in sorted(pathlib.Path("/root/runs").glob("*.cmd")):
    run = cmd.with_suffix("")
    s = run / "summary.json"
    if s.exists():
        j = json.loads(s.read_text()); e = j["eval"]["final"]
        tps = {k: round(v["tokens_per_s"]) for k, v in j["stages"].items()}
        print(f"{run.name:18s} ppl {e['student_ppl']:8.2f} (teacher {e['teacher_ppl']:.2f}) KL {e['kl_per_token']:.4f} "
              f"init KL {j['eval']['init']['kl_per_token']:.3f} tok/s {tps} stages' wall {j['wall_s_stages']:.0f}s")
    else:
        log = (run.parent / (run.name + ".log")).read_text().splitlines()
        print(f"{run.name:18s} unfinished: {[l for l in log if l.startswith('[distill]')][-1:]}")
PY
cd /root/runs && tar czf $OUT/proxies.tgz --exclude='*/stage*/final' --exclude='*/stage*/checkpoint' --exclude='*/init' \
  --exclude='*/data' --exclude='*/tensorboard' . 2>/dev/null
