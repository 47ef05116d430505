"""Distillation data: documents -> teacher tokens -> packed memory-mapped shards, and a resumable sampler.

A prepared data folder holds ``manifest.json`` and flat token shards (``{split}-{source}-{k}.bin``, uint16 when
the vocabulary fits). Each document is followed by the tokenizer's EOS. Shards are one long stream: the sampler
cuts fixed-length windows, and the EOS tokens inside a window give the document boundaries (``seq_idx`` for the
student, restarting ``position_ids`` for the teacher), so no document ever reads another.

Preparation is lazy and incremental: each source is tokenized only up to its share of ``max_tokens``; a re-run
with a larger budget continues after the last document already stored, and a re-run with a different tokenizer
is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from llamba.text import TEXT_SUFFIXES, iter_documents

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
VAL_NAME = re.compile(r"(^|[-_.])(val|valid|validation|test)([-_.]|$)")
PIECE_CHARS = 16_384  # long documents are tokenized in pieces (cut at newlines) so the tokenizer's threads share them


def find_sources(data: str) -> dict[str, list[str]]:
    """{'train': [...], 'val': [...]} from a folder, a file, or an ``hf:`` name. Files whose name says val/valid/test
    are the validation split; without one, every 100th document of the training sources is held out."""
    if data.startswith("hf:"):
        return {"train": [data], "val": []}
    path = Path(data).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"--data {data}: no such file or folder")
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.name.endswith(TEXT_SUFFIXES))
    if not files:
        raise FileNotFoundError(f"--data {data}: no {', '.join(TEXT_SUFFIXES)} files in it")
    split = {"train": [], "val": []}
    for f in files:
        stem = f.name.split(".")[0]
        split["val" if VAL_NAME.search(stem) else "train"].append(str(f.resolve()))
    if not split["train"]:
        raise ValueError(f"--data {data}: only validation files found ({[Path(p).name for p in split['val']]})")
    return split


# -- tokenizer identity ------------------------------------------------------------------------------------------
PROBE = "Tokenizer probe: naïve café, 1,234.5 — ¿qué? \n\tdef f(x):\n    return x**2  # 東京 🙂"


def tokenizer_hash(tokenizer) -> str:
    """What the tokens mean, not how the tokenizer file is serialized (that changes between transformers versions,
    and shards prepared on one machine must be usable on another): vocabulary, EOS, and the ids of a probe text.
    The probe holds no special token: how one is split inside text (``split_special_tokens``) differs between
    transformers versions (5.17 and 5.24 hashed the same GGUF tokenizer differently), and EOS is recorded as is."""
    probe = tokenizer(PROBE, add_special_tokens=False)["input_ids"]
    blob = json.dumps([sorted(tokenizer.get_vocab().items()), tokenizer.eos_token_id, probe])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _legacy_tokenizer_hash(tokenizer) -> str:
    """The hash manifests were written with before 2026-12 (the probe ended in EOS, split): still accepted."""
    probe = tokenizer(PROBE + " <|endoftext|>", add_special_tokens=False, split_special_tokens=True)["input_ids"]
    blob = json.dumps([sorted(tokenizer.get_vocab().items()), tokenizer.eos_token_id, probe])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32


def _pieces(text: str) -> list[str]:
    """Cut a long text at single newlines between non-space characters, where BPE pre-tokenizers split anyway."""
    out, start = [], 0
    while len(text) - start > PIECE_CHARS:
        cut = text.find("\n", start + PIECE_CHARS)
        while cut != -1 and not (0 < cut < len(text) - 1 and not text[cut - 1].isspace() and not text[cut + 1].isspace()):
            cut = text.find("\n", cut + 1)
        if cut == -1:
            break
        out.append(text[start:cut + 1])
        start = cut + 1
    out.append(text[start:])
    return out


def tokenize_documents(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text plus EOS. One batched call: the fast tokenizer spreads it over all cores."""
    pieces, owner = [], []
    for i, t in enumerate(texts):
        for p in _pieces(t):
            pieces.append(p)
            owner.append(i)
    # split_special_tokens: a literal "<|endoftext|>" in a book must not become a document boundary
    ids = tokenizer(pieces, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    docs: list[list[int]] = [[] for _ in texts]
    for i, piece_ids in zip(owner, ids):
        docs[i].extend(piece_ids)
    for d in docs:
        d.append(tokenizer.eos_token_id)
    return docs


# -- preparation ----------------------------------------------------------------------------------------------------
def _source_key(source: str) -> str:
    name = re.sub(r"[^A-Za-z0-9]+", "-", Path(source).name.split(".")[0] if not source.startswith("hf:") else source[3:])
    return f"{name.strip('-')}-{hashlib.sha1(source.encode()).hexdigest()[:6]}"


IDENTITY_BYTES = 1 << 20  # a source is known by the SHA-256 of its first MiB (all of it when smaller)


def _prefix_sha256(path: Path, n: int) -> str | None:
    """SHA-256 of the first ``n`` bytes of ``path``, None when the file is shorter."""
    with open(path, "rb") as f:
        data = f.read(n)
    return hashlib.sha256(data).hexdigest() if len(data) == n else None


def source_identity(source: str) -> dict | None:
    """What a file source is, independent of where it lies: its first bytes (a source that grew at its end, like
    the teacher-samples file, stays the same source). None for ``hf:`` names, which are no location."""
    if source.startswith("hf:"):
        return None
    n = min(Path(source).stat().st_size, IDENTITY_BYTES)
    return {"prefix_bytes": n, "prefix_sha256": _prefix_sha256(Path(source), n)}


def _same_content(state: dict, source: str) -> bool:
    ident = state.get("identity")
    return ident is not None and _prefix_sha256(Path(source), ident["prefix_bytes"]) == ident["prefix_sha256"]


def match_sources(manifest: dict, sources: dict[str, list[str]], out: Path, log=print) -> None:
    """Find each source's record in the manifest by content, so a moved corpus folder (or a link that now points
    elsewhere) continues its records instead of tokenizing everything again next to the old copy. A record found
    under another path is moved to the source's current path (shards included); a file whose content no longer
    matches the record kept under its own path is refused. Manifests written before identities were recorded get
    them here; their records are matched by file name when their old path is gone."""
    records = manifest["sources"]
    wanted = [s for split in ("train", "val") for s in sources[split] if not s.startswith("hf:")]
    for source in wanted:
        state = records.get(source)
        if state is not None:
            if state.get("identity") is None:
                state["identity"] = source_identity(source)
            elif not _same_content(state, source):
                raise ValueError(f"{source} changed since it was prepared into {out} (its first bytes differ from "
                                 f"the record in {out / MANIFEST}); prepare it into a new folder (another --out) or "
                                 f"delete {out} to prepare again")
            continue
        free = [k for k in records if k not in wanted and not k.startswith("hf:")]
        found = [k for k in free if _same_content(records[k], source)]
        if not found:  # an older manifest: no identity recorded; the same file name whose old path is gone
            found = [k for k in free if records[k].get("identity") is None and not Path(k).exists()
                     and Path(k).name == Path(source).name]
        if found:
            old = found[0]
            log(f"data: {Path(source).name}: same content as the prepared {old}; continuing its records")
            state = records[source] = records.pop(old)
            state.setdefault("identity", source_identity(source))
            for shard in manifest["shards"]:
                if shard["source"] == old:
                    shard["source"] = source


def _write_shard(path: Path, tokens: np.ndarray) -> None:
    tmp = path.with_suffix(".tmp")
    tokens.tofile(tmp)
    os.replace(tmp, path)  # atomic: a shard is either complete or absent


def load_manifest(data_dir) -> dict:
    path = Path(data_dir) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{data_dir}: no {MANIFEST}; prepare it with `llamba distill --prepare-only ...`")
    return json.loads(path.read_text())


def check_tokenizer(manifest: dict, tokenizer, data_dir) -> None:
    want = tokenizer_hash(tokenizer)
    have = manifest["tokenizer"]["hash"]
    if have != want and have != _legacy_tokenizer_hash(tokenizer):
        raise ValueError(
            f"{data_dir} was tokenized with a different tokenizer ({manifest['tokenizer'].get('name')}, hash {have}) "
            f"than this teacher's (hash {want}); use another --out/data folder or delete {data_dir} to re-tokenize")


def prepare_data(sources: dict[str, list[str]], tokenizer, out_dir, max_tokens: int | None, val_tokens: int,
                 tokenizer_name: str = "", batch_chars: int = 1 << 22, shard_tokens: int = 1 << 26, log=print) -> dict:
    """Tokenize and pack until the training split holds about ``max_tokens`` (None: everything) and the validation
    split about ``val_tokens``; both caps are shared evenly between the split's sources. Returns the manifest."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(len(tokenizer))
    manifest_path = out / MANIFEST
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        check_tokenizer(manifest, tokenizer, out)
    else:
        manifest = {"format": FORMAT_VERSION, "dtype": np.dtype(dtype).name,
                    "tokenizer": {"name": tokenizer_name, "hash": tokenizer_hash(tokenizer),
                                  "vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id},
                    "sources": {}, "shards": []}
    match_sources(manifest, sources, out, log)
    holdout = not sources["val"]  # no validation file: every 100th training document goes to validation
    plans = [("train", s, None if max_tokens is None else max_tokens // len(sources["train"])) for s in sources["train"]]
    plans += [("val", s, max(1, val_tokens // len(sources["val"]))) for s in sources["val"]]

    def save():
        tmp = manifest_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, manifest_path)

    for split, source, cap in plans:
        state = manifest["sources"].setdefault(
            source, {"split": split, "documents": 0, "tokens": {"train": 0, "val": 0}, "exhausted": False,
                     "identity": source_identity(source)})
        have = state["tokens"][split]
        val_cap = val_tokens // len(sources["train"]) if holdout and split == "train" else 0
        if state["exhausted"] or (cap is not None and have >= cap and state["tokens"]["val"] >= val_cap):
            continue
        buffers = {"train": [], "val": []}
        added = {"train": 0, "val": 0}

        def flush(which):
            if not buffers[which]:
                return
            k = sum(1 for s in manifest["shards"] if s["source"] == source and s["split"] == which)
            name = f"{which}-{_source_key(source)}-{k:05d}.bin"
            tokens = np.concatenate(buffers[which]).astype(dtype)
            _write_shard(out / name, tokens)
            manifest["shards"].append({"file": name, "split": which, "source": source, "tokens": int(tokens.size)})
            buffers[which].clear()

        docs = iter_documents(source, skip=state["documents"])
        exhausted = False
        while True:
            # Read only about what the cap still needs (~4 characters a token), so a small budget stays fast.
            want_chars = batch_chars if cap is None else min(batch_chars, 5 * max(cap - state["tokens"][split], 1))
            batch, chars = [], 0
            for text in docs:
                batch.append(text)
                chars += len(text)
                if chars >= want_chars:
                    break
            if not batch:
                if state["documents"] == 0:  # caught here, not later as a too-small split blamed on another file
                    raise ValueError(f"{source}: no documents (the file is empty or has only blank lines); fill it "
                                     "or remove it from --data")
                exhausted = True
                break
            done = False
            for ids in tokenize_documents(tokenizer, batch):
                which = split
                if holdout and split == "train" and state["documents"] % 100 == 0 and state["tokens"]["val"] < val_cap:
                    which = "val"
                buffers[which].append(np.asarray(ids, dtype=np.int64))
                state["tokens"][which] += len(ids)
                added[which] += len(ids)
                state["documents"] += 1
                # Stop at the document that reaches the cap, whatever was read ahead: the next run restarts
                # right after it, so growing a budget in steps gives the same shards as one big run.
                done = cap is not None and state["tokens"][split] >= cap and state["tokens"]["val"] >= val_cap
                if done:
                    break
            if sum(b.size for b in buffers[split]) >= shard_tokens:
                flush(split)
            if done:
                break
        flush("train")
        flush("val")
        state["exhausted"] = exhausted
        save()  # after the shards exist: a killed run redoes at most this source's new documents
        log(f"data: {Path(source).name}: +{added['train']:,} train / +{added['val']:,} val tokens "
            f"({state['documents']} documents{', all' if exhausted else ''})")
    save()
    return manifest


def split_tokens(manifest: dict, split: str) -> int:
    return sum(s["tokens"] for s in manifest["shards"] if s["split"] == split)


# -- reading packed windows -------------------------------------------------------------------------------------
@dataclass
class Batch:
    input_ids: torch.Tensor      # (b, L) int64
    seq_idx: torch.Tensor        # (b, L) int32: document number inside the window (student state resets)
    position_ids: torch.Tensor   # (b, L) int64: position inside the document (teacher RoPE and its packed mask)

    def to(self, device) -> "Batch":
        """On the device. To CUDA through pinned memory: a copy from pageable memory blocks the host until the GPU
        has run everything queued before it, which would leave the GPU idle while the host queues the next step."""
        pinned = torch.device(device).type == "cuda"
        return Batch(*((t.pin_memory() if pinned else t).to(device, non_blocking=pinned)
                       for t in (self.input_ids, self.seq_idx, self.position_ids)))

    @property
    def tokens(self) -> int:
        return self.input_ids.numel()


def boundaries(input_ids: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(seq_idx, position_ids) for packed windows: a new document starts right after each EOS."""
    starts = torch.zeros_like(input_ids, dtype=torch.bool)
    starts[:, 1:] = input_ids[:, :-1] == eos_id
    seq_idx = starts.to(torch.int32).cumsum(1, dtype=torch.int32)
    idx = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    start_pos = torch.where(starts, idx, torch.zeros_like(idx)).cummax(1).values
    return seq_idx, idx - start_pos


class PackedTokens:
    """Fixed-length windows over one split's shards (memory-mapped; windows never cross a shard)."""

    def __init__(self, data_dir, split: str, seq_len: int):
        self.dir = Path(data_dir)
        self.manifest = load_manifest(self.dir)
        self.seq_len = seq_len
        self.eos_id = self.manifest["tokenizer"]["eos_token_id"]
        dtype = np.dtype(self.manifest["dtype"])
        self.shards = [np.memmap(self.dir / s["file"], dtype=dtype, mode="r")
                       for s in self.manifest["shards"] if s["split"] == split]
        counts = [len(s) // seq_len for s in self.shards]
        self.starts = np.cumsum([0] + counts)
        if self.starts[-1] == 0:
            raise ValueError(f"{data_dir}: the {split} split has fewer than {seq_len} tokens; prepare more data "
                             f"(raise --max-tokens/--val-tokens) or lower --seq-len")

    def __len__(self) -> int:
        return int(self.starts[-1])

    def window(self, i: int) -> np.ndarray:
        shard = int(np.searchsorted(self.starts, i, side="right") - 1)
        off = (i - int(self.starts[shard])) * self.seq_len
        return np.asarray(self.shards[shard][off:off + self.seq_len], dtype=np.int64)

    def batch(self, indices) -> Batch:
        ids = torch.from_numpy(np.stack([self.window(int(i)) for i in indices]))
        seq_idx, pos = boundaries(ids, self.eos_id)
        return Batch(ids, seq_idx, pos)


class Sampler:
    """Seeded shuffled order over windows, epoch after epoch, as global batches split across ranks.

    State is two integers (epoch, offset): saving them after a step and restoring them continues exactly."""

    def __init__(self, n_windows: int, seed: int, rank: int = 0, world: int = 1):
        self.n, self.seed, self.rank, self.world = n_windows, seed, rank, world
        self.epoch, self.offset = 0, 0
        self._order = None

    def _perm(self) -> np.ndarray:
        if self._order is None or self._order[0] != self.epoch:
            self._order = (self.epoch, np.random.default_rng([self.seed, self.epoch]).permutation(self.n))
        return self._order[1]

    def next(self, per_rank: int) -> list[int]:
        """This rank's ``per_rank`` windows of the next global micro-batch (``per_rank * world`` windows)."""
        need, got = per_rank * self.world, []
        while len(got) < need:
            take = min(need - len(got), self.n - self.offset)
            got.extend(self._perm()[self.offset:self.offset + take].tolist())
            self.offset += take
            if self.offset == self.n:
                self.epoch, self.offset = self.epoch + 1, 0
        return got[self.rank * per_rank:(self.rank + 1) * per_rank]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset, "seed": self.seed, "n": self.n}

    def load_state_dict(self, state: dict) -> None:
        if state["n"] != self.n or state["seed"] != self.seed:
            raise ValueError(f"checkpoint sampler was over {state['n']} windows with seed {state['seed']}, now "
                             f"{self.n} with seed {self.seed}: the data or seq_len changed since the checkpoint")
        self.epoch, self.offset = state["epoch"], state["offset"]
