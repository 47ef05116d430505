#!/usr/bin/env bash
# The whole zero-shot suite (HellaSwag and GSM8K included) plus perplexity / KL on held-out text, for the teacher
# and a distilled student side by side, on the GPU machine. One command:
#     bash tools/device/gpu_eval.sh runs/smollm2/student runs/eval-gpu [TEACHER]
# writes OUTDIR/eval.{md,json,png}. Needs the eval extra (lm-eval, datasets) installed; reads ../shared/data.
set -euo pipefail
STUDENT=${1:?usage: tools/device/gpu_eval.sh STUDENT_DIR OUTDIR [TEACHER]}
OUT=${2:?usage: tools/device/gpu_eval.sh STUDENT_DIR OUTDIR [TEACHER]}
TEACHER=${3:-smollm2-135m}
DATA=${DATA_DIR:-../shared/data}
cd "$(dirname "$0")/../.."
python -c "import lm_eval, datasets" 2>/dev/null || {
    echo "gpu_eval.sh: lm-eval and datasets are missing: pip install the eval wheels (pip install -e '.[eval]')" >&2
    exit 2
}
export HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PYTHONPATH=. python -c "import sys; from llamba.cli import main; sys.exit(main())" eval \
    --models "$TEACHER" "$STUDENT" --tasks paper ppl --data-dir "$DATA/eval" \
    --ppl-text "$DATA/corpus/gutenberg-val.jsonl.xz" --ppl-tokens 262144 --ppl-seq-len 1024 \
    --batch-size "${BATCH_SIZE:-32}" --device cuda --dtype "${DTYPE:-bfloat16}" --out "$OUT"
