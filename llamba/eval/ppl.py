"""Perplexity of every model, and KL(teacher || model) per token, on held-out text.

The text is cut into fixed windows (the same token ids for every model: they share the teacher's tokenizer);
each window is scored from an empty state, and the teacher's distribution at every position is compared with
each other model's at the same position, window by window, so no logits are ever stored.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from tqdm import tqdm

from llamba.metrics import kl_per_position, log_probs, nll_sum, repeat_positions
from llamba.text import iter_documents


def read_documents(path: str | Path, max_chars: int | None = None) -> list[str]:
    """The documents of a file ``llamba.text`` reads: ``{"text": ...}`` JSON lines (plain or compressed), parquet,
    or a plain text file as one document."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: held-out text not found (pass --ppl-text FILE: .jsonl[.xz] or .txt)")
    docs = list(iter_documents(str(path)))
    return [d[:max_chars] for d in docs] if max_chars else docs


def token_windows(docs: list[str], tokenizer, n_tokens: int, seq_len: int) -> torch.Tensor:
    """(n_windows, seq_len) token ids, about ``n_tokens`` in all, taken round-robin from the documents' starts so
    that every document contributes equally."""
    if seq_len < 2 or n_tokens < seq_len:
        raise ValueError(f"need seq_len >= 2 and n_tokens >= seq_len (got {seq_len}, {n_tokens})")
    n_windows = n_tokens // seq_len
    per_doc = math.ceil(n_windows / len(docs))
    per_doc_windows = []
    for doc in docs:
        ids = tokenizer.encode(doc[: per_doc * seq_len * 8], add_special_tokens=False)  # 8 chars/token is ample
        per_doc_windows.append([ids[i: i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)][:per_doc])
    windows = []
    for k in range(per_doc):
        windows += [w[k] for w in per_doc_windows if k < len(w)]
    if not windows:
        raise ValueError(f"the held-out text has no run of {seq_len} tokens")
    return torch.tensor(windows[:n_windows], dtype=torch.long)


def _log_probs(model, ids: torch.Tensor) -> torch.Tensor:
    """(batch, L-1, V) float32 log-probs of the next token at every position but the last (which predicts no
    token of the window, so neither NLL nor KL counts it)."""
    device = next(model.parameters()).device
    return log_probs(model(ids.to(device)).logits[:, :-1])


@torch.no_grad()
def perplexity_and_kl(models: dict[str, torch.nn.Module], windows: torch.Tensor, batch_size: int = 4,
                      progress: bool = True) -> dict[str, dict[str, float]]:
    """{name: {"ppl", "nll", "kl_from_teacher", "kl_repeats_from_teacher", "tokens"}}; the first model is the
    teacher (its KL is 0). ``kl_repeats_from_teacher``: the KL over the positions that complete a trigram seen
    earlier in the window (``metrics.repeat_positions``: copying from context), None where none does."""
    names = list(models)
    nll = dict.fromkeys(names, 0.0)
    kl = dict.fromkeys(names, 0.0)
    kl_repeats = dict.fromkeys(names, 0.0)
    count = repeats_count = 0
    for start in tqdm(range(0, len(windows), batch_size), desc="ppl/KL windows", disable=not progress):
        ids = windows[start: start + batch_size]
        teacher = _log_probs(models[names[0]], ids)
        repeats = repeat_positions(ids)[:, :-1].to(teacher.device)  # as the log-probs: the last position dropped
        if teacher.shape[-1] <= int(windows.max()):
            raise ValueError(f"{names[0]} has a {teacher.shape[-1]}-token vocabulary, smaller than the text's ids")
        for name in names:
            logp = teacher if name == names[0] else _log_probs(models[name], ids)
            if logp.shape[-1] != teacher.shape[-1]:
                raise ValueError(f"{name}: vocabulary {logp.shape[-1]} differs from the teacher's {teacher.shape[-1]};"
                                 " KL needs the same tokenizer")
            nll[name] += nll_sum(logp, ids)[0]
            if name != names[0]:
                per_position = kl_per_position(teacher, logp)
                kl[name] += float(per_position.sum())
                kl_repeats[name] += float(per_position[repeats].sum())
        count += ids[:, 1:].numel()
        repeats_count += int(repeats.sum())
    return {name: {"nll": nll[name] / count, "ppl": math.exp(nll[name] / count), "kl_from_teacher": kl[name] / count,
                   "kl_repeats_from_teacher": kl_repeats[name] / repeats_count if repeats_count else None,
                   "tokens": count} for name in names}
