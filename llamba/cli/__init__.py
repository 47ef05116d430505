"""The ``llamba`` command line. Each subcommand lives in its own module with ``register(subparsers)``; modules
are imported only when their command runs, so ``llamba generate`` never pays for the training stack."""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "generate": "Generate text with a teacher or a Llamba student.",
    "convert": "Build an initialised Llamba student from a Llama-family teacher.",
    "distill": "MOHAWK distillation: matrix orientation, hidden-state alignment, knowledge distillation.",
    "eval": "Zero-shot benchmark suite (lm-evaluation-harness), perplexity and KL, teacher and student side by side.",
    "bench": "Throughput benchmark: student against the Transformer teacher (GPU or CPU).",
    "quantize": "Quantize a student's weights for the CPU runtime (int8 / int4), one file.",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="llamba", description="Distill a Llama-family Transformer into a Llamba recurrent model, and run it fast.",
        epilog="`llamba COMMAND --help` lists a command's options.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv or ["--help"])
        return 2
    # Build only the chosen command's full parser.
    parser = argparse.ArgumentParser(prog=f"llamba {argv[0]}", description=COMMANDS[argv[0]])
    module = importlib.import_module(f"llamba.cli.{argv[0]}")
    module.register(parser)
    args = parser.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except (FileNotFoundError, ValueError) as err:  # user errors: one clear line, no traceback
        print(f"llamba {argv[0]}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
