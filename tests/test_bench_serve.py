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
    assert result["prefill_chunk"] == 256  # a CPU's default (2048 on CUDA: serve.server.default_prefill_chunk)
    assert result["systems"]["teacher"]["kind"] == "TeacherSlots"
    for system in result["systems"].values():
        assert [lv["concurrency"] for lv in system["levels"]] == [1, 3]
        for lv in system["levels"]:
            assert lv["requests"] == 2 * lv["concurrency"] and lv["failed"] == 0 and lv["errors"] == []
            assert 0 < lv["output_tokens"] <= 6 * lv["requests"]
            assert lv["output_tokens_per_s"] > 0 and 0 < lv["ttft_p50_ms"] <= lv["ttft_p99_ms"]
            assert 0 < lv["itl_p50_ms"] <= lv["itl_p99_ms"]
    md = out.with_suffix(".md").read_text()
    assert "| student | 3 | 6 | 0 |" in md and "| teacher | 1 | 2 | 0 |" in md
    # concurrency 256 and 64 were not run: only the failure bar can be read, and it is met
    assert result["bars"] == [{"bar": "requests failed or dropped, all levels", "value": 0, "target": "0", "met": True}]
    assert "| requests failed or dropped, all levels | 0 | 0 | yes |" in md


def test_bars_read_the_measured_levels():
    from llamba.bench.serve import bars, bars_table

    def level(c, tok_s, itl_p99, failed=0):
        return {"concurrency": c, "output_tokens_per_s": tok_s, "itl_p99_ms": itl_p99, "failed": failed}

    systems = {"student": {"levels": [level(1, 50.0, 10.0), level(64, 2000.0, 25.0), level(256, 6000.0, 40.0)]},
               "teacher": {"levels": [level(1, 40.0, 8.0), level(256, 1500.0, 90.0, failed=2)]}}
    rows = {r["bar"].split(" at")[0].split(",")[0]: r for r in bars(systems)}
    assert rows["student / teacher output tok/s"]["value"] == 4.0 and rows["student / teacher output tok/s"]["met"]
    assert rows["student p99 ITL"]["value"] == 2.5 and not rows["student p99 ITL"]["met"]
    assert rows["requests failed or dropped"]["value"] == 2 and not rows["requests failed or dropped"]["met"]
    table = bars_table(bars(systems))
    assert "| student p99 ITL at concurrency 64 / at concurrency 1 | 2.50 | <= 2 | **no** |" in table


def test_a_level_whose_requests_all_fail_says_why(tmp_path):
    import asyncio

    from llamba.bench.serve import load_level
    from llamba.checkpoint import save_student
    from llamba.serve.server import BackgroundServer, build_app, load_served

    student = save_student(make_tiny_student(), make_word_tokenizer(), tmp_path / "student")
    served = load_served(str(student), 2, 32, "cpu", name="student")
    with BackgroundServer(build_app(served, max_queue=4, prefill_chunk=8, default_max_tokens=4)) as server:
        with pytest.raises(RuntimeError, match="every request at concurrency 2 failed.*404"):
            asyncio.run(load_level(server.url, "not-this-model", 2, 1, 3, 4, 100))


def test_a_system_that_fails_keeps_the_others_levels_and_says_so(tmp_path):
    """The teacher cannot be served (here: no such folder): the student's measured levels are still written, the
    teacher's error is in the result and its bars, and the command exits 1. (HTTP in a process of its own.)"""
    from llamba.checkpoint import save_student
    from llamba.cli import main

    student = save_student(make_tiny_student(), make_word_tokenizer(), tmp_path / "student")
    out = tmp_path / "serve-cpu"
    assert main(["bench", "serve", "--device", "cpu", "--model", str(student), "--teacher", str(tmp_path / "none"),
                 "--concurrency", "2", "--prompt-tokens", "4", "--new-tokens", "3", "--requests-per-client", "1",
                 "--threads", "1", "--stream-interval", "2", "--api-processes", "1", "--out", str(out)]) == 1
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["stream_interval"] == 2 and result["api_processes"] == 1
    assert [lv["concurrency"] for lv in result["systems"]["student"]["levels"]] == [2]
    assert "error" not in result["systems"]["student"]
    teacher = result["systems"]["teacher"]
    assert teacher["levels"] == [] and str(tmp_path / "none") in teacher["error"]
    assert {"bar": "teacher ran every level", "value": teacher["error"], "target": "no error",
            "met": False} in result["bars"]
    assert "| teacher ran every level |" in out.with_suffix(".md").read_text()


def test_an_interrupted_run_writes_the_levels_it_measured(tmp_path, monkeypatch):
    """serve_bench.sh ends a run past its time with SIGINT: the levels measured before it are written, the
    interrupted system says so, and no later system starts."""
    import llamba.bench.serve as serve_bench
    from llamba.checkpoint import save_student
    from llamba.cli import main

    real, calls = serve_bench.load_level, []

    async def interrupted_after_one_level(*args, **kwargs):
        calls.append(args[2])
        if len(calls) == 3:  # warm-up, the first level, then the interrupt
            raise KeyboardInterrupt
        return await real(*args, **kwargs)

    monkeypatch.setattr(serve_bench, "load_level", interrupted_after_one_level)
    student = save_student(make_tiny_student(), make_word_tokenizer(), tmp_path / "student")
    out = tmp_path / "serve-cpu"
    assert main(["bench", "serve", "--device", "cpu", "--model", str(student), "--teacher", str(student),
                 "--concurrency", "1,2", "--prompt-tokens", "4", "--new-tokens", "3", "--requests-per-client", "1",
                 "--threads", "1", "--out", str(out)]) == 1
    result = json.loads(out.with_suffix(".json").read_text())
    assert [lv["concurrency"] for lv in result["systems"]["student"]["levels"]] == [1]
    assert "interrupted" in result["systems"]["student"]["error"] and "teacher" not in result["systems"]
