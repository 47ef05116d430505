"""The recurrent inference cache: constant size per layer, whatever the context length."""

from __future__ import annotations

import torch

from llamba.ops.ssd.naive import state_dtype


class LlambaCache:
    """Per layer: the last ``d_conv - 1`` raw conv inputs (model dtype) and the SSM state (float32, float64 for a
    float64 model). Preallocated once, then updated in place, so captured CUDA graphs stay valid."""

    is_compileable = False  # transformers' generate() asks; our CUDA-graph path lives in llamba.generation

    def __init__(self, config, batch_size: int, dtype: torch.dtype = torch.float32, device=None):
        k = config.ssm_cfg["d_conv"]
        self.conv_states = torch.zeros(config.n_layer, batch_size, config.conv_dim, k - 1, dtype=dtype, device=device)
        self.ssm_states = torch.zeros(
            config.n_layer, batch_size, config.n_v_heads, config.head_dim, config.d_state,
            dtype=state_dtype(dtype), device=device)
        self.seen_tokens = 0

    @property
    def batch_size(self) -> int:
        return self.conv_states.shape[1]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def reset(self) -> None:
        self.conv_states.zero_()
        self.ssm_states.zero_()
        self.seen_tokens = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: keep the rows named by ``beam_idx``."""
        self.conv_states.copy_(self.conv_states[:, beam_idx.to(self.conv_states.device)])
        self.ssm_states.copy_(self.ssm_states[:, beam_idx.to(self.ssm_states.device)])

    def nbytes(self) -> int:
        return self.conv_states.nbytes + self.ssm_states.nbytes
