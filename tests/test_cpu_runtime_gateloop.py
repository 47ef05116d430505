"""The CPU runtime (llamba.quant.runtime.CpuDecoder) on GateLoop students: every block (GateLoop mixer, or a hybrid's
attention) runs through its own PyTorch step between the C embedding and head, the phase kept in the decoder's
``LlambaCache``; against the model's forward and transformers' generate, float32 and quantized, and through
`llamba generate`."""

from __future__ import annotations

import pytest
import torch

from conftest import (check_cpu_runtime_steps_are_the_forward, check_cpu_runtime_tokens_are_generates,
                      make_word_tokenizer, needs_cpu_kernels)
from llamba.model import LlambaConfig, LlambaForCausalLM
from llamba.quant import quantize_student
from llamba.quant.runtime import CpuDecoder, _segments

pytestmark = [needs_cpu_kernels,
              pytest.mark.usefixtures("one_cpu_thread")]
VOCAB = 100  # make_word_tokenizer's


def gateloop_student(attention_layers=(), n_layer: int = 3, seed: int = 0, phase: bool = True, scale: float = 0.2):
    """A float32 GateLoop student (d_model 64, d_state 16, chunk 8), every weight moved off its init by noise of std
    ``scale`` (0.2: greedy decoding does not settle on one token at once), so the phase depends on the input;
    ``attention_layers``: a hybrid's (as conftest's ``make_hybrid_student``). ``phase=False``: the same weights
    with phase_proj zeroed (theta = 0, the Discrete Mamba-2 recurrence)."""
    torch.manual_seed(seed)
    hybrid = {"attention_layers": list(attention_layers),
              "attention_cfg": {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                                "max_position_embeddings": 512}} if attention_layers else {}
    cfg = LlambaConfig(d_model=64, n_layer=n_layer, vocab_size=VOCAB, mlp_cfg={"intermediate_size": 96},
                       ssm_cfg={"d_state": 16, "n_v_heads": 4, "n_qk_heads": 2, "chunk_size": 8, "mixer": "gateloop"},
                       **hybrid)
    model = LlambaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
        if not phase:
            for i, layer in enumerate(model.backbone.layers):
                if not cfg.is_attention_layer(i):
                    layer.mixer.phase_proj.weight.zero_()
                    layer.mixer.phase_proj.bias.zero_()
    return model


def test_segments_run_every_gateloop_block_in_pytorch():
    assert _segments(gateloop_student().config) == [(0, 1, True), (1, 2, True), (2, 3, True)]
    assert _segments(gateloop_student((1,)).config) == [(0, 1, True), (1, 2, True), (2, 3, True)]
    plain = LlambaConfig(d_model=64, n_layer=3, ssm_cfg={"d_state": 16, "n_v_heads": 4, "n_qk_heads": 2})
    assert _segments(plain) is None


@pytest.mark.parametrize("attention_layers", [(), (1,)])
@torch.no_grad()
def test_gateloop_decoder_matches_model_forward(attention_layers):
    """Prefill in odd-sized pieces, then steps fed the prompt's next tokens: each step's logits are the float
    model's forward of the whole sequence at that position (fp32, to 1e-4), and the decoder's cache holds the
    phase and states that the model's own cache holds after the same tokens."""
    model = gateloop_student(attention_layers)
    ids = torch.randint(1, VOCAB, (1, 41), generator=torch.Generator().manual_seed(4))
    dec = CpuDecoder(model, prefill_chunk=7, max_length=48)
    check_cpu_runtime_steps_are_the_forward(dec, model, ids)
    cache = model.allocate_cache(1, max_length=48)
    model(ids[:, :40], past_key_values=cache, use_cache=True)
    assert dec.cache.seen_tokens == 40 and dec.cache.phase_states[0].abs().min() > 0  # layer 0: GateLoop
    for name in ("phase_states", "ssm_states", "conv_states"):
        torch.testing.assert_close(getattr(dec.cache, name), getattr(cache, name), rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_prefill_in_pieces_equals_one_piece():
    model = gateloop_student()
    ids = torch.randint(1, VOCAB, (1, 29), generator=torch.Generator().manual_seed(6))
    whole, pieces = CpuDecoder(model), CpuDecoder(model, prefill_chunk=5)
    torch.testing.assert_close(pieces.prefill(ids), whole.prefill(ids), rtol=1e-5, atol=1e-5)
    for name in ("phase_states", "ssm_states", "conv_states"):
        torch.testing.assert_close(getattr(pieces.cache, name), getattr(whole.cache, name), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(pieces.step(3), whole.step(3), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attention_layers", [(), (1,)])
def test_gateloop_greedy_and_sampled_tokens_equal_transformers_generate(attention_layers):
    model = gateloop_student(attention_layers)
    dec = CpuDecoder(model, max_length=16)
    ids = torch.tensor([[5, 7, 9, 11, 13]])
    check_cpu_runtime_tokens_are_generates(dec, model, ids)
    # the phase matters here: without it the same weights choose other tokens
    assert CpuDecoder(gateloop_student(attention_layers, phase=False)).generate(ids, 20) != dec.generate(ids, 20)


@torch.no_grad()
def test_reset_and_new_cache():
    """generate resets the decoder's own cache (phase included), and a cache from new_cache continues as the
    decoder's own does, without touching it."""
    dec = CpuDecoder(gateloop_student())
    ids = torch.tensor([[5, 7, 9, 11]])
    first = dec.generate(ids, 12)
    assert dec.generate(ids, 12) == first
    dec.reset()
    assert dec.cache.seen_tokens == 0 and not dec.cache.phase_states.any() and not dec.cache.ssm_states.any()
    want = dec.prefill(ids).clone()
    want_step = dec.step(first[0]).clone()
    own = dec.cache.phase_states.clone()
    other = dec.new_cache()
    assert other.phase_states is not None and not other.phase_states.any()
    assert torch.equal(dec.prefill(ids, other), want)
    assert torch.equal(dec.step(first[0], other), want_step)
    assert torch.equal(other.phase_states, own) and torch.equal(dec.cache.phase_states, own)


@pytest.mark.parametrize("quant,tolerance", [("int8", 0.03), ("int4", 0.3)])
@torch.no_grad()
def test_quantized_gateloop_matches_its_forward_near_the_float_one_and_round_trips(quant, tolerance, tmp_path):
    """Quantized GateLoop (phase_proj stays float32): the runtime's logits are the same quantized model's PyTorch
    forward, within ``tolerance`` (relative, in norm) of the float32 model's, and the artifact loads back into a
    model that decodes the same tokens."""
    from torch import nn

    from llamba.quant.artifact import load_artifact, save_artifact
    from llamba.quant.modules import QuantizedLinear

    model = gateloop_student((1,), scale=0.05)  # milder weights than greedy needs: less noise amplified
    ids = torch.randint(1, VOCAB, (1, 30), generator=torch.Generator().manual_seed(5))
    float_logits = model(ids).logits[0]
    settings = quantize_student(model, quant)
    mixer = model.backbone.layers[0].mixer
    assert isinstance(mixer.in_proj, QuantizedLinear) and type(mixer.phase_proj) is nn.Linear
    ref = model(ids).logits[0]
    dec = CpuDecoder(model, prefill_chunk=7, max_length=32)
    got = torch.stack([dec.prefill(ids[:, :17]).clone()] + [dec.step(int(ids[0, t])).clone() for t in range(17, 29)])
    torch.testing.assert_close(got, ref[16:29], rtol=1e-4, atol=1e-4)
    assert 0 < (got - float_logits[16:29]).norm() < tolerance * float_logits[16:29].norm()
    loaded, _, _ = load_artifact(save_artifact(model, None, tmp_path / "gl.safetensors", settings))
    assert loaded.config.mixer == "gateloop"
    prompt = ids[:, :6]
    assert CpuDecoder(loaded).generate(prompt, 10) == dec.generate(prompt, 10)


def test_calibrated_quantization_of_gateloop_is_refused_with_what_works():
    with pytest.raises(ValueError, match="GateLoop.*without a calibration text"):
        quantize_student(gateloop_student(), "int8", calibration=torch.arange(1, 65))


def test_llamba_generate_runs_a_gateloop_student_through_the_cpu_runtime(tmp_path, capsys):
    """A float GateLoop student folder on the CPU goes to the CPU runtime (its report line says so) and prints
    transformers' greedy tokens; --quant int8 runs too."""
    from llamba.checkpoint import save_student
    from llamba.cli import main

    folder = save_student(gateloop_student(), make_word_tokenizer(VOCAB), tmp_path / "student")

    def generated(*options):
        assert main(["generate", "--model", str(folder), "--prompt", "w5 w7 w9", "--max-new-tokens", "12",
                     "--device", "cpu", "--no-chat-template", *options]) == 0
        out = capsys.readouterr()
        return out.out.strip(), out.err

    text, err = generated()
    assert "none, CPU runtime" in err
    reference, err = generated("--transformers")
    assert "CPU runtime" not in err and text == reference and len(text.split()) == 12
    text, err = generated("--quant", "int8")
    assert "int8, CPU runtime" in err and text
