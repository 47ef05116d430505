"""Hybrid students (issue 23): some layers keep the teacher's softmax attention, the rest are Discrete Mamba-2.

All in float64 on the CPU, on tiny random teachers whose RoPE is Llama-3 scaled (rope_theta 500000), so the
attention layers must take the teacher's rope parameters to match it.

The tolerance against the teacher is 1e-9 relative / 1e-7 absolute, not float64's 1e-15: the teacher's RMSNorm
rounds through float32 even in a float64 model (ours does not), which leaves ~5e-8 on the logits; a wrong position,
mask or head layout is off by 1e-3 or more."""

import json

import pytest
import torch

from llamba.cli.common import parse_attention_layers
from llamba.convert import student_from_teacher
from llamba.distill.testing import make_teacher
from llamba.model import DiscreteMamba2, LlambaConfig
from llamba.model.modeling import LlambaAttention

TEACHER_TOL = dict(rtol=1e-9, atol=1e-7)
EXACT_TOL = dict(rtol=1e-10, atol=1e-10)  # same model, different route (cache / chunking): float64 rounding only
EOS = 1


def _teacher(folder, layers):
    from llamba.teacher import load_teacher

    folder = make_teacher(folder, layers=layers, hidden=32, heads=4, kv_heads=2, vocab=280)
    config = json.loads((folder / "config.json").read_text())
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8}
    config.pop("rope_theta", None), config.pop("rope_scaling", None)
    config["rope_parameters"] = rope
    (folder / "config.json").write_text(json.dumps(config))
    teacher, tok = load_teacher(folder, dtype=torch.float64)
    assert teacher.config.rope_parameters["rope_type"] == "llama3"
    return teacher, tok


@pytest.fixture(scope="module")
def teacher2(tmp_path_factory):
    return _teacher(tmp_path_factory.mktemp("hybrid") / "t2", 2)


@pytest.fixture(scope="module")
def teacher3(tmp_path_factory):
    return _teacher(tmp_path_factory.mktemp("hybrid") / "t3", 3)


def _jitter(model, seed=0, scale=0.05):
    """Move every weight off its init, so that each mixer matters (a pass-through mixer would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def _ids(batch, length, seed=1):
    return torch.randint(2, 250, (batch, length), generator=torch.Generator().manual_seed(seed))


def _left_padded(seed=2):
    """Two rows: 11 real tokens, and 3 pads then 8 real tokens."""
    a, b = _ids(1, 11, seed), _ids(1, 8, seed + 1)
    ids = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)])
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return ids, mask, a, b


# -- (a) every layer attention == the teacher ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def all_attention(teacher2):
    teacher, _ = teacher2
    student = student_from_teacher(teacher, d_state=8, attention_layers=[0, 1]).double()
    assert all(isinstance(b.mixer, LlambaAttention) for b in student.backbone.layers)
    return teacher, student


@torch.no_grad()
def test_all_attention_hybrid_is_the_teacher(all_attention):
    teacher, student = all_attention
    ids = _ids(2, 20)
    torch.testing.assert_close(student(ids).logits, teacher(ids).logits, **TEACHER_TOL)


@torch.no_grad()
def test_all_attention_packed_documents_equal_each_document_alone(all_attention):
    from llamba.distill.data import boundaries

    teacher, student = all_attention
    ids = _ids(2, 18)
    ids[0, 5], ids[0, 11], ids[1, 8] = EOS, EOS, EOS
    seq_idx, _ = boundaries(ids, EOS)
    packed = student(ids, seq_idx=seq_idx).logits
    for row, cuts in ((0, (0, 6, 12, 18)), (1, (0, 9, 18))):
        for lo, hi in zip(cuts, cuts[1:]):  # each document alone, positions from 0
            torch.testing.assert_close(packed[row, lo:hi], teacher(ids[row:row + 1, lo:hi]).logits[0], **TEACHER_TOL)


@torch.no_grad()
def test_all_attention_left_padded_batch_equals_each_row_alone(all_attention):
    teacher, student = all_attention
    ids, mask, a, b = _left_padded()
    out = student(ids, attention_mask=mask).logits
    torch.testing.assert_close(out[0], teacher(a).logits[0], **TEACHER_TOL)
    torch.testing.assert_close(out[1, 3:], teacher(b).logits[0], **TEACHER_TOL)


# -- (b) no attention layer == today's student ----------------------------------------------------------------------
OFFICIAL_CONFIG_KEYS = {"d_model", "lm_head_bias", "mlp_cfg", "model_type", "n_layer", "norm_epsilon",
                        "pad_vocab_size_multiple", "ssm_cfg", "tie_embeddings", "tie_word_embeddings",
                        "transformers_version", "vocab_size", "architectures", "dtype", "bos_token_id",
                        "eos_token_id", "pad_token_id"}
MIXER_KEYS = {"in_proj.weight", "z_bias", "conv1d.weight", "conv1d.bias", "D", "out_proj.weight"}


def _layer_keys(state_dict, i):
    prefix = f"backbone.layers.{i}.mixer."
    return {k[len(prefix):] for k in state_dict if k.startswith(prefix)}


@torch.no_grad()
def test_no_attention_layers_is_todays_student(teacher2, tmp_path):
    from llamba.checkpoint import save_student

    teacher, tok = teacher2
    torch.manual_seed(0)
    today = student_from_teacher(teacher, d_state=8)
    torch.manual_seed(0)
    empty = student_from_teacher(teacher, d_state=8, attention_layers=[])
    assert not empty.config.is_hybrid and empty.backbone.rotary_emb is None
    assert all(isinstance(b.mixer, DiscreteMamba2) for b in empty.backbone.layers)
    ids = _ids(2, 16)
    assert torch.equal(today(ids).logits, empty(ids).logits)
    assert list(today.state_dict()) == list(empty.state_dict())
    for i in range(2):
        assert _layer_keys(empty.state_dict(), i) == MIXER_KEYS
    assert "attention_layers" not in empty.config.to_dict() and "attention_cfg" not in empty.config.to_dict()
    save_student(empty, tok, tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert set(written) <= OFFICIAL_CONFIG_KEYS, set(written) - OFFICIAL_CONFIG_KEYS
    assert {"d_model", "n_layer", "ssm_cfg", "mlp_cfg"} <= set(written)


# -- (c) cache: forward == prefill + decode ---------------------------------------------------------------------
@pytest.fixture(scope="module", params=[(2, [1]), (3, [0, 2])], ids=["layers1of2", "layers0,2of3"])
def hybrid(request, teacher2, teacher3):
    layers, attention = request.param
    teacher = (teacher2 if layers == 2 else teacher3)[0]
    student = _jitter(student_from_teacher(teacher, d_state=8, attention_layers=attention).double())
    kinds = [isinstance(b.mixer, LlambaAttention) for b in student.backbone.layers]
    assert kinds == [i in attention for i in range(layers)]
    return student


@torch.no_grad()
def test_forward_equals_prefill_then_token_by_token_decode(hybrid):
    ids, mask, _, _ = _left_padded()
    full = hybrid(ids, attention_mask=mask).logits
    cache = hybrid.allocate_cache(2, max_length=ids.shape[1])
    pieces = [hybrid(ids[:, :5], attention_mask=mask[:, :5], past_key_values=cache, use_cache=True).logits]
    for t in range(5, ids.shape[1]):
        pieces.append(hybrid(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits)
    stepped = torch.cat(pieces, 1)
    torch.testing.assert_close(stepped[0], full[0], **EXACT_TOL)
    torch.testing.assert_close(stepped[1, 3:], full[1, 3:], **EXACT_TOL)  # padded positions' outputs are unused


@torch.no_grad()
def test_prefill_in_two_pieces_equals_one(hybrid):
    ids, mask, _, _ = _left_padded()
    nxt = _ids(2, 1, seed=9)
    one = hybrid.allocate_cache(2, max_length=16)
    whole = hybrid(ids, attention_mask=mask, past_key_values=one, use_cache=True).logits
    two = hybrid.allocate_cache(2, max_length=16)
    first = hybrid(ids[:, :4], attention_mask=mask[:, :4], past_key_values=two, use_cache=True).logits
    second = hybrid(ids[:, 4:], attention_mask=mask, past_key_values=two, use_cache=True).logits
    torch.testing.assert_close(first[0], whole[0, :4], **EXACT_TOL)
    torch.testing.assert_close(second[:, :], whole[:, 4:], **EXACT_TOL)
    torch.testing.assert_close(hybrid(nxt, past_key_values=two, use_cache=True).logits,
                               hybrid(nxt, past_key_values=one, use_cache=True).logits, **EXACT_TOL)


@torch.no_grad()
def test_generate_equals_greedy_forward_without_cache(hybrid):
    ids, mask, _, _ = _left_padded()
    out = hybrid.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    cur, m = ids, mask
    for _ in range(4):
        nxt = hybrid(cur, attention_mask=m).logits[:, -1].argmax(-1, keepdim=True)
        cur, m = torch.cat([cur, nxt], 1), torch.cat([m, torch.ones_like(nxt)], 1)
    assert torch.equal(out, cur)


# -- (d) save / load ------------------------------------------------------------------------------------------------
@torch.no_grad()
def test_save_load_round_trip(teacher3, tmp_path):
    from safetensors import safe_open

    from llamba.checkpoint import load_student, save_student

    teacher, tok = teacher3
    student = _jitter(student_from_teacher(teacher, d_state=8, attention_layers=[0, 2]).double())
    save_student(student, tok, tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["attention_layers"] == [0, 2]
    assert written["attention_cfg"]["rope_parameters"]["rope_theta"] == 500000.0
    with safe_open(str(next(tmp_path.glob("*.safetensors"))), framework="pt") as f:
        keys = set(f.keys())
    for i in (0, 2):
        assert {f"backbone.layers.{i}.mixer.{p}_proj.weight" for p in "qkvo"} <= keys
        assert f"backbone.layers.{i}.mixer.in_proj.weight" not in keys
    assert "backbone.layers.1.mixer.in_proj.weight" in keys
    loaded = load_student(tmp_path, dtype=torch.float64)
    assert loaded.config.attention_layers == [0, 2]
    ids = _ids(2, 14)
    assert torch.equal(loaded(ids).logits, student(ids).logits)


# -- distillation ---------------------------------------------------------------------------------------------------
def test_stages_1_and_2_skip_attention_layers(teacher2):
    from llamba.distill.data import Batch, boundaries
    from llamba.distill.stages import HiddenStateAlignment, MatrixOrientation, frobenius_loss, teacher_targets

    teacher, _ = teacher2
    student = student_from_teacher(teacher, d_state=8, attention_layers=[1]).double()
    ids = _ids(2, 12)
    ids[0, 4] = EOS
    seq_idx, pos = boundaries(ids, EOS)
    batch = Batch(ids, seq_idx, pos)
    stage1 = MatrixOrientation(student)
    trainable = {id(p) for p in stage1.trainable()}
    assert not trainable & {id(p) for p in student.backbone.layers[1].parameters()}
    assert {id(p) for p in student.backbone.layers[0].mixer.in_proj.parameters()} <= trainable
    targets = teacher_targets(teacher, batch, 1)
    loss, per_layer = stage1(targets, seq_idx)
    block = student.backbone.layers[0]
    expected = frobenius_loss(block.mixer.mixing_matrix(block.input_layernorm(targets.hidden_in[0]), seq_idx=seq_idx),
                              targets.attentions[0])
    assert len(per_layer) == 1
    torch.testing.assert_close(loss, expected)
    all_attention = student_from_teacher(teacher, d_state=8, attention_layers=[0, 1])
    for stage in (MatrixOrientation, HiddenStateAlignment):
        with pytest.raises(ValueError, match="every layer"):
            stage(all_attention)
    # stage 2: the attention layer's block output is the teacher's layer's (packed documents too), so it has nothing
    # to learn, and it is neither computed nor trained: a ~0 L2-norm loss still has unit-size gradients
    targets = teacher_targets(teacher, batch, 2)
    layer1 = student.backbone.layers[1]
    torch.testing.assert_close(layer1(targets.hidden_in[1], seq_idx=seq_idx), targets.hidden_out[1])
    for align in ("block", "attention"):
        stage2 = HiddenStateAlignment(student, align=align, mixer_only=True)
        trainable = {id(p) for p in stage2.trainable()}
        assert not trainable & {id(p) for p in layer1.parameters()}
        assert {id(p) for p in student.backbone.layers[0].mixer.parameters()} <= trainable
        loss, per_layer = stage2(teacher_targets(teacher, batch, 2, attention_outputs=align == "attention"), seq_idx)
        assert len(per_layer) == 1 and per_layer[0].item() > 1e-3
        torch.testing.assert_close(loss, per_layer[0])


def test_distill_flag_sets_the_recipe_field():
    import argparse

    from llamba.cli import distill as cli

    parser = argparse.ArgumentParser()
    cli.register(parser)
    assert cli.build_recipe(parser.parse_args(["--out", "x", "--recipe", "smoke", "--attention-layers", "5,14"]))[
        "attention_layers"] == [5, 14]
    assert "attention_layers" not in cli.build_recipe(parser.parse_args(["--out", "x", "--recipe", "smoke"]))
    assert cli.build_recipe(parser.parse_args(["--out", "x", "--recipe", "smoke", "--attention-layers", "auto:4"]))[
        "attention_layers"] == "auto:4"
    assert cli.build_recipe(parser.parse_args(["--out", "x", "--recipe", "smoke", "--attention-layers",
                                               "auto:4:repeats"]))["attention_layers"] == "auto:4:repeats"
    # a typo in the ranking is named as one, not answered with the layer-list syntax alone
    with pytest.raises(ValueError, match="auto:K:repeats"):
        cli.build_recipe(parser.parse_args(["--out", "x", "--recipe", "smoke", "--attention-layers", "auto:4:repeat"]))


# -- (e) the clear errors -------------------------------------------------------------------------------------------
@torch.no_grad()
def test_cache_too_short_says_the_limit_and_how_to_raise_it(teacher2):
    student = student_from_teacher(teacher2[0], d_state=8, attention_layers=[1]).double()
    cache = student.allocate_cache(1, max_length=8)
    student(_ids(1, 6), past_key_values=cache, use_cache=True)
    student(_ids(1, 1), past_key_values=cache, use_cache=True)
    student(_ids(1, 1), past_key_values=cache, use_cache=True)  # 8 of 8: still fits
    with pytest.raises(ValueError, match=r"holds 8 positions.*need 9.*allocate_cache\(batch_size, max_length=9\)"):
        student(_ids(1, 1), past_key_values=cache, use_cache=True)
    with pytest.raises(ValueError, match="holds 8 positions"):
        student(_ids(1, 9), past_key_values=student.allocate_cache(1, max_length=8), use_cache=True)


def test_bad_attention_layer_indices(teacher2, tmp_path, capsys):
    from llamba.cli import main

    teacher = teacher2[0]
    with pytest.raises(ValueError, match=r"\[2\].*0\.\.1"):
        student_from_teacher(teacher, attention_layers=[2])
    with pytest.raises(ValueError, match=r"\[-1\]"):
        student_from_teacher(teacher, attention_layers=[-1])
    with pytest.raises(ValueError, match="only once"):
        student_from_teacher(teacher, attention_layers=[1, 1])
    with pytest.raises(ValueError, match="separated by commas"):
        parse_attention_layers("5;14")
    with pytest.raises(ValueError, match="repeats 1"):
        parse_attention_layers("1,1")
    with pytest.raises(ValueError, match="whole numbers"):
        parse_attention_layers("5,-1")
    with pytest.raises(ValueError, match="0..15"):
        LlambaConfig(d_model=64, n_layer=16, attention_layers=[16])
    assert parse_attention_layers(" 14, 5 ") == [5, 14] and parse_attention_layers("") == []
    teacher_dir = tmp_path / "teacher"
    teacher.save_pretrained(teacher_dir)
    teacher2[1].save_pretrained(teacher_dir)
    assert main(["convert", "--teacher", str(teacher_dir), "--out", str(tmp_path / "s"), "--attention-layers", "5"]) == 2
    err = capsys.readouterr().err
    assert "attention layers [5]" in err and "Traceback" not in err
    assert main(["convert", "--teacher", str(teacher_dir), "--out", str(tmp_path / "s"), "--d-state", "8",
                 "--attention-layers", "1"]) == 0
    assert json.loads((tmp_path / "s" / "config.json").read_text())["attention_layers"] == [1]


def test_engine_cpu_runtime_and_quantization_take_a_converted_hybrid(teacher2):
    """They refused hybrids before; now a hybrid converted from the teacher decodes through the generation engine
    (eager here; tests/test_engine_hybrid.py has the CUDA graph) and the CPU runtime, with transformers' greedy
    tokens, and quantizes (tests/test_cpu_runtime_hybrid.py checks the quantized runtime against its forward)."""
    from llamba.generation import generate
    from llamba.quant import kernels, quantize_student
    from llamba.quant.runtime import CpuDecoder

    hybrid = _jitter(student_from_teacher(teacher2[0], d_state=8, attention_layers=[1]).float())
    ids = _ids(1, 9)
    ref = hybrid.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)[0, 9:].tolist()
    assert generate(hybrid, ids, max_new_tokens=8).new_tokens[0].tolist() == ref
    if kernels.find_compiler() is None:
        pytest.skip("no C compiler (set CC) for the CPU runtime")
    assert CpuDecoder(hybrid).generate(ids, 8) == ref
    assert quantize_student(hybrid, "int8")["quant"] == "int8"
    assert len(CpuDecoder(hybrid).generate(ids, 8)) == 8


def test_attention_inputs_positions_and_mask():
    """RoPE is relative, so a constant shift of positions per document is invisible in the logits above; the
    positions themselves are checked here (they matter for position-dependent rope types such as 'dynamic')."""
    from llamba.model.modeling import build_attention_inputs

    calls = []

    def rotary(h, pos):
        calls.append(pos)
        return pos, pos

    h = torch.zeros(1, 6, 4)
    seq_idx = torch.tensor([[0, 0, 0, 1, 1, 2]])
    _, mask, _, pos = build_attention_inputs(rotary, h, seq_idx=seq_idx)
    assert pos.tolist() == [[0, 1, 2, 0, 1, 0]]
    expected = torch.tensor([[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0],
                             [0, 0, 0, 1, 0, 0], [0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(mask[0, 0], expected)
    _, mask, _, pos = build_attention_inputs(rotary, torch.zeros(2, 4, 4),
                                             attention_mask=torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]]))
    assert pos.tolist() == [[0, 1, 2, 3], [0, 0, 0, 1]]
    assert mask[1, 0].tolist() == [[True, False, False, False], [False, True, False, False],
                                   [False, False, True, False], [False, False, True, True]]
    assert build_attention_inputs(rotary, torch.zeros(2, 4, 4))[1] is None  # plain causal: SDPA's causal path


def test_distill_pipeline_trains_a_hybrid(tmp_path):
    """`llamba distill --attention-layers 1` end to end on a tiny teacher: the student is a hybrid from the start,
    stages 1-2 leave its attention layer as the teacher's, stage 3 trains it, and every stage saves a hybrid."""
    from safetensors.torch import load_file

    from llamba.checkpoint import load_student
    from llamba.distill.pipeline import Options, run
    from llamba.distill.recipes import load_recipe
    from llamba.distill.testing import make_corpus
    from llamba.teacher import load_teacher

    corpus = make_corpus(tmp_path / "corpus", n_docs=40, n_val=5)
    teacher_dir = make_teacher(tmp_path / "teacher", corpus, layers=2, hidden=32, heads=4, kv_heads=2, vocab=280)
    r = load_recipe("smoke")
    r.update(d_state=8, seq_len=32, micro_batch=2, batch_tokens=64, eval_tokens=256, val_tokens=512,
             checkpoint_every=100, attention_layers=[1])
    r["stages"] = {s: {"tokens": 128, "lr": 1e-2} for s in (1, 2, 3)}
    run(Options(teacher=str(teacher_dir), out=tmp_path / "run", recipe=r, data=str(corpus), sample_tokens=0))
    teacher_attn = load_teacher(teacher_dir, dtype=torch.float32)[0].model.layers[1].self_attn.state_dict()
    weights = {s: load_file(str(next((tmp_path / "run" / f"stage{s}" / "final").glob("*.safetensors"))))
               for s in (1, 2, 3)}
    for s in (1, 2, 3):
        assert load_student(tmp_path / "run" / f"stage{s}" / "final").config.attention_layers == [1]
    q = "backbone.layers.1.mixer.q_proj.weight"
    for s in (1, 2):  # stages 1 and 2 skip the attention layer, its MLP and norms included
        assert torch.equal(weights[s][q], teacher_attn["q_proj.weight"])
        assert torch.equal(weights[s]["backbone.layers.1.mlp.down_proj.weight"], weights[1][
            "backbone.layers.1.mlp.down_proj.weight"])
    assert not torch.equal(weights[1]["backbone.layers.0.mixer.in_proj.weight"],
                           load_file(str(next((tmp_path / "run" / "init").glob("*.safetensors"))))[
                               "backbone.layers.0.mixer.in_proj.weight"])  # ... and trains the mixer
    assert not torch.equal(weights[3][q], teacher_attn["q_proj.weight"])  # stage 3 trains it
    r["attention_layers"] = [0]
    # resume with other layers: refused (the finished stage records the layers it was trained with)
    with pytest.raises(ValueError, match=r"attention_layers=\[1\] \(now \[0\]\)"):
        run(Options(teacher=str(teacher_dir), out=tmp_path / "run", recipe=r, data=str(corpus), sample_tokens=0))


def test_stage3_can_keep_the_attention_layers_as_the_teacher_s(tmp_path):
    """``--freeze-attention``: stage 3 trains everything but the hybrid's q/k/v/o, which stay the teacher's through the
    whole pipeline; without it they train (test_distill_pipeline_trains_a_hybrid)."""
    from safetensors.torch import load_file

    from llamba.distill.pipeline import Options, run
    from llamba.distill.recipes import load_recipe
    from llamba.distill.stages import KnowledgeDistillation
    from llamba.distill.testing import make_corpus
    from llamba.teacher import load_teacher

    corpus = make_corpus(tmp_path / "corpus", n_docs=40, n_val=5)
    teacher_dir = make_teacher(tmp_path / "teacher", corpus, layers=2, hidden=32, heads=4, kv_heads=2, vocab=280)
    teacher = load_teacher(teacher_dir, dtype=torch.float32)[0]
    student = student_from_teacher(teacher, d_state=8, attention_layers=[1])
    frozen = {id(p) for p in student.backbone.layers[1].mixer.parameters()}
    trained = {id(p) for p in KnowledgeDistillation(student, freeze_attention=True).trainable()}
    assert trained == {id(p) for p in student.parameters()} - frozen and frozen
    r = load_recipe("smoke")
    r.update(d_state=8, seq_len=32, micro_batch=2, batch_tokens=64, eval_tokens=256, val_tokens=512,
             checkpoint_every=100, attention_layers=[1])
    r["stages"] = {s: {"tokens": 128, "lr": 1e-2} for s in (2, 3)}
    r["stages"][3]["freeze_attention"] = True
    run(Options(teacher=str(teacher_dir), out=tmp_path / "run", recipe=r, data=str(corpus), stages=(2, 3),
                sample_tokens=0))
    weights = load_file(str(next((tmp_path / "run" / "stage3" / "final").glob("*.safetensors"))))
    init = load_file(str(next((tmp_path / "run" / "init").glob("*.safetensors"))))
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert torch.equal(weights[f"backbone.layers.1.mixer.{name}.weight"], teacher.model.layers[1].self_attn
                           .state_dict()[f"{name}.weight"])
    assert not torch.equal(weights["backbone.layers.1.mlp.down_proj.weight"], init["backbone.layers.1.mlp.down_proj.weight"])


def test_distill_refuses_an_all_attention_hybrid_for_stages_1_2_up_front(tmp_path):
    from llamba.distill.pipeline import Options, run
    from llamba.distill.recipes import load_recipe

    teacher_dir = make_teacher(tmp_path / "teacher", layers=2, hidden=32, heads=4, kv_heads=2, vocab=280)
    r = load_recipe("smoke")
    r["attention_layers"] = [0, 1]
    for stages in ((2, 3), (1, 2, 3)):
        with pytest.raises(ValueError, match=r"all 2 of the teacher's layers.*no mixer to train; run --stages 3"):
            run(Options(teacher=str(teacher_dir), out=tmp_path / "run", recipe=r, data=str(tmp_path / "none"),
                        stages=stages, sample_tokens=0))
    assert not (tmp_path / "run" / "data").exists()  # refused before any data was read or prepared


# -- choosing the layers (auto:K) -----------------------------------------------------------------------------------
def test_restoring_every_layer_gives_the_teacher_and_one_layer_changes_only_it(teacher3):
    from llamba.convert import restore_teacher_layers

    teacher, _ = teacher3
    student = student_from_teacher(teacher, d_state=8).double()
    _jitter(student.backbone.layers)  # embedding, final norm and head stay the teacher's: restoring keeps them
    ids = _ids(2, 9)
    whole = restore_teacher_layers(student, teacher, [0, 1, 2])
    torch.testing.assert_close(whole(ids).logits[..., :280], teacher(ids).logits, **TEACHER_TOL)
    one = restore_teacher_layers(student, teacher, [1])
    assert one.config.attention_layers == [1] and isinstance(one.backbone.layers[1].mixer, LlambaAttention)
    s, o, t = student.state_dict(), one.state_dict(), teacher.state_dict()
    for k, v in o.items():
        if k.startswith("backbone.layers.1."):  # the teacher's layer: attention, MLP and both norms
            name = k.removeprefix("backbone.layers.1.").replace("mixer.", "self_attn.")
            assert torch.equal(v, t[f"model.layers.1.{name}"]), k
        else:
            assert torch.equal(v, s[k]), k
    assert student.config.attention_layers == []  # the student itself is left as it was


def test_restoring_the_attention_alone_keeps_the_students_mlp(teacher3):
    """parts='attention': the teacher's attention and the norm before it come back, the student's post-attention
    norm and MLP stay; on a student whose MLPs are still the teacher's, every layer's attention restored is the
    teacher."""
    from llamba.convert import restore_teacher_layers

    teacher, _ = teacher3
    student = student_from_teacher(teacher, d_state=8).double()
    for layer in student.backbone.layers:
        _jitter(layer.mixer)
    ids = _ids(2, 9)
    whole = restore_teacher_layers(student, teacher, [0, 1, 2], parts="attention")
    torch.testing.assert_close(whole(ids).logits[..., :280], teacher(ids).logits, **TEACHER_TOL)
    _jitter(student.backbone.layers)  # now the MLPs and norms are the student's own too
    one = restore_teacher_layers(student, teacher, [1], parts="attention")
    s, o, t = student.state_dict(), one.state_dict(), teacher.state_dict()
    for k, v in o.items():
        if k.startswith(("backbone.layers.1.mixer.", "backbone.layers.1.input_layernorm.")):
            name = k.removeprefix("backbone.layers.1.").replace("mixer.", "self_attn.")
            assert torch.equal(v, t[f"model.layers.1.{name}"]), k
        else:
            assert torch.equal(v, s[k]), k
    with pytest.raises(ValueError, match="choose one of"):
        restore_teacher_layers(student, teacher, [1], parts="mlp")


def _ranking_setup(tmp_path, teacher3):
    from llamba.distill.data import prepare_data
    from llamba.distill.testing import make_corpus

    teacher, tok = teacher3
    corpus = make_corpus(tmp_path / "corpus", n_docs=10, n_val=4)
    data = tmp_path / "data"
    prepare_data({"train": [str(corpus / "train.jsonl")], "val": [str(corpus / "val.jsonl")]}, tok, data, 2000, 600)
    return teacher, data


def test_ranking_finds_the_broken_layer_and_restoring_it_recovers_its_kl(teacher3, tmp_path):
    """A student whose layer 1 is broken (noise on all its weights): restoring layer 1 must recover the most KL, and
    every row's drop is the pure KL minus that row's KL."""
    from llamba.distill.select import chosen_layers, rank_layers, write_ranking

    teacher, data = _ranking_setup(tmp_path, teacher3)
    student = student_from_teacher(teacher, d_state=8, init="attention").double()
    _jitter(student.backbone.layers[1], scale=0.3)
    r = rank_layers(teacher, student, data, seq_len=16, eval_tokens=256, micro_batch=4, device="cpu")
    assert r["ranking"][0] == 1 and chosen_layers(r, 1) == [1]
    assert sorted(r["ranking"]) == [0, 1, 2] and [row["layer"] for row in r["layers"]] == [0, 1, 2]
    for row in r["layers"]:
        assert row["kl_drop"] == pytest.approx(r["pure_kl"] - row["kl"], rel=1e-12)
    assert r["layers"][1]["kl"] < 0.2 * r["pure_kl"] < r["layers"][0]["kl"]
    # random ids in 16-token windows hold no repeated trigram: no repeats column, rather than a KL over nothing
    assert r["repeat_share"] == 0 and r["pure_kl_repeats"] is None and "kl_repeats" not in r["layers"][0]
    with pytest.raises(ValueError, match="no held-out position repeats"):
        chosen_layers(r, 1, "repeats")
    write_ranking(tmp_path / "new" / "ranking", r, 1)  # a folder not made yet (python -m llamba.distill.select --out)
    assert json.loads((tmp_path / "new" / "ranking.json").read_text())["chosen"] == [1]
    assert "| 1 | 1 |" in (tmp_path / "new" / "ranking.md").read_text()
    with pytest.raises(ValueError, match="needs a pure student"):
        rank_layers(teacher, student_from_teacher(teacher, d_state=8, attention_layers=[0]).double(), data,
                    seq_len=16, eval_tokens=256, micro_batch=4, device="cpu")


def test_ranking_reads_the_kl_at_repeats_where_the_text_repeats(teacher3, tmp_path):
    """Held-out text whose documents say one sentence twice: the ranking also reads KL at the positions that copy
    (each row's drop against the pure student's) and ranks by it too."""
    import random

    from llamba.distill.data import prepare_data
    from llamba.distill.select import chosen_layers, rank_layers, write_ranking
    from llamba.distill.testing import WORDS

    teacher, tok = teacher3
    rng = random.Random(1)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name, n in (("train", 6), ("val", 6)):
        sentences = [" ".join(rng.choice(WORDS) for _ in range(6)) + "." for _ in range(n)]
        (corpus / f"{name}.jsonl").write_text("".join(json.dumps({"text": f"{s} {s}"}) + "\n" for s in sentences))
    data = tmp_path / "data"
    prepare_data({"train": [str(corpus / "train.jsonl")], "val": [str(corpus / "val.jsonl")]}, tok, data, 2000, 600)
    student = student_from_teacher(teacher, d_state=8, init="attention").double()
    _jitter(student.backbone.layers[1], scale=0.3)
    r = rank_layers(teacher, student, data, seq_len=32, eval_tokens=256, micro_batch=4, device="cpu")
    assert 0 < r["repeat_share"] < 1 and sorted(r["ranking_by_repeats"]) == [0, 1, 2]
    for row in r["layers"]:
        assert row["kl_repeats_drop"] == pytest.approx(r["pure_kl_repeats"] - row["kl_repeats"], rel=1e-12)
    write_ranking(tmp_path / "ranking", r, 1)
    assert "KL at repeats" in (tmp_path / "ranking.md").read_text()
    # auto:K:repeats chooses from the repeats ranking (the broken layer 1 leads it too)
    assert chosen_layers(r, 1, "repeats") == [r["ranking_by_repeats"][0]] == [1]
    write_ranking(tmp_path / "by-repeats", r, 2, "repeats")
    written = json.loads((tmp_path / "by-repeats.json").read_text())
    assert written["by"] == "repeats" and written["chosen"] == sorted(r["ranking_by_repeats"][:2])
    assert "by the KL at repeats" in (tmp_path / "by-repeats.md").read_text()


def test_auto_spec_and_its_checks():
    from llamba.distill.select import check_auto, parse_auto

    assert parse_auto("auto:4") == (4, "kl") and parse_auto("auto:2:repeats") == (2, "repeats")
    assert parse_auto([1, 2]) is None and parse_auto(None) is None
    for bad in ("automatic", "auto:4:ppl", "auto:"):
        with pytest.raises(ValueError, match="auto:K"):
            parse_auto(bad)
    assert "between 1 and" in check_auto(0, 30, (2, 3)) and "between 1 and" in check_auto(31, 30, (2, 3))
    assert "add stage 3" in check_auto(2, 30, (1, 2))
    assert check_auto(30, 30, (3,)) is None


def test_distill_auto_chooses_layers_before_stage3_and_resumes_with_them(tmp_path):
    """`llamba distill --attention-layers auto:1`: stage 2 trains the pure student, the ranking picks one layer,
    stage 3 trains that hybrid; a rerun keeps the choice; a run without stage 3 is refused before any work."""
    from llamba.checkpoint import load_student
    from llamba.distill.pipeline import Options, run
    from llamba.distill.recipes import load_recipe
    from llamba.distill.testing import make_corpus

    corpus = make_corpus(tmp_path / "corpus", n_docs=40, n_val=5)
    teacher_dir = make_teacher(tmp_path / "teacher", corpus, layers=3, hidden=32, heads=4, kv_heads=2, vocab=280)
    r = load_recipe("smoke")
    r.update(d_state=8, seq_len=32, micro_batch=2, batch_tokens=64, eval_tokens=256, val_tokens=512, select_tokens=128,
             checkpoint_every=100, attention_layers="auto:1")
    r["stages"] = {s: {"tokens": 128, "lr": 1e-2} for s in (1, 2, 3)}
    with pytest.raises(ValueError, match="add stage 3"):
        run(Options(teacher=str(teacher_dir), out=tmp_path / "no3", recipe=r, data=str(corpus), stages=(2,)))
    assert not (tmp_path / "no3" / "init").exists()
    summary = run(Options(teacher=str(teacher_dir), out=tmp_path / "run", recipe=r, data=str(corpus), stages=(2, 3),
                          sample_tokens=0))
    ranking = json.loads((tmp_path / "run" / "select" / "ranking.json").read_text())
    assert ranking["k"] == 1 and ranking["chosen"] == [ranking["ranking"][0]]
    assert load_student(tmp_path / "run" / "stage2" / "final").config.attention_layers == []
    assert load_student(tmp_path / "run" / "stage3" / "final").config.attention_layers == ranking["chosen"]
    assert summary["attention_layers"] == ranking["chosen"] and summary["selection"]["chosen"] == ranking["chosen"]
    assert "chosen by KL-guided ranking" in (tmp_path / "run" / "summary.md").read_text()
    again = run(Options(teacher=str(teacher_dir), out=tmp_path / "run", recipe=r, data=str(corpus), stages=(2, 3),
                        sample_tokens=0))
    assert again["eval"]["final"] == summary["eval"]["final"]


def test_a_hybrids_attention_layers_train_as_inherited_weights(teacher3):
    """--inherited-lr-scale: the teacher's attention a hybrid keeps is copied like its MLPs, not a new mixer."""
    from llamba.distill.trainer import new_mixer_parameters

    teacher, _ = teacher3
    student = student_from_teacher(teacher, d_state=8, attention_layers=[1])
    new = {id(p) for p in new_mixer_parameters(student)}
    assert all(id(p) not in new for p in student.backbone.layers[1].mixer.parameters())
    assert all(id(p) in new for i in (0, 2) for p in student.backbone.layers[i].mixer.parameters())


def test_select_module_ranks_any_pure_student(tmp_path, capsys):
    """`python -m llamba.distill.select`: the ranking of a saved pure student, without a distillation around it."""
    from llamba.checkpoint import save_student
    from llamba.distill.data import prepare_data
    from llamba.distill.select import main
    from llamba.distill.testing import make_corpus
    from llamba.teacher import load_teacher

    corpus = make_corpus(tmp_path / "corpus", n_docs=10, n_val=4)
    teacher_dir = make_teacher(tmp_path / "teacher", corpus, layers=3, hidden=32, heads=4, kv_heads=2, vocab=280)
    teacher, tok = load_teacher(teacher_dir, dtype=torch.float32)
    student = student_from_teacher(teacher, d_state=8, init="attention")
    _jitter(student.backbone.layers[2], scale=0.3)
    save_student(student, tok, tmp_path / "student")
    prepare_data({"train": [str(corpus / "train.jsonl")], "val": [str(corpus / "val.jsonl")]}, tok, tmp_path / "data",
                 2000, 600)
    assert main(["--teacher", str(teacher_dir), "--student", str(tmp_path / "student"), "--data", str(tmp_path / "data"),
                 "--out", str(tmp_path / "ranking"), "--tokens", "256", "--seq-len", "16", "--device", "cpu"]) == 0
    ranking = json.loads((tmp_path / "ranking.json").read_text())
    assert ranking["ranking"][0] == 2 and ranking["chosen"] is None
    assert "ranking (most KL recovered first): [2" in capsys.readouterr().out
