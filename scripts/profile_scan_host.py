"""Where the chunked scan's host time goes, on the GPU. At small shapes (the SmolLM2 student's mixer: B8 T2048 H9
D64) the scan's wall time is the host's: Python, autograd and kernel launches take longer than the kernels. For the
forward with autograd and for the backward this prints the host milliseconds per call (the Python call itself,
nothing waits for the GPU), the GPU milliseconds per call (profiler) and cProfile's heaviest functions.

    python scripts/profile_scan_host.py [--shape 8 2048 9 64] [--top 25]
"""

import argparse
import cProfile
import pstats
import time

import torch

from llamba.bench.kernels import _scan_inputs, kernel_times
from llamba.ops.ssd.triton_chunk import ssd_chunk_triton


def host_ms(fn, calls: int = 200) -> float:
    """Milliseconds of host time per call: the GPU is idle-waited before, and the calls queue under its queue size."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - start) / calls * 1e3
    torch.cuda.synchronize()
    return host


def profile(name: str, fn, top: int) -> None:
    gpu = sum(kernel_times(fn).values())
    print(f"\n## {name}: host {host_ms(fn):.3f} ms per call, GPU {gpu:.3f} ms per call\n")
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(100):
        fn()
    profiler.disable()
    torch.cuda.synchronize()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(top)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=4, default=[8, 2048, 9, 64], metavar=("B", "T", "H", "D"))
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    x, B, C, la = _scan_inputs(*args.shape, "cuda", grad=True)
    y, s = ssd_chunk_triton(x, B, C, la)
    dy, ds = torch.randn_like(y), torch.zeros_like(s)
    batch, T, H, D = args.shape
    print(f"shape B{batch} T{T} H{H} D{D}, bf16, {torch.cuda.get_device_name()}")
    profile("forward (autograd, snapshots kept)", lambda: ssd_chunk_triton(x, B, C, la), args.top)
    profile("backward (autograd)", lambda: torch.autograd.grad((y, s), (x, B, C, la), (dy, ds), retain_graph=True),
            args.top)


if __name__ == "__main__":
    main()
