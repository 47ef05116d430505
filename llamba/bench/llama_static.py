"""The strong Transformer baseline: a Llama (transformers weights) decoded with a preallocated KV cache.

Prefill runs causal SDPA (flash kernels) and computes logits for the last position only; each decode step writes
the new keys/values at a device-side position and attends over the cache with a mask, so the step has fixed
shapes and is captured as one CUDA graph, like the student's. Around attention, prefill and decode run the same
(compiled) dense functions as the student's blocks (``llamba.model.functional``). No key/value head is copied per query head: SDPA reads them
grouped in prefill, and in decode a group's query heads are folded into the query length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llamba.model.functional import pieces_for, tail_weights


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def _decode_rope(q, k, cos_table, sin_table, pos, n_kv: int, head_dim: int):
    """Rotary embedding at position ``pos`` for one token per row: q (b, 1, n_q * head_dim) -> (b, n_kv, groups,
    head_dim), a group's query heads as its query rows; k (b, 1, n_kv * head_dim) -> (b, n_kv, 1, head_dim)."""
    b = q.shape[0]
    cos, sin = cos_table.index_select(0, pos), sin_table.index_select(0, pos)
    return (_rotate(q.view(b, n_kv, -1, head_dim), cos, sin), _rotate(k.view(b, n_kv, 1, head_dim), cos, sin))


def _prefill_rope(q, k, cos, sin, n_q: int, n_kv: int, head_dim: int):
    """Rotary embedding over a prompt, in the projection's layout: q (b, T, n_q * head_dim) -> (b, T, n_q,
    head_dim), k likewise with n_kv."""
    b, T = q.shape[:2]
    cos, sin = cos[:, None], sin[:, None]
    return _rotate(q.view(b, T, n_q, head_dim), cos, sin), _rotate(k.view(b, T, n_kv, head_dim), cos, sin)


def _decode_probs(scores, positions, pos, scale: float):
    """Softmax over the cache positions written so far (<= pos), in float32, returned in the scores' dtype."""
    masked = (scores.float() * scale).masked_fill(positions > pos, float("-inf"))
    return masked.softmax(-1).to(scores.dtype)


_COMPILED_ATTENTION = None


def _compiled_attention():
    """The attention's elementwise work compiled once per process. For a decode step, dynamic in the batch size:
    one kernel for both rotations, one for scale + mask + softmax (the two products over the cache stay cuBLAS:
    Inductor lowered their 3-row products to far slower reductions). For a prefill, the rotations, dynamic only in
    the sizes that change between calls: compiled for any head count and width too, its kernel spent its time on
    index arithmetic over the symbolic sizes and moved its bytes at under a tenth of the copy bandwidth."""
    global _COMPILED_ATTENTION
    if _COMPILED_ATTENTION is None:
        _COMPILED_ATTENTION = (*(torch.compile(f, dynamic=True) for f in (_decode_rope, _decode_probs)),
                               torch.compile(_prefill_rope))
    return _COMPILED_ATTENTION


class StaticLlama:
    def __init__(self, model, batch_size: int, max_len: int, compile: bool = False):
        cfg = model.config
        self.model, self.batch_size, self.max_len = model, batch_size, max_len
        self.n_q = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_q
        p = next(model.parameters())
        shape = (cfg.num_hidden_layers, batch_size, self.n_kv, max_len, self.head_dim)
        self.k = torch.zeros(shape, dtype=p.dtype, device=p.device)
        self.v = torch.zeros(shape, dtype=p.dtype, device=p.device)
        positions = torch.arange(max_len, device=p.device)
        cos, sin = model.model.rotary_emb(self.k[0, :1, 0], positions[None])  # (1, max_len, head_dim)
        self.cos, self.sin = cos[0].to(p.dtype), sin[0].to(p.dtype)
        self.positions = positions
        self.pos = torch.zeros(1, dtype=torch.long, device=p.device)  # next decode position
        self.tok = torch.zeros(batch_size, dtype=torch.long, device=p.device)
        # q, k and v projections as one matrix (attention biases are not supported: Llama has none).
        attns = [layer.self_attn for layer in model.model.layers]
        if any(a.q_proj.bias is not None for a in attns):
            raise ValueError("StaticLlama supports Llama attention without biases")
        self.qkv_weights = [torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]) for a in attns]
        self._splits = [self.n_q * self.head_dim, self.n_kv * self.head_dim, self.n_kv * self.head_dim]
        self._pieces = pieces_for(compile)
        self._attention = _compiled_attention() if compile else (_decode_rope, _decode_probs, _prefill_rope)
        self._decode_logits = self._decode_logits_eager
        self.graph = None

    def kv_bytes_per_token(self) -> int:
        return 2 * self.k.shape[0] * self.n_kv * self.head_dim * self.k.element_size()

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
        """Prompts (b, T) of equal length into cache rows ``rows``; returns last-position logits (b, vocab). The
        dense pieces around attention are the student's prefill pieces (compiled with ``compile``), and SDPA
        reads the grouped key/value heads as they are (``enable_gqa``: no copy per query head)."""
        rows = rows or slice(0, input_ids.shape[0])
        b, T = input_ids.shape
        m = self.model.model
        norm_of, tail, head = self._pieces
        rope = self._attention[2]
        h = m.embed_tokens(input_ids)
        for i, layer in enumerate(m.layers):
            norm, norm2 = layer.input_layernorm, layer.post_attention_layernorm
            u = norm_of(h, norm.weight, norm.variance_epsilon)
            q, k, v = F.linear(u, self.qkv_weights[i]).split(self._splits, dim=-1)
            q, k = (t.transpose(1, 2) for t in rope(q, k, self.cos[:T], self.sin[:T], self.n_q, self.n_kv,
                                                     self.head_dim))
            v = v.view(b, T, self.n_kv, self.head_dim).transpose(1, 2)
            self.k[i, rows, :, :T] = k
            self.v[i, rows, :, :T] = v
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            o = F.linear(o.transpose(1, 2).reshape(b, T, -1), layer.self_attn.o_proj.weight)
            h = tail(h, o, *tail_weights(norm2, layer.mlp, norm2.variance_epsilon))
        return head(h, m.norm.weight, m.norm.variance_epsilon, self.model.lm_head.weight,
                    self.model.lm_head.bias, self.model.config.vocab_size)

    def _decode_logits_eager(self, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """One token for every row. The dense pieces are the very functions the student's decode step uses
        (RMSNorm + one fused projection; out-projection + residual + RMSNorm + SwiGLU + residual; head), and the
        attention's rotations and softmax are compiled too when ``compile``; the attention's two products over the
        cache run as cuBLAS batched products (masked SDPA over the whole cache, with 3 query rows per key/value
        head, measured far off its bytes floor)."""
        m = self.model.model
        norm_of, tail, head = self._pieces
        rope, probs_of, _ = self._attention
        b = tok.shape[0]
        h = m.embed_tokens(tok[:, None])
        scale = self.head_dim ** -0.5
        for i, layer in enumerate(m.layers):
            norm, norm2 = layer.input_layernorm, layer.post_attention_layernorm
            u = norm_of(h, norm.weight, norm.variance_epsilon)
            q, k, v = F.linear(u, self.qkv_weights[i]).split(self._splits, dim=-1)
            q, k = rope(q, k, self.cos, self.sin, pos, self.n_kv, self.head_dim)
            self.k[i].index_copy_(2, pos, k)
            self.v[i].index_copy_(2, pos, v.view(b, 1, self.n_kv, self.head_dim).transpose(1, 2))
            probs = probs_of(torch.matmul(q, self.k[i].transpose(-1, -2)), self.positions, pos, scale)
            o = torch.matmul(probs, self.v[i]).reshape(b, 1, self.n_q * self.head_dim)
            h = tail(h, F.linear(o, layer.self_attn.o_proj.weight), *tail_weights(norm2, layer.mlp, norm2.variance_epsilon))
        return head(h, m.norm.weight, m.norm.variance_epsilon, self.model.lm_head.weight, self.model.lm_head.bias,
                    self.model.config.vocab_size)

    def step(self) -> None:
        """Greedy: next token from the current one, written back to ``tok``; advances ``pos``."""
        logits = self._decode_logits(self.tok, self.pos)
        self.tok.copy_(logits.argmax(-1))
        self.pos += 1

    @torch.no_grad()
    def start(self, input_ids: torch.Tensor, prefill_rows: int = 64) -> None:
        logits = []
        for r0 in range(0, input_ids.shape[0], prefill_rows):
            rows = slice(r0, min(input_ids.shape[0], r0 + prefill_rows))
            logits.append(self.prefill(input_ids[rows], rows))
        self.tok.copy_(torch.cat(logits).argmax(-1))
        self.pos.fill_(input_ids.shape[1])

    @torch.no_grad()
    def capture(self) -> None:
        """Warm up (compiles) and capture one decode step; run before start(): it scribbles on the cache."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                self.pos.fill_(0)
                self.step()
        torch.cuda.current_stream().wait_stream(stream)
        self.pos.fill_(0)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.step()

    @torch.no_grad()
    def advance(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self.step()
