"""Text sampled from the teacher itself: the data-free path of ``llamba distill`` (no ``--data`` and no hub), and a
corpus file of its own to mix into other data (a file in a ``--data`` folder is one source among the others):

    python -m llamba.distill.teacher_samples --teacher smollm2-135m --tokens 1e7 --out corpus/teacher-samples.jsonl

Each batch of documents starts from BOS in every row and is sampled at temperature 1 over the whole vocabulary, so
the corpus follows the teacher's own distribution. The rows decode together through the server's teacher cache
(``llamba.serve.slots.TeacherSlots``: a static KV cache, one captured CUDA graph per step on a GPU) instead of
``transformers``' ``generate``; ``plain_documents`` is the obviously-correct twin (a full forward over the whole
prefix for every token) that the tests hold it to, token for token under the same random draws.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def sample_next(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One token per row from softmax(logits) (temperature 1, no truncation), drawn with ``generator``."""
    return torch.multinomial(torch.softmax(logits.float(), dim=-1), 1, generator=generator)[:, 0]


def _until_eos(rows: torch.Tensor, eos_id: int) -> list[list[int]]:
    """Each row's tokens up to (not including) its first EOS."""
    docs = []
    for row in rows.tolist():
        docs.append(row[: row.index(eos_id)] if eos_id in row else row)
    return docs


@torch.inference_mode()
def sample_documents(slots, start_id: int, eos_id: int, length: int, generator: torch.Generator) -> list[list[int]]:
    """``slots.n_slots`` documents of at most ``length`` tokens, each from ``start_id``, through ``slots`` (a
    ``TeacherSlots`` holding at least ``length`` positions). Rows go on past their EOS (a fixed-shape step is
    cheaper than a ragged one) and are cut there; the batch stops once every row has ended."""
    rows = list(range(slots.n_slots))
    slots.begin(1)
    logits = slots.prefill(torch.tensor([[start_id]]))[0].expand(len(rows), -1)
    slots.join(rows, 0)
    out = torch.empty(len(rows), length, dtype=torch.long)
    ended = torch.zeros(len(rows), dtype=torch.bool)
    for t in range(length):
        tokens = sample_next(logits, generator).cpu()
        out[:, t] = tokens
        ended |= tokens == eos_id
        if t + 1 == length or bool(ended.all()):
            out = out[:, : t + 1]
            break
        logits = slots.decode(rows, tokens.tolist())
    return _until_eos(out, eos_id)


@torch.no_grad()
def plain_documents(teacher, rows: int, start_id: int, eos_id: int, length: int,
                    generator: torch.Generator) -> list[list[int]]:
    """``sample_documents``' twin: the teacher's full forward over every prefix, no cache, the same draws."""
    device = next(teacher.parameters()).device
    ids = torch.full((rows, 1), start_id, device=device)
    for t in range(length):
        tokens = sample_next(teacher(ids).logits[:, -1], generator)
        ids = torch.cat([ids, tokens[:, None].to(device)], dim=1)
        if bool((ids[:, 1:] == eos_id).any(dim=1).all()):
            break
    return _until_eos(ids[:, 1:].cpu(), eos_id)


def corpus_tokens(path: Path) -> int:
    """The tokens a samples file records (0 where there is none yet)."""
    if not path.exists():
        return 0
    return sum(json.loads(line)["tokens"] for line in path.read_text().splitlines())


def sample_teacher_corpus(teacher, tokenizer, n_tokens: int, path: Path, seed: int, device, log,
                          batch: int | None = None, length: int = 256) -> Path:
    """About ``n_tokens`` tokens of documents sampled from the teacher into ``path`` (JSON lines; seeded; a file
    already there is extended, not redone). ``batch``: rows sampled at once (default 256 on CUDA, where a step of a
    few rows leaves the GPU idle; 16 on a CPU)."""
    from llamba.serve.slots import TeacherSlots

    batch = batch or (256 if torch.device(device).type == "cuda" else 16)
    have = corpus_tokens(path)
    if have >= n_tokens:
        return path
    log(f"data: sampling ~{n_tokens - have:,} tokens from the teacher itself (seed {seed}) into {path}")
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    slots = TeacherSlots(teacher, batch, length + 1)
    generator = torch.Generator(device=slots.device).manual_seed(seed + have)  # a resumed file draws anew
    with open(path, "a") as f:
        while have < n_tokens:
            for ids in sample_documents(slots, start, eos, length, generator):
                if not ids:  # EOS first: nothing to learn from
                    continue
                text = tokenizer.decode(ids, skip_special_tokens=True)
                n = len(ids) + 1  # and the EOS that ends it in the prepared shards
                f.write(json.dumps({"text": text, "tokens": n, "source": "teacher-samples"}) + "\n")
                have += n
    return path


def main(argv=None) -> int:
    import argparse
    import sys
    import time

    from llamba.cli.common import add_model_args, int_at_least, resolve_device, resolve_dtype

    ap = argparse.ArgumentParser(prog="python -m llamba.distill.teacher_samples",
                                 description="Sample a corpus from a teacher (JSON lines, seeded; an existing file is "
                                 "extended to --tokens, not redone).")
    ap.add_argument("--teacher", required=True, help="a known name (smollm2-135m), a HF Llama folder or a .gguf")
    ap.add_argument("--tokens", type=int_at_least(1), required=True, help="about this many tokens (e.g. 1e7)")
    ap.add_argument("--out", required=True, help="the .jsonl file to write or extend")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rows", type=int_at_least(1), default=None, help="documents sampled at once (default 256 on "
                    "CUDA, 16 on a CPU)")
    ap.add_argument("--length", type=int_at_least(1), default=256, help="tokens per document at most")
    add_model_args(ap)
    args = ap.parse_args(argv)
    from llamba.teacher import load_teacher

    try:
        device = resolve_device(args.device)
    except ValueError as e:
        ap.error(str(e))
    teacher, tokenizer = load_teacher(args.teacher, dtype=resolve_dtype(args.dtype, device), device=device)
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    had, start = corpus_tokens(path), time.perf_counter()
    sample_teacher_corpus(teacher, tokenizer, args.tokens, path, args.seed, device,
                          lambda msg: print(msg, file=sys.stderr), batch=args.rows, length=args.length)
    seconds, have = time.perf_counter() - start, corpus_tokens(path)
    print(f"{path}: {have:,} tokens (+{have - had:,} in {seconds:.0f} s: {(have - had) / seconds:,.0f} tokens/s)",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
