"""The machine code of the CUDA scan backward (``llamba/ops/ssd/cuda_backward.cu``) with no GPU: registers, stack
and shared memory; the main loop's instructions by opcode; and which source lines they come from. The kernel is
latency-bound, so the instructions its loop issues are what it costs (docs/kernels.md).

Needs NVRTC, cuobjdump and nvdisasm, which NVIDIA ships as wheels (no toolkit):
    pip install nvidia-cuda-nvrtc nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm

    python scripts/cuda_sass.py                          # P = N = 128, no document resets, 8 warps, sm_90
    python scripts/cuda_sass.py --p 128 --n 64 --lines   # and the instructions of each source line
    python scripts/cuda_sass.py --source other.cu        # another version of the kernel
"""

import argparse
import collections
import ctypes
import re
import subprocess
import tempfile
from pathlib import Path

from llamba.ops.ssd import cuda_backward

INSTRUCTION = re.compile(r"\s+/\*([0-9a-f]+)\*/\s+(@!?U?P[0-9T] )?([A-Z0-9_]+)")
INSTALL = "pip install nvidia-cuda-nvrtc nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm"


def nvidia_file(pattern: str) -> Path:
    """A file of NVIDIA's CUDA wheels (they install under the ``nvidia`` namespace package)."""
    try:
        import nvidia
    except ImportError:
        raise SystemExit(f"needs NVIDIA's CUDA wheels: {INSTALL}") from None
    for root in nvidia.__path__:
        found = sorted(Path(root).glob(f"**/{pattern}"))
        if found:
            return found[-1]
    raise SystemExit(f"no {pattern} in NVIDIA's wheels: {INSTALL}")


def load_nvrtc() -> ctypes.CDLL:
    # NVRTC opens its builtins library by name at compile time: load it first, so that no library path is needed
    ctypes.CDLL(str(nvidia_file("libnvrtc-builtins.so.*")), mode=ctypes.RTLD_GLOBAL)
    return ctypes.CDLL(str(nvidia_file("libnvrtc.so.*")))


def main_loop(sass: list[tuple[str, str, int | None]]) -> list[tuple[str, str, int | None]]:
    """The instructions inside the widest backward branch: the kernel's loop over chunks."""
    labels, widest = {}, (0, 0)
    for i, (op, text, _) in enumerate(sass):
        if op == "LABEL":
            labels[text] = i
        elif op == "BRA" and (m := re.search(r"\((\.L_x_\d+)\)", text)) and labels.get(m.group(1), i) < i:
            widest = max(widest, (labels[m.group(1)], i), key=lambda span: span[1] - span[0])
    return [ins for ins in sass[widest[0]:widest[1] + 1] if ins[0] != "LABEL"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=cuda_backward.SOURCE)
    parser.add_argument("--p", type=int, default=128, help="head dim")
    parser.add_argument("--n", type=int, default=128, help="d_state")
    parser.add_argument("--seq", action="store_true", help="the build with document resets")
    parser.add_argument("--dfinal", action="store_true", help="the build that reads a final-state gradient")
    parser.add_argument("--warps", type=int, default=cuda_backward.WARPS)
    parser.add_argument("--arch", default="sm_90")
    parser.add_argument("--lines", action="store_true", help="also the loop's instructions per source line")
    args = parser.parse_args()

    name = cuda_backward.kernel_name(args.p, args.n, args.seq, args.dfinal, args.warps)
    cubin, _ = cuda_backward.nvrtc_compile(args.source.read_text(), name, args.arch, load_nvrtc(), ("-lineinfo",))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        usage = subprocess.run([nvidia_file("cuobjdump"), "--dump-resource-usage", path],
                               capture_output=True, text=True, check=True).stdout
        listing = subprocess.run([nvidia_file("nvdisasm"), "-c", "-g", path],
                                 capture_output=True, text=True, check=True).stdout
    sass, line = [], None  # (opcode or LABEL, text, source line)
    for text in listing.splitlines():
        if text.strip().startswith("//##") and (m := re.search(r"line (\d+)", text)):
            line = int(m.group(1))
        elif m := re.match(r"^(\.L_x_\d+):", text.strip()):
            sass.append(("LABEL", m.group(1), None))
        elif (m := INSTRUCTION.match(text)) and m.group(2) != "@!PT ":  # @!PT: never issued
            sass.append((m.group(3), text, line))
    loop = main_loop(sass)
    ops = collections.Counter(op for op, _, _ in loop)
    print(f"{name} for {args.arch}: {usage.strip().splitlines()[-1].strip()}")
    print(f"main loop: {len(loop)} instructions (each path of a branch counted), "
          f"{ops['HMMA']} HMMA, {ops['LDSM']} LDSM")
    print("  " + ", ".join(f"{op} {n}" for op, n in ops.most_common(16)))
    if args.lines:
        per_line = collections.defaultdict(collections.Counter)
        for op, _, src_line in loop:
            per_line[src_line][op] += 1
        source = args.source.read_text().splitlines()
        print("\n| line | instructions | opcodes | source |\n|---|---|---|---|")
        for src_line, counts in sorted(per_line.items(), key=lambda kv: -sum(kv[1].values()))[:30]:
            code = source[src_line - 1].strip()[:70] if src_line else ""
            top = ", ".join(f"{op} {n}" for op, n in counts.most_common(3))
            print(f"| {src_line} | {sum(counts.values())} | {top} | `{code}` |")


if __name__ == "__main__":
    main()
