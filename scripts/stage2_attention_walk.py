"""How far the old stage 2 walked a hybrid's kept attention layers, and what it cost. Until 2026-12-07 stage 2
trained those layers too: their block-output loss starts at 0, but an L2 norm's gradient has unit size however
small the difference, so AdamW moves them at the full rate. This rebuilds that on the CPU: a model equal to the
teacher (every layer attention), whose given layers get stage 2's block-output loss, learning-rate schedule and
AdamW settings (batches of 4 x 256 tokens, not the recipe's 65,536: Adam's step is about the rate whatever the
batch), then KL(teacher || model) on held-out text: the damage those layers brought into stage 3.

    python scripts/stage2_attention_walk.py ../shared/data/corpus [--steps 152] [--lr LR] [--layers 20,23,24,26]
"""

import argparse
import time
from pathlib import Path

import torch

from llamba.convert import student_from_teacher
from llamba.distill.data import Batch, boundaries
from llamba.distill.recipes import load_recipe, stage_config
from llamba.distill.stages import hidden_loss, teacher_targets
from llamba.distill.trainer import param_groups, wsd_lr
from llamba.eval.ppl import read_documents, token_windows
from llamba.metrics import kl_sum, log_probs
from llamba.teacher import load_teacher


@torch.no_grad()
def kl_to_teacher(teacher, model, ids: torch.Tensor) -> float:
    kl, positions = kl_sum(log_probs(teacher(ids).logits), log_probs(model(ids).logits))
    return kl / positions


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("corpus", help="folder with gutenberg-train-07.jsonl.xz and gutenberg-val.jsonl.xz")
    ap.add_argument("--teacher", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=152, help="the recipe's stage 2 has 152")
    ap.add_argument("--lr", type=float, default=None, help="default: the recipe's stage-2 rate")
    ap.add_argument("--layers", default="20,23,24,26")
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = stage_config(load_recipe("smollm2-135m"), 2)  # the schedule and AdamW settings stage 2 trains with
    args.lr = args.lr or cfg["lr"]
    layers = [int(i) for i in args.layers.split(",")]
    teacher, tok = load_teacher(args.teacher, dtype=torch.float32)
    n_layers = teacher.config.num_hidden_layers
    model = student_from_teacher(teacher, d_state=64, attention_layers=list(range(n_layers))).float().eval()
    corpus = Path(args.corpus)
    train = token_windows(read_documents(corpus / "gutenberg-train-07.jsonl.xz", 4_000_000), tok,
                          args.steps * 1024, 256)
    val = token_windows(read_documents(corpus / "gutenberg-val.jsonl.xz", 2_000_000), tok, 8 * 512, 512)
    print(f"KL before: {kl_to_teacher(teacher, model, val):.2e} nats/token (the model is the teacher)")
    blocks = [model.backbone.layers[i] for i in layers]
    params = [p for block in blocks for p in block.parameters()]
    optimizer = torch.optim.AdamW(param_groups(params, cfg["weight_decay"]), lr=args.lr, betas=tuple(cfg["betas"]))
    q0 = [block.mixer.q_proj.weight.detach().clone() for block in blocks]
    model.train()
    t0 = time.time()
    for step in range(args.steps):
        ids = train[4 * step: 4 * step + 4]
        seq_idx, pos = boundaries(ids, tok.eos_token_id)
        with torch.no_grad():
            targets = teacher_targets(teacher, Batch(ids, seq_idx, pos), 2)
        loss = sum(hidden_loss(model.backbone.layers[i](targets.hidden_in[i], seq_idx=seq_idx), targets.hidden_out[i])
                   for i in layers)
        for group in optimizer.param_groups:
            group["lr"] = wsd_lr(step, args.steps, args.lr, cfg["warmup"], cfg["decay"], cfg["min_lr_ratio"])
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"])
        optimizer.step()
        if step % 25 == 0 or step == args.steps - 1:
            moved = max(((b.mixer.q_proj.weight - q).norm() / q.norm()).item() for b, q in zip(blocks, q0))
            print(f"step {step + 1}: loss {loss.item():.3e}, q_proj moved up to {moved:.3f} of its norm "
                  f"({time.time() - t0:.0f} s)", flush=True)
    model.eval()
    print(f"KL after {args.steps} steps at lr {args.lr}: {kl_to_teacher(teacher, model, val):.4f} nats/token")


if __name__ == "__main__":
    main()
