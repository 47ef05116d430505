"""One training loop for every MOHAWK stage: token-denominated batches with gradient accumulation, AdamW with a
warmup-stable-decay schedule, bf16 autocast over fp32 master weights (CUDA), gradient clipping, NaN/inf skipping,
and atomic checkpoints, written on a thread, that resume exactly (weights, optimizer, sampler position:
``train_state``)."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch

from llamba.distill import distributed, train_state
from llamba.distill.data import PackedTokens, Sampler
from llamba.distill.stages import STAGE_NAMES, compile_setting, run_stage_module, stage_module, stage_targets

CRASH_ENV = "LLAMBA_DISTILL_CRASH_AT"  # "STAGE:STEP": die like a kill -9 right after that step (resume tests)


def wsd_lr(step: int, steps: int, peak: float, warmup: float, decay: float, min_ratio: float = 0.0) -> float:
    """Warmup-stable-decay: linear warmup over ``warmup`` of the steps, flat, then linear decay over the last
    ``decay`` of them down to ``min_ratio * peak``. Fractions of the stage's steps."""
    n_warm = max(1, round(warmup * steps)) if warmup > 0 else 0
    n_decay = round(decay * steps)
    if step < n_warm:
        return peak * (step + 1) / n_warm
    if step >= steps - n_decay:
        left = (steps - step) / max(n_decay, 1)  # 1 at the decay's first step, 1/n_decay at the last
        return peak * (min_ratio + (1 - min_ratio) * left)
    return peak


def param_groups(params, weight_decay: float, mixer_params=(), inherited_lr_scale: float = 1.0):
    """Weight decay on matrices only; norms, biases, D and A stay undecayed. Parameters outside ``mixer_params``
    (embeddings, norms, MLPs, head: the teacher's own weights) train at ``inherited_lr_scale`` times the rate:
    the new mixers have everything to learn, the copied weights only a little to adjust, and a rate that suits the
    mixers erodes what the copies know (RADLADS and hybrid-distillation use a 10-15x lower rate for them)."""
    mixer = {id(p) for p in mixer_params}
    groups = []
    for in_mixer, scale in ((True, 1.0), (False, inherited_lr_scale)):
        chosen = [p for p in params if (id(p) in mixer) == in_mixer]
        groups += [{"params": [p for p in chosen if p.dim() >= 2], "weight_decay": weight_decay, "lr_scale": scale},
                   {"params": [p for p in chosen if p.dim() < 2], "weight_decay": 0.0, "lr_scale": scale}]
    return [g for g in groups if g["params"]]


def new_mixer_parameters(student) -> list:
    """The parameters the conversion made new: the recurrent mixers'. A hybrid's attention layers are the teacher's
    own, copied like its MLPs, so they are inherited weights (``inherited_lr_scale``), not new ones."""
    return [p for i, block in enumerate(student.backbone.layers) if not student.config.is_attention_layer(i)
            for p in block.mixer.parameters()]


# -- metrics -----------------------------------------------------------------------------------------------------
class Metrics:
    """JSON lines (always) and TensorBoard (when installed), written by rank 0 only."""

    def __init__(self, out_dir: Path, enabled: bool):
        self.enabled = enabled
        self.path = out_dir / "metrics.jsonl"
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tensorboard"))
            except ImportError:
                pass

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            tokens = row["tokens"]
            for key in ("loss", "lr", "grad_norm", "tokens_per_s"):
                if key in row:
                    self.tb.add_scalar(f"stage{row['stage']}/{key}", row[key], tokens)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _checkpointing_off(model) -> None:
    # transformers >= 5.2x renamed it; keep working with older 5.x (the GPU machine has 5.17)
    off = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
    off()


# -- the loop -----------------------------------------------------------------------------------------------------
def batch_geometry(cfg: dict, world: int) -> tuple[int, int, int]:
    """(accumulation steps, tokens per optimizer step, optimizer steps) for the stage's token budget."""
    per_micro = cfg["micro_batch"] * cfg["seq_len"] * world
    accum = max(1, round(cfg["batch_tokens"] / per_micro))
    step_tokens = per_micro * accum
    return accum, step_tokens, max(1, cfg["tokens"] // step_tokens)


def train_stage(stage: int, student, teacher, data_dir, stage_dir: Path, cfg: dict, d: distributed.Dist,
                metrics: Metrics, log=print) -> dict:
    """Train ``student`` in place for one stage; resumes from ``stage_dir/checkpoint`` when one exists.
    Returns {'steps', 'tokens', 'first_loss', 'last_loss', 'wall_s', 'tokens_per_s', 'tokens_per_s_steady'} (the
    last: from the second step on, without the first step's warm-up)."""
    from tqdm.auto import tqdm

    data = PackedTokens(data_dir, "train", cfg["seq_len"])
    accum, step_tokens, steps = batch_geometry(cfg, d.world)
    sampler = Sampler(len(data), seed=cfg["seed"] * 1000 + stage, rank=d.rank, world=d.world)
    compile_mode, teacher_compile = compile_setting(cfg.get("compile")), bool(cfg.get("teacher_compile"))
    if (compile_mode or teacher_compile) and d.device.type != "cuda":  # measured on CUDA only; inductor on a CPU
        asked = ", ".join(f"{k}: {v}" for k, v in (("compile", compile_mode), ("teacher_compile", teacher_compile))
                          if v)
        log(f"{asked} is for CUDA; on {d.device.type} the models run eager")  # spends minutes compiling
        compile_mode, teacher_compile = None, False
    module = stage_module(stage, student, {**cfg, "compile": compile_mode})
    targets_of = stage_targets
    if teacher_compile and stage in (2, 3):
        # the frozen teacher's forward fused (norms, RoPE, SwiGLU), as a compiled function of this call: the teacher
        # module is untouched. Stage 2's hooks (the last layer's raw output, attention outputs) are registered inside
        # the call, so dynamo traces them into the one graph (tests/test_distill_stages.py); stage 1 needs eager
        # attention's probabilities
        targets_of = torch.compile(stage_targets)
    student.requires_grad_(False)
    params = list({id(p): p for p in module.trainable()}.values())  # tied weights once
    for p in params:
        p.requires_grad_(True)
    low = cfg.get("frozen_dtype") if d.device.type == "cuda" else None
    if low:  # frozen weights need no fp32 master copy: halve their memory (the 8B recipe's stage 3)
        for p in student.parameters():
            if not p.requires_grad:
                p.data = p.data.to(getattr(torch, low))
    student.train()
    if cfg.get("activation_checkpointing") and stage in (2, 3):
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        _checkpointing_off(student)
    if compile_mode == "blocks":
        for block in student.backbone.layers:
            block.compile()
    fused = d.device.type == "cuda"
    mixers = new_mixer_parameters(student)
    groups = param_groups(params, cfg["weight_decay"], mixers, cfg.get("inherited_lr_scale", 1.0))
    optimizer = torch.optim.AdamW(groups, lr=cfg["lr"],
                                  betas=tuple(cfg["betas"]), eps=1e-8, fused=fused)
    wrapped = distributed.wrap(module, d)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=d.device.type == "cuda")

    ckpt_dir = stage_dir / "checkpoint"
    start, history = 0, {"first_loss": None}
    found = train_state.find(ckpt_dir)
    if found is not None:
        state = train_state.load(found, student, optimizer, d.device)
        if state["steps"] != steps or state["step_tokens"] != step_tokens:
            raise ValueError(f"{found} was written for {state['steps']} steps of {state['step_tokens']} tokens, "
                             f"now {steps} of {step_tokens}: same token budget, batch and GPU count are needed to resume "
                             f"(or delete {stage_dir} to restart stage {stage})")
        sampler.load_state_dict(state["sampler"])
        start, history = state["step"], state["history"]
        log(f"stage {stage}: resuming at step {start}/{steps} from {found}")

    n_params = sum(p.numel() for p in params)
    log(f"stage {stage} ({STAGE_NAMES[stage]}): {steps} steps x {step_tokens:,} tokens "
        f"({cfg['micro_batch']} x {cfg['seq_len']} x {d.world} GPU(s) x {accum} accumulation), "
        f"{n_params / 1e6:.1f}M trainable parameters, lr {cfg['lr']}")
    bar = tqdm(total=steps * step_tokens, initial=start * step_tokens, unit="tok", unit_scale=True,
               desc=f"stage {stage}", disable=not d.main, dynamic_ncols=True)
    crash = os.environ.get(CRASH_ENV, "")
    bad_steps, t0, t_start, timed_tokens = 0, time.perf_counter(), time.perf_counter(), 0
    # a resumed stage's time and rate include the calls before it (one that resumes at its last step adds nothing)
    wall_before, tok_s = history.get("wall_s", 0.0), history.get("tokens_per_s_steady", 0.0)
    last_loss = history.get("last_loss")
    writer = train_state.Writer()  # checkpoints on a thread: the disk does not stall the GPU
    try:
        for step in range(start, steps):
            lr = wsd_lr(step, steps, cfg["lr"], cfg["warmup"], cfg["decay"], cfg.get("min_lr_ratio", 0.0))
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            total = torch.zeros((), device=d.device)
            for micro in range(accum):
                batch = data.batch(sampler.next(cfg["micro_batch"])).to(d.device)
                targets = targets_of(teacher, batch, stage, cfg)
                with distributed.no_sync(wrapped, micro == accum - 1), autocast:
                    loss, _ = run_stage_module(wrapped, stage, targets, batch)
                    (loss / accum).backward()
                total += loss.detach().float() / accum
                del targets
            total = distributed.all_mean(total, d)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"])
            loss_value, gnorm = total.item(), grad_norm.item()
            if not (math.isfinite(loss_value) and math.isfinite(gnorm)):
                optimizer.zero_grad(set_to_none=True)
                bad_steps += 1
                log(f"stage {stage} step {step}: loss {loss_value} / grad norm {gnorm} is not finite; step skipped")
                if bad_steps >= cfg.get("max_bad_steps", 3):
                    raise RuntimeError(
                        f"stage {stage}: {bad_steps} non-finite steps in a row (last at step {step}); stopping. "
                        f"Lower the learning rate (now {cfg['lr']}) or check the data/teacher; the last good "
                        f"checkpoint is in {ckpt_dir}")
            else:
                bad_steps = 0
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                last_loss = loss_value
                if history["first_loss"] is None:
                    history["first_loss"] = loss_value
            bar.update(step_tokens)
            now = time.perf_counter()
            timed_tokens += step_tokens
            tok_s = timed_tokens / max(now - t0, 1e-9)
            if step == start + 1:  # the first step pays for warm-up (allocator, compile): time from the second on
                t0, timed_tokens = now, 0
            bar.set_postfix(loss=f"{loss_value:.4g}", lr=f"{lr:.2e}")
            metrics.log({"stage": stage, "step": step + 1, "tokens": (step + 1) * step_tokens, "loss": loss_value,
                         "lr": lr, "grad_norm": gnorm, "tokens_per_s": tok_s, "time": time.time()})
            if step == start + 4 or (steps - start <= 4 and step == steps - 1):
                eta = (steps - step - 1) * step_tokens / max(tok_s, 1e-9)
                log(f"stage {stage}: {tok_s:,.0f} tokens/s after {step + 1 - start} steps; "
                    f"this stage needs ~{eta / 60:.1f} more min")
            done = step + 1 == steps
            if done or (cfg["checkpoint_every"] and (step + 1) % cfg["checkpoint_every"] == 0):
                history.update(last_loss=last_loss, wall_s=wall_before + time.perf_counter() - t_start,
                               tokens_per_s_steady=tok_s)
                if d.main:
                    state = {"step": step + 1, "steps": steps, "step_tokens": step_tokens,
                             "sampler": sampler.state_dict(), "history": history}
                    writer.save(ckpt_dir, student, optimizer, state)
                    if done:  # the stage's last checkpoint is on disk before the stage returns
                        writer.wait()
                distributed.barrier(d)
            if crash == f"{stage}:{step + 1}":
                os._exit(17)
    except BaseException:  # an interrupted stage (Ctrl-C, an error) still leaves the checkpoint it started whole
        writer.wait(raise_error=False)
        raise
    bar.close()
    wall = wall_before + time.perf_counter() - t_start
    _checkpointing_off(student)
    student.requires_grad_(False)
    if low:
        student.float()
    student.eval()
    return {"steps": steps, "tokens": steps * step_tokens, "first_loss": history["first_loss"],
            "last_loss": last_loss, "wall_s": wall, "tokens_per_s": steps * step_tokens / max(wall, 1e-9),
            "tokens_per_s_steady": tok_s}
