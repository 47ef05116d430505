"""Saving and loading Llamba students safely (safetensors only), and one loader for "any model name or path".

A checkpoint is a folder in the official cartesia layout: ``config.json`` (``d_model``, ``ssm_cfg`` ...) and
``*.safetensors`` with the official key names, plus the teacher's tokenizer files when llamba wrote it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from llamba.model import LlambaConfig, LlambaForCausalLM
from llamba.teacher import PICKLE_SUFFIXES, load_teacher
from llamba.weightfiles import compare_shapes, read_shapes, verify_digests, write_digests


def is_llamba_checkpoint(path) -> bool:
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        data = json.loads(config.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{config}: not valid JSON ({err}); the file is damaged") from None
    return isinstance(data, dict) and (data.get("model_type") == "llamba" or "ssm_cfg" in data)


def _weight_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickles = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise ValueError(f"{folder} holds pickle weights ({', '.join(pickles)}); llamba never unpickles checkpoints. "
                         "Re-save them as safetensors (safetensors.torch.save_file(state_dict, 'model.safetensors')).")
    raise FileNotFoundError(f"{folder}: no *.safetensors weight file")


def _remedy(folder: Path) -> str:
    """What to do about a damaged student file: the stage outputs of a run are re-made by its own command."""
    if folder.name == "final" and folder.parent.name.startswith("stage"):
        return (f"Delete {folder.parent} and re-run the same `llamba distill` command to redo that stage "
                "(the earlier stages are kept)")
    if folder.name == "init":
        return f"Delete {folder} and re-run the same `llamba distill` command to initialise the student again"
    return "Restore the folder from a copy, or write the student again (llamba convert / llamba distill)"


def check_weights(config: LlambaConfig, folder) -> None:
    """Compare every tensor's shape in the safetensors files with what ``config`` implies, before loading anything.

    Raises ValueError naming the key and both shapes, the missing / unexpected keys, or a damaged file."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in LlambaForCausalLM(config).state_dict().items()}
    if config.tie_embeddings:
        expected.pop("lm_head.weight", None)
    found = read_shapes(_weight_files(Path(folder)), _remedy(Path(folder)))
    if config.tie_embeddings:
        found.pop("lm_head.weight", None)  # some writers store the tied head too; it is the embedding
    compare_shapes(expected, found, folder)


def load_student(path, dtype: torch.dtype | None = None, device="cpu") -> LlambaForCausalLM:
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such checkpoint folder")
    config = LlambaConfig.from_pretrained(folder)
    check_weights(config, folder)
    verify_digests(folder, _remedy(folder))
    model = LlambaForCausalLM.from_pretrained(folder, config=config, dtype=dtype or torch.float32, use_safetensors=True)
    return model.to(device).eval()


def save_student(model: LlambaForCausalLM, tokenizer, out_dir) -> Path:
    """Write the student (and its tokenizer, and the weight files' digests) to ``out_dir``, atomically: into a
    sibling ``.tmp`` folder first, then swapped in, so a kill leaves either the old folder or the new one whole.
    An existing ``out_dir`` is replaced (callers refuse one they must not replace, see cli.common)."""
    out = Path(out_dir)
    where = out.resolve()  # `--out .` has no name to put .tmp beside
    tmp, old = where.with_name(where.name + ".tmp"), where.with_name(where.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    write_digests(tmp)
    if where.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(where, old)
    os.replace(tmp, where)
    shutil.rmtree(old, ignore_errors=True)
    return out


def load_tokenizer_from(folder):
    from transformers import AutoTokenizer

    has_tokenizer = any((Path(folder) / name).exists() for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))
    return AutoTokenizer.from_pretrained(folder) if has_tokenizer else None


def load_model(name_or_path, dtype: torch.dtype | None = None, device="cpu"):
    """(model, tokenizer) for a Llamba checkpoint folder, a teacher folder, a GGUF file or a known teacher name."""
    if os.path.isdir(name_or_path) and is_llamba_checkpoint(name_or_path):
        return load_student(name_or_path, dtype, device), load_tokenizer_from(name_or_path)
    return load_teacher(name_or_path, dtype=dtype or torch.float32, device=device)
