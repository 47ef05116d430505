"""GateLoop (Katsch 2023, arXiv 2311.01927) recurrence: the Discrete Mamba-2 one with a complex, data-controlled
transition a_t = |a_t| e^{i theta_t} per head and state pair. Because prod a_k = prod |a_k| e^{i sum theta_k}, it is
the real Discrete Mamba-2 recurrence of B and C rotated by the cumulative phase (a data-dependent RoPE;
docs/gateloop.md), so every form reuses ``llamba.ops.ssd``:

- ``naive``: the literal complex recurrence and mixing matrix (torch complex), the references;
- ``chunk``: rotation + the chunked scan (``gateloop_scan``) and rotation + the materialised matrix;
- ``triton_rotate``: the rotation as one Triton kernel (a prefill on CUDA; its twin is ``phase.rotate_by_phase``);
- ``recurrent``: one token at a time, state and phase updated in place.
"""

from llamba.ops.gateloop.chunk import gateloop_mixing_matrix, gateloop_scan
from llamba.ops.gateloop.phase import cumulative_phase, rotate_by_phase, rotate_pairs, wrap_phase
from llamba.ops.gateloop.recurrent import advance_phase, gateloop_step

__all__ = ["advance_phase", "cumulative_phase", "gateloop_mixing_matrix", "gateloop_scan", "gateloop_step",
           "rotate_by_phase", "rotate_pairs", "wrap_phase"]
