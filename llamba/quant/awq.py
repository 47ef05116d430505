"""Activation-aware weight scales (AWQ: Lin et al., arXiv 2306.00978) before round-to-nearest quantization.

A weight column that meets large activations matters more than its neighbours in the same quantization group.
Scaling column c of a linear up by s_c and its input down by s_c keeps the function and shrinks that column's share
of the rounding error. The input's division is folded into whatever produces the input, so the quantized weights,
the artifact and the CPU runtime are exactly as without it. Per input channel s = mean|x|^alpha; alpha is chosen
per site from a grid by the output error on calibration activations, and alpha = 0 (s = 1: plain round-to-nearest)
is on the grid, so on those activations the search never does worse than round-to-nearest.

Then bias correction (Nagel et al., arXiv 1906.04721): the rounding error's mean effect on each output,
(W - Q(W)) E[x] over the calibration activations, goes into the linear's bias (one is added where there was
none; the artifact stores a quantized linear's bias). What it removes matters most where an error repeats every
token: an in_proj's decay rows, whose error the scan sums over the whole context.

The sites of a block (a Llamba block, or a Llama teacher's decoder layer for measurements):
  input_layernorm          -> mixer.in_proj                     (attention: q_proj, k_proj, v_proj)
  conv1d's x channels      -> mixer.out_proj    the conv (bias too), the scan, the D skip and the gate are linear
                                                 in x channel by channel, so y * silu(z) scales with them
  v_proj's rows            -> o_proj            one scale per kv head and channel, shared by the query heads that
                                                 read it (GQA)
  post_attention_layernorm -> mlp.gate_proj, mlp.up_proj
  mlp.up_proj's rows       -> mlp.down_proj     silu(gate) * up is linear in up
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from llamba.quant.reference import dequantize, quantize_weight

ALPHAS = tuple(i / 20 for i in range(21))  # the grid (AWQ's own)


@dataclass
class Site:
    """Linears that read one producer's output, and how to divide that output's channels by a scale."""
    name: str
    consumers: list[nn.Linear]
    fold: Callable[[torch.Tensor], None]               # divides the producer's output channel c by s[c]
    tie: Callable[[torch.Tensor], torch.Tensor] = lambda s: s  # scales some channels must share (GQA)


def _divide_norm(norm: nn.Module):
    def fold(s):
        norm.weight.div_(s.to(norm.weight.dtype))
    return fold


def _divide_rows(linear: nn.Linear, expand=lambda s: s):
    """The producer is a linear itself: its output rows (and bias) divided. ``expand``: the site's scale, one per
    channel its consumer reads, onto the producer's rows."""
    def fold(s):
        s = expand(s).to(linear.weight.dtype)
        linear.weight.div_(s[:, None])
        if linear.bias is not None:
            linear.bias.div_(s)
    return fold


def _divide_conv_x(mixer: nn.Module):
    def fold(s):
        conv, n = mixer.conv1d, mixer.d_inner  # [x | B | C] channels, x first
        conv.weight[:n].div_(s.to(conv.weight.dtype)[:, None, None])
        if conv.bias is not None:
            conv.bias[:n].div_(s.to(conv.bias.dtype))
    return fold


def _gqa(attention: nn.Module):
    """o_proj reads heads x head_dim channels; query head h reads kv head h // group. Returns (tie, expand):
    ``tie`` averages a per-channel vector over the query heads of each kv head and spreads it back, ``expand`` maps
    it onto v_proj's kv-head rows."""
    cfg = attention.config
    heads, kv, dim = cfg.num_attention_heads, cfg.num_key_value_heads, attention.head_dim

    def tie(s):
        return s.reshape(kv, heads // kv, dim).mean(1, keepdim=True).expand(kv, heads // kv, dim).reshape(-1)

    def expand(s):
        return s.reshape(kv, heads // kv, dim)[:, 0].reshape(-1)
    return tie, expand


def block_sites(block: nn.Module, index: int) -> list[Site]:
    """The sites of one block, producers that are linears first: their folds change rows of linears that the
    norm sites then scale by column, and either order gives the same function."""
    mlp = block.mlp
    attention = getattr(block, "self_attn", None) or block.mixer
    sites = []
    if hasattr(attention, "in_proj"):  # Discrete Mamba-2
        if getattr(attention, "rotates", False):
            raise ValueError("activation-aware scales: a rotating (GateLoop) mixer is not supported; quantize it "
                             "without a calibration text (--calibration), by plain round-to-nearest")
        sites.append(Site(f"{index}.out_proj", [attention.out_proj], _divide_conv_x(attention)))
        reading_norm = [attention.in_proj]
    else:
        tie, expand = _gqa(attention)
        sites.append(Site(f"{index}.o_proj", [attention.o_proj], _divide_rows(attention.v_proj, expand), tie))
        reading_norm = [attention.q_proj, attention.k_proj, attention.v_proj]
    sites.append(Site(f"{index}.down_proj", [mlp.down_proj], _divide_rows(mlp.up_proj)))
    sites.append(Site(f"{index}.{'in_proj' if len(reading_norm) == 1 else 'qkv'}", reading_norm,
                      _divide_norm(block.input_layernorm)))
    sites.append(Site(f"{index}.gate_up", [mlp.gate_proj, mlp.up_proj], _divide_norm(block.post_attention_layernorm)))
    return sites


class _Recorder(nn.Module):
    """Stands in for a linear during calibration (not an nn.Linear, so the fused paths that read weights directly
    call it instead): records the mean and mean |x| per channel over all rows and a strided sample of rows."""

    def __init__(self, linear: nn.Linear, stride: int):
        super().__init__()
        self.linear, self.stride = linear, stride
        self.total, self.abs_total, self.count, self.rows = 0.0, 0.0, 0, []

    def forward(self, x):
        flat = x.detach().reshape(-1, x.shape[-1]).double()
        self.total = self.total + flat.sum(0)
        self.abs_total = self.abs_total + flat.abs().sum(0)
        self.count += flat.shape[0]
        self.rows.append(flat[:: self.stride].clone())
        return self.linear(x)


def _swap(site_linear: nn.Linear, model: nn.Module, new: nn.Module) -> None:
    for parent in model.modules():
        for name, child in parent.named_children():
            if child is site_linear:
                setattr(parent, name, new)
                return
    raise ValueError("activation-aware scales: a linear of the plan is not in the model")


@torch.no_grad()
def calibrate(model: nn.Module, sites: list[Site], tokens: torch.Tensor, window: int = 512, rows: int = 512):
    """(mean x, mean |x| per channel, sampled rows) of each site's input, from the model on ``tokens`` in windows."""
    stride = max(1, len(tokens) // rows)
    recorders = [_Recorder(site.consumers[0], stride) for site in sites]
    for site, rec in zip(sites, recorders):
        _swap(site.consumers[0], model, rec)
    try:
        for start in range(0, len(tokens) - 1, window):
            ids = tokens[start:start + window]
            model(ids[None])
    finally:
        for site, rec in zip(sites, recorders):
            _swap(rec, model, site.consumers[0])
    return [(rec.total / rec.count, rec.abs_total / rec.count, torch.cat(rec.rows)[:rows].float()) for rec in recorders]


def fake_quantize(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    return dequantize(quantize_weight(w, bits, group_size), torch.float32)


def search_scale(consumers: list[tuple[torch.Tensor, int]], mean_abs: torch.Tensor, x: torch.Tensor,
                 group_size: int, tie=lambda s: s, alphas=ALPHAS) -> tuple[torch.Tensor, float, float, float]:
    """The scale of least output error sum_c ||x W_c^T - (x / s) Q(W_c s)^T||^2 over the grid of alphas, for
    consumers given as (float weight, bits). Returns (scale, alpha, error, round-to-nearest's error)."""
    x = x.float()
    base = mean_abs.float().clamp_min(1e-8)
    best = None
    for alpha in alphas:
        s = tie(base ** alpha)
        s = s / (s.max() * s.min()).sqrt()  # centred on 1: the fp16 scales see the same range either way
        err = 0.0
        for w, bits in consumers:
            w = w.float()
            wq = fake_quantize(w * s, bits, group_size) / s
            err += ((x @ (w - wq).T) ** 2).sum().item()
        if alpha == 0:
            plain = err
        if best is None or err < best[2]:
            best = (s, alpha, err)
    return (*best, plain)


@torch.no_grad()
def apply_scales(model: nn.Module, blocks, tokens: torch.Tensor, bits_of: Callable[[nn.Linear], int],
                 group_size: int = 32, window: int = 512, rows: int = 512, scales: bool = True,
                 bias_correction: bool = True) -> dict:
    """Fold activation-aware scales into ``model`` (in place; its function is unchanged), then (``bias_correction``)
    give each linear the bias that cancels its rounding error's mean (``scales=False``: that alone), for the quantization ``bits_of(linear)`` will
    give it (32: stays float, nothing to do). ``blocks``: the model's blocks (``model.backbone.layers`` or a
    Llama's ``model.model.layers``). Returns per site the chosen alpha and the calibration output error relative
    to round-to-nearest's (before bias correction)."""
    sites = [s for i, block in enumerate(blocks) for s in block_sites(block, i)
             if any(bits_of(c) < 32 for c in s.consumers)]
    stats = calibrate(model, sites, tokens, window, rows)
    report = {}
    for site, (mean, mean_abs, x) in zip(sites, stats):
        consumers = [c for c in site.consumers if bits_of(c) < 32]
        s, alpha, err, plain = search_scale([(c.weight, bits_of(c)) for c in consumers], mean_abs, x, group_size,
                                            site.tie, ALPHAS if scales else (0.0,))
        if alpha > 0:
            site.fold(s)
            for c in site.consumers:
                c.weight.mul_(s.to(c.weight.dtype))
        else:
            s = torch.ones_like(mean_abs)
        if bias_correction:
            for c in consumers:
                w = c.weight.double()
                shift = (w - fake_quantize(c.weight, bits_of(c), group_size).double()) @ (mean / s.double())
                if c.bias is None:
                    c.bias = nn.Parameter(torch.zeros(c.out_features, dtype=c.weight.dtype), requires_grad=False)
                c.bias.add_(shift.to(c.bias.dtype))
        report[site.name] = {"alpha": alpha, "error_vs_round_to_nearest": err / plain if plain > 0 else 1.0}
    return report
