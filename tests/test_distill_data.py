"""Distillation data pipeline: packing, manifest, incremental re-runs, tokenizer checks, boundaries, sampler."""

import json
import lzma

import numpy as np
import pytest
import torch

from llamba.distill.data import (PackedTokens, Sampler, boundaries, find_sources, load_manifest, prepare_data,
                                 split_tokens, tokenize_documents)
from llamba.distill.testing import make_corpus, make_teacher


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill-data")
    corpus = make_corpus(root / "corpus", n_docs=120, n_val=10)
    teacher = make_teacher(root / "teacher", corpus)
    from transformers import AutoTokenizer

    return root, corpus, AutoTokenizer.from_pretrained(teacher)


def test_sources_split_by_name(tiny, tmp_path):
    root, corpus, _ = tiny
    assert [p.split("/")[-1] for p in find_sources(str(corpus))["val"]] == ["val.jsonl"]
    with pytest.raises(FileNotFoundError, match="no such file"):
        find_sources(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="no .jsonl"):
        find_sources(str(tmp_path))


def test_pack_matches_plain_tokenization(tiny, tmp_path):
    """Every document, tokenized alone plus EOS, appears in order in the shards: nothing lost, nothing merged."""
    root, corpus, tok = tiny
    manifest = prepare_data(find_sources(str(corpus)), tok, tmp_path, max_tokens=None, val_tokens=10**9)
    texts = [json.loads(line)["text"] for line in (corpus / "train.jsonl").read_text().splitlines()]
    expected = [i for t in texts for i in tok(t, add_special_tokens=False).input_ids + [tok.eos_token_id]]
    shards = [s for s in manifest["shards"] if s["split"] == "train"]
    got = np.concatenate([np.fromfile(tmp_path / s["file"], dtype=np.uint16) for s in shards]).tolist()
    assert got == expected
    assert manifest["dtype"] == "uint16" and split_tokens(manifest, "train") == len(expected)
    assert split_tokens(manifest, "val") > 0


def test_long_documents_are_cut_where_tokenization_does_not_change(tiny, monkeypatch):
    _, _, tok = tiny
    import llamba.distill.data as data

    monkeypatch.setattr(data, "PIECE_CHARS", 50)
    text = "\n".join(f"Line {i} of a long book with words." for i in range(40))
    assert tokenize_documents(tok, [text])[0] == tok(text, add_special_tokens=False).input_ids + [tok.eos_token_id]


def test_incremental_and_lazy(tiny, tmp_path):
    root, corpus, tok = tiny
    small = prepare_data(find_sources(str(corpus)), tok, tmp_path, max_tokens=500, val_tokens=200)
    n_small = split_tokens(small, "train")
    assert 500 <= n_small < 1500  # whole documents, stops soon after the cap
    state = next(v for k, v in small["sources"].items() if k.endswith("train.jsonl"))
    docs_small = state["documents"]
    files_before = {s["file"] for s in small["shards"]}
    big = prepare_data(find_sources(str(corpus)), tok, tmp_path, max_tokens=3000, val_tokens=200)
    assert {s["file"] for s in big["shards"]} >= files_before  # old shards untouched, new ones appended
    # the continuation equals a fresh preparation of the larger budget
    fresh = prepare_data(find_sources(str(corpus)), tok, tmp_path / "fresh", max_tokens=3000, val_tokens=200)
    read = lambda d, m: np.concatenate([np.fromfile(d / s["file"], dtype=np.uint16)
                                        for s in m["shards"] if s["split"] == "train"])
    assert np.array_equal(read(tmp_path, big), read(tmp_path / "fresh", fresh))
    assert big["sources"][next(k for k in big["sources"] if k.endswith("train.jsonl"))]["documents"] > docs_small


def test_tokenizer_mismatch_is_refused(tiny, tmp_path):
    root, corpus, tok = tiny
    prepare_data(find_sources(str(corpus)), tok, tmp_path, max_tokens=300, val_tokens=100)
    other = make_teacher(tmp_path / "other", vocab=300)
    from transformers import AutoTokenizer

    with pytest.raises(ValueError, match="different tokenizer"):
        prepare_data(find_sources(str(corpus)), AutoTokenizer.from_pretrained(other), tmp_path, 600, 100)


def test_compressed_and_holdout(tiny, tmp_path):
    """.jsonl.xz reads like .jsonl; without a validation file every 100th document is held out."""
    root, corpus, tok = tiny
    src = tmp_path / "src"
    src.mkdir()
    with lzma.open(src / "books.jsonl.xz", "wt") as f:
        f.write((corpus / "train.jsonl").read_text())
    m = prepare_data(find_sources(str(src)), tok, tmp_path / "out", max_tokens=None, val_tokens=10**6)
    state = next(iter(m["sources"].values()))
    assert state["documents"] == 120 and state["exhausted"]
    assert 0 < split_tokens(m, "val") < split_tokens(m, "train") / 20


def test_boundaries_against_a_loop():
    eos = 7
    ids = torch.tensor([[1, 7, 3, 4, 7, 7, 5, 6], [7, 2, 2, 2, 2, 7, 1, 1]])
    seq_idx, pos = boundaries(ids, eos)
    for b in range(ids.shape[0]):
        doc, p = 0, 0
        for t in range(ids.shape[1]):
            if t > 0 and ids[b, t - 1] == eos:
                doc, p = doc + 1, 0
            assert seq_idx[b, t] == doc and pos[b, t] == p
            p += 1


def test_sampler_deterministic_and_resumable():
    a = Sampler(37, seed=3)
    first = [a.next(5) for _ in range(20)]  # crosses epochs
    b = Sampler(37, seed=3)
    for _ in range(7):
        b.next(5)
    state = b.state_dict()
    c = Sampler(37, seed=3)
    c.load_state_dict(state)
    assert [c.next(5) for _ in range(13)] == first[7:]
    assert sorted(i for batch in first[:7] for i in batch)[:35] != list(range(35))  # shuffled
    # two ranks split each global batch; together they see what one process sees
    r0, r1 = Sampler(37, 3, rank=0, world=2), Sampler(37, 3, rank=1, world=2)
    one = Sampler(37, 3)
    for _ in range(10):
        assert r0.next(2) + r1.next(2) == one.next(4)
    with pytest.raises(ValueError, match="seq_len changed"):
        Sampler(40, seed=3).load_state_dict(state)


def test_packed_windows(tiny, tmp_path):
    root, corpus, tok = tiny
    prepare_data(find_sources(str(corpus)), tok, tmp_path, max_tokens=2000, val_tokens=300)
    data = PackedTokens(tmp_path, "train", 32)
    stream = np.concatenate([np.fromfile(tmp_path / s["file"], dtype=np.uint16)
                             for s in load_manifest(tmp_path)["shards"] if s["split"] == "train"])
    assert len(data) == len(stream) // 32  # one source, one shard here
    batch = data.batch([0, 3])
    assert batch.input_ids[1].tolist() == stream[96:128].tolist()
    with pytest.raises(ValueError, match="fewer than"):
        PackedTokens(tmp_path, "val", 10**6)


def test_every_recipe_loads_and_flags_override():
    from llamba.cli import distill as cli
    from llamba.distill.recipes import available, load_recipe, stage_config

    assert {"smoke", "smollm2-135m", "llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b"} <= set(available())
    for name in available():
        r = load_recipe(name)
        for s in (1, 2, 3):
            cfg = stage_config(r, s)
            assert cfg["tokens"] > 0 and cfg["lr"] > 0 and isinstance(cfg["lr"], float)
    import argparse

    parser = argparse.ArgumentParser()
    cli.register(parser)
    args = parser.parse_args(["--out", "x", "--recipe", "smollm2-135m", "--stage3-tokens", "1e6", "--seq-len", "256",
                              "--freeze-mlp"])
    r = cli.build_recipe(args)
    assert stage_config(r, 3)["tokens"] == 1_000_000 and stage_config(r, 3)["freeze_mlp"]
    assert stage_config(r, 1)["seq_len"] == 256  # a flag for all stages beats the recipe's per-stage value
    with pytest.raises(FileNotFoundError, match="built-in"):
        load_recipe("no-such-recipe")


def test_tokenizer_identity_accepts_the_legacy_hash_and_refuses_another_tokenizer(tiny):
    """Manifests written with the hash of before 2026-12 (probe ending in a split EOS) still load; the hash itself
    no longer encodes special tokens inside the probe; a tokenizer with another vocabulary is still refused."""
    from llamba.distill.data import PROBE, _legacy_tokenizer_hash, check_tokenizer, tokenizer_hash

    tok = tiny[2]
    assert "<|endoftext|>" not in PROBE and "<eos>" not in PROBE
    for h in (tokenizer_hash(tok), _legacy_tokenizer_hash(tok)):
        check_tokenizer({"tokenizer": {"name": "tiny", "hash": h}}, tok, "prepared")
    assert tokenizer_hash(tok) != _legacy_tokenizer_hash(tok)
    with pytest.raises(ValueError, match="different tokenizer"):
        check_tokenizer({"tokenizer": {"name": "other", "hash": "0123456789abcdef"}}, tok, "prepared")
