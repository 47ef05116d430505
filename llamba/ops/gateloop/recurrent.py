"""One decoding step of the GateLoop recurrence: advance the cumulative phase, rotate B and C by it, then the
Discrete Mamba-2 step. State and phase are updated in place (a preallocated cache keeps its memory)."""

from __future__ import annotations

import torch

from llamba.ops.gateloop.phase import check_theta, rotate_pairs, wrap_phase
from llamba.ops.ssd.recurrent import ssd_step


def advance_phase(phase: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """phase (batch, G, N/2) += theta, wrapped, in place; returns it."""
    return phase.copy_(wrap_phase(phase + theta.to(phase.dtype)))


def gateloop_step(state, phase, x, B, C, log_a, theta):
    """state (b, H, P, N) and phase (b, G, N/2), both updated in place; x (b, H, P); B, C (b, G, N); log_a (b, H);
    theta (b, G, N/2). Returns y (b, H, P) in x's dtype."""
    check_theta(theta, B)
    phi = advance_phase(phase, theta)
    return ssd_step(state, x, rotate_pairs(B, phi), rotate_pairs(C, phi), log_a)
