"""Batched generation for Llamba: one prefill, then a decode loop that is one captured CUDA graph per batch size.

The recurrent cache has a constant size, so a decode step has fixed shapes and fixed addresses: it is captured
once per (batch size, sampling settings) and replayed for every token. Everything a step needs (the last token,
the write position, finished flags, the repetition-penalty set) lives in device tensors the graph updates
itself, so the loop never waits on the GPU except every ``check_every`` tokens, when it looks whether all rows
have finished and checks stop strings on the host. Off CUDA the same step runs eagerly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llamba.generation.sampling import SamplingParams, seen_tokens_mask, select_tokens, stop_index
from llamba.model.cache import LlambaCache
from llamba.model.config import refuse_hybrid
from llamba.model.mixer import aligned_in_proj, split_in_proj
from llamba.ops.decode import mixer_step


@dataclass
class GenerationOutput:
    sequences: torch.Tensor   # (batch, prompt_len + n): prompt then new tokens, pad after each row's end
    new_tokens: torch.Tensor  # (batch, n)
    lengths: torch.Tensor     # (batch,) new tokens per row, the EOS or stop string's last token included


def _row_view(cache: LlambaCache, rows: slice) -> LlambaCache:
    """A cache over some batch rows of ``cache`` that writes straight into its buffers."""
    view = LlambaCache.__new__(LlambaCache)
    view.conv_states = cache.conv_states[:, rows]
    view.ssm_states = cache.ssm_states[:, rows]
    view.seen_tokens = 0
    return view


def _rms_norm(h, weight, eps: float):
    x = h.to(torch.promote_types(h.dtype, torch.float32))
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)


def _mixer_inputs(h, norm_w, eps, in_w, in_b, splits, in_proj: str):
    """RMSNorm, then in_proj as (xBC, z, A_log); with ``in_proj`` "kernel", as (xBC, z, u): the A_log rows are
    left to the fused decode kernel, which computes them from u (``_in_proj_route``)."""
    u = _rms_norm(h, norm_w, eps)
    if in_proj == "split":
        return split_in_proj(u, in_w, in_b, splits[0], splits[1])
    if in_proj == "kernel":
        return (*aligned_in_proj(u, in_w, in_b, splits[0], splits[1]), u)
    return torch.split(F.linear(u, in_w, in_b), splits, dim=-1)


def _in_proj_route(batch_size: int, device: torch.device) -> str:
    """How a decode step runs in_proj, whose last rows (A_log, one per head) seldom leave its width a multiple of
    8 (see ``split_in_proj``): "one" GEMM; "split", an aligned GEMM and a tiny one for A_log; or "kernel", the
    aligned GEMM with A_log computed inside the fused decode kernel."""
    if device.type != "cuda":
        return "one"
    # Whole decode steps of the SmolLM2-135M student on an H100, side by side (benchmarks/decode_in_proj.py): the
    # kernel route was 1.02x / 1.13x / 1.13x / 1.07x / 1.02x faster than the best other at batch 1 / 8 / 64 / 256 /
    # 1024 ("split" beat "one" by 1.13-1.21x from batch 256 on).
    return "kernel"


def _block_tail(h, y, out_w, out_b, norm_w, eps, gate_w, gate_b, up_w, up_b, down_w, down_b):
    h = h + F.linear(y, out_w, out_b)
    u = _rms_norm(h, norm_w, eps)
    return h + F.linear(F.silu(F.linear(u, gate_w, gate_b)) * F.linear(u, up_w, up_b), down_w, down_b)


def tail_weights(out_proj, norm, eps: float, mlp) -> tuple:
    """``_block_tail``'s weights after (h, y) for one block: its output projection, post-mixer norm and SwiGLU."""
    return (out_proj.weight, out_proj.bias, norm.weight, eps, mlp.gate_proj.weight, mlp.gate_proj.bias,
            mlp.up_proj.weight, mlp.up_proj.bias, mlp.down_proj.weight, mlp.down_proj.bias)


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


def _logits_head(h, norm_w, eps, lm_w, lm_b, vocab: int):
    return F.linear(_rms_norm(h, norm_w, eps), lm_w, lm_b)[:, -1, :vocab]


_COMPILED = None


def _compiled_pieces():
    """The three pieces compiled once per process, dynamic in the batch size (the Triton step stays outside)."""
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = tuple(torch.compile(f, dynamic=True) for f in (_mixer_inputs, _block_tail, _logits_head))
    return _COMPILED


class Decoder:
    """Static buffers and (on CUDA) the captured decode step for one batch size and sampling setting."""

    def __init__(self, model, batch_size: int, params: SamplingParams, eos_ids: tuple[int, ...], pad_id: int,
                 capacity: int, use_graph: bool, compile: bool = False):
        refuse_hybrid(model.config, "the CUDA generation engine (llamba.generation)")
        self.model, self.params, self.pad_id = model, params, pad_id
        device = model.backbone.embedding.weight.device
        vocab = model.config.vocab_size
        self.cache = model.allocate_cache(batch_size)
        self.tok = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.out = torch.full((batch_size, capacity), pad_id, dtype=torch.long, device=device)
        self.finished = torch.zeros(batch_size, dtype=torch.bool, device=device)
        self.eos = torch.tensor(eos_ids, dtype=torch.long, device=device) if eos_ids else None
        self.seen = (torch.zeros(batch_size, vocab, dtype=torch.bool, device=device)
                     if params.repetition_penalty != 1.0 else None)
        self.graph = None
        mixer = model.backbone.layers[0].mixer
        self._splits = [mixer.d_inner + 2 * mixer.n_qk_heads * mixer.d_state, mixer.d_inner, mixer.n_v_heads]
        self._in_proj = _in_proj_route(batch_size, device)
        main = self._splits[0] + self._splits[1]  # in_proj's A_log rows, for the "kernel" route and the prefill
        self._a_proj = [(layer.mixer.in_proj.weight[main:],
                         None if layer.mixer.in_proj.bias is None else layer.mixer.in_proj.bias[main:])
                        for layer in model.backbone.layers]
        self._pieces = (_compiled_pieces() if compile else (_mixer_inputs, _block_tail, _logits_head))
        self._logits = self._decode_logits
        if use_graph:
            self._capture()

    @property
    def capacity(self) -> int:
        return self.out.shape[1]

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

    def _prefill_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                        cache: LlambaCache) -> torch.Tensor:
        """Last-position logits of prompts (b, T) that start ``cache``: the model's forward, with the same pieces
        as the decode step around each mixer (compiled with ``compile``: the norms, residuals and SwiGLU as a few
        fused kernels instead of a dozen eager ones per layer), and the head on the last position only."""
        backbone, (pre, tail, head) = self.model.backbone, self._pieces
        h = backbone.embedding(input_ids)
        for layer, a_proj in zip(backbone.layers, self._a_proj):
            mixer, norm, norm2 = layer.mixer, layer.input_layernorm, layer.post_attention_layernorm
            # in_proj as split_in_proj runs it (an aligned GEMM, then the A_log rows apart), with those rows' weight
            # cut once ahead: Inductor failed to compile the cut inside, with dynamic shapes
            xBC, z, u = pre(h, norm.weight, norm.eps, mixer.in_proj.weight, mixer.in_proj.bias, self._splits,
                            "kernel")
            y = mixer.mix(xBC, z, F.linear(u, *a_proj), cache, attention_mask=attention_mask)
            h = tail(h, y, *tail_weights(mixer.out_proj, norm2, norm2.eps, layer.mlp))
        cache.seen_tokens += input_ids.shape[1]
        final = backbone.final_layernorm
        return head(h[:, -1:], final.weight, final.eps, self.model.lm_head.weight, self.model.lm_head.bias,
                    self.model.config.vocab_size)

    def _decode_logits(self, tok: torch.Tensor) -> torch.Tensor:
        """The model's single-token recurrent path (what ``model(tok, past_key_values=cache)`` runs for a
        continuing cache). Between the fused Triton mixer steps, each piece is a function of tensors only, so
        with ``compile`` one compiled kernel set serves every layer and batch size."""
        backbone, (pre, tail, head) = self.model.backbone, self._pieces
        h = backbone.embedding(tok[:, None])
        for i, layer in enumerate(backbone.layers):
            mixer, norm, norm2 = layer.mixer, layer.input_layernorm, layer.post_attention_layernorm
            xBC, z, A_log = pre(h, norm.weight, norm.eps, mixer.in_proj.weight, mixer.in_proj.bias, self._splits,
                                self._in_proj)
            A_log = (A_log[:, 0], *self._a_proj[i]) if self._in_proj == "kernel" else A_log[:, 0]  # u, or A_log
            y = mixer_step(xBC[:, 0], z[:, 0], A_log, self.cache.conv_states[i], self.cache.ssm_states[i],
                           mixer.conv1d.weight, mixer.conv1d.bias, mixer.D, mixer.z_bias, mixer.n_qk_heads)
            h = tail(h, y[:, None], *tail_weights(mixer.out_proj, norm2, norm2.eps, layer.mlp))
        final = backbone.final_layernorm
        return head(h, final.weight, final.eps, self.model.lm_head.weight, self.model.lm_head.bias,
                    self.model.config.vocab_size)

    def step(self) -> None:
        logits = self._logits(self.tok)
        self._record(select_tokens(logits, self.seen, self.params))

    def _capture(self) -> None:
        # Warm-up (and compilation) and capture run real steps on scratch state; start() resets everything.
        with torch.no_grad():
            self.graph = capture_graph(self.step, warmups=2)

    @torch.no_grad()
    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, prefill_rows: int) -> None:
        """Prefill the cache with the (left-padded) prompts and choose each row's first new token."""
        batch = input_ids.shape[0]
        self.cache.reset()
        self.out.fill_(self.pad_id)
        self.finished.zero_()
        self.pos.zero_()
        logits = []
        for r0 in range(0, batch, prefill_rows):
            rows = slice(r0, min(batch, r0 + prefill_rows))
            view = _row_view(self.cache, rows)
            mask = attention_mask[rows] if attention_mask is not None else None
            logits.append(self._prefill_logits(input_ids[rows], mask, view))
        self.cache.seen_tokens = input_ids.shape[1]
        if self.seen is not None:
            self.seen.copy_(seen_tokens_mask(input_ids, attention_mask, self.seen.shape[1]))
        self._record(select_tokens(torch.cat(logits), self.seen, self.params))

    def advance(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self.step()
        self.cache.seen_tokens += 1


_DECODERS_ATTR = "_llamba_decoders"


def _decoder_for(model, batch, params, eos_ids, pad_id, max_new_tokens, use_graph, compile=False) -> Decoder:
    """Decoders (and their graphs) are kept on the model, one per batch size and setting, and reused."""
    decoders = model.__dict__.setdefault(_DECODERS_ATTR, {})
    key = (batch, params, eos_ids, pad_id, use_graph, compile)
    dec = decoders.get(key)
    if dec is None or dec.capacity < max_new_tokens:
        decoders.pop(key, None)
        dec = Decoder(model, batch, params, eos_ids, pad_id, max(max_new_tokens, 256), use_graph, compile)
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
    dec = _decoder_for(model, batch, params, eos_ids, pad_id, max_new_tokens, use_cuda_graph, compile)
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
