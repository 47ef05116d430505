"""A tiny Llama teacher (own BPE tokenizer) and a tiny corpus, for tests and quick trials of the whole pipeline."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

WORDS = ("the a one old new red blue small great river house king tree stone light night day man woman child "
         "walks sees finds loves keeps builds opens closes sings reads under over near behind with without and but "
         "then so because when while quietly slowly quickly far home road city field").split()


def make_corpus(folder, n_docs: int = 400, n_val: int = 40, seed: int = 0) -> Path:
    """jsonl documents of simple sentences (train.jsonl + val.jsonl): enough structure for a model to learn."""
    rng = random.Random(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    def doc():
        sentences = []
        for _ in range(rng.randint(2, 12)):
            n = rng.randint(4, 10)
            sentences.append(" ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + ".")
        return " ".join(sentences)

    for name, n in (("train", n_docs), ("val", n_val)):
        with open(folder / f"{name}.jsonl", "w") as f:
            for _ in range(n):
                f.write(json.dumps({"text": doc()}) + "\n")
    return folder


def make_teacher(folder, corpus: Path | None = None, layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                 vocab: int = 320, seed: int = 0, init_std: float = 0.02, train_steps: int = 0) -> Path:
    """A LlamaForCausalLM with a byte-level BPE trained on ``corpus`` (or on WORDS), saved as a HF folder.
    ``train_steps`` > 0 trains it on the corpus first (next-token loss), so its attention has real structure
    to distill rather than random patterns."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<bos>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = [json.loads(line)["text"] for line in (corpus / "train.jsonl").read_text().splitlines()] if corpus else [" ".join(WORDS)] * 10
    bpe.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<bos>", eos_token="<eos>")
    tok.save_pretrained(folder)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=1024,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True,
                         initializer_range=init_std)
    model = LlamaForCausalLM(config)
    if train_steps and corpus is not None:
        _pretrain(model, tok, texts, train_steps, seed)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def _pretrain(model, tok, texts: list[str], steps: int, seed: int, seq_len: int = 64, batch: int = 16) -> None:
    stream = torch.tensor([i for t in texts for i in tok(t).input_ids + [tok.eos_token_id]])
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(stream) - seq_len - 1, (batch,), generator=g)
        ids = torch.stack([stream[s:s + seq_len] for s in starts])
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
