"""`llamba bench`'s hybrid study (llamba.bench.variants.hybrid_study) as a smoke test on the CPU: a tiny Llama teacher,
its hybrids through the same engine and report code the GPU run uses (eager, host-timed, no peak memory)."""

from __future__ import annotations

import argparse

import pytest
import torch

from llamba.bench import gpu, variants

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def test_attention_layers_for():
    assert variants.attention_layers_for(30, 2) == [10, 20]
    assert variants.attention_layers_for(30, 4) == [6, 12, 18, 24]
    assert variants.attention_layers_for(3, 3) == [0, 1, 2]
    assert all(len(set(variants.attention_layers_for(n, k))) == k for n in range(1, 33) for k in range(1, n + 1))
    with pytest.raises(ValueError, match="1..30"):
        variants.attention_layers_for(30, 31)


def _bench_args(argv):
    from llamba.cli import bench

    parser = argparse.ArgumentParser(exit_on_error=False)
    bench.register(parser)
    return parser.parse_args(argv)


def test_hybrids_take_a_k_or_exactly_the_given_layers():
    """`--hybrids 2 20,23,24,26`: a bare integer is K spaced evenly, a comma list is exactly those layers (the ones
    `--attention-layers auto:4` chose); the label names the layers either way."""
    assert _bench_args([]).hybrids == [2, 4]
    assert _bench_args(["--hybrids"]).hybrids == []
    specs = _bench_args(["--hybrids", "2", "20,23,24,26", "26,20, 23,24", "7,"]).hybrids
    assert specs == [2, [20, 23, 24, 26], [20, 23, 24, 26], [7]]
    assert [variants.hybrid_layers(s, 30) for s in specs] == [[10, 20], [20, 23, 24, 26], [20, 23, 24, 26], [7]]
    assert variants.hybrid_layers(4, 30) == [6, 12, 18, 24]  # K=4 spaced evenly is another hybrid than the chosen one
    assert variants.hybrid_label({"k": 4, "attention_layers": [20, 23, 24, 26]}) == "K=4 (20,23,24,26)"


@pytest.mark.parametrize("item, message", [
    ("20,23,23,26", "repeats 23"), ("20,x", "whole numbers >= 0"), ("20,2.5", "whole numbers >= 0"),
    ("20,-1", "whole numbers >= 0"), (",", "give a K"), ("2.5", "give a K"), ("four", "give a K"),
    ("0", "at least 1")])
def test_hybrids_refuse_a_malformed_item_as_the_command_line_is_read(item, message):
    with pytest.raises(argparse.ArgumentError, match=message):
        _bench_args(["--hybrids", item])


@pytest.mark.parametrize("spec, message", [([20, 23, 30], r"--hybrids 20,23,30: .*\[30\].*0\.\.29"),
                                           ([3, 3], "only once"), (31, "--hybrids 31: .*1..30")])
def test_hybrid_layers_past_the_teacher_fail_before_any_gpu_work(monkeypatch, spec, message):
    """The range needs the teacher's layer count: run_benchmark reads it from the config and refuses the list
    before it measures the hardware (the first GPU work)."""
    with pytest.raises(ValueError, match=message):
        variants.hybrid_layers(spec, 30)

    def no_gpu():
        raise AssertionError("GPU work before the --hybrids check")

    monkeypatch.setattr(gpu, "measure_hardware", no_gpu)
    args = argparse.Namespace(teacher=None, model=None, hybrids=[2, spec])
    assert variants.teacher_layer_count(None) == 30
    with pytest.raises(ValueError, match=message):
        gpu.run_benchmark(args)


def test_hybrids_table_reads_the_bars_as_ratios_to_the_teacher():
    """Issue 23's bars, computed from the measured rows of one run: decode tok/s at batch 256 over the teacher's
    (>= 2x) and the largest batch in the budget over the teacher's (>= 4x), for every model of the run."""
    decode = [{"model": "teacher", "prompt": 2048, "batch": 256, "decode_tok_s": 40000.0},
              {"model": "teacher", "prompt": 2048, "batch": 64, "decode_tok_s": 20000.0},
              {"model": "teacher", "prompt": 512, "batch": 256, "decode_tok_s": 99999.0},
              {"model": "student", "prompt": 2048, "batch": 256, "decode_tok_s": 130000.0}]
    largest = {"budget_gib": 16.0, "prompt": 2048, "teacher": {"batch": 120}, "student": {"batch": 1200}}

    def hybrid(layers, rates, fit):
        return {"k": len(layers), "attention_layers": layers, "context_sweep": [],
                "decode": [{"prompt": 2048, "batch": b, "decode_tok_s": r, "floor_tok_s": 1.0, "peak_gib": 1.0}
                           for b, r in rates.items()],
                "largest_batch": {"batch": fit, "budget_gib": 16.0, "prompt": 2048, "decode_tok_s": 1.0,
                                  "peak_gib": 15.0}}

    hybrids = [hybrid([10, 20], {64: 30000.0, 256: 110000.0}, 600),
               hybrid([20, 23, 24, 26], {64: 25000.0, 256: 90000.0}, 504)]
    md = "\n".join(variants.hybrids_markdown(hybrids, decode, largest))
    assert "bar: K=4 >= 2x" in md and "bar: K=4 >= 4x" in md and "largest batch in 16.0 GiB" in md
    assert "| teacher | 40,000 | 1.00x | 120 | 1.00x |" in md
    assert "| pure student | 130,000 | 3.25x | 1,200 | 10.00x |" in md
    assert "| hybrid K=2 (10,20) | 110,000 | 2.75x | 600 | 5.00x |" in md
    assert "| hybrid K=4 (20,23,24,26) | 90,000 | 2.25x | 504 | 4.20x |" in md
    # each decode row against the teacher's at its own prompt and batch
    assert "| K=4 (20,23,24,26) | 2048 | 64 | 25,000 | 1.25x |" in md
    # a missing teacher measurement gives no ratio rather than a made-up one
    md = "\n".join(variants.hybrids_markdown(hybrids, decode[1:], {"budget_gib": 16.0}))
    assert "| hybrid K=4 (20,23,24,26) | 90,000 | - | 504 | - |" in md


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
    out = variants.hybrid_study(teacher, hw, 2, args, log=lambda *a: logged.append(a))
    assert out["k"] == 2 and out["attention_layers"] == variants.attention_layers_for(4, 2)
    assert [d["batch"] for d in out["decode"]] == [1, 2] and all(d["decode_tok_s"] > 0 for d in out["decode"])
    assert all(d["prompt"] == 8 and d["floor_tok_s"] > 0 for d in out["decode"])
    assert [c["context"] for c in out["context_sweep"]] == [8, 16] and all(c["tok_s"] > 0 for c in out["context_sweep"])
    assert "largest_batch" not in out  # needs CUDA's peak memory
    md = "\n".join(variants.hybrids_markdown([out]))
    assert "Hybrid students" in md and "| K=2 (1,2) | 8 | 2 |" in md
    assert logged and logged[0][:2] == ("hybrid K=2 (1,2)", out["decode"][0])
    chosen = variants.hybrid_study(teacher, hw, [3, 0], args, log=lambda *a: None)
    assert chosen["k"] == 2 and chosen["attention_layers"] == [0, 3]


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
    out = variants.mixer_study(teacher, {"bandwidth_gbs": 100.0, "matmul_tflops": 1.0}, "gateloop", args, log=print)
    assert out["mixer"] == "gateloop" and all(d["decode_tok_s"] > 0 for d in out["decode"])
    pure = [{"model": "student", "prompt": 8, "batch": 2, "decode_tok_s": out["decode"][1]["decode_tok_s"] / 2}]
    md = "\n".join(variants.mixers_markdown([out], pure))
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

    monkeypatch.setattr(variants, "student_decode", fake_decode)
    teacher = LlamaForCausalLM(LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128, tie_word_embeddings=True))
    teacher = teacher.to(device=device, dtype=torch.float64).eval()
    args = argparse.Namespace(prompts=[8], new_tokens=4, hybrid_batches=[1], contexts=[], sweep_new_tokens=3,
                              no_compile=True, memory_budget_gib=16.0)
    variants.hybrid_study(teacher, {"bandwidth_gbs": 100.0, "matmul_tflops": 1.0}, 1, args, log=lambda *a: None)
    variants.mixer_study(teacher, {"bandwidth_gbs": 100.0, "matmul_tflops": 1.0}, "gateloop", args, log=lambda *a: None)
    assert seen and set(seen) == {(device, torch.float64)}
