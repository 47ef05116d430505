#!/usr/bin/env bash
# Hybrid study, call 1: stage the teacher's first part; on CUDA, the tests that need it and a tiny end-to-end
# `llamba distill --attention-layers auto:1` (the selection and a hybrid stage 3 under bf16 autocast).
set -uo pipefail
export PYTHONPATH=/root/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p /root/stage /root/data /root/site /root/runs
cp .gpu/s1/gguf.a /root/stage/
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -m pytest -q tests/test_eval_lm.py tests/test_distill_stages.py tests/test_hybrid.py -x 2>&1 | tail -3
python3 - <<'PY'
import json, time
from pathlib import Path
from llamba.distill.pipeline import Options, run
from llamba.distill.recipes import load_recipe
from llamba.distill.testing import make_corpus, make_teacher
root = Path("/root/runs/tiny")
corpus = make_corpus(root / "corpus", n_docs=200, n_val=20)
teacher = make_teacher(root / "teacher", corpus, layers=4, hidden=64, heads=4, kv_heads=2, vocab=280, train_steps=100)
r = load_recipe("smoke")
r.update(d_state=16, seq_len=64, micro_batch=4, batch_tokens=512, eval_tokens=2048, val_tokens=4096, select_tokens=1024,
         checkpoint_every=100, attention_layers="auto:1")
r["stages"] = {s: {"tokens": 8192, "lr": 3e-3} for s in (1, 2, 3)}
t = time.time()
s = run(Options(teacher=str(teacher), out=root / "run", recipe=r, data=str(corpus), stages=(2, 3), device="cuda",
                sample_tokens=8))
print("tiny auto:1 on CUDA:", round(time.time() - t), "s; layers", s["attention_layers"], "ranking",
      s["selection"]["ranking"], "KL init", round(s["eval"]["init"]["kl_per_token"], 3), "->",
      round(s["eval"]["final"]["kl_per_token"], 3))
PY
