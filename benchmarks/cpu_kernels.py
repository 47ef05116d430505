"""How the CPU runtime's execution strategy was picked: one decode-sized (1-row) matmul per student weight shape in
each candidate, and a whole decode step, interleaved in one process, medians of repeated timings.

Candidates: PyTorch float32 ``F.linear``; PyTorch's weight-only kernels ``aten._weight_int8pack_mm`` (float32
activations, per-channel scales) and ``aten._weight_int4pack_mm_for_cpu`` (bfloat16 activations, per-group); our C
kernel (float32 activations, per-group scale+min, float32 / int8 / int4). Whole step: the model's own PyTorch
decode path (``model(token, past_key_values=cache)``) against the compiled step.

    python benchmarks/cpu_kernels.py --out results/edge-cpu-kernels.json
"""

import argparse
import ctypes
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from llamba.quant import kernels
from llamba.quant.modules import QuantizedLinear
from llamba.quant.reference import quantize_weight

SHAPES = {"in_proj": (2313, 576), "out_proj": (576, 576), "gate/up": (1536, 576), "down": (576, 1536), "head": (49152, 576)}


def timed(fn, reps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1e6


def candidates(n: int, k: int) -> dict:
    lib = kernels.load_kernels()
    w, x = torch.randn(n, k), torch.randn(1, k)
    y, xsum = torch.empty(1, n), torch.empty(k // 32 + 1)
    out = {"torch fp32 F.linear": lambda: F.linear(x, w)}
    w8 = torch.randint(-128, 127, (n, k), dtype=torch.int8)
    s8 = torch.rand(n)
    out["torch _weight_int8pack_mm (fp32 act)"] = lambda: torch.ops.aten._weight_int8pack_mm(x, w8, s8)
    if n % 16 == 0:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (n, k), dtype=torch.int32), 1)
        sz, xb = torch.rand(k // 32, n, 2).bfloat16(), x.bfloat16()
        out["torch _weight_int4pack_mm_for_cpu (bf16 act)"] = lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, packed, 32, sz)
    keep = [w, x, y, xsum]  # the C calls hold raw pointers: these must outlive the lambdas
    for bits in (32, 8, 4):
        if bits == 32:
            lin = kernels.Linear(w.data_ptr(), None, None, None, 32, n, k, 0)
        else:
            q = QuantizedLinear(quantize_weight(w, bits, 32))
            keep.append(q)
            lin = q.c_linear()
        args = (ctypes.byref(lin), kernels.fptr(x), 1, kernels.fptr(y), kernels.fptr(xsum))
        out[f"llamba C kernel {'fp32' if bits == 32 else f'int{bits}'}"] = (lambda a=args: lib.llamba_linear_rows(*a))
    out["_keep"] = keep
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default="results/edge-cpu-kernels.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    kernels.load_kernels().llamba_set_threads(args.threads)
    result = {"threads": args.threads, "load_average_1min": os.getloadavg()[0], "matmul_us": {}, "step_ms": {}}
    for name, (n, k) in SHAPES.items():
        cands = candidates(n, k)
        keep = cands.pop("_keep")  # noqa: F841 - keeps the buffers the C calls point into alive
        runs = {c: [] for c in cands}
        reps = 3 if name == "head" else 30
        for fn in cands.values():
            fn()
        for _ in range(args.rounds):  # interleaved rounds
            for c, fn in cands.items():
                runs[c].append(timed(fn, reps))
        result["matmul_us"][f"{name} {n}x{k}"] = {c: statistics.median(v) for c, v in runs.items()}
        print(name, {c: round(statistics.median(v), 1) for c, v in runs.items()}, flush=True)

    from llamba.model import LlambaConfig, LlambaForCausalLM
    from llamba.quant import quantize_student
    from llamba.quant.runtime import CpuDecoder

    cfg = LlambaConfig(d_model=576, n_layer=30, vocab_size=49152, pad_vocab_size_multiple=1, tie_embeddings=True,
                       mlp_cfg={"intermediate_size": 1536}, ssm_cfg={"d_state": 64, "n_v_heads": 9, "n_qk_heads": 9})
    model = LlambaForCausalLM(cfg).eval()
    cache = model.allocate_cache(1)
    with torch.inference_mode():
        model(torch.tensor([[1, 2]]), past_key_values=cache, use_cache=True)
    tok = torch.tensor([[3]])
    steps = {"PyTorch model step (fp32)": lambda: model(tok, past_key_values=cache, use_cache=True)}
    decoders = {}
    for q in ("none", "int8", "int4"):
        m = LlambaForCausalLM(cfg).eval() if q != "none" else model
        if q != "none":
            quantize_student(m, q)
        decoders[q] = CpuDecoder(m)
        decoders[q].prefill(torch.tensor([1, 2]))
        steps[f"compiled step ({q})"] = (lambda d=decoders[q]: d.step(3))
    runs = {c: [] for c in steps}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for c, fn in steps.items():
                runs[c].append(timed(fn, 5) / 1e3)
    result["step_ms"] = {c: statistics.median(v) for c, v in runs.items()}
    print({c: round(v, 2) for c, v in result["step_ms"].items()})
    result["load_average_1min_after"] = os.getloadavg()[0]
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
