"""Choosing a hybrid's attention layers by measurement: ``--attention-layers auto:K``.

Each layer of a distilled pure student is restored, one at a time, to the teacher's own layer, and the student's
KL(teacher || student) is measured on held-out text; the K layers whose restoration lowers it most keep attention
(KL-guided layer selection, arXiv 2512.20569). Those are the layers where a recurrent mixer falls shortest of the
attention it replaced, which even spacing cannot know. ``auto:K:repeats`` ranks by the KL drop at repeats instead:
the positions that complete a trigram seen earlier in their document (``llamba.metrics.repeat_positions``), where
the model copies from its context, the recall that LAMBADA asks for and recurrent students lose first.

The pipeline ranks after stage 2, on the stage-2 student. Stage 2 trains every layer on the teacher's own input
(teacher forcing), so its mixers are what a hybrid's stage 2 would have trained (the layers are coupled only
through the global gradient clip): the choice costs one evaluation per layer instead of a distillation per
candidate. Stage 3 then trains the hybrid end to end.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from llamba.convert import RESTORE_PARTS, restore_teacher_layers
from llamba.distill.report import evaluate

AUTO = re.compile(r"auto:(\d+)(?::(kl|repeats))?")
RANKINGS = {"kl": "ranking", "repeats": "ranking_by_repeats"}  # auto:K:<by> -> the ranking it chooses from
SELECT_TOKENS = 131072  # held-out tokens per layer's evaluation (recipe field select_tokens)


def parse_auto(spec) -> tuple[int, str] | None:
    """(K, what it ranks by) of an ``"auto:K"`` or ``"auto:K:repeats"`` attention-layers setting; None for an
    explicit list (or none)."""
    if isinstance(spec, str):
        match = AUTO.fullmatch(spec.strip())
        if match is None:
            raise ValueError(f"attention layers {spec!r}: give layer indices (e.g. 5,14), auto:K (e.g. auto:4: the K "
                             "layers that recover the most KL), auto:K:kl (the same) or auto:K:repeats (the most KL at "
                             "repeats)")
        return int(match.group(1)), match.group(2) or "kl"
    return None


def check_auto(k: int, n_layer: int, stages) -> str | None:
    """Why ``auto:k`` cannot run here, or None."""
    if not 1 <= k <= n_layer:
        return f"--attention-layers auto:{k}: K must be between 1 and the teacher's {n_layer} layers"
    if 3 not in stages:
        return (f"--attention-layers auto:{k} chooses the layers before stage 3 and trains the hybrid there; "
                "add stage 3 to --stages")
    return None


@torch.no_grad()
def rank_layers(teacher, student, data_dir, seq_len: int, eval_tokens: int, micro_batch: int, device,
                log=lambda msg: None, parts: str = "layer") -> dict:
    """KL(teacher || student) on ``eval_tokens`` held-out tokens with each layer restored to the teacher's
    (``parts``: see ``restore_teacher_layers``), ranked by how much it falls. The same tokens for every layer, so
    the differences are paired."""
    if student.config.attention_layers:
        raise ValueError(f"layer ranking needs a pure student; this one already keeps attention in layers "
                         f"{list(student.config.attention_layers)}: give the hybrid's layers explicitly instead")
    args = dict(seq_len=seq_len, eval_tokens=eval_tokens, micro_batch=micro_batch, device=device)
    base = evaluate(teacher, student, data_dir, **args)
    repeats = base["kl_repeats"] is not None  # the same tokens for every layer: all rows have it, or none
    rows = []
    for i in range(student.config.n_layer):
        hybrid = restore_teacher_layers(student, teacher, [i], parts)
        ev = evaluate(teacher, hybrid, data_dir, **args)
        del hybrid
        row = {"layer": i, "kl": ev["kl_per_token"], "kl_drop": base["kl_per_token"] - ev["kl_per_token"]}
        if repeats:
            row.update(kl_repeats=ev["kl_repeats"], kl_repeats_drop=base["kl_repeats"] - ev["kl_repeats"])
        rows.append(row)
        log(f"layer {i:>3}: KL {ev['kl_per_token']:.4f} restored (pure {base['kl_per_token']:.4f})"
            + (f", at repeats {ev['kl_repeats']:.4f} (pure {base['kl_repeats']:.4f})" if repeats else ""))
    order = sorted(rows, key=lambda r: -r["kl_drop"])
    for rank, row in enumerate(order, 1):
        row["rank"] = rank
    return {"tokens": base["tokens"], "pure_kl": base["kl_per_token"], "pure_ppl": base["student_ppl"],
            "pure_kl_repeats": base["kl_repeats"], "repeat_share": base["repeat_share"],
            "teacher_ppl": base["teacher_ppl"], "restored": parts, "layers": rows,
            "ranking": [r["layer"] for r in order],
            "ranking_by_repeats": [r["layer"] for r in sorted(rows, key=lambda r: -r["kl_repeats_drop"])]
            if repeats else None}


def chosen_layers(ranking: dict, k: int, by: str = "kl") -> list[int]:
    order = ranking[RANKINGS[by]]
    if order is None:
        raise ValueError("auto:K:repeats: no held-out position repeats a trigram of its document, so there is no KL "
                         "at repeats to rank by; use auto:K")
    return sorted(order[:k])


def write_ranking(path: Path, ranking: dict, k: int | None = None, by: str = "kl") -> None:
    """``path``.json and a markdown table (.md) beside it, in a folder made if missing (a ranking takes minutes of
    GPU time; it must not be lost to an output folder that does not exist yet)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    chosen = chosen_layers(ranking, k, by) if k else None
    path.with_suffix(".json").write_text(json.dumps({**ranking, "k": k, "by": by, "chosen": chosen}, indent=1))
    what = "one layer's attention" if ranking.get("restored") == "attention" else "one layer"
    md = [f"# Layer ranking: KL(teacher || student) with {what} restored to the teacher's", "",
          f"{ranking['tokens']:,} held-out tokens; pure student KL {ranking['pure_kl']:.4f} nats/token, perplexity "
          f"{ranking['pure_ppl']:.2f} (teacher {ranking['teacher_ppl']:.2f})."]
    if k:
        md += ["", f"Chosen for attention (K = {k}, by {'the KL at repeats' if by == 'repeats' else 'the KL'}): "
               f"{chosen}"]
    repeats = "kl_repeats" in ranking["layers"][0]  # not where no position repeats, nor in older rankings
    if repeats:
        md += ["", f"KL at repeats: over the {ranking['repeat_share']:.1%} of positions that complete a trigram seen "
               f"earlier in their document (copying from context; pure student {ranking['pure_kl_repeats']:.4f}). "
               f"Ranked by its drop instead: {ranking['ranking_by_repeats'][:8]}..."]
    md += ["", "| rank | layer | KL restored | KL drop |" + (" KL at repeats | its drop |" if repeats else ""),
           "|---|---|---|---|" + ("---|---|" if repeats else "")]
    by_layer = {r["layer"]: r for r in ranking["layers"]}
    for layer in ranking["ranking"]:
        r = by_layer[layer]
        md.append(f"| {r['rank']} | {layer} | {r['kl']:.4f} | {r['kl_drop']:+.4f} |"
                  + (f" {r['kl_repeats']:.4f} | {r['kl_repeats_drop']:+.4f} |" if repeats else ""))
    path.with_suffix(".md").write_text("\n".join(md) + "\n")


def select_attention_layers(teacher, student, data_dir, k: int, out_dir: Path, eval_args: dict, log,
                            by: str = "kl"):
    """Rank ``student``'s layers, restore the top ``k`` (by the KL drop, or by its drop at repeats) to attention and
    return the hybrid; the ranking is written to ``out_dir``/ranking.{json,md}."""
    log(f"selecting {k} attention layers: restoring each of {student.config.n_layer} layers in turn "
        f"({eval_args['eval_tokens']:,} held-out tokens each)")
    ranking = rank_layers(teacher, student, data_dir, log=log, **eval_args)
    out_dir.mkdir(parents=True, exist_ok=True)
    layers = chosen_layers(ranking, k, by)
    write_ranking(out_dir / "ranking", ranking, k, by)
    log(f"attention layers chosen by {'the KL at repeats' if by == 'repeats' else 'the KL'}: {layers} "
        f"(ranking {ranking[RANKINGS[by]][:max(k, 8)]}...)")
    return restore_teacher_layers(student, teacher, layers), ranking


def main(argv=None) -> int:
    """Rank the layers of any distilled pure student (the ranking without the distillation around it)."""
    import argparse

    from llamba.checkpoint import load_student
    from llamba.cli.common import resolve_device
    from llamba.teacher import load_teacher

    parser = argparse.ArgumentParser(prog="python -m llamba.distill.select", description=main.__doc__)
    parser.add_argument("--teacher", default="smollm2-135m")
    parser.add_argument("--student", required=True, help="a pure Llamba student checkpoint folder")
    parser.add_argument("--data", required=True, help="a prepared data folder (llamba distill --prepare-only)")
    parser.add_argument("--out", required=True, help="writes OUT.json and OUT.md")
    parser.add_argument("--tokens", type=int, default=SELECT_TOKENS, help="held-out tokens per evaluation")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--restore", choices=RESTORE_PARTS, default="layer",
                        help="what of the teacher's layer comes back: the whole layer (right after stage 2) or the "
                             "attention and its norm only (a student whose MLPs trained too: stage 3)")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    teacher, _ = load_teacher(args.teacher, dtype=dtype, device=device, attn_implementation="sdpa")
    student = load_student(args.student, dtype=torch.float32, device=device)
    ranking = rank_layers(teacher, student, args.data, args.seq_len, args.tokens, args.micro_batch, device,
                          log=lambda msg: print(msg, flush=True), parts=args.restore)
    write_ranking(Path(args.out), ranking)
    print(f"ranking (most KL recovered first): {ranking['ranking']}  -> {Path(args.out).with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
