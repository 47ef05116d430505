"""Where a decode step's time goes, student and teacher as bench_gpu.py runs them (compiled dense pieces; SmolLM2-135M
shapes, random bf16 weights): kernels per step and their summed GPU time (profiler, the step run eagerly with the
same compiled functions), the step's time replayed as a CUDA graph, and the kernels that take the most.
If the kernels' own time is close to the graph's, the step is bound by the kernels, not by the host.

    python scripts/profile_decode_step.py --out results/decode-profile-h100     # writes .json and .md
"""

import argparse
import sys
from collections import Counter

import torch

from llamba.bench import report
from llamba.bench.measure import build_models, cuda_time, free_memory, random_prompts
from llamba.bench.kernels import cuda_profile
from llamba.bench.llama_static import StaticLlama
from llamba.generation.engine import Decoder
from llamba.generation.sampling import SamplingParams


def kernels_per_step(step, steps: int = 10) -> tuple[float, float, Counter]:
    """(kernels per step, milliseconds of kernel time per step, microseconds per step by kernel name)."""
    events = [e for e in cuda_profile(step, steps).events()
              if e.device_type == torch.autograd.DeviceType.CUDA and e.device_time_total > 0]
    by_name = Counter()
    for e in events:
        by_name[e.name[:70]] += e.device_time_total / steps
    return len(events) / steps, sum(by_name.values()) / 1e3, by_name


def make(model: str, teacher, student, batch: int, prompt: int, graph: bool):
    if model == "student":
        dec = Decoder(student, batch, SamplingParams(), (), 0, 64, use_graph=graph, compile=True)
        dec.start(random_prompts(batch, prompt, student.config.vocab_size), None, 64)
        return dec
    st = StaticLlama(teacher, batch, prompt + 64, compile=True)
    if graph:
        st.capture()
    st.start(random_prompts(batch, prompt, teacher.config.vocab_size), 64)
    return st


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/decode-profile-h100", help="output path without suffix")
    parser.add_argument("--batches", default="1,256")
    parser.add_argument("--prompt", type=int, default=2048)
    parser.add_argument("--top", type=int, default=8)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_decode_step.py needs CUDA")
    teacher, student, source = build_models(None, None)
    rows = []
    with torch.no_grad():
        for batch in (int(b) for b in args.batches.split(",")):
            for model in ("student", "teacher"):
                eager = make(model, teacher, student, batch, args.prompt, graph=False)
                count, kernel_ms, by_name = kernels_per_step(eager.step)
                del eager
                replayed = make(model, teacher, student, batch, args.prompt, graph=True)
                graph_ms = cuda_time(lambda: [replayed.advance() for _ in range(40)], warm=False) / 40 * 1e3
                del replayed
                free_memory()
                rows.append({"model": model, "batch": batch, "prompt": args.prompt, "kernels_per_step": count,
                             "kernel_ms": kernel_ms, "graph_step_ms": graph_ms,
                             "top_kernels_us": dict(by_name.most_common(args.top))})
                print(rows[-1], flush=True)
    result = {**report.provenance(), "models": source, "rows": rows}
    tables = ["| model | batch | kernels per step | kernel time ms | graph step ms |", "|---|---|---|---|---|"]
    tables += [f"| {r['model']} | {r['batch']} | {r['kernels_per_step']:.0f} | {r['kernel_ms']:.3f} | "
               f"{r['graph_step_ms']:.3f} |" for r in rows]
    for r in rows:
        tables += ["", f"{r['model']}, batch {r['batch']}: the kernels that take the most (us per step)", "",
                   "| us | kernel |", "|---|---|"]
        tables += [f"| {us:.1f} | `{name}` |" for name, us in r["top_kernels_us"].items()]
    print(report.write(args.out, result, "Decode step profile, student and teacher", tables,
                       notes=(f"models: {source}", f"prompt {args.prompt}; kernel time from the profiler over 10 "
                              "eager steps, graph step from 40 replays")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
