"""Depthwise causal convolution over the mixer's [x | B | C] channels (kernel 4, bias, no activation)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv(
    u: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    conv_state: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """u (batch, L, channels); weight (channels, 1, K); conv_state (batch, channels, K-1): the last K-1 raw inputs
    before u (zeros for a fresh sequence). Returns (out (batch, L, channels), new conv_state).

    With ``seq_idx`` a token only sees earlier inputs of its own document. The first document of the batch
    row continues ``conv_state`` (prefill in pieces equals one prefill).
    """
    batch, length, channels = u.shape
    width = weight.shape[-1]
    history = u.new_zeros(batch, channels, width - 1) if conv_state is None else conv_state.to(u.dtype)
    full = torch.cat([history, u.transpose(1, 2)], dim=2)  # (b, ch, K-1+L)
    new_state = full[:, :, -(width - 1):]
    if seq_idx is None:
        out = F.conv1d(full, weight.to(u.dtype), bias.to(u.dtype) if bias is not None else None, groups=channels)
        return out.transpose(1, 2), new_state
    # Tap k reads the input k steps back; keep it only where no document boundary lies in between.
    seq = torch.cat([seq_idx[:, :1].expand(batch, width - 1), seq_idx], dim=1)  # history shares the 1st document
    out = u.new_zeros(batch, channels, length) if bias is None else bias.to(u.dtype)[None, :, None].expand(batch, -1, length).clone()
    for back in range(width):
        start = width - 1 - back
        same = (seq[:, start:start + length] == seq_idx)[:, None, :]
        out = out + weight[:, 0, width - 1 - back].to(u.dtype)[None, :, None] * full[:, :, start:start + length] * same
    # Inputs of an earlier document must not reach a continuation of the last one.
    new_state = new_state * (seq[:, -(width - 1):] == seq_idx[:, -1:])[:, None, :]
    return out.transpose(1, 2), new_state


def conv_step(u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, conv_state: torch.Tensor) -> torch.Tensor:
    """One token: u (batch, channels). Shifts conv_state (batch, channels, K-1) in place; returns (batch, channels)."""
    window = torch.cat([conv_state, u[:, :, None].to(conv_state.dtype)], dim=2)  # (b, ch, K)
    out = (window * weight[:, 0].to(window.dtype)).sum(-1)
    if bias is not None:
        out = out + bias.to(window.dtype)
    conv_state.copy_(window[:, :, 1:])
    return out.to(u.dtype)
