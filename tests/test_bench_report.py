"""Result files: the provenance header and JSON every GPU benchmark writes, and the kernel table's markdown (the
GPU-only benchmarks cannot run here, so their formatting is checked on made-up numbers)."""

import json

from llamba.bench import report
from llamba.bench.kernels import to_markdown


def test_write_keeps_every_number_and_states_where_they_come_from(tmp_path):
    result = {**report.provenance(), "rows": [{"shape": "B1", "ms": 0.125}]}
    md = report.write(tmp_path / "sub" / "run", result, "Thing", ["| a |", "|---|", "| 1 |"], notes=("note one",))
    assert json.loads((tmp_path / "sub" / "run.json").read_text()) == result
    assert (tmp_path / "sub" / "run.md").read_text() == md
    lines = md.splitlines()
    assert lines[0] == f"# Thing ({result['device']})"
    assert f"- command: `{result['command']}`" in lines and "- note one" in lines
    assert lines[-1] == "| 1 |" and any(result["date"] in line and result["triton"] in line for line in lines)


def test_kernel_table_shows_wall_and_gpu_time():
    row = {"shape": "B8 T2048 H9 D64", "ours_fwd_ms": 0.137, "fla_fwd_ms": 0.308, "fla_over_ours": 2.25,
           "ours_train_fwd_ms": 0.159, "ours_bwd_ms": 0.542, "bwd_over_fwd": 3.96, "bwd_over_train_fwd": 3.40,
           "rel_diff_vs_fla": 4.8e-5, "ours_fwd_gpu_ms": 0.083, "fla_fwd_gpu_ms": 0.063, "fla_over_ours_gpu": 0.77,
           "ours_train_fwd_gpu_ms": 0.082, "ours_bwd_gpu_ms": 0.161, "bwd_over_fwd_gpu": 1.95,
           "bwd_over_train_fwd_gpu": 1.95, "ours_bwd_with_final_gpu_ms": 0.170}
    step = {"batch": 64, "ms": 0.0083, "floor_ms": 0.0069, "over_floor": 1.21, "launched_ms": 0.0426, "torch_ms": 0.778}
    lines = to_markdown({"scan": [row], "decode_step": [step]})
    assert not any("theta route" in line for line in lines)  # a run from before the GateLoop rows
    gateloop = {"gateloop_from_u_ms": 0.0166, "gateloop_theta_ms": 0.0091, "gateloop_gemm_ms": 0.0249}
    assert "| 64 | 0.0166 | 0.0091 | 0.0249 | 2.00 | 1.10 | 3.00 |" in to_markdown(
        {"scan": [row], "decode_step": [{**step, **gateloop}]})
    assert "| B8 T2048 H9 D64 | 0.137 | 0.308 | 2.25 | 0.159 | 0.542 | 3.96 | 3.40 | 4.8e-05 |" in lines
    assert "| B8 T2048 H9 D64 | 0.083 | 0.063 | 0.77 | 0.082 | 0.161 | 1.95 | 1.95 | 0.170 |" in lines
    assert "| 64 | 0.0083 | 0.0069 | 1.21 | 0.0426 | 0.778 |" in lines
