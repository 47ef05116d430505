"""``llamba bench serve``: ``llamba serve`` under load, on loopback, for the student and then the teacher served
through the same server (same scheduler, same HTTP path; only the slot model differs).

At each concurrency c, c clients each send ``requests_per_client`` streaming completions back to back (random
token-id prompts of ``prompt_tokens``, exactly ``new_tokens`` new tokens: greedy with no EOS stop is not
guaranteed, so the prompt is random and the count comes from the usage chunk). Measured per level: output
tokens/s over the level's wall time, time to first token (request sent -> first text event) and inter-token
latency (gaps between a stream's text events) at p50 / p99. A request that fails (an error status, an error
event, a stream that ends without its finish) is counted, not raised, so that a level reports what was dropped;
the file closes with issue 24's bars, read off the measured levels. The client speaks HTTP/1.1 over asyncio
streams itself: a client library's per-request overhead would be measured as the server's.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import multiprocessing
import random
import resource
import statistics
import time
from urllib.parse import urlparse

DEFAULT_CONCURRENCY = [1, 16, 64, 256, 1024]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


async def stream_one(host: str, port: int, body: dict) -> dict:
    """One streaming completion; returns its first-token time, its inter-token gaps and its token count."""
    data = json.dumps({**body, "stream": True, "stream_options": {"include_usage": True}}).encode()
    sent = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                 b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data))
    await writer.drain()
    status = await reader.readline()
    if b" 200 " not in status:
        rest = await reader.read()
        writer.close()
        raise RuntimeError(f"the server answered {status.decode().strip()}: {rest[-300:].decode(errors='replace')}")
    times, tokens, finish, done = [], 0, None, False
    while line := await reader.readline():  # chunked framing lines are skipped: only "data: " lines matter
        if not line.startswith(b"data: "):
            continue
        if line.startswith(b"data: [DONE]"):
            done = True
            break
        event = json.loads(line[6:])
        if "error" in event:
            raise RuntimeError(f"the stream failed: {event['error']['message']}")
        if event.get("usage"):
            tokens = event["usage"]["completion_tokens"]
        elif event["choices"]:
            finish = event["choices"][0].get("finish_reason") or finish
            if event["choices"][0]["text"]:
                times.append(time.perf_counter())
    writer.close()
    if not (done and finish):
        raise RuntimeError("a stream ended before its finish_reason and [DONE]")
    if not times:  # a model whose every token is a special one (NaN logits fail the request in the server)
        raise RuntimeError(f"a stream ended without any text ({tokens} tokens, finish_reason {finish!r})")
    return {"ttft": times[0] - sent, "gaps": [b - a for a, b in zip(times, times[1:])], "tokens": tokens,
            "finish": finish}


async def _run_clients(url: str, model: str, clients: int, requests_per_client: int, prompt_tokens: int,
                       new_tokens: int, vocab: int, seed) -> dict:
    """``clients`` clients' requests in this process: each request's result, the errors, and when it all ran."""
    u = urlparse(url)
    rng = random.Random(seed)

    def body() -> dict:
        return {"model": model, "prompt": [rng.randrange(2, vocab) for _ in range(prompt_tokens)],
                "max_tokens": new_tokens, "temperature": 0}

    errors: list[str] = []

    async def client() -> list[dict]:
        results = []
        for _ in range(requests_per_client):
            try:
                results.append(await stream_one(u.hostname, u.port, body()))
            except (OSError, RuntimeError, ValueError) as err:  # refused, dropped, or answered with an error
                errors.append(f"{type(err).__name__}: {err}")
        return results

    start = time.perf_counter()  # CLOCK_MONOTONIC: comparable between the processes of one machine
    results = [r for rs in await asyncio.gather(*(client() for _ in range(clients))) for r in rs]
    return {"results": results, "errors": errors, "start": start, "end": time.perf_counter()}


async def warm_up(url: str, model: str, concurrency: int, prompt_tokens: int, new_tokens: int, vocab: int,
                  **clients) -> None:
    """Before the levels: the first steps pay for lazy initialisation (and on CUDA, kernel compilation); a few
    clients at once, since a fresh HTTP process's first concurrent requests run slower than its later ones."""
    await load_level(url, model, min(16, concurrency), 1, prompt_tokens, new_tokens, vocab, **clients)


def _client_process(*args) -> dict:  # a load-generator process's share of a level
    raise_open_files(4 * args[2] + 256)
    return asyncio.run(_run_clients(*args))


async def load_level(url: str, model: str, concurrency: int, requests_per_client: int, prompt_tokens: int,
                     new_tokens: int, vocab: int, seed: int = 0, pool=None, processes: int = 1) -> dict:
    """One level: ``concurrency`` clients, in this process, or spread over ``processes`` processes of ``pool``
    (a ``ProcessPoolExecutor``): one process parsing every stream's events would be measured as the server's
    limit at a GPU's rate."""
    args = (url, model, concurrency, requests_per_client, prompt_tokens, new_tokens, vocab)
    if pool is None:
        shards = [await _run_clients(*args, seed)]
    else:
        loop = asyncio.get_running_loop()
        counts = [concurrency // processes + (i < concurrency % processes) for i in range(processes)]
        shards = await asyncio.gather(*(loop.run_in_executor(pool, _client_process, *args[:2], n, *args[3:],
                                                             seed * processes + i)
                                      for i, n in enumerate(counts) if n))
    results = [r for shard in shards for r in shard["results"]]
    errors = [e for shard in shards for e in shard["errors"]]
    wall = max(shard["end"] for shard in shards) - min(shard["start"] for shard in shards)
    if not results:
        raise RuntimeError(f"every request at concurrency {concurrency} failed, e.g. {errors[0]}")
    ttft = [r["ttft"] for r in results]
    gaps = [g for r in results for g in r["gaps"]]
    tokens = sum(r["tokens"] for r in results)
    return {"concurrency": concurrency, "requests": len(results) + len(errors), "failed": len(errors),
            "errors": sorted(set(errors))[:5], "finished_by_length": sum(r["finish"] == "length" for r in results),
            "output_tokens": tokens, "seconds": wall,
            "output_tokens_per_s": tokens / wall, "ttft_p50_ms": 1e3 * percentile(ttft, 50),
            "ttft_p99_ms": 1e3 * percentile(ttft, 99), "itl_p50_ms": 1e3 * percentile(gaps, 50),
            "itl_p99_ms": 1e3 * percentile(gaps, 99), "ttft_mean_ms": 1e3 * statistics.fmean(ttft)}


def raise_open_files(needed: int) -> None:
    """Client and server ends of every connection are file descriptors of this process: 1024 clients need more
    than the usual soft limit of 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, needed))
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    if want < needed:
        raise ValueError(f"{needed} open files are needed for this concurrency, the hard limit is {hard}; "
                         "raise it (ulimit -n) or lower --concurrency")


def bench_system(label: str, model_path: str, args, pool=None) -> dict:
    """One system's levels, the clients in ``args.client_processes`` processes of ``pool``. A failure (loading it,
    or a level whose every request failed) ends this system's run with an ``error``; the levels it measured are kept
    and the next system still runs (a GPU run once lost a student's four minutes of levels to the teacher's failure
    after them)."""
    from llamba.serve.server import background_server, load_served

    top = max(args.concurrency)
    system = {"model": model_path, "slots": args.max_batch or top, "levels": []}
    try:
        served = load_served(model_path, system["slots"], args.prompt_tokens + args.new_tokens, args.device, "auto",
                             threads=args.threads, name=label, prefill_rows=args.prefill_rows,
                             compile=False if args.no_compile else None)
        system["kind"] = type(served.slots).__name__
        with background_server(served, max_queue=top * args.requests_per_client, prefill_chunk=args.prefill_chunk,
                               default_max_tokens=args.new_tokens, stream_interval=args.stream_interval,
                               api_processes=args.api_processes) as server:
            clients = {"pool": pool, "processes": args.client_processes}
            asyncio.run(warm_up(server.url, label, top, args.prompt_tokens, args.new_tokens, served.slots.vocab_size,
                                **clients))
            for c in args.concurrency:
                level = asyncio.run(load_level(server.url, label, c, args.requests_per_client, args.prompt_tokens,
                                               args.new_tokens, served.slots.vocab_size, seed=c, **clients))
                print(f"  {label} c={c}: {level['output_tokens_per_s']:.1f} tok/s, TTFT p50 "
                      f"{level['ttft_p50_ms']:.1f} ms, ITL p50 {level['itl_p50_ms']:.2f} / p99 "
                      f"{level['itl_p99_ms']:.2f} ms"
                      + (f", {level['failed']} FAILED: {level['errors'][0]}" if level["failed"] else ""), flush=True)
                system["levels"].append(level)
    except Exception as err:  # noqa: BLE001 -- recorded in the result, and the command exits non-zero
        system["error"] = f"{type(err).__name__}: {err}"
        print(f"  {label} FAILED: {system['error']}", flush=True)
    except KeyboardInterrupt:  # a time limit's SIGINT (serve_bench.sh): the levels measured so far are written
        system["error"] = system["interrupted"] = "interrupted (SIGINT) during the next level"
        print(f"  {label} interrupted: writing the levels measured so far", flush=True)
    return system


def table(systems: dict) -> str:
    rows = ["| system | concurrency | requests | failed | output tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | "
            "ITL p99 ms |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, s in systems.items():
        for lv in s["levels"]:
            rows.append(f"| {name} | {lv['concurrency']} | {lv['requests']} | {lv['failed']} | "
                        f"{lv['output_tokens_per_s']:.1f} | "
                        f"{lv['ttft_p50_ms']:.1f} | {lv['ttft_p99_ms']:.1f} | {lv['itl_p50_ms']:.2f} | "
                        f"{lv['itl_p99_ms']:.2f} |")
    return "\n".join(rows)


def bars(systems: dict, throughput_at: int = 256, latency_at: int = 64) -> list[dict]:
    """Issue 24's bars, each read off the measured levels when they were run: the student's output tokens/s at
    concurrency ``throughput_at`` >= 3x the teacher's; the student's p99 inter-token latency at ``latency_at`` <= 2x
    its own at concurrency 1; no request failed."""
    def level(system: str, c: int) -> dict | None:
        return next((lv for lv in systems.get(system, {}).get("levels", []) if lv["concurrency"] == c), None)

    out = []
    s, t = level("student", throughput_at), level("teacher", throughput_at)
    if s and t:
        ratio = s["output_tokens_per_s"] / t["output_tokens_per_s"]
        out.append({"bar": f"student / teacher output tok/s at concurrency {throughput_at}", "value": ratio,
                    "target": ">= 3", "met": ratio >= 3})
    one, loaded = level("student", 1), level("student", latency_at)
    if one and loaded:
        ratio = loaded["itl_p99_ms"] / one["itl_p99_ms"]
        out.append({"bar": f"student p99 ITL at concurrency {latency_at} / at concurrency 1", "value": ratio,
                    "target": "<= 2", "met": ratio <= 2})
    failed = sum(lv["failed"] for sys in systems.values() for lv in sys["levels"])
    out.append({"bar": "requests failed or dropped, all levels", "value": failed, "target": "0", "met": failed == 0})
    for name, system in systems.items():
        if "error" in system:
            out.append({"bar": f"{name} ran every level", "value": system["error"], "target": "no error",
                        "met": False})
    return out


def bars_table(rows: list[dict]) -> str:
    lines = ["| bar | measured | target | met |", "|---|---:|---|---|"]
    for r in rows:
        value = f"{r['value']:.2f}" if isinstance(r["value"], float) else str(r["value"])
        lines.append(f"| {r['bar']} | {value} | {r['target']} | {'yes' if r['met'] else '**no**'} |")
    return "\n".join(lines)


def main(args) -> dict:
    from llamba.bench import report

    if args.model is None:
        raise ValueError("llamba bench serve needs --model (a student checkpoint or artifact); --teacher adds the "
                         "teacher, served the same way")
    raise_open_files(4 * max(args.concurrency) + 256)
    # the load generator in processes of its own: in the server's process it would share the scheduler's GIL
    with concurrent.futures.ProcessPoolExecutor(args.client_processes,
                                                mp_context=multiprocessing.get_context("spawn")) as pool:
        systems = {"student": bench_system("student", args.model, args, pool)}
        if args.teacher and "interrupted" not in systems["student"]:
            systems["teacher"] = bench_system("teacher", args.teacher, args, pool)
        pool.shutdown(cancel_futures=True)
    result = {**report.provenance(), "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
              "requests_per_client": args.requests_per_client, "prefill_chunk": args.prefill_chunk,
              "prefill_rows": args.prefill_rows, "no_compile": args.no_compile,
              "stream_interval": args.stream_interval, "api_processes": args.api_processes,
              "client_processes": args.client_processes,
              "systems": systems, "bars": bars(systems)}
    notes = (f"loopback HTTP, streaming completions: prompts of {args.prompt_tokens} random tokens, "
             f"{args.new_tokens} new tokens each (greedy), {args.requests_per_client} requests per client",
             "slots: " + ", ".join(f"{k} {v['slots']} ({v.get('kind', 'not loaded')})" for k, v in systems.items()),
             f"HTTP processes beside the model's: {args.api_processes}; load-generator processes: "
             f"{args.client_processes}",
             "TTFT includes queueing for a slot; ITL: gaps between a stream's events "
             f"({args.stream_interval} token(s) each)")
    print(report.write(args.out, result, "llamba serve under load", [table(systems), "", bars_table(result["bars"])],
                       notes))
    return result
