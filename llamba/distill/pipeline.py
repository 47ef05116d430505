"""The whole ``llamba distill`` run: data, teacher, initialised student, the stages in order, the summary.

Run folder layout (everything resumable: re-running the same command skips what is done):
    data/                 prepared shards + manifest (unless --data named a prepared folder)
    init/                 the initialised student (safetensors) and its evaluation
    stage{1,2,3}/         checkpoint/ while training, final/ when done (the next stage starts from it)
    metrics.jsonl, tensorboard/, loss_stage{k}.png, summary.{json,md}
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from llamba.distill import distributed, train_state
from llamba.distill.data import MANIFEST, check_tokenizer, find_sources, load_manifest, prepare_data, split_tokens
from llamba.distill.recipes import stage_config
from llamba.distill.select import parse_auto
from llamba.distill.stages import STAGES
from llamba.distill.teacher_samples import sample_teacher_corpus
from llamba.distill.trainer import Metrics, train_stage
from llamba.model.config import DEFAULT_MIXER, check_mixer

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


def _log(d):
    def log(msg):
        if d.main:
            print(f"[distill] {msg}", file=sys.stderr, flush=True)
    return log


# -- what a finished stage was trained with, and the checks made before any heavy work --------------------------
# Settings that do not change what a stage computes; anything else differing from a finished stage's is refused.
NOT_RESULT_SETTINGS = ("name", "checkpoint_every", "compile", "teacher_compile", "activation_checkpointing",
                       "val_tokens", "eval_tokens")
INIT_SETTINGS = ("d_state", "init", "seed", "mixer")  # a record without "mixer" (older runs) reads as the default
INIT_RECORD = "init_settings.json"


def result_settings(cfg: dict) -> dict:
    """The stage settings that decide its result, as JSON would give them back."""
    return json.loads(json.dumps({k: v for k, v in cfg.items() if k not in NOT_RESULT_SETTINGS}))


def _differences(recorded: dict, wanted: dict) -> list[str]:
    keys = sorted(set(recorded) | set(wanted))
    return [f"{k}={recorded.get(k)!r} (now {wanted.get(k)!r})" for k in keys if recorded.get(k) != wanted.get(k)]


def finished_stage_conflict(opts: Options, stage: int) -> str | None:
    """Why a finished stage in --out cannot stand for what this command asks of it, or None. A finished stage is
    not trained further in place: its learning rate has decayed to the end of its schedule, and more tokens on top
    would be a different schedule than the one asked for; the message says how to get either result."""
    stage_dir = opts.out / f"stage{stage}"
    if not (stage_dir / "final" / "config.json").exists():
        return None
    try:
        recorded = json.loads((stage_dir / "result.json").read_text()).get("settings")
    except (OSError, ValueError):
        recorded = None
    if recorded is None:  # a run from before settings were recorded: nothing to compare with
        return None
    diff = _differences(recorded, result_settings(stage_config(opts.recipe, stage)))
    if not diff:
        return None
    return (f"stage {stage} in {opts.out} is finished, trained with other settings than this command asks for: "
            f"{'; '.join(diff)}. To train on from that student with the new settings, give a new --out and "
            f"--stages {stage} --student {stage_dir / 'final'}; to redo stage {stage} (and the stages after it) with "
            f"them here, delete {stage_dir} and run the same command again")


def init_conflict(opts: Options) -> str | None:
    record = opts.out / INIT_RECORD
    if not (opts.out / "init" / "config.json").exists() or not record.exists():
        return None
    diff = _differences(json.loads(record.read_text()), {k: opts.recipe.get(k) for k in INIT_SETTINGS})
    if not diff:
        return None
    return (f"the initialised student in {opts.out / 'init'} was built with other settings: {'; '.join(diff)}; "
            f"give a new --out, or delete {opts.out} to start again")


def check_inputs(opts: Options, d) -> None:
    """Everything that can be refused from the options and the disk alone, before the tokenizer, the data and the
    teacher load (on rank 0, which decides for all: ranks must not take different branches)."""
    check_mixer(opts.recipe.get("mixer"), opts.recipe["d_state"])  # the same on every rank: all refuse alike
    problem = None
    if d.main:
        checks = [lambda: init_conflict(opts), *(lambda s=s: finished_stage_conflict(opts, s) for s in sorted(opts.stages)),
                  lambda: _student_problem(opts), lambda: _budget_problem(opts, d), lambda: _hybrid_problem(opts)]
        problem = next((p for p in (check() for check in checks) if p), None)
    problem = distributed.broadcast_object(problem, d)
    if problem:
        raise ValueError(problem)


def _student_problem(opts: Options) -> str | None:
    from llamba.checkpoint import is_llamba_checkpoint
    from llamba.teacher import load_teacher_config

    if not opts.student:
        return None
    path = Path(opts.student)
    if not path.is_dir():
        return f"--student {path}: no such folder (a Llamba student checkpoint folder)"
    if not is_llamba_checkpoint(path):
        looks = " it looks like a Transformer (teacher) folder: give it as --teacher, or" if (path / "config.json").exists() else ""
        return (f"--student {path} is not a Llamba student checkpoint;{looks} leave --student out to start from a "
                "student initialised from the teacher")
    from llamba.model import LlambaConfig

    student, teacher = LlambaConfig.from_pretrained(path), load_teacher_config(opts.teacher)
    pairs = {"d_model": (student.d_model, teacher.hidden_size), "n_layer": (student.n_layer, teacher.num_hidden_layers),
             "vocab_size": (student.vocab_size, teacher.vocab_size)}
    wrong = [f"{k} {a} vs the teacher's {b}" for k, (a, b) in pairs.items() if a != b]
    if wrong:
        return f"--student {path} does not fit the teacher {opts.teacher}: {', '.join(wrong)}; distill it from its own teacher"
    asked = opts.recipe.get("mixer")
    if asked is not None and student.mixer != asked:  # the recipe's mixer cannot change a given student's
        return (f"--student {path} has {student.mixer} mixers, but this run asks for --mixer {asked}; leave --mixer "
                f"out to train it as it is, or convert a {asked} student (llamba convert --mixer {asked})")
    return None


def _hybrid_problem(opts: Options) -> str | None:
    from llamba.distill.select import check_auto
    from llamba.teacher import load_teacher_config

    layers = opts.recipe.get("attention_layers")
    if not layers:
        return None
    n_layer = load_teacher_config(opts.teacher).num_hidden_layers
    auto = parse_auto(layers)
    if auto is not None:
        return check_auto(auto[0], n_layer, opts.stages)
    early = sorted(set(opts.stages) & {1, 2})
    if set(range(n_layer)) <= set(layers) and early:  # stages 1-2 train mixers only (stages.mixer_layer_indices)
        return (f"--attention-layers keeps all {n_layer} of the teacher's layers as attention, so stage(s) "
                f"{', '.join(map(str, early))} have no mixer to train; run --stages 3")
    return None


def _budget_problem(opts: Options, d) -> str | None:
    """A budget below one optimizer step would run one step anyway and report it as the stage."""
    from llamba.distill.trainer import batch_geometry

    for stage in sorted(opts.stages):
        cfg = stage_config(opts.recipe, stage)
        if cfg["tokens"] < 1:
            return f"stage {stage}: token budget {cfg['tokens']} must be at least 1"
        _, step_tokens, _ = batch_geometry(cfg, d.world)
        if cfg["tokens"] < step_tokens:
            return (f"stage {stage}: token budget {cfg['tokens']:,} is less than one optimizer step of {step_tokens:,} "
                    f"tokens (micro_batch {cfg['micro_batch']} x seq_len {cfg['seq_len']} x {d.world} process(es), "
                    f"accumulated to about batch_tokens {cfg['batch_tokens']:,}); raise --stage{stage}-tokens or lower "
                    "--batch-tokens")
    return None


def _interrupted(opts: Options, where: str) -> KeyboardInterrupt:
    again = f"`{opts.command}`" if opts.command else "the same command"
    return KeyboardInterrupt(f"interrupted {where}; run {again} again to resume from there")


def _stage_stop_point(stage_dir: Path) -> str:
    found = train_state.find(stage_dir / "checkpoint")
    if found is None:
        return "before its first checkpoint (the stage restarts from its beginning)"
    state = json.loads((found / train_state.STATE).read_text())
    return f"after step {state['step']}/{state['steps']}, the last checkpoint ({found})"


def _check_stage_checkpoint(stage: int, stage_dir: Path) -> None:
    """A damaged run checkpoint, named, with what to do, before the trainer reads it."""
    import zipfile

    from llamba.weightfiles import read_shapes

    found = train_state.find(stage_dir / "checkpoint")
    if found is None:
        return
    remedy = (f"Delete {found} to restart stage {stage} from its beginning (the earlier stages are kept), or restore "
              "it from a copy")
    read_shapes([found / train_state.WEIGHTS], remedy)
    try:
        with zipfile.ZipFile(found / train_state.OPTIMIZER) as zf:
            bad = zf.testzip()
    except (OSError, zipfile.BadZipFile) as err:
        bad = str(err)
    if bad is not None:
        raise ValueError(f"{found / train_state.OPTIMIZER}: damaged ({bad}). {remedy}")


def _hybrid_for_stage3(opts: Options, student, teacher, tokenizer, data_dir, auto: tuple[int, str], eval_args: dict,
                       d, log):
    """``auto:K`` (``auto`` = (K, ranked by)): the hybrid stage 3 trains, built once on rank 0 from the student that
    stands before stage 3 (and saved, so a resumed run trains the same one); every rank loads it."""
    from llamba.checkpoint import load_student, save_student
    from llamba.distill.select import SELECT_TOKENS, select_attention_layers

    hybrid_dir = opts.out / "select" / "final"
    if not distributed.broadcast_object((hybrid_dir / "config.json").exists(), d):
        if d.main:
            select_args = {**eval_args, "eval_tokens": opts.recipe.get("select_tokens", SELECT_TOKENS)}
            hybrid, _ = select_attention_layers(teacher, student, data_dir, auto[0], opts.out / "select", select_args,
                                                log, by=auto[1])
            save_student(hybrid, tokenizer, hybrid_dir)
        distributed.barrier(d)
    else:
        log(f"attention layers: chosen already ({hybrid_dir})")
    return load_student(hybrid_dir, dtype=torch.float32, device=d.device)


def hub_reachable(timeout: float = 5.0) -> bool:
    import urllib.request

    try:
        urllib.request.urlopen("https://huggingface.co/api/datasets/HuggingFaceFW/fineweb-edu", timeout=timeout)
        return True
    except Exception:
        return False


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
            log("data: no --data and no FineWeb-Edu (the hub does not answer): distilling on text sampled from the "
                "teacher itself")
            samples = opts.out / "teacher-samples.jsonl"
            sample_teacher_corpus(teacher, tokenizer, budget + 2 * val_tokens, samples, opts.recipe["seed"], d.device, log)
            sources = {"train": [str(samples)], "val": []}
        prepare_data(sources, tokenizer, data_dir, budget, val_tokens, tokenizer_name=opts.teacher, log=log)
    distributed.barrier(d)
    return data_dir


def run(opts: Options) -> dict | None:
    from llamba.checkpoint import load_student, save_student
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

    check_inputs(opts, d)
    tokenizer = load_tokenizer(opts.teacher)
    try:
        data_dir = resolve_data(opts, tokenizer, get_teacher, d, log)
    except KeyboardInterrupt:
        raise _interrupted(opts, "during data preparation (every finished source is kept in the manifest)") from None
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
    # auto:K: the student is pure until the layers are chosen, just before stage 3
    auto = parse_auto(recipe.get("attention_layers"))  # (K, ranked by)
    init_layers = () if auto is not None else recipe.get("attention_layers") or ()
    init_dir = opts.out / "init"
    if distributed.broadcast_object((init_dir / "config.json").exists(), d):
        student = load_student(init_dir, dtype=torch.float32, device=d.device)
        wanted = sorted(init_layers)
        if list(student.config.attention_layers) != wanted:  # resuming must not silently change the architecture
            raise ValueError(f"{init_dir} is a student with attention layers {student.config.attention_layers}, but "
                             f"this run asks for {wanted}; use a new --out, or the same --attention-layers")
        if student.config.mixer != (recipe.get("mixer") or DEFAULT_MIXER):
            raise ValueError(f"{init_dir} is a student with {student.config.mixer} mixers, but this run asks for "
                             f"{recipe.get('mixer')}; use a new --out, or the same --mixer")
    else:
        if d.main:
            (opts.out / INIT_RECORD).write_text(json.dumps({k: recipe.get(k) for k in INIT_SETTINGS}))
        torch.manual_seed(recipe["seed"])
        student = student_from_teacher(teacher, d_state=recipe["d_state"], init=recipe["init"],
                                       attention_layers=init_layers, mixer=recipe.get("mixer")).float().to(d.device)
        if d.main:
            save_student(student, tokenizer, init_dir)
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
            results[stage].pop("settings", None)
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
        if stage == 3 and auto is not None:
            student = _hybrid_for_stage3(opts, student, teacher, tokenizer, data_dir, auto, eval_args, d, log)
        cfg = stage_config(recipe, stage)
        stage_dir.mkdir(parents=True, exist_ok=True)
        if d.main:
            _check_stage_checkpoint(stage, stage_dir)
        try:
            results[stage] = train_stage(stage, student, teacher, data_dir, stage_dir, cfg, d, metrics, log)
        except KeyboardInterrupt:
            metrics.close()
            raise _interrupted(opts, f"in stage {stage} {_stage_stop_point(stage_dir)}") from None
        if d.main:
            # result.json first: a finished stage (final/ present) always has its settings on record
            (stage_dir / "result.json").write_text(json.dumps({**results[stage], "settings": result_settings(cfg)}))
            save_student(student, tokenizer, final)
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
        ranking_path = opts.out / "select" / "ranking.json"  # auto:K's layer ranking, when it ran
        summary = {
            "teacher": opts.teacher, "recipe": recipe.get("name"), "command": opts.command, "data": str(data_dir),
            "device": device_name, "world_size": d.world, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "stages": {str(k): v for k, v in results.items()},
            "tokens_total": sum(v["tokens"] for v in results.values()),
            # the stages' walls add up across resumed calls; this process's wall (init, evaluation, the stages it ran)
            # alone would understate a resumed run's
            "wall_s_stages": sum(v["wall_s"] for v in results.values()),
            "wall_s_process": time.perf_counter() - t_run,
            "eval": {"init": json.loads(init_eval_path.read_text()), "final": final_eval},
            "sample": sample, "student_path": str(previous) if previous else None,
            "attention_layers": list(student.config.attention_layers),
            "selection": json.loads(ranking_path.read_text()) if ranking_path.exists() else None,
            "recipe_settings": {str(s): stage_config(recipe, s) for s in sorted(opts.stages)},
        }
        write_summary(opts.out, summary)
        plot_losses(opts.out / "metrics.jsonl", opts.out)
        ev = summary["eval"]
        log(f"summary: teacher ppl {ev['final']['teacher_ppl']:.2f} | initialised student ppl "
            f"{ev['init']['student_ppl']:.2f}, KL {ev['init']['kl_per_token']:.3f} | distilled student ppl "
            f"{ev['final']['student_ppl']:.2f}, KL {ev['final']['kl_per_token']:.3f}"
            + (f" ({ev['final']['kl_repeats']:.3f} at repeats)" if ev["final"].get("kl_repeats") is not None else "")
            + f"  ({opts.out / 'summary.md'})")
        if sample:
            log(f"sample teacher: {sample['prompt']}{sample['teacher']!r}")
            log(f"sample student: {sample['prompt']}{sample['student']!r}")
    distributed.barrier(d)
    distributed.teardown()
    return summary
