"""What `llamba serve` costs the host per token, apart from the model: the real scheduler, app, HTTP server and
tokenizer over a slot model whose decode step is a fixed wait (a GPU step's time, in which the host is free, as
while it waits on the device) and whose logits come from a small bank, with the load generator of `llamba bench
serve` in processes of its own (`--client-processes`). Configurations run side by side in one process and the
ratios are printed.

    python benchmarks/serve_host_path.py [--tokenizer smollm2-135m] [--concurrency 256] [--step-ms 2,6]
        [--stream-intervals 1,4] [--api-processes 0,2] [--uvicorn auto,asyncio] [--client-processes 1]
        [--requests-per-client 4] [--new-tokens 64] [--prompt-tokens 128]

The two step times stand for the student's and the teacher's decode step at batch 256 and a 2048-token context on
an H200 (128k and 42k tokens/s in results/bench-h200.md: ~2 and ~6 ms): their served tokens/s ratio is what the
host path leaves of the GPU's 3x. `--api-processes` lists the layouts to compare: 0, HTTP in the model's process;
N, HTTP in N processes of its own (`llamba serve --api-processes N`). Per row: output tokens/s, the server's CPU time
per output token (all its threads, and its HTTP processes' when it has them) and the model's process's share of it
(what a single thread must do per token whatever the HTTP processes: the ceiling of the layout), busy rows per
decode step (how full the batch was), and inter-event latency p50 / p99. On a CPU the
greedy argmax over (rows, vocab) logits runs on the host too (a GPU does it on the device), so the CPU time per
token would include it; `--logits-width` (default 1024) keeps the slot model's logits that narrow, so that the
greedy argmax costs the host about what reading a GPU's argmax ids does (docs/serving.md, "The host path").
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import multiprocessing
import os
import time

import torch

from llamba.bench.serve import load_level, warm_up


class WaitSlots:
    """A slot model whose decode step waits ``step_s`` and returns one of a few whole-batch logits tensors."""

    def __init__(self, n_slots: int, vocab: int, step_s: float, special: int):
        self.n_slots, self.max_context, self.vocab_size, self.step_s = n_slots, 1 << 16, vocab, step_s
        bank = torch.randn(64, vocab, generator=torch.Generator().manual_seed(0))
        bank[:, :special] = -1e9  # no special token: every token has text
        self.bank = bank
        self.batches = [bank[(torch.arange(n_slots) + k) % 64].clone() for k in range(5)]
        self.steps = self.rows = self.prefills = 0
        self.prefill_rows = 1

    def begin(self, rows: int = 1) -> None:
        pass

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        self.prefills += 1
        return self.bank[self.prefills % 64][None]

    def join(self, slots, row: int = 0) -> None:
        pass

    def decode(self, slots, tokens) -> torch.Tensor:
        time.sleep(self.step_s)  # the device's step; the host is free meanwhile (the GIL released)
        self.steps += 1
        self.rows += len(slots)
        return self.batches[self.steps % 5][:len(slots)]

    def release(self, slot) -> None:
        pass


def cpu_seconds(server) -> tuple[float, float]:
    """CPU time of this process (the model's: scheduler, and HTTP unless it has processes of its own) and of the
    server's HTTP processes (Linux /proc: user + system ticks)."""
    http = 0.0
    for process in getattr(getattr(server, "processes", None), "processes", []):
        with open(f"/proc/{process.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        http += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return time.process_time(), http


UVICORN = {"auto": {}, "asyncio": {"loop": "asyncio", "http": "h11"}}  # auto: uvloop + httptools when installed


def measure(tokenizer, step_s: float, interval: int, api_processes: int, uvicorn: str, args, pool) -> dict:
    from llamba.serve.server import Served, background_server

    c = args.concurrency
    special = max(tokenizer.all_special_ids, default=0) + 1
    # logits over the first `logits_width` ids (all but the specials have text): a full-vocabulary argmax on this
    # CPU (~4 ms for 256 x 49,152) would stand in for work the GPU does on the device during its step
    slots = WaitSlots(c, min(args.logits_width, len(tokenizer)), step_s, special)
    served = Served(slots, tokenizer, "wait", slots.max_context)
    with background_server(served, max_queue=c * args.requests_per_client, prefill_chunk=args.prefill_chunk,
                           default_max_tokens=args.new_tokens, stream_interval=interval,
                           api_processes=api_processes, uvicorn_options=UVICORN[uvicorn]) as server:
        clients = {"pool": pool, "processes": args.client_processes}
        asyncio.run(warm_up(server.url, "wait", c, args.prompt_tokens, args.new_tokens, slots.vocab_size, **clients))
        steps, rows, cpu = slots.steps, slots.rows, cpu_seconds(server)
        level = asyncio.run(load_level(server.url, "wait", c, args.requests_per_client, args.prompt_tokens,
                                       args.new_tokens, slots.vocab_size, seed=c, **clients))
        after = cpu_seconds(server)
    assert level["failed"] == 0, level["errors"]
    model_s, http_s = after[0] - cpu[0], after[1] - cpu[1]
    return {"step_ms": step_s * 1e3, "interval": interval, "api": api_processes, "uvicorn": uvicorn,
            "tok_s": level["output_tokens_per_s"],
            "cpu_us_per_token": (model_s + http_s) / level["output_tokens"] * 1e6,
            "model_us_per_token": model_s / level["output_tokens"] * 1e6,
            "rows_per_step": (slots.rows - rows) / max(1, slots.steps - steps),
            "itl_p50_ms": level["itl_p50_ms"], "itl_p99_ms": level["itl_p99_ms"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", default="smollm2-135m", help="a teacher name or folder with tokenizer files")
    ap.add_argument("--concurrency", type=int, default=256)
    ap.add_argument("--step-ms", default="2,6", help="decode step times (ms): the student's, the teacher's")
    ap.add_argument("--stream-intervals", default="1,4")
    ap.add_argument("--api-processes", default="0,2", help="layouts: HTTP processes beside the model's (0: none)")
    ap.add_argument("--client-processes", type=int, default=1, help="load-generator processes")
    ap.add_argument("--uvicorn", default="auto", help="uvicorn's event loop and HTTP parser, a list: auto (uvloop and "
                    "httptools when installed: uvicorn[standard]) and/or asyncio (asyncio and h11)")
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
    layouts = [int(n) for n in args.api_processes.split(",")]
    kinds = args.uvicorn.split(",")
    if not set(kinds) <= set(UVICORN):
        ap.error(f"--uvicorn: choose from {', '.join(UVICORN)}")
    spawn = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(args.client_processes, mp_context=spawn) as pool:
        rows = [measure(tokenizer, s, k, n, u, args, pool) for u in kinds for n in layouts for k in intervals
                for s in steps]
    print(f"concurrency {args.concurrency} ({args.client_processes} load-generator processes), "
          f"{args.requests_per_client} requests per client, prompt "
          f"{args.prompt_tokens}, {args.new_tokens} new tokens, prefill chunk {args.prefill_chunk}, logits over "
          f"{args.logits_width} ids")
    print("| uvicorn | HTTP processes | step ms | stream interval | output tok/s | server CPU us/token | of it the "
          "model's process | busy rows/step | ITL p50 ms | ITL p99 ms | tok/s vs GPU-bound |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        gpu_bound = args.concurrency / (r["step_ms"] / 1e3)  # every slot busy, the host free: one token per step
        print(f"| {r['uvicorn']} | {r['api']} | {r['step_ms']:.0f} | {r['interval']} | {r['tok_s']:.0f} | "
              f"{r['cpu_us_per_token']:.1f} | {r['model_us_per_token']:.1f} | {r['rows_per_step']:.0f} | "
              f"{r['itl_p50_ms']:.2f} | {r['itl_p99_ms']:.2f} | {r['tok_s'] / gpu_bound:.2f} |")

    def tok_s(u, n, k, s):
        return next(r["tok_s"] for r in rows
                    if r["uvicorn"] == u and r["api"] == n and r["interval"] == k and r["step_ms"] == s * 1e3)

    for u in kinds:
        for n in layouts:
            for k in intervals:
                where = f"uvicorn {u}, {n} HTTP processes, stream interval {k}"
                if len(steps) == 2:
                    a, b = tok_s(u, n, k, steps[0]), tok_s(u, n, k, steps[1])
                    print(f"{where}: served tok/s at {steps[0] * 1e3:.0f} ms / at {steps[1] * 1e3:.0f} ms = "
                          f"{a / b:.2f} (the steps alone: {steps[1] / steps[0]:.2f})")
                rivals = [(f"{layouts[0]} HTTP processes", u, layouts[0])] if n != layouts[0] else []
                rivals += [(f"uvicorn {kinds[0]}", kinds[0], n)] if u != kinds[0] else []
                for label, ru, rn in rivals:
                    print(f"{where} against {label}: " + ", ".join(
                        f"{tok_s(u, n, k, s) / tok_s(ru, rn, k, s):.2f}x at {s * 1e3:.0f} ms" for s in steps))

if __name__ == "__main__":
    main()
