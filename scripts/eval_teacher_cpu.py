"""Full-set teacher measurement on a slow, shared CPU: one task at a time through lm-eval's HFLM, each task's result
saved as soon as it lands (OUT/<task>.json), so an interrupted run keeps what it finished.

    python scripts/eval_teacher_cpu.py OUT TASK [TASK ...]      # e.g. /tmp/evalrun arc_easy piqa lambada_openai

The teacher runs in bfloat16 (about 3x faster than float32 on an AVX512-BF16 CPU), log-softmax in float32.
``llamba eval --models smollm2-135m --tasks ... --dtype bfloat16 --device cpu`` computes the same numbers in one go.
"""

import datetime
import json
import os
import sys
import time

import torch
from lm_eval.models.huggingface import HFLM

from llamba.eval.suite import resolve_tasks, run_suite, table_rows
from llamba.teacher import load_teacher

DATA = os.environ.get("DATA_DIR", "../shared/data/eval")


def main(out: str, tasks: list[str]) -> None:
    torch.set_num_threads(int(os.environ.get("THREADS", os.cpu_count() or 1)))
    model, tokenizer = load_teacher("smollm2-135m", dtype=torch.bfloat16)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=32, softmax_dtype="float32")
    for task in tasks:
        specs, skipped = resolve_tasks([task], DATA)
        if skipped:
            print(f"skipping {task}: {skipped[task]}", file=sys.stderr)
            continue
        start, started = time.time(), datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        results = run_suite(lm, specs, DATA, limit=None, batch_size=32)
        record = {"task": task, "started": started, "seconds": round(time.time() - start), "rows": table_rows(results),
                  "results": results["results"], "n_samples": results.get("n-samples")}
        with open(os.path.join(out, f"{task}.json"), "w") as f:
            json.dump(record, f, indent=1, default=str)
        print(task, record["rows"], record["seconds"], flush=True)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2:])
