"""Mixer-level GPU timings: our chunked scan against flash-linear-attention's ``chunk_simple_gla`` (same
recurrence: q=C, k=B, v=x, g=log_a, scale=1), our backward against our forward, and the fused decode step
against its bytes floor. Every timing is checked for agreement first."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from llamba.ops.decode import mixer_step_torch
from llamba.ops.ssd.triton_chunk import ssd_chunk_triton
from llamba.ops.triton_decode import mixer_step_triton

SCAN_SHAPES = [(8, 2048, 9, 64), (8, 4096, 32, 64), (16, 2048, 32, 128)]  # (batch, T, heads, head dim = d_state)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _scan_inputs(batch, T, H, D, device, grad=False):
    x = torch.randn(batch, T, H, D, device=device, dtype=torch.bfloat16)
    B = (torch.randn(batch, T, H, D, device=device) / D ** 0.5).bfloat16()
    C = (torch.randn(batch, T, H, D, device=device) / D ** 0.5).bfloat16()
    log_a = -F.softplus(torch.randn(batch, T, H, device=device))
    return [t.requires_grad_(grad) for t in (x, B, C, log_a)]


def bench_scan(device="cuda") -> list[dict]:
    try:
        from fla.ops.simple_gla import chunk_simple_gla
    except ImportError as err:  # the rival is optional: report its absence rather than skip silently
        chunk_simple_gla, fla_error = None, repr(err)
    rows = []
    for batch, T, H, D in SCAN_SHAPES:
        x, B, C, log_a = _scan_inputs(batch, T, H, D, device)
        row = {"shape": f"B{batch} T{T} H{H} D{D}"}
        ours_fwd = lambda: ssd_chunk_triton(x, B, C, log_a)  # noqa: E731
        with torch.no_grad():
            y, _ = ours_fwd()
            row["ours_fwd_ms"] = do_bench(ours_fwd, warmup=25, rep=100, return_mode="median")
        if chunk_simple_gla is not None:
            fla_fwd = lambda: chunk_simple_gla(C, B, x, g=log_a, scale=1.0, output_final_state=True)  # noqa: E731
            with torch.no_grad():
                y_fla, _ = fla_fwd()
                row["fla_fwd_ms"] = do_bench(fla_fwd, warmup=25, rep=100, return_mode="median")
            row["rel_diff_vs_fla"] = _rel(y, y_fla)
            row["fla_over_ours"] = row["fla_fwd_ms"] / row["ours_fwd_ms"]
        else:
            row["fla_error"] = fla_error
        # Backward alone: gradients of a fixed forward graph, retained between repetitions.
        xg, Bg, Cg, lag = (t.detach().requires_grad_() for t in (x, B, C, log_a))
        yg, sg = ssd_chunk_triton(xg, Bg, Cg, lag)
        dy = torch.randn_like(yg)
        bwd = lambda: torch.autograd.grad((yg, sg), (xg, Bg, Cg, lag), (dy, torch.zeros_like(sg)), retain_graph=True)  # noqa: E731
        row["ours_bwd_ms"] = do_bench(bwd, warmup=25, rep=100, return_mode="median")
        row["bwd_over_fwd"] = row["ours_bwd_ms"] / row["ours_fwd_ms"]
        rows.append(row)
        del x, B, C, log_a, xg, Bg, Cg, lag, yg, sg, dy
        torch.cuda.empty_cache()
    return rows


def bench_decode_step(bandwidth_gbs: float, device="cuda", heads=9, head_dim=64, d_state=64, groups=9) -> list[dict]:
    """The fused step at the student's shapes (per layer) and batch >= 64, against bytes / measured bandwidth."""
    rows = []
    d_inner = heads * head_dim
    conv_dim = d_inner + 2 * groups * d_state
    for batch in (64, 256, 1024):
        dt = torch.bfloat16
        xBC = torch.randn(batch, conv_dim, device=device, dtype=dt)
        z = torch.randn(batch, d_inner, device=device, dtype=dt)
        A_log = torch.randn(batch, heads, device=device, dtype=dt)
        conv_state = torch.randn(batch, conv_dim, 3, device=device, dtype=dt)
        ssm_state = torch.randn(batch, heads, head_dim, d_state, device=device)
        w = torch.randn(conv_dim, 1, 4, device=device, dtype=dt)
        bias = torch.randn(conv_dim, device=device, dtype=dt)
        D = torch.randn(heads, device=device, dtype=dt)
        z_bias = torch.randn(d_inner, device=device, dtype=dt)
        args = (xBC, z, A_log, conv_state, ssm_state, w, bias, D, z_bias, groups)
        ref_cs, ref_ss = conv_state.double(), ssm_state.double()
        ref = mixer_step_torch(xBC.double(), z.double(), A_log.double(), ref_cs, ref_ss, w.double(), bias.double(),
                               D.double(), z_bias.double(), groups)
        out = mixer_step_triton(*args)
        row = {"batch": batch, "rel_err_out": _rel(out, ref), "rel_err_state": _rel(ssm_state, ref_ss)}
        row["ms"] = do_bench(lambda: mixer_step_triton(*args), warmup=25, rep=100, return_mode="median")
        moved = (2 * ssm_state.nbytes + 2 * conv_state.nbytes + xBC.nbytes + z.nbytes + A_log.nbytes
                 + batch * d_inner * 2)
        row["bytes"] = moved
        row["floor_ms"] = moved / (bandwidth_gbs * 1e9) * 1e3
        row["over_floor"] = row["ms"] / row["floor_ms"]
        torch_step = lambda: mixer_step_torch(*args)  # noqa: E731
        row["torch_ms"] = do_bench(torch_step, warmup=10, rep=50, return_mode="median")
        rows.append(row)
    return rows
