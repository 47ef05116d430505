"""Small helpers shared by CLI subcommands: model options, numeric option types, output folders.

torch is imported inside the functions that need it: building a parser (``--help``, or a bad option) must not
pay for it.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

DTYPE_NAMES = ("float32", "bfloat16", "float16", "float64")
# llamba.convert.INITS, spelled out so that building the parser imports no torch (tests/test_cli.py keeps them equal)
INIT_CHOICES = ("identity", "attention", "attention-calibrated")


def parse_attention_layers(text: str | None) -> list[int]:
    """'5,14' -> [5, 14], the one syntax of a hybrid's attention layers (``--attention-layers``, a ``--hybrids``
    list); '' or None -> []. ValueError on anything but whole numbers >= 0 and on a repeated one; the range is
    checked against the model (``llamba.model.config.check_attention_layers``)."""
    if text is None or not str(text).strip():
        return []
    parts = [part.strip() for part in str(text).split(",") if part.strip()]
    if not all(part.isdigit() for part in parts):
        raise ValueError(f"attention layers {text!r}: give layer indices (whole numbers >= 0) separated by commas, "
                         "e.g. 5,14")
    layers = [int(part) for part in parts]
    repeated = sorted({i for i in layers if layers.count(i) > 1})
    if repeated:
        raise ValueError(f"attention layers {text!r}: repeats {', '.join(map(str, repeated))}; give each once")
    return sorted(layers)


def add_model_args(parser, default_dtype: str = "auto") -> None:
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    parser.add_argument("--dtype", default=default_dtype, choices=["auto", *DTYPE_NAMES],
                        help="weights dtype (default: bfloat16 on GPU, float32 on CPU)")


def dtype_of(name: str):
    import torch

    if name not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPE_NAMES)}")
    return getattr(torch, name)


def resolve_device(name: str):
    """A torch.device for ``--device`` ('auto': cuda when present); ValueError for a name torch does not know or a
    CUDA device this machine does not have."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r}: expected cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} was asked for, but no CUDA device is available; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def resolve_dtype(name: str, device):
    import torch

    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return dtype_of(name)


def count_parameters(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


# -- numeric options: checked once, by argparse, where they are parsed ----------------------------------------------
def _number(text: str, kind):
    """``text`` as a finite float, or (``kind`` int) a whole number: '64', '5e7' and '1e6' are whole numbers
    (budgets are written like that); '2.5' is not."""
    try:
        x = float(text)
    except ValueError:
        x = math.nan
    if not math.isfinite(x) or (kind is int and x != int(x)):
        raise argparse.ArgumentTypeError(f"expected {'a number' if kind is float else 'a whole number'}, got {text!r}")
    return int(x) if kind is int else x


def int_at_least(minimum: int):
    """argparse type: a whole number >= ``minimum`` ('5e7' allowed, for token budgets)."""
    def parse(text: str) -> int:
        value = _number(text, int)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {text}")
        return value
    parse.__name__ = f"integer >= {minimum}"  # argparse names the type in its messages
    return parse


def float_above(minimum: float):
    """argparse type: a finite number > ``minimum``."""
    def parse(text: str) -> float:
        value = _number(text, float)
        if not value > minimum:
            raise argparse.ArgumentTypeError(f"must be above {minimum:g}, got {text}")
        return value
    parse.__name__ = f"number > {minimum:g}"
    return parse


def int_list(minimum: int):
    """argparse type: comma-separated whole numbers, each >= ``minimum``, at least one."""
    item = int_at_least(minimum)

    def parse(text: str) -> list[int]:
        values = [item(v) for v in text.split(",") if v.strip()]
        if not values:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
        return values
    parse.__name__ = "integer list"
    return parse


# -- output folders ---------------------------------------------------------------------------------------------
def check_output_folder(path, force: bool, what: str = "output") -> None:
    """Before any work: refuse to write into a non-empty folder unless ``--force``, and even then only over a
    Llamba student llamba wrote (an --out pointing at a home folder must never be replaced wholesale)."""
    from llamba.checkpoint import is_llamba_checkpoint

    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: is a file, expected a folder for the {what}")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not force:
        raise ValueError(f"--out {out} is not empty; choose a new folder, or add --force to replace the {what} "
                         "in it (the old one is lost)")
    if not is_llamba_checkpoint(out):
        raise ValueError(f"--out {out} is not empty and holds no Llamba student; --force replaces only a student "
                         "folder llamba wrote. Choose a new or empty folder")
