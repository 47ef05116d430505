"""Registers, spills and shared memory of every Triton kernel of llamba, compiled for a GPU on a machine without
one. Each kernel is compiled exactly as its host function launches it at the shapes of the kernel table
(``llamba.bench.kernels``): the host code runs on small CPU tensors with the launch replaced by a compile for the
target, and the device dispatch (fused or two-kernel, tile sizes) sees the target's SM count. ``ptxas -v`` then
reports per-thread registers and spill bytes. Spills are the usual first suspect when a kernel runs far from its
bytes or FLOPs floor; this finds them with no GPU time. Command line: ``scripts/kernel_registers.py``.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from contextlib import contextmanager

import torch
import torch.nn.functional as F
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

from llamba.bench.kernels import CONV_SHAPES, DECODE_BATCHES, SCAN_SHAPES
from llamba.ops.ssd import triton_chunk
from llamba.ops.conv.triton_kernel import causal_conv_triton
from llamba.ops.conv.triton_train import conv_backward, conv_forward
from llamba.ops.gateloop.triton_rotate import rotate_by_phase_triton
from llamba.ops.step.triton_kernel import mixer_step_triton

SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}  # bytes per block, by arch


@contextmanager
def compile_instead_of_launch(target: GPUTarget, found: list):
    """Within: ``kernel[grid](...)`` compiles for ``target`` (the same binding and specialization as a real launch)
    and appends (kernel name, constexprs, warps, stages, PTX, shared bytes) to ``found``; nothing runs."""
    backend = make_backend(target)
    launch = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kwargs.setdefault("debug", False)
        bound, specialization, options = create_function_from_signature(self.signature, self.params, backend)(
            *args, **kwargs)
        options, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound, specialization, options)
        kernel = triton.compile(ASTSource(self, signature, constexprs, attrs), target=target,
                                options=options.__dict__)
        consts = {self.arg_names[path[0]]: value for path, value in constexprs.items()
                  if self.params[path[0]].is_constexpr}
        found.append((self.__name__, consts, options.num_warps, options.num_stages, kernel.asm["ptx"],
                      kernel.metadata.shared))

    JITFunction.run = compile_only
    try:
        yield
    finally:
        JITFunction.run = launch


def ptxas_report(ptx: str, arch: str, capability: int) -> tuple[int, int, int]:
    """(registers per thread, spill store bytes, spill load bytes). Uses the ptxas Triton compiles with (its PTX
    version follows that ptxas: a torch build may point Triton at another one than the wheel's own)."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        run = subprocess.run([get_ptxas(capability).path, "-v", f"--gpu-name={arch}", src, "-o",
                              os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
        if run.returncode:
            raise RuntimeError(f"ptxas failed on {arch}: {run.stderr.strip()}")
        log = run.stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return regs, int(spills.group(1)), int(spills.group(2))


def launch_all(length: int = 128, sm_count: int | None = None) -> None:
    """Every kernel launch of the library at the kernel table's shapes (sequence length cut to ``length``: it
    changes no launch setting): the scan forward both ways (with and without the fused gate) and its backward,
    the prefill conv, the training conv forward and backward, the decode step, GateLoop's rotation. ``sm_count``:
    the target GPU's, which sizes the scan's tiles."""
    bf16 = torch.bfloat16
    for batch, _, H, P, N in SCAN_SHAPES:
        x = torch.randn(batch, length, H, P, dtype=bf16)
        B, C = torch.randn(batch, length, H, N, dtype=bf16), torch.randn(batch, length, H, N, dtype=bf16)
        la = -F.softplus(torch.randn(batch, length, H))
        for forward in ("fused", "two_kernel"):  # the one-pass forward (and backward), then the two-kernel ones
            route = triton_chunk.Dispatch(forward=forward, sm_count=sm_count)
            _, _, states = triton_chunk._forward(x, B, C, la, None, None, keep_states=True, dispatch=route)
            gate = (torch.randn(H, dtype=bf16), torch.randn(batch, length, H * P, dtype=bf16), None)
            triton_chunk._forward(x, B, C, la, None, None, keep_states=False, gate=gate, dispatch=route)  # gated
            triton_chunk._backward(x, B, C, la, None, states, torch.randn_like(x), None, None, False, route)
            final = torch.randn(batch, H, P, N)  # a loss on the final state too: the builds that read its gradient
            triton_chunk._backward(x, B, C, la, None, states, torch.randn_like(x), final, final, False, route)
    for batch, _, channels in CONV_SHAPES:
        xBC = torch.randn(batch, length, channels, dtype=bf16)
        mask = torch.ones(batch, length, dtype=torch.long)
        causal_conv_triton(xBC, torch.randn(channels, 1, 4, dtype=bf16), torch.randn(channels, dtype=bf16), None,
                           mask, x_channels=channels // 3)
        seq = torch.zeros(batch, length, dtype=torch.int32)
        w, bias = torch.randn(channels, 1, 4), torch.randn(channels)  # the training conv: float32 parameters
        for resets in (seq, None):
            conv_forward(xBC, w, bias, resets)
            conv_backward(xBC, w, resets, torch.randn_like(xBC), True)
    H, P, N, d_model = 9, 64, 64, 576  # the student's decode shapes, as in the kernel table
    conv_dim = H * P + 2 * H * N
    for batch in DECODE_BATCHES[:1]:  # the batch size is the grid, not a launch setting
        # A_log given, and A_log computed in the kernel from the normed input (the engine's route on CUDA)
        for A_log in (torch.randn(batch, H, dtype=bf16), (torch.randn(batch, d_model, dtype=bf16),
                                                          torch.randn(H, d_model, dtype=bf16), None)):
            mixer_step_triton(torch.randn(batch, conv_dim, dtype=bf16), torch.randn(batch, H * P, dtype=bf16), A_log,
                              torch.randn(batch, conv_dim, 3, dtype=bf16), torch.randn(batch, H, P, N),
                              torch.randn(conv_dim, 1, 4, dtype=bf16), torch.randn(conv_dim, dtype=bf16),
                              torch.randn(H, dtype=bf16), torch.randn(H * P, dtype=bf16), H)
    # a GateLoop mixer's step: the phase turned and B, C rotated in the kernel; theta given, and theta computed in
    # the kernel from the normed input with A_log (the engine's route on CUDA), whose tiles depend on whether the
    # grid fills the GPU: batch 1 (it does not) and the table's first batch
    for batch in (1, DECODE_BATCHES[0]):
        u = torch.randn(batch, d_model, dtype=bf16)
        thetas = [(torch.randn(batch, H, dtype=bf16), torch.randn(batch, H, N // 2))] if batch > 1 else []
        for A_log, theta in thetas + [((u, torch.randn(H, d_model, dtype=bf16), None),
                                       (u, torch.randn(H * N // 2, d_model, dtype=bf16),
                                        torch.randn(H * N // 2, dtype=bf16)))]:
            mixer_step_triton(torch.randn(batch, conv_dim, dtype=bf16), torch.randn(batch, H * P, dtype=bf16), A_log,
                              torch.randn(batch, conv_dim, 3, dtype=bf16), torch.randn(batch, H, P, N),
                              torch.randn(conv_dim, 1, 4, dtype=bf16), torch.randn(conv_dim, dtype=bf16),
                              torch.randn(H, dtype=bf16), torch.randn(H * P, dtype=bf16), H,
                              phase=(theta, torch.randn(batch, H, N // 2)))
    # a GateLoop prefill's rotation of B and C (strided views of the conv's output), with and without resets
    xBC = torch.randn(DECODE_BATCHES[0], length, H * P + 2 * H * N, dtype=bf16)
    B, C = (xBC[..., H * P + k * H * N:H * P + (k + 1) * H * N].unflatten(-1, (H, N)) for k in range(2))
    for resets in (torch.zeros(xBC.shape[:2], dtype=torch.int32), None):
        rotate_by_phase_triton(B, C, torch.randn(*xBC.shape[:2], H, N // 2), torch.randn(xBC.shape[0], H, N // 2),
                               resets)


def compile_report(arch: int = 90, sms: int = 132) -> list[dict]:
    """One row per distinct kernel build the library launches: name, constexprs, warps, stages, registers,
    spill bytes, shared memory and whether that fits the target."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compile_report compiles real kernels: unset TRITON_INTERPRET")
    found: list = []
    with torch.no_grad(), compile_instead_of_launch(GPUTarget("cuda", arch, 32), found):
        launch_all(sm_count=sms)
    gpu_name = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    rows, seen = [], set()
    for name, consts, warps, stages, ptx, shared in found:
        flags = " ".join(f"{k}={v}" for k, v in consts.items() if k != "PREC")
        if (name, flags, warps, stages) in seen:
            continue
        seen.add((name, flags, warps, stages))
        regs, stores, loads = ptxas_report(ptx, gpu_name, arch)
        rows.append({"kernel": name, "flags": flags, "warps": warps, "stages": stages, "registers": regs,
                     "spill_stores": stores, "spill_loads": loads, "shared": shared,
                     "shared_fits": shared <= SHARED_LIMIT.get(arch, 48 * 1024)})
    return rows

