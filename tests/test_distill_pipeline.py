"""The whole distillation pipeline on a tiny trained teacher: every stage lowers its loss, the distilled student's
KL to the teacher ends far below the initialised student's, and a run killed twice resumes to the same weights."""

import json

import pytest
import torch
from safetensors.torch import load_file

from llamba.distill import trainer
from llamba.distill.pipeline import Options, run
from llamba.distill.recipes import load_recipe
from llamba.distill.report import read_metrics
from llamba.distill.testing import make_corpus, make_teacher


@pytest.fixture(scope="module")
def one_thread():
    # Tiny matrices: one thread is several times faster than two, and immune to a busy machine.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_recipe() -> dict:
    """The smoke preset, shrunk to the tiny teacher."""
    r = load_recipe("smoke")
    r.update(d_state=16, seq_len=64, micro_batch=4, batch_tokens=256, eval_tokens=2048, checkpoint_every=5)
    r["stages"] = {1: {"tokens": 2048, "lr": 1e-2}, 2: {"tokens": 4096, "lr": 1e-2}, 3: {"tokens": 16384, "lr": 1e-2}}
    return r


@pytest.fixture(scope="module")
def setup(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("distill-pipeline")
    corpus = make_corpus(root / "corpus", n_docs=300, n_val=30)
    teacher = make_teacher(root / "teacher", corpus, train_steps=200)  # a teacher with structure worth distilling
    summary = run(Options(teacher=str(teacher), out=root / "ref", recipe=tiny_recipe(), data=str(corpus), sample_tokens=8))
    return root, corpus, teacher, summary


def test_end_to_end_lowers_every_loss_and_kl(setup):
    root, _, _, summary = setup
    rows = read_metrics(root / "ref" / "metrics.jsonl")
    assert sorted(rows) == [1, 2, 3]
    for stage, r in rows.items():
        first = sum(x["loss"] for x in r[:3]) / 3
        last = sum(x["loss"] for x in r[-3:]) / 3
        assert last < 0.9 * first, f"stage {stage}: loss {first:.3f} -> {last:.3f}"
    init, final = summary["eval"]["init"], summary["eval"]["final"]
    assert final["kl_per_token"] < 0.25 * init["kl_per_token"], (init, final)
    assert final["student_ppl"] < init["student_ppl"]
    for name in ("summary.json", "summary.md", "loss_stage1.png", "loss_stage3.png", "init_eval.json"):
        assert (root / "ref" / name).exists(), name
    assert any((root / "ref" / "tensorboard").iterdir())
    assert "distilled student" in (root / "ref" / "summary.md").read_text()
    assert isinstance(summary["sample"]["student"], str)


def test_rerun_skips_finished_stages(setup):
    root, corpus, teacher, summary = setup
    again = run(Options(teacher=str(teacher), out=root / "ref", recipe=tiny_recipe(), data=str(corpus), sample_tokens=0))
    assert again["stages"] == summary["stages"] and again["eval"]["final"] == summary["eval"]["final"]
    # the finished stages' walls are carried, not this (short) process's
    assert again["wall_s_stages"] == summary["wall_s_stages"] == sum(s["wall_s"] for s in summary["stages"].values())


def test_kill_and_resume_gives_the_same_weights(setup, monkeypatch):
    """Killed in stage 2 (between checkpoints) and again in stage 3; the same command finishes identically."""
    root, corpus, teacher, _ = setup
    out = root / "killed"
    data = root / "ref" / "data"  # the prepared folder: also checks that --data accepts one

    class Killed(BaseException):
        pass

    def die(code):  # what os._exit would leave on disk, without losing the test process
        raise Killed

    monkeypatch.setattr(trainer.os, "_exit", die)
    for crash in ("2:8", "3:13", "3:64"):  # the last: after stage 3's final checkpoint, before its final/
        monkeypatch.setenv(trainer.CRASH_ENV, crash)
        with pytest.raises(Killed):
            run(Options(teacher=str(teacher), out=out, recipe=tiny_recipe(), data=str(data), sample_tokens=0))
    monkeypatch.delenv(trainer.CRASH_ENV)
    resumed = run(Options(teacher=str(teacher), out=out, recipe=tiny_recipe(), data=str(data), sample_tokens=0))
    # the stage that resumed at its last step reports the time of the calls that trained it, not the last call's 0 s
    third = resumed["stages"]["3"]
    assert third["wall_s"] > 0.1 and 0 < third["tokens_per_s"] < 1e9 and third["tokens_per_s_steady"] > 0
    ref = load_file(str(root / "ref" / "stage3" / "final" / "model.safetensors"))
    got = load_file(str(out / "stage3" / "final" / "model.safetensors"))
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    # the resumed stages logged their lost steps again; the plot keeps one value per step
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows[3]] == list(range(1, 65))


def test_nan_steps_are_skipped_then_stop(setup, monkeypatch):
    root, corpus, teacher, _ = setup
    real = trainer.run_stage_module
    calls = {"n": 0}

    def poisoned(bad):
        def f(*args):
            calls["n"] += 1
            loss, parts = real(*args)
            return (loss * float("nan") if bad(calls["n"]) else loss), parts
        return f

    def go(name):
        return run(Options(teacher=str(teacher), out=root / name, recipe=tiny_recipe(), data=str(root / "ref" / "data"),
                           stages=(3,), student=str(root / "ref" / "init"), sample_tokens=0))

    monkeypatch.setattr(trainer, "run_stage_module", poisoned(lambda n: n == 2))  # one bad micro-batch: skipped
    summary = go("nan-once")
    assert torch.isfinite(torch.tensor(summary["eval"]["final"]["kl_per_token"]))
    lines = [json.loads(x) for x in (root / "nan-once" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 64 and sum(not torch.isfinite(torch.tensor(x["loss"])) for x in lines) == 1

    calls["n"] = 0
    monkeypatch.setattr(trainer, "run_stage_module", poisoned(lambda n: n >= 2))  # keeps failing: stop
    with pytest.raises(RuntimeError, match="3 non-finite steps in a row"):
        go("nan-always")
    lines = (root / "nan-always" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3  # one good step, two skipped ones; the third bad one stops the run


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_run(setup, tmp_path):
    """The CUDA path: bf16 teacher, bf16 autocast over fp32 weights, fused AdamW, Triton scan when installed."""
    root, _, teacher, ref = setup
    s = run(Options(teacher=str(teacher), out=tmp_path / "cuda", recipe=tiny_recipe(), data=str(root / "ref" / "data"),
                    device="cuda", sample_tokens=8))
    assert s["eval"]["final"]["kl_per_token"] < 0.25 * s["eval"]["init"]["kl_per_token"]
    assert s["eval"]["final"]["kl_per_token"] < 2 * ref["eval"]["final"]["kl_per_token"] + 0.05


def test_no_data_falls_back_to_teacher_samples(setup, monkeypatch, tmp_path):
    """Without --data and without the hub: text sampled from the teacher (seeded, cached), and the log says so."""
    from llamba.distill import pipeline

    root, _, teacher, _ = setup
    monkeypatch.setattr(pipeline, "hub_reachable", lambda timeout=5.0: False)
    r = tiny_recipe()
    r["val_tokens"] = 512
    r["stages"] = {1: {"tokens": 1024}, 2: {"tokens": 1024}, 3: {"tokens": 1024}}
    opts = lambda out: Options(teacher=str(teacher), out=out, recipe=r, prepare_only=True)
    run(opts(tmp_path / "a"))
    run(opts(tmp_path / "b"))
    a, b = (tmp_path / "a" / "teacher-samples.jsonl").read_text(), (tmp_path / "b" / "teacher-samples.jsonl").read_text()
    assert a == b and len(a.splitlines()) >= 1  # seeded
    from llamba.distill.data import load_manifest, split_tokens

    m = load_manifest(tmp_path / "a" / "data")
    assert split_tokens(m, "train") + split_tokens(m, "val") >= 1024 + 512 and split_tokens(m, "val") > 0


def test_teacher_samples_command_writes_extends_and_feeds_distill(setup, tmp_path):
    """`python -m llamba.distill.teacher_samples`: a seeded corpus file, extended (not redone) to a larger --tokens,
    that `llamba distill --data` reads like any other source."""
    from llamba.distill import teacher_samples
    from llamba.distill.data import load_manifest, split_tokens

    _, _, teacher, _ = setup
    out = tmp_path / "samples.jsonl"
    args = ["--teacher", str(teacher), "--out", str(out), "--rows", "4", "--length", "24", "--device", "cpu"]
    assert teacher_samples.main([*args, "--tokens", "200"]) == 0
    first = out.read_text().splitlines()
    assert sum(json.loads(line)["tokens"] for line in first) >= 200
    teacher_samples.main([*args, "--tokens", "500"])
    more = out.read_text().splitlines()
    assert more[: len(first)] == first and sum(json.loads(line)["tokens"] for line in more) >= 500
    r = tiny_recipe()
    r["val_tokens"] = 64
    run(Options(teacher=str(teacher), out=tmp_path / "run", recipe=r, data=str(out), prepare_only=True,
                max_tokens=256))
    assert split_tokens(load_manifest(tmp_path / "run" / "data"), "train") >= 256


def test_calibrated_attention_init_runs_through_the_pipeline(setup, tmp_path):
    """`--init attention-calibrated` (recipe field init) builds its student from the teacher and distils from it."""
    _, corpus, teacher, _ = setup
    r = tiny_recipe()
    r["init"] = "attention-calibrated"
    r["stages"][3]["tokens"] = 4096
    s = run(Options(teacher=str(teacher), out=tmp_path / "cal", recipe=r, data=str(corpus), stages=(3,),
                    sample_tokens=0))
    assert s["eval"]["final"]["kl_per_token"] < s["eval"]["init"]["kl_per_token"]
    assert json.loads((tmp_path / "cal" / "init_eval.json").read_text())["kl_per_token"] == pytest.approx(
        s["eval"]["init"]["kl_per_token"])


def test_compile_is_for_cuda_and_a_cpu_run_is_the_eager_run(setup, tmp_path, capfd):
    """The smollm2-135m recipe compiles the student's blocks; on a CPU the trainer says so and runs eager (inductor
    would spend minutes building C++ for a gain only measured on CUDA): the same weights as compile off."""
    _, corpus, teacher, _ = setup
    finals = {}
    for mode in (False, "blocks"):
        r = tiny_recipe()
        r["compile"] = mode
        r["stages"][3]["tokens"] = 1024
        run(Options(teacher=str(teacher), out=tmp_path / str(mode), recipe=r, data=str(corpus), stages=(3,),
                    sample_tokens=0))
        finals[mode] = load_file(tmp_path / str(mode) / "stage3" / "final" / "model.safetensors")
    assert "compile: blocks is for CUDA; on cpu the models run eager" in capfd.readouterr().err
    assert finals[False].keys() == finals["blocks"].keys()
    assert all(torch.equal(finals[False][k], finals["blocks"][k]) for k in finals[False])


def test_cli_compile_flag_reaches_the_recipe():
    """`--compile` / `--compile pieces` / `--compile off` over the recipe's own (smollm2-135m: blocks)."""
    import argparse

    from llamba.cli import distill as cli

    parser = argparse.ArgumentParser()
    cli.register(parser)

    def recipe(*flags):
        return cli.build_recipe(parser.parse_args(["--teacher", "t", "--out", "o", "--recipe", "smollm2-135m", *flags]))
    assert recipe()["compile"] == "blocks"
    assert recipe("--compile", "off")["compile"] is False
    assert recipe("--compile", "pieces")["compile"] == "pieces"
    assert recipe("--compile")["compile"] == "blocks"
