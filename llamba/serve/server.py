"""Building a served model from a path, and running the app under uvicorn: in the foreground (``llamba serve``:
uvicorn's SIGTERM / Ctrl-C handling and graceful shutdown) or in a background thread on a port of its own
(``llamba bench serve`` and the tests); either in this one process, or with HTTP in processes of its own
(``--api-processes``: ``llamba.serve.remote``) and the scheduler here."""

from __future__ import annotations

import signal
import socket
import threading
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Served:
    """What the server needs of a loaded model: its slot model, tokenizer and the name clients call it by."""

    slots: object
    tokenizer: object
    name: str
    max_context: int


def load_served(model: str, n_slots: int, max_context: int, device_name: str = "auto", dtype_name: str = "auto",
                quant: str | None = None, threads: int | None = None, name: str | None = None,
                prefill_rows: int | None = None, compile: bool | None = None) -> Served:
    """A student checkpoint, a quantized artifact (or a student with ``quant``: the CPU runtime) or a teacher,
    loaded as ``llamba generate`` loads them, in a slot cache of ``n_slots`` rows; up to ``prefill_rows`` prompts
    prefill together (default: ``default_prefill_rows``; the CPU runtime prefills one at a time); ``compile``: the
    dense pieces of a float model's steps and prefills compiled (default: on CUDA)."""
    import torch

    from llamba.cli.common import resolve_device, resolve_dtype
    from llamba.cli.generate import wants_quant_runtime
    from llamba.serve.slots import LlambaSlots, QuantSlots, TeacherSlots

    device = resolve_device(device_name)
    prefill_rows = prefill_rows or default_prefill_rows(device.type)
    if threads:
        torch.set_num_threads(threads)
    if wants_quant_runtime(model, quant):
        from llamba.quant import load_for_cpu

        if device.type != "cpu":
            raise ValueError("a quantized model runs on the CPU runtime; use --device cpu")
        decoder = load_for_cpu(model, quant, threads=threads)
        slots, tokenizer = QuantSlots(decoder, n_slots, max_context), decoder.tokenizer
    else:
        from llamba.checkpoint import load_model
        from llamba.model import LlambaForCausalLM

        net, tokenizer = load_model(model, dtype=resolve_dtype(dtype_name, device), device=device)
        if isinstance(net, LlambaForCausalLM):
            slots = LlambaSlots(net, n_slots, max_context, prefill_rows=prefill_rows, compile=compile)
        else:
            slots = TeacherSlots(net, n_slots, max_context, prefill_rows=prefill_rows, compile=compile)
    if tokenizer is None:
        raise ValueError(f"{model} has no tokenizer files; the server needs one (write the student with `llamba "
                         "convert`, or copy the teacher's tokenizer.json next to it)")
    return Served(slots, tokenizer, name or Path(str(model).rstrip("/")).name, slots.max_context)


def default_prefill_chunk(device_type: str) -> int:
    """Prompt tokens prefilled between two decode steps when none are given. A GPU prefills 8,192 tokens of a batch
    of prompts in a few decode steps' time (a prompt alone is bound by its kernel launches: ~60k tokens/s in the
    server on an H100, docs/serving.md), so waiting prompts join within a few turns and the batch refills as fast as
    requests leave; a CPU would stall every stream for seconds."""
    return 8192 if device_type == "cuda" else 256


def default_prefill_rows(device_type: str) -> int:
    """Prompts prefilled together (staging rows; a teacher's hold ``max_context`` keys each) when none are given."""
    return 16 if device_type == "cuda" else 4


def build_scheduler(served: Served, max_queue: int, prefill_chunk: int, on_turn_end=None):
    from llamba.serve.scheduler import Scheduler
    from llamba.serve.text import eos_ids

    return Scheduler(served.slots, eos_ids(served.tokenizer), max_queue=max_queue, prefill_chunk=prefill_chunk,
                     on_turn_end=on_turn_end)


def build_app(served: Served, max_queue: int, prefill_chunk: int, default_max_tokens: int, stream_interval: int = 1):
    """The app with the scheduler in the same process (``LocalEngine``): one process serves HTTP and the model."""
    from llamba.serve.app import create_app
    from llamba.serve.local import LocalEngine

    engine = LocalEngine(build_scheduler(served, max_queue, prefill_chunk))
    return create_app(engine, served.tokenizer, served.name, served.max_context, default_max_tokens,
                      stream_interval)


def app_args(served: Served, default_max_tokens: int, stream_interval: int) -> dict:
    """``create_app``'s keywords for ``served`` (what an HTTP process needs of the model: no weights)."""
    return {"tokenizer": served.tokenizer, "model_name": served.name, "max_context": served.max_context,
            "default_max_tokens": default_max_tokens, "stream_interval": stream_interval}


def listening_socket(host: str, port: int) -> socket.socket:
    """Our own bound socket (port 0: a free one, ours before any server starts): uvicorn serves on it, and with
    ``--api-processes`` every HTTP process accepts from it."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(4096)
    return sock


def background_server(served: Served, max_queue: int, prefill_chunk: int, default_max_tokens: int,
                      stream_interval: int = 1, api_processes: int = 0, uvicorn_options: dict | None = None):
    """``llamba serve`` on a free loopback port for benchmarks: in this process (a thread), or with the scheduler
    here and HTTP in ``api_processes`` processes. ``uvicorn_options``: more ``uvicorn.Config`` settings (the
    host-path benchmark compares ``loop``/``http`` implementations). Use as ``with background_server(...) as
    server: server.url``."""
    if api_processes:
        return ProcessServer(build_scheduler(served, max_queue, prefill_chunk), api_processes,
                             app_args(served, default_max_tokens, stream_interval), uvicorn_options=uvicorn_options)
    return BackgroundServer(build_app(served, max_queue, prefill_chunk, default_max_tokens, stream_interval),
                            uvicorn_options=uvicorn_options)


# seconds uvicorn waits past --shutdown-timeout for the streams the scheduler has just ended to close
CLOSE_MARGIN = 5.0


def run_foreground(app, host: str, port: int, shutdown_timeout: float) -> None:
    """uvicorn in this thread. On SIGTERM or Ctrl-C it stops accepting and lets open requests finish for up to
    ``shutdown_timeout`` seconds; then the scheduler ends whatever is left with an error event ("the server is
    shutting down"), so each response closes as a response does and frees its slot, instead of uvicorn cutting the
    connection and cancelling its task (a traceback in the log, a stream the client sees break off)."""
    import uvicorn

    scheduler = app.state.api.engine.scheduler

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            if not self.should_exit:  # the first signal starts the grace period
                timer = threading.Timer(shutdown_timeout, scheduler.stop)
                timer.daemon = True  # a server whose requests all finished in time exits without waiting for it
                timer.start()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=host, port=port, log_level="info",
                            timeout_graceful_shutdown=shutdown_timeout + CLOSE_MARGIN)
    Server(config).run()


def run_foreground_processes(scheduler, args: dict, n: int, host: str, port: int, shutdown_timeout: float) -> None:
    """The scheduler in this process, HTTP in ``n`` processes on one socket (``ProcessServer``). On SIGTERM or
    Ctrl-C the HTTP processes stop accepting and let open requests finish for up to ``shutdown_timeout`` seconds;
    then the scheduler ends what is left with an error event, as ``run_foreground`` does."""
    server = ProcessServer(scheduler, n, args, host, port, shutdown_timeout + CLOSE_MARGIN, log_level="info")
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: server.stop.set())
    with server:
        while not server.stop.wait(0.5):  # until a signal, or HTTP processes that die faster than they are replaced
            pass
        server.processes.terminate()
        timer = threading.Timer(shutdown_timeout, scheduler.stop)
        timer.daemon = True
        timer.start()
        server.processes.join(shutdown_timeout + 2 * CLOSE_MARGIN)
        server.processes.stop(CLOSE_MARGIN)  # one that outlasted its grace is killed
    print(f"llamba serve: stopped after {scheduler.steps} decode steps", flush=True)


class ProcessServer:
    """``scheduler`` in this process and HTTP in ``n`` processes (``remote.ApiProcesses``, replaced if one exits)
    on ``host``:``port`` (0: a free one; ``url`` says which): ``llamba serve --api-processes`` and the loopback
    benchmarks and tests, ``with ProcessServer(scheduler, 2, app_args(...)) as server: server.url``. ``stop`` is
    set to end it (the supervisor sets it when it gives up)."""

    def __init__(self, scheduler, n: int, args: dict, host: str = "127.0.0.1", port: int = 0,
                 shutdown_timeout: float = 5.0, uvicorn_options: dict | None = None, log_level: str = "warning"):
        self.scheduler, self.n, self.args, self.shutdown_timeout = scheduler, n, args, shutdown_timeout
        self.uvicorn_options, self.log_level = uvicorn_options, log_level
        self.sock = listening_socket(host, port)
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        self.stop = threading.Event()

    def __enter__(self) -> "ProcessServer":
        from llamba.serve.remote import ApiProcesses, EngineHost

        self.engine = EngineHost(self.scheduler)
        self.scheduler.start()
        try:
            self.processes = ApiProcesses(self.engine, self.sock, self.n, self.args, self.log_level,
                                          self.shutdown_timeout, self.uvicorn_options).start()
        except BaseException:
            self._close()
            raise
        self._supervisor = threading.Thread(target=self.processes.supervise, args=(self.stop,), daemon=True)
        self._supervisor.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self._supervisor.join()
        self.processes.stop(self.shutdown_timeout + CLOSE_MARGIN)
        self._close()

    def _close(self) -> None:
        self.scheduler.stop()
        self.engine.close()
        self.sock.close()


class BackgroundServer:
    """The app on ``host``:<a free port> in a daemon thread, for loopback benchmarks and tests:
    ``with BackgroundServer(app) as server: server.url``."""

    def __init__(self, app, host: str = "127.0.0.1", shutdown_timeout: float = 5.0,
                 uvicorn_options: dict | None = None):
        import uvicorn

        self.sock = listening_socket(host, 0)
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=shutdown_timeout,
                                backlog=4096, **(uvicorn_options or {}))
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "BackgroundServer":
        import time

        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the background server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()
