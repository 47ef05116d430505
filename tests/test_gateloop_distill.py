"""Distillation with --mixer gateloop: the pipeline runs all three stages unchanged on a tiny teacher, stage 1 trains
the phase (it shapes the mixing matrix), and the mixer is part of what a resume must match."""

import argparse
import json

import pytest
import torch
from safetensors.torch import load_file

from llamba.distill.pipeline import Options, run
from llamba.distill.recipes import load_recipe
from llamba.distill.report import read_metrics
from llamba.distill.testing import make_corpus, make_teacher


def gateloop_recipe() -> dict:
    r = load_recipe("smoke")
    r.update(d_state=16, seq_len=64, micro_batch=4, batch_tokens=256, eval_tokens=1024, checkpoint_every=0,
             mixer="gateloop", init="attention")  # the teacher's head dim is 16: the RoPE init applies
    r["stages"] = {1: {"tokens": 2048, "lr": 1e-2}, 2: {"tokens": 1024, "lr": 1e-2}, 3: {"tokens": 1024, "lr": 1e-2}}
    return r


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is faster
    root = tmp_path_factory.mktemp("gateloop-distill")
    corpus = make_corpus(root / "corpus", n_docs=120, n_val=20)
    teacher = make_teacher(root / "teacher", corpus, train_steps=40)
    summary = run(Options(teacher=str(teacher), out=root / "run", recipe=gateloop_recipe(), data=str(corpus),
                          sample_tokens=4))
    yield root, corpus, teacher, summary
    torch.set_num_threads(n)


def test_all_stages_run_and_stage1_trains_the_phase(setup):
    root, _, _, summary = setup
    rows = read_metrics(root / "run" / "metrics.jsonl")
    assert sorted(rows) == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor([x["loss"] for r in rows.values() for x in r])))
    first, last = (sum(x["loss"] for x in part) / 3 for part in (rows[1][:3], rows[1][-3:]))
    assert last < 0.9 * first, (first, last)
    for folder in ("init", "stage1/final", "stage3/final"):
        assert json.loads((root / "run" / folder / "config.json").read_text())["ssm_cfg"]["mixer"] == "gateloop"
    init = load_file(str(root / "run" / "init" / "model.safetensors"))
    stage1 = load_file(str(root / "run" / "stage1" / "final" / "model.safetensors"))
    key = "backbone.layers.0.mixer.phase_proj.weight"
    assert not init[key].any() and stage1[key].abs().max() > 0  # starts input-independent, then learns
    assert not torch.equal(init["backbone.layers.0.mixer.phase_proj.bias"], stage1["backbone.layers.0.mixer.phase_proj.bias"])
    assert torch.isfinite(torch.tensor(summary["eval"]["final"]["kl_per_token"]))


def test_resume_with_another_mixer_is_refused(setup):
    root, corpus, teacher, _ = setup
    other = {**gateloop_recipe(), "mixer": None}
    with pytest.raises(ValueError, match="mixer='gateloop'"):
        run(Options(teacher=str(teacher), out=root / "run", recipe=other, data=str(corpus), sample_tokens=0))
    with pytest.raises(ValueError, match="has gateloop mixers, but this run asks for --mixer discrete_mamba2"):
        run(Options(teacher=str(teacher), out=root / "other", recipe={**gateloop_recipe(), "mixer": "discrete_mamba2"},
                    data=str(corpus), stages=(3,), student=str(root / "run" / "stage1" / "final"), sample_tokens=0))
    with pytest.raises(ValueError, match="d_state must be even"):
        run(Options(teacher=str(teacher), out=root / "odd", recipe={**gateloop_recipe(), "d_state": 15},
                    data=str(corpus), sample_tokens=0))


def test_cli_mixer_flag_reaches_the_recipe():
    from llamba.cli import distill as cli

    parser = argparse.ArgumentParser()
    cli.register(parser)
    args = parser.parse_args(["--teacher", "t", "--out", "o", "--recipe", "smoke", "--mixer", "gateloop"])
    assert cli.build_recipe(args)["mixer"] == "gateloop"
    assert "mixer" not in cli.build_recipe(parser.parse_args(["--teacher", "t", "--out", "o", "--recipe", "smoke"]))
    with pytest.raises(ValueError, match="unknown"):
        cli.build_recipe(parser.parse_args(["--teacher", "t", "--out", "o", "--recipe", "smoke", "--mixer", "x"]))
