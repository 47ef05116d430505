"""The one sampler (llamba.generation.sampling): each logits processor against a naive version and against
transformers' own, the whole chain in transformers' order, and the exponential-race draw against the distribution."""

from __future__ import annotations

import pytest
import torch

from llamba.generation.sampling import (SamplingParams, apply_min_p, apply_repetition_penalty, apply_top_k,
                                        apply_top_p, process_logits, select_tokens)

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def naive_keep_top_p(probs_row: list[float], p: float) -> set[int]:
    order = sorted(range(len(probs_row)), key=lambda i: -probs_row[i])
    keep, total = set(), 0.0
    for i in order:
        if total < p:
            keep.add(i)
        total += probs_row[i]
    return keep


def test_processors_match_naive_and_transformers():
    from transformers.generation.logits_process import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    torch.manual_seed(0)
    logits = torch.randn(6, 50) * 3
    ids = torch.randint(0, 50, (6, 12))
    seen = torch.zeros(6, 50, dtype=torch.bool).scatter_(1, ids, True)

    pen = apply_repetition_penalty(logits, seen, 1.7)
    for r in range(6):
        for v in range(50):
            x = logits[r, v].item()
            want = (x / 1.7 if x > 0 else x * 1.7) if seen[r, v] else x
            assert pen[r, v].item() == pytest.approx(want, rel=1e-6)
    assert torch.allclose(pen, RepetitionPenaltyLogitsProcessor(1.7)(ids, logits.clone()))

    topk = apply_top_k(logits, 7)
    for r in range(6):
        kept = set(torch.nonzero(torch.isfinite(topk[r])).flatten().tolist())
        assert kept == set(torch.argsort(logits[r], descending=True)[:7].tolist())
    assert torch.equal(topk, TopKLogitsWarper(7)(ids, logits.clone()))

    for p in (0.3, 0.9):
        topp = apply_top_p(logits, p)
        probs = logits.softmax(-1)
        for r in range(6):
            assert set(torch.nonzero(torch.isfinite(topp[r])).flatten().tolist()) == naive_keep_top_p(probs[r].tolist(), p)
        assert torch.equal(topp, TopPLogitsWarper(p)(ids, logits.clone()))

    minp = apply_min_p(logits, 0.1)
    probs = logits.softmax(-1)
    for r in range(6):
        want = {v for v in range(50) if probs[r, v] >= 0.1 * probs[r].max()}
        assert set(torch.nonzero(torch.isfinite(minp[r])).flatten().tolist()) == want
    assert torch.equal(minp, MinPLogitsWarper(0.1)(ids, logits.clone()))

    # The whole chain: penalty, temperature, top-k, top-p, min-p, in transformers' order.
    params = SamplingParams(True, 0.7, 20, 0.8, 0.05, 1.3)
    got = process_logits(logits, seen, params)
    want = RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone()) / 0.7
    for warper in (TopKLogitsWarper(20), TopPLogitsWarper(0.8), MinPLogitsWarper(0.05)):
        want = warper(ids, want)
    assert torch.equal(torch.isfinite(got), torch.isfinite(want))
    assert torch.allclose(got[torch.isfinite(got)], want[torch.isfinite(want)])


def test_sampling_draws_from_the_distribution():
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0]]).expand(40000, -1)
    params = SamplingParams(do_sample=True, temperature=1.5)
    tokens = select_tokens(logits, None, params)
    freq = torch.bincount(tokens, minlength=5).double() / tokens.numel()
    assert torch.allclose(freq, (logits[0] / 1.5).softmax(-1).double(), atol=0.01)
    greedy = select_tokens(torch.randn(4, 30), None, SamplingParams())
    assert greedy.shape == (4,)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0).validate()


def test_nan_and_negative_params_are_refused_and_named():
    """NaN passes every `<`/`<=` range check: `--temperature nan` meant greedy, a NaN penalty was taken as on."""
    from llamba.generation.sampling import InvalidSamplingParam

    nan = float("nan")
    for kwargs, param in [({"temperature": nan}, "temperature"), ({"temperature": -1.0}, "temperature"),
                          ({"temperature": 0.7, "top_p": nan}, "top_p"),
                          ({"temperature": 0.7, "min_p": nan}, "min_p"),
                          ({"repetition_penalty": nan}, "repetition_penalty"),
                          ({"temperature": float("inf")}, "temperature")]:
        with pytest.raises(InvalidSamplingParam) as err:
            SamplingParams.from_temperature(**kwargs)
        assert err.value.param == param, kwargs
    assert SamplingParams.from_temperature(0.0) == SamplingParams()
    assert SamplingParams.from_temperature(0.5, top_k=3).do_sample


def test_per_row_generators_draw_what_each_row_would_alone():
    """The server samples its rows of one setting together, each from its own generator: every row's token must be
    the one that row gets by itself with that generator (its neighbours draw nothing of its noise)."""
    torch.manual_seed(1)
    logits = torch.randn(6, 50) * 3
    seen = torch.rand(6, 50) < 0.2
    params = SamplingParams(True, 0.8, 20, 0.9, 0.02, 1.3)
    seeds = [11, 12, 13, 14, 15, 16]
    alone_generators = [torch.Generator().manual_seed(s) for s in seeds]
    together_generators = [torch.Generator().manual_seed(s) for s in seeds]
    for _ in range(3):  # consecutive steps: each generator advances as it would alone
        alone = [int(select_tokens(logits[i:i + 1], seen[i:i + 1], params, g)[0])
                 for i, g in enumerate(alone_generators)]
        assert select_tokens(logits, seen, params, together_generators).tolist() == alone
    assert len(set(alone)) > 1  # the rows' draws differ: the test can tell them apart
    with pytest.raises(ValueError, match="2 generators for 6 rows"):
        select_tokens(logits, seen, params, [torch.Generator(), torch.Generator()])
