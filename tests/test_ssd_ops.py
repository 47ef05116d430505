"""The three forms of the recurrence (matrix, chunked scan, recurrent step) compute one function."""

import pytest
import torch
import torch.nn.functional as F

from llamba.ops.conv import causal_conv, conv_step
from llamba.ops.ssd import mixing_matrix, ssd_chunk, ssd_loop, ssd_matrix, ssd_step

TOL = {torch.float64: 1e-10, torch.float32: 2e-4, torch.bfloat16: 3e-2}


def random_inputs(batch=2, length=64, heads=4, groups=2, head_dim=64, d_state=16, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, heads, head_dim, generator=g, dtype=torch.float64)
    B = torch.randn(batch, length, groups, d_state, generator=g, dtype=torch.float64) / d_state ** 0.5
    C = torch.randn(batch, length, groups, d_state, generator=g, dtype=torch.float64) / d_state ** 0.5
    # Decays from ~0.3 to ~0.999, as a trained mixer has both fast and slow heads.
    log_a = -F.softplus(torch.randn(batch, length, heads, generator=g, dtype=torch.float64) * 2 - 3)
    state = torch.randn(batch, heads, head_dim, d_state, generator=g, dtype=torch.float64)
    return x.to(dtype), B.to(dtype), C.to(dtype), log_a.float() if dtype != torch.float64 else log_a, state


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def step_through(x, B, C, log_a, state):
    state = state.clone()
    ys = [ssd_step(state, x[:, t], B[:, t], C[:, t], log_a[:, t]) for t in range(x.shape[1])]
    return torch.stack(ys, 1), state


@pytest.mark.parametrize("length", [1, 7, 128, 129, 1000])
@pytest.mark.parametrize("head_dim,groups", [(64, 2), (96, 4), (64, 1)])
def test_three_paths_agree_float64(length, head_dim, groups):
    x, B, C, log_a, state = random_inputs(length=length, head_dim=head_dim, groups=groups)
    y_loop, s_loop = ssd_loop(x, B, C, log_a, initial_state=state)
    y_chunk, s_chunk = ssd_chunk(x, B, C, log_a, initial_state=state, chunk_size=64)
    y_step, s_step = step_through(x, B, C, log_a, state)
    assert rel_err(y_chunk, y_loop) < 1e-10 and rel_err(s_chunk, s_loop) < 1e-10
    assert rel_err(y_step, y_loop) < 1e-10 and rel_err(s_step, s_loop) < 1e-10
    if length <= 129:  # the matrix is O(L^2); it has no initial state, so compare from zero
        y0, _ = ssd_loop(x, B, C, log_a)
        assert rel_err(ssd_matrix(x, B, C, log_a), y0) < 1e-10


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunk_low_precision(dtype):
    x, B, C, log_a, state = random_inputs(length=300, dtype=dtype)
    y_ref, s_ref = ssd_loop(*(t.double() for t in (x, B, C, log_a)), initial_state=state)
    y, s = ssd_chunk(x, B, C, log_a, initial_state=state.float(), chunk_size=128)
    assert y.dtype == dtype and s.dtype == torch.float32  # the state stays float32 whatever the inputs
    assert rel_err(y, y_ref) < TOL[dtype] and rel_err(s, s_ref) < TOL[dtype]


def test_state_stays_float32_in_step():
    x, B, C, log_a, state = random_inputs(length=3, dtype=torch.bfloat16)
    state = state.float()
    ssd_step(state, x[:, 0], B[:, 0], C[:, 0], log_a[:, 0])
    assert state.dtype == torch.float32


def test_prefill_in_pieces_equals_one_prefill():
    x, B, C, log_a, state = random_inputs(length=200)
    y_full, s_full = ssd_chunk(x, B, C, log_a, initial_state=state, chunk_size=32)
    s, ys = state, []
    for lo, hi in [(0, 13), (13, 77), (77, 78), (78, 200)]:
        y, s = ssd_chunk(x[:, lo:hi], B[:, lo:hi], C[:, lo:hi], log_a[:, lo:hi], initial_state=s, chunk_size=32)
        ys.append(y)
    assert rel_err(torch.cat(ys, 1), y_full) < 1e-12 and rel_err(s, s_full) < 1e-12


def test_document_boundaries_reset_the_state():
    x, B, C, log_a, _ = random_inputs(batch=1, length=150)
    cut = 61
    seq_idx = torch.zeros(1, 150, dtype=torch.long)
    seq_idx[:, cut:] = 1
    for fn in (lambda *a: ssd_loop(*a, seq_idx=seq_idx)[0], lambda *a: ssd_chunk(*a, seq_idx=seq_idx, chunk_size=32)[0],
               lambda *a: ssd_matrix(*a, seq_idx=seq_idx)):
        y = fn(x, B, C, log_a)
        first, _ = ssd_loop(x[:, :cut], B[:, :cut], C[:, :cut], log_a[:, :cut])
        second, _ = ssd_loop(x[:, cut:], B[:, cut:], C[:, cut:], log_a[:, cut:])
        assert rel_err(y, torch.cat([first, second], 1)) < 1e-10


def test_chunk_gradients_match_loop():
    x, B, C, log_a, state = random_inputs(batch=1, length=45, heads=2, groups=1, head_dim=8, d_state=4)
    inputs = [t.clone().requires_grad_() for t in (x, B, C, log_a, state)]
    seq_idx = (torch.arange(45) >= 20).long()[None]
    y, s = ssd_chunk(*inputs[:4], initial_state=inputs[4], seq_idx=seq_idx, chunk_size=16)
    grads = torch.autograd.grad((y.sin().sum() + s.cos().sum()), inputs)
    inputs2 = [t.detach().clone().requires_grad_() for t in inputs]
    y2, s2 = ssd_loop(*inputs2[:4], initial_state=inputs2[4], seq_idx=seq_idx)
    grads2 = torch.autograd.grad((y2.sin().sum() + s2.cos().sum()), inputs2)
    for g1, g2 in zip(grads, grads2):
        assert rel_err(g1, g2) < 1e-10


def test_mixing_matrix_diagonal_is_D_plus_scores():
    x, B, C, log_a, _ = random_inputs(batch=1, length=9, heads=4, groups=2)
    D = torch.randn(4, dtype=torch.float64)
    T = mixing_matrix(B, C, log_a, D=D)
    y = torch.einsum("bhls,bshp->blhp", T, x)
    assert rel_err(y, ssd_matrix(x, B, C, log_a) + D[:, None] * x) < 1e-12
    assert torch.all(T.triu(1) == 0)  # causal


def test_causal_conv_paths_agree():
    g = torch.Generator().manual_seed(1)
    u = torch.randn(2, 30, 12, generator=g, dtype=torch.float64)
    w = torch.randn(12, 1, 4, generator=g, dtype=torch.float64)
    b = torch.randn(12, generator=g, dtype=torch.float64)
    # Reference: a zero-padded causal convolution written out tap by tap.
    padded = F.pad(u.transpose(1, 2), (3, 0))
    ref = sum(w[:, 0, k][None, :, None] * padded[:, :, k:k + 30] for k in range(4)) + b[None, :, None]
    out, state = causal_conv(u, w, b)
    assert rel_err(out, ref.transpose(1, 2)) < 1e-14
    # In pieces, and token by token from the state.
    out1, st = causal_conv(u[:, :17], w, b)
    out2, st2 = causal_conv(u[:, 17:29], w, b, conv_state=st)
    assert torch.equal(st2, u[:, 26:29].transpose(1, 2))  # the last 3 raw inputs
    step = conv_step(u[:, 29], w, b, st2)
    assert rel_err(torch.cat([out1, out2, step[:, None]], 1), out) < 1e-14
    assert torch.equal(st2, u[:, 27:30].transpose(1, 2))  # shifted in place
    # seq_idx: a new document starts from zero history.
    seq_idx = (torch.arange(30) >= 11).long()[None].expand(2, -1)
    out_s, _ = causal_conv(u, w, b, seq_idx=seq_idx)
    tail, _ = causal_conv(u[:, 11:], w, b)
    assert rel_err(out_s[:, 11:], tail) < 1e-14 and rel_err(out_s[:, :11], out[:, :11]) < 1e-14
