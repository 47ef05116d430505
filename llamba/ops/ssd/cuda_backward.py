"""The scan's backward as one CUDA kernel per (batch row, head) holding the whole state gradient
(``cuda_backward.cu``): the route ``triton_chunk`` takes where one Triton program cannot hold it (head dim 128).

The kernel is compiled on first use with NVRTC, the runtime compiler PyTorch's CUDA wheels ship (no CUDA toolkit,
no build step), for the GPU at hand, once per (P, N, document resets, final-state gradient) and cached for the
process. Wherever it does not apply (see ``supports``) or cannot be compiled, ``triton_chunk`` keeps its Triton
route, so this is a fast path with the Triton kernels and the float64 reference as its twins
(tests/test_kernels.py).
"""

from __future__ import annotations

import ctypes
import functools
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cuda_backward.cu")
BT = 64  # tokens per chunk, as in the source
# Warps per block, 8 or 16: one block per SM either way (registers, shared memory); 16 measured slower on an H100
# and an H200 (results/cuda-backward-ab-h200.md)
WARPS = 8
STATIC_SHARED = 24  # bytes: the kernel's three mbarriers, beside the dynamic shared memory below
WIDTHS = (64, 128)  # head dims and state sizes the kernel's warp tiling covers


def shared_bytes(P: int, N: int) -> int:
    """Shared memory of one block: two chunks of x, dy (64, P) and B, C (64, N); the state snapshot and the bf16
    state gradient (P, N); the two (64, 64) score tiles; the decays (rows padded by 8 bf16 against bank conflicts)."""
    ldp, ldn, ldt = P + 8, N + 8, BT + 8
    tiles = 2 * (2 * BT * ldp + 2 * BT * ldn) + 2 * P * ldn + 2 * BT * ldt
    return 2 * tiles + 5 * BT * 4


def nvrtc_compile(source: str, name: str, arch: str, nvrtc: ctypes.CDLL,
                  extra_options: tuple[str, ...] = ()) -> tuple[bytes, str]:
    """(cubin, lowered name) of the template instance ``name`` of ``source`` for ``arch`` (e.g. 'sm_90')."""

    def check(status: int, prog=None) -> None:
        if status == 0:
            return
        log = ""
        if prog is not None:
            size = ctypes.c_size_t()
            nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            buf = ctypes.create_string_buffer(size.value)
            nvrtc.nvrtcGetProgramLog(prog, buf)
            log = buf.value.decode(errors="replace")
        nvrtc.nvrtcGetErrorString.restype = ctypes.c_char_p
        raise RuntimeError(f"NVRTC: {nvrtc.nvrtcGetErrorString(status).decode()}\n{log}")

    prog = ctypes.c_void_p()
    check(nvrtc.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"cuda_backward.cu", 0, None, None))
    try:
        check(nvrtc.nvrtcAddNameExpression(prog, name.encode()), prog)
        options = [f"--gpu-architecture={arch}".encode(), b"-std=c++17", b"--extra-device-vectorization",
                   *(o.encode() for o in extra_options)]
        check(nvrtc.nvrtcCompileProgram(prog, len(options), (ctypes.c_char_p * len(options))(*options)), prog)
        size = ctypes.c_size_t()
        check(nvrtc.nvrtcGetCUBINSize(prog, ctypes.byref(size)), prog)
        cubin = ctypes.create_string_buffer(size.value)
        check(nvrtc.nvrtcGetCUBIN(prog, cubin), prog)
        lowered = ctypes.c_char_p()
        check(nvrtc.nvrtcGetLoweredName(prog, name.encode(), ctypes.byref(lowered)), prog)
        return cubin.raw, lowered.value.decode()
    finally:
        nvrtc.nvrtcDestroyProgram(ctypes.byref(prog))


def kernel_name(P: int, N: int, has_seq: bool, has_dfinal: bool, warps: int) -> str:
    return f"ssd_backward<{P}, {N}, {str(has_seq).lower()}, {str(has_dfinal).lower()}, {warps}>"


@functools.cache
def _kernel(device_index: int, P: int, N: int, has_seq: bool, has_dfinal: bool, warps: int, source: Path):
    """The kernel built from ``source`` (a parameter, like ``warps``, so that a benchmark can build another
    version beside this one: each call site passes the module's current ``SOURCE`` and ``WARPS``)."""
    from torch.cuda import _utils  # PyTorch's NVRTC and driver bindings (private: kept to this one function)

    major, minor = torch.cuda.get_device_capability(device_index)
    cubin, lowered = nvrtc_compile(source.read_text(), kernel_name(P, N, has_seq, has_dfinal, warps),
                                   f"sm_{major}{minor}", _utils._get_gpu_rtc_library())
    with torch.cuda.device(device_index):
        kernel = _utils._cuda_load_module(cubin, [lowered])[lowered]
        kernel.set_shared_memory_config(shared_bytes(P, N))
    return kernel


@functools.cache
def _usable(device_index: int, P: int, N: int) -> bool:
    """Whether this GPU runs the kernel (ldmatrix, mma.sync and cp.async: sm_80 on; the block's shared memory) and
    it compiles here; a failure warns once and leaves the Triton route in place."""
    props = torch.cuda.get_device_properties(device_index)
    if props.major < 8 or shared_bytes(P, N) + STATIC_SHARED > getattr(props, "shared_memory_per_block_optin", 0):
        return False
    try:
        _kernel(device_index, P, N, False, False, WARPS, SOURCE)
    except Exception as err:  # no NVRTC, an older driver, ...: the Triton kernels still run
        warnings.warn(f"llamba: the CUDA scan backward is unavailable ({err}); using the Triton one", stacklevel=3)
        return False
    return True


def _fits(t: torch.Tensor, row_dim: int) -> bool:
    """Copies move 16 bytes at a time, so rows must start on 16-byte boundaries; strides are 32-bit kernel arguments,
    and so are offsets within a chunk (up to 128 rows of dimension ``row_dim``)."""
    return (t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all(s % 8 == 0 for s in t.stride()[:-1])
            and all(0 <= s < 2 ** 31 for s in t.stride()) and t.stride(row_dim) * 128 < 2 ** 31)


def supports(x: torch.Tensor, B: torch.Tensor, C: torch.Tensor, dy: torch.Tensor, states: torch.Tensor,
             heads_per_group: int) -> bool:
    """bf16 on a CUDA GPU that fits the block, head dim and d_state 64 or 128, one head per B/C group (the kernel
    writes final dB, dC), rows the copies can take."""
    P, N = x.shape[-1], B.shape[-1]
    return (x.is_cuda and x.dtype == torch.bfloat16 and states.dtype == torch.bfloat16 and heads_per_group == 1
            and P in WIDTHS and N in WIDTHS and all(_fits(t, 1) for t in (x, B, C, dy)) and _fits(states, 3)
            and _usable(x.device.index or 0, P, N))


def backward(x, B, C, la, seq, states, dy, d_final, dx, dB, dC, dla) -> torch.Tensor:
    """Fills dx, dB, dC (like x, B, C) and dla (float32 (batch, length, H): the gradient of the log-decay summed over
    later tokens, before the host's final-state and document-start terms); returns the initial state's gradient.
    Arguments as ``triton_chunk._backward`` holds them: ``states`` are the forward's bf16 snapshots of the state
    entering each chunk, ``seq`` int32 document ids padded to whole chunks, or None."""
    batch, length, H, P = x.shape
    N = B.shape[-1]
    n_chunks = states.shape[1]
    d_init = torch.empty(batch, H, P, N, device=x.device, dtype=torch.float32)
    if d_final is not None:
        d_final = d_final.contiguous()
    kernel = _kernel(x.device.index or 0, P, N, seq is not None, d_final is not None, WARPS, SOURCE)
    strides = (*x.stride()[:3], *B.stride()[:3], *C.stride()[:3], *dy.stride()[:3], *dx.stride()[:3],
               *dB.stride()[:3], la.stride(0), la.stride(1), seq.stride(0) if seq is not None else 0,
               *states.stride()[:4])
    with torch.cuda.device(x.device):
        kernel(grid=(batch * H, 1, 1), block=(32 * WARPS, 1, 1), shared_mem=shared_bytes(P, N),
               args=[x, B, C, dy, states, la, d_final if d_final is not None else d_init,
                     seq if seq is not None else la, dx, dB, dC, dla, d_init, length, H, 1, n_chunks, *strides])
    return d_init
