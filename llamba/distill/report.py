"""Evaluation (validation perplexity, KL(teacher || student) per token), loss-curve plots and the run summary."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from llamba.distill.data import PackedTokens
from llamba.distill.stages import set_attention
from llamba.metrics import kl_and_nll, repeat_positions


@torch.no_grad()
def evaluate(teacher, student, data_dir, seq_len: int, eval_tokens: int, micro_batch: int, device) -> dict:
    """On the first ``eval_tokens`` of the validation split (fixed windows, documents kept apart for both models):
    teacher and student perplexity of the next token, and KL(teacher || student) averaged over positions (every
    position of each window, its last one included: ``kl_and_nll(kl_last=True)``), and over the positions that
    complete a repeated trigram alone (``kl_repeats``: copying from context, ``metrics.repeat_positions``)."""
    val = PackedTokens(data_dir, "val", seq_len)
    n = max(1, min(len(val), eval_tokens // seq_len))
    set_attention(teacher, "sdpa")
    student.eval()
    sums: dict[str, float] = {}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch.device(device).type == "cuda")
    for start in range(0, n, micro_batch):
        batch = val.batch(range(start, min(n, start + micro_batch))).to(device)
        with autocast:
            t = teacher(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits
            s = student(batch.input_ids, seq_idx=batch.seq_idx).logits
        repeats = repeat_positions(batch.input_ids, batch.seq_idx)
        for k, v in kl_and_nll(s, t, batch.input_ids, kl_last=True, repeats=repeats).items():
            sums[k] = sums.get(k, 0.0) + v
    return {"tokens": n * seq_len,
            "teacher_ppl": math.exp(sums["teacher_nll"] / sums["nll_positions"]),
            "student_ppl": math.exp(sums["student_nll"] / sums["nll_positions"]),
            "kl_per_token": sums["kl"] / sums["kl_positions"],
            # None where no position repeats (short windows of random ids)
            "kl_repeats": sums["kl_repeats"] / sums["repeat_positions"] if sums["repeat_positions"] else None,
            "repeat_share": sums["repeat_positions"] / sums["kl_positions"]}


@torch.no_grad()
def generation_sample(model, tokenizer, prompt: str, max_new_tokens: int, device) -> str:
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def read_metrics(path: Path) -> dict[int, list[dict]]:
    """Rows per stage; after a resume, steps logged twice keep their last value."""
    rows: dict[int, dict[int, dict]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            rows.setdefault(row["stage"], {})[row["step"]] = row
    return {s: [r[k] for k in sorted(r)] for s, r in rows.items()}


def plot_losses(metrics_path: Path, out_dir: Path) -> list[Path]:
    """One PNG per stage: loss against tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for stage, rows in read_metrics(metrics_path).items():
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([r["tokens"] for r in rows], [r["loss"] for r in rows], lw=1)
        ax.set_xlabel("tokens")
        ax.set_ylabel("loss")
        ax.set_title(f"stage {stage}")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out_dir / f"loss_stage{stage}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def write_summary(out_dir: Path, summary: dict) -> tuple[Path, Path]:
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    md = [f"# Distillation summary: {summary['teacher']} -> Llamba student", ""]
    if summary.get("command"):
        md += [f"Command: `{summary['command']}`", ""]
    md += [f"Device: {summary['device']} x {summary['world_size']}; recipe `{summary['recipe']}`; "
           f"date {summary['date']}; data `{summary['data']}`.", ""]
    if summary.get("attention_layers"):
        selection = summary.get("selection")
        by = " at repeats" if selection and selection.get("by") == "repeats" else ""
        how = f"chosen by KL-guided ranking{by} (select/ranking.md)" if selection else "given"
        md += [f"Hybrid: layers {summary['attention_layers']} keep the teacher's attention ({how}).", ""]
    md += ["| stage | tokens | steps | wall (s) | tokens/s | first loss | last loss |", "|---|---|---|---|---|---|---|"]
    for k, s in sorted(summary["stages"].items()):
        md.append(f"| {k} | {s['tokens']:,} | {s['steps']} | {s['wall_s']:.0f} | {s['tokens_per_s']:,.0f} | "
                  f"{s['first_loss']:.4g} | {s['last_loss']:.4g} |")
    ev = summary["eval"]

    def at_repeats(e: dict) -> str:  # evaluations written before the column existed (a resumed run's) lack it
        return f"{e['kl_repeats']:.4f}" if e.get("kl_repeats") is not None else "-"

    share = ev["final"].get("repeat_share")
    md += ["", f"Validation ({ev['final']['tokens']:,} held-out tokens" + (
               f"; {share:.1%} of the positions complete a trigram seen earlier in their document" if share else "")
           + "):", "",
           "| model | perplexity | KL(teacher‖model) per token | KL at repeats (copying from context) |",
           "|---|---|---|---|",
           f"| teacher | {ev['final']['teacher_ppl']:.3f} | 0 | 0 |",
           f"| initialised student | {ev['init']['student_ppl']:.3f} | {ev['init']['kl_per_token']:.4f} | "
           f"{at_repeats(ev['init'])} |",
           f"| distilled student | {ev['final']['student_ppl']:.3f} | {ev['final']['kl_per_token']:.4f} | "
           f"{at_repeats(ev['final'])} |"]
    if summary.get("sample"):
        md += ["", "Greedy samples:", ""]
        for who, text in summary["sample"].items():
            md.append(f"- {who}: `{text!r}`")
    (out_dir / "summary.md").write_text("\n".join(md) + "\n")
    return out_dir / "summary.json", out_dir / "summary.md"


def write_results(run_dir, prefix) -> tuple[Path, Path]:
    """Copy a finished run's summary to ``PREFIX.json`` / ``PREFIX.md`` (e.g. results/distill-smollm2-135m)."""
    summary = json.loads((Path(run_dir) / "summary.json").read_text())
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(str(prefix) + ".tmp")
    tmp.mkdir(exist_ok=True)
    j, m = write_summary(tmp, summary)
    out_j, out_m = Path(str(prefix) + ".json"), Path(str(prefix) + ".md")
    j.replace(out_j)
    m.replace(out_m)
    tmp.rmdir()
    return out_j, out_m


if __name__ == "__main__":  # python -m llamba.distill.report RUN_DIR PREFIX
    import sys

    if len(sys.argv) != 3:
        sys.exit("usage: python -m llamba.distill.report RUN_DIR PREFIX   (writes PREFIX.json and PREFIX.md)")
    for path in write_results(sys.argv[1], sys.argv[2]):
        print(path)
