"""What `llamba serve` costs the host per token, apart from the model: the real scheduler, app, HTTP server and
tokenizer over a slot model whose decode step is a fixed wait (a GPU step's time, in which the host is free, as
while it waits on the device) and whose logits come from a small bank, with the load generator of `llamba bench
serve` in a process of its own. Configurations run side by side in one process and the ratios are printed.

    python benchmarks/serve_host_path.py [--tokenizer smollm2-135m] [--concurrency 256] [--step-ms 2,6]
        [--stream-intervals 1,4] [--requests-per-client 4] [--new-tokens 64] [--prompt-tokens 128]

The two step times stand for the student's and the teacher's decode step at batch 256 and a 2048-token context on
an H200 (128k and 42k tokens/s in results/bench-h200.md: ~2 and ~6 ms): their served tokens/s ratio is what the
host path leaves of the GPU's 3x. Per row: output tokens/s, the server process's CPU time per output token (all
its threads), busy rows per decode step (how full the batch was), and inter-event latency p50 / p99. On a CPU the
greedy argmax over (rows, vocab) logits runs on the host too (a GPU does it on the device), so the CPU time per
token would include it; `--logits-width` (default 1024) keeps the slot model's logits that narrow, so that the
greedy argmax costs the host about what reading a GPU's argmax ids does (docs/serving.md, "The host path").
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import multiprocessing
import time

import torch

from llamba.bench.serve import load_level


class WaitSlots:
    """A slot model whose decode step waits ``step_s`` and returns one of a few whole-batch logits tensors."""

    def __init__(self, n_slots: int, vocab: int, step_s: float, special: int):
        self.n_slots, self.max_context, self.vocab_size, self.step_s = n_slots, 1 << 16, vocab, step_s
        bank = torch.randn(64, vocab, generator=torch.Generator().manual_seed(0))
        bank[:, :special] = -1e9  # no special token: every token has text
        self.bank = bank
        self.batches = [bank[(torch.arange(n_slots) + k) % 64].clone() for k in range(5)]
        self.steps = self.rows = self.prefills = 0

    def begin(self) -> None:
        pass

    def prefill(self, piece: torch.Tensor) -> torch.Tensor:
        self.prefills += 1
        return self.bank[self.prefills % 64]

    def join(self, slots) -> None:
        pass

    def decode(self, slots, tokens) -> torch.Tensor:
        time.sleep(self.step_s)  # the device's step; the host is free meanwhile (the GIL released)
        self.steps += 1
        self.rows += len(slots)
        return self.batches[self.steps % 5][:len(slots)]

    def release(self, slot) -> None:
        pass


def run_level(*args, **kwargs) -> dict:  # in the load generator's process
    from llamba.bench.serve import raise_open_files

    raise_open_files(4 * args[2] + 256)
    return asyncio.run(load_level(*args, **kwargs))


def measure(tokenizer, step_s: float, interval: int, args, pool) -> dict:
    from llamba.serve.server import BackgroundServer, Served, build_app

    c = args.concurrency
    special = max(tokenizer.all_special_ids, default=0) + 1
    # logits over the first `logits_width` ids (all but the specials have text): a full-vocabulary argmax on this
    # CPU (~4 ms for 256 x 49,152) would stand in for work the GPU does on the device during its step
    slots = WaitSlots(c, min(args.logits_width, len(tokenizer)), step_s, special)
    app = build_app(Served(slots, tokenizer, "wait", slots.max_context), max_queue=c * args.requests_per_client,
                    prefill_chunk=args.prefill_chunk, default_max_tokens=args.new_tokens, stream_interval=interval)
    with BackgroundServer(app) as server:
        pool.submit(run_level, server.url, "wait", 1, 1, args.prompt_tokens, args.new_tokens, slots.vocab_size).result()
        steps, rows, cpu = slots.steps, slots.rows, time.process_time()
        level = pool.submit(run_level, server.url, "wait", c, args.requests_per_client, args.prompt_tokens,
                            args.new_tokens, slots.vocab_size, seed=c).result()
        cpu = time.process_time() - cpu
    assert level["failed"] == 0, level["errors"]
    return {"step_ms": step_s * 1e3, "interval": interval, "tok_s": level["output_tokens_per_s"],
            "cpu_us_per_token": cpu / level["output_tokens"] * 1e6,
            "rows_per_step": (slots.rows - rows) / max(1, slots.steps - steps),
            "itl_p50_ms": level["itl_p50_ms"], "itl_p99_ms": level["itl_p99_ms"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", default="smollm2-135m", help="a teacher name or folder with tokenizer files")
    ap.add_argument("--concurrency", type=int, default=256)
    ap.add_argument("--step-ms", default="2,6", help="decode step times (ms): the student's, the teacher's")
    ap.add_argument("--stream-intervals", default="1,4")
    ap.add_argument("--requests-per-client", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--prefill-chunk", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the server (the host argmax)")
    ap.add_argument("--logits-width", type=int, default=1024,
                    help="the slot model's logits cover this many token ids (the tokenizer's size: a host argmax "
                         "over the whole vocabulary, as on a CPU)")
    args = ap.parse_args()
    from llamba.teacher import load_tokenizer

    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(args.tokenizer)
    steps = [float(s) / 1e3 for s in args.step_ms.split(",")]
    intervals = [int(k) for k in args.stream_intervals.split(",")]
    spawn = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as pool:
        rows = [measure(tokenizer, s, k, args, pool) for k in intervals for s in steps]
    print(f"concurrency {args.concurrency}, {args.requests_per_client} requests per client, prompt "
          f"{args.prompt_tokens}, {args.new_tokens} new tokens, prefill chunk {args.prefill_chunk}, logits over "
          f"{args.logits_width} ids")
    print("| step ms | stream interval | output tok/s | server CPU us/token | busy rows/step | ITL p50 ms | "
          "ITL p99 ms | tok/s vs GPU-bound |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        gpu_bound = args.concurrency / (r["step_ms"] / 1e3)  # every slot busy, the host free: one token per step
        print(f"| {r['step_ms']:.0f} | {r['interval']} | {r['tok_s']:.0f} | {r['cpu_us_per_token']:.1f} | "
              f"{r['rows_per_step']:.0f} | {r['itl_p50_ms']:.2f} | {r['itl_p99_ms']:.2f} | "
              f"{r['tok_s'] / gpu_bound:.2f} |")
    if len(steps) == 2:
        for k in intervals:
            a, b = (next(r["tok_s"] for r in rows if r["interval"] == k and r["step_ms"] == s * 1e3) for s in steps)
            print(f"stream interval {k}: served tok/s at {steps[0] * 1e3:.0f} ms / at {steps[1] * 1e3:.0f} ms = "
                  f"{a / b:.2f} (the steps alone: {steps[1] / steps[0]:.2f})")


if __name__ == "__main__":
    main()
