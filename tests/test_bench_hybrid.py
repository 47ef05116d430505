"""`llamba bench`'s hybrid study (llamba.bench.gpu.hybrid_study) as a smoke test on the CPU: a tiny Llama teacher,
its hybrids through the same engine and report code the GPU run uses (eager, host-timed, no peak memory)."""

from __future__ import annotations

import argparse

import pytest
import torch

from llamba.bench import gpu

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def test_attention_layers_for():
    assert gpu.attention_layers_for(30, 2) == [10, 20]
    assert gpu.attention_layers_for(30, 4) == [6, 12, 18, 24]
    assert gpu.attention_layers_for(3, 3) == [0, 1, 2]
    assert all(len(set(gpu.attention_layers_for(n, k))) == k for n in range(1, 33) for k in range(1, n + 1))
    with pytest.raises(ValueError, match="1..30"):
        gpu.attention_layers_for(30, 31)


def test_hybrid_study_runs_on_the_cpu():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128, tie_word_embeddings=True)).eval()
    args = argparse.Namespace(prompts=[6, 8], new_tokens=4, hybrid_batches=[1, 2], contexts=[8, 16],
                              sweep_new_tokens=3, no_compile=True, memory_budget_gib=16.0)
    hw = {"bandwidth_gbs": 100.0, "matmul_tflops": 1.0}
    logged = []
    out = gpu.hybrid_study(teacher, hw, 2, args, log=lambda *a: logged.append(a))
    assert out["k"] == 2 and out["attention_layers"] == gpu.attention_layers_for(4, 2)
    assert [d["batch"] for d in out["decode"]] == [1, 2] and all(d["decode_tok_s"] > 0 for d in out["decode"])
    assert all(d["prompt"] == 8 and d["floor_tok_s"] > 0 for d in out["decode"])
    assert [c["context"] for c in out["context_sweep"]] == [8, 16] and all(c["tok_s"] > 0 for c in out["context_sweep"])
    assert "largest_batch" not in out  # needs CUDA's peak memory
    md = "\n".join(gpu.hybrids_markdown([out]))
    assert "Hybrid students" in md and f"| 2 | {out['attention_layers']} | 8 | 2 |" in md
    assert logged


def test_mixer_study_sets_gateloop_beside_the_discrete_mamba2_student():
    """`llamba bench --mixers gateloop`: a GateLoop student through the same engine, reported beside the Discrete
    Mamba-2 student's decode rows at the same prompt and batch."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128, tie_word_embeddings=True)).eval()
    args = argparse.Namespace(prompts=[8], new_tokens=4, hybrid_batches=[1, 2], contexts=[8], sweep_new_tokens=3,
                              no_compile=True, memory_budget_gib=16.0)
    out = gpu.mixer_study(teacher, {"bandwidth_gbs": 100.0, "matmul_tflops": 1.0}, "gateloop", args, log=print)
    assert out["mixer"] == "gateloop" and all(d["decode_tok_s"] > 0 for d in out["decode"])
    pure = [{"model": "student", "prompt": 8, "batch": 2, "decode_tok_s": out["decode"][1]["decode_tok_s"] / 2}]
    md = "\n".join(gpu.mixers_markdown([out], pure))
    assert "| gateloop | 8 | 2 |" in md and "| 2.000 |" in md and "| gateloop | 8 | 1 |" in md


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the device half needs CUDA"))])
def test_variants_run_where_the_teacher_is_in_its_dtype(monkeypatch, device):
    """student_from_teacher builds on the CPU in float32; the study must time the variant on the teacher's device
    and in its dtype (an H200 run once timed the hybrids on the host)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    seen = []

    def fake_decode(student, batch, prompt, new_tokens, compile_step, prefill_rows=64):
        p = next(student.parameters())
        seen.append((p.device.type, p.dtype))
        return {"prefill_s": 1.0, "decode_tok_s": 1.0, "step_ms": 1.0, "peak_gib": None, "state_bytes_per_seq": 1}

    monkeypatch.setattr(gpu, "student_decode", fake_decode)
    teacher = LlamaForCausalLM(LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128, tie_word_embeddings=True))
    teacher = teacher.to(device=device, dtype=torch.float64).eval()
    args = argparse.Namespace(prompts=[8], new_tokens=4, hybrid_batches=[1], contexts=[], sweep_new_tokens=3,
                              no_compile=True, memory_budget_gib=16.0)
    gpu.hybrid_study(teacher, {"bandwidth_gbs": 100.0, "matmul_tflops": 1.0}, 1, args, log=lambda *a: None)
    gpu.mixer_study(teacher, {"bandwidth_gbs": 100.0, "matmul_tflops": 1.0}, "gateloop", args, log=lambda *a: None)
    assert seen and set(seen) == {(device, torch.float64)}
