"""LlambaLM's cached-context scoring against one plain forward per request, on a tiny random model."""

import random

import pytest
import torch

from llamba.eval.lm import score_continuations, score_plain
from llamba.model import LlambaConfig, LlambaForCausalLM


@pytest.mark.parametrize("dtype,tol,attention_layers", [(torch.float64, 1e-9, ()), (torch.float32, 2e-4, ()),
                                                         (torch.float64, 1e-9, (1,))])
def test_cached_context_scores_equal_plain_forward(dtype, tol, attention_layers, tiny_llamba):
    """Also for a hybrid, whose continuations must see their context through the copied KV cache."""
    model = tiny_llamba(dtype=dtype, attention_layers=attention_layers)
    rng = random.Random(0)
    vocab = model.config.vocab_size
    # ragged contexts (1 to 23 tokens: left padding, conv state shorter than the kernel) and 1 to 4 ragged
    # continuations each (1-token continuations skip the second forward; 2-token ones take the step path)
    contexts = [[rng.randrange(vocab) for _ in range(n)] for n in (23, 1, 2, 9, 17)]
    continuations = [[[rng.randrange(vocab) for _ in range(rng.choice([1, 2, 3, 7]))]
                      for _ in range(rng.randint(1, 4))] for _ in contexts]
    fast = score_continuations(model, contexts, continuations)
    for ctx, conts, row in zip(contexts, continuations, fast):
        assert len(row) == len(conts)
        for cont, (ll, greedy) in zip(conts, row):
            ref_ll, ref_greedy = score_plain(model, ctx, cont)
            assert abs(ll - ref_ll) < tol * max(1.0, abs(ref_ll)), (ll, ref_ll)
            assert greedy == ref_greedy


def test_all_two_token_continuations_use_the_step_path(tiny_llamba):
    model = tiny_llamba()
    contexts = [[3, 4, 5, 6, 7], [9, 8]]
    continuations = [[[1, 2], [2, 1]], [[5, 5]]]
    fast = score_continuations(model, contexts, continuations)
    for ctx, conts, row in zip(contexts, continuations, fast):
        for cont, (ll, _) in zip(conts, row):
            assert abs(ll - score_plain(model, ctx, cont)[0]) < 1e-9


@pytest.mark.parametrize("attention_layers", [(), (0,)])
def test_batched_cached_generation_equals_greedy_without_cache(attention_layers, tiny_llamba):
    from llamba.eval.lm import generate_tokens

    model = tiny_llamba(attention_layers=attention_layers)
    prompts = [[5, 9, 2, 7, 7, 1, 30], [4], [11, 12, 13]]  # ragged: left padding in the prefill
    got = generate_tokens(model, prompts, max_new=6)
    for prompt, tokens in zip(prompts, got):
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(6):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        assert tokens == ids[len(prompt):]
    # a row that finishes stops growing while the others go on
    stopped = generate_tokens(model, prompts, max_new=6, finished=lambda toks: len(toks) == 2)
    assert [len(t) for t in stopped] == [2, 2, 2] and stopped[0] == got[0][:2]


def test_cached_generation_samples_as_transformers_generate(tiny_llamba):
    """generate_tokens chooses tokens with the sampler every generation path shares: with the same seed, the
    tokens of transformers' generate (whose multinomial draws by the same exponential race) for each option."""
    from llamba.eval.lm import generate_tokens
    from llamba.generation.sampling import SamplingParams

    model = tiny_llamba(dtype=torch.float32)
    model.generation_config.eos_token_id = None  # no early stop on either side
    prompts = [[5, 9, 2, 7, 7], [4, 8, 1, 3, 30]]  # equal lengths: no padding for transformers to handle
    for options in ({"repetition_penalty": 1.5}, {"do_sample": True, "temperature": 0.7, "top_k": 5},
                    {"do_sample": True, "top_p": 0.6}, {"do_sample": True, "min_p": 0.3, "repetition_penalty": 2.0}):
        params = SamplingParams.from_options(**options)
        got = generate_tokens(model, prompts, 8, params=params, generator=torch.Generator().manual_seed(0))
        torch.manual_seed(0)
        ref = model.generate(torch.tensor(prompts), max_new_tokens=8, pad_token_id=0, **params.generate_kwargs())
        assert got == ref[:, 5:].tolist(), options


def test_generate_until_honours_the_tasks_sampling_options(tiny_llamba):
    """lm-eval hands a task's generation options to the model (HFLM passes them on to transformers): a top-k of 1
    while sampling is greedy decoding."""
    from llamba.eval.lm import LlambaLM

    class Digits:  # a tokenizer whose text is the token ids, space separated
        eos_token_id, bos_token_id = 60, None

        def encode(self, text, add_special_tokens=False):
            return [int(t) for t in text.split()]

        def decode(self, tokens, skip_special_tokens=False):
            return " ".join(str(t) for t in tokens)

    lm = LlambaLM(pretrained=tiny_llamba(dtype=torch.float32), tokenizer=Digits(), batch_size=2)
    prompts = ["5 9 2 7 7", "4 8 1"]
    greedy = lm._generate(prompts, {"until": ["x"], "do_sample": False, "max_gen_toks": 8})
    torch.manual_seed(0)
    sampled = lm._generate(prompts, {"until": ["x"], "do_sample": True, "temperature": 1.0, "max_gen_toks": 8})
    assert sampled != greedy  # sampling is on: the top-k must bring it back to the argmax
    top1 = lm._generate(prompts, {"until": ["x"], "do_sample": True, "temperature": 1.0, "top_k": 1,
                                  "max_gen_toks": 8})
    assert top1 == greedy


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_padded_scoring_on_cuda_matches_the_pytorch_scan(dtype):
    """The GPU path the suite takes (left-padded, ragged prefill through the Triton scan, then the fused step)
    against the same model on the PyTorch scan, at the SmolLM2 student's head shapes."""
    torch.manual_seed(0)
    config = LlambaConfig(d_model=576, n_layer=2, vocab_size=500, mlp_cfg={"intermediate_size": 256},
                          ssm_cfg={"d_state": 64, "n_v_heads": 9, "n_qk_heads": 9})
    model = LlambaForCausalLM(config).to("cuda", dtype).eval()
    rng = random.Random(1)
    contexts = [[rng.randrange(500) for _ in range(n)] for n in (97, 13, 150, 64, 1)]
    continuations = [[[rng.randrange(500) for _ in range(k)] for k in (1, 2, 3)] for _ in contexts]
    fast = score_continuations(model, contexts, continuations)
    for layer in model.backbone.layers:
        layer.mixer.kernel_backend = "torch"
    ref = score_continuations(model, contexts, continuations)
    for row, ref_row in zip(fast, ref):
        for (ll, _), (ref_ll, _) in zip(row, ref_row):
            assert abs(ll - ref_ll) < 0.05 * max(1.0, abs(ref_ll)), (ll, ref_ll)
