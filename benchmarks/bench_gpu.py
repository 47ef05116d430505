"""Throughput benchmark on one GPU: Llamba student vs compiled static-KV Llama teacher vs transformers.generate.

    python benchmarks/bench_gpu.py [llamba bench options]     # writes results/bench-h100.{json,md} and PNG plots
"""

import sys

from llamba.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--device", "cuda", *sys.argv[1:]]))
