"""The CPU runtime's batched step against one step per cache, side by side in one process.

    python benchmarks/cpu_batch_step.py MODEL [--batches 1,4,16] [--threads 2] [--rounds 5] [--steps 6]

MODEL: a `llamba quantize` artifact or a student folder (quantized on load with --quant). For each batch size,
caches prefilled with 8 random tokens take ``--steps`` decode steps through ``CpuDecoder.step_batch`` (one C call
for all of them) and through ``CpuDecoder.step`` once per cache, interleaved over ``--rounds``; prints the median
ms per step of each and the ratio (what docs/execution.md quotes).
"""

import argparse
import statistics
import time

import torch

from llamba.quant import load_for_cpu


def timed(fn, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--quant", default=None, help="for a student folder: none, int8 or int4")
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    decoder = load_for_cpu(args.model, args.quant, threads=args.threads)
    g = torch.Generator().manual_seed(0)
    print(f"{args.model}, {args.threads} threads, median of {args.rounds} interleaved rounds of {args.steps} steps")
    for n in (int(b) for b in args.batches.split(",")):
        caches = [decoder.new_cache() for _ in range(n)]
        for cache in caches:
            decoder.prefill(torch.randint(0, decoder.config.vocab_size, (1, 8), generator=g), cache=cache)
        tokens = torch.randint(0, decoder.config.vocab_size, (n,), generator=g).tolist()

        def batched():
            decoder.step_batch(tokens, caches)

        def one_by_one():
            for token, cache in zip(tokens, caches):
                decoder.step(token, cache=cache)

        batched()  # warm-up
        together, apart = [], []
        for _ in range(args.rounds):
            together.append(timed(batched, args.steps))
            apart.append(timed(one_by_one, args.steps))
        b, s = statistics.median(together), statistics.median(apart)
        print(f"batch {n:4d}: step_batch {1e3 * b:7.1f} ms ({n / b:6.0f} tok/s) | step per cache {1e3 * s:7.1f} ms "
              f"({n / s:6.0f} tok/s) | {s / b:.2f}x")


if __name__ == "__main__":
    main()
