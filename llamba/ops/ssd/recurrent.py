"""One decoding step of the Discrete Mamba-2 recurrence, updating the state in place."""

from __future__ import annotations

import torch

from llamba.ops.ssd.naive import expand_groups


def ssd_step(state: torch.Tensor, x: torch.Tensor, B: torch.Tensor, C: torch.Tensor, log_a: torch.Tensor) -> torch.Tensor:
    """state (batch, H, P, N) float32+, updated in place; x (batch, H, P); B, C (batch, G, N); log_a (batch, H).

    Returns y (batch, H, P) in x's dtype. In place so that a preallocated cache (and a captured CUDA graph)
    keeps pointing at the same memory.
    """
    dtype = state.dtype
    n_heads = x.shape[1]
    Bh = expand_groups(B, n_heads).to(dtype)
    Ch = expand_groups(C, n_heads).to(dtype)
    state.mul_(log_a.to(dtype).exp()[:, :, None, None])
    state.add_(x.to(dtype)[..., :, None] * Bh[:, :, None, :])
    y = torch.einsum("bhpn,bhn->bhp", state, Ch)
    return y.to(x.dtype)
