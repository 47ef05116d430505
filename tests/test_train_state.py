"""The trainer's checkpoints (llamba.distill.train_state): written on a thread from a snapshot, so what lands on
disk is the state at the save, whatever the loop does next; tied weights stay tied; older files load."""

import threading

import pytest
import torch
from safetensors.torch import save_model

from llamba.distill import train_state


@pytest.fixture()
def trained(tmp_path):
    from llamba.convert import student_from_teacher
    from llamba.distill.testing import make_teacher
    from llamba.teacher import load_teacher

    teacher, _ = load_teacher(make_teacher(tmp_path / "teacher", layers=2, hidden=32, heads=4, kv_heads=2, vocab=280))

    def fresh():
        torch.manual_seed(0)
        student = student_from_teacher(teacher, d_state=8, init="attention")
        return student, torch.optim.AdamW(student.parameters(), lr=1e-2)

    def step(student, optimizer):
        ids = torch.randint(0, 280, (2, 16))
        student(ids).logits.float().logsumexp(-1).mean().backward()
        optimizer.step()
        optimizer.zero_grad()

    student, optimizer = fresh()
    step(student, optimizer)
    return student, optimizer, fresh, step


def tied(student) -> bool:
    head, embed = student.get_output_embeddings().weight, student.get_input_embeddings().weight
    return head.data_ptr() == embed.data_ptr()


def snapshot(student, optimizer):
    return ({k: v.clone() for k, v in student.state_dict().items()},
            {i: {k: v.clone() for k, v in s.items()} for i, s in optimizer.state_dict()["state"].items()})


def assert_state(student, optimizer, want):
    weights, moments = want
    got_w, got_m = snapshot(student, optimizer)
    assert got_w.keys() == weights.keys() and all(torch.equal(got_w[k], weights[k]) for k in weights)
    assert got_m.keys() == moments.keys()
    for i in moments:
        assert all(torch.equal(got_m[i][k], moments[i][k]) for k in moments[i])


def test_what_is_written_is_the_state_at_the_save(trained, tmp_path, monkeypatch):
    student, optimizer, fresh, step = trained
    assert tied(student)
    want = snapshot(student, optimizer)
    gate, write = threading.Event(), train_state._write
    monkeypatch.setattr(train_state, "_write", lambda *args: (gate.wait(10), write(*args)))
    writer = train_state.Writer()
    state = {"step": 1, "history": {"last_loss": 3.5}}
    writer.save(tmp_path / "ckpt", student, optimizer, state)
    step(student, optimizer)  # the loop goes on before the thread writes; on a CPU the live tensors change in place
    state["history"]["last_loss"] = 2.0
    gate.set()
    writer.wait()
    assert set(train_state.unique_state(student)) < set(student.state_dict())  # the head's alias not stored
    found = train_state.find(tmp_path / "ckpt")
    other, other_opt = fresh()
    state = train_state.load(found, other, other_opt, "cpu")
    assert state == {"step": 1, "history": {"last_loss": 3.5}}
    assert_state(other, other_opt, want)
    assert tied(other)  # loaded into the one shared parameter


def test_files_from_safetensors_save_model_load(trained, tmp_path):
    """Checkpoints written before the thread (safetensors' save_model keeps its own choice of tied name)."""
    student, optimizer, fresh, _ = trained
    writer = train_state.Writer()
    writer.save(tmp_path / "ckpt", student, optimizer, {"step": 1})
    writer.wait()
    save_model(student, str(tmp_path / "ckpt" / train_state.WEIGHTS))
    other, other_opt = fresh()
    train_state.load(tmp_path / "ckpt", other, other_opt, "cpu")
    assert_state(other, other_opt, snapshot(student, optimizer))


def test_a_mismatched_file_and_a_failed_write_say_so(trained, tmp_path):
    student, optimizer, fresh, _ = trained
    writer = train_state.Writer()
    writer.save(tmp_path / "ckpt", student, optimizer, {"step": 1})
    writer.wait()
    from safetensors.torch import save_file

    save_file({"nope": torch.zeros(1)}, str(tmp_path / "ckpt" / train_state.WEIGHTS))
    with pytest.raises(ValueError, match="does not match the student.*delete"):
        train_state.load(tmp_path / "ckpt", *fresh(), "cpu")
    (tmp_path / "file").write_text("")
    writer.save(tmp_path / "file" / "ckpt", student, optimizer, {"step": 2})  # a folder under a file
    with pytest.raises(RuntimeError, match="writing a checkpoint failed"):
        writer.wait()
    writer.wait()  # the error is reported once
