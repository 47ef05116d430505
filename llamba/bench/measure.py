"""What the GPU benchmarks measure with, one measurement each: the models of a teacher's shapes, the student's
and the teacher's decode (engine and static-KV rival), prefill, ``transformers.generate``, the hardware's copy and
matmul rates and each figure's floor. ``gpu.py`` (the student against the teacher) and ``variants.py`` (hybrids,
other mixers) compose these; so do the one-off scripts in ``benchmarks/``.
"""

from __future__ import annotations

import gc
import math
import time

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
def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def cuda_time(fn, repeats: int = 1, warm: bool = True, device: str = "cuda") -> float:
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
    t = cuda_time(lambda: b.copy_(a), repeats=20)
    bandwidth = 2 * a.nbytes / t / 1e9
    m = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t = cuda_time(lambda: m @ m, repeats=10)
    del a, b, m
    free_memory()
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
def random_prompts(batch: int, length: int, vocab: int, device: str = "cuda") -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), device=device)


def sync(device: str) -> None:
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
    ids = random_prompts(batch, prompt, student.config.vocab_size, device)
    sync(device)
    t0 = time.perf_counter()
    dec.start(ids, None, prefill_rows)
    sync(device)
    prefill_s = time.perf_counter() - t0
    steps = new_tokens - 1
    t = cuda_time(lambda: [dec.advance() for _ in range(steps)], warm=False, device=device)
    out = {"prefill_s": prefill_s, "decode_tok_s": batch * steps / t, "step_ms": t / steps * 1e3,
           "peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None,
           "state_bytes_per_seq": dec.cache.nbytes() // batch}
    del dec, ids
    free_memory()
    return out


def teacher_decode(teacher, batch, prompt, new_tokens, compile_step, prefill_rows=64) -> dict:
    from llamba.bench.llama_static import StaticLlama

    torch.cuda.reset_peak_memory_stats()
    st = StaticLlama(teacher, batch, prompt + new_tokens, compile=compile_step)
    st.capture()
    ids = random_prompts(batch, prompt, teacher.config.vocab_size)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    st.start(ids, prefill_rows)
    torch.cuda.synchronize()
    prefill_s = time.perf_counter() - t0
    steps = new_tokens - 1
    t = cuda_time(lambda: [st.advance() for _ in range(steps)], warm=False)
    out = {"prefill_s": prefill_s, "decode_tok_s": batch * steps / t, "step_ms": t / steps * 1e3,
           "peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30, "kv_bytes_per_token": st.kv_bytes_per_token()}
    del st, ids
    free_memory()
    return out


def hf_generate(teacher, batch, prompt, new_tokens) -> dict:
    ids = random_prompts(batch, prompt, teacher.config.vocab_size)
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
    out = {"total_s": total, "new_tok_s": batch * new_tokens / total,
           "peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30}
    free_memory()
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
        ids = random_prompts(batch, T, student.config.vocab_size)
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
                    best[name] = min(best[name], cuda_time(fn, repeats=3))
        del dec, st, runs
        free_memory()
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


def fit_batch(decode, rows, budget: float) -> dict:
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
            free_memory()
        guess = int(guess * 0.93) // 8 * 8
    return entry


def fmt(x, digits=0):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:,.{digits}f}"


def device_slug() -> str:
    """'h200' for 'NVIDIA H200', 'h100' for 'NVIDIA H100 80GB HBM3': result files are named by the card."""
    name = torch.cuda.get_device_name().lower().replace("nvidia", "").strip()
    return (name.split() or ["gpu"])[0]
