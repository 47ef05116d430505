"""CPU benchmark: the Llamba student (float32, int8, int4 through ``llamba.quant``) against its teacher in
llama.cpp (the GGUF file, via ``llama-cpp-python``) and in ``transformers``, in one run, with ratios.

Each system lives in a worker process of its own, so resident memory (RSS) is its own; the parent drives them one
at a time (never two at once on a small CPU). At every context length each system prefills the same random prompt
(timed), then the decode rounds of all systems are interleaved and repeated, and medians are kept: the cores may
be shared, so the 1-minute load average is recorded before and after. RSS growth is measured against the RSS
after loading (and warming up) the model. llama.cpp is optional (`pip install llamba[edge]`): without it, it is
skipped with a message.
"""

from __future__ import annotations

import datetime
import json
import multiprocessing as mp
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

DEFAULT_CONTEXTS = [512, 2048, 4096, 8192, 16384]
PREFILL_CHUNK = 512


# -- workers (run in their own process) ---------------------------------------------------------------------
def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


class StudentSystem:
    def __init__(self, model: str, quant: str, threads: int):
        from llamba.quant import load_for_cpu

        self.dec = load_for_cpu(model, quant, threads=threads)

    def prefill(self, ids) -> None:
        import torch

        self.dec.reset()
        logits = self.dec.prefill(torch.tensor(ids))
        self.next = int(logits.argmax())

    def decode(self, n: int) -> None:
        dec, tok = self.dec, self.next
        for _ in range(n):
            tok = dec.next_token(dec.step(tok))
        self.next = tok


class LlamaCppSystem:
    def __init__(self, gguf: str, threads: int):
        import llama_cpp  # noqa: F401 - fails here (cleanly reported) when the edge extra is missing

        self.gguf, self.threads, self.llm = gguf, threads, None

    def prefill(self, ids) -> None:
        from llama_cpp import Llama

        self.llm = None  # the KV cache is sized by n_ctx: a fresh context per length shows its real memory
        self.llm = Llama(self.gguf, n_ctx=len(ids) + 1024, n_threads=self.threads, n_threads_batch=self.threads,
                         n_batch=PREFILL_CHUNK, n_ubatch=PREFILL_CHUNK, verbose=False)
        self.llm.eval(list(ids))
        self.next = self._greedy()

    def _greedy(self) -> int:
        """Argmax of the last position's logits, read in place (eval no longer copies them without logits_all)."""
        import numpy as np

        logits = np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.llm.n_vocab(),))
        return int(logits.argmax())

    def decode(self, n: int) -> None:
        llm, tok = self.llm, self.next
        for _ in range(n):
            llm.eval([tok])
            tok = self._greedy()
        self.next = tok


class TransformersSystem:
    def __init__(self, teacher: str, threads: int):
        import torch

        from llamba.teacher import load_teacher

        torch.set_num_threads(threads)
        self.model, _ = load_teacher(teacher, dtype=torch.float32)
        self.cache = None

    def prefill(self, ids) -> None:
        import torch
        from transformers import DynamicCache

        self.cache = None
        self.cache = DynamicCache()
        ids = torch.tensor(ids)[None]
        with torch.inference_mode():
            for start in range(0, ids.shape[1], PREFILL_CHUNK):  # chunked like the student: no L x L scores
                out = self.model(ids[:, start:start + PREFILL_CHUNK], past_key_values=self.cache, use_cache=True,
                                 logits_to_keep=1)
        self.next = int(out.logits[0, -1].argmax())

    def decode(self, n: int) -> None:
        import torch

        tok = self.next
        with torch.inference_mode():
            for _ in range(n):
                out = self.model(torch.tensor([[tok]]), past_key_values=self.cache, use_cache=True)
                tok = int(out.logits[0, -1].argmax())
        self.next = tok


def _worker(conn, kind: str, spec: dict) -> None:
    try:
        if kind == "student":
            system = StudentSystem(spec["model"], spec["quant"], spec["threads"])
        elif kind == "llama.cpp":
            system = LlamaCppSystem(spec["gguf"], spec["threads"])
        else:
            system = TransformersSystem(spec["teacher"], spec["threads"])
        # Warm up with one full prefill piece: first-call costs and the prefill's working memory are part of the
        # baseline, so RSS growth is what a longer context adds.
        system.prefill(list(range(100, 100 + PREFILL_CHUNK + 64)))
        system.decode(4)
        base = rss_mib()
        conn.send({"ok": True, "rss_loaded_mib": base})
    except Exception as err:  # noqa: BLE001 - reported by the parent as "skipped: ..."
        conn.send({"ok": False, "error": f"{type(err).__name__}: {err}"})
        return
    while True:
        cmd, arg = conn.recv()
        if cmd == "stop":
            return
        t0 = time.perf_counter()
        if cmd == "prefill":
            system.prefill(arg)
        else:
            system.decode(arg)
        seconds = time.perf_counter() - t0
        conn.send({"seconds": seconds, "rss_mib": rss_mib(), "rss_growth_mib": rss_mib() - base})


class Worker:
    def __init__(self, name: str, kind: str, spec: dict):
        ctx = mp.get_context("spawn")
        self.name, self.conn = name, None
        parent, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, kind, spec), daemon=True)
        self.proc.start()
        reply = parent.recv()
        if not reply["ok"]:
            self.proc.join()
            raise RuntimeError(reply["error"])
        self.conn, self.rss_loaded = parent, reply["rss_loaded_mib"]

    def call(self, cmd: str, arg) -> dict:
        self.conn.send((cmd, arg))
        return self.conn.recv()

    def stop(self) -> None:
        if self.conn is not None:
            self.conn.send(("stop", None))
        self.proc.join(timeout=30)


# -- driver ---------------------------------------------------------------------------------------------------
def load_average() -> float:
    return os.getloadavg()[0]


def _student_checkpoint(model: str | None, teacher: str, workdir: Path) -> tuple[str, str]:
    """A student folder: the one given, or one converted now from the teacher (speed does not depend on training)."""
    if model:
        return model, "given"
    from llamba.checkpoint import save_student
    from llamba.convert import student_from_teacher
    from llamba.teacher import load_teacher

    print(f"bench: no --model: converting {teacher} into an (untrained) student", flush=True)
    teacher_model, tokenizer = load_teacher(teacher)
    path = workdir / "student"
    save_student(student_from_teacher(teacher_model, init="attention"), tokenizer, path)
    return str(path), "converted from the teacher (init='attention'), untrained"


def _artifact(student: str, quant: str, workdir: Path) -> str:
    """Quantized students run from their artifact file, as deployed (the float32 original never enters the worker)."""
    if quant == "none":
        return student
    import torch

    from llamba.checkpoint import load_student, load_tokenizer_from
    from llamba.quant import quantize_student
    from llamba.quant.artifact import save_artifact

    print(f"bench: quantizing the student ({quant})", flush=True)
    model = load_student(student, dtype=torch.float32)
    settings = quantize_student(model, quant)
    return str(save_artifact(model, load_tokenizer_from(student), workdir / f"student-{quant}.safetensors", settings))


def run_benchmark(args, on_row=None) -> dict:
    from llamba.teacher import KNOWN_TEACHERS, fetch_known_teacher, resolve_teacher

    teacher = getattr(args, "teacher", None) or "smollm2-135m"
    contexts = list(getattr(args, "contexts", None) or DEFAULT_CONTEXTS)
    new_tokens = int(getattr(args, "new_tokens", None) or 64)
    quants = list(getattr(args, "quant", None) or ["none", "int8", "int4"])
    threads = int(getattr(args, "threads", None) or os.cpu_count() or 1)
    repeats = int(getattr(args, "repeats", None) or 3)
    rivals = list(getattr(args, "rivals", None) or ["llama.cpp", "transformers"])

    workdir = Path(tempfile.mkdtemp(prefix="llamba-bench-cpu-"))
    student, student_origin = _student_checkpoint(getattr(args, "model", None), teacher, workdir)
    folder, gguf = resolve_teacher(teacher)
    if teacher in KNOWN_TEACHERS:  # kept as a converted HF folder after first use; llama.cpp wants the GGUF itself
        gguf_path = fetch_known_teacher(teacher)
        folder, gguf = gguf_path.parent, gguf_path.name
    systems: list[tuple[str, str, dict]] = [
        (f"student-{q}", "student", {"model": _artifact(student, q, workdir), "quant": q, "threads": threads}) for q in quants]
    if "llama.cpp" in rivals:
        if gguf is None:
            print(f"llama.cpp: skipped, teacher {teacher} has no GGUF file")
        else:
            systems.append(("llama.cpp", "llama.cpp", {"gguf": str(Path(folder) / gguf), "threads": threads}))
    if "transformers" in rivals:
        systems.append(("transformers", "transformers", {"teacher": teacher, "threads": threads}))

    workers, skipped = {}, {}
    for name, kind, spec in systems:
        try:
            workers[name] = Worker(name, kind, spec)
            print(f"{name}: loaded, RSS {workers[name].rss_loaded:.0f} MiB", flush=True)
        except RuntimeError as err:
            hint = " (install the optional extra: pip install 'llamba[edge]')" if kind == "llama.cpp" else ""
            skipped[name] = str(err) + hint
            print(f"{name}: skipped: {err}{hint}", flush=True)

    import random
    rng = random.Random(0)
    rows = []
    load_before = load_average()
    result = {
        "benchmark": "llamba CPU decode/prefill/memory", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(), "threads": threads, "new_tokens": new_tokens, "repeats": repeats,
        "load_average_1min": {"before": load_before, "after": None},
        "student": {"checkpoint": student, "origin": student_origin}, "teacher": teacher,
        "teacher_gguf": gguf, "skipped": skipped, "rows": rows,
    }
    total, done, t0 = len(contexts) * len(workers) * (1 + repeats), 0, time.perf_counter()

    def progress(what: str) -> None:
        # one line per measurement: the default run takes minutes, with long silent gaps otherwise
        nonlocal done
        done += 1
        print(f"  [{done}/{total}, {time.perf_counter() - t0:.0f} s] {what}", flush=True)

    try:
        for ctx in contexts:
            prompt = [rng.randrange(100, 49000) for _ in range(ctx)]
            row = {"context": ctx, "systems": {}}
            for name, w in workers.items():
                r = w.call("prefill", prompt)
                row["systems"][name] = {"prefill_tok_s": ctx / r["seconds"], "decode_runs_tok_s": []}
                progress(f"context {ctx}: {name} prefill {ctx / r['seconds']:,.0f} tok/s")
            for k in range(repeats):  # interleaved: every system decodes once per round
                for name, w in workers.items():
                    r = w.call("decode", new_tokens)
                    s = row["systems"][name]
                    s["decode_runs_tok_s"].append(new_tokens / r["seconds"])
                    progress(f"context {ctx}: {name} decode round {k + 1}/{repeats} {new_tokens / r['seconds']:.1f} tok/s")
                    s["rss_mib"], s["rss_growth_mib"] = r["rss_mib"], r["rss_growth_mib"]
            for name, s in row["systems"].items():
                s["decode_tok_s"] = statistics.median(s["decode_runs_tok_s"])
            row["load_average_1min"] = load_average()
            rows.append(row)
            result["load_average_1min"]["after"] = load_average()
            print(format_row(row), flush=True)
            if on_row is not None:  # partial results survive an interrupted long run
                on_row(result)
    finally:
        for w in workers.values():
            w.stop()
    return result


def machine_info() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(), "cpu": platform.processor()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        import llama_cpp
        info["llama_cpp_python"] = llama_cpp.__version__
    except ImportError:
        info["llama_cpp_python"] = None
    return info


def ratios(row: dict, rival: str) -> dict:
    s = row["systems"]
    if rival not in s:
        return {}
    return {name: {"decode": v["decode_tok_s"] / s[rival]["decode_tok_s"], "prefill": v["prefill_tok_s"] / s[rival]["prefill_tok_s"]}
            for name, v in s.items() if name.startswith("student")}


def format_row(row: dict) -> str:
    parts = [f"ctx {row['context']:>6}:"]
    for name, s in row["systems"].items():
        parts.append(f"{name} decode {s['decode_tok_s']:.1f} prefill {s['prefill_tok_s']:.0f} tok/s RSS +{s['rss_growth_mib']:.0f} MiB;")
    for rival in ("llama.cpp", "transformers"):
        for name, r in ratios(row, rival).items():
            parts.append(f"{name}/{rival} decode x{r['decode']:.2f};")
    return " ".join(parts)


def to_markdown(result: dict) -> str:
    names = list(result["rows"][0]["systems"]) if result["rows"] else []
    lines = [f"# CPU benchmark ({result['date']})", "",
             f"Machine: {result['machine']['cpu']}, {result['threads']} threads (all cores), torch {result['machine']['torch']}, "
             f"llama-cpp-python {result['machine']['llama_cpp_python']}. Load average (1 min) before/after: "
             f"{result['load_average_1min']['before']:.2f} / {result['load_average_1min']['after'] or 0:.2f}. "
             f"Decode: median of {result['repeats']} interleaved rounds of {result['new_tokens']} greedy tokens after the prefill.",
             f"Student: {result['student']['origin']}. Teacher: {result['teacher']} ({result['teacher_gguf']}).", ""]
    for metric, unit in (("decode_tok_s", "decode tok/s"), ("prefill_tok_s", "prefill tok/s"), ("rss_growth_mib", "RSS growth over the loaded model, MiB"),
                         ("rss_mib", "RSS, MiB")):
        lines += [f"## {unit}", "", "| context | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for row in result["rows"]:
            lines.append(f"| {row['context']} | " + " | ".join(f"{row['systems'][n][metric]:.1f}" if n in row["systems"] else "-" for n in names) + " |")
        lines.append("")
    for rival in ("llama.cpp", "transformers"):
        if not any(ratios(r, rival) for r in result["rows"]):
            continue
        lines += [f"## student / {rival} (decode, prefill)", ""]
        students = [n for n in names if n.startswith("student")]
        lines += ["| context | " + " | ".join(students) + " |", "|---" * (len(students) + 1) + "|"]
        for row in result["rows"]:
            r = ratios(row, rival)
            lines.append(f"| {row['context']} | " + " | ".join(f"x{r[n]['decode']:.2f}, x{r[n]['prefill']:.2f}" for n in students) + " |")
        lines.append("")
    if result.get("perplexity"):
        p = result["perplexity"]
        lines += ["## perplexity", "", f"{p['tokens']} tokens of {p['file']} (windows of {p['window']}), same student as above.", "",
                  "| model | perplexity | vs float32 |", "|---|---|---|"]
        for name, v in p["values"].items():
            base = p["values"]["student-none" if name.startswith("student") else "teacher-none"]
            lines.append(f"| {name} | {v:.3f} | {100 * (v / base - 1):+.2f}% |")
        lines.append("")
    if result["skipped"]:
        lines += ["Skipped: " + "; ".join(f"{k}: {v}" for k, v in result["skipped"].items()), ""]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    names = list(result["rows"][0]["systems"])
    ctx = [r["context"] for r in result["rows"]]
    for ax, metric, title in zip(axes, ("decode_tok_s", "prefill_tok_s", "rss_mib"), ("decode tok/s", "prefill tok/s", "RSS MiB")):
        for n in names:
            ax.plot(ctx, [r["systems"][n][metric] for r in result["rows"]], marker="o", label=n)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{result['machine']['cpu']}, {result['threads']} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def perplexity_block(student: str, teacher: str, quants: list[str], n_tokens: int, window: int = 1024) -> dict:
    """Validation perplexity of the student at each quantization, and of the teacher with the same weight format
    applied to all of its linears (a trained network: the format's accuracy does not hinge on the student's training)."""
    import copy

    from llamba.quant import DEFAULT_HEAD_BITS, load_for_cpu
    from llamba.quant.perplexity import corpus_tokens, perplexity, quantize_all_linears
    from llamba.teacher import load_teacher

    data = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "corpus" / "gutenberg-val.jsonl.xz"
    teacher_model, tokenizer = load_teacher(teacher)
    tokens = corpus_tokens(data, tokenizer, n_tokens)
    values = {}
    for q in quants:
        values[f"student-{q}"] = perplexity(load_for_cpu(student, q).model, tokens, window)
        print(f"perplexity student-{q}: {values[f'student-{q}']:.3f}", flush=True)
    variants = [(q, {"none": 32, "int8": 8, "int4": 4}[q], DEFAULT_HEAD_BITS[q]) for q in quants] + [("int4-head4", 4, 4)]
    for name, bits, head_bits in variants:
        model = copy.deepcopy(teacher_model)
        quantize_all_linears(model, bits, 32, head_bits)
        values[f"teacher-{name}"] = perplexity(model, tokens, window)
        print(f"perplexity teacher-{name}: {values[f'teacher-{name}']:.3f}", flush=True)
    return {"file": "gutenberg-val.jsonl.xz", "tokens": n_tokens, "window": window, "values": values}


def main(args) -> int:
    """Entry for ``llamba bench --device cpu`` and ``benchmarks/bench_cpu.py``. ``args`` fields (all optional):
    model, teacher, contexts, new_tokens, quant, out, threads, repeats, rivals, ppl_tokens."""
    out = Path(getattr(args, "out", None) or "results/edge-cpu.json")
    if out.is_dir():
        out = out / "edge-cpu.json"
    elif out.suffix != ".json":  # `llamba bench --out PATH` gives a path without suffix
        out = out.with_suffix(".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    result = run_benchmark(args, on_row=lambda r: write(r, out))
    ppl_tokens = int(getattr(args, "ppl_tokens", 0) or 0)
    if ppl_tokens:
        quants = list(getattr(args, "quant", None) or ["none", "int8", "int4"])
        if "none" not in quants:
            quants = ["none"] + quants
        result["perplexity"] = perplexity_block(result["student"]["checkpoint"], result["teacher"], quants, ppl_tokens)
    write(result, out)
    print(f"wrote {out}, {out.with_suffix('.md')}, {out.with_suffix('.png')}")
    return 0


def write(result: dict, out: Path) -> None:
    out.write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(to_markdown(result))
    if result["rows"]:
        plot(result, out.with_suffix(".png"))
