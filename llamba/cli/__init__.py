"""The ``llamba`` command line. Each subcommand lives in its own module with ``register(subparsers)``; modules
are imported only when their command runs, so ``llamba generate`` never pays for the training stack. A command
module imports only argparse-level things at its top (torch, transformers and the model inside ``run``), so that
``llamba --help`` and ``llamba COMMAND --help`` answer at once (tests/test_cli_subprocess.py holds them to it)."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

COMMANDS = {
    "generate": "Generate text with a teacher or a Llamba student.",
    "convert": "Build an initialised Llamba student from a Llama-family teacher.",
    "distill": "MOHAWK distillation: matrix orientation, hidden-state alignment, knowledge distillation.",
    "eval": "Zero-shot benchmark suite (lm-evaluation-harness), perplexity and KL, teacher and student side by side.",
    "bench": "Throughput benchmark: student against the Transformer teacher (GPU or CPU).",
    "quantize": "Quantize a student's weights for the CPU runtime (int8 / int4), one file.",
    "serve": "OpenAI-compatible HTTP server (completions, chat, streaming) with continuous batching.",
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
    try:
        check_command_extra(argv[0])
        module = importlib.import_module(f"llamba.cli.{argv[0]}")
        module.register(parser)
        args = parser.parse_args(argv[1:])
        quiet_libraries()
        return int(module.run(args) or 0)
    except (FileNotFoundError, ValueError) as err:  # user errors: one clear line, no traceback
        print(f"llamba {argv[0]}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # Ctrl-C: where it stopped (when the command knows) instead of a traceback
        print(f"\nllamba {argv[0]}: {err or 'interrupted'}", file=sys.stderr)
        return 130
    except ImportError as err:
        extra = missing_extra(err, argv[0])
        if extra is None:
            raise
        print(f"llamba {argv[0]}: error: {err}\n  this needs an optional dependency: pip install 'llamba[{extra}]'",
              file=sys.stderr)
        return 2


def quiet_libraries() -> None:
    """Keep a command's output to what its user needs: no per-file load / save bars from transformers (the models
    load in a second), and not transformers' notice that our model's output still names ``past_key_values``
    (llamba/model keeps that name for transformers 4.x; the notice repeats on every student command and says
    nothing the user can act on)."""
    import logging

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    logging.getLogger("transformers.utils.generic").addFilter(
        lambda record: "`past_key_values`/`cache_params` are deprecated" not in record.getMessage())


# What each extra of pyproject.toml brings, by import name (eval's lm-eval brings datasets), smallest extra first
EXTRAS = {"gguf": {"gguf", "accelerate"}, "gpu": {"triton"}, "edge": {"llama_cpp"}, "serve": {"fastapi", "uvicorn"},
          "eval": {"gguf", "accelerate", "lm_eval", "datasets", "matplotlib", "yaml"},
          "train": {"gguf", "accelerate", "datasets", "pyarrow", "zstandard", "yaml", "tensorboard", "matplotlib"}}
# The extra that brings everything a command needs, and what it imports in any case (checked before any work)
COMMAND_EXTRA = {"distill": ("train", ("yaml", "matplotlib")), "eval": ("eval", ("lm_eval", "matplotlib")),
                 "serve": ("serve", ("fastapi", "uvicorn"))}


def check_command_extra(command: str) -> None:
    _, needed = COMMAND_EXTRA.get(command, (None, ()))
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise ModuleNotFoundError(f"No module named {missing[0]!r}", name=missing[0])


def missing_extra(err: ImportError, command: str) -> str | None:
    """The extra that brings a module a command failed to import (the command's own extra when it does), or None
    for any other ImportError. transformers reports a missing gguf in its message, not as a module name."""
    name = (err.name or "").split(".")[0] or ("gguf" if "gguf" in str(err) else "")
    own = COMMAND_EXTRA.get(command, (None,))[0]
    if own is not None and name in EXTRAS[own]:
        return own
    return next((extra for extra, modules in EXTRAS.items() if name in modules), None)


if __name__ == "__main__":
    sys.exit(main())
