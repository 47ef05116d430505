"""Knowledge distillation's loss from the student's last hidden state, without the student's (tokens, vocab) logits.

``soft_cross_entropy(h @ W.T + b, teacher_logits)`` (``llamba.distill.stages``, its plain twin) holds the student's
logits in bf16, their float32 copy, its log-softmax and the teacher's softmax at once: at 16 x 1024 tokens and
SmolLM2's 49,152-token vocabulary each is 1.6-3.2 GB, and autograd keeps several for the backward. Here the rows go
through in chunks, and each chunk's gradient is computed in the forward, while its logits exist anyway (as
Liger-Kernel's fused linear losses do): the backward only scales what the forward left, so no logits are kept and
the head's product is never recomputed.

    loss = tau^2 / N * sum_rows -softmax(t / tau) . log_softmax(s / tau),   s = h W^T + b
    d loss / d s = tau / N * (softmax(s / tau) - softmax(t / tau))
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

CHUNK_ROWS = 2048  # 2048 x 49,152 float32 is 0.4 GB a temporary: small beside the teacher's logits, large per launch


def soft_cross_entropy_rows(s: torch.Tensor, t: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """For logits s, t (rows, V): the sum over rows of -softmax(t/tau) . log_softmax(s/tau), and
    softmax(s/tau) - softmax(t/tau) (the loss's gradient in s, up to the caller's scale), in at least float32.
    One function so that ``torch.compile`` can fuse its elementwise work and reductions."""
    wide = torch.promote_types(s.dtype, torch.float32)
    log_s = F.log_softmax(s.to(wide) / temperature, dim=-1)
    p_t = F.softmax(t.to(wide) / temperature, dim=-1)
    return -(p_t * log_s).sum(-1).sum(), log_s.exp() - p_t


@functools.cache
def _compiled_rows():
    return torch.compile(soft_cross_entropy_rows, dynamic=False)


class _LinearSoftCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, teacher_logits, temperature, compute_dtype, chunk_rows, compiled):
        rows_fn = _compiled_rows() if compiled else soft_cross_entropy_rows
        n = h.shape[0]
        w = weight.to(compute_dtype)
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(h) if want_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.promote_types(weight.dtype, torch.float32)) if want_w else None
        grad_b = torch.zeros_like(bias, dtype=grad_w.dtype if grad_w is not None else torch.float32) \
            if want_b else None
        total = torch.zeros((), device=h.device, dtype=torch.promote_types(h.dtype, torch.float32))
        scale = temperature / n  # d loss / d s = tau / N (p_s - p_t)
        for start in range(0, n, chunk_rows):
            rows = slice(start, min(n, start + chunk_rows))
            hc = h[rows].to(compute_dtype)
            s = hc @ w.T
            if bias is not None:
                s = s + bias.to(compute_dtype)
            loss, diff = rows_fn(s, teacher_logits[rows], temperature)
            total += loss
            g = (diff * scale).to(compute_dtype)
            if want_h:
                grad_h[rows] = (g @ w).to(h.dtype)
            if want_w:
                grad_w += (g.T @ hc).to(grad_w.dtype)
            if want_b:
                grad_b += g.sum(0).to(grad_b.dtype)
        ctx.save_for_backward(*(g for g in (grad_h, grad_w, grad_b) if g is not None))
        ctx.wanted = (want_h, want_w, want_b)
        ctx.dtypes = (h.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total * temperature ** 2 / n

    @staticmethod
    def backward(ctx, grad_out):
        saved = iter(ctx.saved_tensors)
        grads = [(next(saved) * grad_out).to(dtype) if wanted else None for wanted, dtype in zip(ctx.wanted, ctx.dtypes)]
        return (*grads, None, None, None, None, None)


def linear_soft_cross_entropy(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                              teacher_logits: torch.Tensor, temperature: float = 1.0,
                              chunk_rows: int = CHUNK_ROWS, compiled: bool | None = None) -> torch.Tensor:
    """``soft_cross_entropy(h @ weight.T + bias, teacher_logits, temperature)`` for h (..., d), weight (V, d),
    teacher_logits (..., V), in chunks of ``chunk_rows`` rows. The head's products run in the autocast dtype when
    autocast is on (as ``nn.Linear`` would), the softmaxes in float32. ``compiled`` (default: on CUDA) fuses each
    chunk's softmax work with ``torch.compile``."""
    if teacher_logits.shape[:-1] != h.shape[:-1] or teacher_logits.shape[-1] != weight.shape[0]:
        raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} do not match hidden states "
                         f"{tuple(h.shape)} and a head of {weight.shape[0]} rows")
    device_type = h.device.type
    compute_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else h.dtype
    if compiled is None:
        compiled = h.is_cuda
    with torch.autocast(device_type, enabled=False):
        return _LinearSoftCrossEntropy.apply(h.reshape(-1, h.shape[-1]), weight, bias,
                                             teacher_logits.reshape(-1, teacher_logits.shape[-1]), float(temperature),
                                             compute_dtype, chunk_rows, compiled)
