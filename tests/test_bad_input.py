"""Bad input and faults, tried as a user would, on tiny random models: nothing already made is lost or silently
wrong, and each refusal is one line that names what to fix (docs/errors-and-recovery.md lists them)."""

import json
import shutil

import pytest
import torch

from llamba.cli import main
from llamba.distill import trainer
from llamba.distill.data import find_sources, iter_documents, load_manifest, prepare_data, split_tokens
from llamba.distill.pipeline import Options, run
from llamba.distill.recipes import load_recipe
from llamba.distill.testing import make_corpus, make_teacher


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny teacher, its corpus, and a student converted from it through the CLI."""
    root = tmp_path_factory.mktemp("bad-input")
    corpus = make_corpus(root / "corpus", n_docs=60, n_val=8)
    teacher = make_teacher(root / "teacher", corpus)
    student = root / "student"
    assert main(["convert", "--teacher", str(teacher), "--out", str(student), "--d-state", "8"]) == 0
    return root, corpus, teacher, student


def error_of(capsys, argv) -> str:
    """stderr of a CLI call that must be refused with one clear line (exit 2, no traceback)."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, (code, err)
    return err


def parse_error(capsys, argv) -> str:
    """stderr of a call whose options argparse itself refuses."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def tiny_recipe(tokens=(512, 512, 512)) -> dict:
    r = load_recipe("smoke")
    r.update(d_state=8, seq_len=32, micro_batch=2, batch_tokens=64, eval_tokens=256, val_tokens=256, checkpoint_every=2)
    r["stages"] = {s: {"tokens": t, "lr": 1e-3} for s, t in zip((1, 2, 3), tokens)}
    return r


# -- data loss ------------------------------------------------------------------------------------------------
def test_convert_and_quantize_never_overwrite_silently(tiny, tmp_path, capsys):
    root, _, teacher, student = tiny
    before = (student / "model.safetensors").read_bytes()
    err = error_of(capsys, ["convert", "--teacher", str(teacher), "--out", str(student)])
    assert "not empty" in err and "--force" in err
    assert (student / "model.safetensors").read_bytes() == before
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("mine")
    assert "holds no Llamba student" in error_of(capsys, ["convert", "--teacher", str(teacher), "--out", str(other),
                                                          "--force"])
    assert (other / "todo.txt").read_text() == "mine"
    copy = tmp_path / "copy"
    shutil.copytree(student, copy)
    assert main(["convert", "--teacher", str(teacher), "--out", str(copy), "--force", "--d-state", "4"]) == 0
    assert json.loads((copy / "config.json").read_text())["ssm_cfg"]["d_state"] == 4

    artifact = tmp_path / "q.safetensors"
    assert main(["quantize", str(student), "--bits", "8", "--out", str(artifact)]) == 0
    first = artifact.read_bytes()
    assert "exists" in error_of(capsys, ["quantize", str(student), "--bits", "4", "--out", str(artifact)])
    assert artifact.read_bytes() == first
    assert main(["quantize", str(student), "--bits", "4", "--out", str(artifact), "--force"]) == 0
    assert artifact.read_bytes() != first
    assert "student folder" in error_of(capsys, ["quantize", str(student), "--out", str(student), "--force"])
    assert "no such projection" in error_of(capsys, ["quantize", str(student), "--out", str(tmp_path / "typo"),
                                                     "--bits-for", "inproj=8"])
    assert not (tmp_path / "typo").exists()
    capsys.readouterr()


def test_finished_stage_with_another_budget_is_refused(tiny, tmp_path):
    """The README's `--stage3-tokens 5e7` on a finished run must not return the old student as if trained so."""
    root, corpus, teacher, _ = tiny
    out = tmp_path / "run"
    opts = lambda recipe: Options(teacher=str(teacher), out=out, recipe=recipe, data=str(corpus), stages=(1,),
                                  sample_tokens=0)
    first = run(opts(tiny_recipe()))
    with pytest.raises(ValueError, match=r"stage 1 in .* is finished.*tokens=512 \(now 1024\).*--student .*stage1"):
        run(opts(tiny_recipe((1024, 512, 512))))
    again = run(opts(tiny_recipe()))  # the same request still resumes to the same result
    assert again["stages"] == first["stages"]
    with pytest.raises(ValueError, match="initialised student .* d_state=8 \\(now 16\\)"):
        r = tiny_recipe()
        r["d_state"] = 16
        run(opts(r))


def test_moved_corpus_is_not_tokenized_twice(tiny, tmp_path):
    root, corpus, teacher, _ = tiny
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(teacher)
    here = tmp_path / "here"
    shutil.copytree(corpus, here)
    first = prepare_data(find_sources(str(here)), tok, tmp_path / "data", max_tokens=None, val_tokens=10**6)
    moved = tmp_path / "moved"
    here.rename(moved)
    again = prepare_data(find_sources(str(moved)), tok, tmp_path / "data", max_tokens=None, val_tokens=10**6)
    for split in ("train", "val"):
        assert split_tokens(again, split) == split_tokens(first, split) > 0
    assert len(again["shards"]) == len(first["shards"])
    (moved / "train.jsonl").write_text('{"text": "something else entirely"}\n')
    with pytest.raises(ValueError, match="changed since it was prepared"):
        prepare_data(find_sources(str(moved)), tok, tmp_path / "data", max_tokens=None, val_tokens=10**6)
    assert split_tokens(load_manifest(tmp_path / "data"), "train") == split_tokens(first, "train")


# -- damaged files --------------------------------------------------------------------------------------------
def test_damaged_weights_are_named(tiny, tmp_path, capsys):
    root, _, teacher, student = tiny
    from llamba.checkpoint import load_student

    broken = tmp_path / "broken"
    shutil.copytree(student, broken)
    weights = broken / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    err = error_of(capsys, ["quantize", str(broken), "--out", str(tmp_path / "q")])
    assert str(weights) in err and "truncated" in err
    weights.write_bytes(b"")
    assert "empty" in error_of(capsys, ["quantize", str(broken), "--out", str(tmp_path / "q")])
    flipped = bytearray(data)
    flipped[-100:-90] = bytes(10)  # inside the last tensor: safetensors itself cannot tell
    weights.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="SHA-256"):
        load_student(broken)
    (broken / "llamba-digests.json").unlink()  # no digest (an official checkpoint): loads unchecked
    load_student(broken)

    bad_teacher = tmp_path / "teacher"
    shutil.copytree(teacher, bad_teacher)
    tw = bad_teacher / "model.safetensors"
    tw.write_bytes(tw.read_bytes()[:1000])
    err = error_of(capsys, ["convert", "--teacher", str(bad_teacher), "--out", str(tmp_path / "s1")])
    assert str(tw) in err
    shutil.copy(teacher / "model.safetensors", tw)
    config = json.loads((bad_teacher / "config.json").read_text())
    config["intermediate_size"] += 8
    (bad_teacher / "config.json").write_text(json.dumps(config))
    err = error_of(capsys, ["convert", "--teacher", str(bad_teacher), "--out", str(tmp_path / "s2")])
    assert "mlp" in err and "config.json implies" in err


def test_damaged_run_checkpoint_is_named(tiny, tmp_path, monkeypatch):
    root, corpus, teacher, _ = tiny
    out = tmp_path / "run"

    class Killed(BaseException):
        pass

    def die(code):
        raise Killed

    monkeypatch.setattr(trainer.os, "_exit", die)
    monkeypatch.setenv(trainer.CRASH_ENV, "1:3")
    opts = Options(teacher=str(teacher), out=out, recipe=tiny_recipe(), data=str(corpus), stages=(1,), sample_tokens=0)
    with pytest.raises(Killed):
        run(opts)
    monkeypatch.delenv(trainer.CRASH_ENV)
    weights = out / "stage1" / "checkpoint" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:64])
    with pytest.raises(ValueError, match=r"checkpoint/model.safetensors.*Delete .*checkpoint to restart stage 1"):
        run(opts)


# -- plausible mistakes ---------------------------------------------------------------------------------------
def test_distill_input_mistakes_refused_before_heavy_work(tiny, tmp_path, capsys):
    root, corpus, teacher, student = tiny
    base = ["distill", "--teacher", str(teacher), "--data", str(corpus), "--out", str(tmp_path / "run")]
    err = error_of(capsys, base + ["--student", str(teacher)])
    assert "not a Llamba student" in err and "--teacher" in err
    other = make_teacher(tmp_path / "other", layers=3)
    assert main(["convert", "--teacher", str(other), "--out", str(tmp_path / "other-student")]) == 0
    err = error_of(capsys, base + ["--student", str(tmp_path / "other-student"), "--stages", "3"])
    assert "does not fit the teacher" in err and "n_layer 3" in err
    assert "less than one optimizer step" in error_of(capsys, base + ["--stage1-tokens", "100"])
    if not torch.cuda.is_available():
        assert "no CUDA device" in error_of(capsys, base + ["--device", "cuda"])
    assert not (tmp_path / "run" / "data").exists()  # refused before any data was prepared


def test_ctrl_c_says_where_and_how_to_resume(tiny, tmp_path, monkeypatch, capsys):
    root, corpus, teacher, _ = tiny
    calls = {"n": 0}
    real = trainer.run_stage_module

    def interrupted(*args):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(trainer, "run_stage_module", interrupted)
    out = tmp_path / "run"
    argv = ["distill", "--teacher", str(teacher), "--data", str(corpus), "--out", str(out), "--stages", "1",
            "--d-state", "8", "--seq-len", "32", "--micro-batch", "2", "--batch-tokens", "64", "--stage1-tokens", "512",
            "--checkpoint-every", "2", "--val-tokens", "256", "--eval-tokens", "256", "--sample-tokens", "0"]
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "interrupted in stage 1 after step 4/8" in err and "again to resume" in err and "Traceback" not in err


def test_eval_ppl_refuses_a_student_on_another_tokenizer(tiny, tmp_path, capsys):
    root, corpus, teacher, student = tiny
    other = make_teacher(tmp_path / "other", vocab=300)
    assert main(["convert", "--teacher", str(other), "--out", str(tmp_path / "other-student")]) == 0
    err = error_of(capsys, ["eval", "--models", str(teacher), str(tmp_path / "other-student"), "--tasks", "ppl",
                            "--ppl-text", str(corpus / "val.jsonl"), "--ppl-tokens", "64", "--ppl-seq-len", "32",
                            "--out", str(tmp_path / "eval")])
    assert "another tokenizer" in err


# -- data and eval files --------------------------------------------------------------------------------------
def test_data_file_errors_name_file_and_line(tiny, tmp_path):
    root, corpus, teacher, _ = tiny
    bad = tmp_path / "bad.jsonl"
    cases = [(b'{"text": "a"}\n\n{"text": "b"}\n{"text": oops}\n', "line 4 is not valid JSON"),
             (b'{"text": "a"}\n{"text": "caf\xe9"}\n', "line 2 is not valid UTF-8"),
             (b'{"text": "a"}\n{"text": 12}\n', "line 2: 'text' is a int"),
             (b'{"text": "a"}\n["text"]\n', "line 2 is a JSON list")]
    for content, says in cases:
        bad.write_bytes(content)
        with pytest.raises(ValueError, match=f"{bad}: {says}"):
            list(iter_documents(str(bad)))
    from transformers import AutoTokenizer

    empty = tmp_path / "src"
    empty.mkdir()
    shutil.copy(corpus / "val.jsonl", empty / "val.jsonl")
    (empty / "train.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="train.jsonl: no documents"):
        prepare_data(find_sources(str(empty)), AutoTokenizer.from_pretrained(teacher), tmp_path / "d", None, 100)

    from llamba.eval import data as eval_data

    (tmp_path / "arc_easy.jsonl").write_text('{"query": "q", "choices": ["a"], "gold": 0}\n{"query": \n')
    with pytest.raises(ValueError, match="arc_easy.jsonl: line 2 is not valid JSON"):
        eval_data.arc_easy(data_dir=tmp_path)
    (tmp_path / "piqa_valid.jsonl").write_text('{"goal": "g", "sol1": "a", "sol2": "b"}\n')
    (tmp_path / "piqa_valid_labels.lst").write_text("yes\n")
    with pytest.raises(ValueError, match="piqa_valid_labels.lst: label 1 is 'yes'"):
        eval_data.piqa(data_dir=tmp_path)


# -- numeric options: every command checks them where they are parsed -------------------------------------------
@pytest.mark.parametrize("argv, says", [
    (["convert", "--teacher", "t", "--out", "o", "--d-state", "0"], "--d-state: must be at least 1"),
    (["quantize", "s", "--out", "o", "--group-size", "0"], "--group-size: must be at least 32"),
    (["quantize", "s", "--out", "o", "--group-size", "48"], "--group-size: must be a multiple of 32"),
    (["quantize", "s", "--out", "o", "--bits-for", "in_proj:8"], "--bits-for: 'in_proj:8': write NAME=BITS"),
    (["quantize", "s", "--out", "o", "--bits-for", "in_proj=5"], "--bits-for: 'in_proj=5': write NAME=BITS"),
    (["distill", "--out", "o", "--stage3-tokens", "0"], "--stage3-tokens: must be at least 1"),
    (["distill", "--out", "o", "--stage2-tokens=-5e6"], "--stage2-tokens: must be at least 1"),
    (["distill", "--out", "o", "--seq-len", "0"], "--seq-len: must be at least 2"),
    (["distill", "--out", "o", "--micro-batch", "0"], "--micro-batch: must be at least 1"),
    (["distill", "--out", "o", "--batch-tokens", "0"], "--batch-tokens: must be at least 1"),
    (["distill", "--out", "o", "--stage1-lr", "0"], "--stage1-lr: must be above 0"),
    (["distill", "--out", "o", "--temperature", "nan"], "--temperature: expected a number"),
    (["distill", "--out", "o", "--max-tokens", "2.5"], "--max-tokens: expected a whole number"),
    (["distill", "--out", "o", "--stages", "4"], "--stages: stages are 1, 2 and 3"),
    (["eval", "--models", "m", "--limit", "0"], "--limit: expected examples per task"),
    (["eval", "--models", "m", "--limit", "2.5"], "--limit: a count of examples must be a whole number"),
    (["eval", "--models", "m", "--batch-size", "0"], "--batch-size: must be at least 1"),
    (["eval", "--models", "m", "--ppl-seq-len", "1"], "--ppl-seq-len: must be at least 2"),
    (["bench", "--device", "cpu", "--repeats", "0"], "--repeats: must be at least 1"),
    (["bench", "--device", "cpu", "--threads", "0"], "--threads: must be at least 1"),
    (["bench", "--device", "cpu", "--contexts", "128,0"], "--contexts: must be at least 1"),
    (["bench", "--device", "cpu", "--new-tokens", "1"], "--new-tokens: must be at least 2"),
])
def test_numeric_options_are_checked_when_parsed(capsys, argv, says):
    assert says in parse_error(capsys, argv)


# -- the first run --------------------------------------------------------------------------------------------
def test_cpu_run_says_it_is_the_smoke_preset(tiny, tmp_path, monkeypatch, capsys):
    root, corpus, teacher, _ = tiny
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    base = ["distill", "--teacher", str(teacher), "--data", str(corpus), "--out", str(tmp_path / "run")]
    assert "runs the `smoke` recipe" in error_of(capsys, base + ["--stage1-tokens", "1"])  # said first, then refused
    assert "smoke" not in error_of(capsys, base + ["--recipe", "smoke", "--stage1-tokens", "1"])


def test_commands_print_no_library_noise(tiny, tmp_path, capsys):
    root, _, teacher, student = tiny
    assert main(["convert", "--teacher", str(teacher), "--out", str(tmp_path / "s")]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("teacher:"), err  # no load / save bars


def test_cpu_bench_reports_each_measurement(monkeypatch, capsys, tmp_path):
    """The default CPU benchmark runs for minutes: a line per measurement, not long silent gaps. The worker
    processes are replaced by instant ones; the loop and its output are the real ones."""
    import argparse

    from llamba.bench import cpu

    class InstantWorker:
        rss_loaded = 1.0

        def __init__(self, name, kind, spec):
            pass

        def call(self, cmd, arg):
            return {"seconds": 0.5, "rss_mib": 1.0, "rss_growth_mib": 0.0}

        def stop(self):
            pass

    monkeypatch.setattr(cpu, "Worker", InstantWorker)
    import llamba.teacher

    monkeypatch.setattr(llamba.teacher, "resolve_teacher", lambda name: (tmp_path, None))
    args = argparse.Namespace(teacher="t", model=str(tmp_path), contexts=[64, 128], new_tokens=4, quant=["none"],
                              threads=1, repeats=2, rivals=["none"])
    cpu.run_benchmark(args)
    out = capsys.readouterr().out
    assert "[1/6" in out and "[6/6" in out and "context 128: student-none decode round 2/2" in out, out
