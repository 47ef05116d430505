"""Building a served model from a path, and running the app under uvicorn: in the foreground (``llamba serve``:
uvicorn's SIGTERM / Ctrl-C handling and graceful shutdown) or in a background thread on a port of its own
(``llamba bench serve`` and the tests)."""

from __future__ import annotations

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
                quant: str | None = None, threads: int | None = None, name: str | None = None) -> Served:
    """A student checkpoint, a quantized artifact (or a student with ``quant``: the CPU runtime) or a teacher,
    loaded as ``llamba generate`` loads them, in a slot cache of ``n_slots`` rows."""
    import torch

    from llamba.cli.common import resolve_device, resolve_dtype
    from llamba.cli.generate import wants_quant_runtime
    from llamba.serve.slots import LlambaSlots, QuantSlots, TeacherSlots

    device = resolve_device(device_name)
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
            slots = LlambaSlots(net, n_slots, max_context)
        else:
            slots = TeacherSlots(net, n_slots, max_context)
    if tokenizer is None:
        raise ValueError(f"{model} has no tokenizer files; the server needs one (write the student with `llamba "
                         "convert`, or copy the teacher's tokenizer.json next to it)")
    return Served(slots, tokenizer, name or Path(str(model).rstrip("/")).name, slots.max_context)


def default_prefill_chunk(device_type: str) -> int:
    """Prompt tokens prefilled between two decode steps when none are given. A GPU prefills 2,048 tokens of one
    prompt in a few decode steps' time (~300-500k tokens/s from the host: results/bench-h100.md), so a long prompt
    joins in one turn and the batch refills as fast as requests leave; a CPU would stall every stream for seconds."""
    return 2048 if device_type == "cuda" else 256


def build_app(served: Served, max_queue: int, prefill_chunk: int, default_max_tokens: int, stream_interval: int = 1):
    from llamba.serve.app import create_app
    from llamba.serve.scheduler import Scheduler

    scheduler = Scheduler(served.slots, served.tokenizer, max_queue=max_queue, prefill_chunk=prefill_chunk,
                          stream_interval=stream_interval)
    return create_app(scheduler, served.tokenizer, served.name, served.max_context, default_max_tokens)


# seconds uvicorn waits past --shutdown-timeout for the streams the scheduler has just ended to close
CLOSE_MARGIN = 5.0


def run_foreground(app, host: str, port: int, shutdown_timeout: float) -> None:
    """uvicorn in this thread. On SIGTERM or Ctrl-C it stops accepting and lets open requests finish for up to
    ``shutdown_timeout`` seconds; then the scheduler ends whatever is left with an error event ("the server is
    shutting down"), so each response closes as a response does and frees its slot, instead of uvicorn cutting the
    connection and cancelling its task (a traceback in the log, a stream the client sees break off)."""
    import uvicorn

    scheduler = app.state.api.scheduler

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


class BackgroundServer:
    """The app on ``host``:<a free port> in a daemon thread, for loopback benchmarks and tests:
    ``with BackgroundServer(app) as server: server.url``."""

    def __init__(self, app, host: str = "127.0.0.1", shutdown_timeout: float = 5.0):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))  # our own socket on port 0: the port is ours before uvicorn starts, no race
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=shutdown_timeout,
                                backlog=4096)
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
