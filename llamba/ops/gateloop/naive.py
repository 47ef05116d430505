"""Complex-number references of the GateLoop recurrence, written literally (torch complex, no rotation trick):

    a_t = exp(log_a_t) e^{i theta_t}           per value head h and state pair j (theta from h's group)
    S_t = a_t S_{t-1} + x_t B_t^H              S (P, N/2) complex; B^H: conjugate transpose
    y_t = Re(S_t C_t)

with a pair (j, j + N/2) of real dims read as the complex number t_j + i t_{j+N/2}. These are the slow,
obviously-correct twins that the fast forms (rotation + the Discrete Mamba-2 scan) are tested against.
"""

from __future__ import annotations

import torch

from llamba.ops.ssd.naive import expand_groups, same_document


def complex_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if dtype == torch.float64 else torch.complex64


def as_complex(t: torch.Tensor) -> torch.Tensor:
    """(..., N) real -> (..., N/2) complex: pair j is t_j + i t_{j+N/2} (transformers' rotate_half pairing)."""
    half = t.shape[-1] // 2
    return torch.complex(t[..., :half], t[..., half:])


def complex_state(state: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
    """The fast forms' real state (batch, H, P, N) and phase (batch, G, N/2) as the literal complex state
    (batch, H, P, N/2): S = e^{i Phi} conj(S'), where S' = sum of x_s (B_s rotated by Phi_s)^T is what the real scan
    keeps (docs/gateloop.md)."""
    n_heads = state.shape[1]
    rot = torch.polar(torch.ones_like(phase), phase)
    return expand_groups(rot, n_heads)[:, :, None, :] * as_complex(state).conj()


def real_state(S: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
    """The inverse of ``complex_state``: what the fast forms carry for the complex state S at cumulative phase Phi."""
    n_heads = S.shape[1]
    rot = torch.polar(torch.ones_like(phase), -phase)
    s = (expand_groups(rot, n_heads)[:, :, None, :] * S).conj()
    return torch.cat([s.real, s.imag], dim=-1)


def gateloop_loop_complex(x, B, C, log_a, theta, initial_state=None, seq_idx=None):
    """Token-by-token complex recurrence. x (b, L, H, P); B, C (b, L, G, N); log_a (b, L, H); theta (b, L, G, N/2);
    initial_state complex (b, H, P, N/2). Returns (y (b, L, H, P) real, final complex state)."""
    batch, length, n_heads, head_dim = x.shape
    dtype = torch.float64
    cdtype = complex_dtype(dtype)
    Bc = as_complex(expand_groups(B, n_heads).to(dtype))
    Cc = as_complex(expand_groups(C, n_heads).to(dtype))
    th = expand_groups(theta.to(dtype), n_heads)
    S = torch.zeros(batch, n_heads, head_dim, B.shape[-1] // 2, dtype=cdtype, device=x.device)
    if initial_state is not None:
        S = S + initial_state.to(cdtype)
    ys = []
    for t in range(length):
        a = torch.polar(log_a[:, t].to(dtype).exp()[:, :, None].expand_as(th[:, t]), th[:, t])  # (b, H, N/2)
        if seq_idx is not None and t > 0:
            a = a * (seq_idx[:, t] == seq_idx[:, t - 1]).to(dtype)[:, None, None]
        S = a[:, :, None, :] * S + x[:, t].to(dtype)[..., None] * Bc[:, t, :, None, :].conj()
        ys.append((S * Cc[:, t, :, None, :]).sum(-1).real)
    y = torch.stack(ys, dim=1) if ys else x.new_zeros(x.shape, dtype=dtype)
    return y, S


def gateloop_matrix_complex(B, C, log_a, theta, D=None, seq_idx=None, n_heads=None):
    """T[b, h, t, s] = prod_{k=s+1..t} |a_k| * Re(sum_j C_tj conj(B_sj) e^{i (Phi_tj - Phi_sj)}) (causal, within one
    document), plus D_h on the diagonal: ``T @ x`` is the recurrence's output with the D skip. O(L^2 N)."""
    n_heads = n_heads or log_a.shape[-1]
    dtype = torch.float64
    Bc = as_complex(expand_groups(B, n_heads).to(dtype))  # (b, L, H, N/2)
    Cc = as_complex(expand_groups(C, n_heads).to(dtype))
    phi = expand_groups(theta.to(dtype), n_heads).cumsum(dim=1)  # only differences matter: no restarts needed
    cl = log_a.to(dtype).cumsum(dim=1)                           # (b, L, H)
    mask = same_document(seq_idx, log_a.shape[1], log_a.device)[:, None]  # (b, 1, L, L)
    rel = torch.polar(torch.ones_like(phi[:, :, None] - phi[:, None]), phi[:, :, None] - phi[:, None])  # (b,t,s,H,N/2)
    pair = (Cc[:, :, None] * Bc[:, None].conj() * rel).sum(-1).real.permute(0, 3, 1, 2)  # (b, H, t, s)
    diff = (cl[:, :, None] - cl[:, None]).permute(0, 3, 1, 2)
    T = torch.where(mask, pair * torch.exp(torch.where(mask, diff, 0.0)), 0.0)
    if D is not None:
        T = T + torch.diag_embed(D.to(dtype)[None, :, None].expand(T.shape[0], -1, T.shape[-1]))
    return T
