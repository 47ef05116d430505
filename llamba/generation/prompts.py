"""Prompt text -> token ids for generation, the same on every path (``llamba generate``, float or quantized)."""

from __future__ import annotations


def check_prompt_text(prompts: list[str]) -> None:
    """Refuse prompts that cannot be tokenized, before any model loads. Command-line arguments that are not valid
    UTF-8 reach Python as lone surrogates (PEP 383), which tokenizers reject with a traceback deep inside."""
    for i, prompt in enumerate(prompts, 1):
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as err:
            raise ValueError(f"prompt {i} is not valid UTF-8 (byte {prompt[err.start:err.end]!r} at character "
                             f"{err.start}); pass the prompt as UTF-8 text") from None


def chat_text(tokenizer, messages: list[dict]) -> str:
    """``messages`` ({"role", "content"} dicts) as the prompt text the tokenizer's chat template makes of them, ending
    with the assistant's turn; ValueError when the tokenizer has no template (the model was not tuned for chat)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model's tokenizer has no chat template; send raw text to a completion instead")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_prompts(tokenizer, prompts: list[str], chat: bool):
    """A left-padded batch (``input_ids``, ``attention_mask``) of ``prompts``, through the tokenizer's chat template
    when ``chat`` and it has one. A prompt of no tokens is refused: there would be nothing to continue from."""
    check_prompt_text(prompts)
    if chat and getattr(tokenizer, "chat_template", None):
        prompts = [chat_text(tokenizer, [{"role": "user", "content": p}]) for p in prompts]
    tokenizer.padding_side = "left"  # recurrent prefill: padding first, so it never sits between prompt and answer
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=not chat)
    for i, row in enumerate(batch["attention_mask"], 1):
        if not bool(row.any()):
            raise ValueError(f"prompt {i} is empty: there is nothing to continue from; give some text"
                             + ("" if chat else ", or let the chat template wrap it"))
    return batch
