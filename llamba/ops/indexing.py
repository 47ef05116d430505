"""How large one Triton launch may be (and, ``cuda_sm_count``, how many programs fill a GPU). Triton computes a kernel's
element offsets in int32, so a launch may not address 2**31 elements or more of any tensor: past that the offsets
wrap and the kernel reads and writes out of bounds (an illegal memory access, or worse, silently wrong values). A
prefill of Llamba-8B with 64 prompts of 8k tokens is already past it. And CUDA caps a grid's second and third
dimensions at 65535 programs, which the scan's batch x heads axis passes from 7282 prompts of the SmolLM2 student.
The Triton host functions therefore run such inputs in pieces: whole rows of the batch while they fit (rows are
independent), else one row at a time over spans of tokens, carrying the state from one span to the next (exact)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

INDEX_LIMIT = 2**31  # elements one launch may address in a tensor
GRID_LIMIT = 65535  # programs along a grid's second or third dimension


@functools.cache
def cuda_sm_count(device_index: int) -> int:
    """The streaming multiprocessors of a CUDA device: how many programs a launch needs to fill it."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def span(t: torch.Tensor, rows: int | None = None, tokens: int | None = None) -> int:
    """How many elements from ``t``'s first one to its last, as its strides lay them out (its numel when
    contiguous): what a kernel's offsets must reach. With ``rows`` / ``tokens``: of ``t[:rows, :tokens]``, computed
    without making the view (the launches ask for several per call, and a view costs more host time than this)."""
    sizes = list(t.shape)
    for dim, most in ((0, rows), (1, tokens)):
        if most is not None:
            sizes[dim] = min(sizes[dim], most)
    if 0 in sizes:
        return 0
    return 1 + sum((size - 1) * stride for size, stride in zip(sizes, t.stride()))


def piece_sizes(batch: int, length: int, fits: Callable[[int, int], bool], step: int) -> tuple[int, int]:
    """(rows, tokens) of the largest piece for which ``fits(rows, tokens)`` holds: all of it if it fits, else fewer
    rows (halving), else one row and a span of tokens (halving, a multiple of ``step``)."""
    rows = batch
    while rows > 1 and not fits(rows, length):
        rows = (rows + 1) // 2
    if fits(rows, length):
        return rows, length
    tokens = length
    while tokens > step and not fits(1, tokens):
        tokens = max(step, (tokens // 2) // step * step)
    if not fits(1, tokens):
        raise ValueError(f"one row of {step} tokens already needs {INDEX_LIMIT} or more elements in one tensor, "
                         "past what a Triton kernel can index: reduce the model's width per token")
    return 1, tokens


def by_pieces(batch: int, length: int, rows: int, tokens: int, initial: Callable[[slice], Any],
              step: Callable[[slice, slice, Any], tuple[torch.Tensor, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs ``step(row slice, token slice, state) -> (output, state)`` over (rows, tokens) pieces: groups of rows
    apart, spans of tokens in turn, each span given the state the span before it returned (``initial(row slice)``
    for the first). Returns the outputs joined back over tokens and rows, and the last states joined over rows."""
    outputs, states = [], []
    for r in range(0, batch, rows):
        row_slice = slice(r, r + rows)
        state = initial(row_slice)
        spans = []
        for t in range(0, length, tokens):
            out, state = step(row_slice, slice(t, t + tokens), state)
            spans.append(out)
        outputs.append(torch.cat(spans, 1))
        states.append(state)
    return torch.cat(outputs, 0), torch.cat(states, 0)
