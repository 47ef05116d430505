"""The trainer's resumable state on disk: the student's weights, the optimizer's state and the loop's own (step,
sampler position, losses), written atomically, and written on a thread so that training does not wait for the disk.

A checkpoint of a SmolLM2-135M student is ~1.9 GB (fp32 weights and AdamW's two moments): ~6 s to write on a
2-core machine, and an H200 run with 19 of them written synchronously spent 93 s more on stage 3 than its bench rate
predicts (results/distill-smollm2-135m.md). Now the step copies the state to CPU memory and a thread writes it while
the next steps run."""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

WEIGHTS, OPTIMIZER, STATE = "model.safetensors", "optimizer.pt", "state.json"


def _storage_key(t: torch.Tensor):
    return t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride())


def unique_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``state_dict()`` with each tied tensor once (the embedding and the head it shares): safetensors stores no
    aliases, and ``load`` ties them back by loading into the module's one shared parameter."""
    seen, out = set(), {}
    for name, t in module.state_dict().items():
        key = _storage_key(t)
        if key not in seen:
            seen.add(key)
            out[name] = t
    return out


def _to_cpu(tree):
    """A copy on the CPU of the tensors in a nested dict/list (the optimizer's state dict), detached from the live
    ones: the optimizer updates its moments in place while the copy is written. ``copy=True``: on a CPU run
    ``.to("cpu")`` would return the live tensor itself."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().to("cpu", copy=True)
    if isinstance(tree, dict):
        return {k: _to_cpu(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_to_cpu(v) for v in tree)
    return tree


def _write(path: Path, weights: dict, optimizer_state: dict, state_json: str) -> None:
    """Write to ``path.tmp`` then swap it in with renames: a kill at any moment leaves a complete checkpoint."""
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(weights, str(tmp / WEIGHTS), metadata={"format": "pt"})
    torch.save(optimizer_state, tmp / OPTIMIZER)  # tensors, numbers, lists: loads with weights_only
    (tmp / STATE).write_text(state_json)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


class Writer:
    """Checkpoints written on a background thread, one at a time. ``save`` copies the state to CPU memory and
    returns; the next ``save`` (or ``wait``) first waits for the write before it, and re-raises its error."""

    def __init__(self):
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, path: Path, student, optimizer, state: dict) -> None:
        self.wait()
        # everything copied now, in this thread: the loop goes on changing weights, moments and its own state
        args = (Path(path), _to_cpu(unique_state(student)), _to_cpu(optimizer.state_dict()), json.dumps(state))
        self._thread = threading.Thread(target=self._run, args=args, name="llamba-checkpoint")
        self._thread.start()

    def _run(self, *args) -> None:
        try:
            _write(*args)
        except BaseException as e:  # surfaced by the next save / wait, in the training thread
            self._error = e

    def wait(self, raise_error: bool = True) -> None:
        """Until the write in flight is on disk; its error raised here (``raise_error=False``: dropped, for when
        another exception is on its way out and is the one to report)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None and not raise_error:
            self._error = None
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"writing a checkpoint failed: {error}") from error


def find(path: Path) -> Path | None:
    """The complete checkpoint at ``path``, or at ``path.old`` when a kill came between the two renames."""
    for candidate in (path, path.with_name(path.name + ".old")):
        if (candidate / STATE).exists():
            return candidate
    return None


def load(path: Path, student, optimizer, device) -> dict:
    """Weights and optimizer state into ``student`` / ``optimizer``; returns the loop's state. Each tied group
    (embedding and head) needs one of its names in the file: any one, so files written by ``safetensors``'
    ``save_model`` load too."""
    weights = load_file(str(path / WEIGHTS), device=str(device))
    _, unexpected = student.load_state_dict(weights, strict=False)  # missing: tied aliases, checked below
    names_of = {}
    for name, t in student.state_dict().items():
        names_of.setdefault(_storage_key(t), []).append(name)
    loaded = set(weights)
    uncovered = [names[0] for names in names_of.values() if not loaded & set(names)]
    if unexpected or uncovered:
        raise ValueError(f"{path / WEIGHTS}: does not match the student (missing {uncovered[:5]}, unexpected "
                         f"{list(unexpected)[:5]}); delete {path} to restart the stage from its beginning")
    optimizer.load_state_dict(torch.load(path / OPTIMIZER, map_location=device, weights_only=True))
    return json.loads((path / STATE).read_text())
