"""The whole Llamba model: cache paths, generation, checkpoints in the official format, clear errors."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from conftest import check_generate_is_greedy_and_padding_does_not_leak, check_prefill_then_decode_is_the_forward
from llamba.checkpoint import load_model, load_student, save_student
from llamba.model import Z_BIAS_IDENTITY, LlambaConfig, LlambaForCausalLM


def tiny_config(**overrides):
    base = dict(d_model=64, n_layer=2, vocab_size=101, pad_vocab_size_multiple=8, tie_embeddings=True,
                mlp_cfg={"intermediate_size": 96}, ssm_cfg={"d_state": 16, "n_v_heads": 4, "n_qk_heads": 2, "chunk_size": 16})
    base.update(overrides)
    return LlambaConfig(**base)


def tiny_model(dtype=torch.float64, seed=0, **overrides):
    torch.manual_seed(seed)
    model = LlambaForCausalLM(tiny_config(**overrides)).to(dtype).eval()
    with torch.no_grad():  # non-trivial mixers: random D, z_bias, conv bias
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def test_silu_of_identity_bias_is_one():
    assert abs(torch.nn.functional.silu(torch.tensor(Z_BIAS_IDENTITY, dtype=torch.float64)).item() - 1) < 1e-11


@pytest.mark.parametrize("tied", [True, False])
def test_forward_equals_prefill_then_decode(tied):
    full, cache = check_prefill_then_decode_is_the_forward(tiny_model(tie_embeddings=tied), 101)
    assert full.shape == (3, 40, 101)  # padded vocabulary rows are cut off
    assert cache.get_seq_length() == 40


def test_cache_is_constant_size():
    model = tiny_model()
    cache = model.allocate_cache(2)
    size = cache.nbytes()
    with torch.no_grad():
        model(torch.randint(0, 101, (2, 300)), past_key_values=cache)
    assert cache.nbytes() == size and cache.ssm_states.dtype == torch.float64


def test_float32_state_for_bfloat16_model():
    model = tiny_model(dtype=torch.bfloat16)
    cache = model.allocate_cache(1)
    assert cache.ssm_states.dtype == torch.float32 and cache.conv_states.dtype == torch.bfloat16


def test_generate_matches_manual_greedy_and_padding_does_not_leak():
    model = tiny_model()
    check_generate_is_greedy_and_padding_does_not_leak(model, 101)


def test_save_load_roundtrip_is_bit_exact(tmp_path):
    model = tiny_model(dtype=torch.float32)
    save_student(model, None, tmp_path)
    loaded = load_student(tmp_path)
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    ids = torch.randint(0, 101, (2, 20))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


OFFICIAL_KEYS = {
    "backbone.embedding.weight", "backbone.final_layernorm.weight", "lm_head.weight",
    *(f"backbone.layers.{i}.{name}" for i in range(2) for name in (
        "input_layernorm.weight", "post_attention_layernorm.weight", "mixer.in_proj.weight", "mixer.z_bias",
        "mixer.conv1d.weight", "mixer.conv1d.bias", "mixer.D", "mixer.out_proj.weight",
        "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")),
}


def write_cartesia_checkpoint(folder, model, config_dict):
    """What a cartesia-ai/Llamba-* folder looks like: their config.json fields and key names, no model_type."""
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config_dict))
    state = {k: v.contiguous() for k, v in model.state_dict().items()
             if not (config_dict["tie_embeddings"] and k == "lm_head.weight")}
    save_file(state, str(folder / "model.safetensors"))


def official_config(tied):
    return {"d_model": 64, "n_layer": 2, "vocab_size": 101, "tie_embeddings": tied, "pad_vocab_size_multiple": 8,
            "lm_head_bias": False, "norm_epsilon": 1e-5,
            "mlp_cfg": {"intermediate_size": 96, "bias": False, "act_fn": "silu"},
            "ssm_cfg": {"d_state": 16, "n_v_heads": 4, "n_qk_heads": 2, "expand": 1, "chunk_size": 16,
                        "activation": "identity", "bias": False}}


@pytest.mark.parametrize("tied", [True, False])
def test_official_format_loads_unchanged(tmp_path, tied):
    model = tiny_model(dtype=torch.float32, tie_embeddings=tied)
    expected_keys = OFFICIAL_KEYS if not tied else OFFICIAL_KEYS - {"lm_head.weight"}
    assert set(model.state_dict()) - ({"lm_head.weight"} if tied else set()) == expected_keys
    write_cartesia_checkpoint(tmp_path, model, official_config(tied))
    loaded, tokenizer = load_model(str(tmp_path))
    assert tokenizer is None and isinstance(loaded, LlambaForCausalLM)
    ids = torch.randint(0, 101, (2, 20))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_head_dim_96():
    model = tiny_model(d_model=192, ssm_cfg={"d_state": 32, "n_v_heads": 2, "n_qk_heads": 1, "chunk_size": 16})
    assert model.config.head_dim == 96
    ids = torch.randint(0, 101, (1, 25))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.allocate_cache(1)
        steps = [model(ids[:, t:t + 1], past_key_values=cache).logits for t in range(25)]
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-10


def test_shape_mismatch_names_key_and_shapes(tmp_path):
    model = tiny_model(dtype=torch.float32)
    cfg = official_config(True)
    write_cartesia_checkpoint(tmp_path, model, cfg)
    cfg["ssm_cfg"]["d_state"] = 8  # config now disagrees with the weights
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"weight 'backbone\.layers\.0\.mixer\.\S+' has shape \(128,?.*implies \(96,?"):
        load_student(tmp_path)


def test_pickle_checkpoint_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(official_config(True)))
    torch.save({"x": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pickle"):
        load_student(tmp_path)


def test_missing_checkpoint_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such"):
        load_model(str(tmp_path / "nope"))


def test_bad_config_is_explained():
    with pytest.raises(ValueError, match="n_v_heads"):
        tiny_config(ssm_cfg={"d_state": 16, "n_v_heads": 3, "n_qk_heads": 2})


@pytest.mark.parametrize("first", ["import llamba.model", "from llamba import LlambaForCausalLM"])
def test_auto_classes_load_a_saved_student(tmp_path, first):
    """As a transformers user loads one: in a fresh interpreter, ``import llamba.model`` (or taking
    ``LlambaForCausalLM`` from ``llamba``, which imports it) is all it takes."""
    model = tiny_model(dtype=torch.float32)
    save_student(model, None, tmp_path)
    code = (f"{first}\nfrom transformers import AutoModelForCausalLM\n"
            f"print(type(AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})).__name__)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "LlambaForCausalLM", run.stderr[-2000:]


def test_import_llamba_is_light_and_its_model_classes_lazy():
    """``import llamba`` (what the ``llamba`` command imports first) loads neither torch nor transformers; the
    package's ``LlambaConfig`` / ``LlambaForCausalLM`` are still there, loaded on first use, registered then."""
    code = ("import sys, llamba\n"
            "print(sorted(m for m in ('torch', 'transformers', 'llamba.model') if m in sys.modules))\n"
            "print(llamba.__version__, 'LlambaForCausalLM' in dir(llamba))\n"
            "from transformers import AutoConfig\n"
            "cls = llamba.LlambaConfig\n"
            "print(cls is AutoConfig.for_model('llamba').__class__, cls.__module__)\n"
            "try:\n    llamba.nope\nexcept AttributeError as err:\n    print(err)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.splitlines() == ["[]", "0.1.0 True", "True llamba.model.config",
                                       "module 'llamba' has no attribute 'nope'"], run.stdout


@pytest.mark.parametrize("n_q,n_kv,L", [(4, 2, 1), (6, 2, 5), (3, 3, 4), (9, 3, 1)])
def test_cache_attention_is_softmax_attention_with_repeated_kv_heads(n_q, n_kv, L):
    """``functional.cache_attention`` (a group's query heads folded into rows, the mask over a static cache)
    against the plain definition in float64: each query head h attends to key/value head h // (n_q / n_kv) under
    the mask, rows at different positions, and what lies past a row's position does not reach it."""
    from llamba.model.functional import cache_attention

    torch.manual_seed(0)
    b, K, hd = 3, 11, 8
    q = torch.randn(b, n_q, L, hd, dtype=torch.float64)
    keys, values = torch.randn(2, b, n_kv, K, hd, dtype=torch.float64)
    ends = torch.tensor([L - 1, 6, K - 1])  # each row's last visible key for its last query; earlier queries less
    mask = torch.arange(K)[None, None, :] <= (ends[:, None] - torch.arange(L - 1, -1, -1)[None, :])[:, :, None]
    mask = mask[:, None]  # (b, 1, L, K)
    got = cache_attention(q, keys, values, mask, hd ** -0.5)
    rep = n_q // n_kv
    k_full, v_full = keys.repeat_interleave(rep, dim=1), values.repeat_interleave(rep, dim=1)
    scores = (q @ k_full.transpose(-1, -2)) * hd ** -0.5
    want = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v_full
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # keys past every row's mask change nothing
    later = keys.clone()
    later[:, :, K - 1:] += 5.0
    mask_short = mask.clone()
    mask_short[..., K - 1:] = False
    torch.testing.assert_close(cache_attention(q, later, values, mask_short, hd ** -0.5),
                               cache_attention(q, keys, values, mask_short, hd ** -0.5), rtol=0, atol=0)
