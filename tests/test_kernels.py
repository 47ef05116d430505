"""GPU kernels against the float64 reference paths: the chunked scan (both forward routes, the Triton and CUDA
backwards), its pieces for launches too large for one grid, the causal conv and the fused decode step; and every
kernel compiled for Hopper, with no GPU.

The kernel tests (marker ``triton``) run natively on CUDA; without CUDA, test_kernels_interpreted.py runs them
again in a subprocess under Triton's CPU interpreter (``TRITON_INTERPRET=1``), float32 only. The sampler, the
generation engine and the benchmark's static-KV Llama have their own files: test_sampling.py,
test_generation_engine.py, test_static_llama.py."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from llamba.ops.step import mixer_step_torch
from llamba.ops.ssd import ssd_loop

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
DEV = "cuda" if torch.cuda.is_available() else "cpu"
triton_kernel = pytest.mark.skipif(not (torch.cuda.is_available() or INTERPRETING),
                                   reason="needs CUDA (test_kernels_interpreted.py runs it on CPU)")
# bf16 arithmetic is emulated unreliably by the interpreter: those cases need the real hardware
KERNEL_DTYPES = [torch.float32] + ([] if INTERPRETING else [torch.bfloat16])
pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


# -- GPU kernels ----------------------------------------------------------------------------------------------
SCAN_CASES = [  # batch, length, H, G, P, N, with seq_idx, with initial state, final state in the loss
    (2, 200, 4, 2, 64, 64, True, True, True),
    (1, 130, 2, 1, 96, 64, False, True, False),
    (2, 64, 2, 2, 128, 128, True, False, True),
    (1, 1, 3, 3, 64, 64, False, False, True),
    (1, 333, 6, 3, 64, 128, False, True, True),
    (2, 150, 2, 2, 64, 64, True, False, False),
]


@triton_kernel
@pytest.mark.triton
@pytest.mark.parametrize("case", SCAN_CASES)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("forward", ["two-kernel", "fused"])
def test_triton_scan_matches_float64_loop(case, dtype, forward):
    """forward: the one-pass forward and backward ("fused"), or the two-kernel ones (a sequential carry of the
    state, or of its gradient, then per-chunk programs)."""
    from llamba.ops.ssd import triton_chunk
    from llamba.ops.ssd.triton_chunk import ssd_chunk_triton

    route = triton_chunk.Dispatch(forward="fused" if forward == "fused" else "two_kernel")
    torch.manual_seed(0)  # one fixed draw: unseeded, a rare draw put float32 log_a's gradient at 2.03e-4 of 2e-4
    b, L, H, G, P, N, with_seq, with_init, final_in_loss = case
    dev = DEV
    x = torch.randn(b, L, H, P, device=dev).to(dtype)
    B = (torch.randn(b, L, G, N, device=dev) / N ** 0.5).to(dtype)
    C = (torch.randn(b, L, G, N, device=dev) / N ** 0.5).to(dtype)
    la = -F.softplus(torch.randn(b, L, H, device=dev))
    s0 = torch.randn(b, H, P, N, device=dev) if with_init else None
    seq = torch.cumsum((torch.rand(b, L, device=dev) < 0.02).long(), 1) if with_seq else None
    ref_in = [t.double().requires_grad_() for t in (x, B, C, la)] + ([s0.double().requires_grad_()] if with_init else [])
    y_ref, s_ref = ssd_loop(*ref_in[:4], initial_state=ref_in[4] if with_init else None, seq_idx=seq)
    dy, ds = torch.randn_like(y_ref), torch.randn_like(s_ref) * final_in_loss  # without it, its gradient is None
    ((y_ref * dy).sum() + (s_ref * ds).sum()).backward()

    ins = [t.clone().requires_grad_() for t in (x, B, C, la)] + ([s0.clone().requires_grad_()] if with_init else [])
    y, s = ssd_chunk_triton(*ins[:4], initial_state=ins[4] if with_init else None, seq_idx=seq, dispatch=route)
    assert y.dtype == dtype and s.dtype == torch.float32 and y.shape == x.shape
    ((y.float() * dy.float()).sum() + ((s * ds.float()).sum() if final_in_loss else 0)).backward()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert rel(y, y_ref) < tol
    assert rel(s, s_ref) < tol
    for name, got, want in zip("x B C log_a init".split(), ins, ref_in):
        assert torch.isfinite(got.grad).all(), name
        assert rel(got.grad, want.grad) < tol * (2 if name == "log_a" else 1), name
    with torch.no_grad():  # inference keeps no per-chunk snapshots; the result is the same
        y_inf, s_inf = ssd_chunk_triton(x, B, C, la, initial_state=s0, seq_idx=seq, dispatch=route)
    assert torch.equal(y_inf, y.detach()) and torch.equal(s_inf, s.detach())


CUDA_BACKWARD_CASES = [  # batch, length, H, P, N, with seq_idx, with initial state, final state in the loss
    (2, 200, 3, 128, 128, True, True, True),
    (1, 333, 2, 128, 128, False, False, False),
    (2, 130, 3, 128, 64, True, False, True),
    (2, 64, 2, 64, 64, False, True, False),
    (1, 1, 2, 128, 128, False, True, True),
]


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("case", CUDA_BACKWARD_CASES)
def test_cuda_scan_backward_matches_float64_and_triton(case, monkeypatch):
    """The one-pass CUDA backward (cuda_backward.cu) against the float64 token loop and against the Triton backward
    it replaces, on the same bf16 inputs and forward: all gradients, ragged lengths, document resets, an initial
    state and a final-state gradient."""
    from llamba.ops.ssd import cuda_backward, triton_chunk
    from llamba.ops.ssd.triton_chunk import ssd_chunk_triton

    b, L, H, P, N, with_seq, with_init, final_in_loss = case
    x = torch.randn(b, L, H, P, device="cuda").bfloat16()
    B = (torch.randn(b, L, H, N, device="cuda") / N ** 0.5).bfloat16()
    C = (torch.randn(b, L, H, N, device="cuda") / N ** 0.5).bfloat16()
    la = -F.softplus(torch.randn(b, L, H, device="cuda"))
    s0 = torch.randn(b, H, P, N, device="cuda") if with_init else None
    seq = torch.cumsum((torch.rand(b, L, device="cuda") < 0.02).long(), 1) if with_seq else None

    ref_in = [t.double().requires_grad_() for t in (x, B, C, la)] + ([s0.double().requires_grad_()] if with_init else [])
    y_ref, s_ref = ssd_loop(*ref_in[:4], initial_state=ref_in[4] if with_init else None, seq_idx=seq)
    dy, ds = torch.randn_like(y_ref), torch.randn_like(s_ref) * final_in_loss
    ((y_ref * dy).sum() + (s_ref * ds).sum()).backward()

    calls = []
    monkeypatch.setattr(cuda_backward, "backward", lambda *a, _f=cuda_backward.backward: calls.append(1) or _f(*a))
    grads = {}
    for route in ("triton", "cuda"):
        forced = triton_chunk.Dispatch(forward="fused", cuda_backward="always" if route == "cuda" else "never")
        ins = [t.clone().requires_grad_() for t in (x, B, C, la)] + ([s0.clone().requires_grad_()] if with_init else [])
        y, s = ssd_chunk_triton(*ins[:4], initial_state=ins[4] if with_init else None, seq_idx=seq, dispatch=forced)
        ((y.float() * dy.float()).sum() + ((s * ds.float()).sum() if final_in_loss else 0)).backward()
        grads[route] = [t.grad for t in ins]
    assert len(calls) == 1, "the CUDA backward did not run"
    for name, got, triton_grad, want in zip("x B C log_a init".split(), grads["cuda"], grads["triton"], ref_in):
        assert got.dtype == triton_grad.dtype and got.shape == triton_grad.shape, name
        assert torch.isfinite(got).all(), name
        assert rel(got, want.grad) < 3e-2 * (2 if name == "log_a" else 1), name
        assert rel(got, triton_grad) < 1e-2, name  # the same products with the same roundings, summed in other orders


def test_cuda_backward_takes_only_layouts_its_copies_can_take():
    """The CUDA backward's layout check (any device: only strides and addresses are read). Its copies move 16-byte
    pieces or whole rows, its strides are 32-bit arguments and so are its offsets within a chunk; any other layout
    keeps the Triton route instead of faulting or wrapping around."""
    from llamba.ops.ssd.cuda_backward import _fits

    x = torch.zeros(2, 64, 4, 128, dtype=torch.bfloat16)
    assert _fits(x, 1)
    assert not _fits(x[..., 1:], 1)  # rows start 2 bytes past a 16-byte boundary
    assert not _fits(torch.zeros(2, 64, 4, 130, dtype=torch.bfloat16)[..., :128], 1)  # rows 260 bytes apart
    assert not _fits(x.transpose(-1, -2), 1)  # columns not contiguous

    def strided(*strides):  # a layout too large to allocate: only its strides matter here
        return torch.empty(0, device="meta", dtype=torch.bfloat16).as_strided((1, 64, 4, 128), strides)

    assert _fits(strided(2 ** 30, 2 ** 16, 128, 1), 1)
    assert not _fits(strided(2 ** 31, 2 ** 16, 128, 1), 1)  # a batch stride past int32
    assert not _fits(strided(0, 2 ** 24, 128, 1), 1)  # 128 rows of it past int32


@triton_kernel
@pytest.mark.triton
@pytest.mark.parametrize("length", [1, 64, 130])
def test_triton_chunk_cumsum_matches_torch(length):
    """The per-chunk sums of the log-decay the two-kernel route reads: a float64 cumsum over each chunk, the
    padded tail holding the last chunk's total; from a log-decay sliced out of a wider tensor."""
    from llamba.ops.ssd.triton_chunk import BT, _chunk_cumsum

    b, H = 2, 9
    log_a = -F.softplus(torch.randn(b, length, H + 3, device=DEV))[..., :H]
    n_chunks = -(-length // BT)
    padded = F.pad(log_a.double(), (0, 0, 0, n_chunks * BT - length))
    want = padded.view(b, n_chunks, BT, H).cumsum(2).view(b, n_chunks * BT, H)
    got = _chunk_cumsum(log_a, n_chunks)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert (got.double() - want).abs().max().item() < 1e-5 * BT


@triton_kernel
@pytest.mark.triton
@pytest.mark.parametrize("forward", ["two-kernel", "fused"])
def test_triton_scan_reads_strided_inputs(forward):
    """Inputs sliced out of wider tensors (as the mixer slices them from in_proj's output) give exactly what their
    contiguous copies give, gradients included: every stride reaches the kernels, and what they write back is laid
    out as the gradient of the input it belongs to."""
    from llamba.ops.ssd import triton_chunk
    from llamba.ops.ssd.triton_chunk import ssd_chunk_triton

    route = triton_chunk.Dispatch(forward="fused" if forward == "fused" else "two_kernel")
    b, L, H, P, N = 2, 100, 3, 64, 64
    wide = torch.randn(b, L, H * P + 2 * H * N + H + 5, device=DEV)  # x | B | C | log-decays | unused
    wide[..., H * P:-H - 5] /= N ** 0.5
    wide[..., -H - 5:] = -F.softplus(wide[..., -H - 5:])
    ends = [0, H * P, H * P + H * N, H * P + 2 * H * N, wide.shape[-1] - 5]
    inputs = [wide[..., s:e] for s, e in zip(ends, ends[1:])]
    inputs[:3] = [t.unflatten(-1, (H, -1)) for t in inputs[:3]]
    strided = [t.detach().requires_grad_() for t in inputs]
    packed = [t.detach().contiguous().requires_grad_() for t in inputs]
    assert not any(t.is_contiguous() for t in strided)
    dy = torch.randn(b, L, H, P, device=DEV)
    results = []
    for x_, B_, C_, a_ in (strided, packed):
        y, s = ssd_chunk_triton(x_, B_, C_, a_, dispatch=route)
        (y * dy).sum().backward()
        results.append([y, s] + [t.grad for t in (x_, B_, C_, a_)])
    for name, got, want in zip("y final dx dB dC dA".split(), *results):
        assert torch.equal(got, want), name


@triton_kernel
@pytest.mark.triton
@pytest.mark.parametrize("forward", ["two-kernel", "fused"])
@pytest.mark.parametrize("with_z_bias", [True, False])
def test_triton_scan_fused_skip_and_gate_matches_float64(forward, with_z_bias):
    """Inference: the output kernels apply the mixer's D skip and silu gate; training keeps them in PyTorch."""
    from llamba.ops.ssd import skip_and_gate, ssd_chunk, ssd_scan, triton_chunk

    route = triton_chunk.Dispatch(forward="fused" if forward == "fused" else "two_kernel")
    b, L, H, G, P, N = 2, 150, 4, 2, 64, 64
    x, z = torch.randn(b, L, H, P, device=DEV), torch.randn(b, L, H * P, device=DEV)
    B, C = (torch.randn(b, L, G, N, device=DEV) / N ** 0.5 for _ in range(2))
    la = -F.softplus(torch.randn(b, L, H, device=DEV))
    D, z_bias = torch.randn(H, device=DEV), (torch.randn(H * P, device=DEV) if with_z_bias else None)
    y64, _ = ssd_chunk(*(t.double() for t in (x, B, C, la)))
    want = skip_and_gate(y64, x.double(), D.double(), z.double(), z_bias.double() if with_z_bias else None)
    with torch.no_grad():
        got, _ = ssd_scan(x, B, C, la, backend="triton", gate=(D, z, z_bias), dispatch=route)
    assert rel(got, want) < 1e-4
    D.requires_grad_()  # a gradient is needed: the scan runs under autograd and the gate in PyTorch
    trained, _ = ssd_scan(x, B, C, la, backend="triton", gate=(D, z, z_bias), dispatch=route)
    trained.sum().backward()
    assert rel(trained, want) < 1e-4 and D.grad is not None
    with pytest.raises(ValueError, match="no backward"):
        triton_chunk.ssd_chunk_triton(x, B, C, la, gate=(D, z, z_bias), dispatch=route)


def _decode_step_inputs(shape, dtype):
    """Random inputs of one decode step (b, H, G, P, N): xBC, z, A_log, conv and SSM states, conv weight and bias,
    D and z_bias, in ``dtype`` (the SSM state float32)."""
    b, H, G, P, N = shape
    d_inner, dev = H * P, DEV
    conv_dim = d_inner + 2 * G * N
    return (torch.randn(b, conv_dim, device=dev).to(dtype), torch.randn(b, d_inner, device=dev).to(dtype),
            torch.randn(b, H, device=dev).to(dtype), torch.randn(b, conv_dim, 3, device=dev).to(dtype),
            torch.randn(b, H, P, N, device=dev), torch.randn(conv_dim, 1, 4, device=dev).to(dtype),
            torch.randn(conv_dim, device=dev).to(dtype), torch.randn(H, device=dev).to(dtype),
            torch.randn(d_inner, device=dev).to(dtype))


@triton_kernel
@pytest.mark.triton
@pytest.mark.parametrize("shape", [(3, 4, 2, 64, 64), (2, 6, 3, 96, 64), (5, 2, 2, 128, 128), (4, 9, 9, 64, 64),
                                   (2, 9, 3, 64, 64)])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_triton_decode_step_matches_float64(shape, dtype):
    from llamba.ops.step.triton_kernel import mixer_step_triton

    b, H, G, P, N = shape
    dev = DEV
    xBC, z, A_log, conv_state, ssm_state, w, bias, D, z_bias = _decode_step_inputs(shape, dtype)
    # A_log also as in_proj's last rows, computed in the kernel from the normed input u
    u = torch.randn(b, 40, device=dev).to(dtype)
    a_weight, a_bias = (torch.randn(H, 40, device=dev) / 40 ** 0.5).to(dtype), torch.randn(H, device=dev).to(dtype)
    double = lambda t: None if t is None else t.double()  # noqa: E731
    for zb, a in ((z_bias, A_log), (None, A_log), (z_bias, (u, a_weight, a_bias)), (None, (u, a_weight, None))):
        cs_ref, ss_ref = conv_state.double(), ssm_state.double()
        a_ref = tuple(map(double, a)) if isinstance(a, tuple) else a.double()
        ref = mixer_step_torch(xBC.double(), z.double(), a_ref, cs_ref, ss_ref, w.double(), bias.double(),
                               D.double(), double(zb), G)
        cs, ss = conv_state.clone(), ssm_state.clone()
        out = mixer_step_triton(xBC, z, a, cs, ss, w, bias, D, zb, G)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert rel(out, ref) < tol and rel(ss, ss_ref) < tol and rel(cs, cs_ref) == 0


@triton_kernel
@pytest.mark.triton
@pytest.mark.parametrize("shape", [(3, 4, 2, 64, 64), (2, 6, 3, 96, 64), (2, 9, 3, 64, 128), (2, 2, 2, 32, 16),
                                   (67, 2, 2, 32, 16)])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("theta_from_u", [False, True], ids=["theta", "theta-from-u"])
def test_triton_gateloop_decode_step_matches_float64(shape, dtype, theta_from_u):
    """The fused step of a GateLoop mixer: the phase advanced and wrapped in place, B and C rotated by it after the
    conv (as halves) and read back whole; against the PyTorch step in float64 (phases past pi wrap). theta given,
    or computed in the kernel from the normed input and phase_proj's rows (what the model's step passes): unrolled
    in wide tiles while the grid is smaller than the GPU (132 SMs without one), in a loop of narrow ones once it
    is not (batch 67 x 2 groups)."""
    from llamba.ops.step.triton_kernel import mixer_step_triton

    b, H, G, P, N = shape
    dev = DEV
    xBC, z, A_log, conv_state, ssm_state, w, bias, D, z_bias = _decode_step_inputs(shape, dtype)
    if theta_from_u:  # d_model 200: two of the kernel's K tiles and a ragged end
        u = torch.randn(b, 200, device=dev).to(dtype)
        t_w = (torch.randn(G * N // 2, 200, device=dev) / 8).to(dtype)
        t_b = torch.randn(G * N // 2, device=dev).to(dtype)
        theta, ref_theta = (u, t_w, t_b), (u.double(), t_w.double(), t_b.double())
    else:
        theta = torch.randn(b, G, N // 2, device=dev) * 2
        ref_theta = theta.double()
    phase = (torch.rand(b, G, N // 2, device=dev) * 2 - 1) * 3.14159
    ref_phase, ref_ss, ref_cs = phase.double(), ssm_state.double(), conv_state.double()
    ref = mixer_step_torch(xBC.double(), z.double(), A_log.double(), ref_cs, ref_ss, w.double(), bias.double(),
                           D.double(), z_bias.double(), G, phase=(ref_theta, ref_phase))
    got_phase, ss, cs = phase.clone(), ssm_state.clone(), conv_state.clone()
    out = mixer_step_triton(xBC, z, A_log, cs, ss, w, bias, D, z_bias, G, phase=(theta, got_phase))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert rel(out, ref) < tol and rel(ss, ref_ss) < tol and rel(cs, ref_cs) == 0
    assert (got_phase.double() - ref_phase).abs().max() < 1e-5 and got_phase.abs().max() <= 3.1416
    bad = (theta[0], theta[1][:-1], theta[2]) if theta_from_u else theta[:, :, :-1]
    with pytest.raises(ValueError, match="one angle per group and state pair"):
        mixer_step_triton(xBC, z, A_log, cs, ss, w, bias, D, z_bias, G, phase=(bad, got_phase))


ROTATE_CASES = [  # batch, length, G, N, with seq_idx, with an initial phase
    (2, 100, 2, 16, True, True),
    (1, 1, 1, 8, False, False),
    (2, 70, 3, 128, True, False),  # 64 pairs: two pair tiles
    (1, 33, 1, 8, False, True),  # one token past a tile
    (2, 64, 9, 64, True, True),
]


@triton_kernel
@pytest.mark.triton
@pytest.mark.parametrize("case", ROTATE_CASES)
def test_triton_gateloop_rotation_matches_float64(case):
    """GateLoop's prefill rotation in one kernel: B and C (strided views of one conv output, as in the mixer)
    rotated by the cumulative phase, which restarts at each document and continues the initial phase, and the final
    phase; against ``rotate_by_phase`` in float64. Phases run far past pi, so the wrap is exercised."""
    from llamba.ops.gateloop.phase import rotate_by_phase
    from llamba.ops.gateloop.triton_rotate import rotate_by_phase_triton

    b, L, G, N, with_seq, with_init = case
    g = torch.Generator().manual_seed(L)
    xBC = torch.randn(b, L, 3 * G * N, generator=g)
    B, C = (xBC[..., k * G * N:(k + 1) * G * N].unflatten(-1, (G, N)).to(DEV) for k in (1, 2))
    theta = (2 * torch.randn(b, L, G, N // 2, generator=g)).to(DEV)
    phase = (4 * torch.randn(b, G, N // 2, generator=g)).to(DEV) if with_init else None
    seq_idx = None
    if with_seq:
        seq_idx = torch.zeros(b, L, dtype=torch.int32)
        seq_idx[0, L // 3:] = 1
        seq_idx[0, L // 2:] = 2
        seq_idx[-1, 2 * L // 3:] = 7
        seq_idx = seq_idx.to(DEV)
    want = rotate_by_phase(B.double(), C.double(), theta.double(), None if phase is None else phase.double(), seq_idx)
    got = rotate_by_phase_triton(B, C, theta, phase, seq_idx)
    assert got[0].dtype == B.dtype and got[2].dtype == torch.float32 and got[0].is_contiguous()
    for g_, w in zip(got, want):
        assert (g_.double() - w).abs().max() < 2e-5
    assert got[2].abs().max() <= 3.1416


@triton_kernel
@pytest.mark.triton
def test_gateloop_prefill_takes_the_rotation_kernel_and_training_does_not(monkeypatch):
    """``gateloop_scan`` on the Triton route: without gradients the rotation kernel (the same outputs as the
    PyTorch route); with them the PyTorch rotation, whose autograd training needs."""
    from llamba.ops.gateloop import gateloop_scan, triton_rotate

    g = torch.Generator().manual_seed(0)
    b, L, H, G, P, N = 2, 40, 4, 2, 8, 16
    x, B, C = (torch.randn(b, L, *s, generator=g).to(DEV) for s in ((H, P), (G, N), (G, N)))
    log_a = (-torch.rand(b, L, H, generator=g)).to(DEV)
    theta = torch.randn(b, L, G, N // 2, generator=g).to(DEV)
    calls = []
    monkeypatch.setattr(triton_rotate, "rotate_by_phase_triton",
                        lambda *a, f=triton_rotate.rotate_by_phase_triton: calls.append(1) or f(*a))
    with torch.no_grad():
        y, state, phase = gateloop_scan(x, B, C, log_a, theta, backend="triton")
    assert calls == [1]
    want = gateloop_scan(x, B, C, log_a, theta, backend="torch")
    for g_, w in zip((y, state, phase), want):
        torch.testing.assert_close(g_, w, rtol=1e-4, atol=1e-4)
    theta.requires_grad_(True)
    gateloop_scan(x, B, C, log_a, theta, backend="triton")[0].sum().backward()
    assert calls == [1] and theta.grad is not None


@triton_kernel
@pytest.mark.triton
@pytest.mark.parametrize("elements, grid", [(7000, 65535), (2500, 65535), (2**31, 4)],
                         ids=["rows-apart", "token-spans", "rows-by-grid"])
def test_triton_scan_in_pieces_matches_one_launch(elements, grid, monkeypatch):
    """Past 2**31 elements a launch's int32 offsets wrap, and past 65535 batch x heads its grid is refused, so the
    host runs such a scan in pieces. With the limits lowered (one row per piece; one row in 64-token spans; rows
    two by two, as batch x heads may reach 4), the pieces give what one launch gives: outputs, final state and
    gradients, a document that starts exactly where a span does included, and the fused gate."""
    from llamba.ops import indexing
    from llamba.ops.ssd.triton_chunk import ssd_chunk_triton

    b, L, H, P, N = 3, 200, 2, 16, 16  # one row: 200 x 2 x 16 = 6400 elements of x
    x = torch.randn(b, L, H, P, device=DEV)
    B, C = (torch.randn(b, L, 1, N, device=DEV) / N ** 0.5 for _ in range(2))
    la = -F.softplus(torch.randn(b, L, H, device=DEV))
    s0 = torch.randn(b, H, P, N, device=DEV)
    seq = torch.zeros(b, L, dtype=torch.long, device=DEV)
    seq[0, 128:] = 1  # a span starts at 128 when the limit cuts a row into 64-token spans
    seq[1, 100:] = 1
    dy, ds = torch.randn(b, L, H, P, device=DEV), torch.randn(b, H, P, N, device=DEV)
    gate = (torch.randn(H, device=DEV), torch.randn(b, L, H * P, device=DEV), torch.randn(H * P, device=DEV))
    results = []
    for lowered in (False, True):
        if lowered:
            monkeypatch.setattr(indexing, "INDEX_LIMIT", elements)
            monkeypatch.setattr(indexing, "GRID_LIMIT", grid)
        ins = [t.clone().requires_grad_() for t in (x, B, C, la, s0)]
        y, s = ssd_chunk_triton(*ins[:4], initial_state=ins[4], seq_idx=seq)
        ((y * dy).sum() + (s * ds).sum()).backward()
        with torch.no_grad():
            gated, _ = ssd_chunk_triton(x, B, C, la, initial_state=s0, seq_idx=seq, gate=gate)
        results.append([y, s, gated] + [t.grad for t in ins])
    for name, got, want in zip("y final gated dx dB dC dlog_a dinit".split(), results[1], results[0]):
        assert rel(got, want) < 1e-5, name


def test_decode_step_refuses_a_batch_past_the_int32_limit(monkeypatch):
    """A decode batch whose state reaches 2^31 elements (8 GB per layer) is refused before any launch, with what to
    do instead: unlike a prefill, a step cannot be cut into spans of tokens."""
    from llamba.ops import indexing
    from llamba.ops.step.triton_kernel import mixer_step_triton

    batch, H, P, N = 4, 2, 16, 16
    conv_dim = H * P + 2 * N
    args = (torch.randn(batch, conv_dim), torch.randn(batch, H * P), torch.randn(batch, H),
            torch.randn(batch, conv_dim, 3), torch.randn(batch, H, P, N), torch.randn(conv_dim, 1, 4),
            torch.randn(conv_dim), torch.randn(H), torch.randn(H * P), 1)
    monkeypatch.setattr(indexing, "INDEX_LIMIT", batch * H * P * N - 1)
    with pytest.raises(ValueError, match="decode in smaller batches"):
        mixer_step_triton(*args)


def test_piece_sizes_halve_rows_then_tokens_and_refuse_a_row_too_wide():
    from llamba.ops.indexing import piece_sizes

    def fits(rows, tokens, per_token=10, limit=1000):
        return rows * tokens * per_token <= limit

    assert piece_sizes(4, 20, fits, 8) == (4, 20)  # 800 elements: one piece
    assert piece_sizes(8, 30, fits, 8) == (2, 30)  # rows halve: 8 -> 4 -> 2
    assert piece_sizes(8, 300, fits, 8) == (1, 72)  # one row is too long: 300 -> 144 -> 72 tokens
    with pytest.raises(ValueError, match="one row of 8 tokens"):
        piece_sizes(2, 300, lambda rows, tokens: fits(rows, tokens, per_token=200), 8)


def test_span_of_a_prefix_matches_the_view():
    """span(t, rows, tokens) is the span of t[:rows, :tokens], computed without the view: strided, transposed,
    sliced and empty tensors, rows and tokens past the ends."""
    from llamba.ops.indexing import span

    base = torch.empty(6, 10, 4, 7)
    for t in (base, base[:, :, 1], base.transpose(0, 1), base[1::2, 3:], base[:, :0]):
        for rows, tokens in ((None, None), (1, None), (3, 5), (None, 2), (100, 100), (0, 3)):
            view = t[slice(rows), slice(tokens)]
            assert span(t, rows, tokens) == span(view), (t.shape, t.stride(), rows, tokens)
    assert span(base) == base.numel() and span(base[:, :0]) == 0


@triton_kernel
@pytest.mark.triton
@pytest.mark.parametrize("limit", [10000, 3000])  # rows apart; one row in spans of 32 tokens
def test_triton_causal_conv_in_pieces_matches_one_launch(limit, monkeypatch):
    """The prefill conv past the int32 limit (lowered here): rows apart, then spans of tokens passing the conv
    state on, with left padding and an incoming state: the same output and state as one launch, exactly."""
    from llamba.ops import indexing
    from llamba.ops.conv.triton_kernel import causal_conv_triton

    batch, length, channels = 3, 200, 48  # one row: 9600 elements
    xBC = torch.randn(batch, length, channels, device=DEV)
    weight, bias = torch.randn(channels, 1, 4, device=DEV), torch.randn(channels, device=DEV)
    state = torch.randn(batch, channels, 3, device=DEV)
    mask = torch.ones(batch, length, dtype=torch.long, device=DEV)
    mask[1, :70] = 0
    want = causal_conv_triton(xBC, weight, bias, state, mask, x_channels=16)
    monkeypatch.setattr(indexing, "INDEX_LIMIT", limit)
    got = causal_conv_triton(xBC, weight, bias, state, mask, x_channels=16)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@triton_kernel
@pytest.mark.triton
@pytest.mark.parametrize("length", [1, 2, 5, 70])
@pytest.mark.parametrize("width", [4, 2])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_triton_causal_conv_matches_float64(length, width, dtype):
    """The fused prefill conv against the PyTorch conv on the masked input, with and without a conv state, with and
    without left padding (x channels zeroed there, the state shifted over padded inputs as zeros)."""
    from llamba.ops.conv import causal_conv
    from llamba.ops.conv.triton_kernel import causal_conv_triton

    batch, channels, x_channels = 3, 200, 72  # channels: not a multiple of the kernel's tile
    xBC = torch.randn(batch, length, channels, device=DEV).to(dtype)
    weight = torch.randn(channels, 1, width, device=DEV).to(dtype)
    bias = torch.randn(channels, device=DEV).to(dtype)
    mask = torch.ones(batch, length, dtype=torch.long, device=DEV)
    mask[1, : length // 2] = 0
    mask[2, : length - 1] = 0
    for state in (None, torch.randn(batch, channels, width - 1, device=DEV).to(dtype)):
        for attention_mask in (None, mask):
            keep = (attention_mask if attention_mask is not None else torch.ones_like(mask)).double()[..., None]
            ref, ref_state = causal_conv(xBC.double() * keep, weight.double(), bias.double(),
                                         None if state is None else state.double())
            ref[..., :x_channels] *= keep
            out, new_state = causal_conv_triton(xBC, weight, bias, state, attention_mask, x_channels=x_channels)
            tol = 1e-6 if dtype == torch.float32 else 1e-2
            assert out.shape == xBC.shape and out.dtype == dtype and out.is_contiguous()
            assert rel(out, ref) < tol
            assert rel(new_state, ref_state) < tol


@triton_kernel
@pytest.mark.triton
@pytest.mark.parametrize("shape", [(2, 200, 200), (1, 1, 16), (3, 129, 300), (1, 64, 128)])
@pytest.mark.parametrize("width", [4, 2])
@pytest.mark.parametrize("resets", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_training_conv_and_its_gradients_match_float64(shape, width, resets, with_bias, dtype):
    """The training conv (document resets, autograd) against the PyTorch reference in float64: output and the
    gradients of input, weight and bias, on random inputs (lengths off the token tiles, channels off the channel
    tile, documents starting anywhere, one at position 0)."""
    from llamba.ops.conv import causal_conv
    from llamba.ops.conv.triton_train import causal_conv_train

    batch, length, channels = shape
    xBC = torch.randn(batch, length, channels, device=DEV).to(dtype)
    weight = torch.randn(channels, 1, width, device=DEV)  # parameters stay float32 under autocast
    bias = torch.randn(channels, device=DEV) if with_bias else None
    seq = torch.cumsum((torch.rand(batch, length, device=DEV) < 0.1).int(), 1, dtype=torch.int32) if resets else None
    dout = torch.randn(batch, length, channels, device=DEV)

    ref_in = [t.double().requires_grad_() for t in (xBC, weight)] + ([bias.double().requires_grad_()] if with_bias else [])
    ref, _ = causal_conv(ref_in[0], ref_in[1], ref_in[2] if with_bias else None, None, seq)
    (ref * dout.double()).sum().backward()

    ins = [t.clone().requires_grad_() for t in (xBC, weight)] + ([bias.clone().requires_grad_()] if with_bias else [])
    out = causal_conv_train(ins[0], ins[1], ins[2] if with_bias else None, seq)
    (out.float() * dout).sum().backward()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert out.shape == xBC.shape and out.dtype == dtype
    assert rel(out, ref) < tol
    for name, got, want in zip(("x", "weight", "bias"), ins, ref_in):
        assert got.grad.dtype == got.dtype, name
        assert rel(got.grad, want.grad) < tol, name


def test_training_conv_past_one_launch_takes_the_reference(monkeypatch):
    """Inputs one launch cannot index (int32 offsets) go to the PyTorch reference, gradients and all."""
    from llamba.ops import indexing
    from llamba.ops.conv import causal_conv
    from llamba.ops.conv.triton_train import causal_conv_train

    monkeypatch.setattr(indexing, "INDEX_LIMIT", 100)
    xBC = torch.randn(2, 30, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, 1, 4, dtype=torch.float64, requires_grad=True)
    seq = torch.cumsum((torch.rand(2, 30) < 0.2).int(), 1, dtype=torch.int32)
    out = causal_conv_train(xBC, w, None, seq)
    ref, _ = causal_conv(xBC, w, None, None, seq)
    assert torch.equal(out, ref)
    out.sum().backward()
    assert xBC.grad is not None and w.grad is not None


@triton_kernel
@pytest.mark.triton
@pytest.mark.parametrize("mixer", ["discrete_mamba2", "gateloop"])
def test_student_training_step_on_the_kernels_matches_the_torch_path(mixer):
    """A student's distillation step (packed windows with document resets, forward and backward) on the Triton
    kernels (training conv, chunked scan) gives the logits and every parameter's gradient of the PyTorch path."""
    from conftest import make_default_init_student

    from llamba.distill.data import boundaries

    student = make_default_init_student(3, mixer=mixer, chunk_size=16).to(DEV).train()
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ids = torch.randint(3, 97, (2, 45), device=DEV)
    ids[0, 10], ids[1, 30] = 2, 2  # EOS: a second document starts after each
    seq_idx, _ = boundaries(ids, 2)
    results = {}
    for backend in ("torch", "triton"):
        for layer in student.backbone.layers:
            layer.mixer.kernel_backend = backend
        student.zero_grad(set_to_none=True)
        logits = student(ids, seq_idx=seq_idx).logits
        (logits.float().square().mean()).backward()
        results[backend] = (logits.detach(), {n: p.grad.clone() for n, p in student.named_parameters()})
    (ref, ref_grads), (got, got_grads) = results["torch"], results["triton"]
    assert rel(got, ref) < 1e-5
    for name, g in ref_grads.items():
        assert rel(got_grads[name], g) < 1e-4, name


@pytest.mark.skipif(INTERPRETING, reason="compiles the real kernels")
def test_every_kernel_compiles_for_hopper_within_its_shared_memory():
    """No GPU needed: each Triton kernel, launched by its host function at the kernel table's shapes, compiles
    for sm_90a (the interpreter never compiles: shape and layout errors would first show on the GPU) and fits
    an H100's shared memory per block. Registers and spills are printed by scripts/kernel_registers.py."""
    from triton.runtime.jit import JITFunction

    from llamba.bench.registers import compile_report
    from llamba.ops.conv import triton_kernel as triton_conv
    from llamba.ops.conv import triton_train as triton_conv_train
    from llamba.ops.gateloop import triton_rotate
    from llamba.ops.ssd import triton_chunk
    from llamba.ops.step import triton_kernel as triton_decode

    rows = compile_report(arch=90, sms=132)
    modules = (triton_chunk, triton_conv, triton_conv_train, triton_decode, triton_rotate)
    kernels = {name for module in modules for name, obj in vars(module).items()
               if isinstance(obj, JITFunction) and name.endswith("_kernel")}
    assert {r["kernel"] for r in rows} == kernels  # every kernel is covered, in every launch setting used
    assert [r for r in rows if not r["shared_fits"]] == []


def test_scan_dispatch_is_an_argument_with_clear_errors():
    """The kernels' choice is a value passed down (no module state to patch): the auto rule, a forced route, a
    target GPU's SM count, and refusals that name the choices."""
    from llamba.ops.ssd.triton_chunk import AUTO, Dispatch

    cpu = torch.device("cpu")
    assert AUTO.sms(cpu) == 1 and Dispatch(sm_count=132).sms(cpu) == 132
    assert AUTO.fused_forward(1, 64, cpu) and not Dispatch(sm_count=132).fused_forward(9, 64, cpu)
    assert Dispatch(forward="fused", sm_count=132).fused_forward(1, 64, cpu)
    assert not Dispatch(forward="two_kernel").fused_forward(1 << 20, 64, cpu)
    with pytest.raises(ValueError, match="choose one of"):
        Dispatch(forward="one-pass")
    with pytest.raises(ValueError, match="'wide', 'always' or 'never'"):
        Dispatch(cuda_backward="sometimes")

