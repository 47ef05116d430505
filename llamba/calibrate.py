"""``init='attention-calibrated'``: the attention init with what a linearised softmax lacks, set from one teacher
forward on calibration tokens.

The plain attention init (C <- W_q, B <- W_k / sqrt(d), x <- W_v, out <- W_o) leaves three things wrong, and the
initialised SmolLM2 student sits at KL 13.4 from the teacher, far past the identity init's 7.4
(``benchmarks/init_kl.py``):

1. *The decay.* Official Llamba mixers have no in_proj bias, so A_log is a projection of the input alone, random at
   init: each head forgets at a random, token-dependent rate. But a layer's normed inputs share a strong mean
   direction m (|m| is 0.5-0.8 of their RMS in SmolLM2; u . m / |m|^2 is 1 +- 0.1-0.3), so A_log rows
   ``c_h m / |m|^2`` give each head h a decay near its target a_h on every token. Targets spread from
   ``DECAYS[0]`` to ``DECAYS[1]`` over the heads: memories from a few tokens to a hundred.
2. *The constant of exp.* softmax(q . k) weighs values by exp(q . k) ~ 1 + q . k: a linear q . k has no "1", no
   average of the values. One state dimension per group (the one whose q . k carries the least) is given constant
   B and C features (``sqrt(CONSTANT) m / |m|^2``), so C_t . B_s gains ~``CONSTANT``: a decayed mean of the values.
   A GateLoop mixer turns B and C by pairs: there the feature takes the slowest pair (RoPE's lowest frequency),
   whose turning is stopped (phase 0) and whose partner dimension is cleared, so it stays constant.
3. *The scale.* Unnormalised sums are far larger than a softmax's weighted means: each head's x rows are scaled so
   that its output (out_proj's input) has the RMS of the teacher attention's head (o_proj's input).

Calibration tokens are random ids (seeded): the statistics used are the residual stream's, which random text
reproduces well enough (init KL 6.5 against 6.25 from 2k tokens of real text), so ``llamba convert`` needs no data.
"""

from __future__ import annotations

import math

import torch

DECAYS = (0.7, 0.99)    # per-head decay targets, spread linearly over the heads
CONSTANT = 16.0         # C_t . B_s's constant term (the "1" of exp, times the softmax's typical logit scale)
CALIBRATION = (4, 512)  # random-id sequences x length for the teacher forward


def decay_targets(n_heads: int) -> torch.Tensor:
    lo, hi = DECAYS
    if n_heads == 1:
        return torch.tensor([hi], dtype=torch.float64)
    return torch.linspace(lo, hi, n_heads, dtype=torch.float64)


def a_log_for(decay: torch.Tensor) -> torch.Tensor:
    """The A_log value whose decay exp(-softplus(A_log)) is ``decay``."""
    return torch.log(torch.expm1(-torch.log(decay)))


@torch.no_grad()
def teacher_statistics(teacher, ids: torch.Tensor) -> tuple[tuple, dict]:
    """(each layer's input hidden state, {layer: its attention's per-head output before o_proj})."""
    heads = {}
    hooks = [layer.self_attn.o_proj.register_forward_pre_hook(lambda m, inp, i=i: heads.__setitem__(i, inp[0]))
             for i, layer in enumerate(teacher.model.layers)]
    try:
        out = teacher.model(ids, output_hidden_states=True, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return out.hidden_states[: len(teacher.model.layers)], heads


@torch.no_grad()
def calibrate_attention_init(student, teacher, seed: int = 0) -> dict:
    """Set the decay, the constant feature and the output scale of every mixer of an attention-initialised student
    (see the module docstring), in place. Returns per layer what was set (targets, scales, feature dimensions)."""
    batch, length = CALIBRATION
    g = torch.Generator().manual_seed(seed)
    device = next(teacher.parameters()).device
    ids = torch.randint(0, teacher.config.vocab_size, (batch, length), generator=g).to(device)
    hidden, heads = teacher_statistics(teacher, ids)
    report = {}
    for i, layer in enumerate(student.backbone.layers):
        if student.config.is_attention_layer(i):
            continue
        mixer = layer.mixer
        weight = next(layer.parameters())  # the student is built on the CPU; the teacher may be on CUDA
        u = layer.input_layernorm(hidden[i].to(weight.device, weight.dtype))
        flat = u.reshape(-1, u.shape[-1]).double()
        m = flat.mean(0)
        along = m / m.dot(m)  # w = c * along gives w . u ~ c for every token
        d, G, N, H = mixer.d_inner, mixer.n_qk_heads, mixer.d_state, mixer.n_v_heads
        w = mixer.in_proj.weight
        B_rows, C_rows = slice(d, d + G * N), slice(d + G * N, d + 2 * G * N)
        # 2. the constant feature, in each group's dimension of least |B| * |C|; a GateLoop mixer turns B and C by
        #    pairs (j, j + N/2), so there it takes the slowest-turning pair, stopped (phase 0), its partner cleared
        if mixer.rotates:
            half = N // 2
            dims = torch.full((G,), half - 1)  # RoPE's lowest frequency: the pair that carries the least position
            for grp in range(G):
                mixer.phase_proj.weight[grp * half + half - 1] = 0
                mixer.phase_proj.bias[grp * half + half - 1] = 0
                for rows in (B_rows, C_rows):
                    w[rows.start + grp * N + N - 1] = 0
        else:
            carried = ((flat @ w[B_rows].double().T).abs().mean(0)
                       * (flat @ w[C_rows].double().T).abs().mean(0)).view(G, N)
            dims = carried.argmin(-1)
        for grp, j in enumerate(dims.tolist()):
            w[d + grp * N + j] = (math.sqrt(CONSTANT) * along).to(w.dtype)
            w[d + G * N + grp * N + j] = (math.sqrt(CONSTANT) * along).to(w.dtype)
        # 1. the decay: in_proj's last H rows are A_log's
        targets = decay_targets(H)
        w[w.shape[0] - H:] = (a_log_for(targets)[:, None] * along[None, :]).to(w.dtype)
        # 3. the scale, with the decay and feature above in place: head by head, RMS of the teacher's
        got = {}
        hook = mixer.out_proj.register_forward_pre_hook(lambda m_, inp: got.__setitem__("y", inp[0]))
        try:
            mixer(u)
        finally:
            hook.remove()
        ours = got["y"].double().reshape(-1, H, mixer.head_dim).pow(2).mean((0, 2)).sqrt()
        theirs = heads[i].to(weight.device).double().reshape(-1, H, mixer.head_dim).pow(2).mean((0, 2)).sqrt()
        scale = theirs / ours.clamp_min(1e-30)
        w[:d] *= scale.repeat_interleave(mixer.head_dim)[:, None].to(w.dtype)  # y is linear in x (D = 0)
        report[i] = {"decays": targets.tolist(), "scale": scale.tolist(), "constant_dims": dims.tolist()}
    return report
