"""The three MOHAWK stages: what the teacher provides, what the student trains, and the loss.

1. Matrix orientation: each student mixer, fed the teacher's (normed) input to its layer, materializes its mixing
   matrix; loss = Frobenius norm of (student matrix - teacher attention) per (batch, head), averaged, summed over
   layers. Only what shapes the matrix trains (in_proj, conv, D).
2. Hidden-state alignment: each student block takes the teacher's input to its layer; loss = L2 norm per token of
   (block output - teacher's output of that layer), averaged, summed over layers. Whole block, or mixer only.
   With ``align: attention`` the target is the teacher's attention output instead, and only the mixer runs and
   trains (RADLADS' attention alignment: the mixer learns to stand in for the attention it replaces, on the
   teacher's own residual stream, with no MLP between it and its target).
3. Knowledge distillation: the whole student end to end; loss = soft-target cross-entropy against the teacher's
   logits at temperature tau (times tau^2 so gradients keep their size when tau changes). It equals the forward
   KL(teacher || student) plus the teacher's entropy, which does not depend on the student.

Each stage is an ``nn.Module`` whose forward returns the loss, so one DDP wrapper serves all three.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llamba.distill.data import Batch
from llamba.distill.losses import linear_soft_cross_entropy

STAGES = (1, 2, 3)
STAGE_NAMES = {1: "matrix orientation", 2: "hidden-state alignment", 3: "knowledge distillation"}


@dataclass
class TeacherTargets:
    hidden_in: tuple | None = None     # per layer: the hidden state entering that layer (b, L, d)
    hidden_out: tuple | None = None    # per layer: that layer's output (b, L, d), before the final norm
    attention_out: tuple | None = None  # per layer: the self-attention's output (b, L, d), after o_proj
    attentions: tuple | None = None    # per layer: post-softmax attention (b, H, L, L), GQA expanded
    logits: torch.Tensor | None = None


def set_attention(teacher, implementation: str) -> None:
    if getattr(teacher.config, "_attn_implementation", None) != implementation:
        teacher.set_attn_implementation(implementation)


def _first(output):
    return output[0] if isinstance(output, tuple) else output


# transformers' attention implementations the teacher may run in stages 2-3 (stage 1 needs the probabilities: eager)
TEACHER_ATTENTION = ("sdpa", "flex_attention", "eager")


@torch.no_grad()
def teacher_targets(teacher, batch: Batch, stage: int, attention_outputs: bool = False,
                    attention: str = "sdpa") -> TeacherTargets:
    """Run the teacher on a packed batch. ``position_ids`` restart at each document, which makes transformers
    build a block-diagonal causal mask: the teacher never attends across documents, like the student's resets.
    ``attention_outputs`` (stages 1-2) also catches each layer's attention output. ``attention``: the teacher's
    implementation in stages 2-3 (``flex_attention`` skips the mask's empty blocks, where SDPA is handed a dense
    block-diagonal mask)."""
    if attention not in TEACHER_ATTENTION:
        raise ValueError(f"teacher_attention {attention!r}: choose one of {TEACHER_ATTENTION}")
    kwargs = dict(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False)
    if stage == 3:
        set_attention(teacher, attention)
        return TeacherTargets(logits=teacher(**kwargs).logits)
    set_attention(teacher, "eager" if stage == 1 else attention)
    layers = teacher.model.layers
    last, attention_out = {}, [None] * len(layers)
    # hidden_states[-1] is after the final norm, so the last layer's raw output is caught with a hook.
    hooks = [layers[-1].register_forward_hook(lambda m, i, o: last.__setitem__("out", _first(o)))]
    if attention_outputs:
        hooks += [layer.self_attn.register_forward_hook(lambda m, i, o, k=k: attention_out.__setitem__(k, _first(o)))
                  for k, layer in enumerate(layers)]
    try:
        out = teacher.model(**kwargs, output_hidden_states=True, output_attentions=stage == 1)
    finally:
        for hook in hooks:
            hook.remove()
    hidden_in = tuple(out.hidden_states[: len(layers)])
    return TeacherTargets(hidden_in=hidden_in, hidden_out=hidden_in[1:] + (last["out"],),
                          attentions=tuple(out.attentions) if stage == 1 else None,
                          attention_out=tuple(attention_out) if attention_outputs else None)


def _wide(x: torch.Tensor) -> torch.Tensor:
    """At least float32 for losses (bf16 under autocast); a float64 model stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def frobenius_loss(student_matrix: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """mean over (batch, head) of ||T - A||_F over the (L, L) matrices."""
    diff = student_matrix - attention.to(student_matrix.dtype)
    return diff.pow(2).sum(dim=(-2, -1)).sqrt().mean()


def hidden_loss(student_out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean over tokens of the L2 norm of the difference."""
    return (_wide(student_out) - _wide(target).to(_wide(student_out).dtype)).norm(dim=-1).mean()


def soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """mean over tokens of -sum_v softmax(t / tau) log_softmax(s / tau), times tau^2. The plain twin of
    ``llamba.distill.losses.linear_soft_cross_entropy``, which never holds the student's logits."""
    log_s = F.log_softmax(_wide(student_logits) / temperature, dim=-1)
    t = F.softmax(_wide(teacher_logits).to(log_s.dtype) / temperature, dim=-1)
    return -(t * log_s).sum(-1).mean() * temperature ** 2


def mixer_layer_indices(student, stage: str) -> list[int]:
    """The layers stages 1 and 2 train: all but a hybrid's attention layers, which are the teacher's own already.
    Stage 2 must leave them alone too: their block-output loss is ~0, but an L2 norm's gradient is a unit vector
    whatever the size of the (rounding) difference, and Adam would walk the teacher's attention at the full rate."""
    indices = [i for i in range(len(student.backbone.layers)) if not student.config.is_attention_layer(i)]
    if not indices:
        raise ValueError(f"{stage}: every layer of this hybrid is attention, so there is no mixer to train; run "
                         "stage 3 only (--stages 3)")
    return indices


def orientation_loss(block, h: torch.Tensor, attention: torch.Tensor, seq_idx: torch.Tensor) -> torch.Tensor:
    """Stage 1's loss for one layer: its mixing matrix on the teacher's input against the teacher's attention."""
    return frobenius_loss(block.mixer.mixing_matrix(block.input_layernorm(h), seq_idx=seq_idx), attention)


class MatrixOrientation(nn.Module):
    """``compile``: the per-layer loss through torch.compile, which fuses the (batch, H, L, L) elementwise work
    (decays, mask, the difference and its norm) that dominates the stage; one graph serves every layer (their
    parameters are the graph's inputs), and the blocks' own forward, which ``compile: blocks`` compiles, is not
    what stage 1 runs."""

    def __init__(self, student, compile: bool = False):
        super().__init__()
        self.layers = student.backbone.layers
        self.trained = mixer_layer_indices(student, "stage 1 (matrix orientation)")
        self.layer_loss = torch.compile(orientation_loss) if compile else orientation_loss

    def trainable(self):
        for i in self.trained:  # out_proj and the gate do not shape the matrix: they wait for stage 2
            yield from self.layers[i].mixer.matrix_parameters()

    def forward(self, targets: TeacherTargets, seq_idx: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
        per_layer = [self.layer_loss(self.layers[i], targets.hidden_in[i], targets.attentions[i], seq_idx)
                     for i in self.trained]
        return torch.stack(per_layer).sum(), per_layer


ALIGN_TARGETS = ("block", "attention")


class HiddenStateAlignment(nn.Module):
    """``align='block'``: block output against the teacher layer's output (whole block, or ``mixer_only``);
    ``align='attention'``: mixer output against the teacher's attention output (the mixer alone trains)."""

    def __init__(self, student, mixer_only: bool = False, align: str = "block", pieces=None):
        super().__init__()
        if align not in ALIGN_TARGETS:
            raise ValueError(f"stage 2 align={align!r}: choose one of {ALIGN_TARGETS}")
        self.layers = student.backbone.layers
        self.trained = mixer_layer_indices(student, "stage 2 (hidden-state alignment)")
        self.align = align
        self.mixer_only = mixer_only or align == "attention"
        self.pieces = pieces  # llamba.model.functional pieces for the blocks' norms and MLPs (None: the modules)

    def trainable(self):
        for i in self.trained:
            yield from (self.layers[i].mixer if self.mixer_only else self.layers[i]).parameters()

    def forward(self, targets: TeacherTargets, seq_idx: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
        per_layer = []
        for i in self.trained:
            block, h = self.layers[i], targets.hidden_in[i]
            if self.align == "attention":
                out, target = block.mixer(block.input_layernorm(h), seq_idx=seq_idx), targets.attention_out[i]
            else:
                out, target = block(h, seq_idx=seq_idx, pieces=self.pieces), targets.hidden_out[i]
            per_layer.append(hidden_loss(out, target))
        return torch.stack(per_layer).sum(), per_layer


KD_LOSSES = ("chunked", "plain")


class KnowledgeDistillation(nn.Module):
    """``loss='chunked'``: the head and the loss in row chunks from the last hidden state (``losses``), never
    holding the student's logits; ``'plain'``: soft cross-entropy on ``student(...).logits``, its reference."""

    def __init__(self, student, temperature: float = 1.0, freeze_mlp: bool = False, freeze_embeddings: bool = False,
                 loss: str = "chunked", pieces=None, freeze_attention: bool = False):
        super().__init__()
        self.pieces = pieces  # for the chunked path's backbone (the plain path is the reference: modules)
        if loss not in KD_LOSSES:
            raise ValueError(f"stage 3 loss={loss!r}: choose one of {KD_LOSSES}")
        self.student = student
        self.temperature = temperature
        self.loss = loss
        self.freeze_mlp = freeze_mlp
        self.freeze_embeddings = freeze_embeddings
        # a hybrid's kept attention layers (q/k/v/o) as the teacher's: recall is their job, and the rest adapts to them
        self.freeze_attention = freeze_attention

    def trainable(self):
        frozen = set()
        if self.freeze_attention:
            frozen |= {id(p) for i, block in enumerate(self.student.backbone.layers)
                       if self.student.config.is_attention_layer(i) for p in block.mixer.parameters()}
        if self.freeze_mlp:
            frozen |= {id(p) for block in self.student.backbone.layers for p in block.mlp.parameters()}
        if self.freeze_embeddings:
            frozen |= {id(p) for p in self.student.get_input_embeddings().parameters()}
            frozen |= {id(p) for p in self.student.get_output_embeddings().parameters()}
        return (p for p in self.student.parameters() if id(p) not in frozen)

    def forward(self, targets: TeacherTargets, seq_idx: torch.Tensor, input_ids: torch.Tensor):
        if self.loss == "plain":
            logits = self.student(input_ids, seq_idx=seq_idx).logits
            return soft_cross_entropy(logits, targets.logits, self.temperature), []
        h, _ = self.student.backbone(input_ids, seq_idx=seq_idx, pieces=self.pieces)
        head = self.student.lm_head
        vocab = self.student.config.vocab_size  # the head's padding rows are no token: logits() cuts them too
        bias = None if head.bias is None else head.bias[:vocab]
        return linear_soft_cross_entropy(h, head.weight[:vocab], bias, targets.logits, self.temperature), []


COMPILE_MODES = ("blocks", "pieces")


def compile_setting(value) -> str | None:
    """The recipe's ``compile``: false/None (eager), true or "blocks" (each student block compiled whole), "pieces"
    (the norms, residuals and SwiGLU compiled, as the decode engine's ``llamba.model.functional`` pieces)."""
    if value in (None, False):
        return None
    if value is True:
        return "blocks"
    if value not in COMPILE_MODES:
        raise ValueError(f"compile: {value!r}: choose false, true, or one of {COMPILE_MODES}")
    return value


def stage_module(stage: int, student, cfg: dict) -> nn.Module:
    from llamba.model.functional import compiled_pieces

    pieces = compiled_pieces() if compile_setting(cfg.get("compile")) == "pieces" else None
    if stage == 1:
        return MatrixOrientation(student, compile=compile_setting(cfg.get("compile")) is not None)
    if stage == 2:
        return HiddenStateAlignment(student, mixer_only=cfg.get("mixer_only", False), align=cfg.get("align", "block"),
                                    pieces=pieces)
    if stage == 3:
        return KnowledgeDistillation(student, cfg.get("temperature", 1.0), cfg.get("freeze_mlp", False),
                                     cfg.get("freeze_embeddings", False), cfg.get("loss", "chunked"), pieces,
                                     cfg.get("freeze_attention", False))
    raise ValueError(f"unknown stage {stage}; stages are {STAGES}")


def stage_targets(teacher, batch: Batch, stage: int, cfg: dict) -> TeacherTargets:
    """What the teacher must provide for this stage's settings."""
    return teacher_targets(teacher, batch, stage, attention_outputs=stage == 2 and cfg.get("align") == "attention",
                           attention=cfg.get("teacher_attention", "sdpa"))


def run_stage_module(module: nn.Module, stage: int, targets: TeacherTargets, batch: Batch):
    if stage == 3:
        return module(targets, batch.seq_idx, batch.input_ids)
    return module(targets, batch.seq_idx)

