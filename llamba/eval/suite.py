"""The paper's zero-shot suite as lm-eval task specs over a local data dir, and one call that runs it.

Tasks are lm-eval ``ConfigurableTask``s: YAML files in ``tasks/`` (found through ``TaskManager(include_path=...)``)
plus MMLU, whose per-subject tasks are built here from the CSVs present (inline group dicts, aggregated by lm-eval
weighted by size, as its own ``mmlu`` group does).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llamba.eval.data import DATA_FILES, mmlu_subjects

TASK_DIR = Path(__file__).parent / "tasks"
PAPER_TASKS = ["arc_easy", "arc_challenge", "piqa", "winogrande", "hellaswag", "openbookqa", "lambada_openai",
               "mmlu", "mmlu_5shot", "gsm8k"]
ALL_TASKS = PAPER_TASKS

# The metric each table row shows, per task (lm-eval result keys are "<metric>,<filter>").
TABLE_METRICS = {
    "arc_easy": ["acc", "acc_norm"], "arc_challenge": ["acc", "acc_norm"], "piqa": ["acc", "acc_norm"],
    "hellaswag": ["acc", "acc_norm"], "openbookqa": ["acc", "acc_norm"], "winogrande": ["acc"],
    "lambada_openai": ["acc", "perplexity"], "mmlu": ["acc"], "mmlu_5shot": ["acc"],
    "gsm8k": ["exact_match,strict-match", "exact_match,flexible-extract"],
}

# lm-eval's mmlu/default/_default_template_yaml, verbatim prompt.
MMLU_TEMPLATE: dict[str, Any] = {
    "output_type": "multiple_choice",
    "test_split": "test",
    "fewshot_split": "dev",
    "fewshot_config": {"sampler": "first_n"},
    "doc_to_text": "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\nD. {{choices[3]}}"
                   "\nAnswer:",
    "doc_to_choice": ["A", "B", "C", "D"],
    "doc_to_target": "answer",
    "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    "metadata": {"version": 1.0},
}


def missing_files(task: str, data_dir: str | Path) -> list[str]:
    key = "mmlu" if task.startswith("mmlu") else task
    if key not in DATA_FILES:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(ALL_TASKS)} (or 'paper', 'ppl')")
    return [name for name in DATA_FILES[key] if not (Path(data_dir) / name).exists()]


def mmlu_group(data_dir: str | Path, num_fewshot: int) -> dict[str, Any]:
    """lm-eval's ``mmlu`` group over the subjects present: one task per subject with its own description."""
    from llamba.eval import data

    name = "mmlu" if num_fewshot == 0 else f"mmlu_{num_fewshot}shot"
    subjects = mmlu_subjects(data_dir)
    if not subjects:
        raise FileNotFoundError(f"{Path(data_dir) / 'mmlu/test'} holds no <subject>.csv files")
    tasks = [{
        **MMLU_TEMPLATE,
        "custom_dataset": data.mmlu,
        "task": f"mmlu_{subject}",
        "task_alias": subject,
        "dataset_kwargs": {"subject": subject},
        "description": f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n",
        "num_fewshot": num_fewshot,
    } for subject in subjects]
    return {"group": name, "task": tasks, "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}],
            "metadata": {"version": 2}}


def resolve_tasks(names: list[str], data_dir: str | Path) -> tuple[list[str | dict], dict[str, str]]:
    """Task names (``paper`` expands) -> (lm-eval specs, {skipped task: why})."""
    expanded: list[str] = []
    for name in names:
        expanded += PAPER_TASKS if name == "paper" else [name]
    specs: list[str | dict] = []
    skipped: dict[str, str] = {}
    for task in dict.fromkeys(expanded):
        missing = missing_files(task, data_dir)
        if missing:
            skipped[task] = f"missing {', '.join(str(Path(data_dir) / m) for m in missing)}"
        elif task.startswith("mmlu"):
            specs.append(mmlu_group(data_dir, 5 if task == "mmlu_5shot" else 0))
        else:
            specs.append(task)
    return specs, skipped


def task_manager(data_dir: str | Path):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASK_DIR), include_defaults=False,
                       metadata={"data_dir": str(Path(data_dir).expanduser().resolve())})


def run_suite(lm, specs: list[str | dict], data_dir: str | Path, limit: int | float | None = None,
              batch_size: int = 1, log_samples: bool = False, max_gen_toks: int | None = None) -> dict:
    """Run lm-eval on ``lm`` (an lm-eval ``LM``: ``LlambaLM`` or ``HFLM``); returns lm-eval's results dict."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks._index import TaskIndex

    manager = task_manager(data_dir)
    # lm-eval 0.4.13 pushes an inline group dict's own keys ("group", "task") down into its member tasks when the
    # dict is passed as a task spec; building the Group through the manager's factory without overrides avoids it.
    specs = [manager._factory.build(TaskIndex.entry_from_config(s), overrides=None, registry=manager._index)
             if isinstance(s, dict) else s for s in specs]
    return simple_evaluate(model=lm, tasks=specs, task_manager=manager, limit=limit,
                           batch_size=batch_size, log_samples=log_samples, bootstrap_iters=0,
                           gen_kwargs={"max_gen_toks": max_gen_toks} if max_gen_toks else None)


def table_rows(results: dict) -> dict[str, float]:
    """Flatten lm-eval results to {"task metric": value} for the rows of the comparison table."""
    rows = {}
    per_task = results["results"]
    for task, metrics in TABLE_METRICS.items():
        if task not in per_task:
            continue
        for metric in metrics:
            key = metric if "," in metric else f"{metric},none"
            if key in per_task[task] and isinstance(per_task[task][key], (int, float)):
                rows[f"{task} {metric.replace(',', ' ')}"] = float(per_task[task][key])
    return rows
