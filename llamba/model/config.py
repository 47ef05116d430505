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
