"""Chunked parallel scan of the Discrete Mamba-2 recurrence in plain PyTorch (training and prefill).

Inside a chunk of Q tokens the output is a small masked attention-like product; between chunks a
(H, P, N) state is carried, so cost is O(L Q) and memory O(L Q) instead of the matrix form's O(L^2).
Differentiable through autograd; any length (the tail is padded *after* the convolution with tokens
that neither write nor decay the state, so the final state is exact). Runs on any device; the Triton
kernels in ``llamba.ops.ssd.triton`` compute the same function faster on CUDA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llamba.ops.ssd.naive import expand_groups, state_dtype


def _pad_tail(t: torch.Tensor, pad: int, dim: int = 1) -> torch.Tensor:
    if pad == 0:
        return t
    widths = [0, 0] * (t.dim() - dim - 1) + [0, pad]
    return F.pad(t, widths)


def ssd_chunk(
    x: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    log_a: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    chunk_size: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (y, final_state): y like x, final_state (batch, H, P, N) in the state dtype."""
    batch, length, n_heads, head_dim = x.shape
    d_state = B.shape[-1]
    dtype = state_dtype(x.dtype)
    Q = chunk_size
    pad = (-length) % Q
    n_chunks = (length + pad) // Q

    def chunked(t):  # (b, L, ...) -> (b, c, Q, ...)
        t = _pad_tail(t, pad)
        return t.reshape(batch, n_chunks, Q, *t.shape[2:])

    xc = chunked(x.to(dtype))
    Bc = chunked(expand_groups(B, n_heads).to(dtype))
    Cc = chunked(expand_groups(C, n_heads).to(dtype))
    # Padded tail tokens get log_a = 0: they do not decay the state, and x = B = 0 means they add nothing.
    la = chunked(log_a.to(dtype)).permute(0, 3, 1, 2)  # (b, h, c, Q)
    cs = la.cumsum(dim=-1)

    causal = torch.ones(Q, Q, dtype=torch.bool, device=x.device).tril()
    if seq_idx is None:
        intra_mask = causal[None, None, None]                     # (1, 1, 1, Q, Q)
        to_end = torch.ones(1, 1, 1, Q, dtype=torch.bool, device=x.device)
        from_start = to_end
        carry = torch.ones(1, 1, n_chunks, dtype=torch.bool, device=x.device)
    else:
        # Tail padding continues the last document, so it never looks like a boundary.
        seq = torch.cat([seq_idx, seq_idx[:, -1:].expand(batch, pad)], dim=1).reshape(batch, n_chunks, Q)
        # The document each chunk inherits its incoming state from: that of the previous chunk's last token
        # (for the first chunk, the initial state belongs to the first token's document).
        prev_last = torch.cat([seq[:, :1, 0], seq[:, :-1, -1]], dim=1)  # (b, c)
        intra_mask = (causal & (seq[..., :, None] == seq[..., None, :]))[:, None]   # (b, 1, c, Q, Q)
        to_end = (seq == seq[..., -1:])[:, None]                                    # (b, 1, c, Q)
        from_start = (seq == prev_last[..., None])[:, None]                         # (b, 1, c, Q)
        carry = (seq[..., -1] == prev_last)[:, None]                                # (b, 1, c)

    zero = torch.zeros((), dtype=dtype, device=x.device)
    # Intra-chunk: y_i = sum_{j <= i} (C_i . B_j) exp(cs_i - cs_j) x_j
    seg = cs[..., :, None] - cs[..., None, :]
    decay = torch.exp(torch.where(intra_mask, seg, float("-inf")))
    scores = torch.einsum("bcihn,bcjhn->bhcij", Cc, Bc) * decay
    y = torch.einsum("bhcij,bcjhp->bcihp", scores, xc)

    # What each chunk adds to the state by its end, and how much the incoming state decays across it.
    w_end = torch.where(to_end, torch.exp(cs[..., -1:] - cs), zero)                 # (b, h, c, Q)
    chunk_states = torch.einsum("bhcj,bcjhp,bcjhn->bchpn", w_end, xc, Bc)
    chunk_decay = torch.where(carry, torch.exp(cs[..., -1]), zero)                  # (b, h, c)

    state = x.new_zeros(batch, n_heads, head_dim, d_state, dtype=dtype)
    if initial_state is not None:
        state = state + initial_state.to(dtype)
    incoming = []
    for c in range(n_chunks):
        incoming.append(state)
        state = chunk_decay[:, :, c, None, None] * state + chunk_states[:, c]
    incoming = torch.stack(incoming, dim=1)                                          # (b, c, h, p, n)

    # Inter-chunk: y_i += exp(cs_i) S_in C_i, for tokens still in the incoming state's document.
    w_start = torch.where(from_start, torch.exp(cs), zero)                           # (b, h, c, Q)
    y = y + torch.einsum("bchpn,bcihn,bhci->bcihp", incoming, Cc, w_start)

    y = y.reshape(batch, n_chunks * Q, n_heads, head_dim)[:, :length]
    return y.to(x.dtype), state
