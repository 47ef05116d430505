"""Batched generation for Llamba: one prefill, then a decode loop that is one captured CUDA graph per batch size.

The decode step is the model's own (``LlambaForCausalLM.step``): the recurrent cache has a constant size and a
hybrid's KV cache is preallocated (``max_length``), so a step has fixed shapes and fixed addresses, and is
captured once per (batch size, sampling settings) and replayed for every token. Everything a step needs (the last
token, the write positions, finished flags, the repetition-penalty set) lives in device tensors the graph updates
itself, so the loop never waits on the GPU except every ``check_every`` tokens, when it looks whether all rows
have finished and checks stop strings on the host. Off CUDA the same step runs eagerly.

What the engine decides is how the model runs: the dense pieces eager or compiled (``llamba.model.functional``)
and the mixers' in_proj route (``in_proj_route``), handed to the model as ``StepOptions``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llamba.generation.sampling import SamplingParams, seen_tokens_mask, select_tokens, stop_index
from llamba.model.cache import LlambaCache
from llamba.model.functional import StepOptions, pieces_for


@dataclass
class GenerationOutput:
    sequences: torch.Tensor   # (batch, prompt_len + n): prompt then new tokens, pad after each row's end
    new_tokens: torch.Tensor  # (batch, n)
    lengths: torch.Tensor     # (batch,) new tokens per row, the EOS or stop string's last token included


def in_proj_route(batch_size: int, device: torch.device) -> str:
    """How a decode step runs in_proj, whose last rows (A_log, one per head) seldom leave its width a multiple of
    8 (see ``split_in_proj``): "one" GEMM; "split", an aligned GEMM and a tiny one for A_log; or "kernel", the
    aligned GEMM with A_log computed inside the fused decode kernel."""
    if device.type != "cuda":
        return "one"
    # Whole decode steps of the SmolLM2-135M student on an H100, side by side (benchmarks/decode_in_proj.py): the
    # kernel route was 1.02x / 1.13x / 1.13x / 1.07x / 1.02x faster than the best other at batch 1 / 8 / 64 / 256 /
    # 1024 ("split" beat "one" by 1.13-1.21x from batch 256 on).
    return "kernel"


def capture_graph(fn, warmups: int = 1) -> torch.cuda.CUDAGraph:
    """``fn`` captured as one CUDA graph, after ``warmups`` calls on a side stream: they compile its kernels and
    settle the allocator, as capture requires."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmups):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def _check_graph_safe(model) -> None:
    rotary = getattr(model.backbone, "rotary_emb", None)
    rope_type = str(getattr(rotary, "rope_type", ""))
    if "dynamic" in rope_type or rope_type == "longrope":
        raise NotImplementedError(
            f"a hybrid with rope_type {rope_type!r} recomputes its RoPE frequencies from host-side lengths, which a "
            "CUDA graph cannot replay: run generate(..., use_cuda_graph=False)")


class Decoder:
    """Static buffers and (on CUDA) the captured decode step for one batch size and sampling setting.

    ``max_length``: the positions a hybrid's KV cache holds (prompt + new tokens; required for a hybrid, ignored
    otherwise). ``in_proj``: the mixers' in_proj route (default: ``in_proj_route`` for this batch and device)."""

    def __init__(self, model, batch_size: int, params: SamplingParams, eos_ids: tuple[int, ...], pad_id: int,
                 capacity: int, use_graph: bool, compile: bool = False, max_length: int | None = None,
                 in_proj: str | None = None):
        self.model, self.params, self.pad_id = model, params, pad_id
        device = model.backbone.embedding.weight.device
        vocab = model.config.vocab_size
        if model.config.is_hybrid and max_length is None:
            raise ValueError("a hybrid's Decoder needs max_length: the positions its KV cache holds (prompt length "
                             "+ new tokens)")
        self.cache = model.allocate_cache(batch_size, max_length=max_length)
        self.tok = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.out = torch.full((batch_size, capacity), pad_id, dtype=torch.long, device=device)
        self.finished = torch.zeros(batch_size, dtype=torch.bool, device=device)
        self.eos = torch.tensor(eos_ids, dtype=torch.long, device=device) if eos_ids else None
        self.seen = (torch.zeros(batch_size, vocab, dtype=torch.bool, device=device)
                     if params.repetition_penalty != 1.0 else None)
        self.graph = None
        self.pieces = pieces_for(compile)
        self.options = StepOptions(self.pieces, in_proj or in_proj_route(batch_size, device))
        if use_graph:
            _check_graph_safe(model)
            self._capture()

    @property
    def capacity(self) -> int:
        return self.out.shape[1]

    @property
    def max_length(self) -> int | None:
        """How many positions the cache holds (None: any number, a pure student's recurrent cache)."""
        return self.cache.max_length

    def check_fits(self, prompt_len: int, max_new_tokens: int) -> None:
        if self.max_length is not None and prompt_len + max_new_tokens > self.max_length:
            raise ValueError(
                f"the prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) need "
                f"{prompt_len + max_new_tokens} positions of the hybrid's KV cache, which holds {self.max_length}: "
                f"build the Decoder with max_length={prompt_len + max_new_tokens} or more")

    def _record(self, nxt: torch.Tensor) -> None:
        """Write the chosen tokens at ``pos`` and update every per-row flag, all on the device."""
        nxt = torch.where(self.finished, self.pad_id, nxt)
        self.out.scatter_(1, self.pos.clamp(max=self.capacity - 1).expand(nxt.shape[0], 1), nxt[:, None])
        if self.eos is not None:
            self.finished |= torch.isin(nxt, self.eos)
        if self.seen is not None:
            self.seen.scatter_(1, nxt[:, None], True)
        self.tok.copy_(nxt)
        self.pos += 1

    def prefill_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                       cache: LlambaCache) -> torch.Tensor:
        """Last-position logits of prompts (b, T) that start ``cache``: the model's prefill with the engine's
        pieces (compiled with ``compile``: the norms, residuals and SwiGLU as a few fused kernels per layer)."""
        return self.model.prefill(input_ids, cache, attention_mask, self.pieces)

    def decode_logits(self, tok: torch.Tensor) -> torch.Tensor:
        """The model's decode step on the engine's cache, with the engine's pieces and in_proj route."""
        return self.model.step(tok, self.cache, self.options)

    def step(self) -> None:
        logits = self.decode_logits(self.tok)
        self._record(select_tokens(logits, self.seen, self.params))

    def _capture(self) -> None:
        # Warm-up (and compilation) and capture run real steps on scratch state; start() resets everything.
        self.cache.reset()
        with torch.no_grad():
            self.graph = capture_graph(self.step, warmups=2)

    @torch.no_grad()
    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, prefill_rows: int) -> None:
        """Prefill the cache with the (left-padded) prompts and choose each row's first new token."""
        batch, length = input_ids.shape
        self.check_fits(length, 1)
        self.cache.reset()
        self.out.fill_(self.pad_id)
        self.finished.zero_()
        self.pos.zero_()
        logits = []
        for r0 in range(0, batch, prefill_rows):
            rows = slice(r0, min(batch, r0 + prefill_rows))
            mask = attention_mask[rows] if attention_mask is not None else None
            logits.append(self.prefill_logits(input_ids[rows], mask, self.cache.rows(rows)))
        self.cache.seen_tokens = length
        self.cache.sync_position()
        if self.seen is not None:
            self.seen.copy_(seen_tokens_mask(input_ids, attention_mask, self.seen.shape[1]))
        self._record(select_tokens(torch.cat(logits), self.seen, self.params))

    def advance(self) -> None:
        if self.max_length is not None and self.cache.seen_tokens >= self.max_length:
            raise ValueError(f"the hybrid's KV cache is full ({self.max_length} positions): build the Decoder with "
                             "a larger max_length")
        if self.graph is not None:
            self.graph.replay()
            self.cache.seen_tokens += 1  # the step's host-side count, which a replay does not run
        else:
            self.step()


_DECODERS_ATTR = "_llamba_decoders"


def _round_up(n: int, multiple: int = 256) -> int:
    return -(-n // multiple) * multiple


def _decoder_for(model, batch, params, eos_ids, pad_id, max_new_tokens, use_graph, compile=False,
                 prompt_len: int = 0) -> Decoder:
    """Decoders (and their graphs) are kept on the model, one per batch size and setting, and reused. A hybrid's
    is rebuilt when its KV cache cannot hold the prompt and the new tokens (sized to a multiple of 256 positions:
    its step attends over the whole preallocated cache, so it is not made larger than needed)."""
    decoders = model.__dict__.setdefault(_DECODERS_ATTR, {})
    key = (batch, params, eos_ids, pad_id, use_graph, compile)
    dec = decoders.get(key)
    needed = prompt_len + max_new_tokens
    hybrid = model.config.is_hybrid
    if dec is None or dec.capacity < max_new_tokens or (hybrid and dec.max_length < needed):
        decoders.pop(key, None)
        dec = None  # free the old graph and cache before allocating the new ones
        dec = Decoder(model, batch, params, eos_ids, pad_id, max(max_new_tokens, 256), use_graph, compile,
                      max_length=_round_up(needed) if hybrid else None)
        decoders[key] = dec
    return dec


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 128,
    *,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    stop_strings: str | list[str] | None = None,
    tokenizer=None,
    use_cuda_graph: bool | None = None,
    check_every: int = 16,
    prefill_rows: int = 64,
    seed: int | None = None,
    compile: bool = False,
) -> GenerationOutput:
    """Generate up to ``max_new_tokens`` for every row of a left-padded batch (``attention_mask`` 0 on padding).

    Rows stop at an ``eos_token_id`` or once their text contains one of ``stop_strings`` (checked on the host
    every ``check_every`` tokens, which needs ``tokenizer``; the tokens after the stop are replaced by padding).
    ``use_cuda_graph``: default on for CUDA models. ``compile``: also ``torch.compile`` the decode step (fewer,
    fused kernels; costs a compilation per new batch size). ``prefill_rows`` bounds how many rows prefill at once.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, length); got shape {tuple(input_ids.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1 (got {max_new_tokens})")
    if isinstance(stop_strings, str):
        stop_strings = [stop_strings]
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need the tokenizer (pass tokenizer=...)")
    params = SamplingParams.from_options(do_sample, temperature, top_k, top_p, min_p, repetition_penalty)
    eos_ids = tuple(sorted({eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())))
    pad_id = pad_token_id if pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
    device = model.backbone.embedding.weight.device
    input_ids = input_ids.to(device)
    attention_mask = attention_mask.to(device) if attention_mask is not None else None
    if use_cuda_graph is None:
        use_cuda_graph = device.type == "cuda"
    if seed is not None:
        torch.manual_seed(seed)

    batch = input_ids.shape[0]
    dec = _decoder_for(model, batch, params, eos_ids, pad_id, max_new_tokens, use_cuda_graph, compile,
                       prompt_len=input_ids.shape[1])
    dec.check_fits(input_ids.shape[1], max_new_tokens)
    dec.start(input_ids, attention_mask, prefill_rows)
    stop_at: dict[int, int] = {}
    checked = 0
    for done in range(1, max_new_tokens + 1):
        if done % check_every == 0 or done == max_new_tokens:
            if stop_strings:
                tokens = dec.out[:, :done].tolist()
                for row in range(batch):
                    if row in stop_at or bool(dec.finished[row]):
                        continue
                    k = stop_index(tokenizer, tokens[row], stop_strings, checked)
                    if k is not None:
                        stop_at[row] = k
                        dec.finished[row] = True
                checked = done
            if bool(dec.finished.all()):
                break
        if done < max_new_tokens:
            dec.advance()
    n = min(done, max_new_tokens)
    new_tokens = dec.out[:, :n].clone()
    for row, k in stop_at.items():
        new_tokens[row, k + 1:] = pad_id
    lengths = torch.full((batch,), n, dtype=torch.long, device=device)
    if eos_ids:
        is_eos = torch.isin(new_tokens, torch.tensor(eos_ids, device=device))
        first = torch.where(is_eos.any(1), is_eos.float().argmax(1) + 1, n)
        lengths = torch.minimum(lengths, first)
    for row, k in stop_at.items():
        lengths[row] = min(int(lengths[row]), k + 1)
    return GenerationOutput(torch.cat([input_ids, new_tokens], dim=1), new_tokens, lengths)
