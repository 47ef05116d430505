"""The scan at small batch x heads, where the carry through the chunks has few programs: its two routes, forward
and backward, in GPU time (summed kernel times), with fla's forward alongside. The two-kernel route ("two_kernel")
carries the state, or its gradient, through the chunks in a light sequential pass and leaves the rest to programs
per chunk; the one-pass kernels ("fused") hold the state, or its gradient, in registers through all chunks and do
everything on the way. The data behind the dispatch's threshold (``FUSED_MIN_PROGRAMS_PER_SM``).

    python benchmarks/scan_small_batch.py --out results/scan-small-batch-h100      # writes .json and .md
"""

import argparse
import json
import sys

import torch

from llamba.bench import report
from llamba.bench.kernels import _gpu_ms, _scan_inputs
from llamba.ops.ssd import triton_chunk as tc

SHAPES = [(1, 8192, 9, 64), (1, 2048, 9, 64), (2, 2048, 9, 64), (4, 2048, 9, 64), (8, 2048, 9, 64),
          (16, 2048, 9, 64)]  # SmolLM2: 9 heads of 64


ROUTES = ("two_kernel", "fused")


def dispatch(batch_heads: int, P: int, device) -> str:
    """The route ``ssd_chunk_triton`` takes (d_state = head dim)."""
    return "fused" if tc.AUTO.fused_forward(batch_heads, P, device) else "two_kernel"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/scan-small-batch-h100", help="output path without suffix")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("scan_small_batch.py needs CUDA")
    try:
        from fla.ops.simple_gla import chunk_simple_gla
    except ImportError:
        chunk_simple_gla = None
    rows = []
    for batch, T, H, D in SHAPES:
        x, B, C, la = _scan_inputs(batch, T, H, D, "cuda")
        dy = torch.randn_like(x)
        row = {"shape": f"B{batch} T{T} H{H} D{D}"}
        if chunk_simple_gla is not None:
            with torch.no_grad():
                row["fla_fwd_gpu_ms"] = _gpu_ms(lambda: chunk_simple_gla(C, B, x, g=la, scale=1.0,
                                                                         output_final_state=True))
        outputs = {}
        for route in ROUTES:
            forced = tc.Dispatch(forward=route)
            with torch.no_grad():
                fwd = lambda: tc.ssd_chunk_triton(x, B, C, la, dispatch=forced)  # noqa: E731
                outputs[route] = fwd()[0].float()
                row[f"{route}_fwd_gpu_ms"] = _gpu_ms(fwd)
            _, _, states = tc._forward(x, B, C, la, None, None, keep_states=True, dispatch=forced)
            row[f"{route}_bwd_gpu_ms"] = _gpu_ms(lambda: tc._backward(x, B, C, la, None, states, dy, None, None,
                                                                      False, forced))
        row["dispatch"] = dispatch(batch * H, D, x.device)
        row["rel_diff"] = max(((out - outputs["two_kernel"]).norm() / outputs["two_kernel"].norm()).item()
                              for out in outputs.values())
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {**report.provenance(), "rows": rows}
    table = ["| shape | fla fwd | fwd " + " | fwd ".join(ROUTES) + " | bwd " + " | bwd ".join(ROUTES)
             + " | dispatch picks | max rel diff between routes |", "|" + "---|" * (2 * len(ROUTES) + 4)]
    for r in rows:
        times = [f"{r[f'{route}_{part}_gpu_ms']:.4f}" for part in ("fwd", "bwd") for route in ROUTES]
        table.append(f"| {r['shape']} | {r.get('fla_fwd_gpu_ms', float('nan')):.4f} | " + " | ".join(times)
                     + f" | {r['dispatch']} | {r['rel_diff']:.1e} |")
    print(report.write(args.out, result, "Scan at small batch x heads: its two routes", table,
                       notes=("GPU time (summed kernel times), ms; bf16, d_state = head dim",)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
