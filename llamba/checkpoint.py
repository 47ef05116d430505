"""Saving and loading Llamba students safely (safetensors only), and one loader for "any model name or path".

A checkpoint is a folder in the official cartesia layout: ``config.json`` (``d_model``, ``ssm_cfg`` ...) and
``*.safetensors`` with the official key names, plus the teacher's tokenizer files when llamba wrote it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open

from llamba.model import LlambaConfig, LlambaForCausalLM
from llamba.teacher import PICKLE_SUFFIXES, load_teacher


def is_llamba_checkpoint(path) -> bool:
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    data = json.loads(config.read_text())
    return data.get("model_type") == "llamba" or "ssm_cfg" in data


def _weight_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickles = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise ValueError(f"{folder} holds pickle weights ({', '.join(pickles)}); llamba never unpickles checkpoints. "
                         "Re-save them as safetensors (safetensors.torch.save_file(state_dict, 'model.safetensors')).")
    raise FileNotFoundError(f"{folder}: no *.safetensors weight file")


def check_weights(config: LlambaConfig, folder) -> None:
    """Compare every tensor's shape in the safetensors files with what ``config`` implies, before loading anything.

    Raises ValueError naming the key and both shapes, or the missing / unexpected keys."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in LlambaForCausalLM(config).state_dict().items()}
    if config.tie_embeddings:
        expected.pop("lm_head.weight", None)
    found = {}
    for file in _weight_files(Path(folder)):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                found[key] = tuple(f.get_slice(key).get_shape())
    if config.tie_embeddings:
        found.pop("lm_head.weight", None)  # some writers store the tied head too; it is the embedding
    for key, shape in found.items():
        if key in expected and expected[key] != shape:
            raise ValueError(f"weight {key!r} has shape {shape} in {folder}, but config.json implies {expected[key]}")
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{folder}: weights do not match config.json; missing {missing[:5]}{' ...' if len(missing) > 5 else ''}"
                         f" unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")


def load_student(path, dtype: torch.dtype | None = None, device="cpu") -> LlambaForCausalLM:
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such checkpoint folder")
    config = LlambaConfig.from_pretrained(folder)
    check_weights(config, folder)
    model = LlambaForCausalLM.from_pretrained(folder, config=config, dtype=dtype or torch.float32, use_safetensors=True)
    return model.to(device).eval()


def save_student(model: LlambaForCausalLM, tokenizer, out_dir) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
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
