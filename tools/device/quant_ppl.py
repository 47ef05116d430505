"""Issue 19's CPU-artifact bar on a real student: perplexity of its int8 and mixed int4/int8 artifacts (written by
`llamba quantize`, loaded by the CPU runtime) against the float32 student, on the same held-out tokens.
Runs on any CPU (the GPU machine's 16 cores while its GPU evaluates). With --calibration TEXT (another text than
CORPUS) the formats are scored again with activation-aware scales and bias correction. Usage:
    python3 tools/device/quant_ppl.py STUDENT CORPUS.jsonl.xz OUT.json [--tokens 32768] [--threads 12] [--calibration T]
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

FORMATS = {  # name: `llamba quantize` flags (None: the float32 checkpoint itself)
    "float32": None,
    "int8": ["--bits", "8"],
    "int4 + int8 MLPs": ["--bits", "4", "--mlp-bits", "8"],
    # which of the mixer's two projections the 13% of the mixed format comes from (both still mixed int4/int8)
    "int4 out_proj + int8 in_proj, MLPs": ["--bits", "4", "--mlp-bits", "8", "--bits-for", "in_proj=8"],
    "int4 in_proj + int8 out_proj, MLPs": ["--bits", "4", "--mlp-bits", "8", "--bits-for", "out_proj=8"],
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("student")
    ap.add_argument("corpus")
    ap.add_argument("out")
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--threads", type=int, default=12)
    ap.add_argument("--calibration", help="a text file for `llamba quantize --calibration` (not CORPUS)")
    args = ap.parse_args()
    # the bar's two formats first, then the calibrated ones, then the diagnostics: the file is rewritten after each
    # row, so a run cut short (full_run.sh bounds it) keeps what it measured
    formats = {k: FORMATS[k] for k in ("float32", "int8", "int4 + int8 MLPs")}
    if args.calibration:
        for name, method in (("int4 + int8 MLPs", "scales+bias"), ("int4 + int8 MLPs", "bias"), ("int8", "scales+bias")):
            formats[f"{name}, calibrated {method}"] = [*FORMATS[name], "--calibration", args.calibration,
                                                       "--calibration-method", method]
    formats.update(FORMATS)
    torch.set_num_threads(args.threads)

    from llamba.quant import load_for_cpu
    from llamba.quant.perplexity import corpus_tokens, perplexity

    out = Path(args.out)
    work = out.parent / "artifacts"
    work.mkdir(parents=True, exist_ok=True)
    values, commands, tokens = {}, {}, None
    for name, flags in formats.items():
        path = args.student
        if flags is not None:
            path = str(work / (name.replace(" ", "").replace("+", "-").replace(",", "-") + ".safetensors"))
            cmd = [sys.executable, "-m", "llamba.cli", "quantize", args.student, *flags, "--out", path, "--force"]
            subprocess.run(cmd, check=True)
            commands[name] = "llamba quantize STUDENT " + " ".join(flags).replace(str(args.calibration), "T") + " --out A"
        decoder = load_for_cpu(path, "none" if flags is None else None, threads=args.threads)
        if tokens is None:
            tokens = corpus_tokens(args.corpus, decoder.tokenizer, args.tokens)
        t0 = time.perf_counter()
        values[name] = perplexity(decoder.model, tokens, 1024)
        print(f"[quant ppl] {name}: {values[name]:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
        base = values["float32"]
        result = {"student": args.student, "file": Path(args.corpus).name, "tokens": args.tokens, "window": 1024,
                  "perplexity": values, "ratio_to_float32": {k: v / base for k, v in values.items()},
                  "commands": commands, "threads": args.threads,
                  "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
        out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
