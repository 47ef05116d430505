"""`llamba bench serve` end to end on the CPU, at tiny concurrency: a student and a teacher each served on loopback,
measured, and written as results JSON + markdown (the smoke test of the load generator itself)."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("fastapi")

from conftest import make_tiny_student, make_word_tokenizer  # noqa: E402

pytestmark = pytest.mark.timeout(120)


def test_bench_serve_measures_student_and_teacher(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from llamba.checkpoint import save_student
    from llamba.cli import main

    student = save_student(make_tiny_student(), make_word_tokenizer(), tmp_path / "student")
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256))
    teacher.save_pretrained(tmp_path / "teacher")
    make_word_tokenizer().save_pretrained(tmp_path / "teacher")
    out = tmp_path / "serve-cpu"
    assert main(["bench", "serve", "--device", "cpu", "--model", str(student), "--teacher", str(tmp_path / "teacher"),
                 "--concurrency", "1,3", "--prompt-tokens", "5", "--new-tokens", "6", "--requests-per-client", "2",
                 "--threads", "1", "--out", str(out)]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    assert set(result["systems"]) == {"student", "teacher"}
    assert result["systems"]["teacher"]["kind"] == "TeacherSlots"
    for system in result["systems"].values():
        assert [lv["concurrency"] for lv in system["levels"]] == [1, 3]
        for lv in system["levels"]:
            assert lv["requests"] == 2 * lv["concurrency"]
            assert 0 < lv["output_tokens"] <= 6 * lv["requests"]
            assert lv["output_tokens_per_s"] > 0 and 0 < lv["ttft_p50_ms"] <= lv["ttft_p99_ms"]
            assert 0 < lv["itl_p50_ms"] <= lv["itl_p99_ms"]
    md = out.with_suffix(".md").read_text()
    assert "| student | 3 |" in md and "| teacher | 1 |" in md
