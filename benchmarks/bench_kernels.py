"""Mixer kernels on one GPU: the chunked scan against flash-linear-attention's chunk_simple_gla (forward) and
against our own forward (backward), the fused prefill conv against the PyTorch path, the fused decode step against
its bytes floor. A few seconds; the whole-model benchmark (bench_gpu.py) includes the same table.

    python benchmarks/bench_kernels.py --out results/kernels-h100      # writes .json and .md
"""

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch
import triton

from llamba.bench.gpu import measure_hardware
from llamba.bench.kernels import run_all, to_markdown


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/kernels-h100", help="output path without suffix")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels.py needs CUDA")
    hw = measure_hardware()
    results = {"command": "python " + " ".join(sys.argv),
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
               "hardware": hw, **run_all(hw["bandwidth_gbs"])}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    md = "\n".join([f"# Mixer kernels ({results['device']})", "", f"- command: `{results['command']}`",
                    f"- date: {results['date']}; torch {results['torch']}, triton {results['triton']}",
                    f"- measured copy bandwidth {hw['bandwidth_gbs']:.0f} GB/s", "", *to_markdown(results), ""])
    out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
