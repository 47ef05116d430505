"""The cumulative phase of a GateLoop mixer and the rotation of B and C by it (a data-dependent RoPE).

Shapes (as in ``llamba.ops.ssd``, plus the phase):
    theta   (batch, length, G, N/2)  phase increment of each state pair at each token (radians)
    phase   (batch, G, N/2)          cumulative phase, the recurrent state that goes with the SSM state

State pair j of a group is (dim j, dim j + N/2): the pairing of transformers' Llama ``rotate_half``, so that a
teacher's RoPE frequencies carry over as the phase bias unchanged (docs/gateloop.md derives why rotating B and C
by the cumulative phase turns the complex recurrence into the real Discrete Mamba-2 scan).
"""

from __future__ import annotations

import math

import torch

from llamba.ops.ssd.naive import state_dtype

TWO_PI = 2 * math.pi


def wrap_phase(phi: torch.Tensor) -> torch.Tensor:
    """phi mod 2 pi, in [-pi, pi). Only e^{i phi} matters, and a bounded angle keeps float32 cos/sin and the
    decode step's running sum accurate however long the sequence (an unwrapped float32 sum drifts by ~ulp(phi) per
    token: a whole radian after 1e5 tokens)."""
    return torch.remainder(phi + math.pi, TWO_PI) - math.pi


def cumulative_phase(theta: torch.Tensor, initial_phase: torch.Tensor | None = None,
                     seq_idx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Phi_t = initial_phase + sum_{k <= t} theta_k, restarting from 0 at each new document of ``seq_idx`` (the first
    token's document continues ``initial_phase``, as the scan's initial state belongs to it). Returns (Phi (batch, L,
    G, N/2), final phase (batch, G, N/2)), both wrapped and in the state dtype; summed in float64 so that no
    precision is lost along the sequence whatever the model dtype."""
    dtype = state_dtype(theta.dtype)
    cs = theta.to(torch.float64).cumsum(dim=1)
    if seq_idx is not None and theta.shape[1] > 1:
        # Each token subtracts the running sum just before its document's first token (nothing in the first document).
        length = theta.shape[1]
        idx = torch.arange(length, device=theta.device)
        first = torch.zeros_like(seq_idx, dtype=torch.bool)
        first[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
        start = torch.where(first, idx, 0).cummax(dim=-1).values  # (batch, L): index of the document's first token
        before = torch.cat([torch.zeros_like(cs[:, :1]), cs[:, :-1]], dim=1)
        base = before.gather(1, start[:, :, None, None].expand_as(cs))
        cs = cs - base
        in_first = (start == 0)[:, :, None, None]
    else:
        in_first = None
    if initial_phase is not None:
        init = initial_phase.to(torch.float64)[:, None]
        cs = cs + (init if in_first is None else torch.where(in_first, init, 0.0))
    phi = wrap_phase(cs)
    if theta.shape[1] == 0:
        final = (initial_phase if initial_phase is not None else theta.new_zeros(theta.shape[0], *theta.shape[2:]))
        return phi.to(dtype), final.to(dtype)
    return phi.to(dtype), phi[:, -1].to(dtype)


def rotate_pairs(t: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
    """t (..., N) with each pair (j, j + N/2) read as the complex number t_j + i t_{j+N/2}, times e^{i phi_j}; phi
    (..., N/2). The same as transformers' ``q * cos + rotate_half(q) * sin`` with angle phi. Computed in phi's dtype
    (the state dtype), returned in t's."""
    half = t.shape[-1] // 2
    t1, t2 = t.to(phi.dtype).split(half, dim=-1)
    cos, sin = phi.cos(), phi.sin()
    return torch.cat([t1 * cos - t2 * sin, t2 * cos + t1 * sin], dim=-1).to(t.dtype)


def rotate_by_phase(B: torch.Tensor, C: torch.Tensor, theta: torch.Tensor, initial_phase: torch.Tensor | None = None,
                    seq_idx: torch.Tensor | None = None):
    """B, C (batch, L, G, N) rotated by their token's cumulative phase: (B', C', final phase). With them the real
    Discrete Mamba-2 recurrence computes the GateLoop one (docs/gateloop.md)."""
    check_theta(theta, B)
    phi, final = cumulative_phase(theta, initial_phase, seq_idx)
    return rotate_pairs(B, phi), rotate_pairs(C, phi), final


def check_theta(theta: torch.Tensor, B: torch.Tensor) -> None:
    if B.shape[-1] % 2:
        raise ValueError(f"a GateLoop mixer rotates pairs of state dims: d_state must be even, got {B.shape[-1]}")
    want = (*B.shape[:-1], B.shape[-1] // 2)
    if tuple(theta.shape) != want:
        raise ValueError(f"theta has shape {tuple(theta.shape)}; for B of shape {tuple(B.shape)} it must be {want} "
                         "(one phase per group and state pair)")
