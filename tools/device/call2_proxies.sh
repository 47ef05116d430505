#!/usr/bin/env bash
# Call 2: the teacher's second half (md5-checked), the Gutenberg-only proxy data, the dequantized teacher cached
# once, then the proxy runs.
set -uo pipefail
export PYTHONPATH=/root/site:$PWD PYTHONUNBUFFERED=1
G=/root/.cache/llamba/smollm2-135m
mkdir -p $G && cat /root/stage/gguf.a .gpu/c2/gguf.b > $G/SmolLM2-135M-Instruct.Q4_1.gguf
md5sum $G/*.gguf | grep -q a1231443440b107ff29f02bdb38c9d0a || { echo "teacher md5 mismatch"; exit 3; }
tar xJf .gpu/c2/data-gut.tar.xz -C /root/data && rm -rf /root/data/gut && mv /root/data/data /root/data/gut
python3 -c "from llamba.teacher import load_teacher; load_teacher('smollm2-135m')" 2>&1 | tail -1
bash tools/device/proxies.sh ${1:-480}
