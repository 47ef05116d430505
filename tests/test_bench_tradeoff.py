"""The quality-against-throughput table and plot (llamba.bench.tradeoff): retention is computed from the files'
own numbers, speed is read from the bench file's rows, and a missing row or metric says what to run."""

import json

import pytest

from llamba.bench import tradeoff

TEACHER = {"arc_easy acc": 0.5, "piqa acc": 0.64, "hellaswag acc_norm": 0.4, "lambada_openai acc": 0.3}
PURE = {"arc_easy acc": 0.45, "piqa acc": 0.6, "hellaswag acc_norm": 0.3, "lambada_openai acc": 0.03}
HYBRID = {"arc_easy acc": 0.43, "piqa acc": 0.6, "hellaswag acc_norm": 0.3, "lambada_openai acc": 0.18}


def _files(tmp_path):
    evals = tmp_path / "eval.json"
    evals.write_text(json.dumps({"rows": {"smollm2-135m": TEACHER, "/root/runs/pure/stage3/final": PURE}}))
    hybrid = tmp_path / "hybrid.json"
    hybrid.write_text(json.dumps({"k4": {"eval": HYBRID}}))
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"device": "NVIDIA H200", "decode": [
        {"model": "student", "prompt": 2048, "batch": 256, "decode_tok_s": 128000.0},
        {"model": "teacher", "prompt": 2048, "batch": 256, "decode_tok_s": 42000.0},
        {"model": "teacher", "prompt": 2048, "batch": 1, "decode_tok_s": 700.0}],
        "hybrids": [{"k": 4, "attention_layers": [20, 23, 24, 26],
                     "decode": [{"prompt": 2048, "batch": 256, "decode_tok_s": 100000.0}]}]}))
    return evals, hybrid, bench


def test_points_table_and_plot(tmp_path):
    evals, hybrid, bench = _files(tmp_path)
    out = tmp_path / "out" / "tradeoff"
    assert tradeoff.main(["--bench", str(bench), "--teacher", str(evals), "rows:smollm2-135m",
                          "--point", "pure", str(evals), "rows:/root/runs/pure/stage3/final", "student",
                          "--point", "hybrid K=4", str(hybrid), "k4:eval", "hybrid4", "--out", str(out)]) == 0
    rows = json.loads(out.with_suffix(".json").read_text())["points"]
    assert [r["label"] for r in rows] == ["teacher", "pure", "hybrid K=4"]
    want = sum(PURE[t] / TEACHER[t] for t in tradeoff.BAR_TASKS) / 4
    assert rows[1]["retention"] == pytest.approx(want) and rows[0]["retention"] == 1.0
    assert [r["decode_tok_s"] for r in rows] == [42000.0, 128000.0, 100000.0]
    assert "| hybrid K=4 |" in out.with_suffix(".md").read_text() and out.with_suffix(".png").stat().st_size > 0


def test_missing_rows_and_metrics_say_what_to_run(tmp_path):
    evals, hybrid, bench = _files(tmp_path)
    data = json.loads(bench.read_text())
    with pytest.raises(ValueError, match="--hybrids"):
        tradeoff.decode_rate(data, "hybrid2", 256, 2048)
    with pytest.raises(ValueError, match="batch 64"):
        tradeoff.decode_rate(data, "student", 64, 2048)
    with pytest.raises(ValueError, match="no key 'k2'"):
        tradeoff.metrics_at(str(hybrid), "k2:eval")
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"m": {"arc_easy acc": 0.4}}))
    with pytest.raises(ValueError, match="--tasks"):
        tradeoff.metrics_at(str(partial), "m")


def test_a_hybrid_is_named_by_its_layers_when_its_k_is_ambiguous(tmp_path):
    _, _, bench = _files(tmp_path)
    data = json.loads(bench.read_text())
    data["hybrids"].append({"k": 4, "attention_layers": [6, 12, 18, 24],
                            "decode": [{"prompt": 2048, "batch": 256, "decode_tok_s": 105000.0}]})
    assert tradeoff.decode_rate(data, "hybrid:20,23,24,26", 256, 2048) == 100000.0
    assert tradeoff.decode_rate(data, "hybrid:6,12,18,24", 256, 2048) == 105000.0
    with pytest.raises(ValueError, match="name one as hybrid:20,23,24,26"):
        tradeoff.decode_rate(data, "hybrid4", 256, 2048)
