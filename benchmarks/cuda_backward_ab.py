"""Versions of the CUDA scan backward (``llamba/ops/ssd/cuda_backward.cu``) side by side on one GPU: the current
source and any variants of it against a baseline copy (e.g. an earlier commit's), on the kernel table's
head-dim-128 shapes, at 8 and 16 warps. Every version's gradients are checked against the baseline's first; the
versions take turns over a few rounds and each keeps its best median (GPU time from device events, ``do_bench``).
Prints a table and writes JSON.

    git show HEAD~1:llamba/ops/ssd/cuda_backward.cu > /tmp/base.cu
    python benchmarks/cuda_backward_ab.py --baseline /tmp/base.cu [--variant /tmp/idea.cu ...] --out ab
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

from llamba.bench import report
from llamba.bench.kernels import SCAN_SHAPES, _rel, _scan_inputs, scan_label
from llamba.ops.ssd import cuda_backward as cb
from llamba.ops.ssd import triton_chunk as tc


def run(source: Path, warps: int, args: tuple) -> tuple:
    """The backward's outputs (dx, dB, dC, dla, d_init) from the kernel built from ``source``."""
    cb.SOURCE, cb.WARPS = source, warps
    x, B, C, la, states, dy = args
    dx, dB, dC = torch.empty_like(x), torch.empty_like(B), torch.empty_like(C)
    dla = torch.empty_like(la)
    d_init = cb.backward(x, B, C, la, None, states, dy, None, dx, dB, dC, dla)
    return dx, dB, dC, dla, d_init


def median_ms(source: Path, warps: int, args: tuple) -> float:
    return do_bench(lambda: run(source, warps, args), warmup=25, rep=100, return_mode="median")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", required=True, type=Path, help="the .cu file to compare against")
    parser.add_argument("--variant", type=Path, action="append", default=[], help="another .cu file to time")
    parser.add_argument("--out", default="cuda-backward-ab", help="output path without .json")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("cuda_backward_ab.py needs CUDA")
    current, warps0 = cb.SOURCE, cb.WARPS
    sources = {"baseline": args.baseline, "current": current, **{path.stem: path for path in args.variant}}
    versions = {f"{name} w{warps}": (path, warps) for name, path in sources.items() for warps in (8, 16)}
    rows = []
    for batch, T, H, P, N in [s for s in SCAN_SHAPES if s[3] == 128]:
        torch.manual_seed(0)
        x, B, C, la = _scan_inputs(batch, T, H, P, "cuda", N=N)
        _, _, states = tc._forward(x, B, C, la, None, None, keep_states=True)
        inputs = (x, B, C, la, states, torch.randn_like(x))
        want = run(args.baseline, 8, inputs)
        row = {"shape": scan_label(batch, T, H, P, N), "rel_err": {}, "ms": {}}
        for name, (path, warps) in versions.items():
            got = run(path, warps, inputs)
            row["rel_err"][name] = max(_rel(g, w) for g, w in zip(got, want))
        for _ in range(args.rounds):
            for name, (path, warps) in versions.items():
                row["ms"][name] = min(row["ms"].get(name, float("inf")), median_ms(path, warps, inputs))
        rows.append(row)
        del x, B, C, la, states, inputs, want
        torch.cuda.empty_cache()
    cb.SOURCE, cb.WARPS = current, warps0
    result = {**report.provenance(), "baseline": str(args.baseline), "rows": rows}
    Path(args.out + ".json").write_text(json.dumps(result, indent=1))
    names = list(versions)
    print("| shape | version | ms | / baseline w8 | rel err vs baseline |")
    print("|---|---|---|---|---|")
    for row in rows:
        for name in names:
            ms, ratio = row["ms"][name], row["ms"][name] / row["ms"]["baseline w8"]
            print(f"| {row['shape']} | {name} | {ms:.3f} | {ratio:.3f} | {row['rel_err'][name]:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
