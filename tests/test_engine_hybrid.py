"""The model's own decode step (``LlambaForCausalLM.step``, what the generation engine captures in its CUDA graph)
and the engine on hybrid students: the step against the model's forward (float64), every in_proj route and piece
set, the static KV cache's limits, left padding that must not leak, prefill in row groups, and a hybrid without
attention layers that is today's student. On CUDA: the captured graph against the eager engine and the forward."""

from __future__ import annotations

import pytest
import torch

from llamba.generation import generate
from llamba.generation.engine import Decoder
from llamba.generation.sampling import GREEDY
from llamba.model.functional import EAGER, StepOptions, compiled_pieces

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
pytestmark = pytest.mark.usefixtures("one_cpu_thread")
EXACT = dict(rtol=1e-10, atol=1e-10)  # float64, the same arithmetic in another order


def _rows(left_padded, length=9):
    ids, mask = left_padded(batch=3, length=length)
    return ids, mask


@pytest.mark.parametrize("attention_layers", [(), (1,), (0, 2)], ids=["pure", "hybrid1", "hybrid0,2"])
@pytest.mark.parametrize("options", [StepOptions(None, "one"), StepOptions(EAGER, "one"), StepOptions(EAGER, "split"),
                                     StepOptions(EAGER, "kernel")], ids=["modules", "one", "split", "kernel"])
@torch.no_grad()
def test_step_equals_forward_of_one_token(attention_layers, options, hybrid_student, left_padded):
    """After a left-padded prefill, step() gives what forward() gives for each next token: logits and cache."""
    model = hybrid_student(attention_layers, dtype=torch.float64)
    ids, mask = _rows(left_padded)
    ref, ours = model.allocate_cache(3, max_length=16), model.allocate_cache(3, max_length=16)
    want = model(ids, attention_mask=mask, past_key_values=ref, use_cache=True, logits_to_keep=1).logits[:, -1]
    got = model.prefill(ids, ours, mask, options.pieces)
    torch.testing.assert_close(got, want, **EXACT)
    for t in range(4):
        tok = torch.tensor([5 + t, 40, 90 - t])
        want = model(tok[:, None], past_key_values=ref, use_cache=True).logits[:, -1]
        got = model.step(tok, ours, options)
        torch.testing.assert_close(got, want, **EXACT)
    assert ours.seen_tokens == ref.seen_tokens == ids.shape[1] + 4
    for a, b in zip(ours._tensors(), ref._tensors()):
        torch.testing.assert_close(a, b, **EXACT)
    if attention_layers:
        assert torch.equal(ours.key_valid, ref.key_valid) and torch.equal(ours.n_valid, ref.n_valid)
        assert ours.position.tolist() == [ref.seen_tokens] * 3


@torch.no_grad()
def test_step_on_a_fresh_cache_is_a_forward_of_one_token(hybrid_student):
    model = hybrid_student((1,), dtype=torch.float64)
    tok = torch.tensor([3, 50])
    torch.testing.assert_close(model.step(tok, model.allocate_cache(2, max_length=4)),
                               model(tok[:, None]).logits[:, -1], **EXACT)


def test_compiled_pieces_step_matches_eager(hybrid_student, left_padded):
    model = hybrid_student((1,))
    ids, mask = _rows(left_padded)
    logits = {}
    for name, pieces in (("eager", EAGER), ("compiled", compiled_pieces())):
        cache = model.allocate_cache(3, max_length=16)
        with torch.no_grad():
            first = model.prefill(ids, cache, mask, pieces)
            logits[name] = torch.stack([first, model.step(first.argmax(-1), cache, StepOptions(pieces))])
    torch.testing.assert_close(logits["compiled"], logits["eager"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attention_layers", [(1,), (0, 2)])
def test_engine_on_a_hybrid_matches_transformers_generate(attention_layers, hybrid_student, left_padded):
    """The eager engine (what the graph replays) against transformers' generate over the model's forward."""
    model = hybrid_student(attention_layers, dtype=torch.float64)
    ids, mask = _rows(left_padded)
    for kwargs in ({}, {"repetition_penalty": 1.5}):
        ours = generate(model, ids, mask, max_new_tokens=10, **kwargs)
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0, **kwargs)
        assert torch.equal(ours.sequences, ref)


@torch.no_grad()
def test_left_padding_does_not_leak(hybrid_student, left_padded):
    """Each row of a left-padded batch decodes as it does alone without its padding, whatever the padding holds:
    its logits at every step and its tokens."""
    model = hybrid_student((0, 2), dtype=torch.float64)
    ids, mask = _rows(left_padded)
    noisy = ids.clone()
    noisy[mask == 0] = 77  # padding tokens that would change the output if anything attended to them
    batch = Decoder(model, 3, GREEDY, (), 0, 8, use_graph=False, max_length=32)
    batch.start(noisy, mask, prefill_rows=3)
    feeds = [batch.tok.clone()] + [torch.full((3,), 5 + t) for t in range(4)]
    steps = [batch.decode_logits(tok) for tok in feeds]
    for row in range(3):
        real = ids[row:row + 1, int((mask[row] == 0).sum()):]
        alone = Decoder(model, 1, GREEDY, (), 0, 8, use_graph=False, max_length=32)
        alone.start(real, None, prefill_rows=1)
        assert torch.equal(alone.tok, feeds[0][row:row + 1])  # the first token, from the prefill
        for tok, want in zip(feeds, steps):
            torch.testing.assert_close(alone.decode_logits(tok[row:row + 1]), want[row:row + 1], **EXACT)
    out = generate(model, noisy, mask, max_new_tokens=6).new_tokens
    for row in range(3):
        real = ids[row:row + 1, int((mask[row] == 0).sum()):]
        assert torch.equal(generate(model, real, None, max_new_tokens=6).new_tokens[0], out[row])


@torch.no_grad()
def test_prefill_in_row_groups_equals_one_group(hybrid_student, left_padded):
    model = hybrid_student((1,), dtype=torch.float64)
    ids, mask = _rows(left_padded)
    decs = {}
    for rows in (1, 2, 3):
        dec = decs[rows] = Decoder(model, 3, GREEDY, (), 0, 8, use_graph=False, max_length=16)
        dec.start(ids, mask, prefill_rows=rows)
        for _ in range(3):
            dec.advance()
    for rows in (1, 2):
        assert torch.equal(decs[rows].out, decs[3].out)
        for a, b in zip(decs[rows].cache._tensors(), decs[3].cache._tensors()):
            torch.testing.assert_close(a, b, **EXACT)
        assert torch.equal(decs[rows].cache.n_valid, decs[3].cache.n_valid)
        assert torch.equal(decs[rows].cache.key_valid, decs[3].cache.key_valid)


@torch.no_grad()
def test_no_attention_layers_is_todays_student_through_the_engine(hybrid_student, left_padded):
    """attention_layers=[] builds today's student: the same modules, weights and engine output, token for token."""
    from llamba.model import LlambaConfig, LlambaForCausalLM

    empty = hybrid_student((), n_layer=2)
    cfg = empty.config.to_dict()
    assert "attention_layers" not in cfg
    today = LlambaForCausalLM(LlambaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures",)})).eval()
    today.load_state_dict(empty.state_dict())
    assert empty.backbone.rotary_emb is None and not empty.allocate_cache(1).has_attention
    ids, mask = _rows(left_padded)
    for kwargs in ({}, {"repetition_penalty": 1.3, "compile": True}):
        a = generate(empty, ids, mask, max_new_tokens=8, **kwargs)
        b = generate(today, ids, mask, max_new_tokens=8, **kwargs)
        assert torch.equal(a.sequences, b.sequences)


def test_the_static_kv_cache_must_hold_prompt_and_new_tokens(hybrid_student):
    model = hybrid_student((1,))
    ids = torch.randint(1, 97, (1, 10))
    with pytest.raises(ValueError, match="needs max_length"):
        Decoder(model, 1, GREEDY, (), 0, 8, use_graph=False)
    dec = Decoder(model, 1, GREEDY, (), 0, 8, use_graph=False, max_length=12)
    with pytest.raises(ValueError, match=r"prompt \(10 tokens\) \+ max_new_tokens \(3\) need 13 .* holds 12.*"
                                         r"max_length=13"):
        dec.check_fits(10, 3)
    with pytest.raises(ValueError, match="holds 12"):
        dec.start(torch.randint(1, 97, (1, 12)), None, 1)
    dec.start(ids, None, 1)
    dec.advance()
    dec.advance()  # 12 positions written
    with pytest.raises(ValueError, match=r"KV cache is full \(12 positions\)"):
        dec.advance()
    # generate() sizes the cache itself, past the default, and keeps one decoder while it fits
    long = torch.randint(1, 97, (1, 300))
    assert generate(model, long, max_new_tokens=2).new_tokens.shape == (1, 2)
    (dec,) = model.__dict__["_llamba_decoders"].values()
    assert dec.max_length == 512
    generate(model, ids, max_new_tokens=2)
    assert next(iter(model.__dict__["_llamba_decoders"].values())) is dec


# -- CUDA ---------------------------------------------------------------------------------------------------------
@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("attention_layers", [(), (1,), (0, 2)])
def test_cuda_graph_engine_on_a_hybrid_matches_eager_and_the_forward(attention_layers, hybrid_student, left_padded):
    """The captured model step (graph, compiled) against the eager engine, transformers' generate over the
    forward, and model.generate (which takes the engine on CUDA); float32, so tokens can be compared exactly."""
    from llamba.model import LlambaForCausalLM

    model = hybrid_student(attention_layers).cuda()
    ids, mask = (t.cuda() for t in _rows(left_padded))
    noisy = ids.masked_fill(mask == 0, 77)
    graph = generate(model, noisy, mask, max_new_tokens=12, repetition_penalty=1.2)
    eager = generate(model, noisy, mask, max_new_tokens=12, repetition_penalty=1.2, use_cuda_graph=False)
    compiled = generate(model, noisy, mask, max_new_tokens=12, repetition_penalty=1.2, compile=True)
    ref = super(LlambaForCausalLM, model).generate(noisy, attention_mask=mask, max_new_tokens=12, do_sample=False,
                                                     repetition_penalty=1.2, pad_token_id=0)
    assert torch.equal(graph.new_tokens, eager.new_tokens)
    assert torch.equal(compiled.new_tokens, eager.new_tokens)
    assert torch.equal(graph.sequences, ref)
    assert torch.equal(model.generate(noisy, attention_mask=mask, max_new_tokens=12, repetition_penalty=1.2), ref)
    for row in range(3):  # no leak from the padding on the GPU either
        real = ids[row:row + 1, int((mask[row] == 0).sum()):]
        assert torch.equal(generate(model, real, None, max_new_tokens=12, repetition_penalty=1.2).new_tokens[0],
                           graph.new_tokens[row])


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("route", ["one", "split", "kernel"])
def test_cuda_graph_step_matches_eager_and_the_forward_in_bf16(route, hybrid_student, left_padded):
    """bf16, each in_proj route: the replayed graph chooses the eager step's tokens and leaves its cache (the same
    kernels), and the eager step's logits are the forward's to bf16 rounding."""
    model = hybrid_student((1,)).cuda().to(torch.bfloat16)
    ids, mask = (t.cuda() for t in _rows(left_padded))
    decs = {g: Decoder(model, 3, GREEDY, (), 0, 16, use_graph=g, max_length=32, in_proj=route) for g in (True, False)}
    for dec in decs.values():
        dec.start(ids, mask, prefill_rows=3)
        for _ in range(6):
            dec.advance()
    assert torch.equal(decs[True].out, decs[False].out)
    for a, b in zip(decs[True].cache._tensors(), decs[False].cache._tensors()):
        assert torch.equal(a, b)
    eager, ref = decs[False], model.allocate_cache(3, max_length=32)
    eager.start(ids, mask, prefill_rows=3)
    with torch.no_grad():
        model(ids, attention_mask=mask, past_key_values=ref, use_cache=True)
        for t in range(4):
            tok = torch.full((3,), 5 + t, device="cuda")
            want = model(tok[:, None], past_key_values=ref, use_cache=True).logits[:, -1].float()
            got = eager.decode_logits(tok).float()
            assert (got - want).abs().max() < 0.03 * want.abs().max(), (route, t)


@torch.no_grad()
def test_a_selected_copy_steps_on_its_own(hybrid_student):
    """``select_rows`` (lm-eval's cached contexts) copies the device-side position too: stepping the copy leaves
    the original where it was, and the copy's step equals the original's on the same row."""
    model = hybrid_student((1,), dtype=torch.float64)
    cache = model.allocate_cache(2, max_length=16)
    model.prefill(torch.randint(1, 97, (2, 5)), cache)
    copy = cache.select_rows(torch.tensor([1, 1]))
    got = model.step(torch.tensor([4, 4]), copy)
    assert cache.position.tolist() == [5, 5] and copy.position.tolist() == [6, 6]
    want = model.step(torch.tensor([4, 4]), cache)
    torch.testing.assert_close(got, want[[1, 1]], **EXACT)
