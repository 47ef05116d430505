"""The server's incremental detokenization per token, side by side: ``tokenizers``' DecodeStream (what
``llamba serve`` uses with a fast tokenizer) against its plain twin ``Redecode`` (two decodes through the tokenizer
per token), on the same token streams, with the ratio.

    python benchmarks/detokenize.py [--tokenizer smollm2-135m] [--streams 200] [--tokens 64]
"""

from __future__ import annotations

import argparse
import random
import time

from llamba.serve.text import PROMPT_TAIL, Redecode, Stream


def per_token_us(make, streams) -> float:
    start = time.perf_counter()
    for prompt, new in streams:
        decoder = make(prompt[-PROMPT_TAIL:])
        for token in new:
            decoder.step(token)
    return (time.perf_counter() - start) / sum(len(new) for _, new in streams) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", default="smollm2-135m", help="a teacher name or folder with tokenizer files")
    ap.add_argument("--streams", type=int, default=200)
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per stream")
    args = ap.parse_args()
    from llamba.teacher import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    rng = random.Random(0)
    text_ids = tokenizer("Café — naïve façade über 東京. " * 200 + "The old house at the end of the lane. " * 200)[
        "input_ids"]
    streams = []
    for _ in range(args.streams):  # slices of real text: ordinary words and characters split across tokens
        start = rng.randrange(len(text_ids) - args.tokens - 8)
        streams.append((text_ids[start:start + 8], text_ids[start + 8:start + 8 + args.tokens]))
    plain = per_token_us(lambda prefix: Redecode(tokenizer, prefix), streams)
    fast = per_token_us(lambda prefix: Stream(tokenizer.backend_tokenizer, prefix), streams)
    print(f"{args.streams} streams x {args.tokens} tokens, tokenizer {args.tokenizer}")
    print(f"Redecode (two decodes a token): {plain:.2f} us/token")
    print(f"DecodeStream:                   {fast:.2f} us/token")
    print(f"DecodeStream is {plain / fast:.1f}x faster")


if __name__ == "__main__":
    main()
