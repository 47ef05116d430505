"""`llamba generate` on every CPU path, float (transformers' generate) and quantized (the C runtime), with the one
sampler they share: each sampling option acts on the quantized path as it does on the float path, and prompts that
cannot be generated from get one clear line. On a tiny random student with a word-level tokenizer (tests/conftest.py).

torch.multinomial draws one sample by the same exponential race as ``llamba.generation.sampling.select_tokens``, so
with the same seed transformers' sampling and ours pick the same tokens from the same distribution: the float path
is an exact twin of the quantized path run without quantization (``--quant none``)."""

from __future__ import annotations

import pytest
import torch

from conftest import needs_cpu_kernels
from llamba.cli import main
from llamba.generation.sampling import SamplingParams
from llamba.model import LlambaCache
from llamba.quant import load_for_cpu



def generated(capsys, folder, *options: str, prompt: str = "w5 w7 w9", new: int = 12) -> str:
    """The text `llamba generate` prints for one prompt (raw text, CPU)."""
    assert main(["generate", "--model", str(folder), "--prompt", prompt, "--max-new-tokens", str(new),
                 "--device", "cpu", "--no-chat-template", *options]) == 0
    return capsys.readouterr().out.strip()


@needs_cpu_kernels
def test_quantized_top_k_1_is_greedy(tiny_student_folder, capsys):
    greedy = generated(capsys, tiny_student_folder, "--quant", "int8")
    sampled = generated(capsys, tiny_student_folder, "--quant", "int8", "--temperature", "1")
    assert sampled != greedy  # sampling is on: top-k alone must bring it back to the argmax
    assert generated(capsys, tiny_student_folder, "--quant", "int8", "--temperature", "1", "--top-k", "1") == greedy


@needs_cpu_kernels
def test_quantized_path_stops_at_a_stop_string(tiny_student_folder, capsys):
    free = generated(capsys, tiny_student_folder, "--quant", "int8", "--temperature", "1").split()
    assert len(free) == 12 and free[4] not in free[:4], free  # the stop must come at free[4]
    stop = free[4]
    text = generated(capsys, tiny_student_folder, "--quant", "int8", "--temperature", "1", "--stop", stop)
    assert text.split() == free[:5]  # up to the token that completes the stop string, as the CUDA engine stops


@needs_cpu_kernels
@pytest.mark.parametrize("base,option", [
    (["--temperature", "1"], ["--top-k", "3"]), (["--temperature", "1"], ["--top-p", "0.3"]),
    (["--temperature", "1"], ["--min-p", "0.5"]), ([], ["--repetition-penalty", "3"])])
def test_each_option_acts_on_the_quantized_path_as_on_the_float_path(tiny_student_folder, capsys, base, option):
    """One option more (greedy, or sampling at temperature 1): it changes the float path's tokens, and the CPU
    runtime (unquantized, so that its distributions are the float path's) gives the float path's tokens."""
    plain = generated(capsys, tiny_student_folder, "--transformers", *base)
    with_option = generated(capsys, tiny_student_folder, "--transformers", *base, *option)
    assert with_option != plain  # the option matters here
    assert generated(capsys, tiny_student_folder, "--quant", "none", *base, *option) == with_option


@needs_cpu_kernels
@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_cpu_runtime_samples_as_transformers_generate_on_the_same_quantized_weights(tiny_student_folder, quant,
                                                                                   monkeypatch):
    """The runtime's decode loop (the C step, our sampler) against transformers' generate over the same quantized
    modules run by PyTorch, option by option, with the same seed."""
    decoder = load_for_cpu(tiny_student_folder, quant)
    # LlambaForCausalLM.allocate_cache takes its dtype from the embedding's weight, which a quantized one lacks
    monkeypatch.setattr(decoder.model, "allocate_cache",
                        lambda batch: LlambaCache(decoder.config, batch, dtype=torch.float32), raising=False)
    ids = torch.tensor([[5, 7, 9, 11]])
    sampling = {"do_sample": True}
    for options in ({}, {"repetition_penalty": 1.8}, {**sampling, "temperature": 0.8}, {**sampling, "top_k": 4},
                    {**sampling, "top_p": 0.5}, {**sampling, "min_p": 0.2, "repetition_penalty": 1.3}):
        params = SamplingParams.from_options(**options)
        ours = decoder.generate(ids, 10, params, generator=torch.Generator().manual_seed(3))
        torch.manual_seed(3)
        # the options as the CLI hands them to transformers (every processor explicit: it fills an unset top_k
        # with 50, which the sampling cases here would show)
        ref = decoder.model.generate(ids, max_new_tokens=10, pad_token_id=0, **params.generate_kwargs())
        assert ours == ref[0, ids.shape[1]:].tolist(), options


def test_an_empty_prompt_is_one_clear_line(tiny_student_folder, capsys):
    assert main(["generate", "--model", str(tiny_student_folder), "--prompt", "", "--device", "cpu",
                 "--no-chat-template"]) == 2
    err = capsys.readouterr().err
    assert "llamba generate: error: prompt 1 is empty" in err and "Traceback" not in err


@pytest.mark.parametrize("quant", [[], ["--quant", "int8"]])
def test_a_prompt_that_is_not_utf8_is_one_clear_line(tiny_student_folder, capsys, quant):
    # as Python hands such a command-line argument over: the bad byte as a lone surrogate (PEP 383)
    prompt = b"w5 \xff w7".decode("utf-8", "surrogateescape")
    assert main(["generate", "--model", str(tiny_student_folder), "--prompt", "w5", "--prompt", prompt,
                 "--device", "cpu", *quant]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llamba generate: error:") and "prompt 2 is not valid UTF-8" in err, err
    assert "Traceback" not in err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_path_decodes_as_the_cpu_float_path(tiny_student_folder, capsys):
    """On CUDA the CLI runs the CUDA-graph engine itself: greedy and repetition-penalised tokens as transformers'
    generate gives them on the CPU, a top-k of 1 while sampling as greedy, and a stop string stops it."""
    cuda = ["--device", "cuda", "--dtype", "float32"]  # the later --device wins over generated()'s
    for options in ([], ["--repetition-penalty", "3"]):
        assert generated(capsys, tiny_student_folder, *cuda, *options) == generated(capsys, tiny_student_folder,
                                                                                    *options)
    greedy = generated(capsys, tiny_student_folder, *cuda)
    assert generated(capsys, tiny_student_folder, *cuda, "--temperature", "1", "--top-k", "1") == greedy
    free = generated(capsys, tiny_student_folder, *cuda, "--temperature", "1").split()
    assert len(free) == 12 and free[4] not in free[:4], free
    assert generated(capsys, tiny_student_folder, *cuda, "--temperature", "1", "--stop", free[4]).split() == free[:5]


@needs_cpu_kernels
def test_a_float_student_on_the_cpu_runs_the_cpu_runtime(tiny_student_folder, capsys):
    """Without --quant a float student on the CPU decodes through the runtime (unquantized: transformers' tokens)."""
    reference = generated(capsys, tiny_student_folder, "--transformers")
    assert main(["generate", "--model", str(tiny_student_folder), "--prompt", "w5 w7 w9", "--max-new-tokens", "12",
                 "--device", "cpu", "--no-chat-template"]) == 0
    out = capsys.readouterr()
    assert "CPU runtime" in out.err and out.out.strip() == reference


@needs_cpu_kernels
def test_the_folder_llamba_quantize_writes_is_a_model(tiny_student_folder, tmp_path, capsys):
    out = tmp_path / "int8"
    assert main(["quantize", str(tiny_student_folder), "--bits", "8", "--out", str(out)]) == 0
    capsys.readouterr()
    assert generated(capsys, out) == generated(capsys, tiny_student_folder, "--quant", "int8")
