"""Teacher -> student: a Llamba model with the teacher's embedding, MLPs, norms and head, and fresh mixers."""

from __future__ import annotations

import torch

from llamba.model import LlambaConfig, LlambaForCausalLM
from llamba.model.config import DEFAULT_MIXER, check_attention_layers, check_mixer
from llamba.teacher import check_llama_family

INITS = ("identity", "attention", "attention-calibrated")


def teacher_head_dim(tc) -> int:
    return getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads


def attention_cfg_from_teacher(tc) -> dict:
    """The shape of the teacher's attention, as ``LlambaConfig.attention_cfg``."""
    rope = getattr(tc, "rope_parameters", None)
    if not rope:  # transformers < 5: rope_theta and rope_scaling
        rope = {"rope_type": "default", **(getattr(tc, "rope_scaling", None) or {}),
                "rope_theta": getattr(tc, "rope_theta", 10000.0)}
    return {"num_attention_heads": tc.num_attention_heads, "num_key_value_heads": tc.num_key_value_heads,
            "head_dim": teacher_head_dim(tc), "attention_bias": bool(getattr(tc, "attention_bias", False)),
            "max_position_embeddings": tc.max_position_embeddings, "rope_parameters": dict(rope)}


def student_config_from_teacher(tc, d_state: int = 64, attention_layers=(), mixer: str | None = None) -> LlambaConfig:
    """One mixer head per teacher query head, of the teacher's head dim; MLP and vocabulary as the teacher's.
    ``attention_layers``: a hybrid, whose layers with these indices keep the teacher's attention. ``mixer``: the
    other layers' mixer (``llamba.model.config.MIXERS``; None: Discrete Mamba-2, whose config names no mixer)."""
    check_llama_family(tc)
    check_mixer(mixer, d_state)
    named = {"mixer": mixer} if mixer and mixer != DEFAULT_MIXER else {}
    attention_layers = check_attention_layers(attention_layers, tc.num_hidden_layers)
    hybrid = {"attention_layers": attention_layers, "attention_cfg": attention_cfg_from_teacher(tc)} if attention_layers else {}
    n_heads = tc.num_attention_heads
    d_inner = n_heads * teacher_head_dim(tc)
    return LlambaConfig(
        d_model=tc.hidden_size,
        n_layer=tc.num_hidden_layers,
        vocab_size=tc.vocab_size,
        tie_embeddings=bool(getattr(tc, "tie_word_embeddings", False)),
        pad_vocab_size_multiple=1,  # keep the teacher's vocabulary exactly, so embedding and head copy 1:1
        norm_epsilon=tc.rms_norm_eps,
        mlp_cfg={"intermediate_size": tc.intermediate_size, "bias": bool(getattr(tc, "mlp_bias", False)), "act_fn": "silu"},
        ssm_cfg={"d_state": d_state, "n_v_heads": n_heads, "n_qk_heads": n_heads, "expand": d_inner / tc.hidden_size,
                 **named},
        bos_token_id=tc.bos_token_id, eos_token_id=tc.eos_token_id, pad_token_id=getattr(tc, "pad_token_id", None),
        **hybrid,
    )


@torch.no_grad()
def student_from_teacher(teacher, d_state: int = 64, init: str = "identity", attention_layers=(),
                         mixer: str | None = None) -> LlambaForCausalLM:
    """``init='identity'``: mixers start as Llamba's pass-through (gate, conv, D); ``'attention'``: additionally
    C <- W_q, B <- W_k / sqrt(head dim), x <- W_v (GQA heads repeated), out_proj <- W_o and D <- 0, so that
    C_t . B_s is the teacher's attention logit q_t . k_s / sqrt(d) (without RoPE) and the mixer starts as the
    teacher's attention with its softmax linearised (MambaInLlama, RADLADS, LoLCATs copy these weights too).
    ``attention_layers``: a hybrid student; those layers keep the teacher's attention, weights copied as they are.
    ``mixer='gateloop'``: GateLoop mixers; with ``init='attention'`` their phase bias is also the teacher's RoPE
    frequencies (phase weight 0), so that with the decay at 1 the mixing matrix is the teacher's linear attention
    *with* RoPE, (q_t R_t) . (k_s R_s) / sqrt(d). With ``'identity'`` the phase starts at Llama's default frequencies
    for d_state (``GateLoopMamba2.reset_parameters_to_identity``). ``'attention-calibrated'``: the attention init
    with each mixer's decay, a constant feature and its output scale set from one teacher forward
    (``llamba.calibrate``)."""
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose one of {INITS}")
    tc = teacher.config
    config = student_config_from_teacher(tc, d_state, attention_layers, mixer)
    dtype = next(teacher.parameters()).dtype
    student = LlambaForCausalLM(config).to(dtype)

    sb, tb = student.backbone, teacher.model
    sb.embedding.weight.copy_(tb.embed_tokens.weight)
    sb.final_layernorm.weight.copy_(tb.norm.weight)
    if not config.tie_embeddings:
        student.lm_head.weight.copy_(teacher.lm_head.weight)
    for s_layer, t_layer in zip(sb.layers, tb.layers):
        s_layer.input_layernorm.weight.copy_(t_layer.input_layernorm.weight)
        s_layer.post_attention_layernorm.weight.copy_(t_layer.post_attention_layernorm.weight)
        s_layer.mlp.load_state_dict(t_layer.mlp.state_dict())
        if config.is_attention_layer(s_layer.mixer.layer_idx):
            s_layer.mixer.load_state_dict(t_layer.self_attn.state_dict())
            continue
        s_layer.mixer.reset_parameters_to_identity()
        if init in ("attention", "attention-calibrated"):
            _init_mixer_from_attention(s_layer.mixer, t_layer.self_attn, tc)
    if init == "attention-calibrated":
        from llamba.calibrate import calibrate_attention_init

        calibrate_attention_init(student, teacher)
    return student.eval()


RESTORE_PARTS = ("layer", "attention")


@torch.no_grad()
def restore_teacher_layers(student, teacher, layers, parts: str = "layer") -> LlambaForCausalLM:
    """A copy of ``student`` in which ``layers`` are the teacher's own layers again and every other weight is the
    student's: how a pure student becomes a hybrid (``--attention-layers auto:K``) and how each layer's worth is
    measured. ``parts='layer'``: attention, MLP and norms come back, because in a student trained after stage 2 the
    MLP and norms have adapted to the mixer before them and the teacher's attention wants the teacher's MLP after
    it. ``parts='attention'``: the attention and the norm before it only, the student's MLP kept (for a student
    whose every weight has trained: there a whole teacher layer no longer fits among the student's)."""
    if parts not in RESTORE_PARTS:
        raise ValueError(f"restore parts={parts!r}: choose one of {RESTORE_PARTS}")
    tc, config = teacher.config, student.config
    layers = check_attention_layers(sorted(set(config.attention_layers) | set(layers)), config.n_layer)
    hybrid = LlambaConfig.from_dict({**config.to_dict(), "attention_layers": layers,
                                     "attention_cfg": config.attention_cfg or attention_cfg_from_teacher(tc)})
    weight = next(student.parameters())
    with torch.device(weight.device):
        out = LlambaForCausalLM(hybrid).to(weight.dtype)
    scope = "" if parts == "layer" else "mixer."  # the input norm's weight is the same key in both layouts
    restored = [f"backbone.layers.{i}.{scope}" for i in layers if not config.is_attention_layer(i)]
    kept = {k: v for k, v in student.state_dict().items() if not k.startswith(tuple(restored))}
    missing, unexpected = out.load_state_dict(kept, strict=False)
    if unexpected or not all(k.startswith(tuple(restored)) for k in missing):  # the two layouts must differ only there
        raise RuntimeError(f"restoring layers {layers}: unexpected keys {unexpected[:3]}, missing {missing[:3]}")
    for i in layers:
        if config.is_attention_layer(i):
            continue
        s_layer, t_layer = out.backbone.layers[i], teacher.model.layers[i]
        s_layer.input_layernorm.load_state_dict(t_layer.input_layernorm.state_dict())
        s_layer.mixer.load_state_dict(t_layer.self_attn.state_dict())
        if parts == "layer":
            s_layer.post_attention_layernorm.load_state_dict(t_layer.post_attention_layernorm.state_dict())
            s_layer.mlp.load_state_dict(t_layer.mlp.state_dict())
    return out.train(student.training)


def _init_mixer_from_attention(mixer, attn, tc) -> None:
    head_dim = teacher_head_dim(tc)
    if mixer.d_state != head_dim or mixer.head_dim != head_dim:
        raise ValueError(f"--init attention needs d_state == head dim == teacher head dim ({head_dim}); "
                         f"got d_state={mixer.d_state}, head dim {mixer.head_dim}")
    n_q, n_kv = tc.num_attention_heads, tc.num_key_value_heads

    def per_query_head(w):  # (n_kv * hd, d) -> (n_q * hd, d): query head h reads kv head h // (n_q / n_kv)
        return w.view(n_kv, head_dim, -1).repeat_interleave(n_q // n_kv, dim=0).reshape(n_q * head_dim, -1)

    d_inner, gn = mixer.d_inner, mixer.n_qk_heads * mixer.d_state
    w = mixer.in_proj.weight
    w[:d_inner] = per_query_head(attn.v_proj.weight)
    w[d_inner:d_inner + gn] = per_query_head(attn.k_proj.weight) / head_dim ** 0.5  # softmax's logit scale
    w[d_inner + gn:d_inner + 2 * gn] = attn.q_proj.weight
    mixer.out_proj.weight.copy_(attn.o_proj.weight)
    mixer.D.zero_()  # attention has no skip: the token's own value reaches the output only through C_t . B_t
    if mixer.rotates:
        inv_freq, scaling = teacher_rope(tc)
        # RoPE multiplies q and k by `scaling` each (1 except for yarn-like types): fold both into B.
        w[d_inner:d_inner + gn] *= scaling ** 2
        mixer.phase_proj.weight.zero_()  # the phase starts input-independent: exactly the teacher's RoPE
        mixer.phase_proj.bias.copy_(inv_freq.to(mixer.phase_proj.bias.dtype).repeat(mixer.n_qk_heads))


def teacher_rope(tc) -> tuple[torch.Tensor, float]:
    """(inv_freq (head dim / 2,), attention_scaling): the teacher's RoPE as transformers' Llama computes it from
    ``rope_theta`` / ``rope_scaling`` (``rope_parameters``). Dim j pairs with dim j + head dim / 2 (rotate_half),
    the GateLoop mixer's pairing, so inv_freq is its phase bias as it stands. Types whose frequencies change with
    the sequence length ('dynamic') give their short-context frequencies, which a fixed bias can only follow."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rotary = LlamaRotaryEmbedding(tc)
    return rotary.inv_freq.detach().to(torch.float64), float(rotary.attention_scaling)