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
    assert got["s"]["kl_repeats_from_teacher"] is None  # 12 random ids of a large vocabulary: no repeated trigram


def test_kl_at_repeats_reads_the_positions_that_copy(tiny_llamba):
    """Windows that say a phrase twice: the KL at repeats is the mean KL over the positions the second saying
    predicts (repeat_positions), by hand."""
    from llamba.metrics import repeat_positions

    teacher, student = tiny_llamba(dtype=torch.float32, seed=1), tiny_llamba(dtype=torch.float32, seed=2)
    phrase = torch.randint(0, teacher.config.vocab_size, (4, 7), generator=torch.Generator().manual_seed(3))
    windows = torch.cat([phrase, phrase], 1)
    got = perplexity_and_kl({"t": teacher, "s": student}, windows, batch_size=3, progress=False)
    with torch.no_grad():
        t = F.log_softmax(teacher(windows).logits[:, :-1].double(), -1)
        s = F.log_softmax(student(windows).logits[:, :-1].double(), -1)
    mask = repeat_positions(windows)[:, :-1]
    assert mask[:, 8:13].all() and not mask[:, :7].any()  # the second saying's positions 8.. predict copies
    want = (t.exp() * (t - s)).sum(-1)[mask].mean().item()
    assert math.isclose(got["s"]["kl_repeats_from_teacher"], want, rel_tol=1e-4)


class _CharTokenizer:
    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]


def test_windows_come_round_robin_from_every_document_start():
    docs = ["a" * 50, "b" * 50, "c" * 7]  # the third is shorter than a window: it contributes nothing
    w = token_windows(docs, _CharTokenizer(), n_tokens=40, seq_len=10)
    assert [chr(int(x[0])) for x in w] == ["a", "b", "a", "b"]
    assert w.shape == (4, 10)


def test_held_out_text_is_read_by_the_one_document_reader(tmp_path):
    """--ppl-text goes through llamba.text like the distillation corpora: compressed JSON lines and parquet give
    their documents (a .json.xz or .parquet once came back as one document of raw file bytes), and bad UTF-8 in a
    .txt names the file and the line."""
    import gzip
    import json
    import lzma

    import pytest

    from llamba.eval.ppl import read_documents

    rows = [{"text": "first document"}, {"text": "second one"}]
    lines = "".join(json.dumps(r) + "\n" for r in rows).encode()
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(lines))
    (tmp_path / "a.json.xz").write_bytes(lzma.compress(lines))
    for name in ("a.jsonl.gz", "a.json.xz"):
        assert read_documents(tmp_path / name) == ["first document", "second one"]
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow

    pq.write_table(pyarrow.table({"text": ["p one", "p two"]}), tmp_path / "a.parquet")
    assert read_documents(tmp_path / "a.parquet") == ["p one", "p two"]
    (tmp_path / "a.txt").write_text("one long held-out text\nover two lines")
    assert read_documents(tmp_path / "a.txt") == ["one long held-out text\nover two lines"]
    (tmp_path / "bad.txt").write_bytes(b"fine\n\xff broken")
    with pytest.raises(ValueError, match=r"bad\.txt: line 2 is not valid UTF-8"):
        read_documents(tmp_path / "bad.txt")
