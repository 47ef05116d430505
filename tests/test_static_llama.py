"""The benchmark's strong baseline (llamba.bench.llama_static.StaticLlama): its prefill and decode step against the
transformers forward, and its compiled pieces against its eager ones."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def test_static_llama_matches_transformers_forward():
    from transformers import LlamaConfig, LlamaForCausalLM

    from llamba.bench.llama_static import StaticLlama

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=96, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
                      num_key_value_heads=2, head_dim=16, rope_theta=100000.0, tie_word_embeddings=True,
                      max_position_embeddings=256)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 128, (3, 9))
    st = StaticLlama(model, 3, 16)
    with torch.no_grad():
        assert torch.allclose(st.prefill(ids), model(ids).logits[:, -1], atol=1e-4)
        st.start(ids, prefill_rows=2)
        seq = torch.cat([ids, st.tok[:, None]], 1)
        for _ in range(5):
            logits = st._decode_logits(st.tok, st.pos)
            full = model(seq).logits[:, -1]
            assert torch.allclose(logits, full, atol=1e-4)
            st.tok.copy_(torch.randint(0, 128, (3,)))  # any next token: the cache must follow it
            st.pos += 1
            seq = torch.cat([seq, st.tok[:, None]], 1)


def test_static_llama_compiled_step_matches_eager():
    """The benchmark times the teacher with its pieces compiled (the dense ones, and the attention's rotations and
    softmax): the compiled prefill and step give the eager ones' logits and tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from llamba.bench.llama_static import StaticLlama

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=96, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
                      num_key_value_heads=2, head_dim=16, rope_theta=100000.0, max_position_embeddings=256)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 128, (3, 9))
    eager, compiled = StaticLlama(model, 3, 16), StaticLlama(model, 3, 16, compile=True)
    with torch.no_grad():
        assert torch.allclose(compiled.prefill(ids), eager.prefill(ids), atol=1e-5)
        eager.start(ids)
        compiled.start(ids)
        for _ in range(3):
            want, got = eager._decode_logits(eager.tok, eager.pos), compiled._decode_logits(compiled.tok, compiled.pos)
            assert torch.allclose(got, want, atol=1e-5)
            eager.step()
            compiled.step()
        assert torch.equal(compiled.tok, eager.tok)
