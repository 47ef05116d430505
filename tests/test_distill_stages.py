"""Each MOHAWK stage's loss against a hand computation on a tiny teacher/student (float64), the teacher targets, and
document isolation in packed batches for both models."""

import math

import pytest
import torch
import torch.nn.functional as F

from llamba.distill.data import Batch, boundaries
from llamba.distill.losses import linear_soft_cross_entropy
from llamba.distill.stages import (HiddenStateAlignment, KnowledgeDistillation, MatrixOrientation, soft_cross_entropy,
                                   teacher_targets)
from llamba.distill.trainer import param_groups
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


@pytest.mark.parametrize("attention", ["eager", pytest.param("flex_attention", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="flex attention compiles its kernels: on CUDA"))])
def test_teacher_attention_setting_gives_the_same_targets(models, attention):
    """``teacher_attention`` (stages 2-3) changes how the teacher computes, not what: the same block-diagonal
    logits and hidden states as SDPA. A name transformers does not have is refused before any work."""
    from llamba.distill.stages import stage_targets

    import copy

    teacher, _, tok = models
    flex = attention == "flex_attention"
    # flex runs on CUDA, in float32: a copy, so the module's float64 teacher stays as it is
    model = copy.deepcopy(teacher).to("cuda", torch.float32) if flex else teacher
    batch = packed_batch(tok.eos_token_id).to("cuda" if flex else "cpu")
    for stage in (2, 3):
        want = stage_targets(model, batch, stage, {})
        got = stage_targets(model, batch, stage, {"teacher_attention": attention})
        for a, b in ((got.logits, want.logits),) if stage == 3 else zip(got.hidden_out, want.hidden_out):
            torch.testing.assert_close(a, b, rtol=1e-3 if flex else 1e-4, atol=1e-4 if flex else 1e-5)
    teacher.set_attn_implementation("sdpa")  # the module's teacher, as the other tests expect it
    with pytest.raises(ValueError, match="choose one of"):
        stage_targets(teacher, packed_batch(tok.eos_token_id), 3, {"teacher_attention": "flash"})


@pytest.mark.parametrize("align", ["block", "attention"])
def test_stage2_teacher_targets_trace_into_one_graph(models, align):
    """``teacher_compile`` in stage 2: the hooks that catch the last layer's raw output (and, for attention
    alignment, each attention's output) are registered inside ``stage_targets``, so dynamo traces them into one
    graph with no break, and the compiled call gives the eager targets. aot_eager: dynamo's tracing without
    inductor's C++ build (the CUDA test below runs inductor)."""
    import torch._dynamo

    from llamba.distill.stages import stage_targets

    teacher, _, tok = models
    batch, cfg = packed_batch(tok.eos_token_id), {"align": align}
    torch._dynamo.reset()
    explained = torch._dynamo.explain(stage_targets)(teacher, batch, 2, cfg)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    want = stage_targets(teacher, batch, 2, cfg)
    got = torch.compile(stage_targets, backend="aot_eager")(teacher, batch, 2, cfg)
    names = ("hidden_in", "hidden_out") + (("attention_out",) if align == "attention" else ())
    for name in names:
        assert len(getattr(got, name)) == len(getattr(want, name)) == len(teacher.model.layers)
        for g, w in zip(getattr(got, name), getattr(want, name)):
            torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="teacher_compile is for CUDA (a CPU run stays eager)")
def test_compiled_teacher_gives_the_same_logits(models):
    """``teacher_compile``: the trainer calls ``torch.compile(stage_targets)`` in stages 2-3; the same block-diagonal
    logits and hidden states as the eager call (float32 on CUDA: fused arithmetic, not a different computation)."""
    import copy

    from llamba.distill.stages import stage_targets

    teacher, _, tok = models
    model = copy.deepcopy(teacher).to("cuda", torch.float32)
    batch = packed_batch(tok.eos_token_id).to("cuda")
    want = stage_targets(model, batch, 3, {}).logits
    got = torch.compile(stage_targets)(model, batch, 3, {}).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    want, got = stage_targets(model, batch, 2, {}), torch.compile(stage_targets)(model, batch, 2, {})  # stage 2
    for g, w in zip(got.hidden_in + got.hidden_out, want.hidden_in + want.hidden_out):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


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


def test_pieces_are_the_same_arithmetic_and_compile_settings_are_checked(models):
    """compile: pieces runs stage 2's blocks and stage 3's backbone through llamba.model.functional's pieces (here
    eager, so the comparison is exact; on CUDA they are compiled): the same losses and gradients as the modules."""
    from llamba.distill.stages import compile_setting
    from llamba.model.functional import EAGER

    teacher, student, tok = models
    batch = packed_batch(tok.eos_token_id)
    for stage, make in ((2, lambda p: HiddenStateAlignment(student, pieces=p)),
                        (3, lambda p: KnowledgeDistillation(student, pieces=p))):
        targets = teacher_targets(teacher, batch, stage)
        results = []
        for pieces in (None, EAGER):
            student.zero_grad(set_to_none=True)
            module = make(pieces)
            args = (targets, batch.seq_idx) + ((batch.input_ids,) if stage == 3 else ())
            loss, _ = module(*args)
            loss.backward()
            results.append((loss.detach(), [p.grad.clone() for p in module.trainable() if p.grad is not None]))
        (a, ga), (b, gb) = results
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
        assert len(ga) == len(gb) > 0 and all(torch.allclose(x, y, rtol=1e-10, atol=1e-14) for x, y in zip(ga, gb))
    student.zero_grad(set_to_none=True)
    assert [compile_setting(v) for v in (None, False, True, "blocks", "pieces")] == [None, None, "blocks", "blocks", "pieces"]
    with pytest.raises(ValueError, match="choose false, true, or one of"):
        compile_setting("graphs")


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


def test_attention_targets_are_the_attention_outputs(models):
    """attention_out[i] is what layer i's self-attention adds to the residual stream: layer i's output minus its
    input, less the MLP applied to the midpoint."""
    teacher, _, tok = models
    batch = packed_batch(tok.eos_token_id)
    t = teacher_targets(teacher, batch, 2, attention_outputs=True)
    assert t.attention_out is not None and len(t.attention_out) == 2
    for layer, h, out, att in zip(teacher.model.layers, t.hidden_in, t.hidden_out, t.attention_out):
        mid = h + att
        torch.testing.assert_close(out, mid + layer.mlp(layer.post_attention_layernorm(mid)))
    assert teacher_targets(teacher, batch, 2).attention_out is None


def test_stage2_attention_alignment_by_hand(models):
    teacher, student, tok = models
    batch = packed_batch(tok.eos_token_id)
    targets = teacher_targets(teacher, batch, 2, attention_outputs=True)
    module = HiddenStateAlignment(student, align="attention")
    loss, _ = module(targets, batch.seq_idx)
    expected = 0.0
    for block, h, target in zip(student.backbone.layers, targets.hidden_in, targets.attention_out):
        y = block.mixer(block.input_layernorm(h), seq_idx=batch.seq_idx)
        dists = [math.sqrt(((y[b, t] - target[b, t]) ** 2).sum().item()) for b in range(2) for t in range(12)]
        expected += sum(dists) / len(dists)
    assert loss.item() == pytest.approx(expected, rel=1e-9)
    mixer_ids = {id(p) for b in student.backbone.layers for p in b.mixer.parameters()}
    assert {id(p) for p in module.trainable()} == mixer_ids  # attention alignment trains the mixers alone
    with pytest.raises(ValueError, match="align"):
        HiddenStateAlignment(student, align="mlp")


def test_attention_init_is_linearised_attention(models):
    """With the decay held at 1, an attention-initialised mixer's mixing matrix is the teacher's attention logits
    q_t . k_s / sqrt(d) (no RoPE, no softmax) under the causal mask, per query head with GQA shared keys."""
    from llamba.convert import student_from_teacher
    from llamba.ops.conv import causal_conv
    from llamba.ops.ssd import mixing_matrix

    teacher, _, _ = models
    torch.manual_seed(0)
    student = student_from_teacher(teacher, d_state=8, init="attention").double()
    u = torch.randn(2, 6, 32, dtype=torch.float64)
    for block, layer in zip(student.backbone.layers, teacher.model.layers):
        mixer, attn = block.mixer, layer.self_attn
        xBC, _, A_log = mixer._split_projection(u)
        xBC, _ = causal_conv(xBC, mixer.conv1d.weight, mixer.conv1d.bias)
        _, B, C = mixer._split_xBC(xBC)
        T = mixing_matrix(B, C, torch.zeros_like(A_log), D=mixer.D, n_heads=mixer.n_v_heads)
        q = attn.q_proj(u).view(2, 6, 4, 8).transpose(1, 2)
        k = attn.k_proj(u).view(2, 6, 2, 8).transpose(1, 2).repeat_interleave(2, dim=1)
        expected = (q @ k.transpose(-1, -2) / 8 ** 0.5).tril()
        torch.testing.assert_close(T, expected, rtol=1e-10, atol=1e-12)
        assert torch.equal(mixer.out_proj.weight, attn.o_proj.weight)


@pytest.mark.parametrize("bias,temperature,chunk", [(False, 1.0, 5), (True, 2.0, 3), (True, 1.0, 64)])
def test_linear_soft_cross_entropy_matches_plain_path(bias, temperature, chunk):
    """The chunked loss that never holds the student's logits gives the plain soft cross-entropy and its gradients
    in h, the head and its bias (float64; chunks that do not divide the rows; a frozen head too)."""
    g = torch.Generator().manual_seed(int(bias) * 10 + chunk)
    h = torch.randn(2, 7, 16, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(40, 16, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(40, dtype=torch.float64, generator=g, requires_grad=True) if bias else None
    t = 3 * torch.randn(2, 7, 40, dtype=torch.float64, generator=g)
    plain = soft_cross_entropy(F.linear(h, w, b), t, temperature)
    fused = linear_soft_cross_entropy(h, w, b, t, temperature, chunk_rows=chunk)
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-12)
    inputs = [h, w] + ([b] if bias else [])
    for gp, gf in zip(torch.autograd.grad(plain * 1.7, inputs, retain_graph=True),
                      torch.autograd.grad(fused * 1.7, inputs)):
        torch.testing.assert_close(gf, gp, rtol=1e-10, atol=1e-12)
    frozen = linear_soft_cross_entropy(h, w.detach(), None if b is None else b.detach(), t, temperature, chunk_rows=chunk)
    torch.testing.assert_close(torch.autograd.grad(frozen, h)[0], torch.autograd.grad(plain, h)[0], rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="do not match"):
        linear_soft_cross_entropy(h, w, b, t[..., :-1], temperature)


def test_stage3_loss_is_the_plain_soft_cross_entropy_of_the_logits(models):
    """KnowledgeDistillation goes through the chunked head+loss: the same value and gradients as soft CE on
    student(...).logits."""
    teacher, student, tok = models
    batch = packed_batch(tok.eos_token_id)
    targets = teacher_targets(teacher, batch, 3)
    module = KnowledgeDistillation(student, temperature=1.5)
    params = [student.backbone.embedding.weight, student.backbone.layers[0].mixer.in_proj.weight]
    with torch.enable_grad():
        student.requires_grad_(True)
        loss, _ = module(targets, batch.seq_idx, batch.input_ids)
        fused = torch.autograd.grad(loss, params)
        plain_loss = soft_cross_entropy(student(batch.input_ids, seq_idx=batch.seq_idx).logits, targets.logits, 1.5)
        plain = torch.autograd.grad(plain_loss, params)
        student.requires_grad_(False)
    torch.testing.assert_close(loss, plain_loss, rtol=1e-12, atol=1e-12)
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_param_groups_scale_the_inherited_weights(models):
    _, student, _ = models
    params = list(student.parameters())
    mixers = [p for b in student.backbone.layers for p in b.mixer.parameters()]
    groups = param_groups(params, 0.1, mixers, inherited_lr_scale=0.05)
    assert sum(len(g["params"]) for g in groups) == len(params)
    mixer_ids = {id(p) for p in mixers}
    for group in groups:
        in_mixer = {id(p) in mixer_ids for p in group["params"]}
        assert len(in_mixer) == 1
        assert group["lr_scale"] == (1.0 if in_mixer.pop() else 0.05)
        assert group["weight_decay"] == (0.1 if group["params"][0].dim() >= 2 else 0.0)
    assert len(param_groups(params, 0.1)) == 2  # no mixers named: everything trains at the one rate


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_linear_soft_cross_entropy_on_cuda_under_autocast():
    """The GPU route (bf16 products under autocast, torch.compile'd softmaxes) against the plain path in float64
    on the same bf16-rounded inputs, at the SmolLM2 vocabulary and several chunks."""
    torch.manual_seed(0)
    h = torch.randn(3, 700, 576, device="cuda", requires_grad=True)
    w = (0.05 * torch.randn(49152, 576, device="cuda")).requires_grad_(True)
    t = (4 * torch.randn(3, 700, 49152, device="cuda")).to(torch.bfloat16)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fused = linear_soft_cross_entropy(h, w, None, t, 1.0, chunk_rows=512)
    gh, gw = torch.autograd.grad(fused, [h, w])
    h64, w64 = h.detach().bfloat16().double().requires_grad_(True), w.detach().bfloat16().double().requires_grad_(True)
    plain = soft_cross_entropy(F.linear(h64, w64), t.double(), 1.0)
    rh, rw = torch.autograd.grad(plain, [h64, w64])
    assert abs(fused.item() - plain.item()) / plain.item() < 1e-3
    for got, ref in ((gh, rh), (gw, rw)):
        assert ((got.double() - ref).norm() / ref.norm()).item() < 1e-2


@pytest.mark.parametrize("mixer", ["discrete_mamba2", "gateloop"])
def test_compiled_block_is_the_eager_block(tmp_path, mixer):
    """``compile: blocks`` (the recipes' default on CUDA) runs each block through torch.compile: the same output and
    gradients as eager, for both mixers, on packed documents: on a CPU through the scan's PyTorch route, on CUDA with
    the Triton scan and conv inside the compiled block."""
    from llamba.convert import student_from_teacher
    from llamba.teacher import load_teacher

    import shutil

    cuda = torch.cuda.is_available()
    if not cuda and not (shutil.which("g++") or shutil.which("c++")):
        pytest.skip("inductor on a CPU needs a C++ compiler")
    device = "cuda" if cuda else "cpu"
    folder = make_teacher(tmp_path / "teacher", layers=1, hidden=64, heads=4, kv_heads=2, vocab=280)
    teacher, _ = load_teacher(folder, dtype=torch.float32)
    torch.manual_seed(0)
    block = student_from_teacher(teacher, d_state=16, init="attention", mixer=mixer).backbone.layers[0].to(device)
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.02 * torch.randn_like(p))
    h = torch.randn(2, 96, 64, device=device)
    seq_idx = torch.zeros(2, 96, dtype=torch.int32, device=device)
    seq_idx[0, 40:] = 1  # two documents in the first row

    def run(fn):
        block.zero_grad()
        out = fn(h, seq_idx=seq_idx)
        out.pow(2).mean().backward()
        return out.detach(), [p.grad.clone() for p in block.parameters()]

    want, want_grads = run(block)
    compiled = torch.compile(block)  # inductor: C++ on a CPU, Triton on CUDA
    got, got_grads = run(compiled)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-5)


def test_compiled_stage1_is_the_eager_stage1(models):
    """Stage 1 with ``compile``: each layer's mixing matrix and loss through torch.compile give the eager losses and
    gradients, and one compiled graph serves every layer (their parameters are its inputs, not guards)."""
    import shutil

    if not torch.cuda.is_available() and not (shutil.which("g++") or shutil.which("c++")):
        pytest.skip("inductor on a CPU needs a C++ compiler")
    from torch._dynamo.utils import counters

    import copy

    teacher, student = (copy.deepcopy(m).float() for m in models[:2])  # the module's fixture stays float64
    tok = models[2]
    student.requires_grad_(True)  # whatever an earlier test left
    batch = packed_batch(tok.eos_token_id, length=24)
    targets = teacher_targets(teacher, batch, 1)

    def run(stage):
        student.zero_grad()
        loss, per_layer = stage(targets, batch.seq_idx)
        loss.backward()
        return [p.detach() for p in per_layer], [p.grad.clone() for p in stage.trainable()]

    want = run(MatrixOrientation(student))
    torch._dynamo.reset()
    counters.clear()
    got = run(MatrixOrientation(student, compile=True))
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    for g, w in zip(got[0] + got[1], want[0] + want[1]):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
