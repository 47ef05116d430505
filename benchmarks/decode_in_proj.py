"""The student's decode step with in_proj run three ways, side by side in one process (``in_proj_route`` in
llamba/generation/engine.py picks among them from these numbers):

    one     one GEMM over all of in_proj's rows: its width (here 2313) is not a multiple of 8
    split   an aligned GEMM for the [xBC | z] rows and a tiny one for the A_log rows (one per head)
    kernel  the aligned GEMM, and A_log computed inside the fused decode kernel from the normed input

Whole decode steps (CUDA graphs, compiled dense pieces, as bench_gpu.py runs them), SmolLM2-135M shapes with random
bf16 weights; the routes take turns for a few rounds and each keeps its best.

    python benchmarks/decode_in_proj.py --out results/decode-in-proj-h100     # writes .json and .md
"""

import argparse
import json
import sys

import torch

from llamba.bench import report
from llamba.bench.measure import build_models, cuda_time, free_memory, random_prompts
from llamba.generation import engine
from llamba.generation.sampling import SamplingParams

ROUTES = ("one", "split", "kernel")


def step_ms(student, batch: int, route: str, ids: torch.Tensor, steps: int) -> tuple[float, torch.Tensor]:
    """Milliseconds per graph-replayed decode step on ``route``, and the first step's logits."""
    dec = engine.Decoder(student, batch, SamplingParams(), (), 0, steps + 8, use_graph=True, compile=True, in_proj=route)
    dec.start(ids, None, 64)
    logits = dec.decode_logits(dec.tok).float()
    ms = cuda_time(lambda: [dec.advance() for _ in range(steps)], warm=False) / steps * 1e3
    del dec
    free_memory()
    return ms, logits


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/decode-in-proj-h100", help="output path without suffix")
    parser.add_argument("--batches", default="1,8,64,256,1024")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("decode_in_proj.py needs CUDA")
    _, student, source = build_models(None, None)
    rows = []
    with torch.no_grad():
        for batch in (int(b) for b in args.batches.split(",")):
            ids = random_prompts(batch, 64, student.config.vocab_size)
            best, logits = {r: float("inf") for r in ROUTES}, {}
            for _ in range(args.rounds):
                for route in ROUTES:
                    ms, logits[route] = step_ms(student, batch, route, ids, args.steps)
                    best[route] = min(best[route], ms)
            # bf16 rounding of A_log differs between the routes; through 30 random layers it shows in the logits
            diff = {r: ((logits[r] - logits["one"]).norm() / logits["one"].norm()).item() for r in ROUTES[1:]}
            rows.append({"batch": batch, **{f"{r}_ms": best[r] for r in ROUTES},
                         "kernel_over_best_other": min(best["one"], best["split"]) / best["kernel"],
                         **{f"{r}_logits_rel_diff_vs_one": d for r, d in diff.items()}})
            print(json.dumps(rows[-1]), flush=True)
    result = {**report.provenance(), "models": source, "rows": rows}
    table = ["| batch | one ms | split ms | kernel ms | kernel / best other (speedup) | logits vs one: split / kernel |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r['batch']} | {r['one_ms']:.3f} | {r['split_ms']:.3f} | {r['kernel_ms']:.3f} | "
                     f"{r['kernel_over_best_other']:.2f} | {r['split_logits_rel_diff_vs_one']:.3f} / "
                     f"{r['kernel_logits_rel_diff_vs_one']:.3f} |")
    print(report.write(args.out, result, "Student decode step, in_proj three ways", table,
                       notes=(f"models: {source}", "ms per decode step (CUDA graph), best of the rounds")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
