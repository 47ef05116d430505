"""Local benchmark files -> ``datasets.DatasetDict``, one loader per task.

lm-eval calls these through ``custom_dataset`` (see ``tasks/*.yaml``) as ``loader(**metadata, **dataset_kwargs)``;
``data_dir`` arrives through the TaskManager's metadata. Every loader returns documents in the shape its YAML
template expects, and raises ``FileNotFoundError`` naming the missing file. File names and formats are listed in
``DATA_FILES`` (and in ../shared/data/README.md).
"""

from __future__ import annotations

import bz2
import csv
import io
import re
from pathlib import Path

import datasets

from llamba.text import jsonl_rows

# task -> files it reads, relative to the data dir (MMLU: a folder with test/ and dev/ CSVs per subject).
DATA_FILES = {
    "arc_easy": ["arc_easy.jsonl"],
    "arc_challenge": ["arc_challenge.jsonl"],
    "piqa": ["piqa_valid.jsonl", "piqa_valid_labels.lst"],
    "hellaswag": ["hellaswag_val_full.txt.bz2"],
    "winogrande": ["winogrande.jsonl"],
    "openbookqa": ["openbookqa.jsonl"],
    "lambada_openai": ["lambada_openai.jsonl"],
    "gsm8k": ["gsm8k_test.jsonl", "gsm8k_train.jsonl"],
    "mmlu": ["mmlu/test", "mmlu/dev"],
}


def _path(data_dir: str | Path | None, name: str) -> Path:
    if data_dir is None:
        raise ValueError("no data_dir: pass TaskManager(metadata={'data_dir': ...}) (llamba eval --data-dir)")
    path = Path(data_dir).expanduser() / name
    if not path.exists():
        raise FileNotFoundError(f"{path} not found (see ../shared/data/README.md for the expected files)")
    return path


def _read_jsonl(path: Path, required: tuple[str, ...] = ()) -> list[dict]:
    """The objects of a JSON-lines file; bad UTF-8 or JSON, and a line missing one of ``required``, raise
    ValueError naming the file and the line."""
    docs = []
    for line, row in jsonl_rows(path):
        missing = [k for k in required if k not in row]
        if missing:
            raise ValueError(f"{path}: line {line} has no {', '.join(repr(k) for k in missing)} field "
                             f"(keys: {sorted(row)[:6]})")
        docs.append(row)
    return docs


def _read_text(path: Path, opener=open) -> str:
    """A whole text file (``opener``: open, bz2.open ...); a decoding or decompression error names the file."""
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not valid UTF-8 ({err.reason} at byte {err.start}); re-save it as UTF-8") from None
    except (OSError, EOFError) as err:
        raise ValueError(f"{path}: cannot be read ({err}); the file is damaged") from None


def _split(split: str, docs: list[dict]) -> datasets.DatasetDict:
    if not docs:
        raise ValueError(f"no documents for split {split!r}")
    return datasets.DatasetDict({split: datasets.Dataset.from_list(docs)})


def _query_choices_gold(path: Path) -> list[dict]:
    docs = _read_jsonl(path)
    for i, d in enumerate(docs):
        if not {"query", "choices", "gold"} <= d.keys() or not _index_into(d["gold"], d["choices"]):
            raise ValueError(f"{path} line {i + 1}: expected {{'query', 'choices', 'gold' (index into choices)}}")
    return [{"query": d["query"], "choices": list(d["choices"]), "gold": int(d["gold"])} for d in docs]


def _index_into(gold, choices) -> bool:
    return isinstance(gold, int) and not isinstance(gold, bool) and isinstance(choices, list) and 0 <= gold < len(choices)


def arc_easy(data_dir=None, **_) -> datasets.DatasetDict:
    return _split("test", _query_choices_gold(_path(data_dir, "arc_easy.jsonl")))


def arc_challenge(data_dir=None, **_) -> datasets.DatasetDict:
    return _split("test", _query_choices_gold(_path(data_dir, "arc_challenge.jsonl")))


def openbookqa(data_dir=None, **_) -> datasets.DatasetDict:
    return _split("test", _query_choices_gold(_path(data_dir, "openbookqa.jsonl")))


def piqa(data_dir=None, **_) -> datasets.DatasetDict:
    docs = _read_jsonl(_path(data_dir, "piqa_valid.jsonl"), ("goal", "sol1", "sol2"))
    labels_path = _path(data_dir, "piqa_valid_labels.lst")
    words = _read_text(labels_path).split()
    bad = next((i for i, x in enumerate(words) if x not in ("0", "1")), None)
    if bad is not None:
        raise ValueError(f"{labels_path}: label {bad + 1} is {words[bad]!r}, expected 0 or 1")
    labels = [int(x) for x in words]
    if len(labels) != len(docs):
        raise ValueError(f"{labels_path}: {len(labels)} labels for {len(docs)} PIQA questions")
    return _split("validation", [{"goal": d["goal"], "sol1": d["sol1"], "sol2": d["sol2"], "label": y}
                                 for d, y in zip(docs, labels)])


def _hellaswag_clean(text: str) -> str:
    # lm-eval's hellaswag preprocess: WikiHow bracket artifacts out, double spaces collapsed.
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag(data_dir=None, **_) -> datasets.DatasetDict:
    """6 lines per item: ``activity_label: ctx``, gold index, 4 endings (the file is already cleaned; cleaning
    again is idempotent, and keeps the rule identical to lm-eval's for any leftover tag)."""
    path = _path(data_dir, "hellaswag_val_full.txt.bz2")
    lines = _read_text(path, bz2.open).rstrip("\n").split("\n")
    if len(lines) % 6:
        raise ValueError(f"{path}: {len(lines)} lines is not a multiple of 6 (context, gold, 4 endings)")
    docs = []
    for i in range(0, len(lines), 6):
        if lines[i + 1].strip() not in ("0", "1", "2", "3"):
            raise ValueError(f"{path} line {i + 2}: gold index {lines[i + 1]!r} is not in 0..3")
        gold = int(lines[i + 1])
        docs.append({"query": _hellaswag_clean(lines[i]),
                     "choices": [_hellaswag_clean(e) for e in lines[i + 2:i + 6]], "gold": gold})
    return _split("validation", docs)


def winogrande(data_dir=None, **_) -> datasets.DatasetDict:
    """``{"context_options": [2 prefixes], "continuation": str, "gold": i}``: lm-eval's partial scoring (the two
    sentence prefixes are the choices, the shared rest of the sentence is scored)."""
    path = _path(data_dir, "winogrande.jsonl")
    docs = _read_jsonl(path)
    for i, d in enumerate(docs):
        if not {"context_options", "continuation", "gold"} <= d.keys() or len(d["context_options"]) != 2:
            raise ValueError(f"{path} line {i + 1}: expected {{'context_options': [2 prefixes], 'continuation', 'gold'}}")
    return _split("validation", [{"context_options": list(d["context_options"]), "continuation": d["continuation"],
                                  "gold": int(d["gold"])} for d in docs])


def lambada_openai(data_dir=None, **_) -> datasets.DatasetDict:
    docs = _read_jsonl(_path(data_dir, "lambada_openai.jsonl"), ("context", "continuation"))
    return _split("test", [{"context": d["context"], "continuation": d["continuation"]} for d in docs])


def gsm8k(data_dir=None, **_) -> datasets.DatasetDict:
    splits = {}
    for split, name in (("test", "gsm8k_test.jsonl"), ("train", "gsm8k_train.jsonl")):
        splits[split] = datasets.Dataset.from_list(
            [{"question": d["question"], "answer": d["answer"]}
             for d in _read_jsonl(_path(data_dir, name), ("question", "answer"))])
    return datasets.DatasetDict(splits)


# -- MMLU: one CSV per subject under mmlu/test and mmlu/dev ------------------------------------------------------
def _mmlu_csv(path: Path) -> list[dict]:
    rows = list(csv.DictReader(io.StringIO(_read_text(path), newline="")))
    want = ["question", "choice0", "choice1", "choice2", "choice3", "answer"]
    if not rows or list(rows[0].keys()) != want:
        raise ValueError(f"{path}: expected a CSV with header {','.join(want)} and at least one row")
    bad = next((i for i, r in enumerate(rows) if r["answer"] not in ("0", "1", "2", "3")), None)
    if bad is not None:
        raise ValueError(f"{path}: row {bad + 1} has answer {rows[bad]['answer']!r}, expected 0..3")
    return [{"question": r["question"], "choices": [r[f"choice{k}"] for k in range(4)], "answer": int(r["answer"])}
            for r in rows]


def _mmlu_file(folder: Path, subject: str, split: str) -> Path:
    for name in (f"{subject}.csv", f"{subject}_{split}.csv"):
        if (folder / name).exists():
            return folder / name
    raise FileNotFoundError(f"{folder}/{subject}.csv not found (MMLU subject {subject!r}, split {split})")


def mmlu_subjects(data_dir) -> list[str]:
    """The subjects that have a test CSV, sorted."""
    folder = _path(data_dir, "mmlu/test")
    return sorted({re.sub(r"_test$", "", p.stem) for p in folder.glob("*.csv")})


def mmlu(data_dir=None, subject: str | None = None, **_) -> datasets.DatasetDict:
    if not subject:
        raise ValueError("MMLU loader needs dataset_kwargs={'subject': ...}")
    return datasets.DatasetDict({
        split: datasets.Dataset.from_list(_mmlu_csv(_mmlu_file(_path(data_dir, f"mmlu/{split}"), subject, split)))
        for split in ("test", "dev")})
