"""GateLoop mixers (ssm_cfg.mixer = 'gateloop'): the fast forms (rotation + the Discrete Mamba-2 matrix, chunked scan
and step) against the literal complex recurrence, theta = 0 as Discrete Mamba-2 bit for bit, the RoPE attention init,
the model's cache paths, checkpoints, distillation, and the clear refusals. CPU, float64 unless said otherwise."""

import json
import math

import pytest
import torch

from conftest import check_generate_is_greedy_and_padding_does_not_leak, check_prefill_then_decode_is_the_forward
from llamba.checkpoint import load_student, save_student
from llamba.model import GateLoopMamba2, LlambaConfig, LlambaForCausalLM
from llamba.ops.gateloop import (advance_phase, cumulative_phase, gateloop_mixing_matrix, gateloop_scan, gateloop_step,
                                 wrap_phase)
from llamba.ops.gateloop.naive import (complex_state, gateloop_loop_complex, gateloop_matrix_complex, real_state)
from llamba.ops.ssd import mixing_matrix, ssd_scan

F64 = torch.float64
SSM = {"d_state": 16, "n_v_heads": 4, "n_qk_heads": 2, "chunk_size": 16}


def inputs(length, batch=2, H=4, G=2, P=3, N=6, seed=0, theta_scale=1.0):
    g = torch.Generator().manual_seed(seed + length)
    x = torch.randn(batch, length, H, P, dtype=F64, generator=g)
    B = torch.randn(batch, length, G, N, dtype=F64, generator=g)
    C = torch.randn(batch, length, G, N, dtype=F64, generator=g)
    log_a = -0.3 * torch.rand(batch, length, H, dtype=F64, generator=g)  # decays in (0.74, 1]: long memory
    theta = theta_scale * torch.randn(batch, length, G, N // 2, dtype=F64, generator=g)
    state = torch.randn(batch, H, P, N, dtype=F64, generator=g)
    phase = 3 * torch.randn(batch, G, N // 2, dtype=F64, generator=g)
    return x, B, C, log_a, theta, state, phase


def documents(length, batch=2):
    """Row 0: three documents (boundaries inside and on chunk edges); row 1: one."""
    seq = torch.zeros(batch, length, dtype=torch.long)
    if length > 3:
        seq[0, length // 3:] = 1
        seq[0, 2 * length // 3:] = 2
    return seq


def step_loop(x, B, C, log_a, theta, state, phase):
    state, phase = state.clone(), phase.clone()
    ys = [gateloop_step(state, phase, x[:, t], B[:, t], C[:, t], log_a[:, t], theta[:, t]) for t in range(x.shape[1])]
    return torch.stack(ys, 1), state, phase


# -- the recurrence: every form against the literal complex one --------------------------------------------------
@pytest.mark.parametrize("length", [1, 7, 128, 129, 1000])
def test_chunked_scan_equals_complex_recurrence(length):
    """Initial state and phase, document resets (the phase restarts too), 2 groups for 4 heads, chunk 16."""
    x, B, C, log_a, theta, s0, p0 = inputs(length)
    seq = documents(length)
    y_ref, S_ref = gateloop_loop_complex(x, B, C, log_a, theta, complex_state(s0, p0), seq)
    y, state, phase = gateloop_scan(x, B, C, log_a, theta, s0, p0, seq, chunk_size=16, backend="torch")
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(complex_state(state, phase), S_ref, rtol=1e-10, atol=1e-10)
    # without documents, the same from the token-by-token step (which never sees the whole sequence)
    y_ref, S_ref = gateloop_loop_complex(x, B, C, log_a, theta, complex_state(s0, p0))
    ys, st, ph = step_loop(x, B, C, log_a, theta, s0, p0)
    torch.testing.assert_close(ys, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(complex_state(st, ph), S_ref, rtol=1e-10, atol=1e-10)
    y, state, phase = gateloop_scan(x, B, C, log_a, theta, s0, p0, chunk_size=16, backend="torch")
    torch.testing.assert_close(y, ys, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state, st, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(torch.polar(torch.ones_like(phase), phase), torch.polar(torch.ones_like(ph), ph),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("length", [1, 7, 128, 129, 1000])
def test_mixing_matrix_equals_complex_matrix_and_recurrence(length):
    """At 1000 tokens the complex matrix whole (O(L^2 N) complex: ~4 s and over 1 GB) is compared on three diagonal
    blocks only, the first, one across a document boundary (333) and the last: a diagonal block of T is the
    complex matrix of that window alone, since only phase and decay differences within a document enter it. T @ x
    against the recurrence covers the rest of T, long-accumulated phases included."""
    x, B, C, log_a, theta, _, _ = inputs(length)
    seq = documents(length)
    D = torch.randn(4, dtype=F64)
    T = gateloop_mixing_matrix(B, C, log_a, theta, D=D, seq_idx=seq, n_heads=4)
    blocks = [(0, length)] if length <= 256 else [(0, 200), (250, 450), (length - 200, length)]
    for a, b in blocks:
        window = (t[:, a:b] for t in (B, C, log_a, theta))
        torch.testing.assert_close(T[..., a:b, a:b],
                                   gateloop_matrix_complex(*window, D=D, seq_idx=seq[:, a:b], n_heads=4),
                                   rtol=1e-10, atol=1e-10)
    y_ref, _ = gateloop_loop_complex(x, B, C, log_a, theta, None, seq)
    torch.testing.assert_close(torch.einsum("bhls,bshp->blhp", T, x), y_ref + D[:, None] * x, rtol=1e-10, atol=1e-10)


def test_complex_state_map_is_invertible():
    _, _, _, _, _, s0, p0 = inputs(3)
    torch.testing.assert_close(real_state(complex_state(s0, p0), p0), s0, rtol=1e-13, atol=1e-13)


def test_rotation_is_a_true_phase():
    """theta = 2 pi on every pair is no rotation at all (a check that theta is an angle, in radians), and a phase
    of pi flips the sign of the score of a pair: the output is not that of the unrotated recurrence."""
    x, B, C, log_a, theta, _, _ = inputs(20)
    plain, _ = ssd_scan(x, B, C, log_a, chunk_size=8, backend="torch")
    full_turn, _, _ = gateloop_scan(x, B, C, log_a, torch.full_like(theta, 2 * math.pi), chunk_size=8, backend="torch")
    torch.testing.assert_close(full_turn, plain, rtol=1e-10, atol=1e-10)
    turned, _, _ = gateloop_scan(x, B, C, log_a, theta, chunk_size=8, backend="torch")
    assert (turned - plain).abs().max() > 0.1


def edge_documents(length, chunk=8):
    """Documents that start on chunk edges. Row 0: new documents at token 3 and at token ``chunk`` (the second
    chunk's first token); row 1: a one-token document at the end (a chunk's first token when length = k chunk + 1,
    its last when length = k chunk)."""
    seq = torch.zeros(2, length, dtype=torch.long)
    seq[0, 3:] = 1
    seq[0, chunk:] = 2
    seq[1, -1] = 1
    return seq


@pytest.mark.parametrize("length,docs", [(37, documents), (8, edge_documents), (9, edge_documents),
                                         (16, edge_documents), (17, edge_documents)],
                         ids=["37", "8-one-chunk", "9-one-token-past", "16-two-chunks", "17-one-token-past"])
def test_gradients_of_chunked_scan_equal_the_token_loop(length, docs):
    """Autograd through the chunked form (rotation + chunks) gives the complex token loop's gradients in every input,
    the initial state and phase included; at chunk 8, also for lengths on and one past the chunk edges (no or one
    token of tail padding, a last chunk of one token) with documents that start exactly on an edge, where the
    state carried into a chunk must be dropped."""
    x, B, C, log_a, theta, s0, p0 = inputs(length)
    seq = docs(length)
    leaves = [t.clone().requires_grad_(True) for t in (x, B, C, log_a, theta, s0, p0)]
    w = torch.randn(x.shape, dtype=F64, generator=torch.Generator().manual_seed(5))
    y, state, phase = gateloop_scan(*leaves[:5], leaves[5], leaves[6], seq, chunk_size=8, backend="torch")
    ws = torch.randn(complex_state(state, phase).shape, dtype=torch.complex128,
                     generator=torch.Generator().manual_seed(6))
    fast = (y * w).sum() + (complex_state(state, phase) * ws).real.sum()
    g_fast = torch.autograd.grad(fast, leaves)
    y_ref, S_ref = gateloop_loop_complex(*leaves[:5], complex_state(leaves[5], leaves[6]), seq)
    ref = (y_ref * w).sum() + (S_ref * ws).real.sum()
    g_ref = torch.autograd.grad(ref, leaves)
    for name, a, b in zip("x B C log_a theta state phase".split(), g_fast, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=name)


def test_theta_zero_is_discrete_mamba2_bit_for_bit():
    x, B, C, log_a, theta, s0, p0 = inputs(129)
    seq = documents(129)
    zero = torch.zeros_like(theta)
    y, state = ssd_scan(x, B, C, log_a, s0, seq, chunk_size=16, backend="torch")
    y_g, state_g, phase_g = gateloop_scan(x, B, C, log_a, zero, s0, None, seq, chunk_size=16, backend="torch")
    assert torch.equal(y, y_g) and torch.equal(state, state_g) and not phase_g.any()
    assert torch.equal(mixing_matrix(B, C, log_a, seq_idx=seq, n_heads=4),
                       gateloop_mixing_matrix(B, C, log_a, zero, seq_idx=seq, n_heads=4))


def test_phase_restarts_at_each_document():
    theta = torch.rand(1, 6, 1, 2, dtype=F64)
    seq = torch.tensor([[0, 0, 1, 1, 1, 2]])
    init = torch.full((1, 1, 2), 0.5, dtype=F64)
    phi, final = cumulative_phase(theta, init, seq)
    expected = torch.cat([0.5 + theta[:, :2].cumsum(1), theta[:, 2:5].cumsum(1), theta[:, 5:]], 1)
    torch.testing.assert_close(phi, wrap_phase(expected), rtol=0, atol=1e-15)
    torch.testing.assert_close(final, wrap_phase(theta[:, 5]), rtol=0, atol=1e-15)


def test_decode_phase_does_not_drift_in_float32():
    """The step keeps its phase wrapped to [-pi, pi): after 20k float32 steps the angle is still right to 1e-3
    (an unwrapped float32 running sum is off by ~1e-2 here, and by radians after 1e5 tokens)."""
    step = 0.123456789
    phase = torch.zeros(1, 1, 1, dtype=torch.float32)
    theta = torch.full_like(phase, step)
    for _ in range(20000):
        advance_phase(phase, theta)
    exact = math.remainder(20000 * step, 2 * math.pi)
    assert abs(math.remainder(phase.item() - exact, 2 * math.pi)) < 1e-3


def test_float32_with_a_turning_phase_stays_close_over_2048_tokens():
    """float32 scan and step against the float64 complex recurrence over 2048 tokens whose phase turns ~3 rad a token
    (varying token to token), with a memory of hundreds of tokens (decays in (0.991, 1]) over which angle errors
    add up. float32's own rounding gives ~7e-7 in norm for the scan and ~8e-6 for the step (its state sums 2048
    float32 updates); a phase carried as an unwrapped float32 angle (~6000 rad by the end, ulp 5e-4) gives ~1.3e-4
    for the scan, and a decode phase that is never wrapped ~1e-3 for the step: what summing the phase in float64 and
    wrapping it before the float32 cast (and wrapping the step's running phase) guard."""
    x, B, C, log_a, theta, s0, p0 = inputs(2048, theta_scale=0.3)
    theta, log_a = theta + 3.0, 0.03 * log_a
    y_ref, S_ref = gateloop_loop_complex(x, B, C, log_a, theta, complex_state(s0, p0))
    f32 = [t.float() for t in (x, B, C, log_a, theta, s0, p0)]

    def rel(a, b):
        return ((a - b).abs().norm() / b.abs().norm()).item()

    y, state, phase = gateloop_scan(*f32, chunk_size=64, backend="torch")
    assert y.dtype == state.dtype == phase.dtype == torch.float32
    assert rel(y.double(), y_ref) < 1e-5
    assert rel(complex_state(state.double(), phase.double()), S_ref) < 1e-5
    y, state, phase = step_loop(*f32)
    assert rel(y.double(), y_ref) < 1e-4
    assert rel(complex_state(state.double(), phase.double()), S_ref) < 1e-4


def test_bad_theta_shape_is_refused():
    x, B, C, log_a, theta, _, _ = inputs(5)
    with pytest.raises(ValueError, match="one phase per group and state pair"):
        gateloop_scan(x, B, C, log_a, theta[..., :2], backend="torch")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the Triton scan)")
def test_triton_scan_after_rotation_matches_torch():
    x, B, C, log_a, theta, s0, p0 = (t.cuda().float() for t in inputs(300, H=4, G=2, P=16, N=16))
    seq = documents(300).cuda()
    a = gateloop_scan(x, B, C, log_a, theta, s0, p0, seq, chunk_size=64, backend="torch")
    b = gateloop_scan(x, B, C, log_a, theta, s0, p0, seq, chunk_size=64, backend="triton")
    for u, v in zip(a, b):
        torch.testing.assert_close(v, u, rtol=2e-3, atol=2e-3)


# -- the model ----------------------------------------------------------------------------------------------------
def tiny_config(mixer="gateloop", **overrides):
    ssm = {**SSM, "mixer": mixer} if mixer else dict(SSM)
    base = dict(d_model=64, n_layer=2, vocab_size=101, pad_vocab_size_multiple=8, tie_embeddings=True,
                mlp_cfg={"intermediate_size": 96}, ssm_cfg=ssm)
    base.update(overrides)
    return LlambaConfig(**base)


def tiny_model(mixer="gateloop", dtype=F64, seed=0, **overrides):
    torch.manual_seed(seed)
    model = LlambaForCausalLM(tiny_config(mixer, **overrides)).to(dtype).eval()
    with torch.no_grad():  # non-trivial mixers (the phase weight too, so theta depends on the input)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def test_gateloop_model_has_gateloop_mixers_and_phase_weights():
    model = tiny_model()
    assert all(isinstance(layer.mixer, GateLoopMamba2) for layer in model.backbone.layers)
    keys = model.state_dict().keys()
    assert "backbone.layers.0.mixer.phase_proj.weight" in keys and "backbone.layers.0.mixer.phase_proj.bias" in keys
    assert model.backbone.layers[0].mixer.phase_proj.weight.shape == (2 * 8, 64)  # G * N/2 phases
    cache = model.allocate_cache(3)
    assert cache.phase_states.shape == (2, 3, 2, 8) and cache.phase_states.dtype == F64
    assert tiny_model(mixer=None).allocate_cache(3).phase_states is None


def test_fresh_mixer_phase_is_rope_like_and_input_independent():
    model = LlambaForCausalLM(tiny_config())
    p = model.backbone.layers[0].mixer.phase_proj
    assert not p.weight.any()
    torch.testing.assert_close(p.bias[:8].double(), 10000.0 ** -(torch.arange(0, 16, 2, dtype=F64) / 16))


@pytest.mark.parametrize("tied", [True, False])
def test_forward_equals_prefill_then_decode(tied):
    _, cache = check_prefill_then_decode_is_the_forward(tiny_model(tie_embeddings=tied), 101)
    assert cache.phase_states.abs().max() > 0  # the decode steps did carry a phase


def test_generate_matches_manual_greedy_and_padding_does_not_leak():
    model = tiny_model()
    batch, mask, short = check_generate_is_greedy_and_padding_does_not_leak(model, 101)
    # padding turns no phase: the padded row's cache holds exactly the short prompt's phase
    caches = [model.allocate_cache(n) for n in (2, 1)]
    with torch.no_grad():
        model(batch, attention_mask=mask, past_key_values=caches[0])
        model(short, past_key_values=caches[1])
    torch.testing.assert_close(caches[0].phase_states[:, 1], caches[1].phase_states[:, 0], rtol=1e-12, atol=1e-12)


def test_packed_documents_equal_separate_forwards():
    model = tiny_model()
    a, b = torch.randint(0, 101, (1, 11)), torch.randint(0, 101, (1, 20))
    seq = torch.tensor([[0] * 11 + [1] * 20])
    with torch.no_grad():
        packed = model(torch.cat([a, b], 1), seq_idx=seq).logits
        torch.testing.assert_close(packed[:, :11], model(a).logits, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(packed[:, 11:], model(b).logits, rtol=1e-10, atol=1e-10)


def test_mixer_matrix_is_its_scan():
    """mixing_matrix(u) @ x is the mixer's scan output with the D skip (what stage 1 trains is what runs)."""
    model = tiny_model()
    mixer = model.backbone.layers[1].mixer
    u = torch.randn(2, 21, 64, dtype=F64)
    seq = torch.tensor([[0] * 9 + [1] * 12, [0] * 21])
    from llamba.ops.conv import causal_conv

    xBC, _, A_log = mixer._split_projection(u)
    xBC, _ = causal_conv(xBC, mixer.conv1d.weight, mixer.conv1d.bias, None, seq)
    x, B, C = mixer._split_xBC(xBC)
    y, _, _ = gateloop_scan(x, B, C, mixer.log_decay(A_log), mixer.phase(u), seq_idx=seq, chunk_size=8,
                            backend="torch")
    T = mixer.mixing_matrix(u, seq_idx=seq)
    torch.testing.assert_close(torch.einsum("bhls,bshp->blhp", T, x), y + mixer.D[:, None] * x, rtol=1e-10, atol=1e-10)


def test_zero_phase_model_is_the_discrete_mamba2_model_bit_for_bit():
    """A GateLoop model with the Discrete Mamba-2 model's weights and phase weight = bias = 0 computes exactly the
    same: forward, prefill + decode, and the mixing matrices."""
    dm2 = tiny_model(mixer=None, dtype=torch.float32)
    gl = LlambaForCausalLM(tiny_config()).float().eval()
    missing, unexpected = gl.load_state_dict(dm2.state_dict(), strict=False)
    assert not unexpected and sorted(missing) == sorted(f"backbone.layers.{i}.mixer.phase_proj.{w}"
                                                       for i in range(2) for w in ("weight", "bias"))
    with torch.no_grad():
        for layer in gl.backbone.layers:
            layer.mixer.phase_proj.weight.zero_()
            layer.mixer.phase_proj.bias.zero_()
    ids = torch.randint(0, 101, (2, 37))
    with torch.no_grad():
        assert torch.equal(gl(ids).logits, dm2(ids).logits)
        caches = [m.allocate_cache(2) for m in (dm2, gl)]
        outs = [[m(ids[:, :30], past_key_values=c).logits] + [m(ids[:, t:t + 1], past_key_values=c).logits
                                                              for t in range(30, 37)]
                for m, c in zip((dm2, gl), caches)]
        for a, b in zip(*outs):
            assert torch.equal(a, b)
        assert torch.equal(caches[0].ssm_states, caches[1].ssm_states)
        u = torch.randn(2, 13, 64)
        for ld, lg in zip(dm2.backbone.layers, gl.backbone.layers):
            assert torch.equal(ld.mixer.mixing_matrix(u), lg.mixer.mixing_matrix(u))


def test_mix_without_theta_is_refused():
    """A caller that runs the mixer between its own projections (like the generation engine) and forgets the phase
    would silently get Discrete Mamba-2's output: refused."""
    mixer = tiny_model().backbone.layers[0].mixer
    xBC, z, A_log = mixer._split_projection(torch.randn(1, 3, 64, dtype=F64))
    with pytest.raises(ValueError, match="needs theta"):
        mixer.mix(xBC, z, A_log)


def test_save_load_roundtrip(tmp_path):
    model = tiny_model(dtype=torch.float32)
    save_student(model, None, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["ssm_cfg"]["mixer"] == "gateloop"
    loaded = load_student(tmp_path)
    assert isinstance(loaded.backbone.layers[0].mixer, GateLoopMamba2)
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    ids = torch.randint(0, 101, (2, 20))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_discrete_mamba2_config_names_no_mixer(tmp_path):
    """Without the field nothing changes: an official-format config.json gets no mixer key."""
    save_student(tiny_model(mixer=None, dtype=torch.float32), None, tmp_path)
    assert "mixer" not in json.loads((tmp_path / "config.json").read_text())["ssm_cfg"]


# -- bad input ----------------------------------------------------------------------------------------------------
def test_unknown_mixer_and_odd_d_state_are_clear_errors():
    with pytest.raises(ValueError, match="unknown; choose one of discrete_mamba2, gateloop"):
        tiny_config(mixer="gatelop")
    with pytest.raises(ValueError, match="d_state must be even"):
        tiny_config(ssm_cfg={**SSM, "d_state": 15, "mixer": "gateloop"})
    tiny_config(ssm_cfg={**SSM, "d_state": 15})  # odd is fine for Discrete Mamba-2


def test_cli_convert_refuses_bad_mixer_before_loading_the_teacher(tmp_path, capsys):
    from llamba.cli import main

    teacher = str(tmp_path / "no-such-teacher")  # never reached: the refusal comes first
    assert main(["convert", "--teacher", teacher, "--out", str(tmp_path / "s"), "--mixer", "gateloop",
                 "--d-state", "7"]) == 2
    err = capsys.readouterr().err
    assert "d_state must be even" in err and "--d-state" in err and "Traceback" not in err
    assert main(["convert", "--teacher", teacher, "--out", str(tmp_path / "s"), "--mixer", "mamba3"]) == 2
    assert "unknown; choose one of" in capsys.readouterr().err


@pytest.mark.parametrize("route", ["one", "split", "kernel"])
@torch.no_grad()
def test_model_step_and_engine_rotate_like_the_forward(route):
    """The model's own decode step (what the engine captures) turns the phase as the forward does, on every in_proj
    route; the engine's tokens equal transformers' generate over the forward."""
    from llamba.generation import generate
    from llamba.model.functional import EAGER, StepOptions

    model = tiny_model()
    ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(3))
    ref, ours = model.allocate_cache(2), model.allocate_cache(2)
    model(ids, past_key_values=ref, use_cache=True)
    model.prefill(ids, ours, None, EAGER)
    for t in range(4):
        tok = torch.tensor([5 + t, 60 - t])
        want = model(tok[:, None], past_key_values=ref, use_cache=True).logits[:, -1]
        torch.testing.assert_close(model.step(tok, ours, StepOptions(EAGER, route)), want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ours.phase_states, ref.phase_states, rtol=1e-12, atol=1e-12)
    got = generate(model, ids, max_new_tokens=6).sequences
    assert torch.equal(got, model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0))


# -- conversion from a Llama teacher: the RoPE init -------------------------------------------------------------
ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    # dynamic NTK: its frequencies change only past max_position_embeddings (256 here): the init takes the ones below
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0},
    # longrope: per-pair factors (the short ones up to original_max_position_embeddings) and an attention scaling
    # (sqrt(1 + ln 4 / ln 64) for factor 4), like yarn's
    "longrope": {"rope_type": "longrope", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
                 "short_factor": [1.0, 1.5, 2.0, 3.0], "long_factor": [1.0, 4.0, 8.0, 16.0]},
}


def llama_teacher(rope, **fields):
    """A float64 Llama of 2 layers, 4 query / 2 KV heads of 8. ``rope``: its rope_parameters; None with ``fields``
    rope_theta / rope_scaling: the config as transformers < 5 wrote it (transformers 5 reads those too)."""
    from transformers import LlamaConfig as HFLlamaConfig
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    if rope is not None:
        fields["rope_parameters"] = dict(rope)
    config = HFLlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **fields)
    teacher = LlamaForCausalLM(config).double().eval()
    with torch.no_grad():  # larger q/k so that the rotation visibly matters
        for layer in teacher.model.layers:
            layer.self_attn.q_proj.weight.mul_(20)
            layer.self_attn.k_proj.weight.mul_(20)
    return teacher


@pytest.mark.parametrize("rope", sorted(ROPES))
def test_attention_init_is_linearised_attention_with_rope(rope):
    """With the decay held at 1 (log_a = 0, as the Discrete Mamba-2 attention-init test holds it), an attention-
    initialised GateLoop mixer's matrix is (q_t R_t) . (k_s R_s) / sqrt(d) under the causal mask, q and k the
    teacher's own, rotated by transformers' rotary embedding (rope_theta, rope_scaling, its attention scaling)."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    from llamba.convert import student_from_teacher
    from llamba.ops.conv import causal_conv

    teacher = llama_teacher(ROPES[rope])
    student = student_from_teacher(teacher, d_state=8, init="attention", mixer="gateloop").double()
    assert student.config.ssm_cfg["mixer"] == "gateloop"
    L = 40
    u = torch.randn(2, L, 32, dtype=F64)
    rotary = LlamaRotaryEmbedding(teacher.config)
    pos = torch.arange(L)[None].expand(2, L)
    cos, sin = rotary(u, pos)  # transformers' own: angles in float32
    angle = pos[..., None].double() * rotary.inv_freq.double()  # the same angles in float64
    cos64 = torch.cat([angle.cos()] * 2, -1) * rotary.attention_scaling
    sin64 = torch.cat([angle.sin()] * 2, -1) * rotary.attention_scaling
    for block, layer in zip(student.backbone.layers, teacher.model.layers):
        mixer, attn = block.mixer, layer.self_attn
        xBC, _, A_log = mixer._split_projection(u)
        xBC, _ = causal_conv(xBC, mixer.conv1d.weight, mixer.conv1d.bias)
        _, B, C = mixer._split_xBC(xBC)
        T = gateloop_mixing_matrix(B, C, torch.zeros_like(A_log), mixer.phase(u), D=mixer.D, n_heads=mixer.n_v_heads)
        q = attn.q_proj(u).view(2, L, 4, 8).transpose(1, 2)
        k = attn.k_proj(u).view(2, L, 2, 8).transpose(1, 2).repeat_interleave(2, dim=1)
        for c, s, tol in ((cos64, sin64, 1e-10), (cos, sin, 2e-4)):
            qr, kr = apply_rotary_pos_emb(q, k, c, s)
            expected = (qr @ kr.transpose(-1, -2) / 8 ** 0.5).tril()
            torch.testing.assert_close(T, expected, rtol=tol, atol=tol * expected.abs().max().item())
        plain = (q @ k.transpose(-1, -2) / 8 ** 0.5).tril()
        assert (T - plain).abs().max() > 0.1 * plain.abs().max()  # RoPE does change it: the check has teeth
        assert torch.equal(mixer.out_proj.weight, attn.o_proj.weight)


def transformers_rope(config):
    """(inv_freq, attention_scaling) as transformers computes them for a Llama config: its RoPE init function."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rope_type = config.rope_parameters["rope_type"]
    init = (LlamaRotaryEmbedding.compute_default_rope_parameters if rope_type == "default"
            else ROPE_INIT_FUNCTIONS[rope_type])
    return init(config)


def check_phase_is_the_teachers_rope(student, teacher):
    """Each mixer's phase (of a ``llama_teacher``'s student): weight 0, bias the teacher's inverse frequencies exactly
    (float32 values, as transformers computes them, once per query/key group); B = W_k / sqrt(d) (KV heads repeated)
    times the attention scaling squared, which RoPE puts on q and k each."""
    inv_freq, scaling = transformers_rope(teacher.config)
    torch.testing.assert_close(teacher.model.rotary_emb.inv_freq, inv_freq.to(F64), rtol=0, atol=0)  # the teacher's own
    for block, layer in zip(student.backbone.layers, teacher.model.layers):
        mixer = block.mixer
        assert not mixer.phase_proj.weight.any()
        assert torch.equal(mixer.phase_proj.bias, inv_freq.to(mixer.phase_proj.bias.dtype).repeat(mixer.n_qk_heads))
        gn = mixer.n_qk_heads * mixer.d_state
        k = layer.self_attn.k_proj.weight.view(2, 8, -1).repeat_interleave(2, dim=0).reshape(gn, -1)
        torch.testing.assert_close(mixer.in_proj.weight[mixer.d_inner:mixer.d_inner + gn],
                                   k / 8 ** 0.5 * scaling ** 2, rtol=1e-15, atol=0)
    return inv_freq, scaling


@pytest.mark.parametrize("rope", sorted(ROPES))
def test_attention_init_phase_is_the_teachers_rope(rope):
    """Every RoPE type of ROPES: the attention init's phase bias is the teacher's inverse frequencies as transformers'
    own RoPE init function for that type computes them (and as the teacher's rotary embedding holds them); none is
    refused. The types are told apart: each gives other frequencies or another scaling than the default RoPE
    (dynamic excepted, whose frequencies are the default's below max_position_embeddings)."""
    from llamba.convert import student_from_teacher

    teacher = llama_teacher(ROPES[rope])
    student = student_from_teacher(teacher, d_state=8, init="attention", mixer="gateloop")
    inv_freq, scaling = check_phase_is_the_teachers_rope(student, teacher)
    default = 10000.0 ** -(torch.arange(0, 8, 2, dtype=F64) / 8)
    differs = not torch.allclose(inv_freq.to(F64), default) or scaling != 1.0
    assert differs == (rope not in ("default", "dynamic")), (rope, inv_freq, scaling)


def transformers4_fields(rope):
    """rope_parameters as a transformers < 5 config.json spells them: rope_theta beside rope_scaling."""
    return {"rope_theta": rope["rope_theta"], "rope_scaling": {k: v for k, v in rope.items() if k != "rope_theta"}}


TRANSFORMERS4_ROPES = {  # name: (the fields of a transformers < 5 config, the same RoPE as rope_parameters)
    "default": ({"rope_theta": 500000.0}, {"rope_type": "default", "rope_theta": 500000.0}),
    "llama3": (transformers4_fields(ROPES["llama3"]), ROPES["llama3"]),
    # the older spelling, which names the type "type"
    "linear": ({"rope_theta": 10000.0, "rope_scaling": {"type": "linear", "factor": 4.0}}, ROPES["linear"]),
    "yarn": (transformers4_fields(ROPES["yarn"]), ROPES["yarn"]),
}


@pytest.mark.parametrize("rope", sorted(TRANSFORMERS4_ROPES))
def test_attention_init_reads_transformers4_rope_fields(rope):
    """A teacher config with transformers < 5's rope_theta / rope_scaling instead of rope_parameters (a config.json
    saved by transformers 4): the phase bias is the same as for that RoPE given as rope_parameters. And the code's
    own reading of those fields (attention_cfg_from_teacher, the hybrid layers' RoPE) on a transformers-4-shaped
    config object gives RoPE parameters with which transformers computes the same frequencies and scaling."""
    from types import SimpleNamespace

    from transformers import LlamaConfig as HFLlamaConfig

    from llamba.convert import attention_cfg_from_teacher, student_from_teacher

    legacy, modern = TRANSFORMERS4_ROPES[rope]
    want = transformers_rope(llama_teacher(modern).config)
    teacher = llama_teacher(None, **legacy)
    student = student_from_teacher(teacher, d_state=8, init="attention", mixer="gateloop")
    inv_freq, scaling = check_phase_is_the_teachers_rope(student, teacher)
    assert torch.equal(inv_freq, want[0]) and scaling == want[1]
    assert not torch.allclose(inv_freq.to(F64), 10000.0 ** -(torch.arange(0, 8, 2, dtype=F64) / 8))  # fields read

    # transformers 4's LlamaConfig holds rope_theta, and rope_scaling with "rope_type" copied from a legacy "type"
    scaling_field = dict(legacy.get("rope_scaling") or {}) or None
    if scaling_field and "type" in scaling_field:
        scaling_field["rope_type"] = scaling_field["type"]
    old = SimpleNamespace(num_attention_heads=4, num_key_value_heads=2, hidden_size=32, max_position_embeddings=256,
                          rope_theta=legacy["rope_theta"], rope_scaling=scaling_field)
    params = attention_cfg_from_teacher(old)["rope_parameters"]
    config = HFLlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                           rope_parameters=params)
    got = transformers_rope(config)
    assert torch.equal(got[0], want[0]) and got[1] == want[1], params


@pytest.mark.parametrize("fields", ["rope_parameters", "rope_scaling"])
def test_cli_convert_gateloop_attention_init_end_to_end(tmp_path, capsys, fields):
    """`llamba convert --mixer gateloop --init attention` on a saved tiny teacher folder whose config.json names a
    llama3 RoPE with theta 5e5 (as transformers 5 writes it, or as transformers 4 did: rope_theta beside
    rope_scaling): the student folder's config says gateloop and it loads as GateLoop mixers whose phase bias is the
    teacher's RoPE inverse frequencies, not the default 10000^(-2j/N) that a fresh mixer starts with."""
    from transformers import LlamaConfig as HFLlamaConfig
    from transformers import LlamaForCausalLM

    from llamba.cli import main
    from llamba.distill.testing import make_teacher
    from llamba.model.mixer import rope_frequencies

    teacher = make_teacher(tmp_path / "teacher", vocab=280)  # 2 layers, 4 query / 2 KV heads of 16
    config = json.loads((teacher / "config.json").read_text())
    config.pop("rope_parameters", None), config.pop("rope_theta", None), config.pop("rope_scaling", None)
    config.update({"rope_parameters": dict(ROPES["llama3"])} if fields == "rope_parameters"
                  else transformers4_fields(ROPES["llama3"]))
    (teacher / "config.json").write_text(json.dumps(config))
    out = tmp_path / "student"
    assert main(["convert", "--teacher", str(teacher), "--out", str(out), "--mixer", "gateloop", "--init", "attention",
                 "--d-state", "16"]) == 0
    assert "gateloop mixers" in capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["ssm_cfg"]["mixer"] == "gateloop"

    inv_freq = LlamaForCausalLM.from_pretrained(teacher).model.rotary_emb.inv_freq  # as transformers runs the teacher
    want, _ = transformers_rope(HFLlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=1024,
                                              rope_parameters=dict(ROPES["llama3"])))
    assert torch.equal(inv_freq, want)  # transformers did read the llama3 RoPE from either spelling
    assert not torch.allclose(inv_freq.double(), rope_frequencies(16))
    student = load_student(out)
    assert student.config.mixer == "gateloop"
    for block in student.backbone.layers:
        mixer = block.mixer
        assert isinstance(mixer, GateLoopMamba2) and not mixer.phase_proj.weight.any()
        assert torch.equal(mixer.phase_proj.bias, inv_freq.repeat(mixer.n_qk_heads))


def test_identity_init_and_attention_init_sizes():
    from llamba.convert import student_from_teacher

    teacher = llama_teacher(ROPES["default"])
    student = student_from_teacher(teacher, d_state=4, init="identity", mixer="gateloop")
    assert isinstance(student.backbone.layers[0].mixer, GateLoopMamba2)
    with pytest.raises(ValueError, match="d_state must be even"):
        student_from_teacher(teacher, d_state=5, mixer="gateloop")
    with pytest.raises(ValueError, match="unknown"):
        student_from_teacher(teacher, d_state=4, mixer="rwkv")


def test_hybrid_with_gateloop_mixers_decodes_like_its_forward():
    from llamba.convert import student_from_teacher
    from llamba.model import LlambaAttention

    student = student_from_teacher(llama_teacher(ROPES["llama3"]), d_state=8, init="attention", mixer="gateloop",
                                   attention_layers=[1]).double()
    assert isinstance(student.backbone.layers[0].mixer, GateLoopMamba2)
    assert isinstance(student.backbone.layers[1].mixer, LlambaAttention)
    ids = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        full = student(ids).logits
        cache = student.allocate_cache(2, max_length=32)
        pieces = [student(ids[:, :12], past_key_values=cache).logits]
        pieces += [student(ids[:, t:t + 1], past_key_values=cache).logits for t in range(12, 20)]
    assert (torch.cat(pieces, 1) - full).abs().max() < 1e-10

