"""The server's text from token ids (``llamba.serve.text``): ``tokenizers``' DecodeStream against its plain twin
(decoding from a few tokens back), on the word tokenizer and on SmolLM2's byte-level tokenizer with multi-byte
characters; and a request's text does not depend on the stream interval."""

from __future__ import annotations

import random

import pytest

from conftest import make_word_tokenizer
from llamba.serve.text import Redecode, RequestText, Stream, incremental_decoder

pytestmark = pytest.mark.timeout(300)

MULTIBYTE = "Café — naïve façade 😀 über 東京, ½ ≥ ∑; " * 12


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from llamba.teacher import load_tokenizer

    return load_tokenizer("smollm2-135m")


def cases(tokenizer, n: int, seed: int = 0):
    """(prompt, new tokens): random ids, and slices of real text that cut characters across tokens anywhere."""
    rng = random.Random(seed)
    vocab = len(tokenizer)
    real = tokenizer(MULTIBYTE)["input_ids"]
    for i in range(n):
        if i % 2:
            start = rng.randrange(len(real) - 80)
            cut = rng.randrange(1, 8)
            yield real[start:start + cut], real[start + cut:start + 80]
        else:
            yield [rng.randrange(vocab) for _ in range(rng.randrange(1, 10))], [rng.randrange(vocab) for _ in range(48)]


def decoded(decoder, prompt, new) -> str:
    return "".join(decoder.step(t) for t in new)


@pytest.mark.parametrize("which", ["words", "smollm2"])
def test_decode_stream_gives_the_plain_twins_text(which, request):
    tokenizer = make_word_tokenizer() if which == "words" else request.getfixturevalue("smollm2_tokenizer")
    assert isinstance(incremental_decoder(tokenizer, []), Stream)  # the fast path is the one served
    backend = tokenizer.backend_tokenizer
    differ = 0
    for prompt, new in cases(tokenizer, 60):
        fast = decoded(Stream(backend, prompt[-6:]), prompt, new)
        plain = decoded(Redecode(tokenizer, prompt[-6:]), prompt, new)
        differ += fast != plain
        if not tokenizer.decode(prompt[-6:], skip_special_tokens=True).endswith("\ufffd"):
            assert fast == plain, (prompt, new)
    # a prompt that ends inside a character: DecodeStream sends the character its first new token completes,
    # the plain twin's length arithmetic over U+FFFD drops it; the fast path is what is served
    assert which == "words" or differ < 30


def test_the_text_does_not_depend_on_the_stream_interval(smollm2_tokenizer):
    """Read every token, sent every k: the same text for every k, multi-byte characters split across tokens
    included (reading only every k tokens, as the server did before, changed the text with k)."""
    for prompt, new in cases(smollm2_tokenizer, 40, seed=1):
        texts = {}
        for k in (1, 2, 3, 7):
            events = []
            text = RequestText(smollm2_tokenizer, prompt, 1, [], k, events.append, end_choice=lambda i: None)
            for t in new:
                text.choices[0].add(t)
            text.choices[0].finish("length", len(new))
            texts[k] = "".join(e.text for e in events if e.kind == "text")
            assert sum(e.kind == "text" for e in events) <= -(-len(new) // k) + 1
        assert len(set(texts.values())) == 1, texts


def test_a_choice_that_ends_inside_a_character_sends_what_decoding_all_its_tokens_gives(smollm2_tokenizer):
    """Tokens whose text is an unfinished UTF-8 character are held back until a later token completes it; a choice
    that ends first still sends them, as U+FFFD, so its text is what decoding all its tokens gives: a greedy loop
    on such a token (a random-weight teacher's request on an H100 streamed 2,048 of them and no text at all) and a
    real text cut inside a character both end with their bytes shown."""
    tok = smollm2_tokenizer
    real = tok(MULTIBYTE)["input_ids"]
    emoji = next(i for i in range(1, len(real)) if tok.decode(real[:i]).endswith("\ufffd"))  # a cut in a character
    loop = next(t for t in range(len(tok)) if tok.decode([t]).endswith("\ufffd") and tok.decode([t]).strip("\ufffd"))
    for prompt, new in (([5, 6, 7], [loop] * 6), (real[:3], real[3:emoji])):
        events = []
        text = RequestText(tok, prompt, 1, [], 4, events.append, end_choice=lambda i: None)
        for t in new:
            text.choices[0].add(t)
        text.choices[0].finish("length", len(new))
        sent = "".join(e.text for e in events if e.kind == "text")
        whole = tok.decode(prompt + new, skip_special_tokens=True)[len(tok.decode(prompt, skip_special_tokens=True)):]
        assert sent == whole and sent.endswith("\ufffd"), (sent, whole)
        assert [e.kind for e in events][-1] == "finish"
