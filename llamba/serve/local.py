"""The app's engine when HTTP and the model share a process (``llamba serve`` without ``--api-processes``): the
scheduler runs on its own thread, and its events reach the event loop's requests through an ``_Outbox``. The engine
for HTTP in processes of its own is ``llamba.serve.remote.RemoteEngine``; the app (``llamba.serve.app``) uses either.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from typing import Callable

from llamba.generation.sampling import SamplingParams
from llamba.serve.scheduler import Event, Request, Scheduler


class _Outbox:
    """Events from the scheduler's thread to the event loop, which owns the requests' text and queues. Each
    ``call_soon_threadsafe`` writes to the loop's wake-up pipe, so one per event cost more than the rest of a
    token's path at a few hundred streams; here a burst (a decode step's events for every stream) wakes the loop
    once, and the loop hands the whole burst out."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._items: list[tuple[Callable[[Event], None], Event]] = []
        self._lock = threading.Lock()

    def put(self, sink: Callable[[Event], None], event: Event) -> None:  # the scheduler's thread
        with self._lock:
            self._items.append((sink, event))
            if len(self._items) > 1:
                return  # a hand-out is already on its way and will take this one too
        self.loop.call_soon_threadsafe(self._hand_out)

    def _hand_out(self) -> None:  # the loop's thread
        with self._lock:
            items, self._items = self._items, []
        for sink, event in items:
            sink(event)


class LocalEngine:
    """The scheduler in this process, on its own thread. Like ``remote.RemoteEngine`` it offers
    ``submit`` (returns the request's ``cancel(index=None)``, raises ``QueueFull``), ``stats``, ``start``, ``stop``,
    ``n_slots`` and ``vocab_size``."""

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler
        self.n_slots, self.vocab_size = scheduler.n_slots, scheduler.vocab_size
        self._outbox: _Outbox | None = None

    async def submit(self, prompt: list[int], max_tokens: int, params: SamplingParams, n: int, seed: int | None,
                     on_event: Callable[[Event], None]) -> Callable[..., None]:
        loop = asyncio.get_running_loop()
        if self._outbox is None or self._outbox.loop is not loop:
            self._outbox = _Outbox(loop)
        outbox = self._outbox
        request = Request(prompt, max_tokens, lambda event: outbox.put(on_event, event), params, n, seed)
        self.scheduler.submit(request)
        return lambda index=None: self.scheduler.cancel(request, index)

    async def stats(self) -> dict:
        return self.scheduler.stats()

    async def start(self) -> None:
        self.scheduler.start()

    async def stop(self) -> None:
        await asyncio.to_thread(self.scheduler.stop)
        print(f"llamba serve: stopped after {self.scheduler.steps} decode steps", file=sys.stderr, flush=True)
