"""init 'attention-calibrated' (llamba.calibrate): on a tiny trained teacher, each mixer's decay sits at its head's
target on the calibration tokens, one state dimension per group carries the constant feature, and each head's
output has the teacher attention head's RMS (GateLoop too, its feature pair held still); the CLI's spelled-out
choices stay llamba's."""

import math

import pytest
import torch

from llamba import calibrate
from llamba.convert import INITS, student_from_teacher


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    from llamba.distill.testing import make_teacher
    from llamba.teacher import load_teacher

    folder = make_teacher(tmp_path_factory.mktemp("calib") / "teacher", layers=2, hidden=64, heads=4, kv_heads=2,
                          vocab=280, train_steps=60)
    model, _ = load_teacher(folder, dtype=torch.float64)
    return model


@pytest.mark.parametrize("mixer_name", ["discrete_mamba2", "gateloop"])
def test_calibrated_init_sets_decay_feature_and_scale(teacher, monkeypatch, mixer_name):
    """Exact on the calibration tokens: A_log and the constant features are c * (u . m / |m|^2), whose token mean
    is c (m is the mean of u); each head's output RMS is the teacher head's; a GateLoop mixer's feature pair does
    not turn. (How near every token's decay is to the mean depends on how aligned the inputs are: in SmolLM2,
    u . m / |m|^2 is 1 +- 0.1-0.3.)"""
    monkeypatch.setattr(calibrate, "CALIBRATION", (2, 64))
    student = student_from_teacher(teacher, d_state=16, init="attention", mixer=mixer_name)
    report = calibrate.calibrate_attention_init(student, teacher)
    g = torch.Generator().manual_seed(0)  # the calibration's own tokens (seed 0)
    ids = torch.randint(0, teacher.config.vocab_size, calibrate.CALIBRATION, generator=g)
    hidden, heads = calibrate.teacher_statistics(teacher, ids)
    for i, layer in enumerate(student.backbone.layers):
        mixer = layer.mixer
        u = layer.input_layernorm(hidden[i])
        xBC, _, A_log = mixer._split_projection(u)
        targets = calibrate.decay_targets(mixer.n_v_heads)
        torch.testing.assert_close(A_log.mean((0, 1)), calibrate.a_log_for(targets), rtol=1e-9, atol=1e-9)
        _, B, C = mixer._split_xBC(xBC)  # conv is the identity at init: B, C as projected
        for feature in (B, C):
            feature = feature.reshape(*feature.shape[:2], mixer.n_qk_heads, mixer.d_state).mean((0, 1))
            for group, j in enumerate(report[i]["constant_dims"]):
                assert feature[group, j].item() == pytest.approx(math.sqrt(calibrate.CONSTANT), rel=1e-9)
                if mixer.rotates:  # its pair stands still and holds the feature alone
                    assert torch.all(mixer.phase(u)[..., group, j] == 0)
                    assert torch.all(feature[group, j + mixer.d_state // 2] == 0)
        got = {}
        hook = mixer.out_proj.register_forward_pre_hook(lambda m, inp: got.__setitem__("y", inp[0]))
        with torch.no_grad():
            mixer(u)
        hook.remove()
        ours = got["y"].reshape(-1, mixer.n_v_heads, mixer.head_dim).pow(2).mean((0, 2)).sqrt()
        theirs = heads[i].reshape(-1, mixer.n_v_heads, mixer.head_dim).pow(2).mean((0, 2)).sqrt()
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=0)
    # student_from_teacher's init='attention-calibrated' is exactly that
    again = student_from_teacher(teacher, d_state=16, init="attention-calibrated", mixer=mixer_name)
    assert all(torch.equal(a, b) for a, b in zip(again.parameters(), student.parameters()))


def test_a_log_for_inverts_the_decay():
    a = torch.tensor([0.5, 0.9, 0.99, 0.999], dtype=torch.float64)
    torch.testing.assert_close(torch.exp(-torch.nn.functional.softplus(calibrate.a_log_for(a))), a)
    assert calibrate.decay_targets(1).tolist() == [calibrate.DECAYS[1]]
    assert math.isclose(calibrate.decay_targets(9)[0].item(), calibrate.DECAYS[0])


def test_the_cli_lists_every_init():
    from llamba.cli.common import INIT_CHOICES

    assert INIT_CHOICES == INITS


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the teacher on CUDA, the student built on the CPU")
def test_calibration_with_the_teacher_on_cuda(teacher, monkeypatch):
    """As the pipeline calls it: a bf16 teacher on CUDA, the student built on the CPU (student_from_teacher)."""
    import copy

    monkeypatch.setattr(calibrate, "CALIBRATION", (2, 64))
    on_gpu = copy.deepcopy(teacher).to("cuda", torch.bfloat16)
    student = student_from_teacher(on_gpu, d_state=16, init="attention-calibrated")
    assert all(torch.isfinite(p).all() for p in student.parameters())

