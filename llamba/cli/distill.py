"""``llamba distill``: MOHAWK distillation of a Llama-family teacher into a Llamba student.

    llamba distill --teacher smollm2-135m --data ../shared/data/corpus --out runs/smollm2-135m
    llamba distill --teacher smollm2-135m --data ../shared/data/corpus --out runs/x --prepare-only --max-tokens 30000000
    torchrun --nproc_per_node 8 -m llamba.cli distill ...   (same flags; DDP over the GPUs)

The recipe defaults to the teacher's own (``smollm2-135m`` ...) when CUDA is present and to ``smoke`` on a CPU;
any recipe field can be overridden by a flag.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path


def register(parser) -> None:
    parser.add_argument("--teacher", default="smollm2-135m", help="known name, GGUF file or HF folder (default smollm2-135m)")
    parser.add_argument("--data", help="a folder/file of .jsonl[.xz|.gz|.zst]/.parquet/.txt, hf:NAME[:CONFIG]:SPLIT, or a "
                        "folder prepared by --prepare-only (has manifest.json). Default: FineWeb-Edu if reachable, "
                        "else text sampled from the teacher")
    parser.add_argument("--out", required=True, help="run folder (re-running the same command resumes)")
    parser.add_argument("--recipe", help="built-in recipe name or .yaml path (default: the teacher's recipe on CUDA, "
                        "'smoke' on CPU)")
    parser.add_argument("--stages", help="which stages to run, e.g. '3' or '2,3' (default: the recipe's run_stages, "
                        "else 1,2,3)")
    parser.add_argument("--student", help="Llamba checkpoint to start the first requested stage from "
                        "(default: the previous stage's output in --out, else a fresh student)")
    parser.add_argument("--prepare-only", action="store_true", help="tokenize and pack the data into --out/data, then stop")
    parser.add_argument("--max-tokens", type=float, help="training tokens to prepare (default: largest stage budget + 10%%)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    for s in (1, 2, 3):
        parser.add_argument(f"--stage{s}-tokens", type=float, help=f"stage {s} token budget")
        parser.add_argument(f"--stage{s}-lr", type=float, help=f"stage {s} peak learning rate")
    parser.add_argument("--seq-len", type=int, help="sequence length (all stages)")
    parser.add_argument("--micro-batch", type=int, help="sequences per GPU per forward (all stages)")
    parser.add_argument("--batch-tokens", type=int, help="tokens per optimizer step, all GPUs (all stages)")
    parser.add_argument("--d-state", type=int)
    parser.add_argument("--init", choices=("identity", "attention"))
    parser.add_argument("--attention-layers", help="hybrid student: these layers (e.g. 5,14) keep the teacher's "
                        "attention (recipe field attention_layers; stage 1 skips them)")
    parser.add_argument("--temperature", type=float, help="stage 3 distillation temperature")
    parser.add_argument("--mixer-only", action="store_true", help="stage 2 trains only the mixers")
    parser.add_argument("--stage2-align", choices=("block", "attention"),
                        help="stage 2 target: each block's output, or each attention's output (mixers alone train)")
    parser.add_argument("--inherited-lr-scale", type=float,
                        help="stage 3: weights outside the mixers (copied from the teacher) train at this times the lr")
    parser.add_argument("--freeze-mlp", action="store_true", help="stage 3 keeps the MLPs frozen")
    parser.add_argument("--freeze-embeddings", action="store_true", help="stage 3 keeps embeddings and head frozen")
    parser.add_argument("--checkpoint-every", type=int, help="optimizer steps between checkpoints")
    parser.add_argument("--activation-checkpointing", action="store_true", default=None)
    parser.add_argument("--compile", action="store_true", default=None, help="torch.compile the student blocks")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--val-tokens", type=float, help="held-out tokens to prepare")
    parser.add_argument("--eval-tokens", type=float, help="held-out tokens the summary evaluates")
    parser.add_argument("--sample-tokens", type=int, default=40, help="greedy sample length in the summary (0: none)")


def build_recipe(args) -> dict:
    import torch

    from llamba.distill.recipes import RECIPE_FOR_TEACHER, load_recipe, normalise

    name = args.recipe
    if name is None:
        on_gpu = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
        name = RECIPE_FOR_TEACHER.get(args.teacher, "smollm2-135m") if on_gpu else "smoke"
    recipe = load_recipe(name)
    top = {"seq_len": args.seq_len, "micro_batch": args.micro_batch, "batch_tokens": args.batch_tokens,
           "d_state": args.d_state, "init": args.init, "checkpoint_every": args.checkpoint_every,
           "activation_checkpointing": args.activation_checkpointing, "compile": args.compile, "seed": args.seed,
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
    if args.attention_layers is not None:
        from llamba.convert import parse_attention_layers

        recipe["attention_layers"] = parse_attention_layers(args.attention_layers)
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
    return normalise(recipe)


def run(args) -> int:
    from llamba.distill.pipeline import Options, run as run_pipeline

    recipe = build_recipe(args)
    chosen = args.stages if args.stages is not None else ",".join(str(s) for s in recipe.get("run_stages", (1, 2, 3)))
    try:
        stages = tuple(sorted({int(s) for s in str(chosen).split(",") if s.strip()}))
    except ValueError:
        raise ValueError(f"--stages {chosen!r}: give stage numbers separated by commas, e.g. 1,2,3") from None
    if not stages or any(s not in (1, 2, 3) for s in stages):
        raise ValueError(f"--stages {chosen!r}: stages are 1, 2 and 3")
    opts = Options(teacher=args.teacher, out=Path(args.out), recipe=recipe, data=args.data, stages=stages,
                   student=args.student, device=args.device,
                   max_tokens=int(args.max_tokens) if args.max_tokens else None, prepare_only=args.prepare_only,
                   sample_tokens=args.sample_tokens, command="llamba distill " + shlex.join(sys.argv[2:] if
                   len(sys.argv) > 1 and sys.argv[1] == "distill" else sys.argv[1:]))
    run_pipeline(opts)
    return 0
