"""``llamba serve`` on loopback with a tiny random student: the official openai client, continuous batching that
never changes a result, OpenAI-style errors for bad input, a failing request that fails alone, disconnects that
free their slot, 429 past the queue, and SIGTERM (through the real command, in a subprocess). Each runs in both
layouts: HTTP in the model's process, and HTTP in two processes of its own (``--api-processes 2``)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from conftest import make_tiny_student, make_word_tokenizer  # noqa: E402
from llamba.serve.app import create_app  # noqa: E402
from llamba.serve.local import LocalEngine  # noqa: E402
from llamba.serve.scheduler import Scheduler  # noqa: E402
from llamba.serve.server import BackgroundServer, ProcessServer  # noqa: E402
from llamba.serve.text import eos_ids  # noqa: E402
from llamba.serve.slots import LlambaSlots  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_cpu_thread"), pytest.mark.timeout(120)]

MODEL = "tiny"
CONTEXT = 256
CHAT_TEMPLATE = "{% for m in messages %}w2 {{ m['content'] }} w3 {% endfor %}w4"  # w2 ... w3 per turn, w4: reply


def tiny_model():
    """Untied float64: greedy outputs vary with the state (a tied tiny model repeats its last token), and no
    float rounding can make a batched step pick another token than a lone one. Its EOS (w1) row of the head is
    doubled so that some greedy continuations end on EOS within a few tokens and others run to max_tokens."""
    model = make_tiny_student(seed=0, tied=False).double()
    with torch.no_grad():
        model.lm_head.weight[1] *= 2
    return model


def tiny_tokenizer():
    tokenizer = make_word_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def words(ids) -> str:
    return " ".join(f"w{i}" for i in ids)


def ids_of(text: str) -> list[int]:
    return [int(w[1:]) for w in text.split()]


@torch.inference_mode()
def alone(model, prompt: list[int], max_tokens: int, eos: int = 1) -> list[int]:
    """The greedy tokens of one prompt by itself: whole-prompt prefill, then the model's step, batch 1."""
    cache = model.allocate_cache(1)
    logits = model(torch.tensor([prompt]), past_key_values=cache, use_cache=True, logits_to_keep=1).logits[0, -1]
    out = []
    for _ in range(max_tokens):
        out.append(int(logits.argmax()))
        if out[-1] == eos:
            break
        logits = model(torch.tensor([[out[-1]]]), past_key_values=cache, use_cache=True).logits[0, -1]
    return out


class FaultySlots(LlambaSlots):
    """Fails the prefill of any prompt holding token 99 (a fault inside one request's generation), and with
    ``delay`` sleeps in every decode step (so that a request stays in its slot long enough to be watched)."""

    delay = 0.0

    def prefill(self, ids, mask=None):
        if bool((ids == 99).any()):
            raise RuntimeError("injected prefill fault")
        return super().prefill(ids, mask)

    def decode(self, slots, tokens):
        time.sleep(self.delay)
        return super().decode(slots, tokens)


LAYOUTS = {"one-process": 0, "api-processes": 2}  # HTTP processes beside the model's
LONG = {"model": MODEL, "prompt": "w7", "max_tokens": 200, "temperature": 0}  # no EOS in 200 greedy tokens (checked)


def start_server(n_slots=8, max_queue=64, prefill_chunk=16, delay=0.0, api_processes=0):
    model = tiny_model()
    slots = FaultySlots(model, n_slots, CONTEXT, prefill_rows=4)  # a faulty prompt may share a batch with others
    slots.delay = delay
    tokenizer = tiny_tokenizer()
    scheduler = Scheduler(slots, eos_ids(tokenizer), max_queue=max_queue, prefill_chunk=prefill_chunk)
    app_args = {"tokenizer": tokenizer, "model_name": MODEL, "max_context": CONTEXT, "default_max_tokens": 16}
    if api_processes:
        return model, ProcessServer(scheduler, api_processes, app_args)
    return model, BackgroundServer(create_app(LocalEngine(scheduler), **app_args))


@pytest.fixture(scope="module", params=list(LAYOUTS))
def server(request):
    model, background = start_server(api_processes=LAYOUTS[request.param])
    with background:
        background.model = model
        yield background


def client(server) -> "openai.OpenAI":
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30)


def post(server, path: str, body: bytes, headers=None) -> tuple[int, dict]:
    url = urlparse(server.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    status, data = response.status, json.loads(response.read())
    conn.close()
    return status, data


def get(server, path: str) -> dict:
    url = urlparse(server.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    conn.request("GET", path)
    data = json.loads(conn.getresponse().read())
    conn.close()
    return data


def wait_for(condition, what: str, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


# -- the openai client ------------------------------------------------------------------------------------------
def test_openai_client_completions_chat_and_streaming(server):
    c, prompt = client(server), [5, 27, 33, 8, 41]  # (no w10-w19 in text: the EOS w1 splits them)
    expected = alone(server.model, prompt, 12)
    assert 1 not in expected  # (the checks below assume no EOS in these 12 tokens)

    out = c.completions.create(model=MODEL, prompt=words(prompt), max_tokens=12, temperature=0)
    assert ids_of(out.choices[0].text) == expected and out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (5, 12, 17)
    assert out.object == "text_completion" and out.model == MODEL

    # a token-id prompt is the same prompt
    assert c.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0).choices[0].text == \
        out.choices[0].text

    # streaming: the chunks add up to the same text, the last one says why it ended (the client reads [DONE])
    chunks = list(c.completions.create(model=MODEL, prompt=words(prompt), max_tokens=12, temperature=0, stream=True,
                                       stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == out.choices[0].text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12

    # a stop string: the text ends before it, finish_reason "stop"; the stopping token still counts as generated
    stop = f" w{expected[4]}"
    cut = expected.index(expected[4])
    out = c.completions.create(model=MODEL, prompt=words(prompt), max_tokens=12, temperature=0, stop=[stop, " w999"])
    assert ids_of(out.choices[0].text) == expected[:cut] and out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens == cut + 1

    # chat: the tokenizer's chat template wraps the messages
    messages = [{"role": "system", "content": "w7"}, {"role": "user", "content": "w5 w6"}]
    template_ids = [2, 7, 3, 2, 5, 6, 3, 4]
    chat = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0)
    expected = alone(server.model, template_ids, 6)
    reason = "stop" if expected[-1] == 1 else "length"  # EOS ends it (and is not text)
    assert ids_of(chat.choices[0].message.content) == expected[:len(expected) - (reason == "stop")]
    assert chat.choices[0].finish_reason == reason and chat.usage.completion_tokens == len(expected)
    assert chat.choices[0].message.role == "assistant" and chat.usage.prompt_tokens == len(template_ids)
    streamed = list(c.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0,
                                              stream=True))
    assert streamed[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in streamed) == chat.choices[0].message.content
    assert streamed[-1].choices[0].finish_reason == reason

    assert [m.id for m in c.models.list().data] == [MODEL]
    assert get(server, "/health")["status"] == "ok"


def test_eos_finishes_with_stop(server):
    """A prompt whose greedy continuation reaches EOS (w1) within 40 tokens ends there with finish_reason stop."""
    g = torch.Generator().manual_seed(5)
    for _ in range(200):
        prompt = torch.randint(2, 99, (6,), generator=g).tolist()
        expected = alone(server.model, prompt, 40)
        if expected[-1] == 1:
            break
    else:
        pytest.fail("no prompt of the tiny model reaches EOS; pick another seed")
    out = client(server).completions.create(model=MODEL, prompt=prompt, max_tokens=40, temperature=0)
    assert ids_of(out.choices[0].text) == expected[:-1] and out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens == len(expected)


# -- continuous batching ----------------------------------------------------------------------------------------
def test_batching_never_changes_results(server):
    """32 concurrent greedy requests (prompts of 1 to 40 tokens, prefilled in pieces of 8, 8 slots: they queue,
    join at token boundaries and leave at different times) each get exactly the tokens it gets alone."""
    g = torch.Generator().manual_seed(0)
    jobs = [(torch.randint(2, 99, (1 + (7 * i) % 40,), generator=g).tolist(), 4 + (5 * i) % 20) for i in range(32)]
    expected = [alone(server.model, p, m) for p, m in jobs]
    c = client(server)
    steps_before = get(server, "/health")["decode_steps"]

    def ask(job):
        out = c.completions.create(model=MODEL, prompt=job[0], max_tokens=job[1], temperature=0)
        return ids_of(out.choices[0].text) + ([1] if out.choices[0].finish_reason == "stop" else [])

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        got = list(pool.map(ask, jobs))
    for i, (g_, e) in enumerate(zip(got, expected)):
        assert g_ == e, f"request {i} (prompt of {len(jobs[i][0])} tokens): {g_} != {e} alone"
    # one at a time, each token after a request's first (which its prefill gives) would be a decode step of its own
    one_at_a_time = sum(len(e) - 1 for e in expected)
    steps = get(server, "/health")["decode_steps"] - steps_before
    assert steps < one_at_a_time // 2, f"{steps} decode steps for {one_at_a_time} tokens: the requests were not batched"


def test_seeded_sampling_does_not_depend_on_neighbours(server):
    c = client(server)
    kwargs = dict(model=MODEL, prompt="w5 w9 w22", max_tokens=10, temperature=1.0, top_p=0.95, seed=1234,
                  extra_body={"top_k": 40, "min_p": 0.01, "repetition_penalty": 1.2})  # beyond OpenAI's fields
    by_itself = c.completions.create(**kwargs).choices[0].text

    def noisy(i):  # sampled neighbours with seeds of their own
        return c.completions.create(model=MODEL, prompt=f"w{3 + i} w7", max_tokens=15, temperature=0.9,
                                    seed=i).choices[0].text

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        neighbours = [pool.submit(noisy, i) for i in range(6)]
        among_others = pool.submit(lambda: c.completions.create(**kwargs).choices[0].text).result()
        [f.result() for f in neighbours]
    assert among_others == by_itself
    two = c.completions.create(**{**kwargs, "n": 2})
    assert sorted(ch.index for ch in two.choices) == [0, 1] and two.usage.completion_tokens == 20
    assert two.choices[0].text == by_itself  # choice k draws with seed + k
    assert two.choices[1].text != by_itself


def test_a_stop_string_in_tokens_that_come_before_the_engine_answers_ends_its_choice():
    """A remote engine's first tokens can reach the HTTP process before its "accepted": a stop string they complete
    ends the choice there, and the scheduler is told once ``submit`` has the request's cancel."""
    import asyncio

    from llamba.serve.app import Api, CompletionBody
    from llamba.serve.scheduler import Event

    cancelled = []

    class EarlyEngine:
        n_slots, vocab_size = 2, 100

        async def submit(self, prompt, max_tokens, params, n, seed, on_event):
            on_event(Event("token", 0, 9))  # " w9": the stop string, before the answer
            return lambda index=None: cancelled.append(index)

    api = Api(EarlyEngine(), tiny_tokenizer(), MODEL, CONTEXT, 16)
    body = CompletionBody(model=MODEL, prompt="w5", max_tokens=3, stop=["w9"], temperature=0.0)
    _, events = asyncio.run(api.submit(body, [5]))
    assert cancelled == [0]
    sent = [events.get_nowait() for _ in range(events.qsize())]
    assert (sent[-1].kind, sent[-1].reason) == ("finish", "stop")


# -- bad input ----------------------------------------------------------------------------------------------------
GOOD = {"model": MODEL, "prompt": "w5 w6", "max_tokens": 3, "temperature": 0}
BAD_INPUTS = [  # (path, body, status, param)
    ("/v1/completions", b'{"model": "tiny", "prompt": "w5",', 400, None),                   # malformed JSON
    ("/v1/completions", b'["not", "an", "object"]', 400, None),
    ("/v1/completions", b'{"model": "tiny", "prompt": "w5 \xff\xfe"}', 400, None),          # not UTF-8
    ("/v1/completions", json.dumps({**GOOD, "best_of": 2}).encode(), 400, "best_of"),     # unknown field
    ("/v1/completions", json.dumps({**GOOD, "model": "gpt-4"}).encode(), 404, "model"),
    ("/v1/completions", json.dumps({k: v for k, v in GOOD.items() if k != "prompt"}).encode(), 400, "prompt"),
    ("/v1/completions", json.dumps({**GOOD, "max_tokens": 0}).encode(), 400, "max_tokens"),
    ("/v1/completions", json.dumps({**GOOD, "max_tokens": -5}).encode(), 400, "max_tokens"),
    ("/v1/completions", json.dumps({**GOOD, "max_tokens": CONTEXT}).encode(), 400, "max_tokens"),  # past context
    ("/v1/completions", json.dumps({**GOOD, "max_tokens": "3"}).encode(), 400, "max_tokens"),
    ("/v1/completions", json.dumps({**GOOD, "prompt": " ".join(["w5"] * CONTEXT)}).encode(), 400, "prompt"),
    ("/v1/completions", json.dumps({**GOOD, "prompt": ""}).encode(), 400, "prompt"),
    ("/v1/completions", json.dumps({**GOOD, "prompt": []}).encode(), 400, "prompt"),
    ("/v1/completions", json.dumps({**GOOD, "prompt": [5, 100]}).encode(), 400, "prompt"),
    ("/v1/completions", json.dumps({**GOOD, "temperature": -0.5}).encode(), 400, "temperature"),
    ("/v1/completions", b'{"model": "tiny", "prompt": "w5", "temperature": NaN}', 400, "temperature"),
    ("/v1/completions", json.dumps({**GOOD, "top_p": 0}).encode(), 400, "top_p"),
    ("/v1/completions", json.dumps({**GOOD, "top_p": 1.5}).encode(), 400, "top_p"),
    ("/v1/completions", json.dumps({**GOOD, "top_k": -1}).encode(), 400, "top_k"),
    ("/v1/completions", json.dumps({**GOOD, "min_p": 2}).encode(), 400, "min_p"),
    ("/v1/completions", json.dumps({**GOOD, "repetition_penalty": 0}).encode(), 400, "repetition_penalty"),
    ("/v1/completions", json.dumps({**GOOD, "n": 0}).encode(), 400, "n"),
    ("/v1/completions", json.dumps({**GOOD, "n": 9}).encode(), 400, "n"),   # more choices than slots
    ("/v1/completions", json.dumps({**GOOD, "stop": [""]}).encode(), 400, "stop"),
    ("/v1/chat/completions", json.dumps({"model": MODEL, "messages": []}).encode(), 400, "messages"),
    ("/v1/chat/completions", json.dumps({"model": MODEL, "messages": [{"role": "user"}]}).encode(), 400, "messages"),
    ("/v1/chat/completions", json.dumps({"model": MODEL, "messages": [{"role": "robot", "content": "w5"}]}).encode(),
     400, "messages"),
    ("/v1/nowhere", json.dumps(GOOD).encode(), 404, None),
]


@pytest.mark.parametrize("path,body,status,param", BAD_INPUTS,
                         ids=[f"{i}-{b[:40]!r}" for i, (_, b, _, _) in enumerate(BAD_INPUTS)])
def test_bad_input_gets_an_openai_error_and_the_next_request_is_served(server, path, body, status, param):
    got, data = post(server, path, body)
    assert got == status, data
    error = data["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    assert error["param"] == param, error
    got, data = post(server, "/v1/completions", json.dumps(GOOD).encode())
    assert got == 200 and data["choices"][0]["finish_reason"] == "length", data


def test_the_openai_client_raises_on_bad_input(server):
    with pytest.raises(openai.BadRequestError, match="top_p"):
        client(server).completions.create(model=MODEL, prompt="w5", max_tokens=3, top_p=1.5)
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client(server).completions.create(model="other", prompt="w5", max_tokens=3)


def test_a_fault_in_one_request_fails_it_alone(server):
    c = client(server)
    good = [([5 + i, 6, 7], 8) for i in range(6)]

    def ask(prompt):
        return c.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0).choices[0].text

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        fine = [pool.submit(ask, p) for p, _ in good]
        with pytest.raises(openai.InternalServerError, match="injected prefill fault"):
            ask([5, 99, 7])
        assert [ids_of(f.result()) for f in fine] == [alone(server.model, p, m) for p, m in good]
    # streaming: the failure arrives as an error event, which the client raises
    with pytest.raises(openai.APIError, match="injected prefill fault"):
        list(c.completions.create(model=MODEL, prompt=[5, 99], max_tokens=4, stream=True))
    assert wait_for(lambda: get(server, "/health")["busy_slots"] == 0, "the slots to be free")


# -- slots and the queue: a server whose decode steps are slowed down -------------------------------------------
def open_stream(url: str, body: dict) -> socket.socket:
    """A raw streaming request, read up to its first event: the caller can then drop the connection."""
    u = urlparse(url)
    sock = socket.create_connection((u.hostname, u.port), timeout=10)
    data = json.dumps({**body, "stream": True}).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
    received = b""
    while b"data: " not in received:
        received += sock.recv(4096)
        assert received.startswith(b"HTTP/1.1 200") or b"\r\n\r\n" not in received, received
    return sock


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_disconnect_frees_the_slot_and_the_queue_bound_gives_429(layout):
    # 20 ms a step: 200 tokens take 4 s, unless the server frees the slot
    model, background = start_server(n_slots=2, max_queue=1, delay=0.02, api_processes=LAYOUTS[layout])
    assert len(alone(model, [7], 200)) == 200  # the long request runs its 200 tokens (no EOS on the way)
    with background as server:
        long = LONG
        a, b = open_stream(server.url, long), open_stream(server.url, long)
        assert get(server, "/health")["busy_slots"] == 2
        queued = concurrent.futures.ThreadPoolExecutor(1).submit(
            post, server, "/v1/completions", json.dumps({**long, "max_tokens": 5}).encode())
        wait_for(lambda: get(server, "/health")["waiting"] == 1, "the third request to queue")
        status, data = post(server, "/v1/completions", json.dumps(long).encode())
        assert status == 429 and data["error"]["type"] == "rate_limit_exceeded", data
        with pytest.raises(openai.RateLimitError):
            client(server).completions.create(**long)

        started = time.monotonic()
        a.close()  # the client leaves mid-stream: its slot goes to the queued request at once, not in 4 s
        status, data = queued.result(timeout=10)
        assert status == 200 and data["usage"]["completion_tokens"] == 5
        assert time.monotonic() - started < 2.0
        b.close()
        wait_for(lambda: get(server, "/health")["busy_slots"] == 0, "the second stream's slot to be freed", 2.0)

        # a client of a non-streaming request that leaves is noticed too (its disconnect message)
        u = urlparse(server.url)
        sock = socket.create_connection((u.hostname, u.port), timeout=10)
        data = json.dumps(long).encode()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
        wait_for(lambda: get(server, "/health")["busy_slots"] == 1, "the request to take a slot")
        sock.close()
        wait_for(lambda: get(server, "/health")["busy_slots"] == 0, "the non-streaming request's slot", 2.0)
        out = client(server).completions.create(model=MODEL, prompt="w5", max_tokens=3, temperature=0)
        assert out.usage.completion_tokens == 3


def test_an_http_process_that_dies_frees_its_requests_slots_and_is_replaced():
    """--api-processes: an HTTP process killed mid-stream closes its link, and the model's process cancels its
    requests at once (their slots do not wait out their 200 tokens); a new HTTP process replaces it."""
    model, background = start_server(n_slots=2, max_queue=1, delay=0.02, api_processes=1)
    assert len(alone(model, [7], 200)) == 200  # the stream would hold its slot for 4 s
    with background as server:
        a = open_stream(server.url, LONG)
        assert server.scheduler.stats()["busy_slots"] == 1
        dead = server.processes.processes[0]
        dead.kill()
        wait_for(lambda: server.scheduler.stats()["busy_slots"] == 0, "the dead process's slot to be freed", 2.0)
        a.close()
        # and another takes its place: the server answers again
        wait_for(lambda: server.processes.processes[0] is not dead and server.engine.connected == 1,
                 "a new HTTP process to connect", 60)
        out = client(server).completions.create(model=MODEL, prompt="w5", max_tokens=3, temperature=0)
        assert out.usage.completion_tokens == 3


def test_http_processes_that_keep_dying_stop_the_supervisor(monkeypatch):
    """More exits than ``RESTARTS_PER_MINUTE`` is not a crash to recover from: ``supervise`` gives up (the
    foreground server then stops) instead of starting processes forever."""
    from llamba.serve.remote import ApiProcesses

    monkeypatch.setattr(ApiProcesses, "RESTARTS_PER_MINUTE", 0)
    _, background = start_server(api_processes=1)
    with background as server:
        server.stop.set()  # the context's own supervisor steps aside; this test runs one
        server._supervisor.join()
        server.processes.processes[0].kill()
        stop = threading.Event()
        assert server.processes.supervise(stop, every=0.05) is False and stop.is_set()


# -- the command, and SIGTERM ---------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_process(tmp_path, *extra: str):
    """`llamba serve` as a user starts it (a tiny student, CPU), up and answering; yields (process, base url)."""
    from llamba.checkpoint import save_student

    folder = save_student(make_tiny_student(tied=False), tiny_tokenizer(), tmp_path / "student")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "llamba.cli", "serve", "--model", str(folder), "--port", str(port),
                             "--device", "cpu", "--threads", "1", "--max-batch", "2", "--max-context", "4096", *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def up():
            try:
                return http.client.HTTPConnection("127.0.0.1", port, timeout=1).request("GET", "/health") or True
            except OSError:
                assert proc.poll() is None, proc.stdout.read()
                return False

        wait_for(up, "the server to start", 60)
        yield proc, f"http://127.0.0.1:{port}"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def stopped_cleanly(proc) -> None:
    # uvicorn re-raises the SIGTERM it handled once it has shut down: the exit status says "terminated"
    assert proc.wait(30) in (0, -signal.SIGTERM)
    log = proc.stdout.read()
    assert "llamba serve: stopped" in log and "Traceback" not in log, log


COMMAND_LAYOUTS = {"one-process": (), "api-processes": ("--api-processes", "2")}


@pytest.mark.parametrize("layout", list(COMMAND_LAYOUTS))
def test_llamba_serve_command_finishes_open_streams_on_sigterm(tmp_path, layout):
    with serve_process(tmp_path, *COMMAND_LAYOUTS[layout]) as (proc, url):
        c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        stream = c.completions.create(model="student", prompt="w5 w6", max_tokens=1000, temperature=0, stream=True)
        chunks = [next(iter(stream))]
        proc.send_signal(signal.SIGTERM)  # mid-stream (1000 tokens take seconds): uvicorn lets this stream finish
        chunks += list(stream)
        assert chunks[-1].choices[0].finish_reason == "length"
        assert len(ids_of("".join(ch.choices[0].text for ch in chunks))) == 1000
        stopped_cleanly(proc)


@pytest.mark.parametrize("layout", list(COMMAND_LAYOUTS))
def test_llamba_serve_command_ends_what_outlasts_its_shutdown_timeout(tmp_path, layout):
    """A stream that cannot finish within --shutdown-timeout is ended by the server with an error event that says
    why (the openai client raises it), not cut off; the server then stops cleanly, its scheduler too, with no
    traceback in its log."""
    with serve_process(tmp_path, "--shutdown-timeout", "0.5", *COMMAND_LAYOUTS[layout]) as (proc, url):
        c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        stream = c.completions.create(model="student", prompt="w5 w6", max_tokens=4000, temperature=0, stream=True)
        chunks = [next(iter(stream))]
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        with pytest.raises(openai.APIError, match="shutting down"):
            chunks += list(stream)
        assert len(ids_of("".join(ch.choices[0].text for ch in chunks if ch.choices))) < 4000
        stopped_cleanly(proc)
        assert time.monotonic() - start < 20


def test_the_raw_stream_is_openai_server_sent_events(server):
    """What a client that is not the openai library reads: `data: {json}` events, n choices interleaved by index,
    each choice's finish_reason, the usage chunk when asked, and `data: [DONE]` last."""
    url = urlparse(server.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    body = {"model": MODEL, "prompt": [5, 27, 33], "max_tokens": 5, "n": 2, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200 and response.getheader("content-type").startswith("text/event-stream")
    lines = [line for line in response.read().decode().split("\n") if line]
    conn.close()
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == sum(
        len(alone(server.model, [5, 27, 33], 5)) for _ in range(2))
    texts, finish = {0: "", 1: ""}, {}
    for event in events[:-1]:
        assert event["object"] == "text_completion" and len(event["choices"]) == 1
        choice = event["choices"][0]
        texts[choice["index"]] += choice["text"]
        if choice["finish_reason"]:
            finish[choice["index"]] = choice["finish_reason"]
    expected = alone(server.model, [5, 27, 33], 5)
    assert texts[0] == texts[1] and ids_of(texts[0]) == [t for t in expected if t != 1]  # greedy: choices alike
    assert finish == {0: "stop" if 1 in expected else "length", 1: "stop" if 1 in expected else "length"}
