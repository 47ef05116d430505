"""The one next-token sampler of every generation path: the CUDA engine (``llamba.generation.engine``), lm-eval's
``generate_until`` (``llamba.eval.lm.generate_tokens``) and the quantized CPU runtime (``CpuDecoder.generate``).

Token selection runs on the device with no host synchronisation (so it can live inside a CUDA graph). Order and
semantics follow transformers' logits processors: repetition penalty, then temperature, top-k, top-p, min-p.
Sampling uses the exponential-race trick (argmax of p / E with E ~ Exp(1) draws from p) instead of
``torch.multinomial``, which would synchronise with the host. Stop strings are checked on the host, on the text
of the new tokens (``stop_index``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


class InvalidSamplingParam(ValueError):
    """A sampling option out of range; ``param`` names it (the server reports it in the error's ``param``)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class SamplingParams:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0          # 0: off
    top_p: float = 1.0      # 1.0: off
    min_p: float = 0.0      # 0.0: off
    repetition_penalty: float = 1.0  # 1.0: off

    @classmethod
    def from_options(cls, do_sample: bool = False, temperature: float | None = None, top_k: int | None = None,
                     top_p: float | None = None, min_p: float | None = None,
                     repetition_penalty: float | None = None) -> "SamplingParams":
        """Checked params from options as transformers' ``generate`` takes them, None meaning "off"."""
        return cls(bool(do_sample), float(1.0 if temperature is None else temperature), int(top_k or 0),
                   float(1.0 if top_p is None else top_p), float(min_p or 0.0),
                   float(1.0 if repetition_penalty is None else repetition_penalty)).validate()

    @classmethod
    def from_temperature(cls, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                         min_p: float | None = None, repetition_penalty: float | None = None) -> "SamplingParams":
        """Checked params from options as users give them (``llamba generate``, ``llamba serve``): temperature 0 is
        greedy, > 0 samples. NaN passes ``< 0`` checks silently (it would have meant greedy), so it is refused."""
        if not math.isfinite(temperature) or temperature < 0:
            raise InvalidSamplingParam("temperature", f"temperature must be a number >= 0 (0: greedy), got {temperature}")
        return cls.from_options(temperature > 0, temperature if temperature > 0 else None, top_k, top_p, min_p,
                                repetition_penalty)

    def generate_kwargs(self) -> dict:
        """These params as transformers' ``generate`` takes them, every processor explicit: transformers fills an
        unset top_k with 50, which would make its path sample from another distribution than ours."""
        kwargs: dict = {"do_sample": self.do_sample}
        if self.repetition_penalty != 1.0:
            kwargs["repetition_penalty"] = self.repetition_penalty
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                          min_p=self.min_p if self.min_p > 0 else None)
        return kwargs

    def validate(self) -> "SamplingParams":
        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            if not math.isfinite(getattr(self, name)):  # NaN passes every range check below
                raise InvalidSamplingParam(name, f"{name} must be a finite number (got {getattr(self, name)})")
        if self.temperature <= 0 and self.do_sample:
            raise InvalidSamplingParam(
                "temperature", f"temperature must be > 0 when sampling (got {self.temperature}); use greedy instead")
        if self.top_k < 0:
            raise InvalidSamplingParam("top_k", f"top_k must be >= 0 (got {self.top_k})")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidSamplingParam("top_p", f"top_p must be in (0, 1] (got {self.top_p})")
        if not 0.0 <= self.min_p <= 1.0:
            raise InvalidSamplingParam("min_p", f"min_p must be in [0, 1] (got {self.min_p})")
        if self.repetition_penalty <= 0:
            raise InvalidSamplingParam("repetition_penalty", f"repetition_penalty must be > 0 (got {self.repetition_penalty})")
        return self


GREEDY = SamplingParams()


def seen_tokens_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, vocab: int) -> torch.Tensor:
    """(batch, vocab) bool: the tokens each row's prompt holds (padding excluded), the repetition penalty's set
    before the first new token (transformers penalises prompt tokens too)."""
    weight = (attention_mask if attention_mask is not None else torch.ones_like(input_ids)).to(torch.int32)
    counts = torch.zeros((input_ids.shape[0], vocab), dtype=torch.int32, device=input_ids.device)
    return counts.scatter_add_(1, input_ids, weight) > 0


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style: logits of tokens already in the sequence are divided by ``penalty`` when positive, multiplied
    when negative. ``seen`` (batch, vocab) bool."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches ``p`` (always at least one)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cum <= 1 - p
    remove_sorted[..., -1] = False
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def apply_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens whose probability is below ``min_p`` times the most likely token's."""
    if min_p <= 0.0:
        return logits
    probs = logits.softmax(dim=-1)
    threshold = min_p * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(probs < threshold, float("-inf"))


def process_logits(logits: torch.Tensor, seen: torch.Tensor | None, params: SamplingParams) -> torch.Tensor:
    """float32 logits (batch, vocab) -> the distribution's logits after every enabled processor."""
    logits = logits.float()
    if params.repetition_penalty != 1.0 and seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if not params.do_sample:
        return logits
    if params.temperature != 1.0:
        logits = logits / params.temperature
    logits = apply_top_k(logits, params.top_k)
    logits = apply_top_p(logits, params.top_p)
    return apply_min_p(logits, params.min_p)


def select_tokens(logits: torch.Tensor, seen: torch.Tensor | None, params: SamplingParams,
                  generator: torch.Generator | Sequence[torch.Generator] | None = None) -> torch.Tensor:
    """(batch, vocab) logits -> (batch,) next tokens. Greedy is the argmax after the repetition penalty.
    ``generator``: one for the batch, or one per row (the server's requests: each row then draws what it would
    alone, whoever shares its batch)."""
    if params == GREEDY:
        return logits.argmax(dim=-1)  # what the float32 processors would give, without the float32 copy
    logits = process_logits(logits, seen, params)
    if not params.do_sample:
        return logits.argmax(dim=-1)
    probs = logits.softmax(dim=-1)
    race = torch.empty_like(probs)
    if isinstance(generator, Sequence):
        if len(generator) != race.shape[0]:
            raise ValueError(f"{len(generator)} generators for {race.shape[0]} rows")
        for row, row_generator in zip(race, generator):
            row.exponential_(generator=row_generator)
    else:
        race.exponential_(generator=generator)
    return (probs / race).argmax(dim=-1)


def stop_index(tokenizer, tokens: list[int], stop_strings: list[str], start: int = 0) -> int | None:
    """Index of the token that completes the first stop string in the text of ``tokens`` (the new tokens only),
    looking at tokens[start:] onwards (the earlier ones were checked before), or None."""
    for k in range(start, len(tokens)):
        text = tokenizer.decode(tokens[: k + 1], skip_special_tokens=False)
        if any(s in text for s in stop_strings):
            return k
    return None
