"""Validation perplexity of the quantized formats: the student (float32, int8, int4) and the teacher with the same
weight formats, on the first N tokens of gutenberg-val.

    python benchmarks/quant_ppl.py --model STUDENT_DIR --tokens 4096 --out results/edge-cpu-ppl.json
"""

import argparse
import json
import os
import tempfile
from pathlib import Path

from llamba.bench.cpu import _student_checkpoint, perplexity_block

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="student folder (default: converted now from the teacher, untrained)")
    p.add_argument("--teacher", default="smollm2-135m")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--out", default="results/edge-cpu-ppl.json")
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    student, origin = _student_checkpoint(args.model, args.teacher, Path(tempfile.mkdtemp()))
    result = perplexity_block(student, args.teacher, ["none", "int8", "int4"], args.tokens)
    result["student"] = origin
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
