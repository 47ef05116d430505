"""The scan's two backward kernels side by side on one GPU, over launch settings: the reversed state pass plus
small programs per chunk ("chunk") and one reversed pass per head and P tile with the state gradient in registers
("fused"; past one P tile it leaves dB and dC to the per-chunk programs), and past one P tile the fused pass
holding all of P ("fused_all_p": the whole state gradient in one program's registers, which spills) and the same
pass as a CUDA kernel whose block holds it ("cuda": ``llamba/ops/ssd/cuda_backward.cu``), every result
checked against the chunk kernel's gradients first. For each kernel-table shape it prints our forward (inference and training), each
variant's time, where each variant's time goes (per kernel, profiler) and the registers of every build: the data
behind ``LAUNCH`` and the fused/chunk dispatch in ``llamba.ops.ssd.triton_chunk``. Writes JSON.

    python benchmarks/scan_backward.py --out results/scan-backward-h100
    TRITON_INTERPRET=1 python benchmarks/scan_backward.py --smoke     # CPU: checks the script, times nothing
"""

import argparse
import json
import time

import torch
import triton
from triton.testing import do_bench

from llamba.bench import report
from llamba.bench.kernels import SCAN_SHAPES, _rel, _scan_inputs, kernel_times, scan_label
from llamba.ops.ssd import cuda_backward, triton_chunk as tc

LAUNCHES = {"chunk": {"backward": [(4, 2), (4, 3), (8, 2)]},
            "fused": {"fused_backward": [(4, 2), (4, 3), (8, 3)]},
            "fused_all_p": {"fused_backward": [(8, 1), (8, 2)]},
            "cuda": {"cuda_backward": [(8, 1)]}}  # fixed in cuda_backward.cu: 8 warps, one block per SM
FUSED_MIN = {"chunk": 1 << 30, "fused": 0, "fused_all_p": 0, "cuda": 0}  # the dispatch's threshold, forcing one backward


def all_p_tiles(P: int, N: int, dtype: torch.dtype) -> tuple[int, int]:
    """``_fused_tiles`` widened to all of P: one program per head holds the whole state gradient."""
    return tc._tile(P), tc._tile(N)


FUSED_TILES = tc._fused_tiles
SMOKE = False  # --smoke: tiny shapes on the CPU under TRITON_INTERPRET=1, one call each, to check the script


def ms(fn) -> float:
    if SMOKE:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    return do_bench(fn, warmup=10, rep=60, return_mode="median")


def kernel_us(fn) -> dict:
    """GPU microseconds per call of every kernel ``fn`` launches (where the backward's time goes)."""
    return {} if SMOKE else {name[:60]: round(ms * 1e3, 1) for name, ms in kernel_times(fn, calls=5).items()}


def registers() -> dict:
    """(warps, stages, registers, spilled) of every compiled backward kernel."""
    found = {}
    if SMOKE:
        return found
    for name in ("_chunk_backward_kernel", "_fused_backward_kernel"):
        for kernel in getattr(tc, name).device_caches[torch.cuda.current_device()][0].values():
            kernel._init_handles()
            found.setdefault(name, []).append((kernel.metadata.num_warps, kernel.metadata.num_stages,
                                               kernel.n_regs, kernel.n_spills))
    return found


def autograd_ms(x, B, C, la, dy) -> float:
    """The backward as training runs it (autograd, conversions included, the loss on y alone), as bench_kernels.py
    times it."""
    xg, Bg, Cg, lag = (t.detach().requires_grad_() for t in (x, B, C, la))
    y, _ = tc.ssd_chunk_triton(xg, Bg, Cg, lag)
    return ms(lambda: torch.autograd.grad(y, (xg, Bg, Cg, lag), dy, retain_graph=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="scan-backward", help="output path without .json")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    global SMOKE
    SMOKE = args.smoke
    dev, dtype = ("cpu", torch.float32) if SMOKE else ("cuda", torch.bfloat16)
    rows = []
    for batch, T, H, P, N in [(1, 130, 2, 64, 64), (1, 64, 1, 128, 128)] if SMOKE else SCAN_SHAPES:
        torch.manual_seed(0)
        x, B, C, la = _scan_inputs(batch, T, H, P, dev, dtype=dtype, N=N)
        dy = torch.randn_like(x)
        row = {"shape": scan_label(batch, T, H, P, N)}
        with torch.no_grad():
            row["fwd_ms"] = ms(lambda: tc.ssd_chunk_triton(x, B, C, la))
        row["train_fwd_ms"] = ms(lambda: tc._forward(x, B, C, la, None, None, keep_states=True))
        _, _, states = tc._forward(x, B, C, la, None, None, keep_states=True)
        n_chunks = triton.cdiv(T, tc.BT)
        cs = tc._chunk_cumsum(la, n_chunks)  # what the reversed state pass reads of the log-decay
        row["reverse_states_ms"] = ms(lambda: tc._chunk_states(dy, C, cs, None, None, n_chunks, H, 1, True))
        bwd = lambda: tc._backward(x, B, C, la, None, states, dy, None, None, False)  # noqa: E731
        tc.FUSED_MIN_PROGRAMS_PER_SM = FUSED_MIN["chunk"]
        reference = bwd()
        for mode, launches in LAUNCHES.items():
            if mode == "fused_all_p" and FUSED_TILES(P, N, dtype)[0] >= P:
                continue  # the fused pass already holds all of P
            if mode == "cuda" and not cuda_backward.supports(x, B, C, dy, states, 1):
                continue
            tc.FUSED_MIN_PROGRAMS_PER_SM = FUSED_MIN[mode]
            tc._fused_tiles = all_p_tiles if mode == "fused_all_p" else FUSED_TILES
            tc.CUDA_BACKWARD = "always" if mode == "cuda" else "never"
            for key, settings in launches.items():
                for warps, stages in settings:
                    before = tc.LAUNCH[key]
                    tc.LAUNCH[key] = dict(num_warps=warps, num_stages=stages)
                    err = max(_rel(g, r) for g, r in zip(bwd(), reference))
                    row[f"{mode} {key} w{warps} s{stages}"] = {"ms": ms(bwd), "rel_err": err}
                    tc.LAUNCH[key] = before
            best_key = min((k for k in row if k.startswith(mode + " ")), key=lambda k: row[k]["ms"], default=None)
            if best_key is not None:
                key = next(iter(launches))
                warps, stages = (int(v[1:]) for v in best_key.split()[-2:])
                before = tc.LAUNCH[key]
                tc.LAUNCH[key] = dict(num_warps=warps, num_stages=stages)
                row[f"{mode} kernels us"] = kernel_us(bwd)
                tc.LAUNCH[key] = before
        tc.FUSED_MIN_PROGRAMS_PER_SM, tc._fused_tiles, tc.CUDA_BACKWARD = 1, FUSED_TILES, "wide"
        row["autograd bwd ms (default launch)"] = autograd_ms(x, B, C, la, dy)
        timed = {k: v["ms"] for k, v in row.items() if isinstance(v, dict) and "ms" in v}
        row["best"] = min(timed, key=timed.get)
        row["best_over_fwd"] = timed[row["best"]] / row["fwd_ms"]
        row["best_over_train_fwd"] = timed[row["best"]] / row["train_fwd_ms"]
        rows.append(row)
        print(json.dumps(row, indent=1), flush=True)
        del x, B, C, la, dy, states, reference
        torch.cuda.empty_cache()
    result = {**report.provenance(), "rows": rows, "registers": registers()}
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    for row in rows:
        print(f"{row['shape']}: fwd {row['fwd_ms']:.3f} ms, best backward {row['best']} "
              f"{row[row['best']]['ms']:.3f} ms = {row['best_over_fwd']:.2f}x fwd "
              f"({row['best_over_train_fwd']:.2f}x training fwd)")
    print(json.dumps(result["registers"]))


if __name__ == "__main__":
    main()
