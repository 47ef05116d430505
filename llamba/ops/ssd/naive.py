"""Reference forms of the Discrete Mamba-2 recurrence: the materialized mixing matrix and a token loop.

Shapes used throughout ``llamba.ops.ssd``:
    x       (batch, length, H, P)   values, one row per value head
    B, C    (batch, length, G, N)   keys and queries; value head h reads group h // (H // G)
    log_a   (batch, length, H)      log-decay, <= 0 (``-softplus(A_log)``)
    state   (batch, H, P, N)        S_t = a_t S_{t-1} + x_t B_t^T,   y_t = S_t C_t
    seq_idx (batch, length) int     document index of each token; the state resets where it changes

These are the slow, obviously-correct twins that every fast path is tested against.
"""

from __future__ import annotations

import torch


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """Recurrent state and decays are kept in at least float32; a float64 model stays float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def expand_groups(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(..., G, N) -> (..., H, N): each of the G query/key groups serves H // G consecutive value heads."""
    groups = t.shape[-2]
    if n_heads % groups:
        raise ValueError(f"value heads ({n_heads}) must be a multiple of query/key groups ({groups})")
    return t if groups == n_heads else t.repeat_interleave(n_heads // groups, dim=-2)


def same_document(seq_idx: torch.Tensor | None, length: int, device) -> torch.Tensor:
    """(batch or 1, L, L) bool: token l may read token s (s <= l and both in one document)."""
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    if seq_idx is None:
        return causal[None]
    return causal[None] & (seq_idx[:, :, None] == seq_idx[:, None, :])


def segment_sum(log_a: torch.Tensor) -> torch.Tensor:
    """(..., L) -> (..., L, L) with [l, s] = sum_{k=s+1..l} log_a_k for s <= l, -inf above the diagonal.

    Summed per pair rather than as a difference of cumulative sums, so long sequences lose no precision.
    """
    length = log_a.shape[-1]
    lower_strict = torch.ones(length, length, dtype=torch.bool, device=log_a.device).tril(-1)
    terms = log_a[..., :, None].expand(*log_a.shape, length).masked_fill(~lower_strict, 0)
    sums = terms.cumsum(dim=-2)  # [l, s] = sum over k in (s, l]
    causal = torch.ones(length, length, dtype=torch.bool, device=log_a.device).tril()
    return sums.masked_fill(~causal, float("-inf"))


def mixing_matrix(
    B: torch.Tensor,
    C: torch.Tensor,
    log_a: torch.Tensor,
    D: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    n_heads: int | None = None,
) -> torch.Tensor:
    """The mixer as one matrix: T[b, h, l, s] = (C_l . B_s) prod_{k=s+1..l} a_k, plus D_h on the diagonal.

    ``y = T @ x`` per head equals the mixer's scan output including the D skip. Returns (batch, H, L, L)
    in the state dtype. This is what MOHAWK stage 1 aligns with the teacher's attention matrices.
    """
    n_heads = n_heads or log_a.shape[-1]
    dtype = state_dtype(B.dtype)
    Bh = expand_groups(B, n_heads).to(dtype)
    Ch = expand_groups(C, n_heads).to(dtype)
    scores = torch.einsum("blhn,bshn->bhls", Ch, Bh)
    decay = torch.exp(segment_sum(log_a.to(dtype).transpose(1, 2)))  # (b, h, L, L)
    mask = same_document(seq_idx, log_a.shape[1], log_a.device)[:, None]
    T = torch.where(mask, scores * decay, torch.zeros((), dtype=dtype, device=B.device))
    if D is not None:
        T = T + torch.diag_embed(D.to(dtype)[None, :, None].expand(T.shape[0], -1, T.shape[-1]))
    return T


def ssd_matrix(x, B, C, log_a, seq_idx=None):
    """Scan output (no D) through the materialized matrix. O(L^2): for tests and short sequences only."""
    T = mixing_matrix(B, C, log_a, seq_idx=seq_idx, n_heads=x.shape[2])
    y = torch.einsum("bhls,bshp->blhp", T, x.to(T.dtype))
    return y.to(x.dtype)


def ssd_loop(x, B, C, log_a, initial_state=None, seq_idx=None):
    """Token-by-token recurrence. Returns (y, final_state); the plainest statement of what the mixer computes."""
    batch, length, n_heads, head_dim = x.shape
    dtype = state_dtype(x.dtype)
    Bh, Ch = expand_groups(B, n_heads).to(dtype), expand_groups(C, n_heads).to(dtype)
    state = x.new_zeros(batch, n_heads, head_dim, B.shape[-1], dtype=dtype)
    if initial_state is not None:
        state = state + initial_state.to(dtype)
    ys = []
    for t in range(length):
        a = log_a[:, t].to(dtype).exp()  # (b, h)
        if seq_idx is not None and t > 0:
            a = a * (seq_idx[:, t] == seq_idx[:, t - 1]).to(dtype)[:, None]
        state = a[:, :, None, None] * state + torch.einsum("bhp,bhn->bhpn", x[:, t].to(dtype), Bh[:, t])
        ys.append(torch.einsum("bhpn,bhn->bhp", state, Ch[:, t]))
    y = torch.stack(ys, dim=1) if ys else x.new_zeros(x.shape, dtype=dtype)
    return y.to(x.dtype), state
