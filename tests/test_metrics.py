"""llamba.metrics, the one definition of next-token NLL and KL(teacher || student) sums, against torch's own
cross-entropy and kl_div; and its callers (distillation's validation, llamba eval, the quantized check) on it."""

import math

import torch
import torch.nn.functional as F

from llamba.metrics import kl_and_nll, kl_sum, log_probs, nll_sum, repeat_positions, stream_windows


def _logits(seed, shape=(3, 9, 17)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 3


def test_nll_and_kl_sums_match_torch():
    s, t = _logits(0), _logits(1)
    ids = torch.randint(0, 17, (3, 9), generator=torch.Generator().manual_seed(2))
    nll, n = nll_sum(log_probs(s), ids)
    assert n == 3 * 8
    ref = F.cross_entropy(s[:, :-1].double().reshape(-1, 17), ids[:, 1:].reshape(-1), reduction="sum").item()
    assert math.isclose(nll, ref, rel_tol=1e-6)
    assert nll_sum(log_probs(s[:, :-1]), ids) == (nll, n)  # the last position, cut or not, is never counted
    kl, m = kl_sum(log_probs(t), log_probs(s))
    ref = F.kl_div(log_probs(s).double().reshape(-1, 17), log_probs(t).double().reshape(-1, 17), log_target=True,
                   reduction="sum").item()
    assert m == 3 * 9 and math.isclose(kl, ref, rel_tol=1e-5)


def test_kl_last_says_whether_each_window_s_last_position_counts():
    s, t = _logits(3), _logits(4)
    ids = torch.randint(0, 17, (3, 9), generator=torch.Generator().manual_seed(5))
    every, scored = kl_and_nll(s, t, ids, kl_last=True), kl_and_nll(s, t, ids, kl_last=False)
    assert (every["kl_positions"], scored["kl_positions"]) == (27, 24)
    last, _ = kl_sum(log_probs(t[:, -1:]), log_probs(s[:, -1:]))
    assert math.isclose(every["kl"] - scored["kl"], last, rel_tol=1e-4)
    for key in ("student_nll", "teacher_nll", "nll_positions"):
        assert every[key] == scored[key]


def test_stream_windows_drop_a_last_window_with_nothing_to_predict():
    assert [w.shape for w in stream_windows(torch.arange(10), 4)] == [(1, 4), (1, 4), (1, 2)]
    assert [w.shape for w in stream_windows(torch.arange(9), 4)] == [(1, 4), (1, 4)]
    assert torch.equal(torch.cat([w[0] for w in stream_windows(torch.arange(10), 4)]), torch.arange(10))


def test_quantized_check_perplexity_is_the_shared_nll(tiny_llamba):
    from llamba.quant.perplexity import perplexity

    model = tiny_llamba(dtype=torch.float32, seed=3)
    tokens = torch.randint(0, model.config.vocab_size, (50,), generator=torch.Generator().manual_seed(6))
    nll, n = 0.0, 0
    with torch.no_grad():
        for start in range(0, 49, 16):
            ids = tokens[start:start + 16][None]
            nll += F.cross_entropy(model(ids).logits[0, :-1].double(), ids[0, 1:], reduction="sum").item()
            n += ids.shape[1] - 1
    assert math.isclose(perplexity(model, tokens, 16), math.exp(nll / n), rel_tol=1e-5)


def _repeats_by_loop(ids, doc):
    """Position t completes a repeat when tokens t-1, t, t+1 (one document) occurred in that order earlier in it."""
    b, L = ids.shape
    out = torch.zeros(b, L, dtype=torch.bool)
    for r in range(b):
        for t in range(1, L - 1):
            for s in range(1, t):
                if (doc[r, t - 1] == doc[r, t + 1] and doc[r, s - 1] == doc[r, s + 1] == doc[r, t + 1]
                        and all(ids[r, s + k] == ids[r, t + k] for k in (-1, 0, 1))):
                    out[r, t] = True
                    break
    return out


def test_repeat_positions_match_a_loop():
    g = torch.Generator().manual_seed(0)
    for L in (1, 3, 4, 5, 40, 97):
        ids = torch.randint(0, 3, (3, L), generator=g)  # three ids: many repeats
        doc = torch.cumsum((torch.rand(3, L, generator=g) < 0.1).int(), 1)
        assert torch.equal(repeat_positions(ids, doc), _repeats_by_loop(ids, doc)), L
        assert torch.equal(repeat_positions(ids), _repeats_by_loop(ids, torch.zeros_like(ids))), L
    ids = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 9]])
    assert repeat_positions(ids).nonzero().tolist() == [[0, 5]]  # position 5 (token 6) predicts 7: "5 6 7" again
    assert not repeat_positions(ids, torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1]])).any()  # ... but in another document


def test_kl_at_repeats_is_the_kl_summed_over_those_positions():
    s, t = _logits(3), _logits(4)
    ids = torch.randint(0, 17, (3, 9), generator=torch.Generator().manual_seed(5))
    mask = torch.rand(3, 9, generator=torch.Generator().manual_seed(6)) < 0.4
    sums = kl_and_nll(s, t, ids, kl_last=True, repeats=mask)
    lt, ls = log_probs(t), log_probs(s)
    per = (lt.exp() * (lt - ls)).sum(-1)
    assert sums["repeat_positions"] == int(mask.sum())
    assert math.isclose(sums["kl_repeats"], float(per[mask].sum()), rel_tol=1e-6)
    assert math.isclose(sums["kl"], float(per.sum()), rel_tol=1e-6)
