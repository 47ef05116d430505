#!/usr/bin/env bash
# Issue 19's full run on one H200, in back-to-back device calls (results/distill-smollm2-135m.md says what ran):
#   full_run.sh part 1|2   stage one third of the payload (.gpu/pN: a split tar of the teacher GGUF, the prepared
#                          data, the eval wheels and files); with TESTS=1 part 1 also runs CUDA tests (bounded)
#   full_run.sh unpack     the last third; unpack and check (md5, tokenizer): for other runs (proxies_next.sh)
#   full_run.sh start S    the last third; unpack, check (md5, tokenizer), start `pipeline` in its own process session
#                          (it outlives the call; the machine stays warm while calls follow), watch S seconds
#   full_run.sh launch S   the same without the unpack (the payload is in place already: a second run in a session)
#   full_run.sh wait S     watch the pipeline up to S seconds
#   full_run.sh finish S   wait up to S seconds for the pipeline's end
#   full_run.sh pipeline   (what start runs) the distillation, then at once `llamba eval` (GPU) beside the CPU
#                          artifacts' perplexity (CPU; not with SKIP_QUANT=1) and the layer ranking of the distilled
#                          student (not with SKIP_SELECT=1)
# Every call but part/unpack returns what exists so far in $OUT/results.tar (summary, log, curves, evaluation): the
# machine goes back 30 s after a call ends, and a pipeline that waited for a `finish` call to evaluate lost its
# student with the machine (results/distill-ablations.md, "Third round").
# The payload is built on the CPU machine (see the closing lines of this file for how).
set -uo pipefail
export PYTHONPATH=/root/site:/root/repo PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
R=/root/runs/${RUN:-pure}  # RUN=k4 EXTRA="--attention-layers auto:4": the hybrid at the same budget (issue 23)
STUDENT=$R/stage3/final
# the budgets are the recipe's unless STAGE3_TOKENS / EXTRA say otherwise; SKIP_QUANT, SKIP_SELECT and NO_TEACHER_EVAL
# leave parts of the evaluation out (see evaluate)
TRAIN="--teacher smollm2-135m --recipe smollm2-135m --data /root/data/full ${STAGE3_TOKENS:+--stage3-tokens $STAGE3_TOKENS}
  --checkpoint-every 40 ${EXTRA:-} --out $R"

watch_run() {  # SECONDS: print progress each minute until the pipeline is done or time is up
  local end=$((SECONDS + $1))
  while [ $SECONDS -lt $end ] && [ ! -f $R.done ]; do
    sleep 20
    if ! pgrep -f "full_run.sh pipeline" >/dev/null && [ ! -f $R.done ]; then
      echo "the pipeline is not running and did not finish:"; tr '\r' '\n' < $R.log | tail -15; return 1
    fi
    [ $((SECONDS % 60)) -lt 20 ] && tr '\r' '\n' < $R.log | grep -E "stage [23]|^\[eval\]" | tail -1
  done
  tr '\r' '\n' < $R.log | grep -E "^\[distill\]|tokens/s" | tail -6
  [ -f $R/summary.json ] && echo "distillation done"
  [ -f $R.done ] && echo "pipeline done"
  return 0
}

collect() {  # what exists so far, into $OUT/results.tar
  mkdir -p /root/res
  cp $R/summary.* $R/loss_stage*.png $R.command /root/res/ 2>/dev/null
  cp /root/eval/eval.* /root/select/ranking.* /root/quant/quant-ppl.json /root/res/ 2>/dev/null
  for f in $R/select/ranking.*; do [ -f "$f" ] && cp "$f" /root/res/auto-"${f##*/}"; done  # auto:K's own ranking
  [ -f $R.log ] && tr '\r' '\n' < $R.log | grep -v "it/s\]" > /root/res/distill.log
  tar cf $OUT/results.tar -C /root/res . && ls /root/res | tr '\n' ' ' && echo
}

evaluate() {  # the distilled student: zero-shot suite and held-out ppl on the GPU, CPU artifacts' ppl beside it
  local calib=/root/repo/.gpu/calib/calibration.jsonl  # carried with the start call (make_payload.sh), if at all
  # bounded: the evaluation takes ~170 s, and the machine is held until this ends too (quant_ppl.py keeps each row);
  # SKIP_QUANT=1 leaves the CPU artifacts out (they held the 2026-12-07 pipeline its full 330 s after the evaluation)
  [ -n "${SKIP_QUANT:-}" ] || timeout -s KILL 330 python3 tools/device/quant_ppl.py \
    $STUDENT /root/data/corpus/gutenberg-val.jsonl.xz \
    /root/quant/quant-ppl.json --tokens 16384 --threads 14 $([ -f $calib ] && echo --calibration $calib) \
    > /root/quant.log 2>&1 &
  # NO_TEACHER_EVAL=1: the student alone (~half the ~170 s); the teacher's rows are the same in every run on one kind
  # of GPU (results/eval-smollm2-135m-gpu.json, H100), and its ratios are taken from there afterwards; the eval's KL
  # row needs the teacher in the run, so the distillation summary's KL (262,144 held-out tokens) stands in for it
  local models="smollm2-135m $STUDENT"
  [ -z "${NO_TEACHER_EVAL:-}" ] || models=$STUDENT
  timeout -s KILL 300 python3 -m llamba.cli eval --models $models \
    --tasks arc_easy piqa lambada_openai hellaswag ppl --data-dir /root/data/eval \
    --ppl-text /root/data/corpus/gutenberg-val.jsonl.xz --ppl-tokens 262144 --ppl-seq-len 1024 --batch-size 128 \
    --device cuda --dtype bfloat16 --out /root/eval 2>&1 | tr '\r' '\n' | grep -v "it/s\]\|%|" | sed 's/^/[eval] /'
  [ -n "${SKIP_SELECT:-}" ] || timeout -s KILL 150 python3 -m llamba.distill.select --student $STUDENT \
    --data /root/data/full --out /root/select/ranking 2>&1 | tail -4
  wait; [ -f /root/quant.log ] && tail -3 /root/quant.log
}

unpack() {  # the last third; reassemble, check (md5, teacher md5, tokenizer), install the wheels, place the data
  cp .gpu/p3/part.* /root/stage/
  cat /root/stage/part.* > /root/bundle.tar && rm /root/stage/part.*
  md5sum /root/bundle.tar | grep -q "$(cat .gpu/p3/bundle.md5)" || { echo "bundle md5 mismatch"; exit 3; }
  rm -rf /root/pay /root/repo && mkdir -p /root/pay /root/data /root/site /root/runs && tar xf /root/bundle.tar -C /root/pay
  cp -r "$PWD" /root/repo  # the runs read their code from a copy the next calls' working-tree syncs do not touch
  G=/root/.cache/llamba/smollm2-135m && mkdir -p $G && mv /root/pay/*.gguf $G/
  md5sum $G/*.gguf | grep -q a1231443440b107ff29f02bdb38c9d0a || { echo "teacher md5 mismatch"; exit 3; }
  python3 -m pip install -q --no-index --no-deps --no-compile --target /root/site /root/pay/whl/*.whl 2>&1 | tail -2
  tar xJf /root/pay/data.tar.xz -C /root/pay && rm -rf /root/data/full && mv /root/pay/data /root/data/full
  cp -r /root/pay/eval/eval /root/pay/eval/corpus /root/data/
  (cd /root/repo && python3 tools/device/check_tokenizer.py /root/pay/tokcheck.json /root/data/full) || exit 4
}

case "${1:-}" in
unpack)
  unpack
  ;;
part)
  mkdir -p /root/stage && cp .gpu/p$2/part.* /root/stage/ && ls -la /root/stage
  if [ "$2" = 1 ] && [ -n "${TESTS:-}" ]; then  # TESTS=1: the CUDA tests of the hybrid, the server and GateLoop
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
    PYTHONPATH=$PWD timeout -s KILL 110 python3 -m pytest -q -x tests/test_engine_hybrid.py tests/test_serve_slots.py \
      tests/test_gateloop.py 2>&1 | tail -4
  fi
  ;;
start|launch)
  [ "$1" = start ] && unpack
  cd /root/repo && rm -f $R.done
  echo "llamba distill" $TRAIN > $R.command  # unquoted: one line, single spaces
  setsid nohup bash tools/device/full_run.sh pipeline > $R.log 2>&1 < /dev/null &
  sleep 5
  watch_run ${2:-500}; collect
  ;;
wait|finish)
  watch_run ${2:-560}; collect
  [ "$1" = wait ] || [ -f $R.done ] || { echo "pipeline not done"; exit 5; }
  ;;
pipeline)
  python3 -m llamba.cli distill $TRAIN && evaluate
  touch $R.done
  ;;
*)
  echo "usage: full_run.sh part 1|2 | unpack | start S | launch S | wait S | finish S | pipeline"; exit 2
  ;;
esac
exit 0
# The payload: tools/device/make_payload.sh (CPU machine) does all of this:
#   llamba distill --teacher smollm2-135m --prepare-only --data .gpu/src --max-tokens 56e6 --val-tokens 4e5 --out .gpu/prep/full
#     (.gpu/src: links to gutenberg-train-00..04, python-docs, linux-docs, gutenberg-val from ../shared/data/corpus)
#   .gpu/pay: data.tar.xz (tar of prep/full/data), whl/ (lm-eval 0.4.13 and what the image lacks of its needs, gguf),
#     eval/{eval,corpus} (the four tasks' files, gutenberg-val), tokcheck.json, the teacher GGUF
#   tar cf bundle.tar -C .gpu/pay . && split -n 3 -d bundle.tar part.  -> .gpu/p1, p2, p3 (md5 of bundle.tar above)
