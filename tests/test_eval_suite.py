"""Every task loader end to end through lm-eval, with a tiny random Llama teacher and Llamba student, on small
files written here in the data dir's formats; the report; skipping of missing files."""

import bz2
import json
import math
import re

import pytest
import torch

from llamba.cli import main


def _tokenizer(texts):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def _write_data(d):
    q = lambda i: f"Question: Which thing number {i} is red?"  # noqa: E731
    choices = ["the apple", "the sky", "the grass", "the sea"]
    for name in ("arc_easy", "arc_challenge"):
        (d / f"{name}.jsonl").write_text("".join(json.dumps({"query": q(i), "choices": choices, "gold": i % 4}) + "\n"
                                                 for i in range(5)))
    (d / "openbookqa.jsonl").write_text("".join(
        json.dumps({"query": f"The sun is a {i}", "choices": choices, "gold": 1}) + "\n" for i in range(5)))
    (d / "piqa_valid.jsonl").write_text("".join(
        json.dumps({"goal": f"How to open jar {i}?", "sol1": "Twist the lid.", "sol2": "Eat the lid."}) + "\n"
        for i in range(5)))
    (d / "piqa_valid_labels.lst").write_text("0\n1\n0\n0\n1\n")
    with bz2.open(d / "hellaswag_val_full.txt.bz2", "wt") as f:
        for i in range(5):
            f.write(f"Cooking: A man stands at a stove {i}. he\n{i % 4}\npours oil.\nsings.\nsleeps [step].\nruns.\n")
    (d / "winogrande.jsonl").write_text("".join(json.dumps(
        {"context_options": ["The cup fell because the cup", "The cup fell because the table"],
         "continuation": "was slippery.", "gold": i % 2}) + "\n" for i in range(5)))
    (d / "lambada_openai.jsonl").write_text("".join(
        json.dumps({"context": f"He opened the door and saw his old friend {i}. He said hello to his", "continuation":
                    "friend"}) + "\n" for i in range(5)))
    for split in ("test", "train"):
        (d / f"gsm8k_{split}.jsonl").write_text("".join(json.dumps(
            {"question": f"Tom has {i} apples and buys 2. How many?", "answer": f"{i} + 2 = {i + 2}\n#### {i + 2}"})
            + "\n" for i in range(6)))
    for split in ("test", "dev"):
        (d / "mmlu" / split).mkdir(parents=True)
        for subject in ("high_school_biology", "astronomy"):
            (d / "mmlu" / split / f"{subject}.csv").write_text(
                "question,choice0,choice1,choice2,choice3,answer\n"
                + "".join(f"What is {i}?,one,two,three,four,{i % 4}\n" for i in range(6)))
    (d / "heldout.txt").write_text("The old ship sailed across the grey sea toward the harbour. " * 40)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    from llamba.checkpoint import save_student
    from llamba.model import LlambaConfig, LlambaForCausalLM

    root = tmp_path_factory.mktemp("eval")
    data = root / "data"
    data.mkdir()
    _write_data(data)
    texts = [p.read_text() for p in data.glob("*.jsonl")] + [(data / "heldout.txt").read_text()]
    tok = _tokenizer(texts)
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id))
    teacher.save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    student = LlambaForCausalLM(LlambaConfig(
        d_model=32, n_layer=2, vocab_size=len(tok), mlp_cfg={"intermediate_size": 64},
        ssm_cfg={"d_state": 8, "n_v_heads": 4, "n_qk_heads": 2, "chunk_size": 8}))
    save_student(student, tok, root / "student")
    return root


def test_every_task_runs_through_lm_eval_for_teacher_and_student(models, capsys):
    root = models
    out = root / "out"
    rc = main(["eval", "--models", str(root / "teacher"), str(root / "student"), "--tasks", "paper,ppl",
               "--data-dir", str(root / "data"), "--limit", "3", "--out", str(out), "--batch-size", "4",
               "--device", "cpu", "--ppl-text", str(root / "data" / "heldout.txt"), "--ppl-tokens", "256",
               "--ppl-seq-len", "32", "--max-gen-toks", "24"])
    assert rc == 0
    report = json.loads((out / "eval.json").read_text())
    want = {"arc_easy acc", "arc_easy acc_norm", "arc_challenge acc_norm", "piqa acc", "winogrande acc",
            "hellaswag acc_norm", "openbookqa acc_norm", "lambada_openai acc", "lambada_openai perplexity",
            "mmlu acc", "mmlu_5shot acc", "gsm8k exact_match strict-match", "heldout ppl"}
    for name in (str(root / "teacher"), str(root / "student")):
        rows = report["rows"][name]
        assert want <= rows.keys(), want - rows.keys()
        for key, value in rows.items():
            assert math.isfinite(value)
            if key.endswith(("acc", "acc_norm", "strict-match")):
                assert 0.0 <= value <= 1.0
        # 3 examples per task (MMLU: per subject, 2 subjects)
        samples = report["lm_eval"][name]["n-samples"]
        assert samples["arc_easy"]["effective"] == 3
        assert report["lm_eval"][name]["n-shot"]["mmlu_5shot::mmlu_astronomy"] == 5
    assert report["rows"][str(root / "student")]["teacher‖model kl"] > 0
    assert (out / "eval.png").stat().st_size > 0
    table = [line for line in (out / "eval.md").read_text().splitlines() if line.startswith("|")]
    assert table[0].startswith("| task metric |")
    cells = {len(re.split(r"(?<!\\)\|", line)) for line in table}  # every row as many cells as the header
    assert len(cells) == 1, table


def test_missing_files_are_skipped_with_a_message(models, tmp_path, capsys):
    root = models
    data = tmp_path / "data"
    data.mkdir()
    (data / "arc_easy.jsonl").write_text((root / "data" / "arc_easy.jsonl").read_text())
    rc = main(["eval", "--models", str(root / "teacher"), "--tasks", "arc_easy,openbookqa,mmlu", "--data-dir",
               str(data), "--limit", "2", "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "skipping openbookqa: missing" in err and "openbookqa.jsonl" in err
    assert "skipping mmlu: missing" in err
    rows = json.loads((tmp_path / "out" / "eval.json").read_text())["rows"][str(root / "teacher")]
    assert set(rows) == {"arc_easy acc", "arc_easy acc_norm"}
