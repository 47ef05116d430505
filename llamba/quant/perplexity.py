"""Perplexity of a (quantized) student on the first ``n_tokens`` of a JSON-lines corpus file: the accuracy check of
the quantization (int4 / int8 within 3% / 1% of the float32 student)."""

from __future__ import annotations

import math

import torch

from llamba.metrics import log_probs, nll_sum, stream_windows
from llamba.text import iter_documents


def corpus_tokens(path, tokenizer, n_tokens: int) -> torch.Tensor:
    """The first ``n_tokens`` tokens of the documents in ``path`` (any file ``llamba.text`` reads: .jsonl[.xz],
    ``{"text": ...}`` per line, parquet, .txt)."""
    ids: list[int] = []
    for text in iter_documents(str(path)):
        ids.extend(tokenizer(text[: 8 * n_tokens])["input_ids"])
        if len(ids) >= n_tokens:
            break
    if len(ids) < n_tokens:
        raise ValueError(f"{path} holds only {len(ids)} tokens, fewer than the {n_tokens} asked for")
    return torch.tensor(ids[:n_tokens])


@torch.inference_mode()
def perplexity(model, tokens: torch.Tensor, window: int = 1024) -> float:
    """exp(mean next-token NLL) over non-overlapping windows (each scored from a fresh state)."""
    nll, count = 0.0, 0
    for ids in stream_windows(tokens, window):
        window_nll, positions = nll_sum(log_probs(model(ids).logits[:, :-1]), ids)
        nll += window_nll
        count += positions
    return math.exp(nll / count)


def all_linear_bits(model, bits: int, head_bits: int = 8, mlp_bits: int | None = None):
    """(parent, attribute name, bits) of every ``nn.Linear`` of any model (e.g. the Llama teacher): the head at
    ``head_bits``, linears inside a module named ``mlp`` at ``mlp_bits`` (None: ``bits``), the rest at ``bits``."""
    from torch import nn

    head = model.get_output_embeddings()
    plan = []
    for parent_name, parent in model.named_modules():
        in_mlp = parent_name.split(".")[-1] == "mlp" and mlp_bits is not None
        for name, child in parent.named_children():
            if isinstance(child, nn.Linear):
                plan.append((parent, name, head_bits if child is head else mlp_bits if in_mlp else bits))
    return plan


def quantize_all_linears(model, bits: int, group_size: int = 32, head_bits: int = 8, mlp_bits: int | None = None) -> None:
    """Any model (e.g. the Llama teacher): every ``nn.Linear`` becomes a ``QuantizedLinear`` (bits by
    ``all_linear_bits``). The accuracy of the weight format on a trained network, independent of the student's
    training."""
    from llamba.quant.modules import QuantizedLinear

    for parent, name, b in all_linear_bits(model, bits, head_bits, mlp_bits):
        if b != 32:
            setattr(parent, name, QuantizedLinear.from_linear(getattr(parent, name), b, group_size))
