"""Which linears tolerate int4, and what the formats cost in decode speed, on a trained student.

    python benchmarks/quant_formats.py STUDENT_DIR [--tokens 2048] [--speed]

Perplexity (gutenberg-val, windows of 1024, head float32) with int4 applied to chosen linears only, the others
int8 or float32; with --speed, decode tok/s of int4 / int4 mixers + int8 MLPs / int8 in the compiled CPU step
(512-token prefill, then 64 steps; median of 5 interleaved rounds). Numbers in results/edge-cpu-ppl-student.json.
"""

import argparse
import copy
import os
import statistics
import time
from pathlib import Path

import torch

from llamba.checkpoint import load_student
from llamba.quant import quantize_student
from llamba.quant.modules import QuantizedLinear
from llamba.quant.perplexity import corpus_tokens, perplexity
from llamba.quant.runtime import CpuDecoder
from llamba.teacher import load_tokenizer

LINEARS = (("mixer", "in_proj"), ("mixer", "out_proj"), ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))
VARIANTS = {  # bits per linear name; unnamed linears are int4
    "int4 all blocks": {},
    "int4, in_proj int8": {"in_proj": 8},
    "int4, in_proj float32": {"in_proj": 32},
    "int4, out_proj int8": {"out_proj": 8},
    "mixer int4, MLP int8": {"gate_proj": 8, "up_proj": 8, "down_proj": 8},
    "MLP int4 only": {"in_proj": 32, "out_proj": 32},
    "down_proj int4 only": {"in_proj": 32, "out_proj": 32, "gate_proj": 32, "up_proj": 32},
}


def with_bits(student, bits: dict):
    model = copy.deepcopy(student)
    for layer in model.backbone.layers:
        for part, name in LINEARS:
            parent, b = getattr(layer, part), bits.get(name, 4)
            if b < 32:
                setattr(parent, name, QuantizedLinear.from_linear(getattr(parent, name), b, 32))
    return model


def decode_speed(student_dir: str, threads: int) -> dict:
    decoders = {}
    for name, quant, mlp_bits in (("int4", "int4", None), ("int4 + int8 MLPs", "int4", 8), ("int8", "int8", None)):
        model = load_student(student_dir)
        quantize_student(model, quant, mlp_bits=mlp_bits)
        decoders[name] = CpuDecoder(model, threads=threads)
    prompt = torch.randint(0, decoders["int8"].model.config.vocab_size, (1, 512))
    rounds = {name: [] for name in decoders}
    for _ in range(5):
        for name, dec in decoders.items():
            dec.cache.reset()
            dec.prefill(prompt)
            start = time.perf_counter()
            for i in range(64):
                dec.step(100 + i)
            rounds[name].append(64 / (time.perf_counter() - start))
    return {name: statistics.median(r) for name, r in rounds.items()}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("student")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--speed", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    student = load_student(args.student)
    data = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "corpus" / "gutenberg-val.jsonl.xz"
    tokens = corpus_tokens(data, load_tokenizer("smollm2-135m"), args.tokens)
    print(f"float32: {perplexity(student, tokens):.2f}", flush=True)
    for name, bits in VARIANTS.items():
        print(f"{name}: {perplexity(with_bits(student, bits), tokens):.2f}", flush=True)
    if args.speed:
        for name, tok_s in decode_speed(args.student, args.threads).items():
            print(f"decode {name}: {tok_s:.1f} tok/s", flush=True)
