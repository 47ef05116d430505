"""A request's text, from the scheduler's token events: incremental detokenization, stop strings and the stream
interval. This is the HTTP side's work and runs on its event loop's thread (in the model's process, or in each of
``llamba serve --api-processes``), so that a decode step costs the model's process one token id per sequence.

Detokenization reads every token (a stop string may end on any) and sends every ``interval`` tokens. With a fast
tokenizer it is ``tokenizers``' own ``DecodeStream`` (one Rust step a token); ``Redecode`` is its plain twin, the
same algorithm through the tokenizer's ``decode`` (two decodes a token: 7x slower on SmolLM2's tokenizer,
``benchmarks/detokenize.py``), used where a tokenizer has no ``tokenizers`` backend and in the tests that hold the
two equal.
"""

from __future__ import annotations

from typing import Callable

from llamba.serve.scheduler import Event

try:
    from tokenizers.decoders import DecodeStream
except ImportError:  # tokenizers < 0.21
    DecodeStream = None

PROMPT_TAIL = 6  # prompt tokens decoded ahead of the new ones, so the first new token's text keeps its spacing


def eos_ids(tokenizer) -> set[int]:
    """The token ids that end a sequence, as the tokenizer names them (one id or several)."""
    eos = tokenizer.eos_token_id
    return {eos} if isinstance(eos, int) else set(eos or ())


class Redecode:
    """Incremental detokenization by decoding from a few tokens back: the text the tokens since the last read
    added, kept back while it ends in U+FFFD (an unfinished UTF-8 character the next tokens complete). Starts
    after ``prefix``, the prompt's tail, so that the first new token keeps its leading space."""

    def __init__(self, tokenizer, prefix: list[int]):
        self.tokenizer, self.ids = tokenizer, list(prefix)
        self.prefix_at, self.read_at = 0, len(self.ids)

    def step(self, token: int) -> str:
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self.prefix_at:self.read_at], skip_special_tokens=True)
        after = self.tokenizer.decode(self.ids[self.prefix_at:], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix_at, self.read_at = self.read_at, len(self.ids)
            return after[len(before):]
        return ""


class Stream:
    """The same, by ``tokenizers.decoders.DecodeStream`` over the tokenizer's ``tokenizers`` backend."""

    def __init__(self, backend, prefix: list[int]):
        self.backend, self.stream = backend, DecodeStream(skip_special_tokens=True)
        for token in prefix:  # stepped, not DecodeStream(ids=...): that start dropped the first new text
            self.stream.step(backend, token)

    def step(self, token: int) -> str:
        return self.stream.step(self.backend, token) or ""


def incremental_decoder(tokenizer, prefix: list[int]):
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if DecodeStream is not None and backend is not None:
        return Stream(backend, prefix)
    return Redecode(tokenizer, prefix)


class _ChoiceText:
    """One choice's text so far, and how much of it has been sent."""

    def __init__(self, index: int, tokenizer, prompt: list[int], stop: list[str], interval: int, put):
        self.index, self.stop, self.interval, self.put = index, stop, interval, put
        self.tokenizer, self.ids = tokenizer, list(prompt[-PROMPT_TAIL:])
        self.decoder = incremental_decoder(tokenizer, self.ids)
        self.text, self.sent, self.tokens, self.done = "", 0, 0, False
        self.read_to = len(self.ids)  # the ids whose text is all in self.text (the decoder holds back the rest)
        self.hold = max((len(s) for s in stop), default=1) - 1  # chars that may start a stop string

    def add(self, token: int) -> bool:
        """Record ``token``; send the text so far every ``interval`` tokens (a stop string is looked for at every
        token). Returns whether the text reached a stop string (the choice has then finished)."""
        self.tokens += 1
        self.ids.append(token)
        piece = self.decoder.step(token)
        self.text += piece
        if piece:
            self.read_to = len(self.ids)
        if self.stop and piece:
            look_from = max(0, len(self.text) - len(piece) - self.hold)
            hits = [i for i in (self.text.find(s, look_from) for s in self.stop) if i >= 0]
            if hits:
                self.finish("stop", self.tokens, min(hits))
                return True
        if self.tokens % self.interval:
            return False  # sent with the interval's last token
        safe = len(self.text) - self.hold  # hold back what could be the start of a stop string
        if safe > self.sent:
            self.put(Event("text", self.index, text=self.text[self.sent:safe]))
            self.sent = safe
        return False

    def held_back(self) -> str:
        """The text of the tokens the incremental decoder still holds: an unfinished UTF-8 character that no later
        token completed, as U+FFFD, which is what decoding all the tokens gives. Without it a choice whose last
        tokens are such pieces loses them, and one made only of them (a random-weight model looping on a byte
        token) streams no text at all. Decoded from a few tokens back, as ``Redecode`` does."""
        if self.read_to == len(self.ids):
            return ""
        context = self.ids[max(0, self.read_to - 4):self.read_to]
        before = self.tokenizer.decode(context, skip_special_tokens=True)
        after = self.tokenizer.decode(context + self.ids[self.read_to:], skip_special_tokens=True)
        self.read_to = len(self.ids)
        return after[len(before):] if after.startswith(before) else ""

    def finish(self, reason: str, tokens: int, end: int | None = None) -> None:
        """Send the text up to ``end`` (all of it by default, what the decoder held back included) and the
        choice's finish."""
        if end is None:
            self.text += self.held_back()
        end = len(self.text) if end is None else end
        if end > self.sent:
            self.put(Event("text", self.index, text=self.text[self.sent:end]))
        self.put(Event("finish", self.index, reason=reason, tokens=tokens))
        self.done = True


class RequestText:
    """One request's choices. ``on_event`` takes the scheduler's events (token, finish, error) and ``put``s the
    app's (text, finish, error); a choice whose text reaches a stop string finishes here ("stop"), and
    ``end_choice(index)`` tells the scheduler to stop generating it. Tokens that were on their way meanwhile are
    dropped."""

    def __init__(self, tokenizer, prompt: list[int], n: int, stop: list[str], interval: int,
                 put: Callable[[Event], None], end_choice: Callable[[int], None]):
        self.put, self.end_choice = put, end_choice
        self.choices = [_ChoiceText(i, tokenizer, prompt, stop, interval, put) for i in range(n)]
        self.failed = False

    def on_event(self, event: Event) -> None:
        if event.kind == "error":
            if not self.failed:
                self.failed = True
                self.put(event)
            return
        choice = self.choices[event.index]
        if choice.done or self.failed:
            return
        if event.kind == "token":
            if choice.add(event.token):
                self.end_choice(event.index)
        else:
            choice.finish(event.reason, event.tokens)
