"""``llamba quantize <student> --bits 4 --out <dir or file>``: one self-contained file for the CPU runtime."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from llamba.cli.common import int_at_least
from llamba.quant import ARTIFACT_NAME, CALIBRATION_METHODS


def group_size(text: str) -> int:
    value = int_at_least(32)(text)
    if value % 32:
        raise argparse.ArgumentTypeError(f"must be a multiple of 32 (the kernels' block), got {text}")
    return value


def projection_bits(text: str) -> tuple[str, int]:
    name, sep, bits = text.partition("=")
    if not sep or bits not in ("4", "8", "32"):
        raise argparse.ArgumentTypeError(f"{text!r}: write NAME=BITS with BITS 4, 8 or 32, e.g. in_proj=8")
    return name, int(bits)


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("student", help="a float Llamba student checkpoint folder")
    parser.add_argument("--bits", type=int, choices=(4, 8, 32), default=4, help="weight bits (32: float32, no quantization)")
    parser.add_argument("--group-size", type=group_size, default=32, help="inputs per scale/min pair (multiple of 32)")
    parser.add_argument("--head-bits", type=int, choices=(4, 8, 32), default=None,
                        help="bits for embedding and head (default: 8 for --bits 4, else as --bits)")
    parser.add_argument("--mlp-bits", type=int, choices=(4, 8, 32), default=None,
                        help="bits for the MLPs (default: as --bits); --bits 4 --mlp-bits 8 costs the 105M-token "
                        "SmolLM2 student 13%% perplexity, all-int4 far more, int8 0.2%% "
                        "(results/cpu-artifacts-smollm2-135m.md)")
    parser.add_argument("--bits-for", type=projection_bits, action="append", default=[], metavar="NAME=BITS",
                        help="bits for one projection in every block, over --bits / --mlp-bits (repeatable): "
                        "in_proj, out_proj (mixers), q_proj, k_proj, v_proj, o_proj (a hybrid's attention), "
                        "gate_proj, up_proj, down_proj (MLPs); e.g. --bits 4 --mlp-bits 8 --bits-for in_proj=8")
    parser.add_argument("--calibration", metavar="TEXT",
                        help="text (.jsonl[.xz] with a text field, .txt, .parquet) whose activations choose "
                        "activation-aware scales (AWQ), folded into the weights before rounding; the artifact and "
                        "runtime are unchanged. Default: plain round-to-nearest")
    parser.add_argument("--calibration-method", choices=CALIBRATION_METHODS, default=CALIBRATION_METHODS[0],
                        help="what the calibration adjusts: activation-aware scales and bias correction (default), "
                        "or either alone")
    parser.add_argument("--calibration-tokens", type=int_at_least(64), default=16384,
                        help="tokens of --calibration to run (default 16384, windows of 512)")
    parser.add_argument("--out", required=True, help=f"output .safetensors file, or a folder (gets {ARTIFACT_NAME})")
    parser.add_argument("--force", action="store_true", help="replace an artifact already at --out")


def output_file(out: str, student: Path, force: bool) -> Path:
    """The artifact's path for ``--out``, refused before any work when it would overwrite something: an existing
    file or a non-empty folder without --force, and the student's own folder (or any student) always, where a
    second *.safetensors would break loading that student."""
    from llamba.checkpoint import is_llamba_checkpoint

    path = Path(out)
    folder = path.parent if path.suffix == ".safetensors" else path
    if folder.is_dir() and (is_llamba_checkpoint(folder) or folder.resolve() == student.resolve()):
        raise ValueError(f"--out {out} is inside a Llamba student folder; write the artifact to its own file or folder")
    if path.suffix == ".safetensors":
        if path.exists() and not force:
            raise ValueError(f"--out {out} exists; choose a new file name, or add --force to replace it")
        return path
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {out}: is a file, expected a folder or a .safetensors file name")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise ValueError(f"--out {out} is not empty; choose a new folder, or add --force to replace {ARTIFACT_NAME} in it")
    return path / ARTIFACT_NAME


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
    target = output_file(args.out, src, args.force)
    quant = {4: "int4", 8: "int8", 32: "none"}[args.bits]
    from llamba.quant.modules import check_linear_bits

    check_linear_bits(dict(args.bits_for))  # a typo in a projection's name fails before the student loads
    if args.calibration and not Path(args.calibration).is_file():
        raise FileNotFoundError(f"--calibration {args.calibration}: no such file")
    t0 = time.perf_counter()
    model, tokenizer = load_student(src, dtype=torch.float32), load_tokenizer_from(src)
    calibration = None
    if args.calibration:
        from llamba.quant.perplexity import corpus_tokens

        try:
            calibration = corpus_tokens(args.calibration, tokenizer, args.calibration_tokens)
        except ValueError as err:
            raise ValueError(f"--calibration: {err}; give a longer text or fewer --calibration-tokens") from err
    settings = quantize_student(model, quant, args.group_size, args.head_bits, args.mlp_bits, dict(args.bits_for),
                                calibration, args.calibration_method)
    out = save_artifact(model, tokenizer, target, settings)
    load_artifact(out)  # read back: the checksum and shapes are verified before we report success
    size = out.stat().st_size / 2**20
    single = "".join(f", {k} {b} bits" for k, b in settings.get("linear_bits", {}).items())
    print(f"wrote {out} ({size:.1f} MiB, {quant}, group {settings['group_size']}, head {settings['head_bits']} bits, "
          f"MLP {settings.get('mlp_bits', args.bits)} bits{single}"
          f"{', calibrated: ' + args.calibration_method if calibration is not None else ''}) in {time.perf_counter() - t0:.1f} s")
    return 0
