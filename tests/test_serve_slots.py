"""The slot models behind ``llamba serve``, driven through the scheduler without HTTP: the teacher's per-row KV
cache and the CPU runtime's per-slot caches give every concurrent request exactly its tokens alone, and (CUDA only)
the captured decode graph matches the plain step."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from conftest import make_tiny_student, make_word_tokenizer, needs_cpu_kernels
from llamba.serve.scheduler import Request, Scheduler
from llamba.serve.text import RequestText, eos_ids

pytestmark = [pytest.mark.usefixtures("one_cpu_thread"), pytest.mark.timeout(120)]


def greedy_alone(logits_of, prompt: list[int], max_tokens: int) -> list[int]:
    out = []
    for _ in range(max_tokens):
        out.append(int(logits_of(prompt + out).argmax()))
    return out


# how waiting prompts prefill: one at a time in pieces of 4 tokens, or up to 4 together (left-padded) in one piece
PREFILL = {"alone": {"prefill_rows": 1, "prefill_chunk": 4}, "together": {"prefill_rows": 4, "prefill_chunk": 64}}


def collect(slots, prompts, max_tokens, prefill_chunk=4):
    """Each request's generated tokens (parsed from the word tokenizer's text), all submitted at once."""
    scheduler = make_scheduler(slots, max_queue=len(prompts), prefill_chunk=prefill_chunk).start()
    try:
        return served(scheduler, prompts, max_tokens)
    finally:
        scheduler.stop()


def word_tokenizer():
    tokenizer = make_word_tokenizer()
    tokenizer.eos_token = "w99"
    return tokenizer


def make_scheduler(slots, **settings) -> Scheduler:
    return Scheduler(slots, eos_ids(word_tokenizer()), **settings)


def submit_all(scheduler, prompts, max_tokens, stop=(), interval=1, **fields):
    """Submit ``prompts`` (``fields``: more of each ``Request``'s, as ``params``, ``seed``), their token events read
    into text as the HTTP side reads them (``RequestText``: ``stop`` strings, every ``interval`` tokens); returns a
    function that waits until all have finished (none may fail) and gives each request's text and its number of
    text events. The scheduler may start after the submissions."""
    done, texts, events, errors = threading.Semaphore(0), [""] * len(prompts), [0] * len(prompts), []

    def emitter(i):
        def emit(event):
            if event.kind == "text":
                texts[i] += event.text
                events[i] += 1
            elif event.kind == "error":
                errors.append(event.text)
            if event.kind in ("finish", "error"):
                done.release()
        return emit

    tokenizer = word_tokenizer()
    for i, p in enumerate(prompts):
        request = Request(p, max_tokens, None, **fields)
        text = RequestText(tokenizer, p, request.n, list(stop), interval, emitter(i),
                           end_choice=lambda index, r=request: scheduler.cancel(r, index))
        request.emit = text.on_event
        scheduler.submit(request)

    def finished() -> tuple[list[str], list[int]]:
        for _ in prompts:
            assert done.acquire(timeout=30), "a request never finished"
        assert not errors, errors
        return texts, events
    return finished


def served(scheduler, prompts, max_tokens, **fields):
    """Each request's tokens, read back from its text, once all have finished on a running scheduler."""
    texts, _ = submit_all(scheduler, prompts, max_tokens, **fields)()
    return [[int(w[1:]) for w in t.split()] for t in texts]


def served_all_queued(scheduler, prompts, max_tokens) -> list[list[int]]:
    """As ``served``, with every request waiting before the (not yet started) loop's first turn; stops it."""
    finished = submit_all(scheduler, prompts, max_tokens)
    scheduler.start()
    try:
        texts, _ = finished()
    finally:
        scheduler.stop()
    return [[int(w[1:]) for w in t.split()] for t in texts]


def as_text_shows(tokens: list[int]) -> list[int]:
    """What ``collect`` reads back of a greedy run: up to EOS (w99, which stops it), without w1 (a special token
    of the word tokenizer, which the text leaves out)."""
    tokens = tokens[:tokens.index(99)] if 99 in tokens else tokens
    return [t for t in tokens if t != 1]


PROMPTS = [[5, 6, 7], [8] * 11, [20, 30, 40, 50, 60, 70, 80], [9], [33, 44, 55, 66, 77, 88, 22, 11, 3, 4]]


def tiny_teacher():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=128)).double().eval()


def teacher_alone(teacher) -> list[list[int]]:
    with torch.inference_mode():
        expected = [greedy_alone(lambda ids: teacher(torch.tensor([ids])).logits[0, -1], p, 8) for p in PROMPTS]
    assert len({tuple(e) for e in expected}) == len(PROMPTS)
    return expected


@pytest.mark.parametrize("prefill", list(PREFILL))
def test_teacher_slots_give_each_request_its_tokens_alone(prefill):
    from llamba.serve.slots import TeacherSlots

    teacher = tiny_teacher()
    # 3 slots for 5 requests: later ones join rows that others left, at other positions
    rows, chunk = PREFILL[prefill].values()
    got = collect(TeacherSlots(teacher, 3, 64, cuda_graph=False, prefill_rows=rows), PROMPTS, 8, chunk)
    assert got == teacher_alone(teacher)


def test_teacher_slots_fixed_shape_step_gives_each_request_its_tokens_alone():
    """The step the CUDA graph captures (every slot row over every key, masked by each row's position), run here
    eagerly in place of the replay: the same tokens as each request alone."""
    from llamba.serve.slots import TeacherSlots

    class Replayed(TeacherSlots):
        def _capture(self):
            slots = self

            class Eager:
                def replay(self):
                    slots.logits = slots._step_all_rows()
            return Eager()

    teacher = tiny_teacher()
    assert collect(Replayed(teacher, 3, 64, cuda_graph=True, prefill_rows=4), PROMPTS, 8, 64) == teacher_alone(teacher)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("prefill", list(PREFILL))
def test_teacher_slots_cuda_graph_matches_the_plain_step(prefill):
    from llamba.serve.slots import TeacherSlots

    teacher = tiny_teacher().float().cuda()
    rows, chunk = PREFILL[prefill].values()
    plain = collect(TeacherSlots(teacher, 4, 64, cuda_graph=False, prefill_rows=rows), PROMPTS, 8, chunk)
    graphed = collect(TeacherSlots(teacher, 4, 64, cuda_graph=True, prefill_rows=rows), PROMPTS, 8, chunk)
    assert graphed == plain



@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
@pytest.mark.parametrize("shape", ["tiny", "smollm2-heads"])
def test_teacher_slots_in_bf16_on_cuda_follow_the_models_own_forward(shape, graph):
    """What ``llamba serve`` runs for a teacher on a GPU (bf16, CUDA): the prefill's and each decode step's logits
    against the model's own float32 forward (eager attention) over the same tokens. The other CUDA test compares
    the graph with the plain step in float32 only; a bf16 teacher served on an H200 gave no text at all
    (docs/serving.md). ``smollm2-heads``: SmolLM2-135M's heads (9 query, 3 key/value, head dim 64), a 128-token
    prompt in a 192-position cache, as ``serve_bench.sh`` serves it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from llamba.serve.slots import TeacherSlots

    if shape == "tiny":
        ref, prompt, context = tiny_teacher().float(), PROMPTS[0], 64
    else:
        torch.manual_seed(0)
        ref = LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=576, intermediate_size=1536,
                                           num_hidden_layers=2, num_attention_heads=9, num_key_value_heads=3,
                                           max_position_embeddings=2048)).eval()
        prompt, context = torch.randint(3, 1000, (128,), generator=torch.Generator().manual_seed(1)).tolist(), 192
    ref = ref.cuda()
    ref.set_attn_implementation("eager")
    model = LlamaForCausalLM(ref.config).to(torch.bfloat16).cuda().eval()
    model.load_state_dict(ref.state_dict())
    slots = TeacherSlots(model, 4, context, cuda_graph=graph)
    ids = list(prompt)
    with torch.inference_mode():
        slots.begin()
        logits = slots.prefill(torch.tensor([ids]))[0]
        slots.join([2], 0)
        for _ in range(6):
            want = ref(torch.tensor([ids], device="cuda")).logits[0, -1]
            assert torch.isfinite(logits).all()
            torch.testing.assert_close(logits.float(), want, rtol=0, atol=0.05 * float(want.abs().max()) + 1e-3)
            ids.append(int(want.argmax()))
            logits = slots.decode([2], [ids[-1]])[0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["student", "teacher"])
def test_sampled_requests_on_cuda_slots_run_and_repeat_with_their_seed(kind):
    """Sampling on a CUDA slot model, whose logits are on the GPU: each request's generator and repetition mask
    go there (a generator left on the CPU failed every sampled request on an H200), and a seed gives the same
    tokens again whatever else runs beside it."""
    from llamba.generation.sampling import SamplingParams
    from llamba.serve.slots import LlambaSlots, TeacherSlots

    slots = (LlambaSlots(make_tiny_student(tied=False).cuda(), 4, 64) if kind == "student"
             else TeacherSlots(tiny_teacher().float().cuda(), 4, 64))
    params = SamplingParams.from_temperature(0.8, top_k=20, repetition_penalty=1.2)

    def run(prompts):
        scheduler = make_scheduler(slots, max_queue=len(prompts), prefill_chunk=4).start()
        try:
            return served(scheduler, prompts, 8, params=params, seed=7)
        finally:
            scheduler.stop()

    alone = run(PROMPTS[:1])
    assert run(PROMPTS)[0] == alone[0] and run(PROMPTS[:1]) == alone

@needs_cpu_kernels
def test_cpu_runtime_slots_give_each_request_its_tokens_alone():
    from llamba.quant.runtime import CpuDecoder
    from llamba.serve.slots import QuantSlots

    decoder = CpuDecoder(make_tiny_student(tied=False))
    expected = [decoder.generate(torch.tensor(p), 8) for p in PROMPTS]
    got = collect(QuantSlots(decoder, 2, 64), PROMPTS, 8)
    assert got == expected


@pytest.mark.parametrize("prefill", list(PREFILL))
@pytest.mark.parametrize("attention_layers", [[1], [0, 1]], ids=["hybrid", "all-attention"])
def test_hybrid_student_slots_write_each_request_at_its_own_position(attention_layers, prefill):
    """A hybrid's KV layers in the slot cache: requests join at different times, so the rows of one decode step
    sit at different positions; each writes and attends at its own, and gets its tokens alone."""
    from llamba.model import LlambaConfig, LlambaForCausalLM
    from llamba.serve.slots import LlambaSlots

    torch.manual_seed(0)
    config = LlambaConfig(d_model=32, n_layer=2, vocab_size=100, mlp_cfg={"intermediate_size": 64},
                          ssm_cfg={"d_state": 8, "n_v_heads": 4, "n_qk_heads": 2, "chunk_size": 8},
                          attention_layers=attention_layers,
                          attention_cfg={"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8})
    model = LlambaForCausalLM(config).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    with torch.inference_mode():
        expected = [greedy_alone(lambda ids: model(torch.tensor([ids])).logits[0, -1], p, 8) for p in PROMPTS]
    assert len({tuple(e) for e in expected}) == len(PROMPTS)
    rows, chunk = PREFILL[prefill].values()  # 3 slots, 5 requests: they queue
    got = collect(LlambaSlots(model, 3, 64, cuda_graph=False, prefill_rows=rows), PROMPTS, 8, chunk)
    assert got == [as_text_shows(e) for e in expected]


@pytest.mark.parametrize("prefill", list(PREFILL))
def test_gateloop_student_slots_carry_the_phase_into_the_slot(prefill):
    """A GateLoop student's state means nothing without its cumulative phase: a request joining its slot takes
    both, so each request still gets its tokens alone."""
    from llamba.model import LlambaConfig, LlambaForCausalLM
    from llamba.serve.slots import LlambaSlots

    torch.manual_seed(0)
    config = LlambaConfig(d_model=32, n_layer=2, vocab_size=100, mlp_cfg={"intermediate_size": 64},
                          ssm_cfg={"d_state": 8, "n_v_heads": 4, "n_qk_heads": 2, "chunk_size": 8, "mixer": "gateloop"})
    model = LlambaForCausalLM(config).double().eval()
    with torch.no_grad():
        for p in model.parameters():  # a phase that depends on the input, and mixers that matter
            p.add_(0.3 * torch.randn_like(p))
    with torch.inference_mode():
        expected = [greedy_alone(lambda ids: model(torch.tensor([ids])).logits[0, -1], p, 8) for p in PROMPTS]
    rows, chunk = PREFILL[prefill].values()
    got = collect(LlambaSlots(model, 3, 64, cuda_graph=False, prefill_rows=rows), PROMPTS, 8, chunk)
    assert got == [as_text_shows(e) for e in expected]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("prefill", list(PREFILL))
def test_cuda_graph_decode_matches_the_plain_step(prefill):
    from llamba.serve.slots import LlambaSlots

    model = make_tiny_student(tied=False).cuda()
    rows, chunk = PREFILL[prefill].values()
    plain = collect(LlambaSlots(model, 4, 64, cuda_graph=False, prefill_rows=rows), PROMPTS, 8, chunk)
    graphed = collect(LlambaSlots(model, 4, 64, cuda_graph=True, prefill_rows=rows), PROMPTS, 8, chunk)
    assert graphed == plain


def test_a_join_that_fails_gives_its_slots_back():
    """A request whose join fails (here: the slot model's join raises) fails alone, and the slots it had taken are
    free again: with 2 slots, a failed n=2 request that kept them would leave every later request waiting."""
    from llamba.serve.slots import LlambaSlots

    class FailingJoin(LlambaSlots):
        fail_next = True

        def join(self, slots, row=0):
            if self.fail_next:
                self.fail_next = False
                raise RuntimeError("injected join fault")
            super().join(slots, row)

    model = make_tiny_student(tied=False).double()
    with torch.inference_mode():
        expected = [greedy_alone(lambda ids: model(torch.tensor([ids])).logits[0, -1], p, 6) for p in PROMPTS]
    scheduler = make_scheduler(FailingJoin(model, 2, 64), max_queue=8, prefill_chunk=4).start()
    try:
        failed = threading.Event()
        scheduler.submit(Request([5, 6], 6, lambda e: e.kind == "error" and failed.set(), n=2))
        assert failed.wait(timeout=30)
        assert scheduler.stats()["busy_slots"] == 0
        assert served(scheduler, PROMPTS, 6) == [as_text_shows(e) for e in expected]
    finally:
        scheduler.stop()


def test_a_prompt_that_fails_its_batchs_prefill_fails_alone():
    """Three waiting prompts prefill as one batch, and the batch fails for one of them (its prefill raises on token
    98): each prompt is prefilled again on its own, that one fails, and the other two get their tokens alone."""
    from llamba.serve.slots import LlambaSlots

    shapes = []

    class Faulty(LlambaSlots):
        def prefill(self, ids, mask=None):
            shapes.append(tuple(ids.shape))
            if bool((ids == 98).any()):
                raise RuntimeError("injected prefill fault")
            return super().prefill(ids, mask)

    model = make_tiny_student(tied=False).double()
    good = [[5, 6, 7], [8, 9]]
    with torch.inference_mode():
        expected = [as_text_shows(greedy_alone(lambda ids: model(torch.tensor([ids])).logits[0, -1], p, 6))
                    for p in good]
    scheduler = make_scheduler(Faulty(model, 4, 64, cuda_graph=False, prefill_rows=4), max_queue=3,
                               prefill_chunk=64)
    errors = []
    scheduler.submit(Request([4, 98, 6], 6, lambda e: e.kind == "error" and errors.append(e.text)))
    assert served_all_queued(scheduler, good, 6) == expected
    assert errors == ["RuntimeError: injected prefill fault"]
    assert shapes == [(3, 3), (1, 3), (1, 3), (1, 2)]


def test_a_sampling_setting_that_fails_fails_its_requests_alone(monkeypatch):
    """Rows are selected a sampling setting at a time; if one setting's selection raises, its requests fail and the
    greedy ones in the same decode steps still get exactly their tokens."""
    import llamba.serve.scheduler as scheduler_module
    from llamba.generation.sampling import SamplingParams
    from llamba.serve.slots import LlambaSlots

    real, sampled_calls = scheduler_module.select_tokens, []

    def failing_when_sampling(logits, seen, params, generator=None):
        if params.do_sample:
            sampled_calls.append(logits.shape[0])
            if len(sampled_calls) == 2:  # its first token (after the prefill) passes, a decode step's fails
                raise RuntimeError("injected sampling fault")
        return real(logits, seen, params, generator)

    monkeypatch.setattr(scheduler_module, "select_tokens", failing_when_sampling)
    model = make_tiny_student(tied=False).double()
    with torch.inference_mode():
        expected = [greedy_alone(lambda ids: model(torch.tensor([ids])).logits[0, -1], p, 6) for p in PROMPTS]
    scheduler = make_scheduler(LlambaSlots(model, 8, 64, cuda_graph=False), max_queue=8, prefill_chunk=64)
    errors = []
    scheduler.submit(Request([5, 6], 6, lambda e: e.kind == "error" and errors.append(e.text),
                             params=SamplingParams(True, 0.9), seed=3))  # seeded: its first token is no EOS
    assert served_all_queued(scheduler, PROMPTS, 6) == [as_text_shows(e) for e in expected]
    assert errors == ["RuntimeError: injected sampling fault"] and len(sampled_calls) == 2


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_a_row_of_non_finite_logits_fails_its_request_alone(bad):
    """A decode step whose logits for one sequence hold a NaN or an infinity (here: injected for the request whose
    prompt starts with 4, at its third step): that request fails, saying so, instead of streaming what an argmax of
    NaN picks; the others in the same steps get exactly their tokens."""
    from llamba.serve.slots import LlambaSlots

    class NanRow(LlambaSlots):
        steps = 0

        def decode(self, slots, tokens):
            logits = super().decode(slots, tokens).clone()
            self.steps += 1
            if self.steps == 3:
                logits[slots.index(self.nan_slot), 7] = bad
            return logits

    model = make_tiny_student(tied=False).double()
    with torch.inference_mode():
        expected = [greedy_alone(lambda ids: model(torch.tensor([ids])).logits[0, -1], p, 6) for p in PROMPTS]
    slots = NanRow(model, 8, 64, cuda_graph=False, prefill_rows=8)
    slots.nan_slot = 0  # the first request prefilled: the one submitted first
    scheduler = make_scheduler(slots, max_queue=8, prefill_chunk=64)
    errors = []
    scheduler.submit(Request([4, 5], 6, lambda e: e.kind == "error" and errors.append(e.text)))
    assert served_all_queued(scheduler, PROMPTS, 6) == [as_text_shows(e) for e in expected]
    assert errors == ["FloatingPointError: the model's logits for this sequence are not finite (NaN or inf)"]


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "cpu-order"])
def test_a_steps_tokens_are_sent_while_the_next_step_runs(overlap):
    """With ``overlap`` (the default on CUDA) the host's share of a step overlaps the device's: each decode step is
    launched before the tokens of the step before are sent (on a GPU the launch returns at once, and the tokens'
    events, detokenized or handed to the HTTP processes, are sent while it runs); the last token and the finish go
    out once nothing runs. Without it (a CPU, whose step is done when its call returns) each token goes out as soon
    as it is read."""
    from llamba.serve.slots import LlambaSlots

    calls: list[str] = []

    class Recording(LlambaSlots):
        def decode(self, slots, tokens):
            calls.append("decode")
            return super().decode(slots, tokens)

    model = make_tiny_student(tied=False).double()
    with torch.inference_mode():
        expected = greedy_alone(lambda ids: model(torch.tensor([ids])).logits[0, -1], [5, 6], 4)
    assert 99 not in expected
    scheduler = make_scheduler(Recording(model, 2, 64, cuda_graph=False), max_queue=1, prefill_chunk=64,
                               overlap=overlap)
    got, done = [], threading.Event()

    def emit(event):
        calls.append(event.kind)
        got.append(event.token)
        if event.kind == "finish":
            done.set()

    scheduler.submit(Request([5, 6], 4, emit))
    scheduler.start()
    try:
        assert done.wait(30)
    finally:
        scheduler.stop()
    assert got[:4] == expected
    # token 1 comes from the prefill; step k makes token k + 1 (and with overlap is launched before token k is sent)
    if overlap:
        assert calls == ["decode", "token", "decode", "token", "decode", "token", "token", "finish"]
    else:
        assert calls == ["token", "decode", "token", "decode", "token", "decode", "token", "finish"]


def test_a_long_prompt_is_prefilled_between_the_others_decode_steps():
    """Chunked prefill: while a 40-token prompt joins in pieces of 4, the request already running gets a decode step
    after every piece (it is never stalled for the whole prefill), and both get their tokens alone."""
    from llamba.serve.slots import LlambaSlots

    calls: list[str] = []

    class Recording(LlambaSlots):
        def prefill(self, ids, mask=None):
            calls.append("prefill")
            return super().prefill(ids, mask)

        def decode(self, slots, tokens):
            calls.append("decode")
            return super().decode(slots, tokens)

    model = make_tiny_student(tied=False).double()
    long_prompt = [(7 * i) % 90 + 2 for i in range(40)]
    with torch.inference_mode():
        expected = [greedy_alone(lambda ids: model(torch.tensor([ids])).logits[0, -1], p, n)
                    for p, n in (([5, 6], 30), (long_prompt, 3))]
    assert 99 not in expected[0]  # the running request outlasts the other's prefill (no EOS, w99, on the way)
    scheduler = make_scheduler(Recording(model, 2, 64), max_queue=2, prefill_chunk=4).start()
    results = {}

    def run(i, prompt, n):
        results[i] = served(scheduler, [prompt], n)[0]

    try:
        running = threading.Thread(target=run, args=(0, [5, 6], 30))
        running.start()
        while "decode" not in calls:  # the first request is decoding
            time.sleep(0.001)
        joining = threading.Thread(target=run, args=(1, long_prompt, 3))
        joining.start()
        running.join(30), joining.join(30)
    finally:
        scheduler.stop()
    assert results == {0: as_text_shows(expected[0]), 1: as_text_shows(expected[1])}
    pieces = [i for i, c in enumerate(calls) if c == "prefill"][1:]  # the long prompt's 10 pieces
    assert len(pieces) == 10
    assert all(calls[i + 1] == "decode" for i in pieces[:-1]), calls


@needs_cpu_kernels
def test_cpu_runtime_slots_serve_a_quantized_gateloop_hybrid_past_its_default_kv_length():
    """The CPU runtime's slots with everything at once: an int8 artifact of a GateLoop student with an attention
    layer, whose KV cache must hold the server's max_context (96 positions) and not the decoder's default (its
    attention's 32 max_position_embeddings): a 30-token prompt and 8 new tokens fit only in the former."""
    from llamba.model import LlambaConfig, LlambaForCausalLM
    from llamba.quant import quantize_student
    from llamba.quant.runtime import CpuDecoder
    from llamba.serve.slots import QuantSlots

    torch.manual_seed(0)
    config = LlambaConfig(d_model=32, n_layer=3, vocab_size=100, mlp_cfg={"intermediate_size": 64},
                          ssm_cfg={"d_state": 8, "n_v_heads": 4, "n_qk_heads": 2, "chunk_size": 8, "mixer": "gateloop"},
                          attention_layers=[1], attention_cfg={"num_attention_heads": 4, "num_key_value_heads": 2,
                                                               "head_dim": 8, "max_position_embeddings": 32})
    model = LlambaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    quantize_student(model, "int8")  # in place
    prompts = [[(5 * i) % 90 + 2 for i in range(30)], [5, 6, 7], [8] * 11]
    alone = CpuDecoder(model)
    expected = [alone.generate(torch.tensor(p), 8) for p in prompts]  # (generate grows its own cache to fit)
    decoder = CpuDecoder(model)
    assert decoder.max_length == 32
    assert collect(QuantSlots(decoder, 2, 96), prompts, 8) == [as_text_shows(e) for e in expected]


@pytest.mark.parametrize("rows", [1, 4])
@pytest.mark.parametrize("chunk,first_batch", [(2, 1), (6, 3), (5, 2)])
def test_short_prompts_share_a_turns_prefill_budget(chunk, first_batch, rows):
    """A turn prefills up to ``prefill_chunk`` prompt tokens, across prompts: three waiting 2-token prompts all join
    before the first decode step with a budget of 6, two with 5 (the third's first piece fills the rest, and it
    joins after that step), one at a time with 2; each request still gets its tokens alone. The same whether they
    prefill one by one or together (``rows``)."""
    from llamba.serve.slots import LlambaSlots

    batches: list[int] = []

    class Recording(LlambaSlots):
        def decode(self, slots, tokens):
            batches.append(len(slots))
            return super().decode(slots, tokens)

    model = make_tiny_student(tied=False).double()
    prompts = [[5, 6], [7, 8], [9, 10]]
    with torch.inference_mode():
        expected = [greedy_alone(lambda ids: model(torch.tensor([ids])).logits[0, -1], p, 4) for p in prompts]
    slots = Recording(model, 4, 64, cuda_graph=False, prefill_rows=rows)
    scheduler = make_scheduler(slots, max_queue=3, prefill_chunk=chunk)
    assert served_all_queued(scheduler, prompts, 4) == [as_text_shows(e) for e in expected]
    assert batches[0] == first_batch


@pytest.mark.parametrize("kind", ["student", "teacher"])
def test_waiting_prompts_that_fit_the_budget_prefill_as_one_padded_batch(kind):
    """Five waiting prompts of 3, 11, 7, 1 and 10 tokens, four prefill rows, 64 tokens a turn: the first four form
    one batch padded to 11 tokens (44 <= 64, 22 of them padding, no more than their own 22), the fifth prefills
    alone in what is left of the turn, and all five decode from the first step, each with its tokens alone."""
    from llamba.serve.slots import LlambaSlots, TeacherSlots

    calls: list[tuple] = []

    def recording(base):
        class Recording(base):
            def prefill(self, ids, mask=None):
                calls.append(("prefill", tuple(ids.shape), None if mask is None else mask.sum(1).tolist()))
                return super().prefill(ids, mask)

            def decode(self, slots, tokens):
                calls.append(("decode", len(slots)))
                return super().decode(slots, tokens)
        return Recording

    if kind == "student":
        model = make_tiny_student(tied=False).double()
        slots = recording(LlambaSlots)(model, 8, 64, cuda_graph=False, prefill_rows=4)
        with torch.inference_mode():
            expected = [as_text_shows(greedy_alone(lambda ids: model(torch.tensor([ids])).logits[0, -1], p, 6))
                        for p in PROMPTS]
    else:
        teacher = tiny_teacher()
        slots = recording(TeacherSlots)(teacher, 8, 64, cuda_graph=False, prefill_rows=4)
        expected = [e[:6] for e in teacher_alone(teacher)]
    scheduler = make_scheduler(slots, max_queue=5, prefill_chunk=64)
    assert served_all_queued(scheduler, PROMPTS, 6) == expected
    assert calls[:3] == [("prefill", (4, 11), [3, 11, 7, 1]), ("prefill", (1, 10), None), ("decode", 5)]


@pytest.mark.parametrize("interval", [2, 3, 50])
def test_stream_interval_sends_the_same_text_in_fewer_events(interval):
    """``stream_interval`` k: each request's text arrives every k tokens and at its end, in fewer events, and is the
    same text as token by token (EOS inside an interval included: the text before it is sent); a request with a
    stop string reads every token and stops where it does at k = 1."""
    from llamba.serve.slots import LlambaSlots

    model = make_tiny_student(tied=False).double()

    def run(k, stop):
        scheduler = make_scheduler(LlambaSlots(model, 4, 64, cuda_graph=False), max_queue=8, prefill_chunk=4).start()
        try:
            return submit_all(scheduler, PROMPTS, 12, stop=stop, interval=k)()
        finally:
            scheduler.stop()

    every, every_events = run(1, [])
    texts, events = run(interval, [])
    assert texts == every and any(t for t in texts)
    assert all(e <= -(-12 // interval) for e in events) and sum(events) < sum(every_events)
    stop = [every[2].split()[3]]  # a word the third request writes
    assert run(interval, stop)[0] == run(1, stop)[0]


def test_stream_interval_must_be_positive():
    from llamba.serve.app import create_app
    from llamba.serve.local import LocalEngine
    from llamba.serve.slots import LlambaSlots

    scheduler = make_scheduler(LlambaSlots(make_tiny_student(tied=False), 1, 16, cuda_graph=False))
    with pytest.raises(ValueError, match="stream_interval must be at least 1"):
        create_app(LocalEngine(scheduler), word_tokenizer(), "tiny", 16, stream_interval=0)
