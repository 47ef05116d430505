"""Quality against decode throughput: one point per model (teacher, hybrids, pure student), read from the files
that measured each (``llamba eval`` / distillation summaries for quality, ``llamba bench`` for speed).

Quality is the mean retention over issue 19's four tasks (student / teacher on ARC-Easy acc, PIQA acc, HellaSwag
acc_norm, LAMBADA acc), so the teacher sits at 1. Speed is decode tokens/s at one batch and prompt of the bench
file (default batch 256, prompt 2048), where every model ran through its own engine in the same process.

    python -m llamba.bench.tradeoff --bench results/bench-h200.json --teacher results/eval-smollm2-135m-gpu.json \\
        rows:smollm2-135m --point pure results/eval-smollm2-135m-gpu.json rows:/root/runs/pure/stage3/final student \\
        --point "hybrid K=4" results/hybrid-smollm2-135m.json recipe:k4:eval hybrid4 --out results/tradeoff-h200

A point's metrics are found in its JSON by a key path, keys joined by ':' (a model column may contain '/' and '.');
its speed key is ``teacher``, ``student`` (the pure student), ``hybridK`` or ``hybrid:20,23,24,26`` (a hybrid by
its number of attention layers, or by the layers themselves) or a mixer name (``gateloop``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
from pathlib import Path

BAR_TASKS = ("arc_easy acc", "piqa acc", "hellaswag acc_norm", "lambada_openai acc")


def metrics_at(path: str, key_path: str) -> dict:
    node = json.loads(Path(path).read_text())
    for key in key_path.split(":"):
        if not isinstance(node, dict) or key not in node:
            have = sorted(node) if isinstance(node, dict) else type(node).__name__
            raise ValueError(f"{path}: no key {key!r} on the way to {key_path!r} (there: {have})")
        node = node[key]
    missing = [t for t in BAR_TASKS if t not in node]
    if missing:
        raise ValueError(f"{path} {key_path}: no {missing}; evaluate with "
                         "--tasks arc_easy piqa hellaswag lambada_openai")
    return node


def retention(model: dict, teacher: dict) -> dict:
    """Per task and mean: model / teacher on BAR_TASKS."""
    per = {t: model[t] / teacher[t] for t in BAR_TASKS}
    return {"per_task": per, "mean": sum(per.values()) / len(per)}


def decode_rate(bench: dict, key: str, batch: int, prompt: int) -> float:
    """Decode tokens/s of ``key`` at (batch, prompt) in a ``llamba bench`` result."""
    if key in ("teacher", "student"):
        rows, field = [r for r in bench.get("decode", []) if r.get("model") == key], "decode_tok_s"
    elif key.startswith("hybrid"):
        rows, field = hybrid_rows(bench, key[len("hybrid"):]), "decode_tok_s"
    else:
        rows = next((m["decode"] for m in bench.get("mixers") or [] if m["mixer"] == key), [])
        field = "decode_tok_s"
    for r in rows:
        if r.get("batch") == batch and r.get("prompt") == prompt and not r.get("oom"):
            return r[field]
    raise ValueError(f"the bench file has no {key!r} decode row at batch {batch}, prompt {prompt}; run "
                     f"`llamba bench --batches ...{batch} --prompts {prompt}` (with --hybrids / --mixers for those)")


def hybrid_rows(bench: dict, which: str) -> list[dict]:
    """The decode rows of the hybrid ``which`` names: 'K' (its number of attention layers; refused when the file
    has several hybrids with K layers) or ':20,23,24,26' (exactly those layers)."""
    from llamba.cli.common import parse_attention_layers

    hybrids = bench.get("hybrids") or []
    if which.startswith(":"):
        layers = parse_attention_layers(which[1:])
        found = [h for h in hybrids if h["attention_layers"] == layers]
    else:
        found = [h for h in hybrids if h["k"] == int(which)]
        if len(found) > 1:
            raise ValueError(f"the bench file has {len(found)} hybrids with {which} attention layers "
                             f"({', '.join(str(h['attention_layers']) for h in found)}): name one as "
                             f"hybrid:{','.join(map(str, found[0]['attention_layers']))}")
    return found[0]["decode"] if found else []


def points(bench: dict, teacher: dict, specs: list[tuple[str, str, str, str]], batch: int, prompt: int) -> list[dict]:
    out = [{"label": "teacher", "retention": 1.0, "per_task": {t: 1.0 for t in BAR_TASKS},
            "decode_tok_s": decode_rate(bench, "teacher", batch, prompt)}]
    for label, path, key_path, speed_key in specs:
        r = retention(metrics_at(path, key_path), teacher)
        out.append({"label": label, "retention": r["mean"], "per_task": r["per_task"], "source": f"{path} {key_path}",
                    "decode_tok_s": decode_rate(bench, speed_key, batch, prompt), "speed_key": speed_key})
    return out


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for r in rows:
        ax.scatter(r["decode_tok_s"], r["retention"], s=40)
        ax.annotate(r["label"], (r["decode_tok_s"], r["retention"]), textcoords="offset points", xytext=(6, 4))
    ax.axhline(1.0, color="grey", lw=0.6, ls=":")
    ax.set_xlabel("decode tokens/s")
    ax.set_ylabel("mean retention (ARC-E, PIQA, HellaSwag, LAMBADA)")
    ax.set_title(title, fontsize=10)
    ax.set_xscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m llamba.bench.tradeoff", description=__doc__.splitlines()[0])
    p.add_argument("--bench", required=True, help="a `llamba bench` JSON")
    p.add_argument("--teacher", nargs=2, metavar=("JSON", "KEYS"), required=True, help="the teacher's metrics")
    p.add_argument("--point", nargs=4, action="append", default=[], metavar=("LABEL", "JSON", "KEYS", "SPEED"))
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--prompt", type=int, default=2048)
    p.add_argument("--out", required=True, help="writes OUT.json, OUT.md, OUT.png")
    args = p.parse_args(argv)
    bench = json.loads(Path(args.bench).read_text())
    rows = points(bench, metrics_at(*args.teacher), [tuple(s) for s in args.point], args.batch, args.prompt)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    device = bench.get("device", "GPU")
    command = shlex.join(["python", "-m", "llamba.bench.tradeoff", *(sys.argv[1:] if argv is None else argv)])
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    out.with_suffix(".json").write_text(json.dumps({"command": command, "date": date, "bench": args.bench,
                                                    "batch": args.batch, "prompt": args.prompt, "device": device,
                                                    "points": rows}, indent=1))
    md = [f"# Quality against decode throughput ({device}, batch {args.batch}, prompt {args.prompt})", "",
          f"- command: `{command}`", f"- date: {date}; speed from `{args.bench}` ({bench.get('date', 'undated')})",
          "",
          "| model | mean retention | ARC-E / PIQA / HellaSwag / LAMBADA | decode tok/s | vs teacher |",
          "|---|---|---|---|---|"]
    base = rows[0]["decode_tok_s"]
    for r in rows:
        per = " / ".join(f"{r['per_task'][t]:.3f}" for t in BAR_TASKS)
        md.append(f"| {r['label']} | {r['retention']:.3f} | {per} | {r['decode_tok_s']:,.0f} | "
                  f"{r['decode_tok_s'] / base:.2f}x |")
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    plot(rows, out.with_suffix(".png"), f"{device}: quality against decode speed (batch {args.batch})")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
