"""The `llamba` command line: convert and generate on the real teacher, and one-line errors for bad input."""

import sys

from llamba.cli import main


def test_convert_then_generate(tmp_path, capsys):
    out = tmp_path / "student"
    assert main(["convert", "--teacher", "smollm2-135m", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "student: 158,171,598 parameters" in err
    assert main(["generate", "--model", str(out), "--prompt", "Hello", "--max-new-tokens", "3"]) == 0
    assert "new tokens" in capsys.readouterr().err


def test_teacher_generates_paris(capsys):
    assert main(["generate", "--model", "smollm2-135m", "--prompt", "What is the capital of France?",
                 "--max-new-tokens", "12"]) == 0
    assert "Paris" in capsys.readouterr().out


def test_bad_model_path_is_one_clear_line(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llamba generate: error:") and "nope" in err and "Traceback" not in err


def test_missing_optional_dependency_names_the_extra(monkeypatch, capsys):
    """An inference-only install (`pip install llamba`) running a command that needs an extra gets one line saying
    which extra to install, not a traceback; an ImportError of anything else is not hidden."""
    from llamba.cli import missing_extra

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # importing it now raises ModuleNotFoundError
    assert main(["eval", "--models", "smollm2-135m", "--tasks", "arc_easy", "--limit", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llamba eval: error:") and "pip install 'llamba[eval]'" in err and "Traceback" not in err
    assert missing_extra(ModuleNotFoundError("x", name="matplotlib"), "distill") == "train"
    assert missing_extra(ModuleNotFoundError("x", name="matplotlib"), "eval") == "eval"
    assert missing_extra(ImportError("Please install torch and gguf>=0.10.0 to load a GGUF checkpoint"),
                         "convert") == "gguf"
    assert missing_extra(ModuleNotFoundError("x", name="llamba.not_a_module"), "generate") is None


def test_bad_sampling_options_are_refused_before_loading(capsys):
    """Checked on every path alike (transformers' CPU generate had taken a top-p of 2), before any model loads."""
    for option, value, says in [("--top-p", "2", "top_p"), ("--temperature", "-1", "--temperature"),
                                ("--min-p", "1.5", "min_p"), ("--repetition-penalty", "0", "repetition_penalty")]:
        extra = ["--temperature", "0.7"] if option != "--temperature" else []
        assert main(["generate", "--model", "does-not-matter", "--prompt", "x", option, value, *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("llamba generate: error:") and says in err and "Traceback" not in err, err


def test_distill_on_local_data_does_not_need_datasets(monkeypatch, tmp_path):
    """`datasets` only streams hf: sources; a docs-only run on local jsonl (refused up front on the GPU machine,
    which lacks it) prepares its data without it."""
    from llamba.distill.testing import make_corpus, make_teacher

    corpus = make_corpus(tmp_path / "corpus", n_docs=30, n_val=5)
    teacher = make_teacher(tmp_path / "teacher", corpus)
    monkeypatch.setitem(sys.modules, "datasets", None)  # importing it now raises ModuleNotFoundError
    assert main(["distill", "--teacher", str(teacher), "--data", str(corpus), "--out", str(tmp_path / "run"),
                 "--prepare-only", "--device", "cpu", "--max-tokens", "2000", "--val-tokens", "200"]) == 0
    assert (tmp_path / "run" / "data" / "manifest.json").exists()
