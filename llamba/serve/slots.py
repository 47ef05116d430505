"""Slot models: a served model's cache preallocated for ``n_slots`` sequences, that requests join and leave one at a
time while the others keep decoding. Every kind of model the server runs has the same four calls:

- ``begin(rows)``, then ``prefill(ids, mask)`` for each piece of up to ``prefill_rows`` prompts prefilled together:
  ids (rows, width) left-padded where mask (rows, width) is 0 (None: no padding), into a *staging* cache of those
  rows; returns each row's last-position logits (rows, vocab). Staging keeps a half-prefilled prompt out of the slot
  rows, so that decode steps can run between its pieces (every decode step advances every slot row of the batch it
  runs over). Prompts prefilled together cost about one prompt's kernel launches, which is what a GPU's prefill of
  one prompt at a time is bound by (docs/serving.md).
- ``join(slots, row)``: copies staging row ``row`` into those slot rows (several for ``n`` > 1 choices of one
  prompt): the join at a token boundary. It overwrites whatever a slot held, which is the state reset.
- ``decode(slots, tokens)``: one token for each of ``slots``; returns their next-token logits (len(slots), vocab).
- ``release(slot)``: the slot is free again.

Free rows inside a decode batch compute garbage that no one reads; rows never mix, so it cannot reach the others.
"""

from __future__ import annotations

import torch

from llamba.generation.engine import capture_graph, in_proj_route
from llamba.model import functional as fn
from llamba.model.functional import StepOptions, cache_attention, pieces_for



class LlambaSlots:
    """A float Llamba student (CPU or CUDA): one ``LlambaCache`` of ``n_slots`` rows, decoded as one batch by the
    model's own decode step (``LlambaForCausalLM.step``, what the generation engine captures). On CPU a step runs
    over rows [0, highest busy slot] only (slots are handed out lowest first, so that is the busy ones and a few
    holes); on CUDA, with ``cuda_graph``, over all rows as one captured graph of fixed shape. A hybrid's KV layers
    join the slots: each row writes its keys at its own device-side position, so requests that joined at
    different times share a step; the KV cache holds ``max_context`` positions per slot (a left-padded prompt's
    padding included: the scheduler pads only prompts that still fit). Prompts prefill together through the
    model's own ``prefill`` (left padding masked, as ``generate`` runs a batch) into a staging cache of
    ``prefill_rows`` rows. Steps and prefills run as the generation engine runs them: the norms, residuals and
    SwiGLU through ``llamba.model.functional``'s pieces, compiled with ``compile`` (default on CUDA, as ``llamba
    bench`` times the student), and in_proj by the engine's route for this batch."""

    def __init__(self, model, n_slots: int, max_context: int, cuda_graph: bool | None = None, prefill_rows: int = 1,
                 compile: bool | None = None):
        self.model = model.eval()
        self.n_slots, self.max_context, self.prefill_rows = n_slots, max_context, prefill_rows
        self.vocab_size = model.config.vocab_size
        self.device = model.backbone.embedding.weight.device
        self.options = StepOptions(pieces_for(self.device.type == "cuda" if compile is None else compile),
                                   in_proj_route(n_slots, self.device))
        self.cache = model.allocate_cache(n_slots, max_length=max_context)
        self.staging = model.allocate_cache(prefill_rows, max_length=max_context)
        self._staged = self.staging  # the staging rows of the prompts being prefilled (``begin``)
        self._busy = torch.zeros(n_slots, dtype=torch.bool)
        use_graph = self.device.type == "cuda" if cuda_graph is None else cuda_graph
        self.graph = _DecodeGraph(self) if use_graph else None

    def begin(self, rows: int = 1) -> None:
        self._staged = self.staging.rows(slice(0, rows))  # a view: its count starts at 0, its rows are reset
        self._staged.reset()

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = mask.to(self.device) if mask is not None else None
        return self.model.prefill(ids.to(self.device), self._staged, mask, self.options.pieces).float()

    @torch.inference_mode()
    def join(self, slots: list[int], row: int = 0) -> None:
        for slot in slots:
            self.cache.load_row(slot, self._staged, source_row=row)
            self._busy[slot] = True

    @torch.inference_mode()
    def decode(self, slots: list[int], tokens: list[int]) -> torch.Tensor:
        index = torch.tensor(slots, device=self.device)
        if self.graph is not None:
            return self.graph.run(index, torch.tensor(tokens, device=self.device))
        rows = max(slots) + 1
        tok = torch.zeros(rows, dtype=torch.long, device=self.device)
        tok[index] = torch.tensor(tokens, device=self.device)
        return self.model.step(tok, self.cache.rows(slice(0, rows), seen_tokens=1), self.options)[index].float()

    def release(self, slot: int) -> None:
        self._busy[slot] = False


class _DecodeGraph:
    """The slot batch's decode step captured as one CUDA graph over all ``n_slots`` rows: a static token buffer in,
    static logits out, replayed once per token. Only the model's own decode step is captured, so whatever kernels
    it picks on CUDA (the fused Triton mixer step) are the ones replayed."""

    def __init__(self, slots: LlambaSlots):
        self.tok = torch.zeros(slots.n_slots, 1, dtype=torch.long, device=slots.device)
        view = slots.cache.rows(slice(0, slots.n_slots), seen_tokens=1)

        def step():  # the captured call's logits are the graph's static output
            self.logits = slots.model.step(self.tok[:, 0], view, slots.options)

        with torch.inference_mode():
            self.graph = capture_graph(step, warmups=2)
        slots.cache.reset()  # the warm-up and capture ran real steps on the (empty) slots

    def run(self, index: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        self.tok.zero_()
        self.tok[index, 0] = tokens
        self.graph.replay()
        return self.logits[index].float()


class QuantSlots:
    """The CPU runtime (``llamba.quant.CpuDecoder``: an int8 / int4 artifact, or a float32 student with ``--quant
    none``): one batch-1 cache per slot, all on the same weights, and a decode step is one C call over the busy
    slots' caches (``CpuDecoder.step_batch``: each weight row read once for all of them). A hybrid or GateLoop
    student, whose other blocks run in PyTorch, steps its slots one after another."""

    def __init__(self, decoder, n_slots: int, max_context: int):
        self.decoder = decoder
        self.n_slots, self.max_context = n_slots, max_context
        self.prefill_rows = 1  # the runtime prefills one prompt at a time
        self.vocab_size = decoder.config.vocab_size
        # a hybrid's KV layers hold max_context positions per slot, as LlambaSlots' do (the app admits a request
        # whose prompt and max_tokens fit in max_context)
        self.caches = [decoder.new_cache(max_context) for _ in range(n_slots)]
        self.staging = decoder.new_cache(max_context)

    def begin(self, rows: int = 1) -> None:
        if rows != 1:
            raise ValueError(f"the CPU runtime prefills one prompt at a time, not {rows}")
        self.staging.reset()

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.decoder.prefill(ids[0], cache=self.staging).clone()[None]  # one row, never padded

    def join(self, slots: list[int], row: int = 0) -> None:
        for slot in slots:
            cache = self.caches[slot]
            cache.load_row(0, self.staging)
            cache.seen_tokens = self.staging.seen_tokens

    def decode(self, slots: list[int], tokens: list[int]) -> torch.Tensor:
        return self.decoder.step_batch(tokens, [self.caches[slot] for slot in slots]).clone()

    def release(self, slot: int) -> None:
        pass


class TeacherSlots:
    """A transformers Llama (the teacher, served to compare against) with a static KV cache of ``n_slots`` rows x
    ``max_context`` positions and a position per row, so rows at different lengths decode as one batch (a key is
    visible to a row up to that row's position). transformers' own static cache keeps one position for the whole
    batch, and ``llamba.bench.llama_static`` too, so neither fits slots that join at different times. The layers
    run through the model's own modules (norms, projections, rotary embedding, MLP); attention over the cache is
    ``functional.cache_attention``, as in a hybrid student's decode step, not masked SDPA (docs/serving.md says
    why).

    On CUDA (``cuda_graph``, default there) a decode step is one captured graph of fixed shape, as the student's
    (``_DecodeGraph``) and the GPU benchmark's teacher are: all ``n_slots`` rows over all ``max_context`` keys,
    masked by each row's position, with no host read in it. Without it a step runs the busy rows over the longest
    row's keys only, which costs a host read of the positions per step but less attention on short rows.

    Prompts prefill together in ``prefill_rows`` staging rows after the slots', left-padded as the student's are;
    a row keeps its keys from position 0 (RoPE counts real tokens only) and padding's keys go to one spare column
    past ``max_context``, which no step reads. The norms, residuals and SwiGLU run through the same pieces as the
    student's (``llamba.model.functional``, compiled with ``compile``, default on CUDA), so both are served alike."""

    def __init__(self, model, n_slots: int, max_context: int, cuda_graph: bool | None = None, prefill_rows: int = 1,
                 compile: bool | None = None):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        from llamba.teacher import check_llama_family

        check_llama_family(model.config)
        self._rope = apply_rotary_pos_emb
        cfg = model.config
        self.model = model.eval()
        self.n_slots, self.prefill_rows = n_slots, prefill_rows
        self.max_context = min(max_context, getattr(cfg, "max_position_embeddings", max_context))
        self.vocab_size = cfg.vocab_size
        self.n_q, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_q
        p = next(model.parameters())
        self.device = p.device
        self.pieces = pieces_for(self.device.type == "cuda" if compile is None else compile)
        # rows: the slots, then the staging rows; columns: max_context positions, then padding's spare column
        shape = (cfg.num_hidden_layers, n_slots + prefill_rows, self.n_kv, self.max_context + 1, self.head_dim)
        self.k = torch.zeros(shape, dtype=p.dtype, device=p.device)
        self.v = torch.zeros(shape, dtype=p.dtype, device=p.device)
        self.pos = torch.zeros(n_slots + prefill_rows, dtype=torch.long, device=p.device)  # next position per row
        self.staging = slice(n_slots, n_slots + 1)  # the staging rows in use (``begin``)
        self.tok = torch.zeros(n_slots, 1, dtype=torch.long, device=p.device)  # the fixed-shape step's input
        use_graph = self.device.type == "cuda" if cuda_graph is None else cuda_graph
        self.graph = self._capture() if use_graph else None

    def _forward(self, ids: torch.Tensor, rows: slice, positions: torch.Tensor, keys: int,
                 mask: torch.Tensor, write: torch.Tensor | None = None) -> torch.Tensor:
        """ids (b, L) at ``positions`` (b, L) for the cache rows ``rows`` (b of them), their keys written at
        ``write`` (b, L; default ``positions``); attends over the first ``keys`` cached positions under ``mask``
        (b, 1, L, keys); returns the last position's logits (b, vocab)."""
        write = positions if write is None else write
        m, pieces = self.model.model, self.pieces
        b, L = ids.shape
        row_index = torch.arange(rows.start, rows.stop, device=self.device)[:, None]
        h = m.embed_tokens(ids)
        cos, sin = m.rotary_emb(h, positions)
        for i, layer in enumerate(m.layers):
            attn, norm = layer.self_attn, layer.input_layernorm
            x = pieces.rms_norm(h, norm.weight, norm.variance_epsilon)
            q = attn.q_proj(x).view(b, L, self.n_q, self.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(b, L, self.n_kv, self.head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(b, L, self.n_kv, self.head_dim).transpose(1, 2)
            q, k = self._rope(q, k, cos, sin)
            # (row, position) index pairs: each row writes at its own positions
            self.k[i][row_index, :, write] = k.transpose(1, 2)
            self.v[i][row_index, :, write] = v.transpose(1, 2)
            # a slice of rows reads the cache in place (an index list would copy it every step)
            o = cache_attention(q, self.k[i, rows, :, :keys], self.v[i, rows, :, :keys], mask, attn.scaling)
            post = layer.post_attention_layernorm
            h = pieces.block_tail(h, attn.o_proj(o.transpose(1, 2).reshape(b, L, -1)),
                                  *fn.tail_weights(post, layer.mlp, post.variance_epsilon))
        head = self.model.lm_head
        return pieces.logits_head(h, m.norm.weight, m.norm.variance_epsilon, head.weight, head.bias,
                                  self.vocab_size).float()

    def begin(self, rows: int = 1) -> None:
        self.staging = slice(self.n_slots, self.n_slots + rows)
        self.pos[self.staging] = 0

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        ids = ids.to(self.device)
        real = mask.to(self.device).bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
        start = self.pos[self.staging]
        positions = start[:, None] + real.long().cumsum(1) - 1  # each real token's position in its own row
        end = start + real.sum(1)
        longest = int(end.max())
        if longest > self.max_context:
            raise ValueError(f"the prompt needs {longest} positions; the KV cache holds {self.max_context}")
        write = torch.where(real, positions, self.max_context)  # padding writes the spare column
        positions = positions.clamp(min=0)  # a padded query attends to position 0 (finite; never read)
        keys = torch.arange(longest, device=self.device)
        attend = (keys[None, None, :] <= positions[:, :, None])[:, None]  # (b, 1, L, keys): causal in each row
        logits = self._forward(ids, self.staging, positions, longest, attend, write)
        self.pos[self.staging] = end
        return logits

    @torch.inference_mode()
    def join(self, slots: list[int], row: int = 0) -> None:
        source = self.staging.start + row
        n = int(self.pos[source])
        for slot in slots:
            self.k[:, slot, :, :n].copy_(self.k[:, source, :, :n])
            self.v[:, slot, :, :n].copy_(self.v[:, source, :, :n])
            self.pos[slot] = n

    def _step_all_rows(self) -> torch.Tensor:
        """The fixed-shape step: ``self.tok`` for every slot row at its own position, over all ``max_context`` keys
        (those past a row's position masked); shapes and addresses never change, so it can be captured. A free row
        computes at position 0 and writes there, which the next join overwrites."""
        pos = self.pos[: self.n_slots]
        mask = (torch.arange(self.max_context, device=self.device)[None, :] <= pos[:, None])[:, None, None]
        return self._forward(self.tok, slice(0, self.n_slots), pos[:, None], self.max_context, mask)

    @torch.inference_mode()
    def _capture(self):
        def step():  # the captured call's logits are the graph's static output
            self.logits = self._step_all_rows()

        # (warm-up and capture write keys at position 0 of the free rows: harmless)
        return capture_graph(step, warmups=2)

    @torch.inference_mode()
    def decode(self, slots: list[int], tokens: list[int]) -> torch.Tensor:
        """One token for each of ``slots``. With the graph: every row, replayed. Without: rows [0, highest slot] as
        one batch; a free row among them sits at position 0 (``release``) and writes there, which the next join
        overwrites."""
        index = torch.tensor(slots, device=self.device)
        if self.graph is not None:
            self.tok.zero_()
            self.tok[index, 0] = torch.tensor(tokens, device=self.device)
            self.graph.replay()
            self.pos[index] += 1
            return self.logits[index]
        rows = max(slots) + 1
        pos = self.pos[:rows].clone()
        keys = int(pos.max()) + 1  # attend over the longest row's keys only, not the whole cache
        mask = (torch.arange(keys, device=self.device)[None, :] <= pos[:, None])[:, None, None]
        tok = torch.zeros(rows, 1, dtype=torch.long, device=self.device)
        tok[index, 0] = torch.tensor(tokens, device=self.device)
        logits = self._forward(tok, slice(0, rows), pos[:, None], keys, mask)
        self.pos[index] += 1
        return logits[index]

    def release(self, slot: int) -> None:
        self.pos[slot] = 0
