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


def kl_sum(teacher_logp: torch.Tensor, student_logp: torch.Tensor) -> tuple[float, int]:
    """(sum of KL(teacher || student), number of positions) over every position of the (batch, P, V) inputs."""
    kl = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)
    return float(kl.sum()), kl.numel()


@torch.no_grad()
def kl_and_nll(student_logits: torch.Tensor, teacher_logits: torch.Tensor, input_ids: torch.Tensor,
               kl_last: bool = True) -> dict:
    """Sums over one batch of windows: KL(teacher || student) and the next-token NLL of both models, with their
    position counts. ``kl_last``: KL also at each window's last position (its distribution predicts no token of
    the window, so NLL never counts it; distillation's validation does count it for KL, ``llamba eval`` does not)."""
    log_s, log_t = log_probs(student_logits), log_probs(teacher_logits)
    if not kl_last:
        log_s, log_t = log_s[:, :-1], log_t[:, :-1]
    kl, kl_positions = kl_sum(log_t, log_s)
    student_nll, positions = nll_sum(log_s, input_ids)
    teacher_nll, _ = nll_sum(log_t, input_ids)
    return {"kl": kl, "kl_positions": kl_positions, "student_nll": student_nll, "teacher_nll": teacher_nll,
            "nll_positions": positions}


def stream_windows(tokens: torch.Tensor, window: int) -> list[torch.Tensor]:
    """A 1-D token stream cut into non-overlapping (1, window) windows; the last one may be shorter, and is
    dropped when it holds fewer than 2 tokens (nothing to predict)."""
    out = [tokens[start:start + window][None] for start in range(0, tokens.numel() - 1, window)]
    return [w for w in out if w.shape[1] >= 2]
