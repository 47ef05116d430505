"""A request's text, from the scheduler's token events: incremental detokenization, stop strings and the stream
interval. This is the HTTP side's work and runs on its event loop's thread (in the model's process, or in each of
``llamba serve --api-processes``), so that a decode step costs the model's process one token id per sequence.
"""

from __future__ import annotations

from typing import Callable

from llamba.serve.scheduler import Event

PROMPT_TAIL = 6  # prompt tokens decoded ahead of the new ones, so the first new token's text keeps its spacing


def eos_ids(tokenizer) -> set[int]:
    """The token ids that end a sequence, as the tokenizer names them (one id or several)."""
    eos = tokenizer.eos_token_id
    return {eos} if isinstance(eos, int) else set(eos or ())


class _ChoiceText:
    """One choice's text so far, and how much of it has been sent."""

    def __init__(self, index: int, tokenizer, prompt: list[int], stop: list[str], interval: int, put):
        self.index, self.tokenizer, self.stop, self.interval, self.put = index, tokenizer, stop, interval, put
        self.ids = prompt[-PROMPT_TAIL:]  # the prompt's tail, then the new tokens: what the text decodes
        self.prefix_at, self.read_at = 0, len(self.ids)
        self.text, self.sent, self.tokens, self.done = "", 0, 0, False
        self.hold = max((len(s) for s in stop), default=1) - 1  # chars that may start a stop string

    def add(self, token: int) -> bool:
        """Record ``token``; send the text it completes every ``interval`` tokens (every token when there are stop
        strings). Returns whether the text reached a stop string (the choice has then finished)."""
        self.tokens += 1
        self.ids.append(token)
        if not (self.stop or self.tokens % self.interval == 0):
            return False  # read and sent with the interval's last token
        self._read()
        if self.stop:
            look_from = max(0, self.sent - self.hold)
            hits = [i for i in (self.text.find(s, look_from) for s in self.stop) if i >= 0]
            if hits:
                self.finish("stop", self.tokens, min(hits))
                return True
        safe = len(self.text) - self.hold  # hold back what could be the start of a stop string
        if safe > self.sent:
            self.put(Event("text", self.index, text=self.text[self.sent:safe]))
            self.sent = safe
        return False

    def finish(self, reason: str, tokens: int, end: int | None = None) -> None:
        """Send the text up to ``end`` (all of it by default) and the choice's finish."""
        if end is None:
            self._read()
            end = len(self.text)
        if end > self.sent:
            self.put(Event("text", self.index, text=self.text[self.sent:end]))
        self.put(Event("finish", self.index, reason=reason, tokens=tokens))
        self.done = True

    def _read(self) -> None:
        """Incremental detokenization: decode from a few tokens back and keep what the tokens since the last read
        added; a text that ends in U+FFFD is an unfinished UTF-8 character, kept for when the next tokens complete
        it."""
        before = self.tokenizer.decode(self.ids[self.prefix_at:self.read_at], skip_special_tokens=True)
        after = self.tokenizer.decode(self.ids[self.prefix_at:], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before):]
            self.prefix_at, self.read_at = self.read_at, len(self.ids)


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
