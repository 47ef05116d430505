"""The generation engine (llamba.generation.engine): its eager path against transformers' generate on the CPU,
its prefill against the model's forward, its in_proj routes against one GEMM, per-row EOS and stop strings, and
on CUDA the captured graph against the eager path and transformers."""

from __future__ import annotations

import pytest
import torch

from llamba.generation import generate
from llamba.generation.sampling import SamplingParams
from llamba.model import LlambaForCausalLM
from test_kernels import rel

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@cuda
@pytest.mark.gpu
def test_cuda_graph_generation_matches_eager_and_transformers(default_init_student, left_padded):
    model = default_init_student().cuda()
    ids, mask = left_padded()
    ids, mask = ids.cuda(), mask.cuda()
    graph = generate(model, ids, mask, max_new_tokens=12, repetition_penalty=1.2)
    eager = generate(model, ids, mask, max_new_tokens=12, repetition_penalty=1.2, use_cuda_graph=False)
    ref = super(LlambaForCausalLM, model).generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                                                     repetition_penalty=1.2, pad_token_id=0)
    compiled = generate(model, ids, mask, max_new_tokens=12, repetition_penalty=1.2, compile=True)
    assert torch.equal(graph.new_tokens, eager.new_tokens)
    assert torch.equal(compiled.new_tokens, eager.new_tokens)
    assert torch.equal(graph.sequences, ref)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=12, repetition_penalty=1.2), ref)


STUDENTS = ["pure", "hybrid"]  # every engine path a hybrid takes too (its attention layer's static KV cache)


def student(kind: str):
    from conftest import make_default_init_student, make_hybrid_student

    return make_default_init_student() if kind == "pure" else make_hybrid_student((1,))


@pytest.mark.parametrize("kind", STUDENTS)
def test_engine_matches_transformers_generate_on_cpu(kind, left_padded):
    model = student(kind)
    ids, mask = left_padded()
    for kwargs in ({}, {"repetition_penalty": 1.5}):
        ours = generate(model, ids, mask, max_new_tokens=10, **kwargs)
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0, **kwargs)
        assert torch.equal(ours.sequences, ref)
        assert ours.lengths.tolist() == [10, 10, 10]


@pytest.mark.parametrize("compile", [False, True])
def test_engine_prefill_matches_model_forward(compile, default_init_student, left_padded):
    """The engine prefills with the decode step's pieces around each mixer (compiled, for the benchmark and
    ``compile=True``): the model's last-position logits, and the cache the model's forward leaves."""
    from llamba.generation import engine

    model = default_init_student()
    ids, mask = left_padded()
    dec = engine.Decoder(model, 3, SamplingParams(), (), 0, 8, use_graph=False, compile=compile)
    cache = model.allocate_cache(3)
    with torch.no_grad():
        got = dec.prefill_logits(ids, mask, dec.cache)
        want = model(input_ids=ids, attention_mask=mask, past_key_values=cache, logits_to_keep=1).logits[:, -1]
    assert rel(got, want[:, :got.shape[-1]]) < 1e-5
    assert dec.cache.seen_tokens == cache.seen_tokens == ids.shape[1]
    assert rel(dec.cache.ssm_states, cache.ssm_states) < 1e-5
    assert rel(dec.cache.conv_states, cache.conv_states) < 1e-5


@pytest.mark.parametrize("route", ["split", "kernel"])
def test_enginein_proj_routes_match_one_gemm(route, monkeypatch, default_init_student, left_padded):
    """The decode step's other ways to run in_proj (an aligned GEMM plus a tiny one for A_log, or A_log computed
    by the fused step from the normed input) give the one-GEMM step's logits and tokens."""
    from llamba.generation import engine

    model = default_init_student()
    ids, mask = left_padded()
    logits, tokens = {}, {}
    for r in ("one", route):
        monkeypatch.setattr(engine, "in_proj_route", lambda batch, device, r=r: r)
        dec = engine.Decoder(model, 3, SamplingParams(), (), 0, 8, use_graph=False)
        with torch.no_grad():
            dec.start(ids, mask, prefill_rows=2)
            logits[r] = dec.decode_logits(dec.tok)
            for _ in range(4):
                dec.step()
        tokens[r] = dec.out[:, :5].clone()
    assert rel(logits[route], logits["one"]) < 1e-5
    assert torch.equal(tokens[route], tokens["one"])


@pytest.mark.parametrize("kind", STUDENTS)
def test_engine_eos_and_stop_strings_per_row(kind, left_padded):
    model = student(kind)
    ids, mask = left_padded()
    free = generate(model, ids, mask, max_new_tokens=12).new_tokens
    eos = int(free[0, 3])  # row 0 meets it at position 3 at the latest
    out = generate(model, ids, mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=0, check_every=4)
    for row in range(3):
        hits = (free[row] == eos).nonzero().flatten().tolist()
        n = hits[0] + 1 if hits else 12
        assert out.lengths[row].item() == n
        assert torch.equal(out.new_tokens[row, :n], free[row, :n])
        assert (out.new_tokens[row, n:] == 0).all()

    class Digits:  # a tokenizer whose text is the token ids, space separated
        def decode(self, tokens, skip_special_tokens=False):
            return " ".join(str(t) for t in tokens)

    stop = f"{int(free[1, 4])} {int(free[1, 5])}"
    out = generate(model, ids, mask, max_new_tokens=12, stop_strings=[stop], tokenizer=Digits(), pad_token_id=0,
                   check_every=3)
    text = Digits().decode(free[1].tolist())
    first = next(k for k in range(12) if stop in Digits().decode(free[1, : k + 1].tolist()))
    assert stop in text and out.lengths[1].item() == first + 1
    assert torch.equal(out.new_tokens[1, : first + 1], free[1, : first + 1]) and (out.new_tokens[1, first + 1:] == 0).all()
    with pytest.raises(ValueError, match="tokenizer"):
        generate(model, ids, mask, max_new_tokens=2, stop_strings=["x"])


@pytest.mark.parametrize("kind", STUDENTS)
def test_engine_samples_as_transformers_generate_does(kind, left_padded):
    """Sampled rows (temperature, top-k, top-p, min-p) through the engine's one sampler: a seed gives the same
    tokens again, another seed other tokens, and every token is one the filters allow at its step (in the top k
    of the model's own logits for that row and prefix)."""
    model = student(kind)
    ids, mask = left_padded()
    options = dict(do_sample=True, temperature=0.9, top_k=5, top_p=0.95, min_p=0.01, max_new_tokens=8)
    a, b = (generate(model, ids, mask, seed=s, **options).new_tokens for s in (3, 3))
    assert torch.equal(a, b) and not torch.equal(a, generate(model, ids, mask, seed=4, **options).new_tokens)
    with torch.no_grad():
        for t in range(8):
            prefix_ids = torch.cat([ids, a[:, :t]], dim=1)
            prefix_mask = torch.cat([mask, torch.ones_like(a[:, :t])], dim=1)
            logits = model(prefix_ids, attention_mask=prefix_mask).logits[:, -1, :97]
            top5 = logits.topk(5, dim=-1).indices
            assert (top5 == a[:, t:t + 1]).any(-1).all(), t
