"""``llamba distill``: MOHAWK distillation of a Llama-family teacher into a Llamba student.

    llamba distill --teacher smollm2-135m --data ../shared/data/corpus --out runs/smollm2-135m
    llamba distill --teacher smollm2-135m --data ../shared/data/corpus --out runs/x --prepare-only --max-tokens 30000000
    torchrun --nproc_per_node 8 -m llamba.cli distill ...   (same flags; DDP over the GPUs)

The recipe defaults to the teacher's own (``smollm2-135m`` ...) when CUDA is present and to ``smoke`` on a CPU;
any recipe field can be overridden by a flag.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from llamba.cli.common import INIT_CHOICES, float_above, int_at_least, parse_attention_layers

TOKENS = int_at_least(1)  # budgets: whole numbers, '5e7' allowed


def stage_list(text: str) -> tuple[int, ...]:
    """'2,3' -> (2, 3)."""
    try:
        stages = tuple(sorted({int(s) for s in text.split(",") if s.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"give stage numbers separated by commas, e.g. 1,2,3; got {text!r}") from None
    if not stages or any(s not in (1, 2, 3) for s in stages):
        raise argparse.ArgumentTypeError(f"stages are 1, 2 and 3; got {text!r}")
    return stages


def register(parser) -> None:
    parser.add_argument("--teacher", default="smollm2-135m", help="known name, GGUF file or HF folder (default smollm2-135m)")
    parser.add_argument("--data", help="a folder/file of .jsonl[.xz|.gz|.zst]/.parquet/.txt, hf:NAME[:CONFIG]:SPLIT, or a "
                        "folder prepared by --prepare-only (has manifest.json). Default: FineWeb-Edu if reachable, "
                        "else text sampled from the teacher")
    parser.add_argument("--out", required=True, help="run folder (re-running the same command resumes)")
    parser.add_argument("--recipe", help="built-in recipe name or .yaml path (default: the teacher's recipe on CUDA, "
                        "'smoke' on CPU)")
    parser.add_argument("--stages", type=stage_list, help="which stages to run, e.g. '3' or '2,3' (default: the "
                        "recipe's run_stages, else 1,2,3)")
    parser.add_argument("--student", help="Llamba checkpoint to start the first requested stage from "
                        "(default: the previous stage's output in --out, else a fresh student)")
    parser.add_argument("--prepare-only", action="store_true", help="tokenize and pack the data into --out/data, then stop")
    parser.add_argument("--max-tokens", type=TOKENS, help="training tokens to prepare (default: largest stage budget + 10%%)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    for s in (1, 2, 3):
        parser.add_argument(f"--stage{s}-tokens", type=TOKENS, help=f"stage {s} token budget")
        parser.add_argument(f"--stage{s}-lr", type=float_above(0), help=f"stage {s} peak learning rate")
    parser.add_argument("--seq-len", type=int_at_least(2), help="sequence length (all stages)")
    parser.add_argument("--micro-batch", type=int_at_least(1), help="sequences per GPU per forward (all stages)")
    parser.add_argument("--batch-tokens", type=int_at_least(1), help="tokens per optimizer step, all GPUs (all stages)")
    parser.add_argument("--d-state", type=int_at_least(1))
    parser.add_argument("--init", choices=INIT_CHOICES)
    parser.add_argument("--mixer", help="the student's mixer (recipe field mixer): discrete_mamba2 "
                        "(default) or gateloop (needs an even d_state; docs/gateloop.md)")
    parser.add_argument("--attention-layers", help="hybrid student: these layers (e.g. 5,14) keep the teacher's "
                        "attention (recipe field attention_layers; stages 1-2 skip them); auto:K chooses K by "
                        "measurement before stage 3 (each layer restored in turn, ranked by the KL it recovers); "
                        "auto:K:repeats ranks by the KL it recovers where the text repeats itself (copying)")
    parser.add_argument("--temperature", type=float_above(0), help="stage 3 distillation temperature")
    parser.add_argument("--mixer-only", action="store_true", help="stage 2 trains only the mixers")
    parser.add_argument("--stage2-align", choices=("block", "attention"),
                        help="stage 2 target: each block's output, or each attention's output (mixers alone train)")
    parser.add_argument("--inherited-lr-scale", type=float_above(0),
                        help="stage 3: weights outside the mixers (copied from the teacher) train at this times the lr")
    parser.add_argument("--freeze-mlp", action="store_true", help="stage 3 keeps the MLPs frozen")
    parser.add_argument("--freeze-embeddings", action="store_true", help="stage 3 keeps embeddings and head frozen")
    parser.add_argument("--freeze-attention", action="store_true",
                        help="stage 3 keeps a hybrid's attention layers (q/k/v/o) as the teacher's")
    parser.add_argument("--checkpoint-every", type=int_at_least(0),
                        help="optimizer steps between checkpoints (0: only at the end of a stage)")
    parser.add_argument("--activation-checkpointing", action="store_true", default=None)
    parser.add_argument("--compile", nargs="?", const="blocks", default=None, choices=("off", "blocks", "pieces"),
                        help="torch.compile the student blocks whole (--compile, --compile blocks), or only the "
                        "norms, residuals and SwiGLU around each mixer (--compile pieces: what the decode engine "
                        "compiles; the mixers' Triton kernels and the GEMMs stay as they are), or not at all "
                        "(--compile off); default: the recipe's (smollm2-135m: blocks). CUDA only: on a CPU the "
                        "student runs eager")
    parser.add_argument("--seed", type=int_at_least(0))
    parser.add_argument("--val-tokens", type=TOKENS, help="held-out tokens to prepare")
    parser.add_argument("--eval-tokens", type=TOKENS, help="held-out tokens the summary evaluates")
    parser.add_argument("--sample-tokens", type=int_at_least(0), default=40, help="greedy sample length in the summary (0: none)")


# Measured on 2-core CPUs: 3 min with the teacher and the prepared data cached (README); 25 min for a first run
# (teacher download and data preparation included) on a machine busy with other work.
SMOKE_NOTICE = ("llamba distill: no CUDA GPU here, so this runs the `smoke` recipe: it checks the whole pipeline "
                "(data, the three stages, the summary) and does NOT make a usable student. On a 2-core CPU it takes "
                "about 3 minutes once the teacher and data are cached, up to ~25 minutes on a first run. For a real "
                "student, run on a GPU (or choose --recipe yourself).")


def build_recipe(args) -> dict:
    import torch

    from llamba.distill.recipes import RECIPE_FOR_TEACHER, load_recipe, normalise

    name = args.recipe
    if name is None:
        on_gpu = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
        name = RECIPE_FOR_TEACHER.get(args.teacher, "smollm2-135m") if on_gpu else "smoke"
        if not on_gpu and not args.prepare_only:
            print(SMOKE_NOTICE, file=sys.stderr, flush=True)
    recipe = load_recipe(name)
    top = {"seq_len": args.seq_len, "micro_batch": args.micro_batch, "batch_tokens": args.batch_tokens,
           "d_state": args.d_state, "init": args.init, "mixer": args.mixer, "checkpoint_every": args.checkpoint_every,
           "activation_checkpointing": args.activation_checkpointing,
           "compile": False if args.compile == "off" else args.compile, "seed": args.seed,
           "val_tokens": args.val_tokens, "eval_tokens": args.eval_tokens}
    for k, v in top.items():
        if v is not None:
            recipe[k] = v
            for s in recipe["stages"].values():  # a flag given for all stages wins over per-stage recipe values
                s.pop(k, None)
    for s in (1, 2, 3):
        for field in ("tokens", "lr"):
            v = getattr(args, f"stage{s}_{field}")
            if v is not None:
                recipe["stages"][s][field] = v
    if recipe.get("mixer") is not None:
        from llamba.model.config import check_mixer

        check_mixer(recipe.get("mixer"), recipe["d_state"])  # a typo or an odd d_state fails before any work
    if args.attention_layers is not None:
        from llamba.distill.select import parse_auto

        spec = args.attention_layers.strip()
        # auto:K[:kl|repeats] is checked (and its typos named) by parse_auto, a list by parse_attention_layers
        auto = spec.startswith("auto") and parse_auto(spec)
        recipe["attention_layers"] = spec if auto else parse_attention_layers(spec)
    if args.temperature is not None:
        recipe["stages"][3]["temperature"] = args.temperature
    if args.mixer_only:
        recipe["stages"][2]["mixer_only"] = True
    if args.stage2_align is not None:
        recipe["stages"][2]["align"] = args.stage2_align
    if args.inherited_lr_scale is not None:
        recipe["stages"][3]["inherited_lr_scale"] = args.inherited_lr_scale
    if args.freeze_mlp:
        recipe["stages"][3]["freeze_mlp"] = True
    if args.freeze_embeddings:
        recipe["stages"][3]["freeze_embeddings"] = True
    if args.freeze_attention:
        recipe["stages"][3]["freeze_attention"] = True
    return normalise(recipe)


def run(args) -> int:
    from llamba.distill.pipeline import Options, run as run_pipeline

    if args.device is not None:
        from llamba.cli.common import resolve_device

        resolve_device(args.device)  # --device cuda without a GPU: refused now, not after the data is prepared
    recipe = build_recipe(args)
    stages = args.stages  # default: the stages the recipe names (the smollm2-135m recipe skips stage 1)
    if stages is None:
        stages = stage_list(",".join(str(s) for s in recipe.get("run_stages", (1, 2, 3))))
    opts = Options(teacher=args.teacher, out=Path(args.out), recipe=recipe, data=args.data, stages=stages,
                   student=args.student, device=args.device,
                   max_tokens=args.max_tokens, prepare_only=args.prepare_only,
                   sample_tokens=args.sample_tokens, command="llamba distill " + shlex.join(sys.argv[2:] if
                   len(sys.argv) > 1 and sys.argv[1] == "distill" else sys.argv[1:]))
    run_pipeline(opts)
    return 0
