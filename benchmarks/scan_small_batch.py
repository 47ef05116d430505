"""The scan at small batch x heads, where the carry through the chunks has few programs: the carry in one
sequential pass against the carry split into per-chunk local states and a light sequential pass (what the
dispatch picks there), forward and backward, GPU time (summed kernel times); fla's forward alongside.

    python benchmarks/scan_small_batch.py --out results/scan-small-batch-h100      # writes .json and .md
"""

import argparse
import json
import sys
from unittest.mock import patch

import torch

from llamba.bench import report
from llamba.bench.kernels import _gpu_ms, _scan_inputs
from llamba.ops.ssd import triton_chunk as tc

SHAPES = [(1, 8192, 9, 64), (1, 2048, 9, 64), (2, 2048, 9, 64), (8, 2048, 9, 64)]  # SmolLM2: 9 heads of 64


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
        for carry, split in (("one_pass", False), ("split", True)):
            with patch.object(tc, "_split_carry", lambda programs, device: split):
                with torch.no_grad():
                    fwd = lambda: tc.ssd_chunk_triton(x, B, C, la)  # noqa: E731
                    outputs[carry] = fwd()[0].float()
                    row[f"{carry}_fwd_gpu_ms"] = _gpu_ms(fwd)
                _, _, states = tc._forward(x, B, C, la, None, None, keep_states=True)
                row[f"{carry}_bwd_gpu_ms"] = _gpu_ms(lambda: tc._backward(x, B, C, la, None, states, dy, None, None,
                                                                          False))
        programs = batch * H * 2  # the one-pass carry's programs at these shapes (32 x 64 state tiles)
        row["dispatch"] = "split" if tc._split_carry(programs, x.device) else "one_pass"
        row["split_rel_diff"] = ((outputs["split"] - outputs["one_pass"]).norm() / outputs["one_pass"].norm()).item()
        for part in ("fwd", "bwd"):
            row[f"{part}_one_pass_over_split"] = row[f"one_pass_{part}_gpu_ms"] / row[f"split_{part}_gpu_ms"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {**report.provenance(), "rows": rows}
    table = ["| shape | fla fwd | fwd one-pass | fwd split | one-pass / split | bwd one-pass | bwd split | "
             "one-pass / split | dispatch picks | split vs one-pass rel diff |", "|" + "---|" * 10]
    for r in rows:
        table.append(f"| {r['shape']} | {r.get('fla_fwd_gpu_ms', float('nan')):.4f} | "
                     f"{r['one_pass_fwd_gpu_ms']:.4f} | {r['split_fwd_gpu_ms']:.4f} | "
                     f"{r['fwd_one_pass_over_split']:.2f} | {r['one_pass_bwd_gpu_ms']:.4f} | "
                     f"{r['split_bwd_gpu_ms']:.4f} | {r['bwd_one_pass_over_split']:.2f} | "
                     f"{r['dispatch']} | {r['split_rel_diff']:.1e} |")
    print(report.write(args.out, result, "Scan at small batch x heads: one-pass or split carry", table,
                       notes=("GPU time (summed kernel times), ms; bf16, d_state = head dim",)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
