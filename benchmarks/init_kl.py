"""How far each mixer init starts from the teacher: KL(teacher || student) per token and perplexity of the
initialised (untrained) student, for every ``llamba convert --init`` and mixer, on the same held-out tokens.

    python benchmarks/init_kl.py --tokens 2048 --out results/init-kl-smollm2-135m
"""

import argparse
import math
import os
import time
from pathlib import Path

import torch

from llamba.bench.report import provenance, write
from llamba.convert import INITS, student_from_teacher
from llamba.metrics import kl_and_nll
from llamba.quant.perplexity import corpus_tokens
from llamba.teacher import load_teacher

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "corpus" / "gutenberg-val.jsonl.xz"


@torch.no_grad()
def kl_and_ppl(teacher, student, windows: torch.Tensor) -> tuple[float, float, float]:
    """(KL(teacher || student) per token, student perplexity, teacher perplexity) over the windows, by
    ``llamba.metrics`` as distillation's validation counts them (KL at every position)."""
    sums = {}
    for ids in windows:
        ids = ids[None]
        t = teacher(ids).logits
        for key, value in kl_and_nll(student(ids).logits[..., : t.shape[-1]], t, ids).items():
            sums[key] = sums.get(key, 0) + value
    positions = sums["nll_positions"]
    return (sums["kl"] / sums["kl_positions"], math.exp(sums["student_nll"] / positions),
            math.exp(sums["teacher_nll"] / positions))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="smollm2-135m")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--out", default=None, help="writes OUT.json and OUT.md")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    teacher, tok = load_teacher(args.teacher)
    teacher.eval()
    windows = corpus_tokens(args.data, tok, args.tokens + args.window)[: args.tokens].view(-1, args.window)
    rows = []
    for mixer in ("discrete_mamba2", "gateloop"):
        for init in INITS:
            t0 = time.perf_counter()
            torch.manual_seed(0)  # the rows an init leaves at nn.Linear's random init: the same draw for every row
            try:
                student = student_from_teacher(teacher, d_state=64, init=init, mixer=mixer).eval()
            except ValueError as e:  # an init this mixer does not take
                print(f"{mixer} {init}: {e}", flush=True)
                continue
            kl, ppl, t_ppl = kl_and_ppl(teacher, student, windows)
            rows.append({"mixer": mixer, "init": init, "kl_per_token": kl, "student_ppl": ppl, "teacher_ppl": t_ppl,
                         "seconds": time.perf_counter() - t0})
            print(f"{mixer} {init}: KL {kl:.3f}, perplexity {ppl:,.1f} (teacher {t_ppl:.2f})", flush=True)
    result = {**provenance(), "threads": args.threads, "teacher": args.teacher, "tokens": args.tokens,
              "window": args.window, "data": Path(args.data).name, "rows": rows}
    if args.out:
        table = ["| mixer | init | KL(teacher‖student) per token | perplexity |", "|---|---|---|---|"]
        table += [f"| {r['mixer']} | {r['init']} | {r['kl_per_token']:.3f} | {r['student_ppl']:,.1f} |" for r in rows]
        write(args.out, result, f"The initialised student against the teacher, by init: {args.teacher}",
              ["\n".join(table), "", f"Teacher perplexity on the same tokens: {rows[0]['teacher_ppl']:.2f}."],
              notes=(f"{args.tokens:,} tokens of `{result['data']}` in windows of {args.window}; untrained "
                     f"students; {args.threads} threads",))
