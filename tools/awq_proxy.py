"""Activation-aware scales and bias correction (`llamba.quant.awq`) against round-to-nearest, on CPU, for the
CPU artifacts' weight formats (groups of 32, embedding/head int8):
  - the default teacher (SmolLM2-135M), its linears quantized: a trained network of the student's family, whose
    q/k/v/o are where the student's in_proj / out_proj start;
  - with --student DIR, a Llamba student through `quantize_student` (what `llamba quantize --calibration` runs).
Perplexity on held-out text and KL(float || quantized) per token; calibration and evaluation texts are different
files. Usage:
    python3 tools/awq_proxy.py OUT.json [--student DIR] [--tokens 16384] [--calibration-tokens 8192] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "corpus"
# row label: `llamba quantize --calibration-method` (None: no calibration)
MODES = {"round-to-nearest": None, "activation-aware scales": "scales",
         "activation-aware scales + bias correction": "scales+bias", "bias correction": "bias"}


@torch.inference_mode()
def scores(model, reference_logp, tokens, window=1024):
    """(perplexity, mean KL(reference || model) per predicted token) over windows; reference_logp: None for the
    float model itself (returns its log-probabilities instead of a KL)."""
    nll, kl, count, logps = 0.0, 0.0, 0, []
    for k, start in enumerate(range(0, len(tokens) - 1, window)):
        ids = tokens[start:start + window][None]
        logp = F.log_softmax(model(ids).logits[0, :-1].float(), -1)
        nll -= logp.gather(-1, ids[0, 1:, None]).sum().item()
        count += ids.shape[1] - 1
        if reference_logp is None:
            logps.append(logp)
        else:
            ref = reference_logp[k]
            kl += (ref.exp() * (ref - logp)).sum().item()
    ppl = float(torch.tensor(nll / count).exp())
    return (ppl, logps) if reference_logp is None else (ppl, kl / count)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--student")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--calibration-tokens", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-teacher", action="store_true", help="the student only (the teacher's weights sit on the "
                    "Q4_1 grid of its GGUF, so round-to-nearest is exact for them and nothing can be gained)")
    ap.add_argument("--formats", nargs="*", default=None, help="a subset of the formats, by name")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from llamba.quant import quantize_student
    from llamba.quant.awq import apply_scales
    from llamba.quant.perplexity import all_linear_bits, corpus_tokens, quantize_all_linears
    from llamba.teacher import load_teacher

    teacher, tokenizer = load_teacher("smollm2-135m")
    teacher = teacher.float().eval()
    evaluation = corpus_tokens(CORPUS / "gutenberg-val.jsonl.xz", tokenizer, args.tokens)
    calibration = corpus_tokens(CORPUS / "gutenberg-train-00.jsonl.xz", tokenizer, args.calibration_tokens)
    t0, result_rows = time.perf_counter(), {}

    def record(group, name, model, reference):
        ppl, kl = scores(model, reference, evaluation)
        result_rows.setdefault(group, {})[name] = {"perplexity": ppl, "kl_to_float": kl}
        print(f"{group} | {name}: ppl {ppl:.3f}, KL {kl:.5f} ({time.perf_counter() - t0:.0f} s)", flush=True)

    models = {} if args.skip_teacher else {"teacher": (teacher, lambda m: m.model.layers)}
    if args.student:
        from llamba.checkpoint import load_student

        models["student"] = (load_student(args.student, dtype=torch.float32).eval(), lambda m: m.backbone.layers)
    formats = {"int4 mixing + int8 MLPs": (4, 8), "int4 everywhere": (4, 4)}
    formats = {k: v for k, v in formats.items() if args.formats is None or k in args.formats}
    for group, (model, blocks) in models.items():
        ppl, reference = scores(model, None, evaluation)
        result_rows[group] = {"float32": {"perplexity": ppl, "kl_to_float": 0.0}}
        print(f"{group} | float32: ppl {ppl:.3f}", flush=True)
        for fmt, (bits, mlp_bits) in formats.items():
            for mode, method in MODES.items():
                m = copy.deepcopy(model)
                if group == "student":  # what `llamba quantize --bits 4 --mlp-bits B [--calibration ...]` runs
                    quantize_student(m, "int4", mlp_bits=mlp_bits, calibration=None if method is None else calibration,
                                     calibration_method=method or "scales+bias")
                else:
                    if method is not None:
                        plan = {id(getattr(p, n)): b for p, n, b in all_linear_bits(m, bits, 8, mlp_bits)}
                        apply_scales(m, blocks(m), calibration, lambda lin: plan[id(lin)], scales="scales" in method,
                                     bias_correction="bias" in method)
                    quantize_all_linears(m, bits, 32, 8, mlp_bits)
                record(group, f"{fmt}, {mode}", m, reference)
    for rows in result_rows.values():
        base = rows["float32"]["perplexity"]
        for r in rows.values():
            r["ratio_to_float32"] = r["perplexity"] / base
    result = {"command": "python3 " + " ".join(sys.argv), "teacher": "SmolLM2-135M-Instruct, float32",
              "student": args.student, "evaluation": "gutenberg-val.jsonl.xz", "calibration": "gutenberg-train-00.jsonl.xz",
              "tokens": args.tokens, "window": 1024, "calibration_tokens": args.calibration_tokens, "group_size": 32,
              "rows": result_rows, "machine": platform.processor() or platform.machine(), "threads": args.threads,
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
