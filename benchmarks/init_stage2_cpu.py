"""A CPU proxy of stage 2 for each mixer and init: one block of the real teacher's student, trained alone on the
teacher's own input to that layer against the teacher layer's output (the hidden-state alignment of stage 2,
block form, lr 1e-3 as the recipe), for a few hundred steps; held-out alignment error every few steps.

Stage 2 trains every layer on the teacher's input (teacher forcing), so the layers are independent and one layer
alone is stage 2 for that layer. This says how fast each init *aligns*; what the distilled student ends at is the
GPU proxies' question.

    python benchmarks/init_stage2_cpu.py --layers 5 15 25 --steps 300 --out results/init-stage2-cpu
    python benchmarks/init_stage2_cpu.py --mixers discrete_mamba2 gateloop --inits attention   # issue 22's proxy
"""

import argparse
import os
import time
from pathlib import Path

import torch

from llamba.bench.report import provenance, write
from llamba.convert import INITS, student_from_teacher
from llamba.distill.data import Batch
from llamba.distill.stages import hidden_loss, teacher_targets
from llamba.model.config import MIXERS
from llamba.quant.perplexity import corpus_tokens
from llamba.teacher import load_teacher

CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "corpus"


@torch.no_grad()
def layer_pairs(teacher, ids: torch.Tensor, layers: list[int]) -> dict:
    """{layer: (teacher input to it, its output)} for the windows ``ids`` (batches, B, L), each window one
    document: stage 2's own teacher targets (the last layer's output is caught before the final norm)."""
    out = {i: ([], []) for i in layers}
    for batch in ids:
        one_document = Batch(batch, torch.zeros_like(batch, dtype=torch.int32),
                             torch.arange(batch.shape[1]).expand_as(batch))
        targets = teacher_targets(teacher, one_document, 2)
        for i in layers:
            out[i][0].append(targets.hidden_in[i])
            out[i][1].append(targets.hidden_out[i])
    return out


def train_block(block, pairs, val_pairs, steps: int, lr: float, every: int, warmup: float) -> list[dict]:
    from llamba.distill.trainer import wsd_lr

    params = [p for p in block.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    block.train()
    curve = []
    for step in range(steps + 1):
        if step % every == 0:
            with torch.no_grad():
                val = sum(hidden_loss(block(h), t).item() for h, t in zip(*val_pairs)) / len(val_pairs[0])
            curve.append({"step": step, "val_loss": val})
        if step == steps:
            break
        for group in opt.param_groups:  # the trainer's warmup-stable-decay schedule
            group["lr"] = wsd_lr(step, steps, lr, warmup, 0.2)
        h, t = pairs[0][step % len(pairs[0])], pairs[1][step % len(pairs[0])]
        loss = hidden_loss(block(h), t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    return curve


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="smollm2-135m")
    p.add_argument("--layers", type=int, nargs="+", default=[5, 15, 25])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--batches", type=int, default=32, help="training windows (batch 4 x 256 tokens each)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=float, default=0.05, help="fraction of the steps (the recipe's)")
    p.add_argument("--inits", nargs="+", default=list(INITS), choices=INITS)
    p.add_argument("--mixers", nargs="+", default=["discrete_mamba2"], choices=MIXERS)
    p.add_argument("--seed", type=int, default=0, help="draws the rows an init leaves random")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    teacher, tok = load_teacher(args.teacher)
    teacher.eval()
    n = 4 * 256
    train_ids = corpus_tokens(CORPUS / "gutenberg-train-07.jsonl.xz", tok, args.batches * n + n)[: args.batches * n]
    val_ids = corpus_tokens(CORPUS / "gutenberg-val.jsonl.xz", tok, 4 * n + n)[: 4 * n]
    t0 = time.perf_counter()
    train = layer_pairs(teacher, train_ids.view(args.batches, 4, 256), args.layers)
    val = layer_pairs(teacher, val_ids.view(4, 4, 256), args.layers)
    print(f"teacher pairs in {time.perf_counter() - t0:.0f} s", flush=True)
    rows = []
    for mixer in args.mixers:
        for init in args.inits:
            torch.manual_seed(args.seed)
            student = student_from_teacher(teacher, d_state=64, init=init, mixer=mixer)
            for i in args.layers:
                t0 = time.perf_counter()
                curve = train_block(student.backbone.layers[i], train[i], val[i], args.steps, args.lr, args.every,
                                    args.warmup)
                rows.append({"mixer": mixer, "init": init, "layer": i, "curve": curve,
                             "seconds": time.perf_counter() - t0})
                print(f"{mixer} {init} layer {i}: " + " ".join(f"{c['val_loss']:.2f}" for c in curve), flush=True)
    result = {**provenance(), "threads": args.threads, "teacher": args.teacher, "seed": args.seed,
              "layers": args.layers, "steps": args.steps, "lr": args.lr, "warmup": args.warmup,
              "train_tokens_per_step": n, "rows": rows}
    if args.out:
        steps = [c["step"] for c in rows[0]["curve"]]
        table = ["| mixer | init | layer | " + " | ".join(f"step {s}" for s in steps) + " |",
                 "|---|---|---|" + "---|" * len(steps)]
        table += [f"| {r['mixer']} | {r['init']} | {r['layer']} | "
                  + " | ".join(f"{c['val_loss']:.2f}" for c in r["curve"]) + " |" for r in rows]
        write(args.out, result, f"Stage 2 on one layer, by mixer and init: {args.teacher}", ["\n".join(table)], notes=(
            f"held-out alignment error (mean L2 norm per token of block output - teacher layer output) on {4 * n:,} "
            f"tokens of `gutenberg-val`, every {args.every} steps of {n:,} tokens (lr {args.lr}, warmup "
            f"{args.warmup:.0%} of the steps, then flat, decay over the last 20%: the recipe's schedule); "
            f"{args.threads} threads",))
