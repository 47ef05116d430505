"""The OpenAI-compatible HTTP API over an engine (the scheduler in this process: ``llamba.serve.local.LocalEngine``;
or in the model's process: ``llamba.serve.remote.RemoteEngine``): it only translates. A request body is parsed here
(strict UTF-8, JSON, then a pydantic model that refuses unknown fields), checked against the model's context and
submitted; the engine's token events become text (``llamba.serve.text``) and then an OpenAI response, or server-sent
events when ``stream`` is true. Every refusal is an OpenAI error object ``{"error": {"message", "type", "param",
"code"}}`` with a 4xx status; a request that fails while generating gets a 500 (or an error event mid-stream).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from typing import Callable, Literal

from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from llamba.generation.prompts import chat_text, check_prompt_text
from llamba.generation.sampling import InvalidSamplingParam, SamplingParams
from llamba.serve.scheduler import QueueFull
from llamba.serve.text import RequestText


# -- request bodies ---------------------------------------------------------------------------------------------
class _Body(BaseModel):
    # strict: a "0.5" string is not a temperature, nor 2.0 a choice count; unknown fields are refused, not ignored
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    max_tokens: int | None = None
    temperature: float = 1.0  # OpenAI's default: a request that names no temperature samples
    top_p: float = 1.0
    top_k: int = 0  # not OpenAI's; vLLM and llama.cpp's servers take it too
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: "_StreamOptions | None" = None
    user: str | None = None  # OpenAI's end-user id: accepted, unused


class _StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class CompletionBody(_Body):
    prompt: str | list[int]


class _TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "user", "assistant"]
    content: str | list[_TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatBody(_Body):
    messages: list[_Message]


_Body.model_rebuild()
CompletionBody.model_rebuild()
ChatBody.model_rebuild()


# -- errors -----------------------------------------------------------------------------------------------------
class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.kind, self.param, self.code), status_code=self.status)


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _validation_error(err: ValidationError, fields) -> ApiError:
    first = err.errors()[0]
    param = str(first["loc"][0]) if first["loc"] else None  # the top-level field, as OpenAI's errors name it
    where = ".".join(str(p) for p in first["loc"])  # the full path, union member included ("prompt.str")
    if first["type"] == "extra_forbidden":
        accepted = f"; accepted fields: {', '.join(sorted(fields))}" if len(first["loc"]) == 1 else ""
        return ApiError(400, f"unknown field {where!r}{accepted}", param, "unknown_field")
    if first["type"] == "missing":
        return ApiError(400, f"missing required field {where!r}", param, "missing_field")
    return ApiError(400, f"{where}: {first['msg']}", param, "invalid_value")


def parse_body(raw: bytes, model: type[BaseModel]) -> BaseModel:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ApiError(400, f"the request body is not valid UTF-8 (byte {raw[err.start:err.end]!r} at offset "
                            f"{err.start}); send JSON encoded as UTF-8", None, "invalid_encoding") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ApiError(400, f"the request body is not valid JSON: {err}", None, "invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", None, "invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise _validation_error(err, model.model_fields) from None


# -- the app ----------------------------------------------------------------------------------------------------
async def _left(http: HttpRequest) -> None:
    """Returns when the client has gone (its request's body already read, the next message is the disconnect)."""
    while (await http.receive())["type"] != "http.disconnect":
        pass


class Api:
    """Request checking and response shaping for one served model."""

    def __init__(self, engine, tokenizer, model_name: str, max_context: int, default_max_tokens: int,
                 stream_interval: int = 1):
        if stream_interval < 1:
            raise ValueError(f"stream_interval must be at least 1 token, got {stream_interval}")
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.max_context, self.default_max_tokens = max_context, default_max_tokens
        # text read and sent every stream_interval tokens: the host's work per token (detokenizing, one event
        # through the event loop and the socket) bounds a GPU server's tokens/s (docs/serving.md)
        self.stream_interval = stream_interval
        self.vocab = engine.vocab_size
        self.created = int(time.time())

    def completion_prompt(self, body: CompletionBody) -> list[int]:
        if isinstance(body.prompt, list):
            if not body.prompt:
                raise ApiError(400, "prompt is an empty list of token ids; send at least one token", "prompt",
                               "invalid_value")
            bad = [t for t in body.prompt if not 0 <= t < self.vocab]
            if bad:
                raise ApiError(400, f"prompt token {bad[0]} is outside the vocabulary (0 ... {self.vocab - 1})",
                               "prompt", "invalid_value")
            return list(body.prompt)
        return self._encode(body.prompt, "prompt", special=True)

    def chat_prompt(self, body: ChatBody) -> list[int]:
        if not body.messages:
            raise ApiError(400, "messages is empty; send at least one message", "messages", "invalid_value")
        try:
            text = chat_text(self.tokenizer, [{"role": m.role, "content": m.text()} for m in body.messages])
        except ValueError as err:
            raise ApiError(400, str(err), "messages", "no_chat_template") from None
        return self._encode(text, "messages", special=False)  # the template writes the special tokens itself

    def _encode(self, text: str, param: str, special: bool) -> list[int]:
        try:
            check_prompt_text([text])
        except ValueError as err:
            raise ApiError(400, str(err), param, "invalid_value") from None
        ids = self.tokenizer(text, add_special_tokens=special)["input_ids"]
        if not ids:
            raise ApiError(400, f"{param} has no tokens: there is nothing to continue from", param, "invalid_value")
        return ids

    async def submit(self, body: _Body, prompt: list[int]) -> tuple[Callable[..., None], asyncio.Queue]:
        """Check ``body`` against this server, submit it; returns its ``cancel`` and the queue of its text events."""
        if body.model != self.model_name:
            raise ApiError(404, f"model {body.model!r} is not served here; this server serves {self.model_name!r} "
                                "(GET /v1/models)", "model", "model_not_found")
        room = self.max_context - len(prompt)
        if room < 1:
            raise ApiError(400, f"the prompt has {len(prompt)} tokens; this server's context holds "
                                f"{self.max_context}, so a prompt may have at most {self.max_context - 1}",
                           "messages" if isinstance(body, ChatBody) else "prompt", "context_length_exceeded")
        max_tokens = body.max_tokens if body.max_tokens is not None else min(self.default_max_tokens, room)
        if max_tokens < 1:
            raise ApiError(400, f"max_tokens must be at least 1, got {max_tokens}", "max_tokens", "invalid_value")
        if max_tokens > room:
            raise ApiError(400, f"the context holds {self.max_context} tokens; the prompt has {len(prompt)} and "
                                f"max_tokens asks for {max_tokens} more; ask for at most {room}",
                           "max_tokens", "context_length_exceeded")
        try:
            params = SamplingParams.from_temperature(body.temperature, body.top_k, body.top_p, body.min_p,
                                                     body.repetition_penalty)
        except InvalidSamplingParam as err:
            raise ApiError(400, str(err), err.param, "invalid_value") from None
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if any(not s for s in stop):
            raise ApiError(400, "stop strings must not be empty", "stop", "invalid_value")
        if body.n > self.engine.n_slots:
            raise ApiError(400, f"n={body.n} choices need as many batch slots; this server has "
                                f"{self.engine.n_slots} (llamba serve --max-batch)", "n", "invalid_value")
        events: asyncio.Queue = asyncio.Queue()
        cancel = None
        early: list[int] = []  # choices a stop string ended before the engine answered (a remote one's tokens
        # can arrive before its "accepted")

        def end_choice(index: int) -> None:
            if cancel is None:
                early.append(index)
            else:
                cancel(index)

        text = RequestText(self.tokenizer, prompt, body.n, stop, self.stream_interval, events.put_nowait, end_choice)
        try:
            cancel = await self.engine.submit(prompt, max_tokens, params, body.n, body.seed, text.on_event)
        except QueueFull as err:
            raise ApiError(429, str(err), None, "queue_full", "rate_limit_exceeded") from None
        for index in early:
            cancel(index)
        return cancel, events

    # -- responses ------------------------------------------------------------------------------------------------
    async def respond(self, http: HttpRequest, body: _Body, prompt: list[int]):
        cancel, events = await self.submit(body, prompt)
        chat = isinstance(body, ChatBody)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(self._stream(cancel, events, len(prompt), body.n, rid, chat, include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        # the answer, or the client leaving first (its connection's next message is the disconnect, the body having
        # been read): then the slots are freed at once, not when the answer is done
        collect, gone = asyncio.ensure_future(self._collect(events, body.n)), asyncio.ensure_future(_left(http))
        try:
            await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            collect.cancel()
            cancel()  # a no-op once it finished
        if not collect.done() or collect.cancelled():
            return JSONResponse(error_body("client disconnected", "client_error"), status_code=499)
        texts, reasons, tokens, error = collect.result()
        if error is not None:
            return ApiError(500, f"generation failed: {error}", None, "generation_failed", "server_error").response()
        if chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None,
                        "finish_reason": r} for i, (t, r) in enumerate(zip(texts, reasons))]
        else:
            choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": r}
                       for i, (t, r) in enumerate(zip(texts, reasons))]
        return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion",
                             "created": int(time.time()), "model": self.model_name, "choices": choices,
                             "usage": self._usage(len(prompt), tokens)})

    @staticmethod
    async def _collect(events: asyncio.Queue, n: int) -> tuple[list[str], list, int, str | None]:
        """A non-streaming answer's ``n`` texts, finish reasons and token count, or the error that ended it."""
        texts, reasons, tokens = [""] * n, [None] * n, 0
        while any(r is None for r in reasons):
            event = await events.get()
            if event.kind == "error":
                return texts, reasons, tokens, event.text
            if event.kind == "text":
                texts[event.index] += event.text
            else:
                reasons[event.index], tokens = event.reason, tokens + event.tokens
        return texts, reasons, tokens, None

    @staticmethod
    def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    async def _stream(self, cancel, events: asyncio.Queue, prompt_tokens: int, n: int, rid: str, chat: bool,
                      include_usage: bool):
        created = int(time.time())

        def chunk(choices: list, **extra) -> str:
            obj = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
                   "model": self.model_name, "choices": choices, **extra}
            return f"data: {json.dumps(obj)}\n\n"

        def choice(index: int, text: str | None, reason: str | None) -> dict:
            if chat:
                delta = {} if text is None else {"content": text}
                return {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}
            return {"index": index, "text": text or "", "logprobs": None, "finish_reason": reason}

        try:
            if chat:
                for i in range(n):
                    yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}])
            done, tokens = 0, 0
            while done < n:
                event = await events.get()
                if event.kind == "error":
                    body = error_body(f"generation failed: {event.text}", "server_error", None, "generation_failed")
                    yield f"data: {json.dumps(body)}\n\n"
                    break
                if event.kind == "text":
                    yield chunk([choice(event.index, event.text, None)])
                else:
                    done, tokens = done + 1, tokens + event.tokens
                    yield chunk([choice(event.index, None, event.reason)])
            else:
                if include_usage:
                    yield chunk([], usage=self._usage(prompt_tokens, tokens))
            yield "data: [DONE]\n\n"
        finally:
            cancel()  # frees the slots at once when the client left mid-stream


def create_app(engine, tokenizer, model_name: str, max_context: int, default_max_tokens: int = 256,
               stream_interval: int = 1, manage_engine: bool = True) -> FastAPI:
    """The ASGI app over ``engine`` (a ``LocalEngine`` or a ``remote.RemoteEngine``). With ``manage_engine`` its
    lifespan starts the engine and, at shutdown (after uvicorn has let the open requests finish), stops it."""
    api = Api(engine, tokenizer, model_name, max_context, default_max_tokens, stream_interval)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if manage_engine:
            await engine.start()
        yield
        if manage_engine:
            await engine.stop()

    app = FastAPI(title="llamba serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.api = api

    @app.exception_handler(ApiError)
    async def _api_error(_, err: ApiError):
        return err.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_, err: StarletteHTTPException):
        return JSONResponse(error_body(str(err.detail), "invalid_request_error", None, str(err.status_code)),
                            status_code=err.status_code)

    @app.post("/v1/completions")
    async def completions(http: HttpRequest):
        body = parse_body(await http.body(), CompletionBody)
        return await api.respond(http, body, api.completion_prompt(body))

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HttpRequest):
        body = parse_body(await http.body(), ChatBody)
        return await api.respond(http, body, api.chat_prompt(body))

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": api.created,
                                            "owned_by": "llamba"}]}

    @app.get("/health")
    async def health():
        stats = await engine.stats()
        return JSONResponse({"status": "ok" if stats["running"] else "stopped", **stats},
                            status_code=200 if stats["running"] else 503)

    return app
