"""Our local tasks render exactly what lm-eval's official task YAMLs render (context, choices, target), each
checked on one document given in both shapes: the hub's (official config) and the local file's (ours)."""

import ast
import bz2
import json
from pathlib import Path

import datasets
import lm_eval
import pytest
from lm_eval.tasks._yaml_loader import load_yaml
from lm_eval.utils import apply_template

from llamba.eval.suite import mmlu_group, task_manager

OFFICIAL = Path(lm_eval.__file__).parent / "tasks"


def official_render(yaml_path: str, doc: dict, process_docs=None):
    cfg = load_yaml(OFFICIAL / yaml_path, resolve_func=True)
    if "include" in cfg:  # one level is all these tasks use
        cfg = {**load_yaml(OFFICIAL / Path(yaml_path).parent / cfg["include"], resolve_func=True), **cfg}
    if cfg.get("process_docs"):
        doc = cfg["process_docs"](datasets.Dataset.from_list([doc]))[0]

    def field(spec):
        if callable(spec):
            return spec(doc)
        if isinstance(spec, list):
            return spec
        if spec in doc:
            return doc[spec]
        out = apply_template(spec, doc)
        return ast.literal_eval(out) if out.startswith("[") or out.isdigit() else out

    return field(cfg["doc_to_text"]), field(cfg["doc_to_choice"]) if "doc_to_choice" in cfg else None, \
        field(cfg["doc_to_target"]), cfg.get("description", "")


def our_render(task):
    docs = task.test_docs() if task.has_test_docs() else task.validation_docs()
    doc = docs[0]
    choice = task.doc_to_choice(doc) if task.config.doc_to_choice is not None else None
    return task.doc_to_text(doc), choice, task.doc_to_target(doc), task.config.description or ""


def load(data_dir, name):
    manager = task_manager(data_dir)
    from lm_eval.tasks._index import TaskIndex

    if name.startswith("mmlu"):
        group = manager._factory.build(TaskIndex.entry_from_config(mmlu_group(data_dir, 0)), overrides=None,
                                       registry=manager._index)
        return manager.load([group])["tasks"]
    return manager.load([name])["tasks"]


def write_jsonl(path, docs):
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))


CHOICES = ["a dry sponge", "a wet towel", "the big rock", "ice"]


@pytest.mark.parametrize("task", ["arc_easy", "arc_challenge"])
def test_arc(tmp_path, task):
    write_jsonl(tmp_path / f"{task}.jsonl", [{"query": "Question: What soaks up water?", "choices": CHOICES, "gold": 0}])
    hub = {"question": "What soaks up water?", "choices": {"text": CHOICES, "label": list("ABCD")}, "answerKey": "A"}
    assert our_render(load(tmp_path, task)[task]) == official_render(f"arc/{task}.yaml", hub)


def test_openbookqa(tmp_path):
    write_jsonl(tmp_path / "openbookqa.jsonl", [{"query": "Water soaks into", "choices": CHOICES, "gold": 1}])
    hub = {"question_stem": "Water soaks into", "choices": {"text": CHOICES, "label": list("ABCD")}, "answerKey": "B"}
    assert our_render(load(tmp_path, "openbookqa")["openbookqa"]) == official_render("openbookqa/openbookqa.yaml", hub)


def test_piqa(tmp_path):
    doc = {"goal": "Dry a cup", "sol1": "Use a towel.", "sol2": "Use the rain."}
    write_jsonl(tmp_path / "piqa_valid.jsonl", [doc])
    (tmp_path / "piqa_valid_labels.lst").write_text("1\n")
    assert our_render(load(tmp_path, "piqa")["piqa"]) == official_render("piqa/piqa.yaml", {**doc, "label": 1})


def test_hellaswag(tmp_path):
    with bz2.open(tmp_path / "hellaswag_val_full.txt.bz2", "wt") as f:
        f.write("Making tea: A woman boils water. She\n2\npours it [title] out.\nsings.\ndrinks  it.\nleaves.\n")
    hub = {"activity_label": "Making tea", "ctx_a": "A woman boils water.", "ctx_b": "She",
           "endings": ["pours it [title] out.", "sings.", "drinks  it.", "leaves."], "label": "2"}
    assert our_render(load(tmp_path, "hellaswag")["hellaswag"]) == official_render("hellaswag/hellaswag.yaml", hub)


def test_winogrande_partial_scoring(tmp_path):
    sentence, options = "The cup fell off the table because _ was slippery.", ["the cup", "the table"]
    idx = sentence.index("_")
    write_jsonl(tmp_path / "winogrande.jsonl", [{
        "context_options": [sentence[:idx] + o for o in options], "continuation": sentence[idx + 1:].strip(),
        "gold": 1}])
    hub = {"sentence": sentence, "option1": options[0], "option2": options[1], "answer": "2"}
    task = load(tmp_path, "winogrande")["winogrande"]
    assert task.multiple_input == 2  # contexts are the choices, as in lm-eval
    assert our_render(task) == official_render("winogrande/default.yaml", hub)


def test_lambada(tmp_path):
    write_jsonl(tmp_path / "lambada_openai.jsonl", [{"context": "He said hello to his", "continuation": "friend"}])
    ours = our_render(load(tmp_path, "lambada_openai")["lambada_openai"])
    assert ours == official_render("lambada/lambada_openai.yaml", {"text": "He said hello to his friend"})


def test_gsm8k(tmp_path):
    doc = {"question": "Tom has 3 apples and buys 2. How many?", "answer": "3 + 2 = 5\n#### 5"}
    for split in ("test", "train"):
        write_jsonl(tmp_path / f"gsm8k_{split}.jsonl", [doc] * 6)
    task = load(tmp_path, "gsm8k")["gsm8k"]
    assert our_render(task) == official_render("gsm8k/gsm8k.yaml", doc)
    official = load_yaml(OFFICIAL / "gsm8k/gsm8k.yaml", resolve_func=False)
    assert task.config.generation_kwargs == official["generation_kwargs"]
    assert task.config.num_fewshot == 5


def test_mmlu(tmp_path):
    for split in ("test", "dev"):
        (tmp_path / "mmlu" / split).mkdir(parents=True)
        (tmp_path / "mmlu" / split / "astronomy.csv").write_text(
            "question,choice0,choice1,choice2,choice3,answer\n  What orbits the Earth? ,the Moon,Mars,the Sun,Venus,0\n")
    hub = {"question": "  What orbits the Earth? ", "choices": ["the Moon", "Mars", "the Sun", "Venus"], "answer": 0}
    ours = our_render(load(tmp_path, "mmlu")["mmlu::mmlu_astronomy"])
    assert ours == official_render("mmlu/default/mmlu_astronomy.yaml", hub)
