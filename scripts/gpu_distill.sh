#!/usr/bin/env bash
# The real run: SmolLM2-135M-Instruct distilled on one GPU with the full `smollm2-135m` recipe, all three stages.
#
#   bash scripts/gpu_distill.sh OUT_DIR [extra `llamba distill` flags]
#   env: TEACHER (default smollm2-135m: a name, .gguf or HF folder), DATA (default ../shared/data/corpus, or a folder
#        prepared with --prepare-only), STAGE1_TOKENS / STAGE2_TOKENS / STAGE3_TOKENS (default: the recipe's 8M/16M/48M),
#        RUN (run folder, default runs/gpu-smollm2-135m: resumable, so a call cut off by a time limit continues
#        where it stopped when called again with the same settings)
# Writes OUT_DIR/distill-smollm2-135m.{json,md} (command, device, tokens, wall time, tokens/s per stage, losses,
# perplexities of teacher / initialised / distilled student, KL(teacher||student) per token) and the loss curves.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bash scripts/gpu_distill.sh OUT_DIR [llamba distill flags]}
shift
TEACHER=${TEACHER:-smollm2-135m}
DATA=${DATA:-../shared/data/corpus}
RUN=${RUN:-runs/gpu-smollm2-135m}
flags=()
[[ -n "${STAGE1_TOKENS:-}" ]] && flags+=(--stage1-tokens "$STAGE1_TOKENS")
[[ -n "${STAGE2_TOKENS:-}" ]] && flags+=(--stage2-tokens "$STAGE2_TOKENS")
[[ -n "${STAGE3_TOKENS:-}" ]] && flags+=(--stage3-tokens "$STAGE3_TOKENS")
mkdir -p "$OUT"
python3 - <<'PY'
import torch, transformers
name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA"
print(f"[gpu_distill] torch {torch.__version__}, transformers {transformers.__version__}, device: {name}", flush=True)
PY
# tokens/s of each stage is printed after its first 5 steps ("[distill] stage N: ... tokens/s ...")
python3 -m llamba.distill --teacher "$TEACHER" --recipe smollm2-135m --data "$DATA" --out "$RUN" "${flags[@]}" "$@" \
  2> >(tee "$OUT/distill.log" >&2)
python3 -m llamba.distill.report "$RUN" "$OUT/distill-smollm2-135m"
cp "$RUN"/loss_stage*.png "$OUT"/ 2>/dev/null || true
cat "$OUT/distill-smollm2-135m.md"
