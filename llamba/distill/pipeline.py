"""The whole ``llamba distill`` run: data, teacher, initialised student, the stages in order, the summary.

Run folder layout (everything resumable: re-running the same command skips what is done):
    data/                 prepared shards + manifest (unless --data named a prepared folder)
    init/                 the initialised student (safetensors) and its evaluation
    stage{1,2,3}/         checkpoint/ while training, final/ when done (the next stage starts from it)
    metrics.jsonl, tensorboard/, loss_stage{k}.png, summary.{json,md}
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llamba.distill import distributed
from llamba.distill.data import MANIFEST, check_tokenizer, find_sources, load_manifest, prepare_data, split_tokens
from llamba.distill.recipes import stage_config
from llamba.distill.stages import STAGES
from llamba.distill.trainer import Metrics, train_stage

FINEWEB = "hf:HuggingFaceFW/fineweb-edu:sample-10BT:train"
SAMPLE_PROMPT = "The old house at the end of the lane"


@dataclass
class Options:
    teacher: str
    out: Path
    recipe: dict
    data: str | None = None
    stages: tuple = STAGES
    student: str | None = None          # start the first requested stage from this checkpoint
    device: str | None = None
    max_tokens: int | None = None       # training tokens to prepare (default: the largest stage budget + 10%)
    prepare_only: bool = False
    sample_tokens: int = 40
    command: str = ""
    extra: dict = field(default_factory=dict)


def _log(d):
    def log(msg):
        if d.main:
            print(f"[distill] {msg}", file=sys.stderr, flush=True)
    return log


def _save_student_atomic(student, tokenizer, path: Path) -> None:
    from llamba.checkpoint import save_student

    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_student(student, tokenizer, tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def hub_reachable(timeout: float = 5.0) -> bool:
    import urllib.request

    try:
        urllib.request.urlopen("https://huggingface.co/api/datasets/HuggingFaceFW/fineweb-edu", timeout=timeout)
        return True
    except Exception:
        return False


@torch.no_grad()
def sample_teacher_corpus(teacher, tokenizer, n_tokens: int, path: Path, seed: int, device, log,
                          batch: int = 16, length: int = 256) -> Path:
    """Data-free fallback: documents sampled from the teacher itself (seeded; cached as jsonl, extended on demand)."""
    have = 0
    if path.exists():
        have = sum(json.loads(line)["tokens"] for line in path.read_text().splitlines())
    if have >= n_tokens:
        return path
    log(f"data: no --data and no FineWeb-Edu (hub unreachable): sampling ~{n_tokens - have:,} tokens from the teacher "
        f"itself (data-free distillation, seed {seed}) into {path}")
    generator = torch.Generator(device="cpu").manual_seed(seed + have)
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    with open(path, "a") as f:
        while have < n_tokens:
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
            rows = max(1, min(batch, -(-(n_tokens - have) // (length // 2))))
            ids = torch.full((rows, 1), start, device=device)
            out = teacher.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=length, do_sample=True,
                                   temperature=1.0, top_k=0, top_p=1.0, pad_token_id=tokenizer.eos_token_id)
            for row in out[:, 1:]:
                text = tokenizer.decode(row, skip_special_tokens=True)  # stops at EOS; padding after it drops
                n = len(tokenizer(text, add_special_tokens=False).input_ids) + 1
                f.write(json.dumps({"text": text, "tokens": n, "source": "teacher-samples"}) + "\n")
                have += n
    return path


def resolve_data(opts: Options, tokenizer, teacher_loader, d, log) -> Path:
    """A prepared folder as given, or prepare one under out/data from text sources (rank 0 writes, others wait)."""
    budget = opts.max_tokens or int(1.1 * max(stage_config(opts.recipe, s)["tokens"] for s in opts.stages))
    val_tokens = opts.recipe["val_tokens"]
    if opts.data and (Path(opts.data) / MANIFEST).exists():
        data_dir = Path(opts.data)
        manifest = load_manifest(data_dir)
        check_tokenizer(manifest, tokenizer, data_dir)
        log(f"data: prepared folder {data_dir}: {split_tokens(manifest, 'train'):,} train / "
            f"{split_tokens(manifest, 'val'):,} val tokens")
        return data_dir
    data_dir = opts.out / "data"
    if d.main:
        if opts.data:
            sources = find_sources(opts.data)
        elif hub_reachable():
            log("data: no --data given: streaming FineWeb-Edu (sample-10BT), the paper's data")
            sources = {"train": [FINEWEB], "val": []}
        else:
            teacher, _ = teacher_loader()
            samples = opts.out / "teacher-samples.jsonl"
            sample_teacher_corpus(teacher, tokenizer, budget + 2 * val_tokens, samples, opts.recipe["seed"], d.device, log)
            sources = {"train": [str(samples)], "val": []}
        prepare_data(sources, tokenizer, data_dir, budget, val_tokens, tokenizer_name=opts.teacher, log=log)
    distributed.barrier(d)
    return data_dir


def run(opts: Options) -> dict | None:
    from llamba.checkpoint import load_student
    from llamba.convert import student_from_teacher
    from llamba.teacher import load_teacher, load_tokenizer

    d = distributed.setup(opts.device)
    log = _log(d)
    opts.out.mkdir(parents=True, exist_ok=True)
    t_run = time.perf_counter()
    cuda = d.device.type == "cuda"
    teacher_dtype = torch.bfloat16 if cuda else torch.float32
    cache: dict = {}

    def get_teacher():
        if "teacher" not in cache:
            log(f"teacher: loading {opts.teacher} ({teacher_dtype}, {d.device})")
            cache["teacher"] = load_teacher(opts.teacher, dtype=teacher_dtype, device=d.device, attn_implementation="sdpa")
        return cache["teacher"]

    tokenizer = load_tokenizer(opts.teacher)
    data_dir = resolve_data(opts, tokenizer, get_teacher, d, log)
    if opts.prepare_only:
        distributed.teardown()
        return None
    teacher, _ = get_teacher()
    teacher.requires_grad_(False)
    recipe = opts.recipe
    eval_cfg = stage_config(recipe, 3)
    eval_args = dict(seq_len=eval_cfg["seq_len"], eval_tokens=recipe["eval_tokens"],
                     micro_batch=eval_cfg["micro_batch"], device=d.device)

    # The initialised student: built once (seeded, identical on every rank), saved, evaluated.
    from llamba.distill.report import evaluate, generation_sample, plot_losses, write_summary

    # Each resume decision is rank 0's view of the disk, taken before rank 0 writes: a rank that looked later could
    # see rank 0's fresh files, take the other branch and pair its collectives with the wrong ones (a hang).
    init_dir = opts.out / "init"
    if distributed.broadcast_object((init_dir / "config.json").exists(), d):
        student = load_student(init_dir, dtype=torch.float32, device=d.device)
        wanted = sorted(recipe.get("attention_layers") or ())
        if list(student.config.attention_layers) != wanted:  # resuming must not silently change the architecture
            raise ValueError(f"{init_dir} is a student with attention layers {student.config.attention_layers}, but "
                             f"this run asks for {wanted}; use a new --out, or the same --attention-layers")
    else:
        torch.manual_seed(recipe["seed"])
        student = student_from_teacher(teacher, d_state=recipe["d_state"], init=recipe["init"],
                                       attention_layers=recipe.get("attention_layers") or ()).float().to(d.device)
        if d.main:
            _save_student_atomic(student, tokenizer, init_dir)
        distributed.barrier(d)
    init_eval_path = opts.out / "init_eval.json"
    if d.main and not init_eval_path.exists():
        init_eval_path.write_text(json.dumps(evaluate(teacher, student, data_dir, **eval_args)))
    distributed.barrier(d)

    metrics = Metrics(opts.out, d.main)
    results = {}
    previous = None
    for stage in sorted(opts.stages):
        stage_dir = opts.out / f"stage{stage}"
        final = stage_dir / "final"
        if distributed.broadcast_object((final / "config.json").exists(), d):
            log(f"stage {stage}: done already ({final}); skipping")
            results[stage] = json.loads((stage_dir / "result.json").read_text())
            previous = final
            continue
        start_from = previous or (Path(opts.student) if opts.student and stage == min(opts.stages) else None)
        if start_from is None and stage > 1 and (opts.out / f"stage{stage - 1}" / "final" / "config.json").exists():
            start_from = opts.out / f"stage{stage - 1}" / "final"
        if start_from is not None:
            student = load_student(start_from, dtype=torch.float32, device=d.device)
            log(f"stage {stage}: starting from {start_from}")
        elif stage > 1:
            log(f"stage {stage}: no earlier stage in {opts.out} and no --student: starting from the initialised student")
        cfg = stage_config(recipe, stage)
        stage_dir.mkdir(parents=True, exist_ok=True)
        results[stage] = train_stage(stage, student, teacher, data_dir, stage_dir, cfg, d, metrics, log)
        if d.main:
            _save_student_atomic(student, tokenizer, final)
            (stage_dir / "result.json").write_text(json.dumps(results[stage]))
            shutil.rmtree(stage_dir / "checkpoint", ignore_errors=True)
        distributed.barrier(d)
        previous = final
        log(f"stage {stage}: loss {results[stage]['first_loss']:.4g} -> {results[stage]['last_loss']:.4g} "
            f"in {results[stage]['wall_s']:.0f}s ({results[stage]['tokens_per_s']:,.0f} tokens/s)")
    metrics.close()

    summary = None
    if d.main:
        if previous is not None:
            student = load_student(previous, dtype=torch.float32, device=d.device)
        final_eval = evaluate(teacher, student, data_dir, **eval_args)
        sample = {}
        if opts.sample_tokens:
            sample = {"prompt": SAMPLE_PROMPT,
                      "teacher": generation_sample(teacher, tokenizer, SAMPLE_PROMPT, opts.sample_tokens, d.device),
                      "student": generation_sample(student, tokenizer, SAMPLE_PROMPT, opts.sample_tokens, d.device)}
        device_name = torch.cuda.get_device_name(d.device) if cuda else "cpu"
        summary = {
            "teacher": opts.teacher, "recipe": recipe.get("name"), "command": opts.command, "data": str(data_dir),
            "device": device_name, "world_size": d.world, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "stages": {str(k): v for k, v in results.items()},
            "tokens_total": sum(v["tokens"] for v in results.values()),
            "wall_s_total": time.perf_counter() - t_run,
            "eval": {"init": json.loads(init_eval_path.read_text()), "final": final_eval},
            "sample": sample, "student_path": str(previous) if previous else None,
            "recipe_settings": {str(s): stage_config(recipe, s) for s in sorted(opts.stages)},
        }
        write_summary(opts.out, summary)
        plot_losses(opts.out / "metrics.jsonl", opts.out)
        ev = summary["eval"]
        log(f"summary: teacher ppl {ev['final']['teacher_ppl']:.2f} | initialised student ppl "
            f"{ev['init']['student_ppl']:.2f}, KL {ev['init']['kl_per_token']:.3f} | distilled student ppl "
            f"{ev['final']['student_ppl']:.2f}, KL {ev['final']['kl_per_token']:.3f}  ({opts.out / 'summary.md'})")
        if sample:
            log(f"sample teacher: {sample['prompt']}{sample['teacher']!r}")
            log(f"sample student: {sample['prompt']}{sample['student']!r}")
    distributed.barrier(d)
    distributed.teardown()
    return summary
