"""HTTP in processes of its own (``llamba serve --api-processes N``): the layout vLLM and SGLang use to keep a GPU
fed. The model's process runs the scheduler and nothing else; each of N HTTP processes accepts connections on the
one listening socket, parses and checks requests, detokenizes and streams its own requests' text, and talks to the
scheduler through one connection (a Unix socket, ``multiprocessing.connection`` with a random key). Per decode step
the model's process sends each HTTP process one message of (request, choice, token id) triples: its host work per
token is a tuple, not an event loop hand-off, a detokenization and a socket write (docs/serving.md, "The host path").

- ``EngineHost`` (model's process): the listener; each connection's requests go to the scheduler, and a turn's
  events go back as one message per connection (the scheduler's ``on_turn_end``).
- ``RemoteEngine`` (HTTP process): the app's engine (as ``local.LocalEngine`` is in one process): ``submit`` waits
  for the scheduler's answer (a full queue is a 429), ``cancel`` ends a request or one choice, ``stats`` asks.
- ``ApiProcesses``: starts the N HTTP processes (spawned: no CUDA state is forked) and stops them.

Messages (pickled by ``multiprocessing.connection``, between processes of one server that share a random key):
to the model's process ``("submit", rid, prompt, max_tokens, params, n, seed)``, ``("cancel", rid, index|None)``,
``("stats", tag)``; back ``("accepted", rid)``, ``("rejected", rid, message)``, ``("stats", tag, dict)`` and
``("events", [(rid, index, token) | (rid, index, reason, tokens) | (rid, message)])``.
"""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from multiprocessing.connection import Client, Connection, Listener

from llamba.serve.scheduler import Event, QueueFull, Request, Scheduler

_FAMILY = "AF_UNIX"


def _encode(rid: int, event: Event) -> tuple:
    if event.kind == "token":
        return rid, event.index, event.token
    if event.kind == "finish":
        return rid, event.index, event.reason, event.tokens
    return rid, event.text  # error


def _decode(item: tuple) -> tuple[int, Event]:
    if len(item) == 3:
        return item[0], Event("token", item[1], item[2])
    if len(item) == 4:
        return item[0], Event("finish", item[1], reason=item[2], tokens=item[3])
    return item[0], Event("error", text=item[1])


# -- the model's process -----------------------------------------------------------------------------------------
class _Link:
    """One HTTP process's connection: its requests by id, and the events of the turn under way."""

    def __init__(self, conn: Connection, scheduler: Scheduler):
        self.conn, self.scheduler = conn, scheduler
        self.requests: dict[int, Request] = {}
        self.outgoing: list[tuple] = []  # appended on the scheduler's thread, sent by flush on the same thread
        self.send_lock = threading.Lock()  # the reader's answers and the scheduler's flushes share the socket
        self.closed = False

    def send(self, message: tuple) -> None:
        with self.send_lock:
            if not self.closed:
                try:
                    self.conn.send(message)
                except OSError:  # the HTTP process is gone: its reader sees the end and cancels its requests
                    self.closed = True

    def flush(self) -> None:
        if self.outgoing:
            batch, self.outgoing = self.outgoing, []
            self.send(("events", batch))

    def serve(self) -> None:
        """The reader: the HTTP process's messages until it goes; then its requests are cancelled."""
        try:
            while True:
                message = self.conn.recv()
                kind = message[0]
                if kind == "submit":
                    self._submit(*message[1:])
                elif kind == "cancel":  # the whole request (then forgotten), or one choice (a stop string)
                    rid, index = message[1], message[2]
                    request = self.requests.pop(rid, None) if index is None else self.requests.get(rid)
                    if request is not None:
                        self.scheduler.cancel(request, index)
                elif kind == "stats":
                    self.send(("stats", message[1], self.scheduler.stats()))
        except (EOFError, OSError):
            pass
        finally:
            self.closed = True
            for request in list(self.requests.values()):
                self.scheduler.cancel(request)
            self.conn.close()

    def _submit(self, rid: int, prompt: list[int], max_tokens: int, params, n: int, seed: int | None) -> None:
        left = [n]  # choices still to finish: the request is forgotten after its last finish or its error

        def emit(event: Event) -> None:  # the scheduler's thread
            self.outgoing.append(_encode(rid, event))
            if event.kind == "error" or (event.kind == "finish" and _last(left)):
                self.requests.pop(rid, None)

        request = Request(prompt, max_tokens, emit, params, n, seed)
        self.requests[rid] = request
        try:
            self.scheduler.submit(request)
        except (QueueFull, ValueError) as err:
            self.requests.pop(rid, None)
            self.send(("rejected", rid, str(err)))
            return
        self.send(("accepted", rid))


def _last(left: list[int]) -> bool:
    """Count one choice finished; whether it was the last (a request's choices a one-element list)."""
    left[0] -= 1
    return left[0] == 0


class EngineHost:
    """The scheduler's side of ``--api-processes``: listens on a Unix socket in a private folder; every HTTP process
    that connects with the key is served by its own reader thread. Becomes the scheduler's ``on_turn_end``."""

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler
        self.authkey = os.urandom(32)
        self._dir = tempfile.mkdtemp(prefix="llamba-serve-")
        self.address = os.path.join(self._dir, "engine.sock")
        self.listener = Listener(self.address, family=_FAMILY, authkey=self.authkey)
        self._links: list[_Link] = []
        self._lock = threading.Lock()
        scheduler.on_turn_end = self.flush
        threading.Thread(target=self._accept, name="llamba-engine-accept", daemon=True).start()

    @property
    def connected(self) -> int:
        with self._lock:
            return sum(not link.closed for link in self._links)

    def _accept(self) -> None:
        while True:
            try:
                conn = self.listener.accept()
            except OSError:  # closed
                return
            except Exception:  # a connection with the wrong key: refuse it, keep listening
                continue
            link = _Link(conn, self.scheduler)
            with self._lock:
                self._links = [l for l in self._links if not l.closed] + [link]
            threading.Thread(target=link.serve, name="llamba-engine-link", daemon=True).start()

    def flush(self) -> None:  # the scheduler's thread, after each turn
        with self._lock:
            links = list(self._links)
        for link in links:
            link.flush()

    def close(self) -> None:
        self.listener.close()
        with self._lock:
            for link in self._links:
                with link.send_lock:
                    link.closed = True
                    link.conn.close()
        shutil.rmtree(self._dir, ignore_errors=True)


# -- an HTTP process ---------------------------------------------------------------------------------------------
class RemoteEngine:
    """The app's engine in an HTTP process; the scheduler is in the model's process at ``address``."""

    def __init__(self, address: str, authkey: bytes, n_slots: int, vocab_size: int):
        self.address, self.authkey, self.n_slots, self.vocab_size = address, authkey, n_slots, vocab_size
        self._conn: Connection | None = None
        self._ids = itertools.count()
        self._sinks: dict[int, tuple] = {}  # rid -> (on_event, [choices the scheduler has yet to finish])
        self._pending: dict[int, asyncio.Future] = {}  # submissions and stats waiting for their answer
        self._loop: asyncio.AbstractEventLoop | None = None
        self._gone: str | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._conn = Client(self.address, family=_FAMILY, authkey=self.authkey)
        threading.Thread(target=self._read, name="llamba-api-link", daemon=True).start()

    async def stop(self) -> None:
        if self._conn is not None:
            self._conn.close()

    async def submit(self, prompt: list[int], max_tokens: int, params, n: int, seed: int | None, on_event):
        rid = next(self._ids)
        answer = self._ask(rid)
        self._sinks[rid] = (on_event, [n])
        self._send(("submit", rid, prompt, max_tokens, params, n, seed))
        try:
            await answer
        except BaseException:
            self._sinks.pop(rid, None)
            raise
        return lambda index=None: self._cancel(rid, index)

    async def stats(self) -> dict:
        tag = next(self._ids)
        answer = self._ask(tag)
        self._send(("stats", tag))
        return await answer

    def _ask(self, key: int) -> asyncio.Future:
        if self._gone:
            raise RuntimeError(self._gone)
        future = self._loop.create_future()
        self._pending[key] = future
        return future

    def _send(self, message: tuple) -> None:
        try:
            self._conn.send(message)
        except OSError as err:
            self._lost(f"the model's process is gone ({err})")
            raise RuntimeError(self._gone) from None

    def _cancel(self, rid: int, index: int | None) -> None:
        if rid in self._sinks and not self._gone:  # a finished request is already forgotten on both sides
            if index is None:
                self._sinks.pop(rid, None)
            try:
                self._conn.send(("cancel", rid, index))
            except OSError:
                pass

    def _read(self) -> None:  # its own thread: one hand-out to the event loop per message (per decode step)
        try:
            while True:
                message = self._conn.recv()
                self._loop.call_soon_threadsafe(self._dispatch, message)
        except (EOFError, OSError) as err:
            try:
                self._loop.call_soon_threadsafe(self._lost, f"the model's process is gone ({type(err).__name__})")
            except RuntimeError:  # the loop closed first: this process is shutting down
                pass

    def _dispatch(self, message: tuple) -> None:  # the loop's thread
        kind = message[0]
        if kind == "events":
            for item in message[1]:
                rid, event = _decode(item)
                sink = self._sinks.get(rid)
                if sink is None:
                    continue  # cancelled here; the model's process had not heard yet
                sink[0](event)
                if event.kind == "error" or (event.kind == "finish" and _last(sink[1])):
                    self._sinks.pop(rid, None)
            return
        future = self._pending.pop(message[1], None)
        if future is None or future.done():
            return
        if kind == "rejected":
            future.set_exception(QueueFull(message[2]))
        else:
            future.set_result(message[2] if kind == "stats" else None)

    def _lost(self, why: str) -> None:
        self._gone = why
        for future in self._pending.values():
            if not future.done():
                future.set_exception(RuntimeError(why))
        for on_event, _ in self._sinks.values():
            on_event(Event("error", text=why))
        self._pending.clear()
        self._sinks.clear()


def _api_process(sock, engine_args: tuple, app_args: dict, log_level: str, shutdown_timeout: float,
                 uvicorn_options: dict) -> None:
    """An HTTP process: the app over a ``RemoteEngine``, under uvicorn on the inherited listening socket. SIGTERM is
    uvicorn's graceful shutdown; the model's process ends what outlasts it."""
    import uvicorn

    from llamba.serve.app import create_app

    app = create_app(RemoteEngine(*engine_args), **app_args)
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=shutdown_timeout, backlog=4096,
                            **uvicorn_options)
    uvicorn.Server(config).run(sockets=[sock])


class ApiProcesses:
    """``n`` HTTP processes on the listening socket ``sock``, each connected to ``host``. ``app_args``:
    ``create_app``'s keywords (tokenizer, model_name, max_context, default_max_tokens, stream_interval).
    ``supervise`` replaces one that dies (its open requests are lost: the model's process cancels them)."""

    RESTARTS_PER_MINUTE = 5  # more means something kills every new one: stop instead of looping

    def __init__(self, host: EngineHost, sock, n: int, app_args: dict, log_level: str = "warning",
                 shutdown_timeout: float = 30.0, uvicorn_options: dict | None = None):
        if n < 1:
            raise ValueError(f"--api-processes must be at least 1, got {n}")
        engine_args = (host.address, host.authkey, host.scheduler.n_slots, host.scheduler.vocab_size)
        self.host = host
        self._args = (sock, engine_args, app_args, log_level, shutdown_timeout, uvicorn_options or {})
        self.processes = [self._new(i) for i in range(n)]
        self._restarts: list[float] = []

    def _new(self, i: int):
        return multiprocessing.get_context("spawn").Process(target=_api_process, name=f"llamba-api-{i}",
                                                            daemon=True, args=self._args)

    def start(self, timeout: float = 120.0) -> "ApiProcesses":
        """Start them and wait until each has connected to the scheduler (then it serves what the socket queued)."""
        for process in self.processes:
            process.start()
        deadline = time.monotonic() + timeout
        while self.host.connected < len(self.processes):
            dead = [p for p in self.processes if not p.is_alive()]
            if dead or time.monotonic() > deadline:
                self.stop(0)
                raise RuntimeError(f"an HTTP process {'exited' if dead else 'did not connect'} while starting "
                                   "(its error is above)")
            time.sleep(0.05)
        return self

    def supervise(self, stop: threading.Event, every: float = 0.5) -> bool:
        """Until ``stop`` is set, replace HTTP processes that exit. If they die faster than ``RESTARTS_PER_MINUTE``,
        sets ``stop`` itself (the server then stops) and returns False; True once ``stop`` was set from outside."""
        while not stop.wait(every):
            for i, process in enumerate(self.processes):
                if process.is_alive() or stop.is_set():
                    continue
                now = time.monotonic()
                self._restarts = [t for t in self._restarts if now - t < 60] + [now]
                if len(self._restarts) > self.RESTARTS_PER_MINUTE:
                    print(f"llamba serve: HTTP processes exited {len(self._restarts)} times in a minute; stopping",
                          file=sys.stderr, flush=True)
                    stop.set()
                    return False
                print(f"llamba serve: {process.name} exited (code {process.exitcode}); starting another",
                      file=sys.stderr, flush=True)
                process.join(0)
                self.processes[i] = self._new(i)
                self.processes[i].start()
        return True

    def terminate(self) -> None:
        """SIGTERM: each stops accepting and lets its open requests finish (uvicorn's graceful shutdown)."""
        for process in self.processes:
            if process.is_alive():
                os.kill(process.pid, signal.SIGTERM)

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for process in self.processes:
            process.join(max(0.0, deadline - time.monotonic()))

    def stop(self, timeout: float = 10.0) -> None:
        self.terminate()
        self.join(timeout)
        for process in self.processes:
            if process.is_alive():
                print(f"llamba serve: {process.name} did not stop in {timeout:.0f} s; killed", file=sys.stderr)
                process.kill()
                process.join(5)
