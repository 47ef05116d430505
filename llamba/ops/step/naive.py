"""The PyTorch reference of the mixer's decode step (``llamba.ops.step``): conv-state shift, conv, state update,
output, D skip and gate, one token per row."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llamba.ops.conv import conv_step
from llamba.ops.gateloop.recurrent import gateloop_step
from llamba.ops.ssd.naive import state_dtype
from llamba.ops.ssd.recurrent import ssd_step


def projected_rows(rows):
    """Rows of a projection of the normed input, as given, or computed from (u (b, d_model), weight (R, d_model), bias
    (R,) or None) in at least float32, as the fused kernel computes them: A_log (R = H) and a GateLoop mixer's theta
    (R = G * N/2)."""
    if not isinstance(rows, tuple):
        return rows
    u, weight, bias = rows
    acc = torch.promote_types(u.dtype, torch.float32)
    with torch.autocast(u.device.type, enabled=False):  # the rows stay in float32 under a bf16 autocast too
        return F.linear(u.to(acc), weight.to(acc), None if bias is None else bias.to(acc))


def mixer_step_torch(xBC, z, A_log, conv_state, ssm_state, conv_weight, conv_bias, D, z_bias, n_qk_heads, phase=None):
    """xBC (b, conv_dim) raw in_proj rows; z (b, d_inner); A_log (b, H) or its projection (``projected_rows``);
    conv_state (b, conv_dim, K-1) and ssm_state (b, H, P, N) updated in place; z_bias (d_inner) or None. ``phase``:
    a GateLoop mixer's (theta (b, G, N/2) or its projection, phase state (b, G, N/2), updated in place). Returns the
    gated output (b, d_inner) before out_proj."""
    A_log = projected_rows(A_log)
    batch, n_heads, head_dim, d_state = ssm_state.shape
    d_inner = n_heads * head_dim
    xBC = conv_step(xBC, conv_weight, conv_bias, conv_state)
    x, B, C = torch.split(xBC, [d_inner, n_qk_heads * d_state, n_qk_heads * d_state], dim=-1)
    x = x.reshape(batch, n_heads, head_dim)
    log_a = -F.softplus(A_log.to(state_dtype(x.dtype)))
    B, C = B.reshape(batch, n_qk_heads, d_state), C.reshape(batch, n_qk_heads, d_state)
    if phase is None:
        y = ssd_step(ssm_state, x, B, C, log_a)
    else:
        theta, phase_state = phase
        theta = projected_rows(theta).reshape(batch, n_qk_heads, d_state // 2)
        y = gateloop_step(ssm_state, phase_state, x, B, C, log_a, theta)
    y = y + D.to(y.dtype)[:, None] * x
    return y.reshape(batch, d_inner) * F.silu(z if z_bias is None else z + z_bias)
