"""Registers, spills and shared memory of every Triton kernel of llamba, compiled for a GPU on this machine, which
needs none (``llamba.bench.registers``). Prints a markdown table.

    python scripts/kernel_registers.py                # sm_90a (H100/H200), 132 SMs
    python scripts/kernel_registers.py --arch 80 --sms 108
"""

import argparse

import triton

from llamba.bench.registers import compile_report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    parser.add_argument("--sms", type=int, default=132, help="SM count the dispatch sees (132: H100 SXM)")
    args = parser.parse_args()
    print(f"Triton {triton.__version__}, compute capability {args.arch}, {args.sms} SMs, ptxas -v\n")
    print("| kernel | tiles and flags | warps | stages | registers | spill stores / loads (bytes) | shared KiB |")
    print("|---|---|---|---|---|---|---|")
    for r in compile_report(args.arch, args.sms):
        fits = "" if r["shared_fits"] else " (too much)"
        print(f"| {r['kernel']} | {r['flags']} | {r['warps']} | {r['stages']} | {r['registers']} | "
              f"{r['spill_stores']} / {r['spill_loads']} | {r['shared'] / 1024:.0f}{fits} |")


if __name__ == "__main__":
    main()
