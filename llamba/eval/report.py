"""The side-by-side report: one markdown table (row = task and metric, column = model, with each model's ratio to
the first model, the teacher), the same numbers as JSON, and a grouped bar chart."""

from __future__ import annotations

import json
from pathlib import Path


def _lower_is_better(row: str) -> bool:
    return row.split()[-1] in ("perplexity", "ppl", "nll", "kl")


def mean_row(rows: dict[str, float]) -> float | None:
    """Mean over the accuracy-like rows (perplexity, NLL and KL excluded): the paper's 'average'."""
    acc = [v for k, v in rows.items() if not _lower_is_better(k)]
    return sum(acc) / len(acc) if acc else None


def markdown_table(models: list[str], rows: dict[str, dict[str, float]]) -> str:
    """rows: {model: {row name: value}}. Columns: each model, then '<model> / <teacher>' for the others."""
    teacher = models[0]
    names = list(dict.fromkeys(r for m in models for r in rows.get(m, {})))
    header = ["task metric", *models, *[f"{m} / {teacher}" for m in models[1:]]]

    def fmt(v):
        return "-" if v is None else f"{v:.4f}"

    def cell(text: str) -> str:  # a bare | would split the cell (model paths, row names)
        return text.replace("|", "\\|")

    def ratio(a, b):
        return None if a is None or not b else a / b

    lines = ["| " + " | ".join(map(cell, header)) + " |", "|" + "---|" * len(header)]
    for name in names:
        vals = [rows.get(m, {}).get(name) for m in models]
        lines.append("| " + " | ".join([cell(name), *map(fmt, vals), *[fmt(ratio(v, vals[0])) for v in vals[1:]]])
                     + " |")
    means = [mean_row({k: v for k, v in rows.get(m, {}).items() if k in names}) for m in models]
    lines.append("| " + " | ".join(["**mean (accuracy rows)**", *map(fmt, means),
                                    *[fmt(ratio(v, means[0])) for v in means[1:]]]) + " |")
    return "\n".join(lines) + "\n"


def bar_chart(models: list[str], rows: dict[str, dict[str, float]], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r for r in dict.fromkeys(r for m in models for r in rows.get(m, {})) if not _lower_is_better(r)]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(names) + 2), 4.5))
    width = 0.8 / max(1, len(models))
    for j, model in enumerate(models):
        ax.bar([i + j * width for i in range(len(names))], [rows.get(model, {}).get(n, 0.0) for n in names],
               width, label=model)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("score")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("zero-shot suite, teacher and students")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(out_dir: str | Path, models: list[str], rows: dict[str, dict[str, float]], meta: dict,
                 raw: dict | None = None) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / "eval.md", "json": out / "eval.json", "png": out / "eval.png"}
    lines = ["# llamba eval\n", *[f"- {k}: {v}" for k, v in meta.items()], "", markdown_table(models, rows)]
    paths["md"].write_text("\n".join(lines))
    paths["json"].write_text(json.dumps({"meta": meta, "models": models, "rows": rows,
                                         "mean": {m: mean_row(rows.get(m, {})) for m in models},
                                         "lm_eval": raw or {}}, indent=1, default=str))
    bar_chart(models, rows, paths["png"])
    return paths
