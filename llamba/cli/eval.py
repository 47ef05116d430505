"""``llamba eval``: the paper's zero-shot suite (lm-evaluation-harness) and perplexity / KL, for a teacher and its
students side by side. The first model is the reference (teacher) for ratios and KL."""

from __future__ import annotations

import datetime
import logging
import os
import platform
import shlex
import argparse
import sys
import time

from llamba.cli.common import int_at_least


def limit(text: str) -> float | int:
    """--limit: examples per task (a whole number >= 1) or a fraction of each task in (0, 1)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected examples per task (>= 1) or a fraction in (0, 1), got {text!r}")
    if value >= 1:
        if value != int(value):
            raise argparse.ArgumentTypeError(f"a count of examples must be a whole number, got {text}")
        return int(value)
    return value


def register(parser) -> None:
    parser.add_argument("--models", nargs="+", required=True,
                        help="teacher first (a known name like smollm2-135m, a GGUF, a HF folder), then students "
                             "(Llamba checkpoint folders)")
    parser.add_argument("--tasks", nargs="+", default=["paper"],
                        help="'paper' (the whole suite), 'ppl' (perplexity and KL), or task names: arc_easy "
                             "arc_challenge piqa winogrande hellaswag openbookqa lambada_openai mmlu mmlu_5shot gsm8k "
                             "(comma or space separated)")
    parser.add_argument("--data-dir", default="../shared/data/eval", help="benchmark files (see its README)")
    parser.add_argument("--limit", type=limit, default=None, help="examples per task (quick runs); a fraction if < 1")
    parser.add_argument("--out", default="runs/eval", help="folder for eval.md, eval.json, eval.png")
    parser.add_argument("--batch-size", type=int_at_least(1), default=16)
    parser.add_argument("--max-gen-toks", type=int_at_least(1), default=None, help="generation cap for GSM8K (lm-eval: 256)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda when present)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="model dtype (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--ppl-text", default="../shared/data/corpus/gutenberg-val.jsonl.xz",
                        help="held-out text for --tasks ppl (.jsonl[.xz] with 'text', or .txt)")
    parser.add_argument("--ppl-tokens", type=int_at_least(2), default=32768, help="token budget for ppl/KL")
    parser.add_argument("--ppl-seq-len", type=int_at_least(2), default=512, help="window length for ppl/KL")


def _load(name: str, dtype, device: str, fallback_tokenizer):
    from llamba.checkpoint import load_model

    model, tokenizer = load_model(name, dtype=dtype, device=device)
    return model.to(dtype).eval(), tokenizer if tokenizer is not None else fallback_tokenizer


def check_shared_tokenizer(names: list[str]) -> None:
    """Perplexity and KL score every model on the first model's token ids: refuse, before any model loads, a model
    whose tokenizer differs (its ids would mean other words, or index past its vocabulary)."""
    from llamba.checkpoint import is_llamba_checkpoint, load_tokenizer_from
    from llamba.distill.data import tokenizer_hash
    from llamba.teacher import load_tokenizer

    reference = None
    for name in names:
        student = os.path.isdir(name) and is_llamba_checkpoint(name)
        tokenizer = load_tokenizer_from(name) if student else load_tokenizer(name)
        if tokenizer is None:  # a student folder without tokenizer files: it is scored with the first model's
            continue
        if reference is None:
            reference = (name, tokenizer_hash(tokenizer))
        elif tokenizer_hash(tokenizer) != reference[1]:
            raise ValueError(f"--tasks ppl: {name} has another tokenizer than {reference[0]}; perplexity and KL "
                             f"compare models token by token on {reference[0]}'s tokens, so each model must share "
                             "its tokenizer (a student distilled from it does). Evaluate this model in a separate "
                             "`llamba eval` run, or leave out ppl")


def _lm(model, tokenizer, batch_size: int):
    from llamba.eval.lm import LlambaLM
    from llamba.model import LlambaForCausalLM

    if isinstance(model, LlambaForCausalLM):
        return LlambaLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, softmax_dtype="float32")


def run(args) -> int:
    import torch
    from tqdm import tqdm

    from llamba.cli.common import resolve_device
    from llamba.eval.ppl import perplexity_and_kl, read_documents, token_windows
    from llamba.eval.report import write_report
    from llamba.eval.suite import resolve_tasks, run_suite, table_rows

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # lm-eval's notices are for its own CLI (--metadata hints, "pretrained is not a str" ...): a user of ours can
    # act on none of them. Its errors still show.
    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.ERROR)
    names = [t for item in args.tasks for t in item.split(",") if t]
    want_ppl = "ppl" in names
    names = [t for t in names if t != "ppl"]
    args.device = str(resolve_device(args.device))
    if want_ppl:
        if args.ppl_tokens < args.ppl_seq_len:
            raise ValueError(f"--ppl-tokens {args.ppl_tokens} is less than one window of --ppl-seq-len "
                             f"{args.ppl_seq_len}")
        if not os.path.isfile(os.path.expanduser(args.ppl_text)):
            raise FileNotFoundError(f"--ppl-text {args.ppl_text}: no such file (.jsonl[.xz] with 'text', or .txt)")
        check_shared_tokenizer(args.models)
    if names and not os.path.isdir(args.data_dir):
        raise FileNotFoundError(f"--data-dir {args.data_dir}: no such folder")
    specs, skipped = resolve_tasks(names, args.data_dir) if names else ([], {})
    for task, why in skipped.items():
        print(f"llamba eval: skipping {task}: {why}", file=sys.stderr)
    if not specs and not want_ppl:
        raise ValueError("nothing to run: every requested task was skipped (see above)")
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    limit = args.limit

    started = time.time()
    meta = {"command": "llamba eval " + shlex.join(sys.argv[2:] if sys.argv[1:2] == ["eval"] else sys.argv[1:]),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device": args.device if not args.device.startswith("cuda") else torch.cuda.get_device_name(),
            "host": platform.node(), "dtype": str(dtype).removeprefix("torch."), "limit": limit,
            "skipped": skipped}
    rows: dict[str, dict[str, float]] = {}
    raw: dict[str, dict] = {}
    models: dict[str, torch.nn.Module] = {}
    tokenizer = None
    for name in tqdm(args.models, desc="models", disable=len(args.models) < 2):
        model, tok = _load(name, dtype, args.device, tokenizer)
        tokenizer = tokenizer or tok
        rows[name] = {}
        if specs:
            results = run_suite(_lm(model, tok, args.batch_size), specs, args.data_dir, limit=limit,
                                batch_size=args.batch_size, max_gen_toks=args.max_gen_toks)
            rows[name] = table_rows(results)
            raw[name] = {k: results.get(k) for k in ("results", "groups", "n-samples", "versions", "n-shot")}
        if want_ppl:
            models[name] = model
        else:
            del model
    if want_ppl:
        docs = read_documents(args.ppl_text)
        windows = token_windows(docs, tokenizer, args.ppl_tokens, args.ppl_seq_len)
        stats = perplexity_and_kl(models, windows, batch_size=max(1, args.batch_size // 4))
        meta["ppl_text"] = f"{args.ppl_text} ({stats[args.models[0]]['tokens']} predicted tokens, windows of " \
                           f"{args.ppl_seq_len})"
        for name, s in stats.items():
            rows[name]["heldout ppl"] = s["ppl"]
            if name != args.models[0]:
                rows[name]["teacher‖model kl"] = s["kl_from_teacher"]
                if s["kl_repeats_from_teacher"] is not None:  # the KL where the next token copies from context
                    rows[name]["teacher‖model repeats kl"] = s["kl_repeats_from_teacher"]
    meta["seconds"] = round(time.time() - started, 1)
    paths = write_report(args.out, args.models, rows, meta, raw)
    print(paths["md"].read_text())
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0
