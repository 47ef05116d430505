"""The real default teacher, and a student built from it."""

import math

import pytest
import torch

from llamba.checkpoint import load_model, save_student
from llamba.cli.common import count_parameters
from llamba.convert import student_config_from_teacher, student_from_teacher
from llamba.teacher import load_teacher, load_teacher_config, resolve_teacher

PARAGRAPH = (
    "The city of Paris is the capital and most populous city of France. Situated on the river Seine, in the north "
    "of the country, it is at the heart of the region known as the Paris Region. The city is a major centre of "
    "finance, diplomacy, commerce, culture, fashion, and gastronomy, and it is home to many famous museums."
)


def test_smollm2_answers_paris(smollm2):
    model, tok = smollm2
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=16, do_sample=False)
    assert "Paris" in tok.decode(out[0, prompt["input_ids"].shape[1]:])


def test_smollm2_perplexity_on_english(smollm2):
    model, tok = smollm2
    ids = tok(PARAGRAPH, return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
    assert math.exp(loss.item()) < 10


def test_student_from_smollm2_saves_loads_generates(smollm2, tmp_path, capsys):
    teacher, tok = smollm2
    student = student_from_teacher(teacher)
    cfg = student.config
    assert (cfg.n_layer, cfg.n_v_heads, cfg.head_dim, cfg.d_state, cfg.vocab_size) == (30, 9, 64, 64, 49152)
    assert torch.equal(student.backbone.layers[3].mlp.up_proj.weight, teacher.model.layers[3].mlp.up_proj.weight)
    print(f"student parameters: {count_parameters(student):,}")
    save_student(student, tok, tmp_path)
    loaded, loaded_tok = load_model(str(tmp_path))
    assert loaded_tok is not None
    ids = loaded_tok("Once upon a time", return_tensors="pt").input_ids
    out = loaded.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=loaded_tok.eos_token_id)
    assert out.shape == (1, ids.shape[1] + 5)
    assert "student parameters" in capsys.readouterr().out


def test_attention_init_copies_projections(smollm2):
    teacher, _ = smollm2
    student = student_from_teacher(teacher, init="attention")
    attn, mixer = teacher.model.layers[0].self_attn, student.backbone.layers[0].mixer
    w = mixer.in_proj.weight
    # value head 4 reads KV head 4 // 3 = 1; query head 4 is C group 4
    assert torch.equal(w[4 * 64:5 * 64], attn.v_proj.weight[64:128])
    assert torch.equal(w[576 + 4 * 64:576 + 5 * 64], attn.k_proj.weight[64:128] / 8)  # / sqrt(head dim 64)
    assert torch.equal(w[576 + 576 + 4 * 64:576 + 576 + 5 * 64], attn.q_proj.weight[4 * 64:5 * 64])
    assert torch.equal(mixer.out_proj.weight, attn.o_proj.weight) and not mixer.D.any()
    with pytest.raises(ValueError, match="d_state"):
        student_from_teacher(teacher, d_state=32, init="attention")


def test_non_llama_teacher_is_refused(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not a Llama-family"):
        load_teacher(str(tmp_path))


def test_a_student_given_as_teacher_is_refused_by_name(tmp_path):
    """In a fresh interpreter (``import llamba.teacher`` does not import llamba.model): the refusal names the
    student's model type, not transformers' "does not recognize this architecture"."""
    import subprocess
    import sys

    from llamba.model import LlambaConfig, LlambaForCausalLM

    config = LlambaConfig(d_model=64, n_layer=1, vocab_size=101, pad_vocab_size_multiple=8,
                          mlp_cfg={"intermediate_size": 96}, ssm_cfg={"d_state": 16, "n_v_heads": 4, "n_qk_heads": 2})
    save_student(LlambaForCausalLM(config), None, tmp_path)
    code = f"from llamba.teacher import load_teacher\nload_teacher({str(tmp_path)!r})"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 1 and "teacher is 'llamba' (LlambaForCausalLM), not a Llama-family model" in run.stderr, \
        run.stderr[-2000:]


def test_llama3_shaped_teacher_converts(tmp_path):
    """GQA, rope_scaling type llama3, untied head: the Llama-3.x shape family at toy size."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=300, tie_word_embeddings=False,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    assert load_teacher_config(str(tmp_path)).rope_scaling["rope_type"] == "llama3"
    teacher = AutoModelForCausalLM.from_pretrained(tmp_path)
    student = student_from_teacher(teacher, d_state=16, init="attention")
    assert not student.config.tie_embeddings
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight)
    assert student_config_from_teacher(teacher.config).n_v_heads == 4


def test_missing_and_pickle_teacher(tmp_path):
    with pytest.raises(FileNotFoundError, match="known names"):
        resolve_teacher(tmp_path / "missing")
    bad = tmp_path / "model.bin"
    torch.save({"w": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="pickle"):
        resolve_teacher(bad)


def test_gguf_route_matches_cached_folder(smollm2):
    """The fixture may come from the cached HF folder; the GGUF file itself must give the same model."""
    from llamba.teacher import fetch_known_teacher

    cached, _ = smollm2
    from_gguf, _ = load_teacher(str(fetch_known_teacher("smollm2-135m")))
    ids = torch.randint(0, 49152, (1, 12))
    with torch.no_grad():
        assert torch.equal(from_gguf(ids).logits, cached(ids).logits)
