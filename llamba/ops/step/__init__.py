"""One decoding step of the whole mixer after ``in_proj``: conv-state shift, conv, state update, output, D skip
and gate. ``naive.py`` is the PyTorch reference; on CUDA the fused Triton kernel (``triton_kernel.py``) replaces
it with one launch for all heads; ``mixer_step`` picks."""

from __future__ import annotations

import torch

from llamba.ops.step.naive import projected_rows, mixer_step_torch


def mixer_step(xBC, z, A_log, conv_state, ssm_state, conv_weight, conv_bias, D, z_bias, n_qk_heads, phase=None):
    """Dispatches to the fused Triton kernel on CUDA when it is installed (a GateLoop step, ``phase`` given,
    included: the kernel turns the phase and rotates B and C itself), else to the PyTorch reference."""
    if xBC.is_cuda and xBC.dtype != torch.float64 and (phase is None or phase[1].dtype == torch.float32):
        try:
            from llamba.ops.step.triton_kernel import mixer_step_triton
        except ImportError:
            pass
        else:
            return mixer_step_triton(xBC, z, A_log, conv_state, ssm_state, conv_weight, conv_bias, D, z_bias,
                                     n_qk_heads, phase)
    return mixer_step_torch(xBC, z, A_log, conv_state, ssm_state, conv_weight, conv_bias, D, z_bias, n_qk_heads,
                            phase)


__all__ = ["projected_rows", "mixer_step", "mixer_step_torch"]
