"""``llamba generate --device cpu --quant {none,int8,int4}``: generation through the quantized CPU runtime."""

from __future__ import annotations

import sys
import time

import torch

from llamba.generation.prompts import encode_prompts
from llamba.generation.sampling import GREEDY, SamplingParams


def generate_cpu(args, params: SamplingParams = GREEDY) -> int:
    """Runs one prompt at a time (the runtime is batch 1), with the sampler and the stop strings (``args.stop``)
    of every other path."""
    from llamba.quant import load_for_cpu

    if getattr(args, "device", "cpu") not in ("cpu", "auto"):
        raise ValueError("--quant runs on the CPU runtime; use --device cpu")
    decoder = load_for_cpu(args.model, args.quant, threads=getattr(args, "threads", None))
    tokenizer = decoder.tokenizer
    if tokenizer is None:
        raise ValueError(f"{args.model} carries no tokenizer; quantize a student folder that has tokenizer files")
    generator = torch.Generator().manual_seed(getattr(args, "seed", 0))
    for i, prompt in enumerate(args.prompt):
        ids = encode_prompts(tokenizer, [prompt], chat=not getattr(args, "no_chat_template", False))["input_ids"]
        if len(args.prompt) > 1:
            print(f"--- [{i}]")
        start = time.perf_counter()
        tokens = decoder.generate(ids, args.max_new_tokens, params, eos_token_id=tokenizer.eos_token_id,
                                  generator=generator, stop_strings=getattr(args, "stop", None), tokenizer=tokenizer)
        seconds = time.perf_counter() - start
        print(tokenizer.decode(tokens, skip_special_tokens=True).strip())
        print(f"[{len(tokens)} new tokens in {seconds:.2f}s: {len(tokens) / seconds:.1f} tok/s, "
              f"{decoder.quant['quant']}, CPU runtime]", file=sys.stderr)
    return 0
