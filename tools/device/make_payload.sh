#!/usr/bin/env bash
# Build the device payload of full_run.sh / proxies_next.sh on the CPU machine, from the repo root:
# .gpu/p1..p3, three thirds of one tar (the teacher GGUF, the prepared 50.9M-token data folder, lm-eval and gguf
# wheels, the eval files, a tokenizer check), each under the 64 MiB a call carries; .gpu/tok (serve_bench.sh: the
# teacher's config and tokenizer, and the serving wheels in .gpu/tok/whl).
# .gpu/p3/bundle.md5 lets full_run.sh check the reassembled tar. .gpu/calib: ~300 KB of a book the distillation
# does not read, the CPU artifacts' calibration text (carry it with full_run.sh start). About 5 minutes (tokenizing, xz, pip downloads).
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info && echo '/.gpu/' >> .git/info/exclude; }
D=$(realpath ../shared/data)
G=~/.cache/llamba/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf
[ -f $G ] || python3 -m llamba.cli convert --teacher smollm2-135m --out /tmp/payload-student >/dev/null  # fetches it
mkdir -p .gpu/src .gpu/pay/whl .gpu/pay/eval/eval .gpu/pay/eval/corpus .gpu/tok
for f in gutenberg-train-00 gutenberg-train-01 gutenberg-train-02 gutenberg-train-03 gutenberg-train-04 python-docs \
         linux-docs gutenberg-val; do ln -sf $D/corpus/$f.jsonl.xz .gpu/src/; done
[ -f .gpu/prep/full/data/manifest.json ] || python3 -m llamba.cli distill --teacher smollm2-135m --prepare-only \
  --data .gpu/src --max-tokens 56e6 --val-tokens 4e5 --out .gpu/prep/full
tar cf - -C .gpu/prep/full data | xz -T2 -6 > .gpu/pay/data.tar.xz
cp $D/eval/{arc_easy.jsonl,hellaswag_val_full.txt.bz2,lambada_openai.jsonl,piqa_valid.jsonl,piqa_valid_labels.lst} \
  .gpu/pay/eval/eval/
cp $D/corpus/gutenberg-val.jsonl.xz .gpu/pay/eval/corpus/
mkdir -p .gpu/calib && python3 -c "import json, lzma, sys; text = json.loads(next(lzma.open(sys.argv[1], 'rt')))['text']
print(json.dumps({'text': text[:300000]}))" $D/corpus/gutenberg-train-05.jsonl.xz > .gpu/calib/calibration.jsonl
# lm-eval and what the GPU image lacks of its needs (KINDS.md's package list), and gguf for the teacher's GGUF
P="--no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
   --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -q -d .gpu/pay/whl"
python3 -m pip download $P lm_eval==0.4.13 datasets==5.2.0 dill==0.4.1 evaluate==0.4.6 more_itertools==11.2.1 \
  pytablewriter==1.2.1 multiprocess==0.70.19 DataProperty==1.1.1 mbstrdecoder==1.1.5 pathvalidate==3.3.1 \
  tabledata==1.3.5 tcolorpy==0.1.7 typepy==1.3.5 chardet==6.0.0.post1 nltk==3.10.4 defusedxml==0.7.1 gguf==0.19.0
python3 -m pip wheel -q --no-deps rouge-score==0.1.2 sqlitedict==2.1.0 word2number==1.1 -w .gpu/pay/whl  # sdists
python3 - <<'PY'
import json
from llamba.distill.data import tokenize_documents
from llamba.teacher import load_tokenizer
tok = load_tokenizer("smollm2-135m")
texts = ["The old house at the end of the lane stood empty.\n\nIt had been, for years.",
         "def f(x):\n    return x ** 2  # squares", "Über naïve café — 3.14 × 2 ≈ 6.28"]
json.dump({"texts": texts, "ids": tokenize_documents(tok, texts)}, open(".gpu/pay/tokcheck.json", "w"))
PY
cp $G .gpu/pay/
tar cf .gpu/bundle.tar -C .gpu/pay .
rm -rf .gpu/p1 .gpu/p2 .gpu/p3 && mkdir -p .gpu/p1 .gpu/p2 .gpu/p3
(cd .gpu && split -n 3 -d bundle.tar part. && mv part.00 p1/ && mv part.01 p2/ && mv part.02 p3/)
rm .gpu/pay/*.gguf
# serve_bench.sh: what `llamba serve` needs that the GPU image lacks (fastapi, uvicorn, pydantic and their needs)
mkdir -p .gpu/tok/whl && python3 -m pip download $(echo "$P" | sed 's|-d .gpu/pay/whl|-d .gpu/tok/whl|') \
  fastapi==0.165.0 starlette==1.10.0 pydantic==2.13.4 pydantic_core==2.46.4 uvicorn==0.55.0 typing-inspection==0.4.2 \
  annotated-types==0.7.0 typing_extensions==4.16.0 opentelemetry-api==1.45.3 importlib_metadata==8.7.1 \
  uvloop==0.23.0 httptools==0.9.0
cp ~/.cache/llamba/smollm2-135m/hf/{config.json,tokenizer.json,tokenizer_config.json,chat_template.jinja,generation_config.json} \
  .gpu/tok/ 2>/dev/null || echo "no converted teacher folder for .gpu/tok (serve_bench.sh): run llamba generate once"
ls -la .gpu/p1 .gpu/p2 .gpu/p3
md5sum .gpu/bundle.tar | cut -d' ' -f1 > .gpu/p3/bundle.md5  # full_run.sh start checks the reassembled tar
echo "bundle md5 $(cat .gpu/p3/bundle.md5)"
