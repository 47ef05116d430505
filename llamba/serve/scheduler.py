"""Continuous batching: the ``Scheduler`` owns a slot model (``llamba.serve.slots``) and runs its step loop in one
background thread. Requests wait in a bounded queue, join the running batch at a token boundary when enough slots
are free, and leave it when they finish, are cancelled or fail.

Each turn of the loop prefills at most ``prefill_chunk`` prompt tokens (a piece of the oldest joining prompt, then
of the next ones: short prompts join several a turn) and then runs one decode step for every sequence in the batch,
so a long prompt delays the others by one piece per token, never by its whole prefill. Tokens are chosen by the
one sampler of every generation path (``llamba.generation.sampling``), row by row with each request's own params
and its own ``torch.Generator``: a seeded request samples the same tokens whoever its batch neighbours are.
Everything a request produces reaches its ``emit`` callback as ``Event``s, from the loop's thread: its text every
``stream_interval`` tokens (and at its end).
"""

from __future__ import annotations

import collections
import heapq
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from llamba.generation.sampling import GREEDY, SamplingParams, seen_tokens_mask, select_tokens

PROMPT_TAIL = 6  # prompt tokens decoded ahead of the new ones, so the first new token's text keeps its spacing


class QueueFull(RuntimeError):
    """More requests are waiting than the queue holds: the server answers 429."""


@dataclass
class Event:
    """What a request gets back: ``text`` pieces for choice ``index``, then one ``finish`` per choice (``reason``
    "stop" or "length", ``tokens`` generated), or one ``error`` for the whole request."""

    kind: str  # "text" | "finish" | "error"
    index: int = 0
    text: str = ""
    reason: str | None = None
    tokens: int = 0


@dataclass(eq=False)
class Request:
    """One completion request: ``n`` choices of up to ``max_tokens`` new tokens after ``prompt`` (token ids)."""

    prompt: list[int]
    max_tokens: int
    emit: Callable[[Event], None]
    params: SamplingParams = GREEDY
    stop: list[str] = field(default_factory=list)
    n: int = 1
    seed: int | None = None
    cancelled: bool = False
    submitted: float = field(default_factory=time.perf_counter)


class _Sequence:
    """One choice of a request, in a slot: its tokens, sampler state, and the text it has sent so far."""

    def __init__(self, request: Request, index: int, slot: int, tokenizer, vocab: int, interval: int = 1):
        self.request, self.index, self.slot = request, index, slot
        self.interval = interval  # tokens between two reads of the text (a stop string needs every token's)
        seed = request.seed if request.seed is not None else random.getrandbits(63)
        self.seed = (seed + index) % 2**64  # choice k of seed s: seed s + k
        self.generator: torch.Generator | None = None  # made where the logits are, at the first choice
        params = request.params
        self.seen = (seen_tokens_mask(torch.tensor([request.prompt]), None, vocab)
                     if params.repetition_penalty != 1.0 else None)
        self.tokens: list[int] = []
        self.tokenizer = tokenizer
        self.ids = request.prompt[-PROMPT_TAIL:]  # the prompt's tail, then the new tokens: what the text decodes
        self.prefix_at, self.read_at = 0, len(self.ids)
        self.text, self.sent = "", 0
        self.hold = max((len(s) for s in request.stop), default=1) - 1  # chars that may start a stop string

    def choose(self, logits: torch.Tensor) -> int:
        """The next token from this row's logits (vocab,), with this request's params and generator."""
        if self.generator is None:  # a CUDA model's rows sample on the GPU: generator and mask go where they are
            self.generator = torch.Generator(logits.device).manual_seed(self.seed)
            self.seen = None if self.seen is None else self.seen.to(logits.device)
        token = int(select_tokens(logits[None], self.seen, self.request.params, self.generator)[0])
        if self.seen is not None:
            self.seen[0, token] = True
        return token

    def add(self, token: int, eos: set[int]) -> str | None:
        """Record ``token``, send the text it completes; returns the finish reason, or None to go on."""
        self.tokens.append(token)
        if token in eos:
            self._read()
            return self._finish("stop", len(self.text))
        self.ids.append(token)
        last = len(self.tokens) >= self.request.max_tokens
        if not (self.request.stop or last or len(self.tokens) % self.interval == 0):
            return None  # read and sent with the interval's last token
        self._read()
        if self.request.stop:
            look_from = max(0, self.sent - self.hold)
            hits = [i for i in (self.text.find(s, look_from) for s in self.request.stop) if i >= 0]
            if hits:
                return self._finish("stop", min(hits))
        if last:
            return self._finish("length", len(self.text))
        safe = len(self.text) - self.hold  # hold back what could be the start of a stop string
        if safe > self.sent:
            self.request.emit(Event("text", self.index, self.text[self.sent:safe]))
            self.sent = safe
        return None

    def _read(self) -> None:
        """Incremental detokenization: decode from a few tokens back and keep what the tokens since the last read
        added; a text that ends in U+FFFD is an unfinished UTF-8 character, kept for when the next tokens complete
        it."""
        before = self.tokenizer.decode(self.ids[self.prefix_at:self.read_at], skip_special_tokens=True)
        after = self.tokenizer.decode(self.ids[self.prefix_at:], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before):]
            self.prefix_at, self.read_at = self.read_at, len(self.ids)

    def _finish(self, reason: str, end: int) -> str:
        if end > self.sent:
            self.request.emit(Event("text", self.index, self.text[self.sent:end]))
        self.request.emit(Event("finish", self.index, reason=reason, tokens=len(self.tokens)))
        return reason


class Scheduler:
    """The step loop over a slot model. ``submit`` (any thread) queues a request or raises ``QueueFull``;
    ``cancel`` frees its slots at the next token boundary; ``stop`` ends the loop, failing what is left."""

    def __init__(self, slots, tokenizer, max_queue: int = 64, prefill_chunk: int = 256, idle_wait: float = 0.05,
                 stream_interval: int = 1):
        if stream_interval < 1:
            raise ValueError(f"stream_interval must be at least 1 token, got {stream_interval}")
        self.slots, self.tokenizer = slots, tokenizer
        self.max_queue, self.prefill_chunk, self.idle_wait = max_queue, prefill_chunk, idle_wait
        # text read and sent every stream_interval tokens: the host's work per token (detokenizing, one event
        # through the event loop and the socket) bounds a GPU server's tokens/s (docs/serving.md)
        self.stream_interval = stream_interval
        eos = tokenizer.eos_token_id
        self.eos = {eos} if isinstance(eos, int) else set(eos or ())
        self._waiting: collections.deque[Request] = collections.deque()
        self._wake = threading.Condition()
        self._free = list(range(slots.n_slots))  # a heap: the lowest free slot first keeps the batch compact
        self._running: dict[int, _Sequence] = {}  # by slot
        self._joining: tuple[Request, int] | None = None  # the request being prefilled, its tokens prefilled so far
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="llamba-scheduler", daemon=True)
        self.steps = 0  # decode steps run (the server's /health reports it)

    # -- called from other threads ------------------------------------------------------------------------------
    def start(self) -> "Scheduler":
        self._thread.start()
        return self

    def submit(self, request: Request) -> None:
        if request.n > self.slots.n_slots:
            raise ValueError(f"n={request.n} choices need as many slots; this server has {self.slots.n_slots}")
        with self._wake:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting (the queue holds "
                                f"{self.max_queue}); retry later")
            self._waiting.append(request)
            self._wake.notify()

    def cancel(self, request: Request) -> None:
        request.cancelled = True
        with self._wake:
            self._wake.notify()

    def stats(self) -> dict:
        with self._wake:
            return {"slots": self.slots.n_slots, "busy_slots": self.slots.n_slots - len(self._free),
                    "waiting": len(self._waiting), "queue_limit": self.max_queue, "decode_steps": self.steps,
                    "running": self._thread.is_alive()}

    def stop(self, timeout: float = 10.0) -> None:
        """End the loop after its current step; requests still waiting or running get an error event."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- the loop thread ----------------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while True:
                with self._wake:
                    if self._stopping:
                        break
                    if not (self._waiting or self._running or self._joining):
                        self._wake.wait(self.idle_wait)
                        continue
                self._drop_cancelled()
                self._prefill()
                if self._running:
                    self._decode_step()
        finally:
            self._fail_all("the server is shutting down")

    def _drop_cancelled(self) -> None:
        with self._wake:
            self._waiting = collections.deque(r for r in self._waiting if not r.cancelled)
        if self._joining is not None and self._joining[0].cancelled:
            self._joining = None
        for seq in [s for s in self._running.values() if s.request.cancelled]:
            self._leave(seq)

    def _prefill(self) -> None:
        """Up to ``prefill_chunk`` prompt tokens this turn: pieces of the joining prompt, then of the next ones, so
        that short prompts join several a turn. One join a turn left a batch of 256 streams of 64 tokens (4 of
        them ending each step) at ~60 busy rows on average (docs/serving.md)."""
        budget = self.prefill_chunk
        while budget > 0:
            used = self._prefill_piece(budget)
            if not used:
                return
            budget -= used

    def _prefill_piece(self, limit: int) -> int:
        """Up to ``limit`` tokens of the joining prompt; once it is all in, its choices join the batch. Returns the
        prompt tokens run (0: nothing could start, for want of a waiting request or of free slots)."""
        if self._joining is None:
            with self._wake:
                if not self._waiting or len(self._free) < self._waiting[0].n:
                    return 0
                request = self._waiting.popleft()
            self._joining = (request, 0)
            self.slots.begin()
        request, done = self._joining
        piece = torch.tensor(request.prompt[done:done + limit])
        try:
            logits = self.slots.prefill(piece)
            done += piece.numel()
            if done < len(request.prompt):
                self._joining = (request, done)
                return piece.numel()
            self._joining = None
            seqs = self._join(request)
            for seq in seqs:
                if seq.add(seq.choose(logits), self.eos) is not None:
                    self._leave(seq)
        except Exception as err:  # this request's fault (a bad token id ...): it fails alone
            self._joining = None
            self._fail(request, err)
        return piece.numel()

    def _join(self, request: Request) -> list[_Sequence]:
        """Take ``request.n`` free slots and start its choices in them. Until they run, a failure here (the slot
        model's join, a bad token id in the prompt) gives the slots back itself: ``_fail`` frees running ones only."""
        slots = [heapq.heappop(self._free) for _ in range(request.n)]
        try:
            self.slots.join(slots)
            seqs = [_Sequence(request, i, slot, self.tokenizer, self.slots.vocab_size, self.stream_interval)
                    for i, slot in enumerate(slots)]
        except Exception:
            for slot in slots:
                self.slots.release(slot)
                heapq.heappush(self._free, slot)
            raise
        self._running.update((seq.slot, seq) for seq in seqs)
        return seqs

    def _decode_step(self) -> None:
        seqs = list(self._running.values())
        try:
            logits = self.slots.decode([s.slot for s in seqs], [s.tokens[-1] for s in seqs])
        except Exception as err:  # the batch's step failed: no row of it has a next token
            for request in {id(s.request): s.request for s in seqs}.values():
                self._fail(request, err)
            return
        self.steps += 1
        # one argmax over every row (no gather of the greedy rows' logits first) and one host read
        plain = any(s.request.params == GREEDY for s in seqs)
        argmax = logits.argmax(-1).tolist() if plain else None
        for i, seq in enumerate(seqs):
            if seq.request.cancelled or self._running.get(seq.slot) is not seq:
                continue  # a sibling choice failed the request earlier in this step
            try:
                token = argmax[i] if seq.request.params == GREEDY else seq.choose(logits[i])
                if seq.add(token, self.eos) is not None:
                    self._leave(seq)
            except Exception as err:
                self._fail(seq.request, err)

    def _leave(self, seq: _Sequence) -> None:
        if self._running.get(seq.slot) is seq:
            del self._running[seq.slot]
            self.slots.release(seq.slot)
            heapq.heappush(self._free, seq.slot)

    def _fail(self, request: Request, err: Exception) -> None:
        for seq in [s for s in self._running.values() if s.request is request]:
            self._leave(seq)
        request.cancelled = True
        try:
            request.emit(Event("error", text=f"{type(err).__name__}: {err}"))
        except Exception:
            pass  # its client is gone already

    def _fail_all(self, why: str) -> None:
        with self._wake:
            waiting, self._waiting = list(self._waiting), collections.deque()
        joining = [self._joining[0]] if self._joining else []
        self._joining = None
        running = list({id(s.request): s.request for s in self._running.values()}.values())
        for request in [*waiting, *joining, *running]:
            self._fail(request, RuntimeError(why))
