"""Where a distillation micro-step's GPU time goes (lab diagnostic, one device call, no payload).

For stage 3 (and stage 2 block alignment) of the recipe, on the SmolLM2-135M shape with random bf16 teacher
weights and random packed tokens (speed does not depend on the values): the time of each part of one micro-step
(teacher targets, student forward + loss, backward) with CUDA events, the GPU-busy fraction (is the step bound by
kernel launches?), and torch.profiler's top kernels by CUDA time. Usage:
    python3 tools/device/profile_distill.py [--recipe R] [--stages 3,2] [--steps 3] [--compile]
(without CUDA it runs on the CPU, host-timed: a dry run of the script, not a measurement)
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch


def timed(fn):
    if not torch.cuda.is_available():  # a CPU dry run of this script: host clock
        t0 = time.perf_counter()
        out = fn()
        return out, (time.perf_counter() - t0) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    out = fn()
    end.record()
    torch.cuda.synchronize()
    return out, start.elapsed_time(end)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="results/distill-ablations/proxy.yaml")
    ap.add_argument("--stages", default="3,2")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="compile each student block, as the recipe's compile does")
    args = ap.parse_args()

    from transformers import LlamaConfig, LlamaForCausalLM

    from llamba.bench.distill import random_data
    from llamba.bench.measure import SMOLLM2_135M
    from llamba.convert import student_from_teacher
    from llamba.distill.data import PackedTokens, Sampler
    from llamba.distill.recipes import load_recipe, stage_config
    from llamba.distill.stages import run_stage_module, stage_module, stage_targets

    recipe = load_recipe(args.recipe)
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    teacher = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).to(torch.bfloat16 if dev == "cuda" else torch.float32)
    teacher = teacher.to(dev).eval()
    teacher.requires_grad_(False)
    student0 = student_from_teacher(teacher, d_state=recipe["d_state"], init=recipe["init"]).float().to(dev)
    autocast = torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda")
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = random_data(Path(tmp) / "data", SMOLLM2_135M["vocab_size"], eos=2, tokens=1 << 22)
        for stage in [int(s) for s in args.stages.split(",")]:
            cfg = stage_config(recipe, stage)
            student = copy.deepcopy(student0)
            module = stage_module(stage, student, cfg)
            student.requires_grad_(False)
            for p in module.trainable():
                p.requires_grad_(True)
            student.train()
            if args.compile:
                for block in student.backbone.layers:
                    block.compile()
            data = PackedTokens(data_dir, "train", cfg["seq_len"])
            sampler = Sampler(len(data), seed=0)
            tokens = cfg["micro_batch"] * cfg["seq_len"]

            def micro(parts=None):
                batch = data.batch(sampler.next(cfg["micro_batch"])).to(dev)
                if parts is None:
                    targets = stage_targets(teacher, batch, stage, cfg)
                    with autocast:
                        loss, _ = run_stage_module(module, stage, targets, batch)
                    loss.backward()
                    return
                targets, t_teacher = timed(lambda: stage_targets(teacher, batch, stage, cfg))
                with autocast:
                    (loss, _), t_fwd = timed(lambda: run_stage_module(module, stage, targets, batch))
                _, t_bwd = timed(loss.backward)
                parts.append((t_teacher, t_fwd, t_bwd))

            for _ in range(2):
                micro()
            sync()
            parts = []
            for _ in range(args.steps):
                micro(parts)
            n = len(parts)
            t_teacher, t_fwd, t_bwd = (sum(p[i] for p in parts) / n for i in range(3))
            t0 = time.perf_counter()
            for _ in range(args.steps):
                micro()
            sync()
            wall = (time.perf_counter() - t0) / args.steps * 1e3
            print(f"\n=== stage {stage} ({cfg['micro_batch']} x {cfg['seq_len']} = {tokens} tokens, "
                  f"align {cfg.get('align')}, loss {cfg.get('loss')}, compile {args.compile})")
            print(f"teacher {t_teacher:.1f} ms | student forward+loss {t_fwd:.1f} ms | backward {t_bwd:.1f} ms | "
                  f"sum {t_teacher + t_fwd + t_bwd:.1f} ms | unsynced micro-step {wall:.1f} ms = "
                  f"{tokens / wall * 1e3:,.0f} tok/s (no optimizer)")
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
            with profile(activities=activities) as prof:
                for _ in range(args.steps):
                    micro()
                sync()
            events = prof.key_averages()
            # kernels only: an op's row repeats the device time of the kernels it launched
            gpu_total = sum(e.self_device_time_total for e in prof.events()
                            if e.device_type == torch.autograd.DeviceType.CUDA) / 1e3 / args.steps
            print(f"GPU kernel time per micro-step {gpu_total:.1f} ms of {wall:.1f} ms wall "
                  f"({gpu_total / wall:.0%} busy)")
            key = "self_device_time_total" if dev == "cuda" else "self_cpu_time_total"
            print(events.table(sort_by=key, row_limit=28, max_name_column_width=70))
            student = module = None  # free this stage's copy before the next
            if dev == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
