"""The data-free path's sampler (llamba.distill.teacher_samples): documents decoded through the teacher's slot cache
are, draw for draw, the documents its plain twin samples with a full forward per token."""

import pytest
import torch

from llamba.distill.teacher_samples import plain_documents, sample_documents
from llamba.serve.slots import TeacherSlots

START, EOS = 1, 2


def small_vocab_teacher(vocab: int = 12):
    """A random float64 Llama whose vocabulary is small enough that most rows sample EOS within a few dozen tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).double().eval()


def draws(seed: int, device="cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


@pytest.mark.parametrize("length", [1, 5, 40])
def test_slot_sampler_is_the_plain_sampler(length):
    teacher = small_vocab_teacher()
    slots = TeacherSlots(teacher, 6, length + 1, cuda_graph=False)
    for seed in (0, 1):
        got = sample_documents(slots, START, EOS, length, draws(seed))  # the same slots again: joins reset them
        want = plain_documents(teacher, 6, START, EOS, length, draws(seed))
        assert got == want
    assert all(EOS not in doc and len(doc) <= length for doc in got)


def test_documents_end_at_eos_and_the_batch_stops_when_all_have():
    teacher = small_vocab_teacher(vocab=6)  # EOS about one draw in six
    slots = TeacherSlots(teacher, 8, 101, cuda_graph=False)
    calls = {"n": 0}
    decode = slots.decode

    def counting(*a):
        calls["n"] += 1
        return decode(*a)

    slots.decode = counting
    docs = sample_documents(slots, START, EOS, 100, draws(3))
    assert docs == plain_documents(teacher, 8, START, EOS, 100, draws(3))
    assert len({len(d) for d in docs}) > 1 and max(len(d) for d in docs) < 100
    assert calls["n"] == max(len(d) for d in docs)  # one step past the longest row's last token, which drew EOS


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_sampler_is_the_eager_one():
    teacher = small_vocab_teacher(vocab=64).float().cuda()
    got = sample_documents(TeacherSlots(teacher, 8, 33, cuda_graph=True), START, EOS, 32, draws(5, "cuda"))
    want = sample_documents(TeacherSlots(teacher, 8, 33, cuda_graph=False), START, EOS, 32, draws(5, "cuda"))
    assert got == want
