"""Reading documents: the text files every part of llamba reads (distillation corpora, held-out perplexity text,
the CPU runtime's accuracy check, the eval loaders' JSON lines).

A source is a file, ``.jsonl[.xz|.gz|.zst]`` / ``.json.xz`` (one ``{"text": ...}`` object a line), ``.parquet``
(a ``text`` column) or ``.txt[.xz|.gz]`` (one document), or a Hugging Face dataset ``hf:NAME[:CONFIG]:SPLIT``.
Bad UTF-8, bad JSON, a missing or non-string ``text`` and a damaged compressed file raise ValueError naming the
file and the line (or row).
"""

from __future__ import annotations

import gzip
import io
import json
import lzma
from pathlib import Path
from typing import Iterator

TEXT_SUFFIXES = (".jsonl", ".jsonl.xz", ".jsonl.gz", ".jsonl.zst", ".json.xz", ".parquet", ".txt", ".txt.xz", ".txt.gz")


def open_text(path: Path):
    """A text file, plain or .xz / .gz / .zst compressed, opened for reading."""
    return io.TextIOWrapper(open_binary(path), encoding="utf-8")


def open_binary(path: Path):
    """A file, plain or .xz / .gz / .zst compressed, opened for reading its (decompressed) bytes."""
    name = path.name
    if name.endswith(".xz"):
        return lzma.open(path, "rb")
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".zst"):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


# What a damaged compressed file raises while it is read (a truncated .xz raises EOFError, a garbled one LZMAError)
READ_ERRORS = (OSError, EOFError, lzma.LZMAError)


def read_whole_text(path: Path) -> str:
    """One file's text; a decoding or decompression error names the file (and the line, for bad UTF-8)."""
    try:
        with open_binary(path) as f:
            data = f.read()
    except READ_ERRORS as err:
        raise ValueError(f"{path}: cannot be read ({err}); the file is damaged or not what its name says") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ValueError(f"{path}: line {line} is not valid UTF-8 (byte {err.start}); re-save the file as UTF-8") from None


def jsonl_rows(path: Path, skip: int = 0) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSON-lines file (plain or compressed), from the
    ``skip``-th such line on. Bad UTF-8, bad JSON, a line that is not an object and a damaged file all raise
    ValueError naming the file and the line."""
    n, i = 0, 0
    try:
        with open_binary(path) as f:
            for i, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                n += 1
                if n <= skip:
                    continue
                try:
                    row = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError as err:
                    raise ValueError(f"{path}: line {i} is not valid UTF-8 (column {err.start + 1}); "
                                     "re-save the file as UTF-8") from None
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}: line {i} is not valid JSON ({err.msg} at character {err.pos + 1})") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{path}: line {i} is a JSON {type(row).__name__}, expected an object like "
                                     '{"text": "..."}')
                yield i, row
    except READ_ERRORS as err:
        raise ValueError(f"{path}: cannot be read after line {i} ({err}); the file is damaged or truncated") from None


def _text_of(value, where: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where}: 'text' is a {type(value).__name__}, expected a string")
    return value


def iter_documents(source: str, skip: int = 0) -> Iterator[str]:
    """Texts of one source, from document number ``skip`` on. A source is a file (.jsonl[.xz|.gz|.zst] with a
    ``text`` field, .parquet with a ``text`` column, .txt = one document) or ``hf:NAME[:CONFIG]:SPLIT``."""
    if source.startswith("hf:"):
        import datasets

        parts = source[3:].split(":")
        name, config, split = (parts[0], None, parts[-1]) if len(parts) == 2 else (parts[0], parts[1], parts[2])
        stream = datasets.load_dataset(name, config, split=split, streaming=True)
        for i, row in enumerate(stream):
            if i >= skip:
                yield row["text"]
        return
    path = Path(source)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        i = 0
        for batch in pq.ParquetFile(path).iter_batches(columns=["text"]):
            for text in batch.column(0).to_pylist():
                if i >= skip:
                    yield _text_of(text, f"{path}: row {i + 1}")
                i += 1
        return
    if ".txt" in path.name:
        if skip == 0:
            yield read_whole_text(path)
        return
    for line, row in jsonl_rows(path, skip):
        if "text" not in row:
            raise ValueError(f"{path}: line {line} has no 'text' field (keys: {sorted(row)[:5]})")
        yield _text_of(row["text"], f"{path}: line {line}")
