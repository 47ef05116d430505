"""The quantized CPU runtime: weight formats, kernels against their dequantize-then-float64 twin, the compiled
decode step against the model's own forward, flat memory, and the single-file artifact."""

from __future__ import annotations

import copy
import ctypes
import json
import os
import subprocess

import pytest
import torch

from conftest import needs_cpu_kernels
from llamba.quant import kernels, load_for_cpu, quantize_student
from llamba.quant.modules import QuantizedLinear
from llamba.quant.reference import (
    dequantize, linear_reference, pack_int4, quantize_weight, unpack_int4)
from llamba.quant.runtime import CpuDecoder

pytestmark = needs_cpu_kernels


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_error_within_half_step(bits):
    w = torch.randn(48, 128) * torch.rand(48, 1)
    qw = quantize_weight(w, bits, 32)
    step = qw.scale.float().repeat_interleave(32, dim=1)
    err = (dequantize(qw) - w).abs()
    assert (err <= step / 2 + 1e-3 * w.abs().max()).all()  # + float16 rounding of min
    assert qw.data.dtype == (torch.uint8 if bits == 4 else torch.int8)


def test_int4_packing_roundtrip():
    q = torch.randint(0, 16, (5, 96), dtype=torch.uint8)
    assert torch.equal(unpack_int4(pack_int4(q)), q)


def test_bad_group_size_is_refused():
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_weight(torch.randn(4, 96), 4, 64)


def _cpu_flags() -> set[str]:
    try:
        return {f for line in open("/proc/cpuinfo") if line.startswith("flags") for f in line.split(":")[1].split()}
    except OSError:  # not Linux: the tests that need the flags skip
        return set()


CPU_FLAGS = _cpu_flags()
HAS_AVX2 = {"avx2", "fma", "f16c"} <= CPU_FLAGS


def test_the_native_build_compiles_where_the_compiler_takes_march_native(tmp_path):
    """The native build falls back to the portable flags when it fails to compile, so a native-only compile error
    would pass every other test on the scalar path: on AVX2 CPUs one did (an F16C intrinsic without its header)."""
    cc = kernels.find_compiler()
    probe = subprocess.run([cc, "-march=native", "-x", "c", "-c", "-o", os.devnull, "-"], input="int x;",
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"{cc} refuses -march=native")
    result = subprocess.run(kernels.build_command(cc, tmp_path / "native.so"), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    ctypes.CDLL(str(tmp_path / "native.so"))  # and it loads: no unresolved symbol


@pytest.mark.skipif(not CPU_FLAGS, reason="no /proc/cpuinfo flags to check against")
def test_the_native_build_takes_the_cpus_vector_path():
    """AVX-512 where the CPU has it, else AVX2 where it has that (with FMA and F16C), else scalar C: an AVX2 CPU
    once ran the scalar path, 4x slower than llama.cpp, and every other test passed."""
    want = 512 if "avx512f" in CPU_FLAGS else 256 if HAS_AVX2 else 0
    assert kernels.load_kernels().llamba_simd_bits() == want


BUILDS = ["native", pytest.param("avx2", marks=pytest.mark.skipif(not HAS_AVX2, reason="no AVX2 + FMA + F16C")),
          "portable"]


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("bits,group", [(32, 0), (8, 32), (8, 64), (4, 32), (4, 64)])
def test_kernel_matches_dequantize_then_matmul(bits, group, build):
    lib = kernels.load_kernels(build)
    if build != "native":  # each build runs its own path (native's: the test above)
        assert lib.llamba_simd_bits() == {"avx2": 256, "portable": 0}[build]
    torch.manual_seed(bits + group)
    # n >= 256: the threaded path; float32's k not a multiple of the vector loops' 16: their scalar tail
    n, k, rows = 300, 200 if bits == 32 else 192, 3
    w, bias, x = torch.randn(n, k), torch.randn(n), torch.randn(rows, k)
    if bits == 32:
        c_lin, ref = kernels.Linear(w.data_ptr(), None, None, bias.data_ptr(), 32, n, k, 0), linear_reference(x, w, bias)
    else:
        lin = QuantizedLinear(quantize_weight(w, bits, group), bias)
        c_lin, ref = lin.c_linear(), linear_reference(x, lin.weight_q, bias)
    y, xsum = torch.empty(rows, n), torch.empty(k // 32 + 1)
    lib.llamba_linear_rows(ctypes.byref(c_lin), kernels.fptr(x), rows, kernels.fptr(y), kernels.fptr(xsum))
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("quant", ["none", "int8", "int4"])
def test_decoder_matches_model_forward(quant, tiny_student):
    """Chunked prefill in odd-sized pieces, then compiled steps, equals one forward of the same (quantized) model."""
    model = tiny_student()
    quantize_student(model, quant)
    ids = torch.randint(0, 100, (1, 41))
    with torch.no_grad():
        ref = model(ids).logits[0]
    dec = CpuDecoder(model, prefill_chunk=7)
    got = [dec.prefill(ids[:, :23]).clone()]
    for t in range(23, 40):
        got.append(dec.step(int(ids[0, t])).clone())
    torch.testing.assert_close(torch.stack(got), ref[22:40], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("quant", ["none", "int8", "int4"])
def test_batched_step_equals_one_step_per_cache(quant, tiny_student):
    """``step_batch`` (one C call over several caches, each weight row read once for all) gives every cache exactly
    what ``step`` alone gives it: the same logits to the bit and the same states, caches at different lengths, a
    batch that shrinks and grows between calls; a bad token id is refused before any cache moves."""
    model = tiny_student()
    quantize_student(model, quant)
    dec = CpuDecoder(model)
    prompts = [torch.randint(0, 100, (1, n), generator=torch.Generator().manual_seed(n)) for n in (3, 9, 17, 1, 30)]
    batched, alone = [dec.new_cache() for _ in prompts], [dec.new_cache() for _ in prompts]
    for p, a, b in zip(prompts, alone, batched):
        dec.prefill(p, cache=a)
        dec.prefill(p, cache=b)
    g = torch.Generator().manual_seed(0)
    for rows in ([0, 1, 2, 3, 4], [4, 1], [2], [0, 1, 2, 3, 4], [3, 0, 2]):
        tokens = torch.randint(0, 100, (len(rows),), generator=g).tolist()
        got = dec.step_batch(tokens, [batched[r] for r in rows]).clone()
        want = torch.stack([dec.step(t, cache=alone[r]).clone() for t, r in zip(tokens, rows)])
        assert torch.equal(got, want), rows
    for a, b in zip(alone, batched):
        assert torch.equal(a.conv_states, b.conv_states) and torch.equal(a.ssm_states, b.ssm_states)
        assert a.seen_tokens == b.seen_tokens
    states = [c.ssm_states.clone() for c in batched]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        dec.step_batch([5, 104], batched[:2])
    assert all(torch.equal(c.ssm_states, s) for c, s in zip(batched, states))


@pytest.mark.parametrize("quant,tol", [("int8", 0.02), ("int4", 0.15)])
def test_quantized_logits_close_to_float(quant, tol, tiny_student):
    """Random weights and random token ids: the relative logit error stays small (int8 tighter than int4)."""
    model = tiny_student(seed=1)
    quantized = copy.deepcopy(model)
    quantize_student(quantized, quant, head_bits=8 if quant == "int4" else None)
    ids = torch.randint(0, 100, (2, 50))
    with torch.no_grad():
        full, q = model(ids).logits, quantized(ids).logits
    rel = ((q - full).norm() / full.norm()).item()
    assert rel < tol, rel


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))


def test_decode_step_allocates_nothing(tiny_student):
    model = tiny_student()
    quantize_student(model, "int4")
    dec = CpuDecoder(model)
    dec.prefill(torch.randint(0, 100, (1, 9)))
    buffers = [t.data_ptr() for t in (dec.logits, dec.cache.conv_states, dec.cache.ssm_states, dec.workspace)]
    for t in range(200):  # warm up
        dec.step(t % 100)
    before = _rss_kib()
    for t in range(3000):
        dec.step(t % 100)
    assert _rss_kib() - before < 512
    assert buffers == [t.data_ptr() for t in (dec.logits, dec.cache.conv_states, dec.cache.ssm_states, dec.workspace)]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        dec.step(104)


@pytest.mark.parametrize("quant,tied", [("int4", True), ("int8", False), ("none", True)])
def test_artifact_roundtrip(tmp_path, quant, tied, tiny_student):
    from llamba.quant.artifact import load_artifact, save_artifact

    model = tiny_student(tied=tied)
    settings = quantize_student(model, quant)
    path = save_artifact(model, None, tmp_path / "m.safetensors", settings)
    loaded, tokenizer, got = load_artifact(path)
    assert got == settings and tokenizer is None
    ids = torch.randint(0, 100, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    dec = load_for_cpu(path, quant)
    with torch.no_grad():
        torch.testing.assert_close(dec.prefill(ids), model(ids).logits[0, -1], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="was quantized as"):
        load_for_cpu(path, "int8" if quant != "int8" else "int4")


def test_int4_mixers_with_int8_mlps_roundtrip(tmp_path, tiny_student):
    """The mixed format (--bits 4 --mlp-bits 8): per-linear widths survive the artifact and the compiled decoder."""
    from llamba.quant.artifact import load_artifact, save_artifact

    model = tiny_student()
    settings = quantize_student(model, "int4", mlp_bits=8)
    layer = model.backbone.layers[0]
    assert (layer.mixer.in_proj.bits, layer.mixer.out_proj.bits, layer.mlp.down_proj.bits) == (4, 4, 8)
    path = save_artifact(model, None, tmp_path / "m.safetensors", settings)
    loaded, _, got = load_artifact(path)
    assert got["mlp_bits"] == 8 and loaded.backbone.layers[1].mlp.up_proj.bits == 8
    ids = torch.randint(0, 100, (1, 20))
    dec = load_for_cpu(path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
        torch.testing.assert_close(dec.prefill(ids), model(ids).logits[0, -1], rtol=1e-5, atol=1e-5)
        step = dec.step(7).clone()  # the compiled step, with 4- and 8-bit linears side by side
        torch.testing.assert_close(step, model(torch.cat([ids, torch.tensor([[7]])], 1)).logits[0, -1],
                                   rtol=1e-4, atol=1e-4)


def test_single_projections_keep_their_own_bits(tmp_path, tiny_student):
    """--bits 4 --mlp-bits 8 --bits-for in_proj=8: in_proj int8 beside an int4 out_proj in the same mixer, through
    the artifact, the PyTorch forward and the compiled step; a name that is no projection is refused."""
    from llamba.quant.artifact import load_artifact, save_artifact

    model = tiny_student()
    settings = quantize_student(model, "int4", mlp_bits=8, linear_bits={"in_proj": 8, "down_proj": 4})
    layer = model.backbone.layers[0]
    assert (layer.mixer.in_proj.bits, layer.mixer.out_proj.bits, layer.mlp.up_proj.bits,
            layer.mlp.down_proj.bits) == (8, 4, 8, 4)
    path = save_artifact(model, None, tmp_path / "m.safetensors", settings)
    loaded, _, got = load_artifact(path)
    assert got["linear_bits"] == {"in_proj": 8, "down_proj": 4}
    assert (loaded.backbone.layers[1].mixer.in_proj.bits, loaded.backbone.layers[1].mixer.out_proj.bits) == (8, 4)
    ids = torch.randint(0, 100, (1, 20))
    dec = load_for_cpu(path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
        torch.testing.assert_close(dec.prefill(ids), model(ids).logits[0, -1], rtol=1e-5, atol=1e-5)
        step = dec.step(7).clone()
        torch.testing.assert_close(step, model(torch.cat([ids, torch.tensor([[7]])], 1)).logits[0, -1],
                                   rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="no such projection.*choose from"):
        quantize_student(tiny_student(), "int4", linear_bits={"inproj": 8})
    with pytest.raises(ValueError, match="need a quantized body"):
        quantize_student(tiny_student(), "none", linear_bits={"in_proj": 8})


def test_artifact_refuses_corrupted_and_mismatched_files(tmp_path, tiny_student):
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    from llamba.quant.artifact import load_artifact, save_artifact

    model = tiny_student()
    path = save_artifact(model, None, tmp_path / "m.safetensors", quantize_student(model, "int4"))
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF  # one flipped bit pattern inside the tensor data
    bad = tmp_path / "flipped.safetensors"
    bad.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="checksum mismatch"):
        load_artifact(bad)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_artifact(cut)

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(path))
    for change, message in (({"format_version": "0"}, "format version"),
                            ({"format": "other"}, "not a llamba CPU artifact")):
        other = tmp_path / "other.safetensors"
        save_file(tensors, str(other), metadata={**meta, **change})
        with pytest.raises(ValueError, match=message):
            load_artifact(other)
    config = json.loads(meta["config"])
    config["mlp_cfg"]["intermediate_size"] = 128
    wrong = tmp_path / "wrong.safetensors"
    save_file(tensors, str(wrong), metadata={**meta, "config": json.dumps(config)})
    with pytest.raises(ValueError, match="does not match"):
        load_artifact(wrong)


def test_quantize_cli_writes_a_loadable_file(tmp_path, tiny_student):
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    from llamba.checkpoint import save_student
    from llamba.cli import main

    vocab = {f"w{i}": i for i in range(100)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="w1")
    save_student(tiny_student(), tokenizer, tmp_path / "student")
    out = tmp_path / "q"
    assert main(["quantize", str(tmp_path / "student"), "--bits", "4", "--out", str(out)]) == 0
    dec = load_for_cpu(out / "model.cpu.safetensors")
    assert dec.quant["quant"] == "int4" and dec.tokenizer.eos_token == "w1"
    ids = dec.tokenizer("w5 w7 w9", return_tensors="pt")["input_ids"]
    assert ids.tolist() == [[5, 7, 9]]
    assert len(dec.generate(ids, 5)) == 5
    assert main(["quantize", str(tmp_path / "nothing"), "--out", str(out)]) == 2
    file = str(out / "model.cpu.safetensors")
    assert main(["generate", "--model", file, "--prompt", "w5 w7", "--max-new-tokens", "3", "--device", "cpu",
                 "--no-chat-template"]) == 0
    assert main(["generate", "--model", str(tmp_path / "student"), "--quant", "int8", "--prompt", "w5",
                 "--max-new-tokens", "2", "--device", "cpu", "--no-chat-template"]) == 0
    assert main(["generate", "--model", file, "--quant", "int8", "--prompt", "w5", "--device", "cpu"]) == 2


@pytest.mark.slow
def test_quantized_logits_close_on_real_text():
    """The real teacher on real validation text, all linears in our formats: next-token choices barely move."""
    from pathlib import Path

    from llamba.quant.perplexity import corpus_tokens, quantize_all_linears
    from llamba.teacher import load_teacher

    data = Path(__file__).resolve().parents[2] / "shared" / "data" / "corpus" / "gutenberg-val.jsonl.xz"
    if not data.exists():
        pytest.skip(f"{data} missing")
    teacher, tokenizer = load_teacher("smollm2-135m")
    ids = corpus_tokens(data, tokenizer, 128)[None]
    with torch.no_grad():
        full = teacher(ids).logits[0]
        for quant, bits, max_rel, min_agree in (("int8", 8, 0.03, 0.97), ("int4", 4, 0.08, 0.9)):
            model = copy.deepcopy(teacher)
            quantize_all_linears(model, bits, 32, head_bits=8)
            q = model(ids).logits[0]
            rel = ((q - full).norm() / full.norm()).item()
            agree = (q.argmax(-1) == full.argmax(-1)).float().mean().item()
            assert rel < max_rel and agree > min_agree, (quant, rel, agree)
