"""The single-file CPU artifact: one safetensors file holding the (quantized) weights, with the config, tokenizer,
quantization settings, a format version and a SHA-256 checksum of every tensor in its metadata.

Loading needs only the inference dependencies (torch, safetensors, tokenizers/transformers); a file of another
format version, one whose tensors do not fit its config, or one whose bytes changed is refused with a clear error.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from llamba.model import LlambaAttention, LlambaConfig, LlambaForCausalLM
from llamba.quant import ARTIFACT_NAME
from llamba.quant.modules import MIXER_LINEARS, QuantizedEmbedding, QuantizedLinear
from llamba.quant.reference import QuantizedWeight

FORMAT = "llamba-cpu"
FORMAT_VERSION = "1"


def checksum(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _tokenizer_metadata(tokenizer) -> dict[str, str]:
    if tokenizer is None:
        return {}
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        raise ValueError("only fast (tokenizers-backed) tokenizers can be stored in the artifact")
    extra = {k: getattr(tokenizer, k, None) for k in ("bos_token", "eos_token", "pad_token", "unk_token", "chat_template")}
    return {"tokenizer": backend.to_str(), "tokenizer_config": json.dumps({k: v for k, v in extra.items() if v is not None})}


def save_artifact(model, tokenizer, path, quant: dict) -> Path:
    """``model``: a student after ``quantize_model`` (or float32 for quant 'none'); ``quant``: its settings."""
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / "model.cpu.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    state = model.state_dict()
    # Tied tables appear twice: store them once, under the head's name (the loader rebuilds the tie).
    for name in sorted(state, key=lambda n: not n.startswith("lm_head.")):
        t = state[name]
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        tensors[name] = t.detach().contiguous()
    metadata = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "config": model.config.to_json_string(),
        "quant": json.dumps(quant), "checksum": checksum(tensors), **_tokenizer_metadata(tokenizer),
    }
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)  # atomic: an interrupted write never leaves a half file, nor destroys the old one
    return path


def artifact_in(path) -> Path | None:
    """The artifact a path names: the file itself, or ``DIR/model.cpu.safetensors`` for a folder that
    ``llamba quantize --out DIR`` wrote; None for anything else (a student folder, a teacher, a missing path)."""
    path = Path(path)
    candidate = path / ARTIFACT_NAME if path.is_dir() else path
    return candidate if is_artifact(candidate) else None


def is_artifact(path) -> bool:
    path = Path(path)
    if not path.is_file() or path.suffix != ".safetensors":
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == FORMAT
    except (SafetensorError, OSError):
        return False


def load_artifact(path):
    """(model, tokenizer or None, quant settings) from an artifact file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such artifact file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable safetensors file ({err}); re-create it with `llamba quantize`") from err
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a llamba CPU artifact (format={meta.get('format')!r}); create one with `llamba quantize`")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: artifact format version {meta.get('format_version')!r}, this llamba reads "
                         f"{FORMAT_VERSION!r}; re-create it with this version's `llamba quantize`")
    if checksum(tensors) != meta.get("checksum"):
        raise ValueError(f"{path}: checksum mismatch, the file is corrupted or was modified; re-create it with `llamba quantize`")
    config = LlambaConfig(**json.loads(meta["config"]))
    quant = json.loads(meta["quant"])
    model = _build(config, tensors, path)
    return model, _load_tokenizer(meta), quant


def _build(config: LlambaConfig, tensors: dict[str, torch.Tensor], path: Path):
    with torch.device("meta"):
        model = LlambaForCausalLM(config)
    kinds = ["attention" if config.is_attention_layer(i) else "mixer" for i in range(config.n_layer)]
    linears = [(f"backbone.layers.{i}.{name}", layer, name) for i, layer in enumerate(model.backbone.layers)
               for name in (*(f"mixer.{n}" for n in MIXER_LINEARS[kinds[i]]), "mlp.gate_proj", "mlp.up_proj",
                            "mlp.down_proj")]
    linears.append(("lm_head", model, "lm_head"))
    for prefix, owner, name in linears:
        if f"{prefix}.data" not in tensors:
            continue
        *parents, leaf = name.split(".")
        for p in parents:
            owner = getattr(owner, p)
        expected = getattr(owner, leaf)
        data = tensors.pop(f"{prefix}.data")
        bits = 4 if data.dtype == torch.uint8 else 8
        qw = QuantizedWeight(data, tensors.pop(f"{prefix}.scale"), tensors.pop(f"{prefix}.min"), bits)
        if qw.shape != (expected.out_features, expected.in_features):
            raise ValueError(f"{path}: {prefix} holds a {qw.shape} weight but the config needs "
                             f"{(expected.out_features, expected.in_features)}; the artifact does not match its config")
        setattr(owner, leaf, QuantizedLinear(qw, tensors.pop(f"{prefix}.bias", None)))
    if isinstance(model.lm_head, QuantizedLinear):
        if "backbone.embedding.table.data" in tensors:  # untied: an embedding table of its own
            t = {k: tensors.pop(f"backbone.embedding.table.{k}") for k in ("data", "scale", "min")}
            table = QuantizedLinear(QuantizedWeight(t["data"], t["scale"], t["min"], 4 if t["data"].dtype == torch.uint8 else 8))
        else:
            table = model.lm_head
        model.backbone.embedding = QuantizedEmbedding(table)
    if config.tie_embeddings and "lm_head.weight" in tensors:  # a float32 tied table, stored under the head's name
        tensors["backbone.embedding.weight"] = tensors.pop("lm_head.weight")
    try:
        missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    except RuntimeError as err:
        raise ValueError(f"{path}: tensors do not match the config ({str(err).splitlines()[-1].strip()})") from err
    if config.tie_embeddings and not isinstance(model.lm_head, QuantizedLinear):
        model.lm_head.weight = model.backbone.embedding.weight
    if model.backbone.rotary_emb is not None:  # a hybrid's RoPE tables: computed buffers, not stored, still on meta
        _rebuild_rotary(model)
    left = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if left or unexpected:
        raise ValueError(f"{path}: artifact does not match its config: missing {left[:5]}, unexpected {unexpected[:5]}")
    return model.eval()


def _rebuild_rotary(model) -> None:
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rotary = LlamaRotaryEmbedding(model.config.llama_attention_config())
    model.backbone.rotary_emb = rotary
    for block in model.backbone.layers:
        if isinstance(block.mixer, LlambaAttention):
            block.mixer._rotary = (rotary,)


def _load_tokenizer(meta: dict):
    if "tokenizer" not in meta:
        return None
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    extra = json.loads(meta.get("tokenizer_config", "{}"))
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(meta["tokenizer"]), **extra)
