"""Standalone CPU benchmark: student (float32, int8, int4) vs the teacher in llama.cpp and transformers.

    python benchmarks/bench_cpu.py --contexts 512 2048 4096 8192 16384 --out results/edge-cpu.json
Same as ``llamba bench --device cpu``; see llamba/bench/cpu.py for what is measured and how.
"""

import argparse
import os
import sys

from llamba.bench.cpu import DEFAULT_CONTEXTS, main

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="student checkpoint folder (default: convert one from the teacher)")
    p.add_argument("--teacher", default="smollm2-135m")
    p.add_argument("--contexts", type=int, nargs="+", default=DEFAULT_CONTEXTS)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--quant", nargs="+", default=["none", "int8", "int4"], choices=["none", "int8", "int4"])
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--repeats", type=int, default=3, help="interleaved decode rounds per context (median kept)")
    p.add_argument("--rivals", nargs="*", default=["llama.cpp", "transformers"])
    p.add_argument("--ppl-tokens", type=int, default=0, help="also report validation perplexity on this many tokens")
    p.add_argument("--out", default="results/edge-cpu.json")
    sys.exit(main(p.parse_args()))
