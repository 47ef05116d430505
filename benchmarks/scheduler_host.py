"""The scheduler's own host time per decode step, with nothing else: ``Scheduler._loop`` over a slot model whose step
returns at once (``serve_host_path.WaitSlots`` with a zero wait), events dropped, no HTTP, no detokenizing. What is
left of a GPU server's host share per step once the events' way out is taken away (docs/serving.md, "Known
limits").

    python benchmarks/scheduler_host.py [--rows 256] [--new-tokens 200]
"""

from __future__ import annotations

import argparse
import threading
import time

import torch

from serve_host_path import WaitSlots

from llamba.serve.scheduler import Request, Scheduler


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=256, help="requests, all running together")
    ap.add_argument("--new-tokens", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(1)
    slots = WaitSlots(args.rows, 1024, 0.0, 20)  # logits over 1,024 ids, none of them EOS (0)
    scheduler = Scheduler(slots, eos=[0], max_queue=args.rows, prefill_chunk=1 << 20)
    done = threading.Semaphore(0)

    def emit(event):
        if event.kind in ("finish", "error"):
            done.release()

    for _ in range(args.rows):
        scheduler.submit(Request([5, 6, 7], args.new_tokens, emit))
    start = time.perf_counter()
    scheduler.start()
    for _ in range(args.rows):
        done.acquire()
    seconds = time.perf_counter() - start
    scheduler.stop()
    print(f"{args.rows} rows, {scheduler.steps} steps: {seconds / scheduler.steps * 1e3:.2f} ms a step, "
          f"{seconds / (args.rows * args.new_tokens) * 1e6:.2f} us a token")


if __name__ == "__main__":
    main()
