"""The real `llamba` command, run as a user runs it (a subprocess), on the mistakes a new user makes: each is
refused with exit status 2 and one line naming what to fix, no traceback, and nothing on disk changes. Few cases
(each process pays the import time); tests/test_bad_input.py covers the rest in-process."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llamba.cli import COMMANDS, main
from llamba.distill.testing import make_corpus, make_teacher

ROOT = Path(__file__).resolve().parents[1]


def llamba(*argv) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "llamba.cli", *map(str, argv)], capture_output=True, text=True,
                          env=env, timeout=300)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-subprocess")
    corpus = make_corpus(root / "corpus", n_docs=40, n_val=5)
    teacher = make_teacher(root / "teacher", corpus)
    assert main(["convert", "--teacher", str(teacher), "--out", str(root / "student"), "--d-state", "8"]) == 0
    return root, corpus, teacher, root / "student"


def test_user_mistakes_through_the_real_cli(tiny):
    root, corpus, teacher, student = tiny
    weights = (student / "model.safetensors").read_bytes()
    broken = root / "broken"
    shutil.copytree(student, broken)
    (broken / "model.safetensors").write_bytes(weights[:100])
    cases = [
        (["convert", "--teacher", teacher, "--out", student], "is not empty; choose a new folder, or add --force"),
        (["convert", "--teacher", teacher, "--out", root / "new", "--d-state", "0"], "--d-state: must be at least 1"),
        (["quantize", student, "--out", root / "q", "--group-size", "0"], "--group-size: must be at least 32"),
        (["quantize", broken, "--out", root / "q"], f"{broken / 'model.safetensors'}: not a readable safetensors"),
        (["distill", "--teacher", teacher, "--data", corpus, "--out", root / "run", "--student", teacher],
         "is not a Llamba student checkpoint"),
        (["eval", "--models", teacher, "--limit", "0"], "--limit: expected examples per task"),
    ]
    for argv, says in cases:
        result = llamba(*argv)
        assert result.returncode == 2 and says in result.stderr and "Traceback" not in result.stderr, (argv, result.stderr)
    assert (student / "model.safetensors").read_bytes() == weights
    assert not (root / "new").exists() and not (root / "q").exists() and not (root / "run" / "data").exists()


HEAVY = ("torch", "transformers", "safetensors", "numpy", "triton", "lm_eval", "datasets", "fastapi")
# Prints, at exit, which heavy modules the process imported: `--help` ends in SystemExit, after which atexit runs.
HELP_PROBE = ("import atexit, sys\n"
              f"atexit.register(lambda: print('heavy:', sorted(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr))\n"
              "from llamba.cli import main\n"
              "sys.exit(main(sys.argv[1:]))")
# `llamba --help` and `llamba COMMAND --help` measured at ~0.1 s on a 2-core box (Python itself starts in ~0.07 s),
# against ~3.3 s when `import llamba` loaded llamba.model (torch, transformers); 1 s leaves room for a busy CI box
# while catching any command whose argument registration imports torch again (~1.2 s alone).
HELP_SECONDS = 1.0


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_help_answers_at_once_without_torch(command):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    argv = [sys.executable, "-c", HELP_PROBE, *([command] if command else []), "--help"]
    seconds = []
    for _ in range(2):  # the faster of two: one slow start on a loaded machine is not the command's cost
        start = time.perf_counter()
        result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
        seconds.append(time.perf_counter() - start)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"usage: llamba {command}".strip() in result.stdout
    assert "heavy: []" in result.stderr, result.stderr[-2000:]
    assert min(seconds) < HELP_SECONDS, (command, seconds)
