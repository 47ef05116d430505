"""``llamba quantize <student> --bits 4 --out <dir or file>``: one self-contained file for the CPU runtime."""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("student", help="a float Llamba student checkpoint folder")
    parser.add_argument("--bits", type=int, choices=(4, 8, 32), default=4, help="weight bits (32: float32, no quantization)")
    parser.add_argument("--group-size", type=int, default=32, help="inputs per scale/min pair (multiple of 32)")
    parser.add_argument("--head-bits", type=int, choices=(4, 8, 32), default=None,
                        help="bits for embedding and head (default: 8 for --bits 4, else as --bits)")
    parser.add_argument("--mlp-bits", type=int, choices=(4, 8, 32), default=None,
                        help="bits for the MLPs (default: as --bits); --bits 4 --mlp-bits 8 keeps a trained student's "
                        "perplexity where all-int4 does not")
    parser.add_argument("--out", required=True, help="output .safetensors file, or a folder (gets model.cpu.safetensors)")


def run(args: argparse.Namespace) -> int:
    import torch

    from llamba.checkpoint import is_llamba_checkpoint, load_student, load_tokenizer_from
    from llamba.quant import quantize_student
    from llamba.quant.artifact import load_artifact, save_artifact

    src = Path(args.student)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: no such student checkpoint folder")
    if not is_llamba_checkpoint(src):
        raise ValueError(f"{src} is not a Llamba student checkpoint (convert or distill a teacher first)")
    quant = {4: "int4", 8: "int8", 32: "none"}[args.bits]
    t0 = time.perf_counter()
    model, tokenizer = load_student(src, dtype=torch.float32), load_tokenizer_from(src)
    settings = quantize_student(model, quant, args.group_size, args.head_bits, args.mlp_bits)
    out = save_artifact(model, tokenizer, args.out, settings)
    load_artifact(out)  # read back: the checksum and shapes are verified before we report success
    size = out.stat().st_size / 2**20
    print(f"wrote {out} ({size:.1f} MiB, {quant}, group {settings['group_size']}, head {settings['head_bits']} bits, MLP {settings.get('mlp_bits', args.bits)} bits) "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0
