"""GPU throughput benchmark: the Llamba student against its Llama teacher, side by side in one process.

Rivals: the student (CUDA-graph decode loop, fused Triton step, Triton chunked scan for prefill); the teacher as
a strong static-KV-cache decode (SDPA, ``torch.compile``, one CUDA graph per step, last-position prefill logits);
and plain ``transformers.generate`` as the common baseline. Every figure stands next to its floor: bytes moved per
step over the measured copy bandwidth, and FLOPs over the measured bf16 matmul rate. Speed does not depend on the
weights' values, so by default both models are built from the SmolLM2-135M shapes with random bf16 weights.
"""

from __future__ import annotations

import datetime
import json
import platform
import sys
from pathlib import Path

import torch

from llamba.bench.measure import (build_models, decode_floor, device_slug, fit_batch, fmt, free_memory,
                                  hf_generate, measure_hardware, param_bytes, param_count, prefill_rates,
                                  student_decode, student_step_bytes, teacher_attn_flops, teacher_decode,
                                  teacher_step_bytes)
from llamba.bench.variants import (hybrid_layers, hybrid_study, hybrids_markdown, mixer_study, mixers_markdown,
                                   teacher_layer_count)


# -- the whole run --------------------------------------------------------------------------------------------
def run_benchmark(args) -> dict:
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = 64
    torch.backends.cuda.matmul.allow_tf32 = True
    # a --hybrids list past the teacher's layers fails here, before any GPU work, not after the teacher's rows
    n_layer = teacher_layer_count(args.teacher)
    hybrid_sets = [hybrid_layers(spec, n_layer) for spec in args.hybrids]
    hw = measure_hardware()
    teacher, student, source = build_models(args.teacher, args.model)
    results = {
        "command": " ".join(sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version(),
        "models": source, "hardware": hw,
        "student_params": param_count(student), "teacher_params": param_count(teacher),
    }
    import transformers
    import triton
    results["transformers"], results["triton"] = transformers.__version__, triton.__version__
    sw, tw = param_bytes(student), param_bytes(teacher)
    sn, tn = param_count(student), param_count(teacher)
    s_seq = student_step_bytes(student)
    new = args.new_tokens
    partial = Path(args.out).with_suffix(".partial.json")

    def log(*a):  # progress, and the results so far on disk in case the run is cut short
        print(*a, flush=True)
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps(results, indent=1))

    if not args.skip_kernels:
        from llamba.bench.kernels import run_all
        results["kernels"] = run_all(hw["bandwidth_gbs"])
        log("kernels", results["kernels"])

    # Decode throughput per batch size.
    results["decode"] = []
    for prompt in args.prompts:
        for who in ("student", "teacher"):
            for batch in args.batches:
                row = {"model": who, "prompt": prompt, "batch": batch, "new_tokens": new}
                try:
                    if who == "student":
                        row.update(student_decode(student, batch, prompt, new, not args.no_compile))
                        row["floor_tok_s"] = decode_floor(hw, sw, sn, batch, s_seq)
                    else:
                        row.update(teacher_decode(teacher, batch, prompt, new, not args.no_compile))
                        ctx = prompt + new / 2
                        row["floor_tok_s"] = decode_floor(hw, tw, tn, batch, teacher_step_bytes(teacher, ctx),
                                                          teacher_attn_flops(teacher, ctx))
                    row["of_floor"] = row["decode_tok_s"] / row["floor_tok_s"]
                except torch.OutOfMemoryError:
                    row["oom"] = True
                    free_memory()
                results["decode"].append(row)
                log(row)
                if row.get("oom"):
                    break

    # Plain transformers.generate, the common baseline.
    results["hf_generate"] = []
    for prompt, batch in args.hf_configs:
        row = {"prompt": prompt, "batch": batch, "new_tokens": new}
        try:
            row.update(hf_generate(teacher, batch, prompt, new))
        except torch.OutOfMemoryError:
            row["oom"] = True
            free_memory()
        results["hf_generate"].append(row)
        log("hf", row)

    # Prefill.
    results["prefill"] = prefill_rates(teacher, student, compile=not args.no_compile)
    for row in results["prefill"]:
        T = row["context"]
        # Chunked scan, per token and head: C B^T and the masked product (2 * 64 * (N + P)), two state products (4 P N).
        cfg = student.config
        scan_per_token = cfg.n_layer * cfg.n_v_heads * (2 * 64 * (cfg.d_state + cfg.head_dim)
                                                        + 4 * cfg.head_dim * cfg.d_state)
        flops_s = 2 * sn * T + scan_per_token * T
        flops_t = 2 * tn * T + 2 * teacher.config.num_hidden_layers * teacher.config.hidden_size * T * T
        row["student_floor_tok_s"] = T / (flops_s / (hw["matmul_tflops"] * 1e12))
        row["teacher_floor_tok_s"] = T / (flops_t / (hw["matmul_tflops"] * 1e12))
    log("prefill", results["prefill"])

    # Decode at batch 16 as the context grows.
    results["context_sweep"] = []
    for ctx in args.contexts:
        row = {"context": ctx, "batch": 16, "new_tokens": args.sweep_new_tokens}
        try:
            s = student_decode(student, 16, ctx, args.sweep_new_tokens, not args.no_compile)
            row["student_tok_s"], row["student_peak_gib"] = s["decode_tok_s"], s["peak_gib"]
            row["student_floor_tok_s"] = decode_floor(hw, sw, sn, 16, s_seq)
            t = teacher_decode(teacher, 16, ctx, args.sweep_new_tokens, not args.no_compile)
            row["teacher_tok_s"], row["teacher_peak_gib"] = t["decode_tok_s"], t["peak_gib"]
            c = ctx + args.sweep_new_tokens / 2
            row["teacher_floor_tok_s"] = decode_floor(hw, tw, tn, 16, teacher_step_bytes(teacher, c),
                                                      teacher_attn_flops(teacher, c))
        except torch.OutOfMemoryError:
            row["oom"] = True
            free_memory()
        results["context_sweep"].append(row)
        log("sweep", row)

    results["largest_batch"] = largest_batch(student, teacher, args, results["decode"])
    log("largest", results["largest_batch"])

    del student
    free_memory()
    results["hybrids"] = [hybrid_study(teacher, hw, layers, args, log) for layers in hybrid_sets]
    results["mixers"] = [mixer_study(teacher, hw, m, args, log) for m in getattr(args, "mixers", [])]
    return results


def largest_batch(student, teacher, args, decode_rows) -> dict:
    """Largest batch whose peak memory (weights, cache, prefill and decode working memory) stays within the
    budget at prompt 2048: a line through two measured peaks predicts it, one real run checks it."""
    budget = args.memory_budget_gib
    prompt = max(args.prompts)
    out = {"budget_gib": budget, "prompt": prompt, "new_tokens": 16}
    for who in ("student", "teacher"):
        rows = [r for r in decode_rows
                if r["model"] == who and r["prompt"] == prompt and not r.get("oom") and r["batch"] >= 8]
        if len(rows) < 2:
            continue
        run = student_decode if who == "student" else teacher_decode
        model = student if who == "student" else teacher
        out[who] = fit_batch(lambda b, run=run, model=model: run(model, b, prompt, 16, not args.no_compile), rows,
                              budget)
    if "batch" in out.get("student", {}) and "batch" in out.get("teacher", {}):
        out["ratio"] = out["student"]["batch"] / out["teacher"]["batch"]
    return out


# -- reporting ------------------------------------------------------------------------------------------------
def to_markdown(r: dict) -> str:
    hw = r["hardware"]
    lines = [f"# GPU benchmark: Llamba student vs Llama teacher ({r['device']})", "",
             f"- command: `{r['command']}`", f"- date: {r['date']}; torch {r['torch']}, triton {r.get('triton')}, "
             f"transformers {r.get('transformers')}", f"- models: {r['models']} ({r['student_params']:,} / "
             f"{r['teacher_params']:,} parameters, student / teacher)",
             f"- measured: copy bandwidth {hw['bandwidth_gbs']:.0f} GB/s, bf16 matmul {hw['matmul_tflops']:.0f} TFLOP/s; "
             "floors = max(bytes / bandwidth, FLOPs / matmul rate)", ""]
    if "kernels" in r:
        from llamba.bench.kernels import to_markdown as kernels_markdown

        lines += ["## Mixer kernels: chunked scan (bf16, d_state = head dim), prefill conv, fused decode step", ""]
        lines += kernels_markdown(r["kernels"]) + [""]
    lines += ["## Decode tokens/s (greedy, CUDA graphs both sides)", "",
              "| prompt | batch | student tok/s | floor | teacher (compiled, static KV) tok/s | floor | student / teacher | peak GiB s / t |",
              "|---|---|---|---|---|---|---|---|"]
    by = {(d["model"], d["prompt"], d["batch"]): d for d in r["decode"]}
    for (who, prompt, batch), d in by.items():
        if who != "student":
            continue
        t = by.get(("teacher", prompt, batch), {})
        ratio = d.get("decode_tok_s", 0) / t["decode_tok_s"] if t.get("decode_tok_s") and d.get("decode_tok_s") else None
        lines.append(f"| {prompt} | {batch} | {fmt(d.get('decode_tok_s'))}{' OOM' if d.get('oom') else ''} | "
                     f"{fmt(d.get('floor_tok_s'))} | {fmt(t.get('decode_tok_s'))}{' OOM' if t.get('oom') else ''} | "
                     f"{fmt(t.get('floor_tok_s'))} | {fmt(ratio, 2)} | {fmt(d.get('peak_gib'), 1)} / {fmt(t.get('peak_gib'), 1)} |")
    if r.get("hf_generate"):
        lines += ["", "Plain `transformers.generate` (teacher, dynamic cache, eager), new tokens per second end to end:", "",
                  "| prompt | batch | tok/s | peak GiB |", "|---|---|---|---|"]
        for h in r["hf_generate"]:
            lines.append(f"| {h['prompt']} | {h['batch']} | {fmt(h.get('new_tok_s'))}{' OOM' if h.get('oom') else ''} | {fmt(h.get('peak_gib'), 1)} |")
    lines += ["", "## Prefill tokens/s", "",
              "Each prefill replayed from one CUDA graph (GPU-bound); the last column launched from the host, kernel by "
              "kernel (bound by this host's launch rate):", "",
              "| context | batch | student | floor | teacher | floor | student / teacher | from the host: student / teacher |",
              "|---|---|---|---|---|---|---|---|"]
    for p in r["prefill"]:
        host = f"{fmt(p['student_host_tok_s'])} / {fmt(p['teacher_host_tok_s'])}" if "student_host_tok_s" in p else ""
        lines.append(f"| {p['context']} | {p['batch']} | {fmt(p['student_tok_s'])} | {fmt(p['student_floor_tok_s'])} | "
                     f"{fmt(p['teacher_tok_s'])} | {fmt(p['teacher_floor_tok_s'])} | "
                     f"{fmt(p['student_tok_s'] / p['teacher_tok_s'], 2)} | {host} |")
    lines += ["", "## Decode at batch 16 as the context grows", "",
              "| context | student tok/s | floor | teacher tok/s | floor | student / teacher |", "|---|---|---|---|---|---|"]
    for c in r["context_sweep"]:
        ratio = c["student_tok_s"] / c["teacher_tok_s"] if c.get("teacher_tok_s") else None
        lines.append(f"| {c['context']} | {fmt(c.get('student_tok_s'))} | {fmt(c.get('student_floor_tok_s'))} | "
                     f"{fmt(c.get('teacher_tok_s'))}{' OOM' if c.get('oom') else ''} | {fmt(c.get('teacher_floor_tok_s'))} | {fmt(ratio, 2)} |")
    lb = r.get("largest_batch", {})
    if lb:
        lines += ["", f"## Largest batch in {lb['budget_gib']} GiB (prompt {lb['prompt']}, weights included)", "",
                  "| model | batch | peak GiB | GiB per sequence | decode tok/s there |", "|---|---|---|---|---|"]
        for who in ("student", "teacher"):
            e = lb.get(who, {})
            lines.append(f"| {who} | {fmt(e.get('batch'))} | {fmt(e.get('peak_gib'), 2)} | {fmt(e.get('gib_per_seq'), 4)} | {fmt(e.get('decode_tok_s'))} |")
        if "ratio" in lb:
            lines.append(f"\nstudent / teacher largest batch: {lb['ratio']:.1f}x")
    lines += hybrids_markdown(r.get("hybrids") or [], r.get("decode") or [], r.get("largest_batch"))
    lines += mixers_markdown(r.get("mixers") or [], r.get("decode") or [])
    return "\n".join(lines) + "\n"


def plot(r: dict, out_dir: Path, stem: str = "bench") -> list[Path]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    paths = []
    fig, axes = plt.subplots(1, len(set(d["prompt"] for d in r["decode"])), figsize=(11, 4), squeeze=False)
    for ax, prompt in zip(axes[0], sorted(set(d["prompt"] for d in r["decode"]))):
        for who, style in (("student", "o-"), ("teacher", "s-")):
            rows = [d for d in r["decode"] if d["model"] == who and d["prompt"] == prompt and d.get("decode_tok_s")]
            ax.plot([d["batch"] for d in rows], [d["decode_tok_s"] for d in rows], style, label=who)
            ax.plot([d["batch"] for d in rows], [d["floor_tok_s"] for d in rows], style[0] + ":", alpha=0.5, label=f"{who} floor")
        ax.set(xscale="log", yscale="log", xlabel="batch", ylabel="decode tokens/s", title=f"prompt {prompt}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out_dir / f"{stem}-decode.png")
    fig.savefig(paths[-1], dpi=120)
    fig, ax = plt.subplots(figsize=(6, 4))
    rows = [c for c in r["context_sweep"] if c.get("student_tok_s")]
    ax.plot([c["context"] for c in rows], [c["student_tok_s"] for c in rows], "o-", label="student")
    ax.plot([c["context"] for c in rows if c.get("teacher_tok_s")], [c["teacher_tok_s"] for c in rows if c.get("teacher_tok_s")], "s-", label="teacher")
    ax.set(xscale="log", yscale="log", xlabel="context", ylabel="decode tokens/s (batch 16)", title="decode vs context")
    ax.legend()
    fig.tight_layout()
    paths.append(out_dir / f"{stem}-context.png")
    fig.savefig(paths[-1], dpi=120)
    return paths


def main(args) -> int:
    if not torch.cuda.is_available():
        raise ValueError("the GPU benchmark needs CUDA; use --device cpu for the CPU benchmark")
    args.out = args.out or f"results/bench-{device_slug()}"  # run_benchmark keeps its partial rows beside it
    out = Path(args.out)
    results = run_benchmark(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    json_path = out.with_suffix(".json")
    json_path.write_text(json.dumps(results, indent=1))
    md = to_markdown(results)
    out.with_suffix(".md").write_text(md)
    plot(results, out.parent, out.name)
    print(md)
    return 0
