"""The recurrent inference cache: constant size per mixer layer, whatever the context length; a hybrid's attention
layers add a static, preallocated KV cache of ``max_length`` positions."""

from __future__ import annotations

import copy

import torch

from llamba.model.config import mixer_name
from llamba.ops.ssd.naive import state_dtype

# A hybrid's KV cache length when none is given (generate() sizes it to prompt + new tokens itself).
DEFAULT_MAX_LENGTH = 4096
# Every tensor that holds one row per sequence, and the dimension that indexes the rows: what resetting,
# reordering, viewing, copying and loading rows go through (absent ones are skipped).
ROW_TENSORS = (("conv_states", 1), ("ssm_states", 1), ("phase_states", 1), ("key_cache", 1), ("value_cache", 1),
               ("key_valid", 0), ("n_valid", 0), ("position", 0))


class LlambaCache:
    """Per mixer layer: the last ``d_conv - 1`` raw conv inputs (model dtype) and the SSM state (float32, float64 for
    a float64 model). Preallocated once, then updated in place, so captured CUDA graphs stay valid.

    Per attention layer of a hybrid (``config.attention_layers``): keys and values after RoPE, (batch, kv heads,
    max_length, head dim), plus which cached positions are real tokens (not left padding) and each row's count of
    real tokens (the next RoPE position).

    A GateLoop student (``ssm_cfg.mixer == 'gateloop'``) also keeps each mixer's cumulative phase, (batch, G, N/2) in
    the state dtype: its SSM state is written in the frame of B and C rotated by that phase, so the two go together
    (``phase_states``; None for Discrete Mamba-2, whose cache is unchanged)."""

    is_compileable = False  # transformers' generate() asks; our CUDA-graph path lives in llamba.generation

    def __init__(self, config, batch_size: int, dtype: torch.dtype = torch.float32, device=None,
                 max_length: int | None = None):
        k = config.ssm_cfg["d_conv"]
        self.conv_states = torch.zeros(config.n_layer, batch_size, config.conv_dim, k - 1, dtype=dtype, device=device)
        self.ssm_states = torch.zeros(
            config.n_layer, batch_size, config.n_v_heads, config.head_dim, config.d_state,
            dtype=state_dtype(dtype), device=device)
        self.phase_states = None
        if mixer_name(config) == "gateloop":
            self.phase_states = torch.zeros(config.n_layer, batch_size, config.n_qk_heads, config.d_state // 2,
                                            dtype=state_dtype(dtype), device=device)
        self.seen_tokens = 0
        attention_layers = list(getattr(config, "attention_layers", None) or [])
        self.attention_slot = {layer: slot for slot, layer in enumerate(attention_layers)}
        self.max_length = None
        if attention_layers:
            a = config.attention_cfg
            self.max_length = int(max_length or min(DEFAULT_MAX_LENGTH, a["max_position_embeddings"]))
            shape = (len(attention_layers), batch_size, a["num_key_value_heads"], self.max_length, a["head_dim"])
            self.key_cache = torch.zeros(shape, dtype=dtype, device=device)
            self.value_cache = torch.zeros(shape, dtype=dtype, device=device)
            self.key_valid = torch.zeros(batch_size, self.max_length, dtype=torch.bool, device=device)
            self.n_valid = torch.zeros(batch_size, dtype=torch.long, device=device)
            # Per row, on the device: the KV slot the row's next decode step writes (``seen_tokens`` for rows that
            # started together). ``LlambaForCausalLM.step`` reads and advances it there, so a captured CUDA graph
            # replays a step at the right positions; rows that joined at other times (``llamba serve``'s slots)
            # each keep their own.
            self.position = torch.zeros(batch_size, dtype=torch.long, device=device)

    @property
    def batch_size(self) -> int:
        return self.conv_states.shape[1]

    @property
    def has_attention(self) -> bool:
        return bool(self.attention_slot)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def check_room(self, new_tokens: int, remedy: str | None = None) -> None:
        """ValueError unless a hybrid's KV cache has room for ``new_tokens`` more; ``remedy``: how the caller's
        user gets a longer one (default: allocate it and pass it as past_key_values)."""
        end = self.seen_tokens + new_tokens
        if self.has_attention and end > self.max_length:
            remedy = remedy or (f"allocate a longer one with model.allocate_cache(batch_size, max_length={end}) (or "
                                "larger) and pass it as past_key_values")
            raise ValueError(f"the hybrid's KV cache holds {self.max_length} positions, but {self.seen_tokens} cached "
                             f"+ {new_tokens} new tokens need {end}: {remedy}")

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, kwargs=None):
        """transformers' ``Cache.update`` for ``LlamaAttention``: write the new (batch, kv heads, L, head dim) keys
        and values after the ``seen_tokens`` cached ones and return all of them."""
        slot, start = self.attention_slot[layer_idx], self.seen_tokens
        end = start + key.shape[2]
        self.key_cache[slot, :, :, start:end].copy_(key)
        self.value_cache[slot, :, :, start:end].copy_(value)
        return self.key_cache[slot, :, :, :end], self.value_cache[slot, :, :, :end]

    def _row_tensors(self):
        """(name, tensor, row dimension) of each per-sequence tensor this cache holds (``ROW_TENSORS``)."""
        for name, dim in ROW_TENSORS:
            t = getattr(self, name, None)
            if t is not None:
                yield name, t, dim

    def reset(self) -> None:
        for _, t, _ in self._row_tensors():
            t.zero_()
        self.seen_tokens = 0

    def stepped(self) -> None:
        """After a decode step of one (real) token per row: the count, and a hybrid's real-token counts and
        device-side position (device ops only, so a captured step advances them on replay)."""
        if self.has_attention:
            self.n_valid += 1
            self.position += 1
        self.seen_tokens += 1

    def sync_position(self) -> None:
        """Set the device-side position from ``seen_tokens`` (after a forward, or rows prefilled apart)."""
        if self.has_attention:
            self.position.fill_(self.seen_tokens)

    def rows(self, rows: slice, seen_tokens: int = 0) -> "LlambaCache":
        """A cache over batch rows ``rows`` that reads and writes this one's buffers, a hybrid's per-row positions
        included. ``seen_tokens`` 0 (prefill in row groups: the caller sets this cache's count once every group is
        in) or any count > 0 when the rows continue (``llamba serve`` steps a prefix of its slots with
        ``LlambaForCausalLM.step``, whose KV writes go by each row's own device-side position)."""
        view = copy.copy(self)
        for name, t, dim in self._row_tensors():
            setattr(view, name, t[(slice(None),) * dim + (rows,)])
        view.seen_tokens = seen_tokens
        return view

    def _tensors(self) -> list[torch.Tensor]:
        extra = [self.key_cache, self.value_cache] if self.has_attention else []
        phase = [self.phase_states] if self.phase_states is not None else []
        return [self.conv_states, self.ssm_states, *phase, *extra]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: keep the rows named by ``beam_idx``."""
        for _, t, dim in self._row_tensors():
            t.copy_(t.index_select(dim, beam_idx.to(t.device)))

    def load_row(self, row: int, source: LlambaCache, source_row: int = 0) -> None:
        """Overwrite this cache's row ``row`` with ``source``'s row ``source_row``: every recurrent state (conv,
        SSM, a GateLoop mixer's phase) and a hybrid's keys, values and positions, so the row continues exactly
        where the source's did (``llamba serve``: a request prefilled in a staging cache joins its slot). The
        source has seen ``source.seen_tokens`` positions (its forward's count), which become the row's position."""
        if self.has_attention and source.max_length != self.max_length:
            raise ValueError(f"load_row: a KV cache of {source.max_length} positions into one of "
                             f"{self.max_length}; allocate both with the same max_length")
        for name, t, dim in self._row_tensors():
            t.select(dim, row).copy_(getattr(source, name).select(dim, source_row))
        if self.has_attention:
            self.position[row] = source.seen_tokens  # a forward counts on the host only

    def select_rows(self, rows: torch.Tensor) -> LlambaCache:
        """A new cache whose i-th row is a copy of this one's row ``rows[i]`` (rows may repeat): a context read
        once, then each of its continuations on its own copy (lm-eval scoring). KV included, so a hybrid's
        continuations still see their context."""
        out = copy.copy(self)
        rows = rows.to(self.conv_states.device)
        for name, t, dim in self._row_tensors():  # copies: a step on the new cache must not move this one
            setattr(out, name, t.index_select(dim, rows))
        return out

    def nbytes(self) -> int:
        extra = self.key_valid.nbytes + self.n_valid.nbytes if self.has_attention else 0
        return sum(t.nbytes for t in self._tensors()) + extra
