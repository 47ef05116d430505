"""``LlambaConfig``: the configuration of the official ``cartesia-ai/Llamba-*`` checkpoints, as a HF config."""

from __future__ import annotations

import math

from transformers import PretrainedConfig

DEFAULT_MLP_CFG = {"intermediate_size": 8192, "bias": False, "act_fn": "silu"}
DEFAULT_SSM_CFG = {
    "d_state": 64,
    "n_v_heads": 32,
    "n_qk_heads": 32,
    "expand": 1,
    "chunk_size": 128,
    "activation": "identity",
    "bias": False,
    "d_conv": 4,
    "conv_bias": True,
}
# What a hybrid's softmax-attention layers need (the teacher's Llama attention); filled from the teacher by convert.
DEFAULT_ATTENTION_CFG = {
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "attention_bias": False,
    "max_position_embeddings": 131072,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
}
HYBRID_FIELDS = ("attention_layers", "attention_cfg")
# ssm_cfg["mixer"]: which recurrence the non-attention layers run. Absent means Discrete Mamba-2, so the official
# config.json files (which have no such field) load unchanged and a Discrete Mamba-2 student writes none.
DEFAULT_MIXER = "discrete_mamba2"
MIXERS = (DEFAULT_MIXER, "gateloop")


def check_attention_layers(layers, n_layer: int) -> list[int]:
    """The attention layer indices as a sorted list; ValueError unless they are integers in [0, n_layer), unique."""
    layers = list(layers or [])
    bad = [i for i in layers if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n_layer]
    if bad:
        raise ValueError(f"attention layers {bad}: layer indices must be integers in 0..{n_layer - 1} "
                         f"(the model has {n_layer} layers)")
    if len(set(layers)) != len(layers):
        raise ValueError(f"attention layers {layers}: each index may appear only once")
    return sorted(layers)


def check_mixer(mixer: str | None, d_state: int) -> None:
    """ValueError, saying what to change, for an unknown mixer name or a d_state the mixer cannot have."""
    mixer = mixer or DEFAULT_MIXER
    if mixer not in MIXERS:
        raise ValueError(f"mixer {mixer!r} (ssm_cfg.mixer / --mixer): unknown; choose one of {', '.join(MIXERS)} "
                         f"(none means {DEFAULT_MIXER})")
    if mixer == "gateloop" and d_state % 2:
        raise ValueError(f"d_state={d_state} with the 'gateloop' mixer: it rotates pairs of state dims (dim j with "
                         "dim j + d_state/2, as RoPE pairs them), so d_state must be even; give an even --d-state")


def mixer_name(config) -> str:
    """The mixer of a config's non-attention layers: ssm_cfg["mixer"], Discrete Mamba-2 when absent."""
    return (getattr(config, "ssm_cfg", None) or {}).get("mixer") or DEFAULT_MIXER


class LlambaConfig(PretrainedConfig):
    """Field names follow the cartesia ``config.json`` (``d_model``, ``n_layer``, ``mlp_cfg``, ``ssm_cfg`` ...), so an
    official file loads unchanged; the HF names (``hidden_size``, ``num_hidden_layers``) are aliases."""

    model_type = "llamba"
    attribute_map = {
        "hidden_size": "d_model",
        "num_hidden_layers": "n_layer",
        "rms_norm_eps": "norm_epsilon",
    }

    def __init__(
        self,
        d_model: int = 2048,
        n_layer: int = 16,
        vocab_size: int = 128256,
        tie_embeddings: bool = True,
        pad_vocab_size_multiple: int = 8,
        lm_head_bias: bool = False,
        norm_epsilon: float = 1e-5,
        mlp_cfg: dict | None = None,
        ssm_cfg: dict | None = None,
        attention_layers: list[int] | None = None,
        attention_cfg: dict | None = None,
        **kwargs,
    ):
        self.d_model = d_model
        self.n_layer = n_layer
        self.vocab_size = vocab_size
        self.tie_embeddings = tie_embeddings
        self.pad_vocab_size_multiple = pad_vocab_size_multiple
        self.lm_head_bias = lm_head_bias
        self.norm_epsilon = norm_epsilon
        self.mlp_cfg = {**DEFAULT_MLP_CFG, **(mlp_cfg or {})}
        self.ssm_cfg = {**DEFAULT_SSM_CFG, **(ssm_cfg or {})}
        # Hybrid students: these layers keep the teacher's softmax attention (written to config.json only if any).
        self.attention_layers = check_attention_layers(attention_layers, n_layer)
        self.attention_cfg = {**DEFAULT_ATTENTION_CFG, **(attention_cfg or {})} if self.attention_layers else {}
        kwargs.pop("tie_word_embeddings", None)
        super().__init__(tie_word_embeddings=tie_embeddings, **kwargs)
        self.validate_shapes()

    def validate_shapes(self) -> None:
        ssm = self.ssm_cfg
        if self.mlp_cfg["act_fn"] != "silu":
            raise ValueError(f"mlp_cfg.act_fn={self.mlp_cfg['act_fn']!r}: Llamba MLPs are SwiGLU ('silu')")
        if ssm["activation"] not in ("identity", None):
            raise ValueError(f"ssm_cfg.activation={ssm['activation']!r}: the Discrete Mamba-2 conv has no activation")
        if self.d_inner % ssm["n_v_heads"]:
            raise ValueError(f"d_inner={self.d_inner} is not divisible by ssm_cfg.n_v_heads={ssm['n_v_heads']}")
        if ssm["n_v_heads"] % ssm["n_qk_heads"]:
            raise ValueError(
                f"ssm_cfg.n_v_heads={ssm['n_v_heads']} must be a multiple of ssm_cfg.n_qk_heads={ssm['n_qk_heads']}")
        check_mixer(self.mixer, ssm["d_state"])

    def to_dict(self) -> dict:
        """A pure student's dict (hence config.json) stays exactly the official cartesia one: no hybrid fields."""
        out = super().to_dict()
        if not self.attention_layers:
            for key in HYBRID_FIELDS:
                out.pop(key, None)
        return out

    @property
    def is_hybrid(self) -> bool:
        return bool(self.attention_layers)

    def is_attention_layer(self, layer_idx: int) -> bool:
        return layer_idx in self.attention_layers

    def llama_attention_config(self):
        """A transformers ``LlamaConfig`` with the attention shape, for ``LlamaAttention`` / ``LlamaRotaryEmbedding``."""
        from transformers import LlamaConfig

        a = self.attention_cfg
        cfg = LlamaConfig(
            hidden_size=self.d_model, num_hidden_layers=self.n_layer, vocab_size=self.vocab_size,
            intermediate_size=self.mlp_cfg["intermediate_size"], num_attention_heads=a["num_attention_heads"],
            num_key_value_heads=a["num_key_value_heads"], head_dim=a["head_dim"], attention_bias=a["attention_bias"],
            attention_dropout=0.0, max_position_embeddings=a["max_position_embeddings"],
            rope_parameters=dict(a["rope_parameters"]), rms_norm_eps=self.norm_epsilon)
        cfg._attn_implementation = "sdpa"
        return cfg

    @property
    def mixer(self) -> str:
        return mixer_name(self)

    # Derived sizes, named as in the mixer's equations.
    @property
    def d_inner(self) -> int:
        return int(self.ssm_cfg["expand"] * self.d_model)

    @property
    def n_v_heads(self) -> int:
        return self.ssm_cfg["n_v_heads"]

    @property
    def n_qk_heads(self) -> int:
        return self.ssm_cfg["n_qk_heads"]

    @property
    def d_state(self) -> int:
        return self.ssm_cfg["d_state"]

    @property
    def head_dim(self) -> int:
        return self.d_inner // self.n_v_heads

    @property
    def conv_dim(self) -> int:
        return self.d_inner + 2 * self.n_qk_heads * self.d_state

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_size_multiple or 1
        return int(math.ceil(self.vocab_size / m) * m)
