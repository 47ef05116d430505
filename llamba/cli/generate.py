"""``llamba generate``: sample from a teacher or a Llamba student, with the chat template when there is one."""

from __future__ import annotations

import sys
import time

import torch

from llamba.cli.common import add_model_args, resolve_device, resolve_dtype


def register(parser) -> None:
    parser.add_argument("--model", required=True, help="smollm2-135m, a teacher folder/.gguf, or a Llamba checkpoint")
    parser.add_argument("--prompt", action="append", required=True, help="prompt text; repeat for a batch")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=None,
                        help="run this many sequences (prompts are repeated to fill the batch)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--min-p", type=float, default=None)
    parser.add_argument("--repetition-penalty", type=float, default=None, help="> 1 discourages repeats")
    parser.add_argument("--stop", action="append", default=None, help="stop string; repeat for several (EOS always stops)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-chat-template", action="store_true", help="feed the prompt as raw text")
    parser.add_argument("--quant", choices=["none", "int8", "int4"], default=None,
                        help="CPU runtime (llamba.quant): a student folder quantized on load, or a `llamba quantize` file")
    add_model_args(parser)


def encode_prompts(tokenizer, prompts: list[str], chat: bool):
    if chat and getattr(tokenizer, "chat_template", None):
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                   for p in prompts]
    tokenizer.padding_side = "left"  # recurrent prefill: padding first, so it never sits between prompt and answer
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=not chat)


def check_sampling(args) -> None:
    """The same checks on every path (the GPU engine, transformers' generate, the CPU runtime), before any loading:
    transformers' own generate accepted a top-p of 2."""
    from llamba.generation.sampling import SamplingParams

    if args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0 (0: greedy), got {args.temperature}")
    SamplingParams(do_sample=args.temperature > 0, temperature=args.temperature or 1.0, top_k=args.top_k or 0,
                   top_p=1.0 if args.top_p is None else args.top_p, min_p=args.min_p or 0.0,
                   repetition_penalty=1.0 if args.repetition_penalty is None else args.repetition_penalty).validate()


def run(args) -> int:
    from llamba.checkpoint import load_model

    if args.max_new_tokens < 1:
        raise ValueError("--max-new-tokens must be at least 1")
    check_sampling(args)
    if args.quant is not None or str(args.model).endswith(".safetensors"):
        from llamba.quant.generate import generate_cpu

        return generate_cpu(args)
    device = resolve_device(args.device)
    model, tokenizer = load_model(args.model, dtype=resolve_dtype(args.dtype, device), device=device)
    if tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer files; write the student with `llamba convert` or copy the "
                         "teacher's tokenizer.json next to it")
    prompts = list(args.prompt)
    if args.batch_size:
        prompts = (prompts * args.batch_size)[: args.batch_size]
    inputs = encode_prompts(tokenizer, prompts, chat=not args.no_chat_template).to(device)
    torch.manual_seed(args.seed)
    sampling = {"do_sample": False} if args.temperature <= 0 else {
        "do_sample": True, "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "min_p": args.min_p}
    if args.repetition_penalty:
        sampling["repetition_penalty"] = args.repetition_penalty
    if args.stop:
        sampling.update(stop_strings=args.stop, tokenizer=tokenizer)
    start = time.perf_counter()
    out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **sampling)
    seconds = time.perf_counter() - start
    new = out[:, inputs["input_ids"].shape[1]:]
    for i, row in enumerate(new):
        if len(prompts) > 1:
            print(f"--- [{i}]")
        print(tokenizer.decode(row, skip_special_tokens=True).strip())
    n_new = int((new != tokenizer.pad_token_id).sum())
    print(f"[{n_new} new tokens in {seconds:.2f}s: {n_new / seconds:.1f} tok/s]", file=sys.stderr)
    return 0
