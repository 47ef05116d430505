"""The GateLoop chunked scan: B and C rotated by the cumulative phase, then the Discrete Mamba-2 scan unchanged
(``llamba.ops.ssd.ssd_scan``: the PyTorch chunks anywhere, the Triton kernels on CUDA)."""

from __future__ import annotations

from llamba.ops.gateloop.phase import rotate_by_phase
from llamba.ops.ssd import mixing_matrix, needs_grad, ssd_scan, use_triton


def gateloop_scan(x, B, C, log_a, theta, initial_state=None, initial_phase=None, seq_idx=None, chunk_size=128,
                  backend="auto", gate=None):
    """Returns (y, final_state, final_phase). ``initial_state`` (b, H, P, N) and ``initial_phase`` (b, G, N/2) go
    together: a state is only meaningful in the frame of the phase it was written at. Documents (``seq_idx``)
    restart both. ``backend`` and ``gate`` as for ``ssd_scan``; with the Triton kernels and nothing needing a
    gradient (a prefill), the rotation is one kernel too (``triton_rotate``)."""
    if use_triton(x, backend) and not needs_grad(B, C, theta, initial_phase):
        from llamba.ops.gateloop.triton_rotate import rotate_by_phase_triton

        B, C, final_phase = rotate_by_phase_triton(B, C, theta, initial_phase, seq_idx)
    else:
        B, C, final_phase = rotate_by_phase(B, C, theta, initial_phase, seq_idx)
    y, final_state = ssd_scan(x, B, C, log_a, initial_state=initial_state, seq_idx=seq_idx, chunk_size=chunk_size,
                              backend=backend, gate=gate)
    return y, final_state, final_phase


def gateloop_mixing_matrix(B, C, log_a, theta, D=None, seq_idx=None, n_heads=None):
    """The GateLoop mixer as one (batch, H, L, L) matrix (``mixing_matrix`` of the rotated B and C): what MOHAWK
    stage 1 aligns with the teacher's attention."""
    B, C, _ = rotate_by_phase(B, C, theta, None, seq_idx)
    return mixing_matrix(B, C, log_a, D=D, seq_idx=seq_idx, n_heads=n_heads)
