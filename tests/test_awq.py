"""Activation-aware scales (llamba.quant.awq): every site's fold keeps the model's function (float64, students pure
and hybrid, a Llama teacher), the search never loses to round-to-nearest and wins where a few input channels are
large, and `llamba quantize --calibration` writes an artifact that is closer to the float student."""

from __future__ import annotations

import pytest
import torch

from conftest import make_hybrid_student, make_tiny_llamba, make_tiny_student, needs_cpu_kernels
from llamba.quant import load_for_cpu, quantize_student
from llamba.quant.awq import apply_scales, block_sites, fake_quantize, search_scale


def _llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8)
    return LlamaForCausalLM(cfg).double().eval()


MODELS = {
    "pure": lambda: make_tiny_llamba(),
    "hybrid": lambda: make_tiny_llamba(attention_layers=(1,)),
    "llama": _llama,
}


def _blocks(model):
    return model.backbone.layers if hasattr(model, "backbone") else model.model.layers


@pytest.mark.parametrize("kind", MODELS)
@torch.no_grad()
def test_every_fold_keeps_the_function(kind):
    model = MODELS[kind]()
    for block in _blocks(model):  # biases and norms off their init, so a fold that forgets one shows
        for p in block.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ids = torch.randint(0, 61, (2, 19))
    before = model(ids).logits
    g = torch.Generator().manual_seed(3)
    sites = [s for i, block in enumerate(_blocks(model)) for s in block_sites(block, i)]
    assert len(sites) == 4 * len(_blocks(model))
    for site in sites:
        k = site.consumers[0].in_features
        s = site.tie(torch.rand(k, generator=g, dtype=torch.float64) * 4 + 0.25)
        site.fold(s)
        for c in site.consumers:
            c.weight.mul_(s)
    after = model(ids).logits
    assert (after - before).abs().max() < 1e-10 * before.abs().max()


def test_search_never_loses_and_wins_on_large_channels():
    torch.manual_seed(0)
    w = torch.randn(96, 128)
    x = torch.randn(256, 128)
    x[:, ::17] *= 30  # a few input channels far larger than the rest, as after a trained RMSNorm
    mean_abs = x.abs().mean(0)
    s, alpha, err, plain = search_scale([(w, 4)], mean_abs, x, 32)
    direct = ((x @ (w - fake_quantize(w, 4, 32)).T) ** 2).sum().item()
    assert plain == pytest.approx(direct, rel=1e-5)  # alpha = 0 is round-to-nearest itself
    assert alpha > 0 and err < 0.7 * plain
    flat = torch.randn(256, 128)  # no large channels: whatever it picks is no worse
    _, _, err_flat, plain_flat = search_scale([(w, 4)], flat.abs().mean(0), flat, 32)
    assert err_flat <= plain_flat


def _outlier_student():
    """The tiny student reparametrised so that a few channels of each norm's output are large and the in_proj /
    gate / up columns reading them small: the same function, the situation activation-aware scales are for."""
    model = make_tiny_student()
    with torch.no_grad():
        for layer in model.backbone.layers:
            for norm, readers in ((layer.input_layernorm, [layer.mixer.in_proj]),
                                  (layer.post_attention_layernorm, [layer.mlp.gate_proj, layer.mlp.up_proj])):
                big = torch.ones_like(norm.weight)
                big[::13] = 25.0
                norm.weight.mul_(big)
                for r in readers:
                    r.weight.div_(big)
    return model


def _logit_error(model, reference, ids):
    with torch.no_grad():
        return (model(ids).logits - reference).pow(2).mean().item()


@needs_cpu_kernels
def test_calibrated_int4_is_closer_to_the_float_student():
    g = torch.Generator().manual_seed(5)
    calibration, held_out = torch.randint(0, 100, (2048,), generator=g), torch.randint(0, 100, (1, 256), generator=g)
    base = _outlier_student()
    with torch.no_grad():
        reference = base(held_out).logits
    plain, scaled = _outlier_student(), _outlier_student()
    quantize_student(plain, "int4", mlp_bits=8)
    settings = quantize_student(scaled, "int4", mlp_bits=8, calibration=calibration)
    assert settings["calibration"]["tokens"] == 2048 and len(settings["calibration"]["sites"]) == 8
    assert _logit_error(scaled, reference, held_out) < 0.7 * _logit_error(plain, reference, held_out)


def test_calibration_needs_a_quantized_body():
    with pytest.raises(ValueError, match="need a quantized body"):
        quantize_student(make_tiny_student(), "none", calibration=torch.arange(64))
    with pytest.raises(ValueError, match="choose one of"):
        quantize_student(make_tiny_student(), "int8", calibration=torch.arange(64), calibration_method="awq")


def test_rotating_mixers_are_refused_by_the_sites():
    from llamba.model import LlambaConfig, LlambaForCausalLM

    cfg = LlambaConfig(d_model=32, n_layer=1, vocab_size=61, mlp_cfg={"intermediate_size": 64},
                       ssm_cfg={"d_state": 8, "n_v_heads": 4, "n_qk_heads": 2, "mixer": "gateloop"})
    with pytest.raises(ValueError, match="GateLoop"):
        block_sites(LlambaForCausalLM(cfg).backbone.layers[0], 0)


@needs_cpu_kernels
def test_hybrid_student_calibrates_and_quantizes():
    model = make_hybrid_student(attention_layers=(1,))
    reference = make_hybrid_student(attention_layers=(1,))
    ids = torch.randint(0, 97, (1, 40))
    settings = quantize_student(model, "int8", calibration=torch.randint(0, 97, (512,)))
    assert {name.split(".")[1] for name in settings["calibration"]["sites"]} == {"out_proj", "o_proj", "in_proj", "qkv",
                                                                       "down_proj", "gate_up"}
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0.05, atol=0.05)


def test_apply_scales_skips_float_linears():
    model = make_tiny_llamba(dtype=torch.float32)
    report = apply_scales(model, model.backbone.layers, torch.randint(0, 61, (256,)), lambda linear: 32)
    assert report == {}


def test_quantize_cli_calibration(tmp_path, tiny_student_folder, capsys):
    from llamba.cli import main

    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"w{i % 97}" for i in range(3000)))
    out = tmp_path / "a.safetensors"
    assert main(["quantize", str(tiny_student_folder), "--bits", "4", "--mlp-bits", "8", "--calibration", str(text),
                 "--calibration-tokens", "1024", "--out", str(out)]) == 0
    decoder = load_for_cpu(out)
    assert decoder.quant["calibration"]["tokens"] == 1024 and decoder.quant["calibration"]["method"] == "scales+bias"
    bias_only = tmp_path / "bias.safetensors"
    assert main(["quantize", str(tiny_student_folder), "--bits", "4", "--calibration", str(text),
                 "--calibration-tokens", "1024", "--calibration-method", "bias", "--out", str(bias_only)]) == 0
    assert load_for_cpu(bias_only).quant["calibration"]["method"] == "bias"
    assert main(["quantize", str(tiny_student_folder), "--calibration", str(tmp_path / "missing.txt"), "--out",
                 str(tmp_path / "b.safetensors")]) == 2
    assert "missing.txt" in capsys.readouterr().err and not (tmp_path / "b.safetensors").exists()
    short = tmp_path / "short.txt"
    short.write_text("w5 w6 w7")
    assert main(["quantize", str(tiny_student_folder), "--calibration", str(short), "--out",
                 str(tmp_path / "c.safetensors")]) == 2
    assert "--calibration-tokens" in capsys.readouterr().err


@needs_cpu_kernels
def test_bias_correction_lowers_the_error_further_and_round_trips(tmp_path):
    from llamba.quant.artifact import load_artifact, save_artifact
    from llamba.quant.modules import block_linear_bits, quantize_model

    g = torch.Generator().manual_seed(5)
    calibration, held_out = torch.randint(0, 100, (2048,), generator=g), torch.randint(0, 100, (1, 256), generator=g)
    with torch.no_grad():
        reference = make_tiny_student()(held_out).logits
    errors = {}
    for correct in (False, True):
        model = make_tiny_student()
        plan = {id(getattr(p, n)): b for p, n, b in block_linear_bits(model, 4, 8)}
        apply_scales(model, model.backbone.layers, calibration, lambda lin: plan[id(lin)], bias_correction=correct)
        assert (model.backbone.layers[0].mixer.in_proj.bias is not None) == correct  # the student had none
        quantize_model(model, 4, 32, 8, 8)
        errors[correct] = _logit_error(model, reference, held_out)
    assert errors[True] < 0.9 * errors[False]
    loaded, _, _ = load_artifact(save_artifact(model, None, tmp_path / "a.safetensors", {"quant": "int4"}))
    with torch.no_grad():
        torch.testing.assert_close(loaded(held_out).logits, model(held_out).logits)


def test_bias_correction_alone_leaves_the_weights_as_they_are():
    model = make_tiny_student()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = apply_scales(model, model.backbone.layers, torch.randint(0, 100, (512,)), lambda linear: 4, scales=False)
    assert all(r["alpha"] == 0 for r in report.values())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # no fold, no column scaled
    assert set(after) - set(before) == {f"backbone.layers.{i}.{n}.bias" for i in range(2)
                                        for n in ("mixer.in_proj", "mixer.out_proj", "mlp.gate_proj", "mlp.up_proj",
                                                  "mlp.down_proj")}
