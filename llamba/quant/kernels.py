"""The compiled CPU decode kernels (``csrc/cpu_decode.c``): built on first use with the system C compiler (about a
second), cached by source hash, loaded through ctypes. No torch headers, no ninja.

``-march=native`` turns on the AVX-512 or the AVX2 paths where the CPU has them (a portable scalar path otherwise).
Without a compiler ``load_kernels()`` returns None and callers fall back to PyTorch ops (``llamba.quant.reference``).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import torch

SOURCE = Path(__file__).parent / "csrc" / "cpu_decode.c"
_errors: list[str] = []

c_float_p = ctypes.POINTER(ctypes.c_float)


class Linear(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("min", ctypes.c_void_p), ("bias", ctypes.c_void_p),
                ("bits", ctypes.c_int64), ("n", ctypes.c_int64), ("k", ctypes.c_int64), ("group", ctypes.c_int64)]


class Layer(ctypes.Structure):
    _fields_ = [("input_norm", ctypes.c_void_p), ("in_proj", Linear), ("conv_weight", ctypes.c_void_p),
                ("conv_bias", ctypes.c_void_p), ("D", ctypes.c_void_p), ("z_bias", ctypes.c_void_p),
                ("out_proj", Linear), ("post_norm", ctypes.c_void_p), ("gate", Linear), ("up", Linear), ("down", Linear)]


class Model(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int64) for name in
                ("n_layer", "d_model", "d_inner", "n_heads", "n_groups", "head_dim", "d_state", "width", "inter")] + [
                ("eps", ctypes.c_float), ("layers", ctypes.POINTER(Layer)), ("embedding", Linear),
                ("final_norm", ctypes.c_void_p), ("head", Linear)]


def find_compiler() -> str | None:
    """The C compiler the kernels build with: ``$CC``, else cc, gcc or clang on the PATH; None when there is none."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


# The builds: "native" (the CPU's own vector path: what runs), "avx2" (the AVX2 path by itself, so that a machine with
# AVX-512 tests it too) and "portable" (the scalar C path)
BUILD_FLAGS = {"native": ["-march=native"], "avx2": ["-mavx2", "-mfma", "-mf16c"], "portable": []}


def build_command(cc: str, out: Path, build: str = "native") -> list[str]:
    """The compiler's command line. An undeclared function fails the build (and so falls back to the portable one)
    instead of becoming a symbol that only ctypes' load reports: an F16C intrinsic without its header once did."""
    return [cc, *BUILD_FLAGS[build], "-O3", "-fPIC", "-shared", "-fopenmp", "-Werror=implicit-function-declaration",
            str(SOURCE), "-o", str(out), "-lm"]


def _compile(out: Path, build: str) -> None:
    cc = find_compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC)")
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    # some compilers / CPUs refuse -march=native: the portable build then
    for attempt in [build] + (["portable"] if build == "native" else []):
        result = subprocess.run(build_command(cc, tmp, attempt), capture_output=True, text=True)
        if result.returncode == 0:
            os.replace(tmp, out)  # atomic: parallel test workers may build at the same time
            return
    raise RuntimeError(f"compiling {SOURCE.name} failed:\n{result.stderr[-2000:]}")


@functools.lru_cache(maxsize=None)
def load_kernels(build: str = "native"):
    """The ctypes library, or None (``kernel_error()`` says why) when it cannot be built. ``build``: a key of
    ``BUILD_FLAGS``; the runtime uses "native", the tests all three (``llamba_simd_bits()`` says which path a
    library took: 512, 256 or 0)."""
    try:
        digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
        cache = Path(os.environ.get("LLAMBA_KERNEL_CACHE", Path.home() / ".cache" / "llamba" / "kernels"))
        cache.mkdir(parents=True, exist_ok=True)
        lib_path = cache / f"cpu_decode-{digest}{'' if build == 'native' else '-' + build}.so"
        if not lib_path.exists():
            _compile(lib_path, build)
        lib = ctypes.CDLL(str(lib_path))
    except Exception as err:  # noqa: BLE001 - any build failure means "use the PyTorch fallback"
        _errors.append(f"{type(err).__name__}: {err}")
        return None
    lib.llamba_decode_step.argtypes = [ctypes.POINTER(Model), ctypes.c_int64, c_float_p, c_float_p, c_float_p, c_float_p]
    lib.llamba_decode_step.restype = ctypes.c_int
    lib.llamba_decode_batch.argtypes = [ctypes.POINTER(Model), ctypes.c_int64, ctypes.POINTER(ctypes.c_int64),
                                        ctypes.POINTER(c_float_p), ctypes.POINTER(c_float_p), c_float_p, c_float_p]
    lib.llamba_decode_batch.restype = ctypes.c_int
    lib.llamba_mixer_blocks.argtypes = [ctypes.POINTER(Model), ctypes.c_int64, ctypes.c_int64, c_float_p, c_float_p,
                                        c_float_p, c_float_p]
    lib.llamba_mixer_blocks.restype = None
    lib.llamba_embed.argtypes = [ctypes.POINTER(Model), ctypes.c_int64, c_float_p]
    lib.llamba_embed.restype = ctypes.c_int
    lib.llamba_head.argtypes = [ctypes.POINTER(Model), c_float_p, c_float_p, c_float_p]
    lib.llamba_head.restype = None
    lib.llamba_linear_rows.argtypes = [ctypes.POINTER(Linear), c_float_p, ctypes.c_int64, c_float_p, c_float_p]
    lib.llamba_linear_rows.restype = None
    lib.llamba_workspace_floats.argtypes = [ctypes.POINTER(Model)]
    lib.llamba_workspace_floats.restype = ctypes.c_int64
    lib.llamba_simd_bits.restype = ctypes.c_int
    lib.llamba_set_threads.argtypes = [ctypes.c_int]
    return lib


def kernel_error() -> str | None:
    return _errors[-1] if _errors else None


def ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None or t.numel() == 0 else t.data_ptr()


def fptr(t: torch.Tensor):
    assert t.dtype == torch.float32 and t.is_contiguous()
    return ctypes.cast(t.data_ptr(), c_float_p)
