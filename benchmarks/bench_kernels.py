"""Mixer kernels on one GPU: the chunked scan against flash-linear-attention's chunk_simple_gla (forward) and
against our own forward (backward), the fused prefill conv against the PyTorch path, the fused decode step against
its bytes floor. A few seconds; the whole-model benchmark (bench_gpu.py) includes the same table.

    python benchmarks/bench_kernels.py --out results/kernels-h100      # writes .json and .md
    python benchmarks/bench_kernels.py --only decode_step --out ...     # one table (GateLoop's theta routes in it)
"""

import argparse
import sys

import torch

from llamba.bench import report
from llamba.bench.measure import measure_hardware
from llamba.bench.kernels import TABLES, run_all, to_markdown


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/kernels-h100", help="output path without suffix")
    parser.add_argument("--only", nargs="+", choices=TABLES, default=TABLES, help="the tables to run (default: all)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels.py needs CUDA")
    hw = measure_hardware()
    results = {**report.provenance(), "hardware": hw, **run_all(hw["bandwidth_gbs"], tuple(args.only))}
    print(report.write(args.out, results, "Mixer kernels", to_markdown(results),
                       notes=(f"measured copy bandwidth {hw['bandwidth_gbs']:.0f} GB/s",)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
