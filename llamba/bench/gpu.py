"""GPU throughput benchmark: the Llamba student against its Llama teacher, side by side in one process.

Rivals: the student (CUDA-graph decode loop, fused Triton step, Triton chunked scan for prefill); the teacher as
a strong static-KV-cache decode (SDPA, ``torch.compile``, one CUDA graph per step, last-position prefill logits);
and plain ``transformers.generate`` as the common baseline. Every figure stands next to its floor: bytes moved per
step over the measured copy bandwidth, and FLOPs over the measured bf16 matmul rate. Speed does not depend on the
weights' values, so by default both models are built from the SmolLM2-135M shapes with random bf16 weights.
"""

from __future__ import annotations

import datetime
import gc
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

from llamba.generation.engine import Decoder, capture_graph
from llamba.generation.sampling import SamplingParams

GREEDY = SamplingParams()
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, rope_theta=100000.0,
                    tie_word_embeddings=True, max_position_embeddings=8192, rms_norm_eps=1e-5)
# Llama-3.2-1B's shapes (its published config.json): random weights of the right size, for speed and memory
LLAMA_3_2_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=64, rope_theta=500000.0,
                    rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                    tie_word_embeddings=True, max_position_embeddings=131072, rms_norm_eps=1e-5,
                    bos_token_id=128000, eos_token_id=128009)
TEACHER_SHAPES = {"smollm2-135m": SMOLLM2_135M, "llama-3.2-1b": LLAMA_3_2_1B}


# -- helpers ------------------------------------------------------------------------------------------------
def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _cuda_time(fn, repeats: int = 1, warm: bool = True, device: str = "cuda") -> float:
    """Seconds per call, timed with CUDA events (after one warm call unless ``warm=False``: decode loops are
    warm from their capture, and a second pass would run past the cache). On a CPU device (the smoke test) the
    host clock times it instead."""
    if warm:
        fn()
    if device != "cuda":
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - t0) / repeats
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / repeats


def measure_hardware() -> dict:
    n = 1 << 28  # 512 MiB of bf16 each way
    a = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    b = torch.empty_like(a)
    t = _cuda_time(lambda: b.copy_(a), repeats=20)
    bandwidth = 2 * a.nbytes / t / 1e9
    m = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t = _cuda_time(lambda: m @ m, repeats=10)
    del a, b, m
    _free()
    return {"bandwidth_gbs": bandwidth, "matmul_tflops": 2 * 8192 ** 3 / t / 1e12}


def param_bytes(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def param_count(model) -> int:
    return sum(p.numel() for p in {p.data_ptr(): p for p in model.parameters()}.values())


# -- models ---------------------------------------------------------------------------------------------------
RANDOM_TEACHER = (None, "random-smollm2-135m")  # --teacher values that build SMOLLM2_135M with random weights


def build_models(teacher_name: str | None, model_path: str | None):
    from transformers import LlamaConfig, LlamaForCausalLM

    if teacher_name in RANDOM_TEACHER:
        torch.manual_seed(0)
        teacher = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).to(torch.bfloat16)
        source = "LlamaForCausalLM from the SmolLM2-135M config, random bf16 weights"
    else:
        from llamba.teacher import load_teacher
        teacher, _ = load_teacher(teacher_name, dtype=torch.bfloat16, device="cpu")
        source = f"teacher {teacher_name}"
    teacher = teacher.cuda().eval()
    if model_path:
        from llamba.checkpoint import load_model
        student, _ = load_model(model_path, dtype=torch.bfloat16, device="cuda")
        student_src = f"student {model_path}"
    else:
        from llamba.convert import student_from_teacher
        student = student_from_teacher(teacher, d_state=64).to(torch.bfloat16)
        student_src = "llamba.convert.student_from_teacher (identity init)"
    return teacher, student.cuda().eval(), f"{source}; {student_src}"


# -- one measurement each -----------------------------------------------------------------------------------
def _prompts(batch: int, length: int, vocab: int, device: str = "cuda") -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), device=device)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def student_decode(student, batch, prompt, new_tokens, compile_step, prefill_rows=64) -> dict:
    """Prefill seconds and decode tokens/s of the engine (a hybrid's KV cache sized to prompt + new tokens).
    Off CUDA (the CPU smoke test) the same engine runs eagerly, timed by the host clock, with no peak memory."""
    device = student.device.type
    cuda = device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    dec = Decoder(student, batch, GREEDY, (), 0, new_tokens, use_graph=cuda, compile=compile_step,
                  max_length=prompt + new_tokens if student.config.is_hybrid else None)
    ids = _prompts(batch, prompt, student.config.vocab_size, device)
    _sync(device)
    t0 = time.perf_counter()
    dec.start(ids, None, prefill_rows)
    _sync(device)
    prefill_s = time.perf_counter() - t0
    steps = new_tokens - 1
    t = _cuda_time(lambda: [dec.advance() for _ in range(steps)], warm=False, device=device)
    out = {"prefill_s": prefill_s, "decode_tok_s": batch * steps / t, "step_ms": t / steps * 1e3,
           "peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None,
           "state_bytes_per_seq": dec.cache.nbytes() // batch}
    del dec, ids
    _free()
    return out


def teacher_decode(teacher, batch, prompt, new_tokens, compile_step, prefill_rows=64) -> dict:
    from llamba.bench.llama_static import StaticLlama

    torch.cuda.reset_peak_memory_stats()
    st = StaticLlama(teacher, batch, prompt + new_tokens, compile=compile_step)
    st.capture()
    ids = _prompts(batch, prompt, teacher.config.vocab_size)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    st.start(ids, prefill_rows)
    torch.cuda.synchronize()
    prefill_s = time.perf_counter() - t0
    steps = new_tokens - 1
    t = _cuda_time(lambda: [st.advance() for _ in range(steps)], warm=False)
    out = {"prefill_s": prefill_s, "decode_tok_s": batch * steps / t, "step_ms": t / steps * 1e3,
           "peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30, "kv_bytes_per_token": st.kv_bytes_per_token()}
    del st, ids
    _free()
    return out


def hf_generate(teacher, batch, prompt, new_tokens) -> dict:
    ids = _prompts(batch, prompt, teacher.config.vocab_size)
    mask = torch.ones_like(ids)
    kwargs = dict(attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  pad_token_id=0)
    torch.cuda.reset_peak_memory_stats()
    teacher.generate(ids[:, :16], **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    teacher.generate(ids, **kwargs)
    torch.cuda.synchronize()
    total = time.perf_counter() - t0
    out = {"total_s": total, "new_tok_s": batch * new_tokens / total, "peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30}
    _free()
    return out


def prefill_rates(teacher, student, contexts=(2048, 8192), tokens=16384, rounds: int = 3,
                  compile: bool = True) -> list[dict]:
    """Prefill tokens/s as generation runs it (the student's engine, the teacher's static-KV prefill; their dense
    pieces compiled alike), each replayed from a CUDA graph (what the GPU takes) and launched from the host (what
    this host's launches allow: several hundred kernels per prefill). The student and the teacher take turns for
    a few rounds and each keeps its best."""
    from llamba.bench.llama_static import StaticLlama

    rows = []
    for T in contexts:
        batch = max(1, tokens // T)
        ids = _prompts(batch, T, student.config.vocab_size)
        dec = Decoder(student, batch, GREEDY, (), 0, 1, use_graph=False, compile=compile)
        st = StaticLlama(teacher, batch, T, compile=compile)

        def run_student():
            dec.cache.reset()
            dec.prefill_logits(ids, None, dec.cache)

        runs = {"student_host": run_student, "teacher_host": lambda: st.prefill(ids)}
        with torch.no_grad():
            runs.update(student=capture_graph(run_student).replay,
                        teacher=capture_graph(runs["teacher_host"]).replay)
            best = dict.fromkeys(runs, float("inf"))
            for _ in range(rounds):
                for name, fn in runs.items():
                    best[name] = min(best[name], _cuda_time(fn, repeats=3))
        del dec, st, runs
        _free()
        rows.append({"context": T, "batch": batch, **{f"{name}_tok_s": batch * T / s for name, s in best.items()}})
    return rows


# -- floors ---------------------------------------------------------------------------------------------------
def decode_floor(hw, weight_bytes, n_params, batch, per_seq_bytes, attn_flops_per_seq=0.0) -> float:
    """Tokens/s if the step only moved its bytes (weights once + per-sequence state or KV) at the measured
    bandwidth, or only did its matmul FLOPs at the measured rate, whichever is slower."""
    t_bytes = (weight_bytes + batch * per_seq_bytes) / (hw["bandwidth_gbs"] * 1e9)
    t_flops = batch * (2 * n_params + attn_flops_per_seq) / (hw["matmul_tflops"] * 1e12)
    return batch / max(t_bytes, t_flops)


def student_step_bytes(student, context: float = 0.0) -> float:
    """Per sequence and token: read and write the SSM state and the conv state of each mixer layer, write one row
    of logits; a hybrid's attention layers read their keys and values over ``context`` positions (bf16)."""
    cfg = student.config
    n_mixers = cfg.n_layer - len(cfg.attention_layers)
    state = n_mixers * (cfg.n_v_heads * cfg.head_dim * cfg.d_state * 4 + cfg.conv_dim * 3 * 2)
    kv = 0.0
    if cfg.is_hybrid:
        a = cfg.attention_cfg
        kv = 2 * len(cfg.attention_layers) * a["num_key_value_heads"] * a["head_dim"] * 2 * (context + 1)
    return 2 * state + kv + cfg.vocab_size * 2


def teacher_step_bytes(teacher, context: float) -> float:
    cfg = teacher.config
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * hd * 2
    return per_token * (context + 1) + cfg.vocab_size * 2


def teacher_attn_flops(teacher, context: float) -> float:
    cfg = teacher.config
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 4 * cfg.num_hidden_layers * cfg.num_attention_heads * hd * context


# -- the whole run --------------------------------------------------------------------------------------------
def run_benchmark(args) -> dict:
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = 64
    torch.backends.cuda.matmul.allow_tf32 = True
    # a --hybrids list past the teacher's layers fails here, before any GPU work, not after the teacher's rows
    n_layer = teacher_layer_count(args.teacher)
    hybrid_sets = [hybrid_layers(spec, n_layer) for spec in args.hybrids]
    hw = measure_hardware()
    teacher, student, source = build_models(args.teacher, args.model)
    results = {
        "command": " ".join(sys.argv), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version(),
        "models": source, "hardware": hw,
        "student_params": param_count(student), "teacher_params": param_count(teacher),
    }
    import transformers
    import triton
    results["transformers"], results["triton"] = transformers.__version__, triton.__version__
    sw, tw = param_bytes(student), param_bytes(teacher)
    sn, tn = param_count(student), param_count(teacher)
    s_seq = student_step_bytes(student)
    new = args.new_tokens
    partial = Path(args.out).with_suffix(".partial.json")

    def log(*a):  # progress, and the results so far on disk in case the run is cut short
        print(*a, flush=True)
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps(results, indent=1))

    if not args.skip_kernels:
        from llamba.bench.kernels import run_all
        results["kernels"] = run_all(hw["bandwidth_gbs"])
        log("kernels", results["kernels"])

    # Decode throughput per batch size.
    results["decode"] = []
    for prompt in args.prompts:
        for who in ("student", "teacher"):
            for batch in args.batches:
                row = {"model": who, "prompt": prompt, "batch": batch, "new_tokens": new}
                try:
                    if who == "student":
                        row.update(student_decode(student, batch, prompt, new, not args.no_compile))
                        row["floor_tok_s"] = decode_floor(hw, sw, sn, batch, s_seq)
                    else:
                        row.update(teacher_decode(teacher, batch, prompt, new, not args.no_compile))
                        ctx = prompt + new / 2
                        row["floor_tok_s"] = decode_floor(hw, tw, tn, batch, teacher_step_bytes(teacher, ctx),
                                                          teacher_attn_flops(teacher, ctx))
                    row["of_floor"] = row["decode_tok_s"] / row["floor_tok_s"]
                except torch.OutOfMemoryError:
                    row["oom"] = True
                    _free()
                results["decode"].append(row)
                log(row)
                if row.get("oom"):
                    break

    # Plain transformers.generate, the common baseline.
    results["hf_generate"] = []
    for prompt, batch in args.hf_configs:
        row = {"prompt": prompt, "batch": batch, "new_tokens": new}
        try:
            row.update(hf_generate(teacher, batch, prompt, new))
        except torch.OutOfMemoryError:
            row["oom"] = True
            _free()
        results["hf_generate"].append(row)
        log("hf", row)

    # Prefill.
    results["prefill"] = prefill_rates(teacher, student, compile=not args.no_compile)
    for row in results["prefill"]:
        T = row["context"]
        # Chunked scan, per token and head: C B^T and the masked product (2 * 64 * (N + P)), two state products (4 P N).
        cfg = student.config
        scan_per_token = cfg.n_layer * cfg.n_v_heads * (2 * 64 * (cfg.d_state + cfg.head_dim) + 4 * cfg.head_dim * cfg.d_state)
        flops_s = 2 * sn * T + scan_per_token * T
        flops_t = 2 * tn * T + 2 * teacher.config.num_hidden_layers * teacher.config.hidden_size * T * T
        row["student_floor_tok_s"] = T / (flops_s / (hw["matmul_tflops"] * 1e12))
        row["teacher_floor_tok_s"] = T / (flops_t / (hw["matmul_tflops"] * 1e12))
    log("prefill", results["prefill"])

    # Decode at batch 16 as the context grows.
    results["context_sweep"] = []
    for ctx in args.contexts:
        row = {"context": ctx, "batch": 16, "new_tokens": args.sweep_new_tokens}
        try:
            s = student_decode(student, 16, ctx, args.sweep_new_tokens, not args.no_compile)
            row["student_tok_s"], row["student_peak_gib"] = s["decode_tok_s"], s["peak_gib"]
            row["student_floor_tok_s"] = decode_floor(hw, sw, sn, 16, s_seq)
            t = teacher_decode(teacher, 16, ctx, args.sweep_new_tokens, not args.no_compile)
            row["teacher_tok_s"], row["teacher_peak_gib"] = t["decode_tok_s"], t["peak_gib"]
            c = ctx + args.sweep_new_tokens / 2
            row["teacher_floor_tok_s"] = decode_floor(hw, tw, tn, 16, teacher_step_bytes(teacher, c), teacher_attn_flops(teacher, c))
        except torch.OutOfMemoryError:
            row["oom"] = True
            _free()
        results["context_sweep"].append(row)
        log("sweep", row)

    results["largest_batch"] = largest_batch(student, teacher, args, results["decode"])
    log("largest", results["largest_batch"])

    del student
    _free()
    results["hybrids"] = [hybrid_study(teacher, hw, layers, args, log) for layers in hybrid_sets]
    results["mixers"] = [mixer_study(teacher, hw, m, args, log) for m in getattr(args, "mixers", [])]
    return results


# -- hybrids ----------------------------------------------------------------------------------------------------
def attention_layers_for(n_layer: int, k: int) -> list[int]:
    """K attention layers spread evenly through the stack (30 layers: K=2 -> [10, 20], K=4 -> [6, 12, 18, 24])."""
    if not 0 < k <= n_layer:
        raise ValueError(f"a hybrid of {n_layer} layers can keep 1..{n_layer} attention layers, not {k}")
    return [(i + 1) * n_layer // (k + 1) for i in range(k)]  # distinct: steps of n_layer / (k + 1) >= 1 - 1/(k+1)


def hybrid_layers(spec: int | list[int], n_layer: int) -> list[int]:
    """A ``--hybrids`` item (``llamba.cli.bench.hybrid_spec``) as attention layer indices: K -> K layers spaced
    evenly, a list -> exactly those layers (sorted), checked against the teacher's ``n_layer`` layers."""
    from llamba.model.config import check_attention_layers

    try:
        return attention_layers_for(n_layer, spec) if isinstance(spec, int) else check_attention_layers(spec, n_layer)
    except ValueError as e:
        given = spec if isinstance(spec, int) else ",".join(map(str, spec))
        raise ValueError(f"--hybrids {given}: {e}") from None


def teacher_layer_count(teacher_name: str | None) -> int:
    """The teacher's layer count from its config alone (no weights, no GPU)."""
    if teacher_name in RANDOM_TEACHER:
        return SMOLLM2_135M["num_hidden_layers"]
    from llamba.teacher import load_teacher_config

    return load_teacher_config(teacher_name).num_hidden_layers


def hybrid_label(h: dict) -> str:
    """'K=4 (20,23,24,26)': which layers, since two hybrids of one K (spaced evenly, chosen) may share a run."""
    return f"K={h['k']} ({','.join(map(str, h['attention_layers']))})"


def hybrid_study(teacher, hw, spec: int | list[int], args, log=print) -> dict:
    """A hybrid student of the teacher's shapes whose attention layers ``spec`` gives (``hybrid_layers``)."""
    from llamba.convert import student_from_teacher

    layers = hybrid_layers(spec, teacher.config.num_hidden_layers)
    student = student_from_teacher(teacher, d_state=64, attention_layers=layers)
    h = {"k": len(layers), "attention_layers": layers}
    return {**h, **variant_study(student, teacher, hw, args, log, f"hybrid {hybrid_label(h)}")}


def mixer_study(teacher, hw, mixer: str, args, log=print) -> dict:
    """A student of the teacher's shapes with another mixer (``ssm_cfg.mixer``, e.g. GateLoop), to set beside the
    Discrete Mamba-2 student's decode rows at the same prompt and batch (``mixers_markdown``)."""
    from llamba.convert import student_from_teacher

    student = student_from_teacher(teacher, d_state=64, mixer=mixer)
    return {"mixer": mixer, **variant_study(student, teacher, hw, args, log, mixer)}


def variant_study(student, teacher, hw, args, log, label: str) -> dict:
    """A student variant through the same engine as the pure student: decode tokens/s at ``args.hybrid_batches``
    (prompt ``max(args.prompts)``), the batch-16 context sweep, and on CUDA the largest batch within the memory
    budget. The floors count a hybrid's attention (its KV bytes and products) where it has some."""
    weight = next(teacher.parameters())
    # student_from_teacher builds on the CPU: without the move a CUDA run timed the variant on the host (14.7 tok/s)
    student = student.to(device=weight.device, dtype=weight.dtype).eval()
    cuda = student.device.type == "cuda"
    compile_step = not args.no_compile
    sw, sn = param_bytes(student), param_count(student)
    prompt, new = max(args.prompts), args.new_tokens
    layers, a = student.config.attention_layers, student.config.attention_cfg
    attn_flops = lambda ctx: 4 * len(layers) * a["num_attention_heads"] * a["head_dim"] * ctx if layers else 0.0  # noqa: E731
    out = {"params": sn, "decode": [], "context_sweep": []}
    for batch in args.hybrid_batches:
        row = {"prompt": prompt, "batch": batch, "new_tokens": new}
        try:
            row.update(student_decode(student, batch, prompt, new, compile_step))
            ctx = prompt + new / 2
            row["floor_tok_s"] = decode_floor(hw, sw, sn, batch, student_step_bytes(student, ctx), attn_flops(ctx))
            row["of_floor"] = row["decode_tok_s"] / row["floor_tok_s"]
        except torch.OutOfMemoryError:
            row["oom"] = True
            _free()
        out["decode"].append(row)
        log(label, row)
        if row.get("oom"):
            break
    for ctx in args.contexts:
        row = {"context": ctx, "batch": 16, "new_tokens": args.sweep_new_tokens}
        try:
            r = student_decode(student, 16, ctx, args.sweep_new_tokens, compile_step)
            c = ctx + args.sweep_new_tokens / 2
            row.update(tok_s=r["decode_tok_s"], peak_gib=r["peak_gib"],
                       floor_tok_s=decode_floor(hw, sw, sn, 16, student_step_bytes(student, c), attn_flops(c)))
        except torch.OutOfMemoryError:
            row["oom"] = True
            _free()
        out["context_sweep"].append(row)
        log(label, "sweep", row)
    if cuda:
        rows = [r for r in out["decode"] if not r.get("oom") and r["batch"] >= 8]
        out["largest_batch"] = _fit_batch(lambda b: student_decode(student, b, prompt, 16, compile_step), rows,
                                          args.memory_budget_gib)
        out["largest_batch"].update(budget_gib=args.memory_budget_gib, prompt=prompt)
        log(label, "largest", out["largest_batch"])
    del student
    _free()
    return out


def _fit_batch(decode, rows, budget: float) -> dict:
    """The largest batch whose measured peak stays within ``budget`` GiB: a line through the last two measured
    peaks (``rows``, batch >= 8) predicts it, real runs (``decode(batch)``) check it, shrinking by 7% a try."""
    if len(rows) < 2:
        return {}
    (b1, m1), (b2, m2) = (rows[-2]["batch"], rows[-2]["peak_gib"]), (rows[-1]["batch"], rows[-1]["peak_gib"])
    slope = (m2 - m1) / (b2 - b1)
    guess = int((budget - (m1 - slope * b1)) / slope) // 8 * 8
    entry = {"predicted": guess, "gib_per_seq": slope}
    for _ in range(4):
        try:
            r = decode(guess)
            if r["peak_gib"] <= budget:
                entry.update(batch=guess, peak_gib=r["peak_gib"], decode_tok_s=r["decode_tok_s"])
                break
        except torch.OutOfMemoryError:
            _free()
        guess = int(guess * 0.93) // 8 * 8
    return entry


def largest_batch(student, teacher, args, decode_rows) -> dict:
    """Largest batch whose peak memory (weights, cache, prefill and decode working memory) stays within the
    budget at prompt 2048: a line through two measured peaks predicts it, one real run checks it."""
    budget = args.memory_budget_gib
    prompt = max(args.prompts)
    out = {"budget_gib": budget, "prompt": prompt, "new_tokens": 16}
    for who in ("student", "teacher"):
        rows = [r for r in decode_rows if r["model"] == who and r["prompt"] == prompt and not r.get("oom") and r["batch"] >= 8]
        if len(rows) < 2:
            continue
        run = student_decode if who == "student" else teacher_decode
        model = student if who == "student" else teacher
        out[who] = _fit_batch(lambda b, run=run, model=model: run(model, b, prompt, 16, not args.no_compile), rows,
                              budget)
    if "batch" in out.get("student", {}) and "batch" in out.get("teacher", {}):
        out["ratio"] = out["student"]["batch"] / out["teacher"]["batch"]
    return out


# -- reporting ------------------------------------------------------------------------------------------------
def _fmt(x, digits=0):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:,.{digits}f}"


def to_markdown(r: dict) -> str:
    hw = r["hardware"]
    lines = [f"# GPU benchmark: Llamba student vs Llama teacher ({r['device']})", "",
             f"- command: `{r['command']}`", f"- date: {r['date']}; torch {r['torch']}, triton {r.get('triton')}, "
             f"transformers {r.get('transformers')}", f"- models: {r['models']} ({r['student_params']:,} / "
             f"{r['teacher_params']:,} parameters, student / teacher)",
             f"- measured: copy bandwidth {hw['bandwidth_gbs']:.0f} GB/s, bf16 matmul {hw['matmul_tflops']:.0f} TFLOP/s; "
             "floors = max(bytes / bandwidth, FLOPs / matmul rate)", ""]
    if "kernels" in r:
        from llamba.bench.kernels import to_markdown as kernels_markdown

        lines += ["## Mixer kernels: chunked scan (bf16, d_state = head dim), prefill conv, fused decode step", ""]
        lines += kernels_markdown(r["kernels"]) + [""]
    lines += ["## Decode tokens/s (greedy, CUDA graphs both sides)", "",
              "| prompt | batch | student tok/s | floor | teacher (compiled, static KV) tok/s | floor | student / teacher | peak GiB s / t |",
              "|---|---|---|---|---|---|---|---|"]
    by = {(d["model"], d["prompt"], d["batch"]): d for d in r["decode"]}
    for (who, prompt, batch), d in by.items():
        if who != "student":
            continue
        t = by.get(("teacher", prompt, batch), {})
        ratio = d.get("decode_tok_s", 0) / t["decode_tok_s"] if t.get("decode_tok_s") and d.get("decode_tok_s") else None
        lines.append(f"| {prompt} | {batch} | {_fmt(d.get('decode_tok_s'))}{' OOM' if d.get('oom') else ''} | "
                     f"{_fmt(d.get('floor_tok_s'))} | {_fmt(t.get('decode_tok_s'))}{' OOM' if t.get('oom') else ''} | "
                     f"{_fmt(t.get('floor_tok_s'))} | {_fmt(ratio, 2)} | {_fmt(d.get('peak_gib'), 1)} / {_fmt(t.get('peak_gib'), 1)} |")
    if r.get("hf_generate"):
        lines += ["", "Plain `transformers.generate` (teacher, dynamic cache, eager), new tokens per second end to end:", "",
                  "| prompt | batch | tok/s | peak GiB |", "|---|---|---|---|"]
        for h in r["hf_generate"]:
            lines.append(f"| {h['prompt']} | {h['batch']} | {_fmt(h.get('new_tok_s'))}{' OOM' if h.get('oom') else ''} | {_fmt(h.get('peak_gib'), 1)} |")
    lines += ["", "## Prefill tokens/s", "",
              "Each prefill replayed from one CUDA graph (GPU-bound); the last column launched from the host, kernel by "
              "kernel (bound by this host's launch rate):", "",
              "| context | batch | student | floor | teacher | floor | student / teacher | from the host: student / teacher |",
              "|---|---|---|---|---|---|---|---|"]
    for p in r["prefill"]:
        host = f"{_fmt(p['student_host_tok_s'])} / {_fmt(p['teacher_host_tok_s'])}" if "student_host_tok_s" in p else ""
        lines.append(f"| {p['context']} | {p['batch']} | {_fmt(p['student_tok_s'])} | {_fmt(p['student_floor_tok_s'])} | "
                     f"{_fmt(p['teacher_tok_s'])} | {_fmt(p['teacher_floor_tok_s'])} | "
                     f"{_fmt(p['student_tok_s'] / p['teacher_tok_s'], 2)} | {host} |")
    lines += ["", "## Decode at batch 16 as the context grows", "",
              "| context | student tok/s | floor | teacher tok/s | floor | student / teacher |", "|---|---|---|---|---|---|"]
    for c in r["context_sweep"]:
        ratio = c["student_tok_s"] / c["teacher_tok_s"] if c.get("teacher_tok_s") else None
        lines.append(f"| {c['context']} | {_fmt(c.get('student_tok_s'))} | {_fmt(c.get('student_floor_tok_s'))} | "
                     f"{_fmt(c.get('teacher_tok_s'))}{' OOM' if c.get('oom') else ''} | {_fmt(c.get('teacher_floor_tok_s'))} | {_fmt(ratio, 2)} |")
    lb = r.get("largest_batch", {})
    if lb:
        lines += ["", f"## Largest batch in {lb['budget_gib']} GiB (prompt {lb['prompt']}, weights included)", "",
                  "| model | batch | peak GiB | GiB per sequence | decode tok/s there |", "|---|---|---|---|---|"]
        for who in ("student", "teacher"):
            e = lb.get(who, {})
            lines.append(f"| {who} | {_fmt(e.get('batch'))} | {_fmt(e.get('peak_gib'), 2)} | {_fmt(e.get('gib_per_seq'), 4)} | {_fmt(e.get('decode_tok_s'))} |")
        if "ratio" in lb:
            lines.append(f"\nstudent / teacher largest batch: {lb['ratio']:.1f}x")
    lines += hybrids_markdown(r.get("hybrids") or [], r.get("decode") or [], r.get("largest_batch"))
    lines += mixers_markdown(r.get("mixers") or [], r.get("decode") or [])
    return "\n".join(lines) + "\n"


BAR_BATCH = 256  # issue 23's bars: decode at batch 256 >= 2x the teacher's, largest batch in the budget >= 4x


def _ratio(a, b) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def _rate_at(rows: list[dict], prompt: int, batch: int):
    """Decode tok/s of the row at (prompt, batch); None where there is none or it ran out of memory."""
    return next((r.get("decode_tok_s") for r in rows if r["prompt"] == prompt and r["batch"] == batch), None)


def hybrids_markdown(hybrids: list[dict], decode: list[dict] = (), largest: dict | None = None) -> list[str]:
    """The hybrids' rows, and each model's ratios to the teacher of the same run (``decode``: the pure student's
    and the teacher's decode rows, ``largest``: their largest batches): what issue 23's bars read."""
    if not hybrids:
        return []
    teacher = [d for d in decode if d.get("model") == "teacher"]
    pure = [d for d in decode if d.get("model") == "student"]
    largest = largest or {}
    prompt = max(d["prompt"] for h in hybrids for d in h["decode"])  # the hybrids decode at the largest --prompts
    t_rate, t_batch = _rate_at(teacher, prompt, BAR_BATCH), largest.get("teacher", {}).get("batch")
    lines = ["", "## Hybrid students (K attention layers, static KV cache, same engine)", "",
             f"Against the teacher of this run, prompt {prompt}:", "",
             f"| model | tok/s at batch {BAR_BATCH} | / teacher (bar: K=4 >= 2x) "
             f"| largest batch in {largest.get('budget_gib', '-')} GiB | / teacher (bar: K=4 >= 4x) |",
             "|---|---|---|---|---|"]
    models = [("teacher", teacher, largest.get("teacher")), ("pure student", pure, largest.get("student"))]
    models += [(f"hybrid {hybrid_label(h)}", h["decode"], h.get("largest_batch")) for h in hybrids]
    for name, rows, fit in models:
        rate, batch = _rate_at(rows, prompt, BAR_BATCH), (fit or {}).get("batch")
        lines.append(f"| {name} | {_fmt(rate)} | {_ratio(rate, t_rate)} | {_fmt(batch)} | {_ratio(batch, t_batch)} |")
    lines += ["", "| hybrid | prompt | batch | tok/s | / teacher | floor | peak GiB |", "|---|---|---|---|---|---|---|"]
    for h in hybrids:
        for d in h["decode"]:
            rate = d.get("decode_tok_s")
            oom = " OOM" if d.get("oom") else ""
            lines.append(f"| {hybrid_label(h)} | {d['prompt']} | {d['batch']} | {_fmt(rate)}{oom} | "
                         f"{_ratio(rate, _rate_at(teacher, d['prompt'], d['batch']))} | {_fmt(d.get('floor_tok_s'))} | "
                         f"{_fmt(d.get('peak_gib'), 1)} |")
        e = h.get("largest_batch") or {}
        if "batch" in e:
            lines.append(f"| {hybrid_label(h)}, largest in {e['budget_gib']} GiB | {e['prompt']} | {e['batch']} | "
                         f"{_fmt(e.get('decode_tok_s'))} | | | {_fmt(e.get('peak_gib'), 2)} |")
    lines += ["", "Batch 16 as the context grows:", "", "| hybrid | context | tok/s | floor |", "|---|---|---|---|"]
    for h in hybrids:
        for c in h["context_sweep"]:
            oom = " OOM" if c.get("oom") else ""
            lines.append(f"| {hybrid_label(h)} | {c['context']} | {_fmt(c.get('tok_s'))}{oom} | "
                         f"{_fmt(c.get('floor_tok_s'))} |")
    return lines


def mixers_markdown(mixers: list[dict], decode: list[dict]) -> list[str]:
    """Each other mixer's decode beside the Discrete Mamba-2 student's at the same prompt and batch."""
    if not mixers:
        return []
    pure = {(d["prompt"], d["batch"]): d.get("decode_tok_s") for d in decode if d.get("model") == "student"}
    lines = ["", "## Other mixers (same shapes, same engine) against the Discrete Mamba-2 student", "",
             "| mixer | prompt | batch | tok/s | Discrete Mamba-2 tok/s | ratio |", "|---|---|---|---|---|---|"]
    for m in mixers:
        for d in m["decode"]:
            base, got = pure.get((d["prompt"], d["batch"])), d.get("decode_tok_s")
            ratio = f"{got / base:.3f}" if base and got else "-"
            lines.append(f"| {m['mixer']} | {d['prompt']} | {d['batch']} | {_fmt(got)}{' OOM' if d.get('oom') else ''} | "
                         f"{_fmt(base)} | {ratio} |")
    lines += ["", "Batch 16 as the context grows:", "", "| mixer | context | tok/s |", "|---|---|---|"]
    for m in mixers:
        for c in m["context_sweep"]:
            lines.append(f"| {m['mixer']} | {c['context']} | {_fmt(c.get('tok_s'))}{' OOM' if c.get('oom') else ''} |")
    return lines


def device_slug() -> str:
    """'h200' for 'NVIDIA H200', 'h100' for 'NVIDIA H100 80GB HBM3': result files are named by the card."""
    name = torch.cuda.get_device_name().lower().replace("nvidia", "").strip()
    return (name.split() or ["gpu"])[0]


def plot(r: dict, out_dir: Path, stem: str = "bench") -> list[Path]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    paths = []
    fig, axes = plt.subplots(1, len(set(d["prompt"] for d in r["decode"])), figsize=(11, 4), squeeze=False)
    for ax, prompt in zip(axes[0], sorted(set(d["prompt"] for d in r["decode"]))):
        for who, style in (("student", "o-"), ("teacher", "s-")):
            rows = [d for d in r["decode"] if d["model"] == who and d["prompt"] == prompt and d.get("decode_tok_s")]
            ax.plot([d["batch"] for d in rows], [d["decode_tok_s"] for d in rows], style, label=who)
            ax.plot([d["batch"] for d in rows], [d["floor_tok_s"] for d in rows], style[0] + ":", alpha=0.5, label=f"{who} floor")
        ax.set(xscale="log", yscale="log", xlabel="batch", ylabel="decode tokens/s", title=f"prompt {prompt}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out_dir / f"{stem}-decode.png")
    fig.savefig(paths[-1], dpi=120)
    fig, ax = plt.subplots(figsize=(6, 4))
    rows = [c for c in r["context_sweep"] if c.get("student_tok_s")]
    ax.plot([c["context"] for c in rows], [c["student_tok_s"] for c in rows], "o-", label="student")
    ax.plot([c["context"] for c in rows if c.get("teacher_tok_s")], [c["teacher_tok_s"] for c in rows if c.get("teacher_tok_s")], "s-", label="teacher")
    ax.set(xscale="log", yscale="log", xlabel="context", ylabel="decode tokens/s (batch 16)", title="decode vs context")
    ax.legend()
    fig.tight_layout()
    paths.append(out_dir / f"{stem}-context.png")
    fig.savefig(paths[-1], dpi=120)
    return paths


def main(args) -> int:
    if not torch.cuda.is_available():
        raise ValueError("the GPU benchmark needs CUDA; use --device cpu for the CPU benchmark")
    args.out = args.out or f"results/bench-{device_slug()}"  # run_benchmark keeps its partial rows beside it
    out = Path(args.out)
    results = run_benchmark(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    json_path = out.with_suffix(".json")
    json_path.write_text(json.dumps(results, indent=1))
    md = to_markdown(results)
    out.with_suffix(".md").write_text(md)
    plot(results, out.parent, out.name)
    print(md)
    return 0
