"""Next-token NLL and KL(teacher || student) sums over windows of token ids: the one definition behind every
perplexity and KL llamba reports (distillation's validation in ``llamba.distill.report``, ``llamba eval --tasks
ppl`` in ``llamba.eval.ppl``, the quantized formats' check in ``llamba.quant.perplexity``).

Each window is a row of ``input_ids`` (batch, L) scored from an empty state; ``logits`` (batch, L, V) is a model's
output on it. Log-probabilities are float32 (a bf16 model's logits are widened, a float64 model's narrowed);
sums are Python floats, so they accumulate across windows in float64. Position t predicts token t + 1: NLL counts
positions 0 .. L-2 of every window; KL counts the positions it is given (see ``kl_and_nll``'s ``kl_last``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """float32 log-softmax over the vocabulary (the last dimension)."""
    return F.log_softmax(logits.float(), dim=-1)


def nll_sum(logp: torch.Tensor, input_ids: torch.Tensor) -> tuple[float, int]:
    """(sum of -log p(next token), number of positions) over positions 0 .. L-2 of each window. ``logp``: (batch,
    L, V) or (batch, L-1, V) (the last position, which predicts no token of the window, already cut)."""
    target = input_ids[:, 1:, None].to(logp.device)
    return -float(logp[:, : target.shape[1]].gather(-1, target).sum()), target.numel()


def kl_per_position(teacher_logp: torch.Tensor, student_logp: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) at each position of the (batch, P, V) inputs: (batch, P)."""
    return (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)


def kl_sum(teacher_logp: torch.Tensor, student_logp: torch.Tensor) -> tuple[float, int]:
    """(sum of KL(teacher || student), number of positions) over every position of the (batch, P, V) inputs."""
    kl = kl_per_position(teacher_logp, student_logp)
    return float(kl.sum()), kl.numel()


def repeat_positions(input_ids: torch.Tensor, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
    """(batch, L) bool: position t predicts a token that completes a repeat, the three tokens t-1, t, t+1 having
    occurred in that order earlier in the same document of the window. Predicting those is copying from context
    (what induction heads do, and what a recurrent mixer's fixed state loses first), so KL there measures recall
    on held-out text without any benchmark's data."""
    b, L = input_ids.shape
    out = torch.zeros(b, L, dtype=torch.bool, device=input_ids.device)
    if L < 4:
        return out
    ids = input_ids.long()
    doc = seq_idx.long() if seq_idx is not None else torch.zeros_like(ids)
    # trigram ending at position e (tokens e-2, e-1, e), one document; key equal <=> same tokens and document
    key = torch.stack([ids[:, :-2], ids[:, 1:-1], ids[:, 2:], doc[:, 2:]], -1)  # (b, L-2, 4), index e-2
    whole = (doc[:, :-2] == doc[:, 2:])  # the trigram lies in one document
    same = (key[:, :, None] == key[:, None, :]).all(-1) & whole[:, :, None] & whole[:, None, :]
    earlier = torch.ones(L - 2, L - 2, dtype=torch.bool, device=ids.device).tril(-1)  # j < i: an earlier trigram
    repeated = (same & earlier).any(-1)  # (b, L-2): the trigram ending at e = index + 2 occurred before
    out[:, 1:-1] = repeated  # the trigram ending at e is completed by the prediction at position e - 1
    return out


@torch.no_grad()
def kl_and_nll(student_logits: torch.Tensor, teacher_logits: torch.Tensor, input_ids: torch.Tensor,
               kl_last: bool = True, repeats: torch.Tensor | None = None) -> dict:
    """Sums over one batch of windows: KL(teacher || student) and the next-token NLL of both models, with their
    position counts. ``kl_last``: KL also at each window's last position (its distribution predicts no token of
    the window, so NLL never counts it; distillation's validation does count it for KL, ``llamba eval`` does not).
    ``repeats`` ((batch, L) bool, ``repeat_positions``): also the KL summed over those positions alone."""
    log_s, log_t = log_probs(student_logits), log_probs(teacher_logits)
    if not kl_last:
        log_s, log_t = log_s[:, :-1], log_t[:, :-1]
    kl = kl_per_position(log_t, log_s)
    student_nll, positions = nll_sum(log_s, input_ids)
    teacher_nll, _ = nll_sum(log_t, input_ids)
    sums = {"kl": float(kl.sum()), "kl_positions": kl.numel(), "student_nll": student_nll, "teacher_nll": teacher_nll,
            "nll_positions": positions}
    if repeats is not None:
        mask = repeats[:, : kl.shape[1]].to(kl.device)
        sums.update(kl_repeats=float(kl[mask].sum()), repeat_positions=int(mask.sum()))
    return sums


def stream_windows(tokens: torch.Tensor, window: int) -> list[torch.Tensor]:
    """A 1-D token stream cut into non-overlapping (1, window) windows; the last one may be shorter, and is
    dropped when it holds fewer than 2 tokens (nothing to predict)."""
    out = [tokens[start:start + window][None] for start in range(0, tokens.numel() - 1, window)]
    return [w for w in out if w.shape[1] >= 2]
