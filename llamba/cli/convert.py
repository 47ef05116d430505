"""``llamba convert``: write an initialised Llamba student (official format + the teacher's tokenizer)."""

from __future__ import annotations

import sys

from llamba.cli.common import (DTYPE_NAMES, INIT_CHOICES, check_output_folder, count_parameters, dtype_of, int_at_least,
                               parse_attention_layers)


def register(parser) -> None:
    parser.add_argument("--teacher", required=True, help="smollm2-135m, a HF Llama folder or a .gguf file")
    parser.add_argument("--out", required=True, help="output folder (new or empty; --force replaces a student in it)")
    parser.add_argument("--force", action="store_true", help="replace the student already in --out")
    parser.add_argument("--d-state", type=int_at_least(1), default=64, help="SSM state size N per head (default 64)")
    parser.add_argument("--init", default="identity", choices=INIT_CHOICES,
                        help="mixer init: Llamba's pass-through, from the teacher's attention weights, or those with "
                        "the decay, a constant feature and the output scale calibrated on one teacher forward")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPE_NAMES))
    parser.add_argument("--mixer", default=None,
                        help="mixer of the student's layers: discrete_mamba2 (default) or gateloop (complex, "
                        "data-dependent rotation of the state; needs an even --d-state; docs/gateloop.md)")
    parser.add_argument("--attention-layers", default="", help="hybrid student: these layers (e.g. 5,14) keep the "
                        "teacher's softmax attention; the rest get Discrete Mamba-2 mixers (default: none)")


def run(args) -> int:
    check_output_folder(args.out, args.force, "student")  # before the teacher loads: a refusal costs nothing

    from llamba.checkpoint import save_student
    from llamba.convert import student_from_teacher
    from llamba.model.config import check_mixer
    from llamba.teacher import load_teacher

    attention_layers = parse_attention_layers(args.attention_layers)  # a typo fails before the teacher loads
    check_mixer(args.mixer, args.d_state)  # and so does an odd --d-state for gateloop
    teacher, tokenizer = load_teacher(args.teacher, dtype=dtype_of(args.dtype))
    student = student_from_teacher(teacher, d_state=args.d_state, init=args.init, attention_layers=attention_layers,
                                   mixer=args.mixer)
    out = save_student(student, tokenizer, args.out)
    print(f"teacher: {count_parameters(teacher):,} parameters; student: {count_parameters(student):,} parameters "
          f"({student.config.n_layer} layers, {student.config.n_v_heads} heads x {student.config.head_dim}, "
          f"d_state {student.config.d_state}, {student.config.mixer} mixers"
          f"{f'; attention in layers {attention_layers}' if attention_layers else ''})", file=sys.stderr)
    print(out)
    return 0
