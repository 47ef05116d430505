"""`llamba bench distill` on a CPU at toy size: each variant runs the real trainer, and its FLOP count is the
parameter products it says it counts."""

import json

import pytest
import torch

from llamba.bench.distill import COMPILING, VARIANTS, matmul_flops_per_token, random_data, run_variant
from llamba.distill.data import PackedTokens


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from llamba.convert import student_from_teacher
    from llamba.distill.recipes import load_recipe
    from llamba.distill.testing import make_teacher
    from llamba.teacher import load_teacher

    root = tmp_path_factory.mktemp("bench-distill")
    teacher, _ = load_teacher(make_teacher(root / "teacher", layers=2, hidden=32, heads=4, kv_heads=2, vocab=280))
    teacher.requires_grad_(False)
    recipe = load_recipe("smoke")
    student = student_from_teacher(teacher, d_state=8, init="attention")
    data = random_data(root / "data", teacher.config.vocab_size, teacher.config.eos_token_id, 1 << 14)
    return teacher, student, recipe, data


def test_random_data_has_documents(setup):
    *_, data = setup
    windows = PackedTokens(data, "train", 256)
    batch = windows.batch(range(8))
    assert batch.seq_idx.max() > 0  # EOS inside windows: the trainer's document resets run


@pytest.mark.parametrize("name,stage,overrides", [
    v if not any(v[2].get(k) for k in COMPILING) else pytest.param(*v, marks=pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="compiling variants are for CUDA (on a CPU the trainer runs them eager; flex builds C++ for minutes)"))
    for v in VARIANTS])
def test_every_variant_runs_the_trainer(setup, name, stage, overrides):
    teacher, student, recipe, data = setup
    before = [p.clone() for p in student.parameters()]
    row = run_variant(name, stage, overrides, recipe, teacher, student, data, steps=1, device="cpu")
    assert row["tokens_per_s"] > 0 and row["flops_per_token"] > 0
    assert all(torch.equal(a, b) for a, b in zip(before, student.parameters()))  # trains a copy
    assert all(b.mixer.kernel_backend == "auto" for b in student.backbone.layers)  # the rival's backend on the copy only
    assert row["settings"].get("kernels") == overrides.get("kernels")


def test_stage3_flops_count_both_models_and_the_head(setup):
    teacher, student, recipe, _ = setup
    def n(module):
        return sum(p.numel() for p in module.parameters() if p.dim() >= 2)
    head = teacher.config.vocab_size * teacher.config.hidden_size
    want = 2 * (n(teacher.model.layers) + head) + 6 * (n(student.backbone.layers) + head)
    assert matmul_flops_per_token(3, {}, teacher, student) == want
    mixers = sum(n(b.mixer) for b in student.backbone.layers)
    assert matmul_flops_per_token(2, {"align": "attention"}, teacher, student) == 2 * n(teacher.model.layers) + 6 * mixers


def test_teacher_shapes_are_the_published_models():
    """`llamba bench distill --shape`: the CLI's names are the shapes the bench builds, and each builds a teacher
    of its model's size (meta tensors: no memory)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from llamba.bench.measure import TEACHER_SHAPES
    from llamba.cli.bench import DISTILL_SHAPES

    assert tuple(TEACHER_SHAPES) == DISTILL_SHAPES
    sizes = {"smollm2-135m": 134.5e6, "llama-3.2-1b": 1235.8e6}  # parameters, tied embeddings counted once
    for name, config in TEACHER_SHAPES.items():
        with torch.device("meta"):
            model = LlamaForCausalLM(LlamaConfig(**config))
        n = sum(p.numel() for p in model.parameters())
        assert abs(n - sizes[name]) / sizes[name] < 0.002, (name, n)


def test_results_so_far_are_written_with_their_ratios(tmp_path):
    """`run` writes the file after every row (a call cut short keeps what it measured): what it writes for two
    rows and a failed one, each rival's ratio only where both sides ran."""
    from llamba.bench.distill import summarise, write

    def row(name, tok_s):
        return {"name": name, "stage": 3, "settings": {"loss": "chunked"}, "tokens_per_s": tok_s, "mfu": 0.1,
                "peak_memory_gib": 20.0}
    meta = {"command": "python -m llamba.cli bench distill", "recipe": "r", "device": "GPU", "hardware": {"matmul_tflops": 800.0}, "torch": "t", "host": "h",
            "shape": "smollm2-135m", "teacher": "random"}
    rows = [row("stage3", 100.0), row("stage3-compile", 150.0),
            {"name": "stage3-flex", "stage": 3, "settings": {}, "error": "RuntimeError: no"}]
    results = summarise(rows, meta)
    assert results["stage3_compile_speedup"] == 1.5
    assert "stage3_flex_speedup" not in results and "stage3_speedup_over_plain" not in results
    write(results, str(tmp_path / "b"))
    md = (tmp_path / "b.md").read_text()
    assert "Stage 3 with the blocks compiled over without: **1.50x**" in md and "failed: RuntimeError: no" in md
    assert "- command: `python -m llamba.cli bench distill`" in md  # every GPU result file names what made it
    assert json.loads((tmp_path / "b.json").read_text())["rows"][1]["tokens_per_s"] == 150.0
