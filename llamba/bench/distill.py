"""``llamba bench distill``: distillation throughput per stage, in the real trainer with a recipe's real settings.

Each variant runs ``llamba.distill.trainer.train_stage`` itself (data loading, teacher targets, autocast, gradient
accumulation, clipping, AdamW, checkpoints off) for a few optimizer steps on random token windows; the trainer
times from its second step. Beside ours stands the plain PyTorch step it replaced: stage 3 with the student's full
logits and the plain soft cross-entropy (``loss: plain``). Speed does not depend on the weights' values, so by
default the teacher is the SmolLM2-135M shape with random bf16 weights.

MFU counts the matrix products of the parameters only (2 FLOPs per weight per token forward, 4 more backward where
the weights train or the gradient passes), against the bf16 matrix rate measured in the same process.
"""

from __future__ import annotations

import copy
import datetime
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from llamba.distill.data import FORMAT_VERSION, MANIFEST

# (name, stage, overrides of the recipe's stage settings; "kernels": the mixers' kernel backend, set by the bench
# alone); the rivals right after the variant they are the rivals of: the plain logits path, every op in PyTorch
# (conv, scan, loss: the plain reference step), the blocks compiled (and the teacher's forward with them), the pieces
# around the mixers compiled, the teacher on flex attention
VARIANTS = (
    ("stage1", 1, {}),
    ("stage1-compile", 1, {"compile": True}),
    ("stage2-block", 2, {"align": "block"}),
    ("stage2-compile", 2, {"align": "block", "compile": True}),
    ("stage2-compile-teacher", 2, {"align": "block", "compile": True, "teacher_compile": True}),
    ("stage2-attention", 2, {"align": "attention"}),
    ("stage3", 3, {"loss": "chunked"}),
    ("stage3-plain", 3, {"loss": "plain"}),
    ("stage3-torch", 3, {"loss": "plain", "kernels": "torch"}),
    ("stage3-compile", 3, {"loss": "chunked", "compile": True}),
    ("stage3-compile-teacher", 3, {"loss": "chunked", "compile": True, "teacher_compile": True}),
    ("stage3-compile-mb32", 3, {"loss": "chunked", "compile": True, "micro_batch": 32}),
    ("stage3-pieces", 3, {"loss": "chunked", "compile": "pieces"}),
    ("stage3-flex", 3, {"loss": "chunked", "teacher_attention": "flex_attention"}),
)
COMPILING = ("compile", "teacher_attention", "teacher_compile")  # overrides that compile kernels (minutes on a CPU)


def random_data(folder: Path, vocab: int, eos: int, tokens: int, seed: int = 0, doc_len: int = 700) -> Path:
    """A prepared data folder of random ids with an EOS about every ``doc_len`` tokens (so the trainer's document
    resets run as they do on real text)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    shards = []
    for split, n in (("train", tokens), ("val", 1 << 16)):
        ids = rng.integers(0, vocab, n, dtype=np.int64)
        ids[ids == eos] = (eos + 1) % vocab
        ids[rng.random(n) < 1 / doc_len] = eos
        ids.astype(np.uint16 if vocab <= 65536 else np.uint32).tofile(folder / f"{split}-random.bin")
        shards.append({"file": f"{split}-random.bin", "split": split, "source": "random", "tokens": n})
    manifest = {"format": FORMAT_VERSION, "dtype": "uint16" if vocab <= 65536 else "uint32",
                "tokenizer": {"name": "random", "hash": "random", "vocab_size": vocab, "eos_token_id": eos},
                "sources": {}, "shards": shards}
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return folder


def matmul_flops_per_token(stage: int, cfg: dict, teacher, student) -> float:
    """Parameter matrix-product FLOPs per token for one training step of the stage (see the module docstring)."""
    def n(params):
        return sum(p.numel() for p in {id(p): p for p in params}.values() if p.dim() >= 2)

    t_layers = n(teacher.model.layers.parameters())
    head = teacher.config.vocab_size * teacher.config.hidden_size
    s_layers = student.backbone.layers
    mixers = n(p for b in s_layers for p in b.mixer.parameters())
    if stage == 3:
        return 2 * (t_layers + head) + 6 * (n(s_layers.parameters()) + head)
    if stage == 2 and cfg.get("align") == "attention":
        return 2 * t_layers + 6 * mixers
    if stage == 2:  # the MLPs' products run forward and pass the gradient back (4 x) even where they are frozen
        return 2 * t_layers + 6 * n(s_layers.parameters())
    in_proj = n(p for b in s_layers for p in b.mixer.in_proj.parameters())
    return 2 * t_layers + 6 * in_proj  # stage 1: plus the (L x L) matrices, not counted


def run_variant(name, stage, overrides, recipe, teacher, student0, data_dir, steps, device) -> dict:
    from llamba.distill import distributed
    from llamba.distill.recipes import stage_config
    from llamba.distill.trainer import Metrics, batch_geometry, train_stage

    overrides = dict(overrides)
    kernels = overrides.pop("kernels", "auto")
    # eager unless the variant compiles, whatever the recipe says: each rival differs from its row in one thing
    cfg = {**stage_config(recipe, stage), "compile": False, **overrides, "checkpoint_every": 0}
    d = distributed.Dist(device=torch.device(device))
    _, step_tokens, _ = batch_geometry(cfg, 1)
    cfg["tokens"] = (steps + 1) * step_tokens  # the first step warms up and is not timed
    student = copy.deepcopy(student0)
    for block in student.backbone.layers:
        block.mixer.kernel_backend = kernels
    cuda = d.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp:
        result = train_stage(stage, student, teacher, data_dir, Path(tmp) / "stage", cfg, d,
                             Metrics(Path(tmp), enabled=False), log=lambda msg: None)
    settings = {k: cfg[k] for k in ("seq_len", "micro_batch", "batch_tokens")} | overrides
    if kernels != "auto":
        settings["kernels"] = kernels
    return {"name": name, "stage": stage, "settings": settings, "steps_timed": steps,
            "tokens_per_s": result["tokens_per_s_steady"],
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None,
            "flops_per_token": matmul_flops_per_token(stage, cfg, teacher, student)}


# (ours, its rival, the results key of ours / rival, what the ratio says)
RATIOS = (("stage3", "stage3-plain", "stage3_speedup_over_plain",
           "Stage 3, chunked head + loss over the plain logits path"),
          ("stage3", "stage3-torch", "stage3_speedup_over_torch",
           "Stage 3 over the plain PyTorch step (conv, scan and loss in PyTorch)"),
          ("stage3-compile", "stage3", "stage3_compile_speedup", "Stage 3 with the blocks compiled over without"),
          ("stage1-compile", "stage1", "stage1_compile_speedup",
           "Stage 1 with each layer's matrix and loss compiled over without"),
          ("stage2-compile", "stage2-block", "stage2_compile_speedup",
           "Stage 2 (block alignment) with the blocks compiled over without"),
          ("stage2-compile-teacher", "stage2-compile", "stage2_teacher_compile_speedup",
           "Stage 2 compiled, with the teacher's forward compiled too, over the blocks alone"),
          ("stage3-compile-teacher", "stage3-compile", "stage3_teacher_compile_speedup",
           "Stage 3 compiled, with the teacher's forward compiled too, over the blocks alone"),
          ("stage3-compile-mb32", "stage3-compile", "stage3_compile_mb32_speedup",
           "Stage 3 compiled, micro-batch 32 over 16"),
          ("stage3-pieces", "stage3", "stage3_pieces_speedup",
           "Stage 3 with the norms, residuals and SwiGLU compiled over without"),
          ("stage3-flex", "stage3", "stage3_flex_speedup", "Stage 3 with the teacher on flex attention over SDPA"))


def summarise(rows: list[dict], meta: dict) -> dict:
    """The results file's content from the rows measured so far, with each rival's ratio."""
    results = {**meta, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "rows": rows}
    by_name = {r["name"]: r for r in rows if "error" not in r}
    for ours, rival, key, _ in RATIOS:
        if ours in by_name and rival in by_name:
            results[key] = by_name[ours]["tokens_per_s"] / by_name[rival]["tokens_per_s"]
    return results


def write(results: dict, out: str) -> None:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps(results, indent=1))
    path.with_suffix(".md").write_text(to_markdown(results))


def run(recipe_name: str, variants: list[str], steps: int, out: str | None, device: str = "cuda",
        shape: str = "smollm2-135m") -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from llamba.bench import report
    from llamba.bench.measure import TEACHER_SHAPES, measure_hardware
    from llamba.convert import student_from_teacher
    from llamba.distill.recipes import load_recipe

    recipe = load_recipe(recipe_name)
    torch.manual_seed(0)
    config = TEACHER_SHAPES[shape]
    teacher = LlamaForCausalLM(LlamaConfig(**config)).to(torch.bfloat16).to(device).eval()
    teacher.requires_grad_(False)
    student0 = student_from_teacher(teacher, d_state=recipe["d_state"], init=recipe["init"]).float().to(device)
    hw = measure_hardware()
    meta = {**report.provenance(), "recipe": recipe_name, "hardware": hw, "host": platform.node(), "shape": shape,
            "teacher": f"LlamaForCausalLM of {shape}'s shapes, random bf16 weights"}
    rows, results = [], summarise([], meta)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = random_data(Path(tmp) / "data", config["vocab_size"], eos=config.get("eos_token_id", 2),
                               tokens=1 << 24)
        for name, stage, overrides in VARIANTS:
            if name not in variants:
                continue
            t0 = time.perf_counter()
            try:
                row = run_variant(name, stage, overrides, recipe, teacher, student0, data_dir, steps, device)
            except Exception as e:  # one variant's failure (a compile, a kernel) must not lose the others' rows
                row = {"name": name, "stage": stage, "settings": dict(overrides),
                       "error": f"{type(e).__name__}: {e}"[:300]}
                print(f"[bench distill] {name}: failed: {row['error']}", flush=True)
            else:
                row["mfu"] = row["flops_per_token"] * row["tokens_per_s"] / (hw["matmul_tflops"] * 1e12)
                print(f"[bench distill] {name}: {row['tokens_per_s']:,.0f} tokens/s, MFU {row['mfu']:.1%}, "
                      f"peak {row['peak_memory_gib']:.1f} GiB ({time.perf_counter() - t0:.0f} s)", flush=True)
            rows.append(row)
            results = summarise(rows, meta)
            if out:  # after every row: a run cut short (a time limit, Ctrl-C) keeps what it measured
                write(results, out)
    print(to_markdown(results))
    return results


def to_markdown(results: dict) -> str:
    md = [f"# Distillation throughput per stage ({results['device']})", "", f"- command: `{results['command']}`",
          f"- recipe: `{results['recipe']}`; teacher: {results['teacher']}; date {results['date']}; torch "
          f"{results['torch']}",
          f"- bf16 matrix rate measured in the same process: {results['hardware']['matmul_tflops']:.0f} TFLOP/s "
          "(MFU's denominator; parameter products only)", "",
          "| variant | stage | settings | tokens/s | MFU | peak GiB |", "|---|---|---|---|---|---|"]
    for r in results["rows"]:
        settings = ", ".join(f"{k} {v}" for k, v in r["settings"].items())
        if "error" in r:
            md.append(f"| {r['name']} | {r['stage']} | {settings} | failed: {r['error'][:120]} | - | - |")
            continue
        md.append(f"| {r['name']} | {r['stage']} | {settings} | {r['tokens_per_s']:,.0f} | {r['mfu']:.1%} | "
                  f"{r['peak_memory_gib']:.1f} |")
    for *_, key, what in RATIOS:
        if key in results:
            md += ["", f"{what}: **{results[key]:.2f}x**"]
    return "\n".join(md) + "\n"

