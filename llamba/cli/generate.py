"""``llamba generate``: sample from a teacher or a Llamba student, with the chat template when there is one."""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

from llamba.cli.common import add_model_args, resolve_device, resolve_dtype

# torch and llamba.generation are imported where they are used, so `llamba generate --help` does not load torch.


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
    parser.add_argument("--transformers", action="store_true",
                        help="a float student on the CPU: transformers' generate (the reference) instead of the CPU runtime")
    add_model_args(parser)


def sampling_params(args) -> SamplingParams:
    """The options as the params every path samples with (the CUDA engine, transformers' generate, the CPU
    runtime), checked before any loading: transformers' own generate accepted a top-p of 2."""
    from llamba.generation.sampling import InvalidSamplingParam, SamplingParams

    try:
        return SamplingParams.from_temperature(args.temperature, args.top_k, args.top_p, args.min_p,
                                               args.repetition_penalty)
    except InvalidSamplingParam as err:
        raise ValueError(f"--{err.param.replace('_', '-')}: {err}") from None


def wants_quant_runtime(model: str, quant: str | None) -> bool:
    """A quantized artifact (file, or the folder `llamba quantize --out DIR` wrote), or any student with --quant:
    only the CPU runtime (llamba.quant) runs these."""
    from llamba.quant.artifact import artifact_in

    return quant is not None or artifact_in(model) is not None


def uses_cpu_runtime(args, device) -> bool:
    """The CPU runtime (llamba.quant) runs a quantized artifact (file, or the folder `llamba quantize --out DIR`
    wrote), any student with --quant, and a float student on the CPU, where it decodes in the same float32 several
    times faster than transformers' generate (issue 21 measured 44 against 5 tokens/s at SmolLM2-135M's shape on 2
    cores; a GateLoop student, whose mixers run their PyTorch step there, about 3 times on one thread). A batch
    (--batch-size), another --dtype or --transformers keeps transformers' generate."""
    from llamba.checkpoint import is_llamba_checkpoint

    if wants_quant_runtime(args.model, args.quant):
        return True
    return (device.type == "cpu" and not args.transformers and args.batch_size is None
            and args.dtype in ("auto", "float32") and Path(args.model).is_dir()
            and is_llamba_checkpoint(Path(args.model)))


def run(args) -> int:
    import torch

    from llamba.checkpoint import load_model
    from llamba.generation.prompts import check_prompt_text, encode_prompts
    from llamba.model import LlambaForCausalLM

    if args.max_new_tokens < 1:
        raise ValueError("--max-new-tokens must be at least 1")
    params = sampling_params(args)
    check_prompt_text(args.prompt)
    device = resolve_device(args.device)
    if uses_cpu_runtime(args, device):
        from llamba.quant.generate import generate_cpu

        return generate_cpu(args, params)
    model, tokenizer = load_model(args.model, dtype=resolve_dtype(args.dtype, device), device=device)
    if tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer files; write the student with `llamba convert` or copy the "
                         "teacher's tokenizer.json next to it")
    prompts = list(args.prompt)
    if args.batch_size:
        prompts = (prompts * args.batch_size)[: args.batch_size]
    inputs = encode_prompts(tokenizer, prompts, chat=not args.no_chat_template).to(device)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    if isinstance(model, LlambaForCausalLM) and device.type == "cuda":
        from llamba.generation import generate

        # the CUDA-graph engine itself, which model.generate() would hand these options to
        out = generate(model, inputs["input_ids"], inputs["attention_mask"], args.max_new_tokens,
                       **dataclasses.asdict(params), eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, stop_strings=args.stop,
                       tokenizer=tokenizer if args.stop else None).sequences
    else:  # a teacher, or a student on the CPU: transformers' generate
        sampling = params.generate_kwargs()
        if args.stop:
            sampling.update(stop_strings=args.stop, tokenizer=tokenizer)
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
