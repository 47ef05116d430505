"""The package's layers: what each part of ``llamba`` may import from the others (issue #20).

Bottom up: ``ops`` (kernels) < ``model`` < ``generation`` < ``quant`` / ``eval`` / ``distill`` < ``serve`` / ``cli``
/ ``bench``; ``text`` (reading documents) and ``metrics`` (NLL / KL sums) are leaves every layer may use. Read from
the source with ``ast``, so an import inside a function (the lazy kind) counts as much as one at the top.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "llamba"
ABOVE_MODEL = {"distill", "eval", "quant", "generation", "serve", "cli", "bench"}
LEAF = {"ops", "model", "generation", "distill", "eval", "quant", "serve", "cli", "bench", "teacher", "convert",
        "checkpoint", "weightfiles", "text", "metrics"}

# part of llamba (first name under llamba/) -> the parts it must not import
FORBIDDEN = {
    "ops": ABOVE_MODEL | {"model", "text", "metrics"},
    "model": ABOVE_MODEL | {"text", "metrics"},
    "eval": {"distill"},
    "quant": {"distill"},
    "text": LEAF - {"text"},
    "metrics": LEAF - {"metrics"},
}


def _module_name(path: Path, root: Path) -> list[str]:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def imported_modules(path: Path, root: Path = PACKAGE) -> list[tuple[int, str]]:
    """(line, dotted module) of every import in ``path``: ``import x``, ``from x import y`` (relative ones
    resolved against the file's package, and ``from llamba import distill`` as ``llamba.distill``), and
    ``importlib.import_module("x")`` / ``__import__("x")`` with a literal name."""
    tree = ast.parse(path.read_text(), filename=str(path))
    name = _module_name(path, root)
    package = name if path.name == "__init__.py" else name[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package[: len(package) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]  # from llamba import distill
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return found


def violations(root: Path = PACKAGE) -> list[str]:
    out = []
    for path in sorted(root.rglob("*.py")):
        name = _module_name(path, root)
        part = name[1] if len(name) > 1 else None
        banned = FORBIDDEN.get(part, set())
        seen = set()
        for line, module in imported_modules(path, root):
            names = module.split(".")
            if names[0] == "llamba" and len(names) > 1 and names[1] in banned and (line, names[1]) not in seen:
                seen.add((line, names[1]))
                out.append(f"{path.relative_to(root.parent)}:{line}: llamba.{part} imports {module}")
    return out


def test_no_layer_imports_from_above():
    found = violations()
    assert not found, "imports against the layering (see FORBIDDEN in tests/test_layering.py):\n" + "\n".join(found)


def test_the_check_sees_every_kind_of_import(tmp_path):
    """The walker itself: each way of importing is caught (a check that cannot fail checks nothing)."""
    pkg = tmp_path / "llamba"
    (pkg / "model" / "sub").mkdir(parents=True)
    (pkg / "eval").mkdir()
    (pkg / "model" / "a.py").write_text("def f():\n    from llamba.generation import try_fast_generate\n")
    (pkg / "model" / "sub" / "b.py").write_text("from ...distill import data\n")
    (pkg / "model" / "c.py").write_text("import importlib\nimportlib.import_module('llamba.serve.app')\n")
    (pkg / "eval" / "d.py").write_text("from llamba import distill\nimport llamba.model\n")
    (pkg / "eval" / "e.py").write_text("from llamba.text import iter_documents\nfrom . import data\n")
    found = violations(pkg)
    assert len(found) == 4, found
    assert {f.split(":")[0] for f in found} == {"llamba/model/a.py", "llamba/model/sub/b.py", "llamba/model/c.py",
                                                "llamba/eval/d.py"}


def test_generate_still_reaches_the_fast_path(monkeypatch, tiny_llamba):
    """model.generate() takes llamba.generation's fast path without llamba.model importing it: it looks up the
    package root's ``fast_generate`` (llamba/__init__.py), and the call still goes to the current try_fast_generate."""
    import torch

    import llamba.generation

    model = tiny_llamba(dtype=torch.float32)
    sentinel = torch.tensor([[7, 7]])
    monkeypatch.setattr(llamba.generation, "try_fast_generate", lambda *args: sentinel)
    assert model.generate(torch.tensor([[1, 2]]), max_new_tokens=1) is sentinel
    monkeypatch.setattr(llamba.generation, "try_fast_generate", lambda *args: None)  # CPU: transformers' generate
    out = model.generate(torch.tensor([[1, 2]]), max_new_tokens=2, do_sample=False)
    assert out.shape == (1, 4)
