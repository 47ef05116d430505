"""Each MOHAWK stage's loss against a hand computation on a tiny teacher/student (float64), the teacher targets, and
document isolation in packed batches for both models."""

import math

import pytest
import torch
import torch.nn.functional as F

from llamba.distill.data import Batch, boundaries
from llamba.distill.stages import (HiddenStateAlignment, KnowledgeDistillation, MatrixOrientation, soft_cross_entropy,
                                   teacher_targets)
from llamba.distill.testing import make_teacher
from llamba.ops.ssd import ssd_loop


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from llamba.convert import student_from_teacher
    from llamba.teacher import load_teacher

    folder = make_teacher(tmp_path_factory.mktemp("stages") / "teacher", layers=2, hidden=32, heads=4, kv_heads=2, vocab=280)
    teacher, tok = load_teacher(folder, dtype=torch.float64)
    torch.manual_seed(0)
    student = student_from_teacher(teacher, d_state=8).double()
    with torch.no_grad():  # move off the identity init so every term of the losses is non-trivial
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return teacher, student, tok


def packed_batch(eos: int, length: int = 12) -> Batch:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 200, (2, length), generator=g)
    ids[0, 4] = eos
    ids[1, 7] = eos
    seq_idx, pos = boundaries(ids, eos)
    return Batch(ids, seq_idx, pos)


def mixer_matrix_by_impulses(mixer, u, seq_idx):
    """The mixing matrix, column by column: run the token loop on one-hot values (slow twin of mixing_matrix)."""
    from llamba.ops.conv import causal_conv

    xBC, _, A_log = mixer._split_projection(u)
    xBC, _ = causal_conv(xBC, mixer.conv1d.weight, mixer.conv1d.bias, None, seq_idx)
    _, B, C = mixer._split_xBC(xBC)
    b, L = u.shape[:2]
    eye = torch.eye(L, dtype=u.dtype)[None, :, None, :].expand(b, L, mixer.n_v_heads, L)  # x[b, s, h, p] = [s == p]
    y, _ = ssd_loop(eye, B, C, mixer.log_decay(A_log), seq_idx=seq_idx)  # y[b, l, h, p] = T[b, h, l, p]
    return y.permute(0, 2, 1, 3) + torch.diag_embed(mixer.D[None, :, None].expand(b, -1, L))


def test_teacher_targets(models):
    teacher, _, tok = models
    batch = packed_batch(tok.eos_token_id)
    t1 = teacher_targets(teacher, batch, 1)
    assert len(t1.hidden_in) == len(t1.attentions) == 2
    assert t1.attentions[0].shape == (2, 4, 12, 12)  # per query head: GQA expanded
    # documents never attend to each other: block-diagonal causal attention, rows summing to 1
    for a in t1.attentions:
        assert torch.all(a[0, :, 5:, :5] == 0) and torch.all(a[1, :, 8:, :8] == 0)
        torch.testing.assert_close(a.sum(-1), torch.ones_like(a.sum(-1)))
    # hidden_out[i] is layer i's own output: the next layer's input, and the final norm's input for the last
    torch.testing.assert_close(t1.hidden_out[0], t1.hidden_in[1])
    out = teacher.model(batch.input_ids, position_ids=batch.position_ids, use_cache=False)
    torch.testing.assert_close(teacher.model.norm(t1.hidden_out[-1]), out.last_hidden_state)
    t2 = teacher_targets(teacher, batch, 2)
    for a, b in zip(t1.hidden_out, t2.hidden_out):  # eager (stage 1) and sdpa (stage 2) agree (CPU sdpa: ~1e-6)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_stage1_loss_by_hand(models):
    teacher, student, tok = models
    batch = packed_batch(tok.eos_token_id)
    targets = teacher_targets(teacher, batch, 1)
    loss, per_layer = MatrixOrientation(student)(targets, batch.seq_idx)
    expected = 0.0
    for block, h, att in zip(student.backbone.layers, targets.hidden_in, targets.attentions):
        T = mixer_matrix_by_impulses(block.mixer, block.input_layernorm(h), batch.seq_idx)
        norms = [math.sqrt(((T[b, k] - att[b, k]) ** 2).sum().item()) for b in range(2) for k in range(4)]
        expected += sum(norms) / len(norms)
    assert loss.item() == pytest.approx(expected, rel=1e-9)
    assert len(per_layer) == 2


def test_stage2_loss_by_hand(models):
    teacher, student, tok = models
    batch = packed_batch(tok.eos_token_id)
    targets = teacher_targets(teacher, batch, 2)
    for mixer_only in (False, True):
        module = HiddenStateAlignment(student, mixer_only=mixer_only)
        loss, _ = module(targets, batch.seq_idx)
        expected = 0.0
        for block, h, target in zip(student.backbone.layers, targets.hidden_in, targets.hidden_out):
            mid = h + block.mixer(block.input_layernorm(h), seq_idx=batch.seq_idx)
            out = mid + block.mlp(block.post_attention_layernorm(mid))
            dists = [math.sqrt(((out[b, t] - target[b, t]) ** 2).sum().item()) for b in range(2) for t in range(12)]
            expected += sum(dists) / len(dists)
        assert loss.item() == pytest.approx(expected, rel=1e-9)
    n_mixer = sum(p.numel() for p in HiddenStateAlignment(student, True).trainable())
    assert n_mixer == sum(p.numel() for b in student.backbone.layers for p in b.mixer.parameters())


def test_stage3_loss_by_hand(models):
    teacher, student, tok = models
    batch = packed_batch(tok.eos_token_id)
    targets = teacher_targets(teacher, batch, 3)
    for tau in (1.0, 2.0):
        loss, _ = KnowledgeDistillation(student, temperature=tau)(targets, batch.seq_idx, batch.input_ids)
        s = student(batch.input_ids, seq_idx=batch.seq_idx).logits
        t = targets.logits
        total = 0.0
        for b in range(2):
            for i in range(12):
                p = [math.exp(v / tau) for v in t[b, i].tolist()]
                zs = sum(math.exp(v / tau) for v in s[b, i].tolist())
                total += -sum(pi / sum(p) * (v / tau - math.log(zs)) for pi, v in zip(p, s[b, i].tolist()))
        assert loss.item() == pytest.approx(total / 24 * tau ** 2, rel=1e-9)
    # identical logits: soft CE is the teacher's entropy
    logits = torch.randn(3, 5, 7, dtype=torch.float64)
    ent = -(F.softmax(logits, -1) * F.log_softmax(logits, -1)).sum(-1).mean()
    torch.testing.assert_close(soft_cross_entropy(logits, logits), ent)


def test_stage3_freezing(models):
    _, student, _ = models
    everything = {id(p) for p in student.parameters()}
    frozen_mlp = {id(p) for p in KnowledgeDistillation(student, freeze_mlp=True).trainable()}
    frozen_emb = {id(p) for p in KnowledgeDistillation(student, freeze_embeddings=True).trainable()}
    mlp = {id(p) for b in student.backbone.layers for p in b.mlp.parameters()}
    assert frozen_mlp == everything - mlp
    assert id(student.backbone.embedding.weight) not in frozen_emb and len(frozen_emb) == len(everything) - 1
    stage1 = {id(p) for p in MatrixOrientation(student).trainable()}
    assert id(student.backbone.layers[0].mixer.out_proj.weight) not in stage1


def test_packed_documents_do_not_leak(models):
    """The second document of a packed window gives the same student logits and teacher logits as alone."""
    teacher, student, tok = models
    batch = packed_batch(tok.eos_token_id)
    alone = batch.input_ids[:1, 5:]
    with torch.no_grad():
        s_packed = student(batch.input_ids[:1], seq_idx=batch.seq_idx[:1]).logits[:, 5:]
        s_alone = student(alone).logits
        t_packed = teacher(batch.input_ids[:1], position_ids=batch.position_ids[:1], use_cache=False).logits[:, 5:]
        t_alone = teacher(alone, use_cache=False).logits
        s_leaky = student(batch.input_ids[:1]).logits[:, 5:]
    torch.testing.assert_close(s_packed, s_alone)
    torch.testing.assert_close(t_packed, t_alone)
    assert not torch.allclose(s_leaky, s_alone)  # without seq_idx the first document would leak in
