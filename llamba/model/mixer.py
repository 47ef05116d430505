"""The Discrete Mamba-2 mixer that replaces attention in a Llamba block.

    in_proj(u) -> [x (H*P) | B (G*N) | C (G*N) | z (H*P) | A_log (H)]
    [x | B | C] <- causal depthwise conv (kernel 4, bias, no activation)
    a = exp(-softplus(A_log));  S_t = a_t S_{t-1} + x_t B_t^T;  y_t = S_t C_t + D x_t
    out = out_proj(y * silu(z + z_bias))

``GateLoopMamba2`` (``ssm_cfg.mixer = 'gateloop'``) adds a phase per group and state pair, theta = phase_proj(u)
(weight + bias), making the transition complex: a_t = |a_t| e^{i theta_t}; computed as the same scan of B and C
rotated by the cumulative phase (docs/gateloop.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llamba.model.cache import LlambaCache
from llamba.model.config import DEFAULT_MIXER, LlambaConfig, mixer_name
from llamba.ops.conv import causal_conv
from llamba.ops.step import mixer_step
from llamba.ops.gateloop import gateloop_mixing_matrix, rotate_by_phase
from llamba.ops.ssd import mixing_matrix, needs_grad, ssd_scan, use_triton
from llamba.ops.ssd.naive import state_dtype

# silu(Z_BIAS_IDENTITY) == 1 (to 1e-12): a fresh mixer's gate passes y through unchanged.
Z_BIAS_IDENTITY = 1.278464542761


def split_in_proj(u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, d_xbc: int, d_inner: int):
    """in_proj(u) as (xBC, z, A_log). The A_log rows (one per head) seldom leave the output width a multiple of 8,
    and cuBLAS then takes a slow unaligned kernel (an order of magnitude slower on an H100 at the SmolLM2
    student's shapes) whose output rows are misaligned for every kernel after it. So the [xBC | z] rows get a GEMM
    of their own, and the few A_log rows another."""
    xBC, z = aligned_in_proj(u, weight, bias, d_xbc, d_inner)
    main = d_xbc + d_inner
    return xBC, z, F.linear(u, weight[main:], None if bias is None else bias[main:])


def aligned_in_proj(u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, d_xbc: int, d_inner: int):
    """(xBC, z): in_proj's [xBC | z] rows alone, as one GEMM, without the A_log rows that misalign it."""
    main = d_xbc + d_inner
    return F.linear(u, weight[:main], None if bias is None else bias[:main]).split([d_xbc, d_inner], dim=-1)


class DiscreteMamba2(nn.Module):
    rotates = False  # GateLoopMamba2: B and C are rotated by a cumulative phase (``phase``)

    def __init__(self, config: LlambaConfig, layer_idx: int = 0):
        super().__init__()
        ssm = config.ssm_cfg
        self.layer_idx = layer_idx
        self.d_model = config.d_model
        self.d_inner = config.d_inner
        self.n_v_heads = config.n_v_heads
        self.n_qk_heads = config.n_qk_heads
        self.head_dim = config.head_dim
        self.d_state = config.d_state
        self.chunk_size = ssm["chunk_size"]
        self.kernel_backend = "auto"  # prefill kernels: 'auto' (Triton on CUDA), 'torch' or 'triton' (ops.ssd.BACKENDS)
        bias = ssm["bias"]

        self.in_proj = nn.Linear(
            self.d_model, 2 * self.d_inner + 2 * self.n_qk_heads * self.d_state + self.n_v_heads, bias=bias)
        # With a biased in_proj the z bias lives there; otherwise it is a parameter of its own (official layout).
        self.z_bias = None if bias else nn.Parameter(torch.zeros(self.d_inner))
        self.conv1d = nn.Conv1d(
            config.conv_dim, config.conv_dim, kernel_size=ssm["d_conv"], groups=config.conv_dim, bias=ssm["conv_bias"])
        self.D = nn.Parameter(torch.ones(self.n_v_heads))
        self.out_proj = nn.Linear(self.d_inner, self.d_model, bias=bias)

    # -- pieces shared by every path ---------------------------------------------------------------------------
    def _split_projection(self, u: torch.Tensor):
        d_xbc = self.d_inner + 2 * self.n_qk_heads * self.d_state
        if isinstance(self.in_proj, nn.Linear):
            return split_in_proj(u, self.in_proj.weight, self.in_proj.bias, d_xbc, self.d_inner)
        return torch.split(self.in_proj(u), [d_xbc, self.d_inner, self.n_v_heads], dim=-1)  # a quantized stand-in

    def _split_xBC(self, xBC: torch.Tensor):
        b, L, _ = xBC.shape
        gn = self.n_qk_heads * self.d_state
        x, B, C = torch.split(xBC, [self.d_inner, gn, gn], dim=-1)
        return (x.reshape(b, L, self.n_v_heads, self.head_dim),
                B.reshape(b, L, self.n_qk_heads, self.d_state),
                C.reshape(b, L, self.n_qk_heads, self.d_state))

    def log_decay(self, A_log: torch.Tensor) -> torch.Tensor:
        return -F.softplus(A_log.to(state_dtype(A_log.dtype)))

    def phase(self, u: torch.Tensor) -> torch.Tensor | None:
        """The per-token phase increments theta (batch, L, G, N/2) of a rotating mixer; None: no rotation."""
        return None

    def step_theta(self, u: torch.Tensor):
        """One token's theta for the decode step, u (batch, d_model): None (no rotation), theta (batch, G, N/2), or
        what computes it, (u, weight, bias), which the fused step turns into theta itself (``projected_rows``)."""
        return None

    def matrix_parameters(self):
        """The parameters that shape ``mixing_matrix`` (what MOHAWK stage 1 trains)."""
        yield from self.in_proj.parameters()
        yield from self.conv1d.parameters()
        yield self.D

    # -- forward ---------------------------------------------------------------------------------------------
    def forward(
        self,
        u: torch.Tensor,
        cache: LlambaCache | None = None,
        seq_idx: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """u (batch, L, d_model). With a cache that has seen tokens, continues from its state; a single token
        goes through the recurrent step. ``attention_mask`` (batch, L), 0 on left padding: padded tokens leave
        the state untouched. ``seq_idx`` (batch, L): document index for packed sequences (state resets)."""
        return self.out_proj(self.mix(*self._split_projection(u), cache, seq_idx, attention_mask, theta=self.phase(u)))

    def mix(
        self,
        xBC: torch.Tensor,
        z: torch.Tensor,
        A_log: torch.Tensor,
        cache: LlambaCache | None = None,
        seq_idx: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        theta: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The mixer between its two projections: in_proj's (xBC, z, A_log), each (batch, L, width), to the gated
        output (batch, L, d_inner) that out_proj reads. ``theta``: a rotating mixer's ``phase(u)``, required for one."""
        batch, length, _ = xBC.shape
        continuing = cache is not None and cache.seen_tokens > 0
        if self.rotates and theta is None:  # without it the output would silently be plain Discrete Mamba-2's
            raise ValueError(f"{type(self).__name__}.mix needs theta=mixer.phase(u): its B and C rotate by the phase")
        if not self.rotates and theta is not None:
            raise ValueError("theta given to a Discrete Mamba-2 mixer, which has no phase")

        if continuing and length == 1 and attention_mask is None and seq_idx is None:
            return self._mix_step(xBC[:, 0], z[:, 0], A_log[:, 0], cache, None if theta is None else theta[:, 0])[:, None]

        conv_state = cache.conv_states[self.layer_idx] if continuing else None
        padded = attention_mask is not None and not bool(attention_mask.all())
        if not needs_grad(xBC) and seq_idx is None and use_triton(xBC, self.kernel_backend):
            from llamba.ops.conv.triton_kernel import causal_conv_triton

            # one kernel convolves in in_proj's layout (x, B, C become views) and masks the padding
            xBC, new_conv_state = causal_conv_triton(xBC, self.conv1d.weight, self.conv1d.bias, conv_state,
                                                     attention_mask if padded else None, x_channels=self.d_inner)
            x, B, C = self._split_xBC(xBC)
        elif cache is None and not padded and use_triton(xBC, self.kernel_backend):
            from llamba.ops.conv.triton_train import causal_conv_train

            # training and packed evaluation: document resets and autograd, in in_proj's layout (views again)
            xBC = causal_conv_train(xBC, self.conv1d.weight, self.conv1d.bias, seq_idx)
            x, B, C = self._split_xBC(xBC)
        else:
            keep = attention_mask[:, -length:].to(xBC.dtype)[..., None] if padded else None
            if padded:
                xBC = xBC * keep  # padded tokens feed zeros to the convolution, like the start of a sequence
            xBC, new_conv_state = causal_conv(xBC, self.conv1d.weight, self.conv1d.bias, conv_state, seq_idx)
            x, B, C = self._split_xBC(xBC)
            if padded:
                x = x * keep[..., None]  # ... and write nothing to the state
        log_a = self.log_decay(A_log)
        if padded:
            log_a = log_a * attention_mask[:, -length:, None].to(log_a.dtype)  # ... nor decay it
        if theta is not None:
            if padded:
                theta = theta * attention_mask[:, -length:, None, None].to(theta.dtype)  # ... nor turn its phase
            B, C, final_phase = rotate_by_phase(
                B, C, theta, cache.phase_states[self.layer_idx] if continuing else None, seq_idx)
            if cache is not None:
                cache.phase_states[self.layer_idx].copy_(final_phase)
        initial_state = cache.ssm_states[self.layer_idx] if continuing else None
        y, final_state = ssd_scan(
            x, B, C, log_a, initial_state=initial_state, seq_idx=seq_idx, chunk_size=self.chunk_size,
            backend=self.kernel_backend, gate=(self.D, z, self.z_bias))  # y: (y + D x) * silu(z + z_bias)
        if cache is not None:
            cache.conv_states[self.layer_idx].copy_(new_conv_state)
            cache.ssm_states[self.layer_idx].copy_(final_state)
        return y.reshape(batch, length, self.d_inner)

    # -- one token -------------------------------------------------------------------------------------------
    def step(self, u: torch.Tensor, cache: LlambaCache, in_proj: str = "one") -> torch.Tensor:
        """One token per row of a continuing cache: u (batch, 1, d_model), the normed input, to the mixer's output
        (batch, 1, d_model), this layer's conv and SSM state in ``cache`` updated in place; what ``forward(u,
        cache)`` computes for one token. It reads no host-side cache field, so a CUDA graph can replay it.
        ``in_proj`` (``llamba.model.functional.StepOptions``) picks how in_proj runs; all routes are the same
        product, in different GEMMs (see ``split_in_proj``)."""
        xBC, z, A_log = self._step_projection(u[:, 0], in_proj)
        return self.out_proj(self._mix_step(xBC, z, A_log, cache, self.step_theta(u[:, 0]))[:, None])

    def _step_projection(self, u: torch.Tensor, route: str):
        """in_proj of u (batch, d_model) as (xBC, z, A_log); with ``route`` "kernel", A_log is given as (u, its
        weight rows, their bias) for the fused decode kernel to compute."""
        d_xbc = self.d_inner + 2 * self.n_qk_heads * self.d_state
        if not isinstance(self.in_proj, nn.Linear) or route == "one":  # a quantized stand-in takes its own route
            return torch.split(self.in_proj(u), [d_xbc, self.d_inner, self.n_v_heads], dim=-1)
        weight, bias = self.in_proj.weight, self.in_proj.bias
        if route == "split":
            return split_in_proj(u, weight, bias, d_xbc, self.d_inner)
        if route == "kernel":
            main = d_xbc + self.d_inner
            return (*aligned_in_proj(u, weight, bias, d_xbc, self.d_inner),
                    (u, weight[main:], None if bias is None else bias[main:]))
        raise ValueError(f"in_proj route {route!r}: choose 'one', 'split' or 'kernel'")

    def _mix_step(self, xBC, z, A_log, cache: LlambaCache, theta=None) -> torch.Tensor:
        """The fused decode step (Triton on CUDA, else its PyTorch twin) on this layer's states: (batch, d_inner).
        ``theta`` (batch, G, N/2) or its projection (``step_theta``): a rotating mixer's phase increment, its phase
        state in ``cache`` turned in place."""
        conv = self.conv1d
        phase = None if theta is None else (theta, cache.phase_states[self.layer_idx])
        return mixer_step(xBC, z, A_log, cache.conv_states[self.layer_idx], cache.ssm_states[self.layer_idx],
                          conv.weight, conv.bias, self.D, self.z_bias, self.n_qk_heads, phase=phase)

    def mixing_matrix(self, u: torch.Tensor, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        """The mixer's token-mixing matrix for input u (batch, L, d_model): (batch, H, L, L), D on the diagonal.

        ``T @ x`` equals the scan output plus the D skip (before gate and out_proj); MOHAWK stage 1 aligns T
        with the teacher's attention."""
        xBC, _, A_log = self._split_projection(u)
        xBC, _ = causal_conv(xBC, self.conv1d.weight, self.conv1d.bias, None, seq_idx)
        _, B, C = self._split_xBC(xBC)
        theta = self.phase(u)
        if theta is not None:
            return gateloop_mixing_matrix(B, C, self.log_decay(A_log), theta, D=self.D, seq_idx=seq_idx,
                                          n_heads=self.n_v_heads)
        return mixing_matrix(B, C, self.log_decay(A_log), D=self.D, seq_idx=seq_idx, n_heads=self.n_v_heads)

    @torch.no_grad()
    def reset_parameters_to_identity(self) -> None:
        """Llamba's initialisation: gate passes through (z rows 0, silu(z_bias) = 1), conv is the identity
        (last tap 1, bias 0), D = 1. in_proj's x/B/C/A_log rows and out_proj keep their default init."""
        z_rows = slice(self.d_inner + 2 * self.n_qk_heads * self.d_state, 2 * self.d_inner + 2 * self.n_qk_heads * self.d_state)
        self.in_proj.weight[z_rows].zero_()
        if self.z_bias is not None:
            self.z_bias.fill_(Z_BIAS_IDENTITY)
        else:
            self.in_proj.bias[z_rows].fill_(Z_BIAS_IDENTITY)
        self.conv1d.weight.zero_()
        self.conv1d.weight[:, 0, -1] = 1.0
        if self.conv1d.bias is not None:
            self.conv1d.bias.zero_()
        self.D.fill_(1.0)


def rope_frequencies(d_state: int, base: float = 10000.0) -> torch.Tensor:
    """Llama's default RoPE inverse frequencies base^(-2j/N), j < N/2, float64: a fresh GateLoop mixer's phase bias
    (``llamba convert`` puts the teacher's own there instead)."""
    return base ** -(torch.arange(0, d_state, 2, dtype=torch.float64) / d_state)


class GateLoopMamba2(DiscreteMamba2):
    """Discrete Mamba-2 with GateLoop's complex transition: per value head h and state pair j (dims j, j + N/2),
    a_t = exp(-softplus(A_log_t)) e^{i theta_t}, with theta_t = phase_proj(u_t) per query/key group (the heads of a
    group share B and C, so they share its rotation) and pair. Its state is the real scan's, in the frame of B and C
    rotated by the cumulative phase, which the cache keeps beside it (``LlambaCache.phase_states``)."""

    rotates = True

    def __init__(self, config: LlambaConfig, layer_idx: int = 0):
        super().__init__(config, layer_idx)
        if self.d_state % 2:
            raise ValueError(f"d_state={self.d_state}: a GateLoop mixer rotates pairs of state dims, so it must be even")
        # A linear map plus a bias, as in GateLoop; its own module rather than more in_proj rows, so that in_proj
        # keeps the Discrete Mamba-2 layout (and its aligned-GEMM split) exactly.
        self.phase_proj = nn.Linear(self.d_model, self.n_qk_heads * self.d_state // 2, bias=True)

    def phase(self, u: torch.Tensor) -> torch.Tensor:
        """theta (batch, L, G, N/2) in the state dtype. Computed in it (never under autocast) because theta is summed
        along the sequence: a bf16 rounding of it would be a systematic error in every later position's angle."""
        dtype = state_dtype(u.dtype)
        p = self.phase_proj
        if not isinstance(p, nn.Linear):  # a quantized stand-in
            theta = p(u).to(dtype)
        else:
            with torch.autocast(u.device.type, enabled=False):
                theta = F.linear(u.to(dtype), p.weight.to(dtype), p.bias.to(dtype))
        return theta.view(*u.shape[:-1], self.n_qk_heads, self.d_state // 2)

    def step_theta(self, u: torch.Tensor):
        p = self.phase_proj
        if not isinstance(p, nn.Linear):  # a quantized stand-in computes its own rows
            return self.phase(u[:, None])[:, 0]
        # the fused decode kernel computes theta from these in float32, as phase() does: no cast of the weight and
        # no separate GEMM each step (four small kernels a layer; docs/gateloop.md, "Where it runs")
        return u, p.weight, p.bias

    def matrix_parameters(self):
        yield from super().matrix_parameters()
        yield from self.phase_proj.parameters()

    @torch.no_grad()
    def reset_parameters_to_identity(self) -> None:
        """As Discrete Mamba-2's, and the phase input-independent at Llama's default RoPE frequencies (weight 0):
        a relative-position rotation from the start that the data dependence is learnt on top of."""
        super().reset_parameters_to_identity()
        self.phase_proj.weight.zero_()
        self.phase_proj.bias.copy_(rope_frequencies(self.d_state).repeat(self.n_qk_heads))


MIXER_CLASSES = {DEFAULT_MIXER: DiscreteMamba2, "gateloop": GateLoopMamba2}


def mixer_class(config) -> type[DiscreteMamba2]:
    """The mixer class of a config's non-attention layers (``ssm_cfg.mixer``, checked by ``LlambaConfig``)."""
    return MIXER_CLASSES[mixer_name(config)]
