#!/usr/bin/env bash
# Hybrid study, call 2: the teacher's second part (md5-checked), the prepared 24M-token mix, the tokenizer check,
# then the training (hybrid_runs.sh) for what the call allows. Usage: hybrid_call2.sh TRAIN_SECONDS
set -uo pipefail
export PYTHONPATH=/root/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
G=/root/.cache/llamba/smollm2-135m
mkdir -p $G /root/data /root/site && cat /root/stage/gguf.a .gpu/s2/gguf.b > $G/SmolLM2-135M-Instruct.Q4_1.gguf
md5sum $G/*.gguf | grep -q a1231443440b107ff29f02bdb38c9d0a || { echo "teacher md5 mismatch"; exit 3; }
python3 -m pip install -q --no-index --no-deps --no-compile --target /root/site .gpu/s2/*.whl
tar xJf .gpu/s2/data24.tar.xz -C /root/data && rm -rf /root/data/d24 && mv /root/data/data /root/data/d24
python3 tools/device/check_tokenizer.py .gpu/s2/tokcheck.json /root/data/d24 || exit 4
bash tools/device/hybrid_runs.sh ${1:-480}
