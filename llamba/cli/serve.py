"""``llamba serve``: the OpenAI-compatible HTTP server (completions, chat, streaming) with continuous batching."""

from __future__ import annotations

from llamba.cli.common import add_model_args, float_above, int_at_least


def register(parser) -> None:
    parser.add_argument("--model", required=True,
                        help="a Llamba checkpoint, a `llamba quantize` artifact, or a teacher (name, folder, .gguf)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    parser.add_argument("--port", type=int_at_least(0), default=8000)
    parser.add_argument("--max-batch", type=int_at_least(1), default=None,
                        help="cache slots: sequences decoded together (default: 64 on GPU, 8 on CPU)")
    parser.add_argument("--max-queue", type=int_at_least(0), default=None,
                        help="requests that may wait for a slot; past it the server answers 429 (default: 4 x --max-batch)")
    parser.add_argument("--max-context", type=int_at_least(2), default=2048,
                        help="prompt + new tokens per request (a teacher's KV cache is this long per slot)")
    parser.add_argument("--max-tokens-default", type=int_at_least(1), default=256,
                        help="new tokens when a request gives no max_tokens")
    parser.add_argument("--prefill-chunk", type=int_at_least(1), default=None,
                        help="prompt tokens prefilled between two decode steps of the running batch (pieces of "
                             "one long prompt, or a batch of shorter ones; default 8192 on CUDA, 256 on a CPU)")
    parser.add_argument("--prefill-rows", type=int_at_least(1), default=None,
                        help="prompts prefilled together, left-padded, when they fit --prefill-chunk (default 16 on "
                             "CUDA, 4 on a CPU; the CPU runtime prefills one at a time)")
    parser.add_argument("--no-compile", action="store_true",
                        help="do not torch.compile the dense pieces (norms, residuals, SwiGLU) of a float model's "
                             "steps and prefills on CUDA (compiling adds ~a minute to the start)")
    parser.add_argument("--stream-interval", type=int_at_least(1), default=1,
                        help="new tokens per streamed event (default 1; more spends less host time per token under "
                             "load; requests with stop strings still check every token)")
    parser.add_argument("--api-processes", type=int_at_least(0), default=0,
                        help="HTTP processes beside the model's (0: HTTP and the model share this one). With N, the "
                             "model's process only schedules and steps the batch; request parsing, detokenization "
                             "and streaming spread over N processes: the host work that caps a GPU server's tokens/s")
    parser.add_argument("--served-model-name", default=None, help="the model id clients send (default: the folder name)")
    parser.add_argument("--quant", choices=["none", "int8", "int4"], default=None,
                        help="serve a student through the CPU runtime (llamba.quant), quantized on load")
    parser.add_argument("--threads", type=int_at_least(1), default=None, help="CPU threads")
    parser.add_argument("--shutdown-timeout", type=float_above(0), default=30.0,
                        help="seconds open requests may take to finish after SIGTERM before they are cancelled")
    add_model_args(parser)


def run(args) -> int:
    from llamba.cli.common import resolve_device
    from llamba.serve.server import (app_args, build_app, build_scheduler, default_prefill_chunk, load_served,
                                     run_foreground, run_foreground_processes)

    device = resolve_device(args.device)  # before loading: a bad --device is refused at once
    slots = args.max_batch or (64 if device.type == "cuda" else 8)
    served = load_served(args.model, slots, args.max_context, args.device, args.dtype, args.quant, args.threads,
                         args.served_model_name, args.prefill_rows, False if args.no_compile else None)
    queue = args.max_queue if args.max_queue is not None else 4 * slots
    prefill_chunk = args.prefill_chunk or default_prefill_chunk(device.type)
    where = (f"llamba serve: {served.name} on http://{args.host}:{args.port}/v1 ({slots} slots, queue {queue}, "
             f"context {served.max_context}")
    if args.api_processes:
        print(f"{where}, {args.api_processes} HTTP processes)", flush=True)
        scheduler = build_scheduler(served, queue, prefill_chunk)
        run_foreground_processes(scheduler, app_args(served, args.max_tokens_default, args.stream_interval),
                                 args.api_processes, args.host, args.port, args.shutdown_timeout)
        return 0
    app = build_app(served, queue, prefill_chunk, args.max_tokens_default, args.stream_interval)
    print(f"{where})", flush=True)
    run_foreground(app, args.host, args.port, args.shutdown_timeout)
    return 0
