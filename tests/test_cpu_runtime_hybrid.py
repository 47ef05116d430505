"""The CPU runtime (llamba.quant.runtime.CpuDecoder) on hybrid students: the C mixer blocks in runs, the attention
blocks through their own PyTorch step, against the float model's forward and transformers' generate; prefill in
pieces; the KV cache's bounds; quantized hybrids; and a hybrid without attention layers, which is today's student."""

from __future__ import annotations

import pytest
import torch

from conftest import (check_cpu_runtime_steps_are_the_forward, check_cpu_runtime_tokens_are_generates,
                      needs_cpu_kernels)
from llamba.quant import quantize_student
from llamba.quant.runtime import CpuDecoder, _segments

pytestmark = [needs_cpu_kernels,
              pytest.mark.usefixtures("one_cpu_thread")]
LAYOUTS = [(1,), (0, 2), (0,), (2,), (0, 1, 2)]


def test_segments():
    from llamba.model import LlambaConfig

    def seg(layers, n=5):
        return _segments(LlambaConfig(d_model=64, n_layer=n, attention_layers=list(layers)))

    assert seg(()) is None
    assert seg((2,)) == [(0, 2, False), (2, 3, True), (3, 5, False)]
    assert seg((0, 1, 4)) == [(0, 1, True), (1, 2, True), (2, 4, False), (4, 5, True)]


@pytest.mark.parametrize("attention_layers", LAYOUTS)
@torch.no_grad()
def test_hybrid_decoder_matches_model_forward(attention_layers, hybrid_student):
    """Prefill in odd-sized pieces, then steps fed the prompt's next tokens: each step's logits are the float
    model's forward of the whole sequence at that position (fp32, to 1e-4)."""
    model = hybrid_student(attention_layers)
    ids = torch.randint(1, 97, (1, 41), generator=torch.Generator().manual_seed(4))
    dec = CpuDecoder(model, prefill_chunk=7, max_length=48)
    check_cpu_runtime_steps_are_the_forward(dec, model, ids)
    assert dec.cache.seen_tokens == 40 and dec.cache.position.item() == 40 and dec.cache.n_valid.item() == 40


@pytest.mark.parametrize("attention_layers", [(1,), (0, 2)])
def test_hybrid_greedy_and_sampled_tokens_equal_transformers_generate(attention_layers, hybrid_student):
    model = hybrid_student(attention_layers)
    dec = CpuDecoder(model, max_length=16)  # too short for the call: generate grows it
    ids = torch.tensor([[5, 7, 9, 11, 13]])
    check_cpu_runtime_tokens_are_generates(dec, model, ids)
    assert dec.max_length == 25


def test_hybrid_kv_cache_bounds_are_clear_errors(hybrid_student):
    dec = CpuDecoder(hybrid_student((1,)), max_length=8)
    with pytest.raises(ValueError, match=r"holds 8 positions.*need 9.*larger max_length"):
        dec.prefill(torch.randint(1, 97, (1, 9)))
    dec.reset()
    dec.prefill(torch.randint(1, 97, (1, 7)))
    dec.step(3)
    with pytest.raises(ValueError, match=r"KV cache is full \(8 positions\)"):
        dec.step(3)


@torch.no_grad()
def test_no_attention_layers_is_todays_student_through_the_cpu_runtime(hybrid_student):
    from llamba.model import LlambaConfig, LlambaForCausalLM

    empty = hybrid_student((), n_layer=2)
    today = LlambaForCausalLM(LlambaConfig(**empty.config.to_dict())).eval()
    today.load_state_dict(empty.state_dict())
    ids = torch.tensor([[5, 7, 9, 11]])
    a, b = CpuDecoder(empty), CpuDecoder(today)
    assert a._segments is None and a.max_length is None
    assert torch.equal(a.prefill(ids), b.prefill(ids))
    assert torch.equal(a.step(3), b.step(3))
    assert a.generate(ids, 12) == b.generate(ids, 12)


@pytest.mark.parametrize("quant", ["int8", "int4"])
@torch.no_grad()
def test_quantized_hybrid_matches_its_pytorch_forward_and_round_trips(quant, hybrid_student, tmp_path):
    """A quantized hybrid (attention projections at the mixers' bits): the runtime's logits are the same quantized
    model's PyTorch forward, and the artifact loads back into a model that decodes the same tokens."""
    from llamba.quant.artifact import load_artifact, save_artifact
    from llamba.quant.modules import QuantizedLinear

    model = hybrid_student((0, 2))
    settings = quantize_student(model, quant)
    attention = model.backbone.layers[0].mixer
    assert all(isinstance(getattr(attention, n), QuantizedLinear) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    ids = torch.randint(1, 97, (1, 30), generator=torch.Generator().manual_seed(5))
    ref = model(ids).logits[0]
    dec = CpuDecoder(model, prefill_chunk=7, max_length=32)
    got = [dec.prefill(ids[:, :17]).clone()] + [dec.step(int(ids[0, t])).clone() for t in range(17, 29)]
    torch.testing.assert_close(torch.stack(got), ref[16:29], rtol=1e-4, atol=1e-4)
    path = save_artifact(model, None, tmp_path / "hybrid.safetensors", settings)
    loaded, _, _ = load_artifact(path)
    assert loaded.config.attention_layers == [0, 2]
    prompt = ids[:, :6]
    assert CpuDecoder(loaded).generate(prompt, 10) == dec.generate(prompt, 10)
