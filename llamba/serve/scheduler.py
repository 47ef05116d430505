"""Continuous batching: the ``Scheduler`` owns a slot model (``llamba.serve.slots``) and runs its step loop in one
background thread. Requests wait in a bounded queue, join the running batch at a token boundary when enough slots
are free, and leave it when they finish, are cancelled or fail.

Each turn of the loop prefills at most ``prefill_chunk`` prompt tokens and then runs one decode step for every
sequence in the batch, so a long prompt delays the others by one piece per token, never by its whole prefill.
Waiting prompts that fit the turn's budget together prefill as one left-padded batch (up to the slot model's
``prefill_rows``): a GPU prefills a batch of prompts in about the time of one, whose kernel launches bound it; a
prompt longer than the budget prefills alone, a piece a turn. Tokens are chosen by the one sampler of every
generation path (``llamba.generation.sampling``; ``select``): the rows of one sampling setting together, each
drawing from its request's own ``torch.Generator``, so a seeded request samples the same tokens whoever its batch
neighbours are.
Everything a request produces reaches its ``emit`` callback as ``Event``s, from the loop's thread: each new token,
then each choice's finish; on a GPU (``overlap``) a step's events are sent while the device runs the next step.
The scheduler deals in token ids only: text, stop strings and the stream interval are the HTTP side's
(``llamba.serve.text``), which may run in other processes (``llamba.serve.remote``) and ends a choice whose text
reached a stop string with ``cancel(request, index)``.
"""

from __future__ import annotations

import collections
import heapq
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from llamba.generation.sampling import GREEDY, SamplingParams, seen_tokens_mask, select_tokens


class QueueFull(RuntimeError):
    """More requests are waiting than the queue holds: the server answers 429."""


@dataclass(slots=True)
class Event:
    """What a request gets back: each new ``token`` of choice ``index``, then one ``finish`` per choice (``reason``
    "stop" at an end-of-sequence token or "length", ``tokens`` generated), or one ``error`` for the whole request.
    The HTTP side's events (``llamba.serve.text``) are the same with ``text`` pieces in place of tokens."""

    kind: str  # "token" | "text" | "finish" | "error"
    index: int = 0
    token: int = -1
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
    n: int = 1
    seed: int | None = None
    cancelled: bool = False
    ended: set[int] = field(default_factory=set)  # choices ended from outside (their text reached a stop string)
    submitted: float = field(default_factory=time.perf_counter)


class _Sequence:
    """One choice of a request, in a slot: its tokens and sampler state."""

    def __init__(self, request: Request, index: int, slot: int, vocab: int):
        self.request, self.index, self.slot = request, index, slot
        seed = request.seed if request.seed is not None else random.getrandbits(63)
        self.seed = (seed + index) % 2**64  # choice k of seed s: seed s + k
        self.generator: torch.Generator | None = None  # made where the logits are, at the first choice
        params = request.params
        self.seen = (seen_tokens_mask(torch.tensor([request.prompt]), None, vocab)
                     if params.repetition_penalty != 1.0 else None)
        self.tokens: list[int] = []

    @property
    def ended(self) -> bool:
        return self.request.cancelled or self.index in self.request.ended

    def on(self, device: torch.device) -> "_Sequence":
        """Repetition mask and (when sampling) generator where the logits are: a CUDA model's rows sample on the
        GPU. The generator is made at the first sampled token."""
        if self.seen is not None and self.seen.device != device:
            self.seen = self.seen.to(device)
        if self.generator is None and self.request.params.do_sample:
            self.generator = torch.Generator(device).manual_seed(self.seed)
        return self

    def add(self, token: int, eos: set[int]) -> tuple[list[Event], bool]:
        """Record ``token``; returns the events that send it on (an end-of-sequence token is not sent: it has no
        text) and whether the choice has finished."""
        self.tokens.append(token)
        if token in eos:
            return [Event("finish", self.index, reason="stop", tokens=len(self.tokens))], True
        events = [Event("token", self.index, token)]
        if len(self.tokens) >= self.request.max_tokens:
            events.append(Event("finish", self.index, reason="length", tokens=len(self.tokens)))
            return events, True
        return events, False


def select(seqs: list[_Sequence], logits: torch.Tensor) -> list[int | Exception]:
    """The next token of each sequence from its row of ``logits`` (rows, vocab), with one host read: the rows of
    one sampling setting go through the sampler together, each drawing from its own generator (so a seeded request
    gets the same tokens whoever shares its batch); a batch of one setting (all greedy, say) uses ``logits`` as they
    are (a gather of the rows first cost more than the argmax on a CPU). A setting whose selection fails gives its
    rows the error instead of a token, as does a row of non-finite logits: those requests fail, the others go on."""
    device = logits.device
    groups: dict[SamplingParams, list[int]] = {}
    for i, seq in enumerate(seqs):
        groups.setdefault(seq.request.params, []).append(i)
    picks = torch.zeros(len(seqs), dtype=torch.long, device=device)
    failed: dict[int, Exception] = {}
    for params, rows in groups.items():
        try:
            members = [seqs[i].on(device) for i in rows] if params != GREEDY else []
            seen = torch.cat([m.seen for m in members]) if params.repetition_penalty != 1.0 else None
            generators = [m.generator for m in members] if params.do_sample else None
            if len(rows) == len(seqs):
                picks = select_tokens(logits, seen, params, generators)
            else:
                index = torch.tensor(rows, device=device)
                picks[index] = select_tokens(logits[index], seen, params, generators)
        except Exception as err:
            failed.update((i, err) for i in rows)
    # a row whose logits hold a NaN or inf has no next token: its request fails with that said, instead of
    # streaming whatever an argmax of NaN picks (token 0: a special token, no text, to the end of max_tokens)
    # (the largest magnitude per row is NaN or inf exactly when some logit is: a tenth of isfinite().all()'s time on
    # a CPU, where these logits are the host's to read)
    picks = torch.where(torch.isfinite(logits.abs().amax(-1)), picks, -1)
    tokens = picks.tolist()  # the one host read
    for i, token in enumerate(tokens):
        if token < 0 and i not in failed:
            failed[i] = FloatingPointError("the model's logits for this sequence are not finite (NaN or inf)")
    for i, seq in enumerate(seqs):
        if seq.seen is not None and i not in failed:
            seq.seen[0, tokens[i]] = True
    return [failed.get(i, token) for i, token in enumerate(tokens)]


@dataclass(eq=False)
class _Group:
    """Prompts prefilled together: their tokens left-padded to the longest (``mask`` 0 on padding, None without
    any), and how many of those columns are in so far."""

    requests: list[Request]
    ids: torch.Tensor  # (rows, longest)
    mask: torch.Tensor | None
    done: int = 0

    @classmethod
    def of(cls, requests: list[Request]) -> "_Group":
        longest = max(len(r.prompt) for r in requests)
        ids = torch.zeros(len(requests), longest, dtype=torch.long)
        mask = torch.zeros(len(requests), longest, dtype=torch.long)
        for row, r in enumerate(requests):
            ids[row, longest - len(r.prompt):] = torch.tensor(r.prompt, dtype=torch.long)
            mask[row, longest - len(r.prompt):] = 1
        return cls(requests, ids, None if bool(mask.all()) else mask)


class Scheduler:
    """The step loop over a slot model. ``submit`` (any thread) queues a request or raises ``QueueFull``;
    ``cancel`` frees its slots (or one choice's) at the next token boundary; ``stop`` ends the loop, failing what is
    left. ``eos``: the token ids that finish a choice ("stop")."""

    def __init__(self, slots, eos: Iterable[int], max_queue: int = 64, prefill_chunk: int = 256,
                 idle_wait: float = 0.05, on_turn_end: Callable[[], None] | None = None, overlap: bool | None = None):
        self.slots, self.eos = slots, set(eos)
        # send a step's events while the device runs the next step (``_decode_step``): on by default where the
        # slot model's steps run asynchronously (CUDA); on a CPU a step is done when its call returns, so there
        # is nothing to overlap and each token goes out as soon as it is read
        device = getattr(slots, "device", None)
        self.overlap = overlap if overlap is not None else getattr(device, "type", "cpu") == "cuda"
        self.max_queue, self.prefill_chunk, self.idle_wait = max_queue, prefill_chunk, idle_wait
        # called on the loop's thread after each turn's events (``llamba.serve.remote`` sends them on in one message)
        self.on_turn_end = on_turn_end
        self._waiting: collections.deque[Request] = collections.deque()
        self._wake = threading.Condition()
        self._free = list(range(slots.n_slots))  # a heap: the lowest free slot first keeps the batch compact
        self._running: dict[int, _Sequence] = {}  # by slot
        # events made by the last decode step (and the prefills since), sent while the device runs the next one
        self._unsent: list[tuple[Request, Event]] = []
        self._joining: _Group | None = None  # the prompts being prefilled
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

    @property
    def n_slots(self) -> int:
        return self.slots.n_slots

    @property
    def vocab_size(self) -> int:
        return self.slots.vocab_size

    def cancel(self, request: Request, index: int | None = None) -> None:
        """End the whole request, or only its choice ``index`` (the HTTP side found a stop string in its text)."""
        if index is None:
            request.cancelled = True
        else:
            request.ended.add(index)
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
                    if not (self._waiting or self._running or self._joining or self._unsent):
                        self._wake.wait(self.idle_wait)
                        continue
                self._drop_cancelled()
                self._prefill()
                if not self.overlap:
                    self._send()
                if self._running:
                    self._decode_step()  # with overlap: sends the events before it while the device runs it
                if not (self.overlap and self._running):
                    self._send()  # (with overlap and a next step, its launch sends them)
        finally:
            self._send()
            self._fail_all("the server is shutting down")
            if self.on_turn_end is not None:
                self.on_turn_end()

    def _drop_cancelled(self) -> None:
        with self._wake:
            self._waiting = collections.deque(r for r in self._waiting if not r.cancelled)
        # only a prompt prefilled alone outlives a turn (a group of several is all in within the turn it starts)
        if self._joining is not None and self._joining.requests[0].cancelled:
            self._joining = None
        for seq in [s for s in self._running.values() if s.ended]:
            self._leave(seq)

    def _prefill(self) -> None:
        """Up to ``prefill_chunk`` prompt tokens this turn: pieces of the joining prompt, then groups of the next
        ones, so that short prompts join many a turn. One join a turn left a batch of 256 streams of 64 tokens (4
        of them ending each step) at ~60 busy rows on average (docs/serving.md)."""
        budget = self.prefill_chunk
        while budget > 0:
            used = self._prefill_piece(budget)
            if not used:
                return
            budget -= used

    def _next_group(self, budget: int) -> _Group | None:
        """The oldest waiting request that has slots enough, and after it the waiting ones that join its batch: up to
        ``prefill_rows`` prompts whose padded batch fits ``budget`` (so that it is prefilled in this turn), whose
        padding is no more than their own tokens, and that still fit ``max_context`` once padded (a hybrid student's
        KV cache holds the padding too). None: nothing can start."""
        with self._wake:
            if not self._waiting or len(self._free) < self._waiting[0].n:
                return None
            chosen = [self._waiting[0]]
            rows_left, slots_left = self.slots.prefill_rows - 1, len(self._free) - chosen[0].n
            longest, real = len(chosen[0].prompt), len(chosen[0].prompt)
            for request in list(self._waiting)[1:]:
                if rows_left == 0:
                    break
                size, width = len(request.prompt), max(longest, len(request.prompt))
                rows = len(chosen) + 1
                if (request.n <= slots_left and rows * width <= budget and rows * width - real - size <= real + size
                        and all(width + r.max_tokens <= self.slots.max_context for r in [*chosen, request])):
                    chosen.append(request)
                    rows_left, slots_left = rows_left - 1, slots_left - request.n
                    longest, real = width, real + size
            for request in chosen:
                self._waiting.remove(request)
        return _Group.of(chosen)

    def _prefill_piece(self, limit: int) -> int:
        """Up to ``limit`` tokens (padding included) of the joining group; once its prompts are in, their choices
        join the batch. Returns the tokens run (0: nothing could start, for want of a waiting request or of free
        slots)."""
        if self._joining is None:
            group = self._next_group(limit)
            if group is None:
                return 0
            self._joining = group
            self.slots.begin(len(group.requests))
        group = self._joining
        rows = len(group.requests)
        end = min(group.ids.shape[1], group.done + max(1, limit // rows))
        try:
            logits = self.slots.prefill(group.ids[:, group.done:end],
                                        None if group.mask is None else group.mask[:, group.done:end])
        except Exception as err:  # a request's fault (a bad token id ...): it fails alone
            self._joining = None
            if rows == 1:
                self._fail(group.requests[0], err)
            else:  # which one? each again on its own, in this turn (they fit its budget together)
                for request in group.requests:
                    self._joining = _Group.of([request])
                    self.slots.begin(1)
                    self._prefill_piece(limit)
            return rows * (end - group.done)
        used, group.done = rows * (end - group.done), end
        if end < group.ids.shape[1]:
            return used
        self._joining = None
        for row, request in enumerate(group.requests):
            try:
                seqs = self._join(request, row)
                for seq, token in zip(seqs, select(seqs, logits[row].expand(len(seqs), -1))):
                    if isinstance(token, Exception):
                        raise token
                    self._take(seq, token)
            except Exception as err:  # this request's fault: it fails alone
                self._fail(request, err)
        return used

    def _join(self, request: Request, row: int) -> list[_Sequence]:
        """Take ``request.n`` free slots and start its choices in them from staging row ``row``. Until they run, a
        failure here (the slot model's join, a bad token id in the prompt) gives the slots back itself: ``_fail``
        frees running ones only."""
        slots = [heapq.heappop(self._free) for _ in range(request.n)]
        try:
            self.slots.join(slots, row)
            seqs = [_Sequence(request, i, slot, self.slots.vocab_size) for i, slot in enumerate(slots)]
        except Exception:
            for slot in slots:
                self.slots.release(slot)
                heapq.heappush(self._free, slot)
            raise
        self._running.update((seq.slot, seq) for seq in seqs)
        return seqs

    def _decode_step(self) -> None:
        """One token for every running sequence. With ``overlap`` the step is launched first, the events of the
        step before (and of the prefills since) are sent while the device runs it, and only then are its tokens
        read: on a GPU the host's share of a step (each token's event, detokenized here or handed to the HTTP
        processes) then overlaps the device's instead of following it. Which sequences run is decided before the
        launch, from tokens already read, so no row computes a token that is thrown away; a token reaches its
        client about a launch later than it could."""
        seqs = list(self._running.values())
        try:
            logits = self.slots.decode([s.slot for s in seqs], [s.tokens[-1] for s in seqs])
        except Exception as err:  # the batch's step failed: no row of it has a next token
            self._send()
            for request in {id(s.request): s.request for s in seqs}.values():
                self._fail(request, err)
            return
        self.steps += 1
        if self.overlap:
            self._send()
        for seq, token in zip(seqs, select(seqs, logits)):
            if seq.ended or self._running.get(seq.slot) is not seq:
                continue  # a sibling choice failed the request earlier in this step, or it was ended from outside
            try:
                if isinstance(token, Exception):
                    raise token
                self._take(seq, token)
            except Exception as err:
                self._fail(seq.request, err)

    def _take(self, seq: _Sequence, token: int) -> None:
        """Record ``token`` for ``seq`` and queue its events; a finished sequence leaves its slot at once."""
        events, finished = seq.add(token, self.eos)
        self._unsent.extend((seq.request, event) for event in events)
        if finished:
            self._leave(seq)

    def _send(self) -> None:
        """Emit the queued events, then hand the turn's events on (``on_turn_end``). An emit that raises fails its
        request alone."""
        unsent, self._unsent = self._unsent, []
        for request, event in unsent:
            if request.cancelled and event.kind == "token":
                continue  # failed or cancelled since: its client gets no more tokens
            try:
                request.emit(event)
            except Exception as err:
                self._fail(request, err)
        if self.on_turn_end is not None:
            self.on_turn_end()

    def _leave(self, seq: _Sequence) -> None:
        if self._running.get(seq.slot) is seq:
            del self._running[seq.slot]
            self.slots.release(seq.slot)
            heapq.heappush(self._free, seq.slot)

    def _fail(self, request: Request, err: Exception) -> None:
        for seq in [s for s in self._running.values() if s.request is request]:
            self._leave(seq)
        mine = [event for r, event in self._unsent if r is request]
        if mine:  # its tokens so far go out before the error
            self._unsent = [(r, event) for r, event in self._unsent if r is not request]
            for event in mine:
                try:
                    request.emit(event)
                except Exception:
                    break  # its client is gone already
        request.cancelled = True
        try:
            request.emit(Event("error", text=f"{type(err).__name__}: {err}"))
        except Exception:
            pass  # its client is gone already

    def _fail_all(self, why: str) -> None:
        with self._wake:
            waiting, self._waiting = list(self._waiting), collections.deque()
        joining = self._joining.requests if self._joining else []
        self._joining = None
        running = list({id(s.request): s.request for s in self._running.values()}.values())
        for request in [*waiting, *joining, *running]:
            self._fail(request, RuntimeError(why))
