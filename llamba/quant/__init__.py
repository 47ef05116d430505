"""The quantized CPU runtime: per-group int8 / int4 weights, a compiled decode step that allocates nothing per
token, and a single-file artifact. ``load_for_cpu(path, quant)`` is the entry point for ``llamba generate``."""

from __future__ import annotations

from pathlib import Path

# No torch at import: `llamba quantize --help` reads ARTIFACT_NAME from here and should not pay for torch.
ARTIFACT_NAME = "model.cpu.safetensors"  # what `llamba quantize --out DIR` writes into DIR
QUANT_CHOICES = ("none", "int8", "int4")
DEFAULT_GROUP_SIZE = 32
# Embedding + head stay int8 when the body is int4: measured perplexity cost of an int4 head in results/edge-cpu.md.
DEFAULT_HEAD_BITS = {"none": 32, "int8": 8, "int4": 8}
# With a calibration text: activation-aware scales, bias correction, or both (llamba.quant.awq)
CALIBRATION_METHODS = ("scales+bias", "bias", "scales")


def quantize_student(model, quant: str, group_size: int = DEFAULT_GROUP_SIZE, head_bits: int | None = None,
                     mlp_bits: int | None = None, linear_bits: dict[str, int] | None = None,
                     calibration=None, calibration_method: str = "scales+bias") -> dict:
    """Quantize a float32 student in place; returns the settings stored in the artifact. ``mlp_bits=8`` with
    ``quant='int4'`` keeps the MLPs int8: int4 MLPs cost a trained student far more perplexity than int4 mixers
    (results/edge-cpu-ppl-student.json), though int4 mixers still cost a fully distilled one 13%
    (results/cpu-artifacts-smollm2-135m.md); ``linear_bits`` sets single projections (``{"in_proj": 8}``).
    ``calibration``: token ids (1-D) whose activations adjust the student before rounding, for the bits each linear
    gets (``llamba.quant.awq``): ``calibration_method`` one of CALIBRATION_METHODS; None: plain round-to-nearest."""
    from llamba.quant.modules import quantize_model

    if quant not in QUANT_CHOICES:
        raise ValueError(f"unknown quantization {quant!r}; choose one of {QUANT_CHOICES}")
    if linear_bits and quant == "none":
        raise ValueError("bits for single projections need a quantized body (--bits 4 or 8), not --bits 32")
    if calibration is not None and quant == "none":
        raise ValueError("activation-aware scales (a calibration text) need a quantized body (--bits 4 or 8), not --bits 32")
    if calibration_method not in CALIBRATION_METHODS:
        raise ValueError(f"calibration method {calibration_method!r}: choose one of {CALIBRATION_METHODS}")
    head_bits = DEFAULT_HEAD_BITS[quant] if head_bits is None else head_bits
    settings = {"quant": quant, "group_size": group_size, "head_bits": head_bits}
    if mlp_bits is not None:
        settings["mlp_bits"] = mlp_bits
    if linear_bits:
        settings["linear_bits"] = dict(linear_bits)
    bits = 4 if quant == "int4" else 8
    if calibration is not None:
        from llamba.quant.awq import apply_scales
        from llamba.quant.modules import block_linear_bits

        plan = {id(getattr(parent, name)): b for parent, name, b in block_linear_bits(model, bits, mlp_bits, linear_bits)}
        report = apply_scales(model, model.backbone.layers, calibration, lambda linear: plan[id(linear)], group_size,
                              scales="scales" in calibration_method, bias_correction="bias" in calibration_method)
        settings["calibration"] = {"tokens": len(calibration), "method": calibration_method, "sites": report}
    if quant != "none":
        quantize_model(model, bits, group_size, head_bits, mlp_bits, linear_bits)
    return settings


def load_for_cpu(path, quant: str | None = None, threads: int | None = None):
    """A ready ``CpuDecoder`` (``.generate``, ``.prefill``, ``.step``, ``.model``, ``.tokenizer``, ``.quant``) from
    either an artifact written by ``llamba quantize`` (``quant`` None or equal to the file's) or a float32 student
    checkpoint folder (quantized now with ``quant``, default 'none')."""
    import torch

    from llamba.quant.artifact import artifact_in, load_artifact
    from llamba.quant.runtime import CpuDecoder

    path = Path(path)
    if (artifact := artifact_in(path)) is not None:
        model, tokenizer, settings = load_artifact(artifact)
        if quant not in (None, settings["quant"]):
            raise ValueError(f"{path} was quantized as {settings['quant']}, not {quant}; quantize the student again "
                             f"with `llamba quantize --bits ...` or drop --quant")
    elif path.is_dir():
        from llamba.checkpoint import is_llamba_checkpoint, load_student, load_tokenizer_from

        if not is_llamba_checkpoint(path):
            raise ValueError(f"{path}: the CPU runtime runs Llamba students; this folder is not one")
        model, tokenizer = load_student(path, dtype=torch.float32), load_tokenizer_from(path)
        settings = quantize_student(model, quant or "none")
    else:
        raise FileNotFoundError(f"{path}: neither a llamba CPU artifact (.safetensors) nor a student checkpoint folder")
    decoder = CpuDecoder(model, threads=threads)
    decoder.tokenizer, decoder.quant = tokenizer, settings
    return decoder
