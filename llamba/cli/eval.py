"""``llamba eval``: the paper's zero-shot suite (lm-evaluation-harness) and perplexity / KL, for a teacher and its
students side by side. The first model is the reference (teacher) for ratios and KL."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import sys
import time


def register(parser) -> None:
    parser.add_argument("--models", nargs="+", required=True,
                        help="teacher first (a known name like smollm2-135m, a GGUF, a HF folder), then students "
                             "(Llamba checkpoint folders)")
    parser.add_argument("--tasks", nargs="+", default=["paper"],
                        help="'paper' (the whole suite), 'ppl' (perplexity and KL), or task names: arc_easy "
                             "arc_challenge piqa winogrande hellaswag openbookqa lambada_openai mmlu mmlu_5shot gsm8k "
                             "(comma or space separated)")
    parser.add_argument("--data-dir", default="../shared/data/eval", help="benchmark files (see its README)")
    parser.add_argument("--limit", type=float, default=None, help="examples per task (quick runs); a fraction if < 1")
    parser.add_argument("--out", default="runs/eval", help="folder for eval.md, eval.json, eval.png")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-gen-toks", type=int, default=None, help="generation cap for GSM8K (lm-eval: 256)")
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="model dtype (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--ppl-text", default="../shared/data/corpus/gutenberg-val.jsonl.xz",
                        help="held-out text for --tasks ppl (.jsonl[.xz] with 'text', or .txt)")
    parser.add_argument("--ppl-tokens", type=int, default=32768, help="token budget for ppl/KL")
    parser.add_argument("--ppl-seq-len", type=int, default=512, help="window length for ppl/KL")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _load(name: str, dtype, device: str, fallback_tokenizer):
    from llamba.checkpoint import load_model

    model, tokenizer = load_model(name, dtype=dtype, device=device)
    return model.to(dtype).eval(), tokenizer if tokenizer is not None else fallback_tokenizer


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

    from llamba.eval.ppl import perplexity_and_kl, read_documents, token_windows
    from llamba.eval.report import write_report
    from llamba.eval.suite import resolve_tasks, run_suite, table_rows

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    names = [t for item in args.tasks for t in item.split(",") if t]
    want_ppl = "ppl" in names
    names = [t for t in names if t != "ppl"]
    if names and not os.path.isdir(args.data_dir):
        raise FileNotFoundError(f"--data-dir {args.data_dir}: no such folder")
    specs, skipped = resolve_tasks(names, args.data_dir) if names else ([], {})
    for task, why in skipped.items():
        print(f"llamba eval: skipping {task}: {why}", file=sys.stderr)
    if not specs and not want_ppl:
        raise ValueError("nothing to run: every requested task was skipped (see above)")
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)

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
    meta["seconds"] = round(time.time() - started, 1)
    paths = write_report(args.out, args.models, rows, meta, raw)
    print(paths["md"].read_text())
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0
