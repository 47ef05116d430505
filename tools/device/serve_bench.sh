#!/usr/bin/env bash
# Issue 24's serving bar in one device call with a 4 MB payload instead of the 98 MB teacher: serving speed does not
# depend on the weights, so the teacher is SmolLM2-135M's shape with random bf16 weights and its real tokenizer
# (.gpu/tok: config.json, tokenizer.json, tokenizer_config.json, chat_template.jinja, generation_config.json, copied
# from the teacher's converted folder ~/.cache/llamba/smollm2-135m/hf), the student `llamba convert` of it, both
# served by `llamba serve` and loaded by `llamba bench serve`. Usage: serve_bench.sh [EXTRA BENCH FLAGS]
# (on a CPU, for a smoke test: LAYERS=2 DEVICE=cpu serve_bench.sh --concurrency 1,4 --new-tokens 4)
# The GPU image has no fastapi / uvicorn / pydantic: make_payload.sh puts their wheels in .gpu/tok/whl.
set -uo pipefail
if ! python3 -c "import fastapi, uvicorn" 2>/dev/null && [ -d .gpu/tok/whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/serve-site .gpu/tok/whl/*.whl || exit 3
  export PYTHONPATH=/tmp/serve-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
W=${WORK:-/root/serve-bench}
rm -rf $W && mkdir -p $W
python3 - "$W/teacher" "${LAYERS:-0}" <<'PY'
import shutil, sys
from pathlib import Path
import torch
from transformers import LlamaConfig, LlamaForCausalLM
out, layers = Path(sys.argv[1]), int(sys.argv[2])
cfg = LlamaConfig.from_pretrained(".gpu/tok")
if layers:
    cfg.num_hidden_layers = layers
torch.manual_seed(0)
LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out)
for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
    if Path(".gpu/tok", f).exists():
        shutil.copy(Path(".gpu/tok", f), out / f)
print(f"random teacher: {cfg.num_hidden_layers} layers, d {cfg.hidden_size}, vocab {cfg.vocab_size} -> {out}")
PY
python3 -m llamba.cli convert --teacher $W/teacher --out $W/student 2>&1 | tail -1
timeout -s INT ${SECONDS_LIMIT:-480} python3 -m llamba.cli bench serve --model $W/student --teacher $W/teacher \
  --device ${DEVICE:-cuda} --out ${OUT:-$W}/serve-${DEVICE:-cuda} "$@" 2>&1 | grep -v "it/s\]" \
  | tee ${OUT:-$W}/serve-bench.log | tail -30  # the whole log comes back too: a traceback once hid every level
