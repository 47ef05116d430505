"""The Discrete Mamba-2 recurrence (``S_t = a_t S_{t-1} + x_t B_t^T``, ``y_t = S_t C_t``) in three equivalent forms.

- ``naive``: the materialized mixing matrix and a token loop (references, MOHAWK stage 1);
- ``chunk``: the chunked parallel scan in PyTorch (training, prefill, any device);
- ``recurrent``: one token at a time with the state updated in place (decoding).
``ssd_scan`` picks the fastest available implementation of the chunked scan for the inputs' device.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from llamba.ops.ssd.chunk import ssd_chunk
from llamba.ops.ssd.naive import mixing_matrix, ssd_loop, ssd_matrix
from llamba.ops.ssd.recurrent import ssd_step

BACKENDS = ("auto", "torch", "triton")


@functools.cache
def triton_available() -> bool:
    try:
        from llamba.ops.ssd import triton_chunk  # noqa: F401  (checked once: this runs per layer per forward)
    except ImportError:
        return False
    return torch.cuda.is_available()


def use_triton(x: torch.Tensor, backend: str = "auto") -> bool:
    """Whether ``backend`` ('auto': Triton on CUDA when installed, 'torch', 'triton') means the Triton kernels for x."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; choose one of {BACKENDS}")
    return backend == "triton" or (backend == "auto" and x.is_cuda and x.dtype != torch.float64 and triton_available())


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd will want gradients through any of ``tensors`` (None entries are skipped)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def skip_and_gate(y, x, D, z, z_bias=None):
    """The mixer's output before out_proj: (y + D x) * silu(z + z_bias), with y, x (batch, T, H, P), D (H,),
    z (batch, T, H*P) and z_bias (H*P,) or None."""
    gate = z.reshape(y.shape) if z_bias is None else z.reshape(y.shape) + z_bias.view(y.shape[-2:])
    return (y + D.to(y.dtype)[:, None] * x) * F.silu(gate)


def ssd_scan(x, B, C, log_a, initial_state=None, seq_idx=None, chunk_size=128, backend="auto", gate=None,
             dispatch=None):
    """Chunked scan; returns (y, final_state). ``backend``: see ``use_triton``. ``gate`` = (D, z, z_bias) makes y
    ``skip_and_gate(y, x, D, z, z_bias)``, computed inside the Triton output kernel when nothing needs a
    gradient. ``dispatch``: the Triton kernels' choice (``triton_chunk.Dispatch``; default from the device)."""
    if use_triton(x, backend):
        from llamba.ops.ssd.triton_chunk import ssd_chunk_triton

        fuse = gate is not None and not needs_grad(x, B, C, log_a, initial_state, *gate)
        routing = {} if dispatch is None else {"dispatch": dispatch}
        y, final_state = ssd_chunk_triton(x, B, C, log_a, initial_state=initial_state, seq_idx=seq_idx,
                                          chunk_size=chunk_size, gate=gate if fuse else None, **routing)
        if fuse:
            return y, final_state
    else:
        y, final_state = ssd_chunk(x, B, C, log_a, initial_state=initial_state, seq_idx=seq_idx,
                                   chunk_size=chunk_size)
    return (y if gate is None else skip_and_gate(y, x, *gate)), final_state


__all__ = ["mixing_matrix", "needs_grad", "skip_and_gate", "ssd_chunk", "ssd_loop", "ssd_matrix", "ssd_scan",
           "ssd_step", "use_triton"]
