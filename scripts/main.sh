#!/usr/bin/env bash
# The README's main command: set up, then distill the default teacher (SmolLM2-135M-Instruct) into a Llamba
# student and compare them. On a CPU this runs the `smoke` preset (a few minutes: the pipeline, not a good model);
# where CUDA is present, the full `smollm2-135m` recipe. Re-running resumes; extra arguments go to `llamba distill`.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "main.sh: installing llamba[train,eval] (quiet; the first time takes a few minutes)" >&2
python3 -m pip install -q -e ".[train,eval]"
# Without CUDA, `llamba distill` says first that it runs the `smoke` preset (a pipeline check, not a usable model)
# and about how long it takes.
OUT=${OUT:-runs/smollm2-135m}
python3 -m llamba.distill --teacher smollm2-135m --data ../shared/data/corpus --out "$OUT" "$@"
echo
cat "$OUT/summary.md"
