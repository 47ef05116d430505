"""``llamba bench``: throughput of a Llamba student against its Transformer teacher, on the GPU or the CPU."""

from __future__ import annotations

import argparse
import os

from llamba.cli.common import float_above, int_at_least, int_list, parse_attention_layers

_ints = int_list(1)
_k = int_at_least(1)
# llamba.bench.measure.TEACHER_SHAPES' keys, here so that --help imports no torch (a test keeps the two equal)
DISTILL_SHAPES = ("smollm2-135m", "llama-3.2-1b")


def _pairs(text: str) -> list[tuple[int, int]]:
    """'512x1,512x32' -> [(512, 1), (512, 32)] (prompt x batch)."""
    try:
        pairs = [tuple(int(v) for v in item.split("x")) for item in text.split(",") if item]
    except ValueError:
        pairs = []
    if not pairs or any(len(p) != 2 or min(p) < 1 for p in pairs):
        raise argparse.ArgumentTypeError(f"expected PROMPTxBATCH pairs of positive integers like 512x8,2048x1, got {text!r}")
    return pairs


def hybrid_spec(text: str) -> int | list[int]:
    """A --hybrids item: '4' -> 4 (K attention layers spaced evenly), '20,23,24,26' -> [20, 23, 24, 26] (exactly
    those layers, as --attention-layers writes them; one layer alone is '20,'). Indices past the teacher's layers
    are refused once its config is read (llamba.bench.variants.hybrid_layers), still before any GPU work."""
    try:
        layers = parse_attention_layers(text) if "," in text else None
        return layers or _k(text)  # ',' alone names no layer: read as a (bad) K
    except (ValueError, argparse.ArgumentTypeError) as e:
        raise argparse.ArgumentTypeError(
            f"{e}; give a K (e.g. 4) or comma-separated layers (e.g. 20,23,24,26)") from None


hybrid_spec.__name__ = "K or layer list"  # argparse names the type in its messages


def register(parser) -> None:
    parser.add_argument("study", nargs="?", choices=["models", "distill", "serve"], default="models",
                        help="models (default): the student against its teacher, decode and prefill; distill: "
                             "distillation tokens/s and MFU per stage in the real trainer, beside the plain loss path; "
                             "serve: `llamba serve` under loopback load (tokens/s, TTFT, inter-token latency)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--model", default=None,
                        help="student checkpoint (default on the GPU: convert the teacher with student_from_teacher)")
    parser.add_argument("--teacher", default=None,
                        help="teacher name or path (default on the GPU: the SmolLM2-135M shapes with random bf16 "
                             "weights, 'random-smollm2-135m': speed does not depend on the weights)")
    parser.add_argument("--contexts", type=_ints, default=None,
                        help="context lengths (GPU: the batch-16 decode sweep, default 1024,...,32768)")
    parser.add_argument("--new-tokens", type=int_at_least(2), default=None,
                        help="tokens generated per measurement (default: 256 on the GPU, the CPU benchmark's own)")
    parser.add_argument("--quant", nargs="*", default=[], help="CPU only: quantized variants to include")
    parser.add_argument("--out", default=None, help="output path without suffix (writes .json and .md, plots beside)")
    parser.add_argument("--threads", type=int_at_least(1), default=None, help="CPU only: torch threads")
    parser.add_argument("--repeats", type=int_at_least(1), default=None, help="CPU only: timed rounds per measurement")
    parser.add_argument("--rivals", nargs="*", default=None, help="CPU only: rivals (llama.cpp, transformers)")
    parser.add_argument("--ppl-tokens", type=int_at_least(0), default=0, help="CPU only: also measure perplexity on this many tokens")
    gpu = parser.add_argument_group("GPU options")
    gpu.add_argument("--batches", type=_ints, default=[1, 8, 32, 128, 256, 512, 1024])
    gpu.add_argument("--prompts", type=_ints, default=[512, 2048], help="prompt lengths for the batch sweep")
    gpu.add_argument("--hf-configs", type=_pairs, default=[(512, 1), (512, 32), (512, 128), (2048, 1), (2048, 32)],
                     help="PROMPTxBATCH pairs for plain transformers.generate")
    gpu.add_argument("--sweep-new-tokens", type=int_at_least(1), default=64)
    gpu.add_argument("--memory-budget-gib", type=float_above(0), default=16.0)
    gpu.add_argument("--hybrids", type=hybrid_spec, nargs="*", default=[2, 4],
                     help="also bench these hybrid students, each a number K of attention layers spaced evenly (4) or "
                          "a comma list of exactly those layers (20,23,24,26; one layer: 20,); none: skip")
    gpu.add_argument("--mixers", nargs="*", default=["gateloop"], choices=["gateloop"],
                     help="also bench students with these other mixers beside the Discrete Mamba-2 one (none: skip)")
    gpu.add_argument("--hybrid-batches", type=_ints, default=[1, 64, 256],
                     help="batch sizes for the hybrids' decode (at the largest --prompts; two of 8 or more fit the largest batch)")
    gpu.add_argument("--skip-kernels", action="store_true", help="skip the mixer-level kernel comparison")
    gpu.add_argument("--no-compile", action="store_true", help="do not torch.compile the dense pieces of the decode steps and prefills (teacher and student)")
    srv = parser.add_argument_group("serve study options")
    srv.add_argument("--concurrency", type=_ints, default=None, help="client counts (default 1,16,64,256,1024)")
    srv.add_argument("--prompt-tokens", type=int_at_least(1), default=128, help="prompt length of every request")
    srv.add_argument("--requests-per-client", type=int_at_least(1), default=2)
    srv.add_argument("--max-batch", type=int_at_least(1), default=None, help="server slots (default: the top concurrency)")
    srv.add_argument("--prefill-chunk", type=int_at_least(1), default=None,
                     help="as llamba serve's (default 8192 on CUDA, 256 on a CPU)")
    srv.add_argument("--prefill-rows", type=int_at_least(1), default=None,
                     help="as llamba serve's (default 16 on CUDA, 4 on a CPU)")
    srv.add_argument("--stream-interval", type=int_at_least(1), default=1, help="as llamba serve's")
    srv.add_argument("--api-processes", type=int_at_least(0), default=0, help="as llamba serve's")
    srv.add_argument("--client-processes", type=int_at_least(1), default=max(1, min(8, (os.cpu_count() or 4) // 4)),
                     help="load-generator processes, the clients spread over them (default: a quarter of the cores, "
                          "1 to 8)")
    dist = parser.add_argument_group("distill study options")
    dist.add_argument("--recipe", default="smollm2-135m", help="recipe whose stage settings the trainer runs")
    dist.add_argument("--shape", default="smollm2-135m", choices=DISTILL_SHAPES,
                      help="the random teacher's shapes (with --recipe llama-3.2-1b: does the 1B recipe fit one GPU, "
                      "how fast)")
    dist.add_argument("--steps", type=int_at_least(1), default=5, help="timed optimizer steps per variant (after one warm-up)")
    dist.add_argument("--variants", nargs="*", default=None, help="stage variants (default: all of llamba.bench.distill.VARIANTS)")


def run(args) -> int:
    if args.study == "distill":
        return run_distill(args)
    if args.study == "serve":
        return run_serve(args)
    if args.device == "cpu":
        from llamba.bench import cpu

        return int(cpu.main(args) or 0)
    from llamba.bench import gpu

    if args.contexts is None:
        args.contexts = [1024, 2048, 4096, 8192, 16384, 32768]
    if args.new_tokens is None:
        args.new_tokens = 256
    return gpu.main(args)  # --out defaults to results/bench-<card>


def run_distill(args) -> int:
    import torch

    from llamba.bench import distill

    if args.device != "cuda" or not torch.cuda.is_available():
        raise ValueError("llamba bench distill measures the GPU trainer: it needs CUDA (--device cuda)")
    names = [v[0] for v in distill.VARIANTS]
    unknown = sorted(set(args.variants or []) - set(names))
    if unknown:
        raise ValueError(f"--variants {' '.join(unknown)}: choose from {', '.join(names)}")
    from llamba.bench.measure import device_slug

    default_out = f"results/bench-distill-{device_slug()}" + ("" if args.shape == "smollm2-135m" else f"-{args.shape}")
    distill.run(args.recipe, args.variants or names, args.steps, args.out or default_out, shape=args.shape)
    return 0


def run_serve(args) -> int:
    from llamba.bench import serve
    from llamba.cli.common import resolve_device

    device = resolve_device(args.device)
    if args.concurrency is None:
        args.concurrency = serve.DEFAULT_CONCURRENCY
    if args.new_tokens is None:
        args.new_tokens = 64
    if args.prefill_chunk is None:
        from llamba.serve.server import default_prefill_chunk

        args.prefill_chunk = default_prefill_chunk(device.type)
    if args.prefill_rows is None:
        from llamba.serve.server import default_prefill_rows

        args.prefill_rows = default_prefill_rows(device.type)
    if args.out is None:
        from llamba.bench.measure import device_slug

        args.out = f"results/serve-{device_slug() if device.type == 'cuda' else 'cpu'}"
    result = serve.main(args)
    return 1 if any("error" in system for system in result["systems"].values()) else 0
