"""Perplexity and KL(teacher || model) against torch's cross-entropy and kl_div on the same logits."""

import math

import torch
import torch.nn.functional as F

from llamba.eval.ppl import perplexity_and_kl, token_windows


def test_ppl_and_kl_match_torch_reference(tiny_llamba):
    teacher, student = tiny_llamba(dtype=torch.float32, seed=1), tiny_llamba(dtype=torch.float32, seed=2)
    windows = torch.randint(0, teacher.config.vocab_size, (5, 12), generator=torch.Generator().manual_seed(0))
    got = perplexity_and_kl({"t": teacher, "s": student}, windows, batch_size=2, progress=False)
    with torch.no_grad():
        t = F.log_softmax(teacher(windows).logits[:, :-1].double(), -1)
        s = F.log_softmax(student(windows).logits[:, :-1].double(), -1)
    target = windows[:, 1:].reshape(-1)
    n = target.numel()
    assert got["s"]["tokens"] == n == 5 * 11
    assert math.isclose(got["t"]["nll"], F.nll_loss(t.reshape(n, -1), target).item(), rel_tol=1e-5)
    assert math.isclose(got["s"]["ppl"], math.exp(F.nll_loss(s.reshape(n, -1), target).item()), rel_tol=1e-5)
    kl = F.kl_div(s.reshape(n, -1), t.reshape(n, -1), log_target=True, reduction="sum").item() / n
    assert math.isclose(got["s"]["kl_from_teacher"], kl, rel_tol=1e-4)
    assert got["t"]["kl_from_teacher"] == 0.0 and kl > 0


class _CharTokenizer:
    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]


def test_windows_come_round_robin_from_every_document_start():
    docs = ["a" * 50, "b" * 50, "c" * 7]  # the third is shorter than a window: it contributes nothing
    w = token_windows(docs, _CharTokenizer(), n_tokens=40, seq_len=10)
    assert [chr(int(x[0])) for x in w] == ["a", "b", "a", "b"]
    assert w.shape == (4, 10)
