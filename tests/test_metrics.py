"""llamba.metrics, the one definition of next-token NLL and KL(teacher || student) sums, against torch's own
cross-entropy and kl_div; and its callers (distillation's validation, llamba eval, the quantized check) on it."""

import math

import torch
import torch.nn.functional as F

from llamba.metrics import kl_and_nll, kl_sum, log_probs, nll_sum, stream_windows


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
