#!/usr/bin/env bash
# The next proxy runs for issues 19 and 22, after `full_run.sh part 1`, `part 2`, `unpack` (teacher, data, wheels in
# place). Each is the built-in recipe at the proxies' budget (2M + 3M tokens, stages 2-3), changing one thing:
#   P0  the recipe as it is (attention init)            P1  --init attention-calibrated (llamba/calibrate.py)
#   P2  --mixer gateloop (RoPE-initialised; issue 22; eager: GateLoop's blocks have not been compiled on a GPU yet)
#   P3  --stage3-lr 1e-3
#   P4  --stages 1,2,3 --stage1-tokens 5e5 (does stage 1 pay on this recipe? the ablations never ran it)
#   P5  --seq-len 2048 --micro-batch 4 (longer windows: LAMBADA's recall spans whole passages)
#   P6  --stage2-tokens 4e6 --stage3-tokens 2e6 (the token split: the same 6M as the others at STAGE3=4e6)
#   H4  --attention-layers 20,23,24,26 (the K = 4 hybrid of results/hybrid-smollm2-135m.md, its proxy baseline)
#   H4F the same with --inherited-lr-scale 0.1 (the kept attention layers, MLPs and embeddings barely move: recall
#       is the attention layers' job, and freezing them helped GenDistill's hybrids)
#   H4Z the same with --freeze-attention (q/k/v/o stay the teacher's; everything else trains at the one rate)
#   H2  --attention-layers 23,24 (K = 2: the ranking's top two)
#   H6  --attention-layers 3,20,21,23,24,26 (K = 6: the ranking's top six; LAMBADA rose ~0.08 per doubling of the
#       K = 4 hybrid's tokens, so 0.90 at K = 4 wants ~2x the budget: does K = 6 get there at the same budget?)
#   H4R --attention-layers auto:4:repeats (the four layers whose attention recovers the most KL where the text repeats
#       itself, ranked on this run's stage-2 student: copying is LAMBADA's skill; H4's layers came from the overall KL)
#   H4S H4 with --stage2-tokens 4e6 --stage3-tokens 4e6 (the token split: P6's -18% KL on the pure student at 6M)
#   H4G H4 on the books alone (/root/data/gutenberg: the prepared mix's Gutenberg shards, without the Linux and Python
#       documentation, ~17% of its tokens): which data wins, never measured before
#   H4T H4 on the mix with text sampled from the teacher added (/root/data/mix-teacher: TSAMPLES tokens, default 12e6,
#       ~20% of the result); the sampling runs first, on the GPU, alone (its rate: benchmarks/teacher_sampling.py)
# all at once on the one GPU (together about the solo rate: ~8 minutes), then `llamba eval` of them (ARC-Easy, PIQA,
# HellaSwag, LAMBADA; held-out perplexity / KL are in each run's summary), everything back in $OUT/proxies.tar.
# Usage: proxies_next.sh train SECONDS | eval SECONDS     (train is resumable: a second call continues)
#   EXTRA="--compile off" added to every run (seven processes compiling at once on 16 cores cost minutes);
#   NAMES="P0 P3" a subset; STAGE3=6e6 another stage-3 budget; TASKS="arc_easy piqa lambada_openai" fewer tasks
set -uo pipefail
export PYTHONPATH=/root/site:/root/repo PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
R=/root/proxies
# micro-batch 8: seven stage-3 processes at the recipe's 16 would peak near 7 x 27 GiB of the GPU's 139 (the batch in
# tokens per optimizer step, and so the result, is the recipe's either way: more accumulation steps)
COMMON="--teacher smollm2-135m --recipe smollm2-135m --data /root/data/full --stage2-tokens 2e6 --stage3-tokens ${STAGE3:-3e6}
  --checkpoint-every 5 --sample-tokens 40 --micro-batch 8 ${EXTRA:-}"
declare -A FLAGS=([P0]="" [P1]="--init attention-calibrated" [P2]="--mixer gateloop --compile off" [P3]="--stage3-lr 1e-3"
                  [P4]="--stages 1,2,3 --stage1-tokens 5e5" [P5]="--seq-len 2048 --micro-batch 4"
                  [P6]="--stage2-tokens 4e6 --stage3-tokens 2e6" [H4]="--attention-layers 20,23,24,26"
                  [H4F]="--attention-layers 20,23,24,26 --inherited-lr-scale 0.1"
                  [H4Z]="--attention-layers 20,23,24,26 --freeze-attention" [H2]="--attention-layers 23,24"
                  [H4R]="--attention-layers auto:4:repeats"
                  [H4S]="--attention-layers 20,23,24,26 --stage2-tokens 4e6 --stage3-tokens 4e6"
                  [H4G]="--attention-layers 20,23,24,26 --data /root/data/gutenberg"
                  [H4T]="--attention-layers 20,23,24,26 --data /root/data/mix-teacher"
                  [H6]="--attention-layers 3,20,21,23,24,26")
NAMES=${NAMES:-"P0 P1 P2 P3 P4 P5 P6"}  # a subset or the hybrids: NAMES="H4 H4F H4Z H2 H6" proxies_next.sh ...
cd /root/repo || { echo "run full_run.sh unpack first"; exit 2; }
mkdir -p $R
# H4G's data: the prepared mix's Gutenberg shards (linked) under a manifest that lists only them (the held-out split,
# gutenberg-val, is the same)
[ -d /root/data/gutenberg ] || python3 - /root/data/full /root/data/gutenberg <<'PY'
import json, sys
from pathlib import Path
full, out = Path(sys.argv[1]), Path(sys.argv[2])
manifest = json.loads((full / "manifest.json").read_text())
manifest["shards"] = [s for s in manifest["shards"] if "gutenberg" in Path(s["source"]).name]
manifest["sources"] = {k: v for k, v in manifest["sources"].items() if "gutenberg" in Path(k).name}
out.mkdir(parents=True)
for shard in manifest["shards"]:
    (out / shard["file"]).symlink_to(full / shard["file"])
(out / "manifest.json").write_text(json.dumps(manifest, indent=1))
print(f"{out}: {sum(s['tokens'] for s in manifest['shards'] if s['split'] == 'train'):,} train tokens (books only)")
PY
# H4T's data: the teacher's samples prepared on their own, then their training shards listed beside the mix's
if [[ " $NAMES " == *" H4T "* ]] && [ ! -d /root/data/mix-teacher ] && [ "${1:-}" = train ]; then
  python3 -m llamba.distill.teacher_samples --teacher smollm2-135m --tokens ${TSAMPLES:-12e6} \
    --out /root/data/teacher-samples.jsonl 2>&1 | tail -2
  python3 -m llamba.cli distill --teacher smollm2-135m --prepare-only --data /root/data/teacher-samples.jsonl \
    --max-tokens ${TSAMPLES:-12e6} --out /root/data/tsamp 2>&1 | grep "^\[distill\] data" | tail -2
  python3 - /root/data/full /root/data/tsamp/data /root/data/mix-teacher <<'PY'
import json, sys
from pathlib import Path
import numpy as np
full, samples, out = (Path(p) for p in sys.argv[1:])
manifest = json.loads((full / "manifest.json").read_text())
extra = json.loads((samples / "manifest.json").read_text())
out.mkdir(parents=True)
for shard in manifest["shards"]:
    (out / shard["file"]).symlink_to(full / shard["file"])
added = [s for s in extra["shards"] if s["split"] == "train"]
# the mix's shards end documents with the EOS they were prepared with (2), this machine's tokenizer may name another
# (1: check_tokenizer.py says so): the samples' document ends are rewritten to the mix's, which the trainer reads
eos, their_eos = manifest["tokenizer"]["eos_token_id"], extra["tokenizer"]["eos_token_id"]
for shard in added:
    ids = np.fromfile(samples / shard["file"], dtype=extra["dtype"])
    ids[ids == their_eos] = eos  # decoded without special tokens, the samples hold their_eos only at document ends
    ids.astype(manifest["dtype"]).tofile(out / shard["file"])
print(f"teacher samples: EOS {their_eos} -> {eos}" if eos != their_eos else f"teacher samples: EOS {eos}, as the mix")
manifest["shards"] += added
manifest["sources"].update({k: v for k, v in extra["sources"].items()})
(out / "manifest.json").write_text(json.dumps(manifest, indent=1))
n, t = sum(s["tokens"] for s in added), sum(s["tokens"] for s in manifest["shards"] if s["split"] == "train")
print(f"{out}: {t:,} train tokens, {n:,} ({n / t:.0%}) sampled from the teacher")
PY
fi
case "${1:-}" in
train)
  for name in $NAMES; do
    [ -f $R/$name/summary.json ] && continue
    echo "llamba distill $COMMON ${FLAGS[$name]} --out $R/$name" > $R/$name.command
    timeout -s INT -k 20 ${2:-540} python3 -m llamba.cli distill $COMMON ${FLAGS[$name]} --out $R/$name \
      >> $R/$name.log 2>&1 &
  done
  wait
  for name in $NAMES; do
    echo "== $name ${FLAGS[$name]}"; tr '\r' '\n' < $R/$name.log | grep -E "^\[distill\] (summary|stage [23]: loss)|Error" | tail -3
  done
  ;;
eval)
  # each student in a process of its own, side by side, without the teacher (its rows are the same on every GPU of
  # a kind: results/eval-smollm2-135m-gpu.json) and without `ppl` (the trainer's summary scores the same held-out
  # text): teacher and four students in one process outran 420 s on 2026-12-07 and, writing only at its end, left
  # nothing; on 2026-12-07 (seventh round) two students in one process took ~200 s, one beside it 158 s.
  # A run whose stage 3 is done counts even if its own closing evaluation (summary.json) was cut short.
  done_runs=(); for name in $NAMES; do [ -f $R/$name/stage3/final/config.json ] && done_runs+=($name); done
  for name in "${done_runs[@]}"; do
    timeout -s KILL ${2:-540} python3 -m llamba.cli eval --models $R/$name/stage3/final \
      --tasks ${TASKS:-arc_easy piqa lambada_openai hellaswag} --data-dir /root/data/eval --batch-size 128 \
      --device cuda --dtype bfloat16 --out $R/eval-$name > $R/eval-$name.log 2>&1 &
  done
  wait
  for f in $R/eval-*/eval.md; do [ -f $f ] && sed -n '/^| task/,$p' $f; done
  mkdir -p /root/proxies-out
  for name in $NAMES; do
    cp $R/$name.command /root/proxies-out/ 2>/dev/null
    [ -f $R/$name/summary.json ] && cp $R/$name/summary.json /root/proxies-out/$name.json
    tr '\r' '\n' < $R/$name.log | grep -E "^\[distill\]|^llamba" > /root/proxies-out/$name.log
  done
  for d in $R/eval-*/; do [ -f $d/eval.json ] && for f in $d/eval.*; do cp $f /root/proxies-out/$(basename $d)."${f##*.}"; done; done
  tar cf $OUT/proxies.tar -C /root/proxies-out .
  ;;
*)
  echo "usage: proxies_next.sh train SECONDS | eval SECONDS"; exit 2
  ;;
esac
