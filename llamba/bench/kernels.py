"""Mixer-level GPU timings: our chunked scan against flash-linear-attention's ``chunk_simple_gla`` (same
recurrence: q=C, k=B, v=x, g=log_a, scale=1), our backward against our forward, the fused prefill convolution
against the PyTorch path it replaces, and the fused decode step against its bytes floor. Every timing is checked
for agreement first.

The decode step is timed inside a CUDA graph (``do_bench_cudagraph``), as the decode loop runs it: launched one by
one from Python, a 10-microsecond kernel measures the launch, not the kernel (both are reported)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from triton.testing import do_bench, do_bench_cudagraph

from llamba.ops.conv import causal_conv
from llamba.ops.step import mixer_step_torch
from llamba.ops.ssd.triton_chunk import ssd_chunk_triton
from llamba.ops.conv.triton_kernel import causal_conv_triton
from llamba.ops.conv.triton_train import causal_conv_train
from llamba.ops.step.triton_kernel import mixer_step_triton

# (batch, T, heads, head dim P, d_state N): the SmolLM2 and Llama-3.2-1B students' mixers, the issue's head dim 128
# read as P = N = 128, and Llamba-8B's mixer (head dim 128, d_state 64: cartesia's Llamba config)
SCAN_SHAPES = [(8, 2048, 9, 64, 64), (8, 4096, 32, 64, 64), (16, 2048, 32, 128, 128), (16, 2048, 32, 128, 64)]
CONV_SHAPES = [(8, 2048, 576 + 2 * 576), (8, 4096, 2048 + 2 * 2048)]  # (batch, T, channels): SmolLM2, Llama-1B
DECODE_BATCHES = (64, 256, 1024)
TRAIN_CONV_SHAPES = [(16, 1024, 576 + 2 * 576), (32, 512, 576 + 2 * 576)]  # SmolLM2's stage-3 / stage-2 micro-batches


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _ms(fn) -> float:
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def cuda_profile(fn, calls: int = 20) -> torch.profiler.profile:
    """The profiler's record (CUDA activity only) of ``calls`` calls of ``fn``, after one call to warm up."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return prof


def kernel_times(fn, calls: int = 20) -> dict[str, float]:
    """Milliseconds per call of each kernel ``fn`` launches, by name (profiler, device events only)."""
    prof = cuda_profile(fn, calls)
    return {e.key: e.device_time_total / calls / 1e3 for e in prof.key_averages() if e.device_time_total > 0}


def _gpu_ms(fn) -> float:
    """Milliseconds of GPU work per call: the summed times of its kernels. Wall time (``_ms``) also counts host time
    the GPU waits through: a sub-millisecond op whose Python and launches take longer than its kernels measures the
    host there, as on the H9 shape (in a model the host runs ahead)."""
    return sum(kernel_times(fn).values())


def _side_by_side(fns: dict, rounds: int = 3) -> dict:
    """Median time of each rival, taking turns for a few rounds and keeping each one's best round, so a clock or
    cache state that favours one round favours no rival."""
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            best[name] = min(best[name], _ms(fn))
    return best


def scan_label(batch: int, T: int, H: int, P: int, N: int) -> str:
    return f"B{batch} T{T} H{H} " + (f"D{P}" if P == N else f"P{P} N{N}")


def _scan_inputs(batch, T, H, P, device, grad=False, dtype=torch.bfloat16, N=None):
    """x (batch, T, H, P), B and C (batch, T, H, N; N = P unless given), log_a (batch, T, H)."""
    N = P if N is None else N
    x = torch.randn(batch, T, H, P, device=device, dtype=dtype)
    B = (torch.randn(batch, T, H, N, device=device) / N ** 0.5).to(dtype)
    C = (torch.randn(batch, T, H, N, device=device) / N ** 0.5).to(dtype)
    log_a = -F.softplus(torch.randn(batch, T, H, device=device))
    return [t.requires_grad_(grad) for t in (x, B, C, log_a)]


def bench_scan(device="cuda") -> list[dict]:
    """Forward (inference, as fla's forward is timed) and, for training, forward with the state snapshots kept
    for the backward, then the backward alone."""
    try:
        from fla.ops.simple_gla import chunk_simple_gla
    except ImportError as err:  # the rival is optional: report its absence rather than skip silently
        chunk_simple_gla, fla_error = None, repr(err)
    rows = []
    for batch, T, H, P, N in SCAN_SHAPES:
        x, B, C, log_a = _scan_inputs(batch, T, H, P, device, N=N)
        row = {"shape": scan_label(batch, T, H, P, N)}
        rivals = {"ours_fwd_ms": lambda: ssd_chunk_triton(x, B, C, log_a)}
        if chunk_simple_gla is not None:
            rivals["fla_fwd_ms"] = lambda: chunk_simple_gla(C, B, x, g=log_a, scale=1.0, output_final_state=True)
        with torch.no_grad():
            outputs = {name: fn()[0] for name, fn in rivals.items()}
            row.update(_side_by_side(rivals))
            row.update({name.replace("_ms", "_gpu_ms"): _gpu_ms(fn) for name, fn in rivals.items()})
        if chunk_simple_gla is not None:
            row["rel_diff_vs_fla"] = _rel(outputs["ours_fwd_ms"], outputs["fla_fwd_ms"])
            row["fla_over_ours"] = row["fla_fwd_ms"] / row["ours_fwd_ms"]
        else:
            row["fla_error"] = fla_error
        xg, Bg, Cg, lag = (t.detach().requires_grad_() for t in (x, B, C, log_a))
        train_fwd = lambda: ssd_chunk_triton(xg, Bg, Cg, lag)  # noqa: E731
        row["ours_train_fwd_ms"], row["ours_train_fwd_gpu_ms"] = _ms(train_fwd), _gpu_ms(train_fwd)
        # Backward alone: gradients of a fixed forward graph, retained between repetitions. As training runs it,
        # the loss reads y only (the final state's gradient is None); a loss that also reads the final state
        # (truncated backpropagation through time) is timed apart: that build of the kernel differs.
        yg, sg = ssd_chunk_triton(xg, Bg, Cg, lag)
        dy, ds = torch.randn_like(yg), torch.randn_like(sg)
        bwd = lambda: torch.autograd.grad(yg, (xg, Bg, Cg, lag), dy, retain_graph=True)  # noqa: E731
        bwd_final = lambda: torch.autograd.grad((yg, sg), (xg, Bg, Cg, lag), (dy, ds), retain_graph=True)  # noqa: E731
        row["ours_bwd_ms"], row["ours_bwd_gpu_ms"] = _ms(bwd), _gpu_ms(bwd)
        row["ours_bwd_with_final_gpu_ms"] = _gpu_ms(bwd_final)
        for clock in ("", "_gpu"):
            row[f"bwd_over_fwd{clock}"] = row[f"ours_bwd{clock}_ms"] / row[f"ours_fwd{clock}_ms"]
            row[f"bwd_over_train_fwd{clock}"] = row[f"ours_bwd{clock}_ms"] / row[f"ours_train_fwd{clock}_ms"]
        if "fla_fwd_gpu_ms" in row:
            row["fla_over_ours_gpu"] = row["fla_fwd_gpu_ms"] / row["ours_fwd_gpu_ms"]
        rows.append(row)
        del x, B, C, log_a, xg, Bg, Cg, lag, yg, sg, dy, ds
        torch.cuda.empty_cache()
    return rows


def bench_conv(bandwidth_gbs: float, device="cuda") -> list[dict]:
    """The prefill convolution with a padding mask, fused kernel against the PyTorch path of the mixer (mask,
    channel-major conv1d, copies that make x/B/C contiguous for the scan)."""
    rows = []
    for batch, T, channels in CONV_SHAPES:
        x_ch = channels // 3
        xBC = torch.randn(batch, T, channels, device=device, dtype=torch.bfloat16)
        w = torch.randn(channels, 1, 4, device=device, dtype=torch.bfloat16)
        bias = torch.randn(channels, device=device, dtype=torch.bfloat16)
        mask = torch.ones(batch, T, dtype=torch.long, device=device)
        mask[0, : T // 2] = 0

        def torch_path():
            keep = mask.to(xBC.dtype)[..., None]
            out, state = causal_conv(xBC * keep, w, bias)
            x = (out[..., :x_ch] * keep).contiguous()
            return x, out[..., x_ch:].contiguous(), state

        fused = lambda: causal_conv_triton(xBC, w, bias, None, mask, x_channels=x_ch)  # noqa: E731
        ref_x, ref_bc, _ = torch_path()
        out, _ = fused()
        row = {"shape": f"B{batch} T{T} ch{channels}", "rel_err": max(_rel(out[..., :x_ch], ref_x),
                                                                        _rel(out[..., x_ch:], ref_bc))}
        row.update(_side_by_side({"torch_ms": torch_path, "fused_ms": fused}))
        row["speedup"] = row["torch_ms"] / row["fused_ms"]
        row["bytes"] = 2 * xBC.nbytes + mask.nbytes  # read the input once, write the output once
        row["fused_over_bytes_floor"] = row["fused_ms"] / (row["bytes"] / (bandwidth_gbs * 1e9) * 1e3)
        rows.append(row)
    return rows


def bench_decode_step(bandwidth_gbs: float, device="cuda", heads=9, head_dim=64, d_state=64, groups=9,
                      d_model=576) -> list[dict]:
    """The fused step at the student's shapes (per layer) and batch >= 64, against bytes / measured bandwidth; and
    a GateLoop mixer's step beside it by its theta's route: projected in the kernel from u (the model's step
    today), given as a tensor (the kernel alone), or given from a float32 GEMM over the batch first (cast of u
    and the GEMM included; the weight's float32 copy kept): which one a large batch should take (docs/gateloop.md)."""
    rows = []
    d_inner = heads * head_dim
    conv_dim = d_inner + 2 * groups * d_state
    for batch in DECODE_BATCHES:
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
        step = lambda: mixer_step_triton(*args)  # noqa: E731
        row["ms"] = do_bench_cudagraph(step, rep=100, return_mode="median")
        row["launched_ms"] = _ms(step)
        moved = (2 * ssm_state.nbytes + 2 * conv_state.nbytes + xBC.nbytes + z.nbytes + A_log.nbytes
                 + batch * d_inner * 2)
        row["bytes"] = moved
        row["floor_ms"] = moved / (bandwidth_gbs * 1e9) * 1e3
        row["over_floor"] = row["ms"] / row["floor_ms"]
        torch_step = lambda: mixer_step_torch(*args)  # noqa: E731
        row["torch_ms"] = do_bench(torch_step, warmup=10, rep=50, return_mode="median")
        row.update(_gateloop_step_routes(args, batch, d_model, device))
        rows.append(row)
    return rows


def _gateloop_step_routes(args, batch: int, d_model: int, device) -> dict:
    """One GateLoop step (the args of a Discrete Mamba-2 one plus a phase) by each theta route: each checked on
    copies of the states against the float64 PyTorch step, then CUDA-graph timed."""
    xBC, z, A_log, conv_state, ssm_state, w, bias, D, z_bias, groups = args
    half = ssm_state.shape[-1] // 2
    u = torch.randn(batch, d_model, device=device, dtype=torch.bfloat16)
    t_w = (torch.randn(groups * half, d_model, device=device) / d_model ** 0.5).to(torch.bfloat16)
    t_b = torch.randn(groups * half, device=device).to(torch.bfloat16)
    t_w32, t_b32 = t_w.float(), t_b.float()  # the GEMM route would keep this copy
    phase_state = torch.rand(batch, groups, half, device=device) * 6.28 - 3.14
    theta = F.linear(u.float(), t_w32, t_b32).view(batch, groups, half)
    ref_ss, ref_cs, ref_phase = ssm_state.double(), conv_state.double(), phase_state.double()
    ref = mixer_step_torch(xBC.double(), z.double(), A_log.double(), ref_cs, ref_ss, w.double(), bias.double(),
                           D.double(), z_bias.double(), groups, phase=((u.double(), t_w.double(), t_b.double()),
                                                                       ref_phase))
    thetas = {"from_u": lambda: (u, t_w, t_b), "theta": lambda: theta,  # computed in the kernel / given
              "gemm": lambda: torch.addmm(t_b32, u.float(), t_w32.t()).view(batch, groups, half)}

    def step(name, conv, ssm, phase):
        return mixer_step_triton(xBC, z, A_log, conv, ssm, w, bias, D, z_bias, groups, phase=(thetas[name](), phase))

    row = {}
    for name in thetas:
        c, s, p = conv_state.clone(), ssm_state.clone(), phase_state.clone()
        out = step(name, c, s, p)
        row[f"gateloop_{name}_rel_err"] = max(_rel(out, ref), _rel(s, ref_ss), _rel(p, ref_phase))
    for name in thetas:
        row[f"gateloop_{name}_ms"] = do_bench_cudagraph(lambda: step(name, conv_state, ssm_state, phase_state),
                                                        rep=100, return_mode="median")
    return row


def bench_train_conv(device="cuda") -> list[dict]:
    """The training conv with document resets, forward + backward, Triton kernels against the mixer's PyTorch path
    (channel-major masked taps, then x / B / C made contiguous for the scan, as the scan needs them)."""
    rows = []
    for batch, T, channels in TRAIN_CONV_SHAPES:
        x_ch = channels // 3
        xBC = torch.randn(batch, T, channels, device=device, dtype=torch.bfloat16, requires_grad=True)
        w = torch.randn(channels, 1, 4, device=device, requires_grad=True)
        bias = torch.randn(channels, device=device, requires_grad=True)
        seq = torch.cumsum((torch.rand(batch, T, device=device) < 1 / 700).int(), 1, dtype=torch.int32)
        dout = torch.randn(batch, T, channels, device=device, dtype=torch.bfloat16)

        def torch_path():
            out, _ = causal_conv(xBC, w, bias, None, seq)
            parts = (out[..., :x_ch].contiguous(), out[..., x_ch:].contiguous())
            torch.autograd.backward(parts, (dout[..., :x_ch], dout[..., x_ch:]))

        def triton_path():
            causal_conv_train(xBC, w, bias, seq).backward(dout)

        ref = causal_conv(xBC.detach().double(), w.detach().double(), bias.detach().double(), None, seq)[0]
        row = {"shape": f"B{batch} T{T} ch{channels}",
               "rel_err": _rel(causal_conv_train(xBC.detach(), w.detach(), bias.detach(), seq), ref)}
        row.update(_side_by_side({"torch_ms": torch_path, "triton_ms": triton_path}))
        row["speedup"] = row["torch_ms"] / row["triton_ms"]
        rows.append(row)
    return rows


def bench_rotation(bandwidth_gbs: float, device="cuda") -> list[dict]:
    """GateLoop's prefill rotation of B and C by the cumulative phase (documents restarting it), the Triton kernel
    against the PyTorch route (float64 cumsum, gather, wrap, cos / sin, rotations), at the conv shapes with one group
    per head (SmolLM2: 9 groups of d_state 64)."""
    from llamba.ops.gateloop.phase import rotate_by_phase
    from llamba.ops.gateloop.triton_rotate import rotate_by_phase_triton

    rows = []
    # a served request prefills alone: at batch 1 the grid is G x N/64 programs, each walking L/32 tiles in turn
    for batch, T, channels in [(1, *CONV_SHAPES[0][1:]), *CONV_SHAPES]:
        N = 64
        G = channels // 3 // N
        xBC = torch.randn(batch, T, channels, device=device, dtype=torch.bfloat16)
        B, C = (xBC[..., channels // 3 * k:channels // 3 * (k + 1)].unflatten(-1, (G, N)) for k in (1, 2))
        theta = torch.randn(batch, T, G, N // 2, device=device)
        seq = torch.cumsum((torch.rand(batch, T, device=device) < 1 / 700).int(), 1, dtype=torch.int32)
        ref = rotate_by_phase(B.double(), C.double(), theta.double(), None, seq)
        got = rotate_by_phase_triton(B, C, theta, None, seq)
        row = {"shape": f"B{batch} T{T} G{G} N{N}", "rel_err": max(_rel(g, w) for g, w in zip(got, ref))}
        row.update(_side_by_side({"torch_ms": lambda: rotate_by_phase(B, C, theta, None, seq),
                                  "triton_ms": lambda: rotate_by_phase_triton(B, C, theta, None, seq)}))
        row["speedup"] = row["torch_ms"] / row["triton_ms"]
        row["bytes"] = 2 * (B.nbytes + C.nbytes) + theta.nbytes + seq.nbytes  # B, C read and written, theta read
        row["triton_over_bytes_floor"] = row["triton_ms"] / (row["bytes"] / (bandwidth_gbs * 1e9) * 1e3)
        rows.append(row)
    return rows


TABLES = ("scan", "conv", "train_conv", "rotation", "decode_step")


def run_all(bandwidth_gbs: float, only: tuple[str, ...] = TABLES) -> dict:
    """The kernel tables named in ``only`` (all of ``TABLES`` by default)."""
    tables = {"scan": bench_scan, "conv": lambda: bench_conv(bandwidth_gbs), "train_conv": bench_train_conv,
              "rotation": lambda: bench_rotation(bandwidth_gbs),
              "decode_step": lambda: bench_decode_step(bandwidth_gbs)}
    return {name: tables[name]() for name in only}


def to_markdown(r: dict) -> list[str]:
    lines = []
    if r.get("scan"):
        lines += ["| shape | ours fwd ms | fla chunk_simple_gla fwd ms | fla / ours | ours training fwd ms | "
                  "ours bwd ms | bwd / fwd | bwd / training fwd | rel diff vs fla |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for s in r["scan"]:
            lines.append(f"| {s['shape']} | {s['ours_fwd_ms']:.3f} | {s.get('fla_fwd_ms', float('nan')):.3f} | "
                         f"{s.get('fla_over_ours', float('nan')):.2f} | {s['ours_train_fwd_ms']:.3f} | "
                         f"{s['ours_bwd_ms']:.3f} | {s['bwd_over_fwd']:.2f} | {s['bwd_over_train_fwd']:.2f} | "
                         f"{s.get('rel_diff_vs_fla', float('nan')):.1e} |")
        if "ours_fwd_gpu_ms" in r["scan"][0]:
            lines += ["", "GPU time only, ms per call (the summed times of its kernels, from the profiler):", "",
                      "| shape | ours fwd | fla fwd | fla / ours | ours training fwd | ours bwd | bwd / fwd | "
                      "bwd / training fwd | bwd, final state in the loss |", "|---|---|---|---|---|---|---|---|---|"]
            for s in r["scan"]:
                lines.append(f"| {s['shape']} | {s['ours_fwd_gpu_ms']:.3f} | "
                             f"{s.get('fla_fwd_gpu_ms', float('nan')):.3f} | "
                             f"{s.get('fla_over_ours_gpu', float('nan')):.2f} | {s['ours_train_fwd_gpu_ms']:.3f} | "
                             f"{s['ours_bwd_gpu_ms']:.3f} | {s['bwd_over_fwd_gpu']:.2f} | "
                             f"{s['bwd_over_train_fwd_gpu']:.2f} | "
                             f"{s.get('ours_bwd_with_final_gpu_ms', float('nan')):.3f} |")
    if r.get("conv"):
        lines += ["", "| prefill conv (masked, bf16) | PyTorch path ms | fused kernel ms | speedup | fused / bytes floor |",
                  "|---|---|---|---|---|"]
        for c in r["conv"]:
            lines.append(f"| {c['shape']} | {c['torch_ms']:.3f} | {c['fused_ms']:.3f} | {c['speedup']:.2f} | "
                         f"{c['fused_over_bytes_floor']:.2f} |")
    if r.get("train_conv"):
        lines += ["", "| training conv, resets, forward + backward (bf16) | PyTorch path ms | Triton ms | speedup |",
                  "|---|---|---|---|"]
        for c in r["train_conv"]:
            lines.append(f"| {c['shape']} | {c['torch_ms']:.3f} | {c['triton_ms']:.3f} | {c['speedup']:.2f} |")
    if r.get("rotation"):
        lines += ["", "| GateLoop prefill rotation, resets (bf16 B / C) | PyTorch path ms | Triton ms | speedup | "
                  "Triton / bytes floor |", "|---|---|---|---|---|"]
        for c in r["rotation"]:
            lines.append(f"| {c['shape']} | {c['torch_ms']:.3f} | {c['triton_ms']:.3f} | {c['speedup']:.2f} | "
                         f"{c['triton_over_bytes_floor']:.2f} |")
    if not r.get("decode_step"):
        return lines
    lines += ["", "| decode step batch (H9 P64 N64) | ms (CUDA graph) | bytes floor ms | / floor | ms launched one by one "
              "| torch reference ms |", "|---|---|---|---|---|---|"]
    for s in r["decode_step"]:
        lines.append(f"| {s['batch']} | {s['ms']:.4f} | {s['floor_ms']:.4f} | {s['over_floor']:.2f} | "
                     f"{s['launched_ms']:.4f} | {s['torch_ms']:.3f} |")
    if "gateloop_from_u_ms" in r["decode_step"][0]:
        lines += ["", "GateLoop's step by its theta route, ms (CUDA graph) and over Discrete Mamba-2's step above: "
                  "theta projected in the kernel from u (the model's route) / given (the kernel alone) / from a "
                  "float32 GEMM first:", "",
                  "| batch | from u | given | GEMM + kernel | from u / DM2 | given / DM2 | GEMM / DM2 |",
                  "|---|---|---|---|---|---|---|"]
        for s in r["decode_step"]:
            ms = [s[f"gateloop_{k}_ms"] for k in ("from_u", "theta", "gemm")]
            lines.append(f"| {s['batch']} | " + " | ".join(f"{m:.4f}" for m in ms) + " | "
                         + " | ".join(f"{m / s['ms']:.2f}" for m in ms) + " |")
    return lines
