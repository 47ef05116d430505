"""The data-free path's sampling speed, side by side: documents sampled from the teacher through its slot cache
(``llamba.distill.teacher_samples``, what ``llamba distill`` uses without data) against ``transformers``'
``generate`` with the same settings (temperature 1, whole vocabulary, from BOS; what it used before), in one
process, with the ratio. The teacher is SmolLM2-135M's shape with random weights unless ``--teacher`` names one
(speed does not depend on the weights; random ones rarely sample EOS, so every row runs its full length).

    python benchmarks/teacher_sampling.py [--rows 256 --length 256]   # CUDA, bf16
    python benchmarks/teacher_sampling.py --device cpu --rows 16 --length 64 --layers 4
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def build_teacher(name: str | None, layers: int | None, device: str, dtype: torch.dtype):
    """(teacher, start id, EOS id): a named teacher with its tokenizer's ids, else random weights with SmolLM2's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if name:
        from llamba.teacher import load_teacher

        teacher, tokenizer = load_teacher(name, dtype=dtype, device=device)
        eos = tokenizer.eos_token_id
        return teacher.eval(), tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos, eos
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers or 30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval(), 1, 2


def timed(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", help="a teacher name or folder (default: random weights of SmolLM2-135M's shape)")
    ap.add_argument("--layers", type=int, help="with the random teacher: fewer layers (a quick CPU run)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2, help="timed batches per side (after one untimed warm-up)")
    ap.add_argument("--out", help="write the results here as JSON")
    args = ap.parse_args()
    from llamba.distill.teacher_samples import sample_documents
    from llamba.serve.slots import TeacherSlots

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    teacher, start, eos = build_teacher(args.teacher, args.layers, args.device, dtype)
    slots = TeacherSlots(teacher, args.rows, args.length + 1)
    generator = torch.Generator(device=args.device).manual_seed(0)
    tokens = {"slots": 0, "generate": 0}

    # both sides count each row's sampled tokens up to and with its EOS, at most --length
    def ours():
        docs = sample_documents(slots, start, eos, args.length, generator)
        tokens["slots"] += sum(min(len(d) + 1, args.length) for d in docs)

    def theirs():
        ids = torch.full((args.rows, 1), start, device=args.device)
        out = teacher.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.length, do_sample=True,
                               temperature=1.0, top_k=0, top_p=1.0, pad_token_id=eos, eos_token_id=eos)
        tokens["generate"] += int(((out[:, 1:] != eos).cumprod(1).sum(1) + 1).clamp(max=args.length).sum())

    with torch.inference_mode():
        for fn in (ours, theirs):
            fn()  # warm-up: compilation, graph capture, allocator
        tokens.update(slots=0, generate=0)
        seconds = {"slots": sum(timed(ours, args.device) for _ in range(args.repeats)),
                   "generate": sum(timed(theirs, args.device) for _ in range(args.repeats))}
    rate = {k: tokens[k] / seconds[k] for k in seconds}
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    result = {"command": "python benchmarks/teacher_sampling.py " + " ".join(
                  f"--{k} {v}" for k, v in vars(args).items() if v is not None and k != "out"),
              "device": device, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "teacher": args.teacher or f"random, SmolLM2-135M's shape, {teacher.config.num_hidden_layers} layers",
              "dtype": str(dtype).replace("torch.", ""), "tokens_per_s": rate, "ratio": rate["slots"] / rate["generate"]}
    print(f"{args.rows} rows x {args.length} tokens on {device}, {result['teacher']}")
    print(f"transformers generate: {rate['generate']:,.0f} tokens/s")
    print(f"slot cache:            {rate['slots']:,.0f} tokens/s ({result['ratio']:.1f}x)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
