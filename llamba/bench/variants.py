"""`llamba bench`'s variants beside the pure student: hybrids that keep K of the teacher's attention layers (issue
23's speed bars) and students with another mixer (GateLoop, issue 22's), each through the same engine and
measurements as the pure student (``measure.py``), with the tables that read their bars as ratios to the teacher
of the same run.
"""

from __future__ import annotations

import torch

from llamba.bench.measure import (RANDOM_TEACHER, SMOLLM2_135M, decode_floor, fit_batch, fmt, free_memory,
                                  param_bytes, param_count, student_decode, student_step_bytes)


def attention_layers_for(n_layer: int, k: int) -> list[int]:
    """K attention layers spread evenly through the stack (30 layers: K=2 -> [10, 20], K=4 -> [6, 12, 18, 24])."""
    if not 0 < k <= n_layer:
        raise ValueError(f"a hybrid of {n_layer} layers can keep 1..{n_layer} attention layers, not {k}")
    return [(i + 1) * n_layer // (k + 1) for i in range(k)]  # distinct: steps of n_layer / (k + 1) >= 1 - 1/(k+1)


def hybrid_layers(spec: int | list[int], n_layer: int) -> list[int]:
    """A ``--hybrids`` item (``llamba.cli.bench.hybrid_spec``) as attention layer indices: K -> K layers spaced
    evenly, a list -> exactly those layers (sorted), checked against the teacher's ``n_layer`` layers."""
    from llamba.model.config import check_attention_layers

    try:
        return attention_layers_for(n_layer, spec) if isinstance(spec, int) else check_attention_layers(spec, n_layer)
    except ValueError as e:
        given = spec if isinstance(spec, int) else ",".join(map(str, spec))
        raise ValueError(f"--hybrids {given}: {e}") from None


def teacher_layer_count(teacher_name: str | None) -> int:
    """The teacher's layer count from its config alone (no weights, no GPU)."""
    if teacher_name in RANDOM_TEACHER:
        return SMOLLM2_135M["num_hidden_layers"]
    from llamba.teacher import load_teacher_config

    return load_teacher_config(teacher_name).num_hidden_layers


def hybrid_label(h: dict) -> str:
    """'K=4 (20,23,24,26)': which layers, since two hybrids of one K (spaced evenly, chosen) may share a run."""
    return f"K={h['k']} ({','.join(map(str, h['attention_layers']))})"


def hybrid_study(teacher, hw, spec: int | list[int], args, log=print) -> dict:
    """A hybrid student of the teacher's shapes whose attention layers ``spec`` gives (``hybrid_layers``)."""
    from llamba.convert import student_from_teacher

    layers = hybrid_layers(spec, teacher.config.num_hidden_layers)
    student = student_from_teacher(teacher, d_state=64, attention_layers=layers)
    h = {"k": len(layers), "attention_layers": layers}
    return {**h, **variant_study(student, teacher, hw, args, log, f"hybrid {hybrid_label(h)}")}


def mixer_study(teacher, hw, mixer: str, args, log=print) -> dict:
    """A student of the teacher's shapes with another mixer (``ssm_cfg.mixer``, e.g. GateLoop), to set beside the
    Discrete Mamba-2 student's decode rows at the same prompt and batch (``mixers_markdown``)."""
    from llamba.convert import student_from_teacher

    student = student_from_teacher(teacher, d_state=64, mixer=mixer)
    return {"mixer": mixer, **variant_study(student, teacher, hw, args, log, mixer)}


def variant_study(student, teacher, hw, args, log, label: str) -> dict:
    """A student variant through the same engine as the pure student: decode tokens/s at ``args.hybrid_batches``
    (prompt ``max(args.prompts)``), the batch-16 context sweep, and on CUDA the largest batch within the memory
    budget. The floors count a hybrid's attention (its KV bytes and products) where it has some."""
    weight = next(teacher.parameters())
    # student_from_teacher builds on the CPU: without the move a CUDA run timed the variant on the host (14.7 tok/s)
    student = student.to(device=weight.device, dtype=weight.dtype).eval()
    cuda = student.device.type == "cuda"
    compile_step = not args.no_compile
    sw, sn = param_bytes(student), param_count(student)
    prompt, new = max(args.prompts), args.new_tokens
    layers, a = student.config.attention_layers, student.config.attention_cfg
    def attn_flops(ctx: float) -> float:  # a hybrid's attention products per sequence and step
        return 4 * len(layers) * a["num_attention_heads"] * a["head_dim"] * ctx if layers else 0.0
    out = {"params": sn, "decode": [], "context_sweep": []}
    for batch in args.hybrid_batches:
        row = {"prompt": prompt, "batch": batch, "new_tokens": new}
        try:
            row.update(student_decode(student, batch, prompt, new, compile_step))
            ctx = prompt + new / 2
            row["floor_tok_s"] = decode_floor(hw, sw, sn, batch, student_step_bytes(student, ctx), attn_flops(ctx))
            row["of_floor"] = row["decode_tok_s"] / row["floor_tok_s"]
        except torch.OutOfMemoryError:
            row["oom"] = True
            free_memory()
        out["decode"].append(row)
        log(label, row)
        if row.get("oom"):
            break
    for ctx in args.contexts:
        row = {"context": ctx, "batch": 16, "new_tokens": args.sweep_new_tokens}
        try:
            r = student_decode(student, 16, ctx, args.sweep_new_tokens, compile_step)
            c = ctx + args.sweep_new_tokens / 2
            row.update(tok_s=r["decode_tok_s"], peak_gib=r["peak_gib"],
                       floor_tok_s=decode_floor(hw, sw, sn, 16, student_step_bytes(student, c), attn_flops(c)))
        except torch.OutOfMemoryError:
            row["oom"] = True
            free_memory()
        out["context_sweep"].append(row)
        log(label, "sweep", row)
    if cuda:
        rows = [r for r in out["decode"] if not r.get("oom") and r["batch"] >= 8]
        out["largest_batch"] = fit_batch(lambda b: student_decode(student, b, prompt, 16, compile_step), rows,
                                          args.memory_budget_gib)
        out["largest_batch"].update(budget_gib=args.memory_budget_gib, prompt=prompt)
        log(label, "largest", out["largest_batch"])
    del student
    free_memory()
    return out


BAR_BATCH = 256  # issue 23's bars: decode at batch 256 >= 2x the teacher's, largest batch in the budget >= 4x


def _ratio(a, b) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def _rate_at(rows: list[dict], prompt: int, batch: int):
    """Decode tok/s of the row at (prompt, batch); None where there is none or it ran out of memory."""
    return next((r.get("decode_tok_s") for r in rows if r["prompt"] == prompt and r["batch"] == batch), None)


def hybrids_markdown(hybrids: list[dict], decode: list[dict] = (), largest: dict | None = None) -> list[str]:
    """The hybrids' rows, and each model's ratios to the teacher of the same run (``decode``: the pure student's
    and the teacher's decode rows, ``largest``: their largest batches): what issue 23's bars read."""
    if not hybrids:
        return []
    teacher = [d for d in decode if d.get("model") == "teacher"]
    pure = [d for d in decode if d.get("model") == "student"]
    largest = largest or {}
    prompt = max(d["prompt"] for h in hybrids for d in h["decode"])  # the hybrids decode at the largest --prompts
    t_rate, t_batch = _rate_at(teacher, prompt, BAR_BATCH), largest.get("teacher", {}).get("batch")
    lines = ["", "## Hybrid students (K attention layers, static KV cache, same engine)", "",
             f"Against the teacher of this run, prompt {prompt}:", "",
             f"| model | tok/s at batch {BAR_BATCH} | / teacher (bar: K=4 >= 2x) "
             f"| largest batch in {largest.get('budget_gib', '-')} GiB | / teacher (bar: K=4 >= 4x) |",
             "|---|---|---|---|---|"]
    models = [("teacher", teacher, largest.get("teacher")), ("pure student", pure, largest.get("student"))]
    models += [(f"hybrid {hybrid_label(h)}", h["decode"], h.get("largest_batch")) for h in hybrids]
    for name, rows, fit in models:
        rate, batch = _rate_at(rows, prompt, BAR_BATCH), (fit or {}).get("batch")
        lines.append(f"| {name} | {fmt(rate)} | {_ratio(rate, t_rate)} | {fmt(batch)} | {_ratio(batch, t_batch)} |")
    lines += ["", "| hybrid | prompt | batch | tok/s | / teacher | floor | peak GiB |", "|---|---|---|---|---|---|---|"]
    for h in hybrids:
        for d in h["decode"]:
            rate = d.get("decode_tok_s")
            oom = " OOM" if d.get("oom") else ""
            lines.append(f"| {hybrid_label(h)} | {d['prompt']} | {d['batch']} | {fmt(rate)}{oom} | "
                         f"{_ratio(rate, _rate_at(teacher, d['prompt'], d['batch']))} | {fmt(d.get('floor_tok_s'))} | "
                         f"{fmt(d.get('peak_gib'), 1)} |")
        e = h.get("largest_batch") or {}
        if "batch" in e:
            lines.append(f"| {hybrid_label(h)}, largest in {e['budget_gib']} GiB | {e['prompt']} | {e['batch']} | "
                         f"{fmt(e.get('decode_tok_s'))} | | | {fmt(e.get('peak_gib'), 2)} |")
    lines += ["", "Batch 16 as the context grows:", "", "| hybrid | context | tok/s | floor |", "|---|---|---|---|"]
    for h in hybrids:
        for c in h["context_sweep"]:
            oom = " OOM" if c.get("oom") else ""
            lines.append(f"| {hybrid_label(h)} | {c['context']} | {fmt(c.get('tok_s'))}{oom} | "
                         f"{fmt(c.get('floor_tok_s'))} |")
    return lines


def mixers_markdown(mixers: list[dict], decode: list[dict]) -> list[str]:
    """Each other mixer's decode beside the Discrete Mamba-2 student's at the same prompt and batch."""
    if not mixers:
        return []
    pure = {(d["prompt"], d["batch"]): d.get("decode_tok_s") for d in decode if d.get("model") == "student"}
    lines = ["", "## Other mixers (same shapes, same engine) against the Discrete Mamba-2 student", "",
             "| mixer | prompt | batch | tok/s | Discrete Mamba-2 tok/s | ratio |", "|---|---|---|---|---|---|"]
    for m in mixers:
        for d in m["decode"]:
            base, got = pure.get((d["prompt"], d["batch"])), d.get("decode_tok_s")
            ratio = f"{got / base:.3f}" if base and got else "-"
            oom = " OOM" if d.get("oom") else ""
            lines.append(f"| {m['mixer']} | {d['prompt']} | {d['batch']} | {fmt(got)}{oom} | "
                         f"{fmt(base)} | {ratio} |")
    lines += ["", "Batch 16 as the context grows:", "", "| mixer | context | tok/s |", "|---|---|---|"]
    for m in mixers:
        for c in m["context_sweep"]:
            lines.append(f"| {m['mixer']} | {c['context']} | {fmt(c.get('tok_s'))}{' OOM' if c.get('oom') else ''} |")
    return lines
