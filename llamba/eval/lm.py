"""Llamba as an lm-evaluation-harness model type (``--model llamba``).

A recurrent model's whole past is its cache, so a context shared by several continuations (the choices of a
multiple-choice question) is read once: the distinct contexts of a batch are prefilled together (left-padded),
their cache rows are repeated once per continuation, and all continuations run from there in one forward.
``score_continuations`` is that fast path; ``score_plain`` (one forward over context + continuation) is its twin.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from llamba.generation.sampling import GREEDY, SamplingParams, seen_tokens_mask, select_tokens
from llamba.model import LlambaForCausalLM


def _left_pad(seqs: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long, device=device)
    mask = torch.zeros((len(seqs), width), dtype=torch.long, device=device)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids, (None if bool(mask.all()) else mask)


def _score(logprobs: torch.Tensor, target: list[int]) -> tuple[float, bool]:
    """logprobs (len(target), V) predicting ``target`` -> (sum of log-probs, whether every token is the argmax)."""
    tok = torch.tensor(target, device=logprobs.device)
    return float(logprobs.gather(-1, tok[:, None]).sum()), bool((logprobs.argmax(-1) == tok).all())


@torch.no_grad()
def score_continuations(model: LlambaForCausalLM, contexts: list[list[int]],
                        continuations: list[list[list[int]]]) -> list[list[tuple[float, bool]]]:
    """For each context ``contexts[b]`` and each of its continuations ``continuations[b][j]`` (non-empty token
    lists): (log p(continuation | context), greedy?). Each context is read once."""
    device = model.backbone.embedding.weight.device
    owner = [b for b, conts in enumerate(continuations) for _ in conts]
    flat = [c for conts in continuations for c in conts]
    width = max(len(c) for c in flat) - 1
    ids, mask = _left_pad(contexts, 0, device)
    cache = model.allocate_cache(len(contexts), max_length=ids.shape[1] + width)  # a hybrid's KV: context + rest
    last = model(ids, past_key_values=cache, attention_mask=mask, logits_to_keep=1).logits[:, -1].float()
    first = F.log_softmax(last, dim=-1)  # predicts each continuation's first token

    rest = None
    if width > 0:  # the remaining tokens, right-padded: causal, so padding never reaches a position we read
        inp = torch.zeros((len(flat), width), dtype=torch.long, device=device)
        for r, c in enumerate(flat):
            inp[r, : len(c) - 1] = torch.tensor(c[:-1], dtype=torch.long)
        rest = model(inp, past_key_values=cache.select_rows(torch.tensor(owner))).logits

    scores: list[list[tuple[float, bool]]] = [[] for _ in contexts]
    for r, c in enumerate(flat):
        lp = first[owner[r]][None]
        if len(c) > 1:
            lp = torch.cat([lp, F.log_softmax(rest[r, : len(c) - 1].float(), dim=-1)])
        scores[owner[r]].append(_score(lp, c))
    return scores


@torch.no_grad()
def score_plain(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """The obvious way: one forward over context + continuation, no cache."""
    device = next(model.parameters()).device
    ids = torch.tensor([context + continuation], device=device)
    logits = model(ids).logits[0, len(context) - 1: -1].float()
    return _score(F.log_softmax(logits, dim=-1), continuation)


@register_model("llamba")
class LlambaLM(TemplateLM):
    """lm-eval model over a ``LlambaForCausalLM``. ``pretrained``: a model object or a checkpoint folder (read with
    ``llamba.checkpoint.load_model``); ``tokenizer``: an object or a name/folder (default: the checkpoint's)."""

    def __init__(self, pretrained=None, tokenizer=None, batch_size: int | str = 16, device: str = "cpu",
                 dtype: str | torch.dtype | None = None, max_gen_toks: int = 256, rolling_chunk: int = 2048, **_):
        super().__init__()
        if isinstance(pretrained, str):
            from llamba.checkpoint import load_model

            pretrained, own_tokenizer = load_model(pretrained, dtype=_dtype(dtype), device=device)
            tokenizer = tokenizer or own_tokenizer
        if not isinstance(pretrained, LlambaForCausalLM):
            raise ValueError(f"llamba model type needs a LlambaForCausalLM, got {type(pretrained).__name__}; "
                             "run teachers through lm-eval's HFLM")
        if isinstance(tokenizer, str):
            from llamba.teacher import load_tokenizer

            tokenizer = load_tokenizer(tokenizer)
        if tokenizer is None:
            raise ValueError("no tokenizer: the checkpoint has none, pass tokenizer= (e.g. the teacher's name)")
        self.model = pretrained.eval()
        if dtype is not None:
            self.model.to(_dtype(dtype))
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size) if str(batch_size) != "auto" else 16
        self.max_gen_toks = max_gen_toks
        self.rolling_chunk = rolling_chunk

    @property
    def device(self):
        return self.model.backbone.embedding.weight.device

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        # as lm-eval's HFLM: BOS when the tokenizer has one, else EOS; teacher and student score alike
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    def tok_decode(self, tokens) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=False)

    # -- loglikelihood -------------------------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (_, context, continuation) in enumerate(requests):
            groups.setdefault(tuple(context), []).append(i)
        order = sorted(groups, key=len, reverse=True)  # similar lengths share a batch; the longest (OOM) first
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="llamba loglikelihood", disable=disable_tqdm)
        for start in range(0, len(order), self.batch_size):
            batch = order[start: start + self.batch_size]
            scores = score_continuations(self.model, [list(c) for c in batch],
                                         [[requests[i][2] for i in groups[c]] for c in batch])
            for context, row in zip(batch, scores):
                for i, answer in zip(groups[context], row):
                    results[i] = answer
                    if requests[i][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
                    bar.update(1)
        bar.close()
        return results

    @torch.no_grad()
    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-document log-likelihood with the full past as context: the document runs in chunks through the
        cache, so no window ever cuts the context (the recurrent state carries it) and memory stays bounded."""
        out = []
        for req in tqdm(requests, desc="llamba rolling loglikelihood", disable=disable_tqdm):
            (string,) = req.args
            tokens = [self.prefix_token_id] + self.tok_encode(string)
            cache = self.model.allocate_cache(1, max_length=len(tokens))  # a hybrid's KV holds the document
            total = 0.0
            for start in range(0, len(tokens) - 1, self.rolling_chunk):
                inp = torch.tensor([tokens[start: start + self.rolling_chunk]], device=self.device)
                target = tokens[start + 1: start + 1 + self.rolling_chunk]
                logits = self.model(inp, past_key_values=cache).logits[0, : len(target)].float()
                total += _score(F.log_softmax(logits, dim=-1), target)[0]
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
        return out

    # -- generation ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        results: list[str | None] = [None] * len(requests)
        # same generation settings batch together, longest prompts first
        keyed = sorted(range(len(requests)), key=lambda i: (repr(sorted(requests[i].args[1].items())),
                                                            -len(requests[i].args[0])))
        bar = tqdm(total=len(requests), desc="llamba generate_until", disable=disable_tqdm)
        i = 0
        while i < len(keyed):
            kwargs = requests[keyed[i]].args[1]
            batch = [keyed[i]]
            while (len(batch) < self.batch_size and i + len(batch) < len(keyed)
                   and requests[keyed[i + len(batch)]].args[1] == kwargs):
                batch.append(keyed[i + len(batch)])
            i += len(batch)
            texts = self._generate([requests[j].args[0] for j in batch], dict(kwargs))
            for j, text in zip(batch, texts):
                results[j] = text
                self.cache_hook.add_partial("generate_until", requests[j].args, text)
            bar.update(len(batch))
        bar.close()
        return results

    def _generate(self, prompts: list[str], kwargs: dict) -> list[str]:
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        eos_text = self.tok_decode([self.eot_token_id])
        if eos_text not in until:
            until.append(eos_text)
        max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
        temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
        # greedy unless the task asks for sampling at a positive temperature; the processors' options as HFLM
        # hands them to transformers' generate, so that teacher and student decode alike
        params = SamplingParams.from_options(bool(kwargs.pop("do_sample", False)) and temperature > 0,
                                             temperature or None, kwargs.pop("top_k", None),
                                             kwargs.pop("top_p", None), kwargs.pop("min_p", None),
                                             kwargs.pop("repetition_penalty", None))

        def finished(tokens: list[int]) -> bool:
            return tokens[-1] == self.eot_token_id or any(s in self.tok_decode(tokens) for s in until)

        out = []
        for tokens in generate_tokens(self.model, [self.tok_encode(p) for p in prompts], max_new, finished, params):
            text = self.tok_decode(tokens)
            for stop in until:  # as HFLM: cut at every stop sequence
                text = text.split(stop)[0]
            out.append(text)
        return out


@torch.no_grad()
def generate_tokens(model: LlambaForCausalLM, prompts: list[list[int]], max_new: int, finished=None,
                    params: SamplingParams = GREEDY, generator: torch.Generator | None = None) -> list[list[int]]:
    """Batched decoding from the cache: the prompts are prefilled together (left-padded), then one token per step
    for every row, chosen by the sampler every generation path shares (greedy by default). A row stops once
    ``finished(its tokens)`` says so."""
    device = model.backbone.embedding.weight.device
    ids, mask = _left_pad(prompts, 0, device)
    cache = model.allocate_cache(len(prompts), max_length=ids.shape[1] + max_new)
    logits = model(ids, past_key_values=cache, attention_mask=mask, logits_to_keep=1).logits[:, -1]
    seen = (seen_tokens_mask(ids, mask, model.config.vocab_size) if params.repetition_penalty != 1.0 else None)
    generated: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for _ in range(max_new):
        nxt = select_tokens(logits, seen, params, generator)
        for b, t in enumerate(nxt.tolist()):
            if not done[b]:
                generated[b].append(t)
                done[b] = finished is not None and finished(generated[b])
        if all(done):
            break
        if seen is not None:
            seen.scatter_(1, nxt[:, None], True)
        logits = model(nxt[:, None], past_key_values=cache).logits[:, -1]
    return generated


def _dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}
    if dtype not in names:
        raise ValueError(f"dtype {dtype!r}: use one of {', '.join(names)}")
    return names[dtype]
