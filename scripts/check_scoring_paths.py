"""Does a student's LAMBADA score depend on the scoring path? Scores N passages of lambada_openai.jsonl
(``{"context", "continuation"}``) four ways: one plain fp32 forward per passage, the suite's cached batched path
(``llamba.eval.lm.score_continuations``) in fp32 and in bf16, a plain bf16 forward, and on CUDA the batched bf16
path on the PyTorch scan. Prints accuracy and target perplexity of each; they should agree.

    python scripts/check_scoring_paths.py STUDENT_DIR ../shared/data/eval/lambada_openai.jsonl 40 cpu
"""

import json
import math
import sys

import torch

from llamba.checkpoint import load_model
from llamba.eval.lm import score_continuations, score_plain


def summary(tag: str, rows) -> None:
    ll = [row[0][0] for row in rows]
    acc = sum(row[0][1] for row in rows) / len(rows)
    print(f"{tag:>24}: acc {acc:.3f}  target ppl {math.exp(-sum(ll) / len(ll)):,.1f}", flush=True)


def main(path: str, data: str, n: int, device: str) -> None:
    model, tok = load_model(path, dtype=torch.float32, device=device)
    with open(data) as f:
        docs = [json.loads(line) for line, _ in zip(f, range(n))]
    contexts = [tok.encode(d["context"], add_special_tokens=False) for d in docs]
    targets = [[tok.encode(" " + d["continuation"], add_special_tokens=False)] for d in docs]
    summary("plain fp32", [[score_plain(model, c, t[0])] for c, t in zip(contexts, targets)])
    summary("batched fp32", score_continuations(model, contexts, targets))
    model.to(torch.bfloat16)
    summary("batched bf16", score_continuations(model, contexts, targets))
    summary("plain bf16", [[score_plain(model, c, t[0])] for c, t in zip(contexts, targets)])
    if device.startswith("cuda"):
        for layer in model.backbone.layers:
            layer.mixer.kernel_backend = "torch"
        summary("batched bf16, torch scan", score_continuations(model, contexts, targets))


if __name__ == "__main__":
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
