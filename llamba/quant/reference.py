"""Weight quantization with per-group scales, in plain PyTorch: the format's definition and the slow twin that the
compiled kernels are tested against.

Every group of ``group_size`` consecutive inputs of a weight row stores float16 ``scale`` and ``min`` and integer
codes ``q`` with ``w ~= scale * q + min`` (asymmetric: the group's range maps onto all code values).
  int4: q in [0, 15], two codes per byte; inside each 32-wide block byte j holds q[j] | q[j + 16] << 4
        (so one 16-byte load unpacks into two contiguous 16-lane vectors)
  int8: q in [-128, 127], one int8 per weight
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BITS = (4, 8)
CODE_RANGE = {4: (0, 15), 8: (-128, 127)}


@dataclass
class QuantizedWeight:
    data: torch.Tensor   # uint8 (N, K/2) for int4, int8 (N, K) for int8
    scale: torch.Tensor  # float16 (N, K/G)
    min: torch.Tensor    # float16 (N, K/G)
    bits: int

    @property
    def shape(self) -> tuple[int, int]:
        n = self.data.shape[0]
        return n, self.data.shape[1] * (2 if self.bits == 4 else 1)

    @property
    def group_size(self) -> int:
        return self.shape[1] // self.scale.shape[1]


def check_group(k: int, bits: int, group_size: int) -> None:
    if bits not in BITS:
        raise ValueError(f"bits={bits}: choose one of {BITS}")
    if group_size % 32 or k % group_size:
        raise ValueError(f"group_size={group_size} must be a multiple of 32 that divides the input size {k}")


def quantize_weight(w: torch.Tensor, bits: int, group_size: int = 32) -> QuantizedWeight:
    """Round-to-nearest per group; the codes are computed against the float16-rounded scale and min that are stored."""
    n, k = w.shape
    check_group(k, bits, group_size)
    lo_code, hi_code = CODE_RANGE[bits]
    wg = w.detach().to(torch.float32).reshape(n, k // group_size, group_size)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scale = ((hi - lo) / (hi_code - lo_code)).to(torch.float16)
    s = scale.float()
    safe = torch.where(s > 0, s, torch.ones_like(s))          # a constant group: every code decodes to min
    mn = (lo - lo_code * s).to(torch.float16)                    # code lo_code decodes to the group's minimum
    q = torch.round((wg - mn.float()[..., None]) / safe[..., None]).clamp_(lo_code, hi_code)
    q = q.reshape(n, k)
    data = pack_int4(q.to(torch.uint8)) if bits == 4 else q.to(torch.int8)
    return QuantizedWeight(data.contiguous(), scale.contiguous(), mn.contiguous(), bits)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(N, K) codes in [0, 15] -> (N, K/2) bytes, K a multiple of 32."""
    n, k = q.shape
    blocks = q.reshape(n, k // 32, 2, 16)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(n, k // 2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    n, half = packed.shape
    blocks = packed.reshape(n, half // 16, 1, 16)
    return torch.cat([blocks & 0x0F, blocks >> 4], dim=2).reshape(n, half * 2)


def codes(qw: QuantizedWeight, rows: torch.Tensor | None = None) -> torch.Tensor:
    data = qw.data if rows is None else qw.data[rows]
    return unpack_int4(data) if qw.bits == 4 else data


def dequantize(qw: QuantizedWeight, dtype: torch.dtype = torch.float32, rows: torch.Tensor | None = None) -> torch.Tensor:
    """The weights (or only ``rows`` of them: an embedding lookup) as ``dtype``."""
    q = codes(qw, rows).to(dtype)
    scale = (qw.scale if rows is None else qw.scale[rows]).to(dtype)
    mn = (qw.min if rows is None else qw.min[rows]).to(dtype)
    n, k = q.shape
    g = scale.shape[1]
    return (q.reshape(n, g, k // g) * scale[..., None] + mn[..., None]).reshape(n, k)


def linear_reference(x: torch.Tensor, qw: QuantizedWeight | torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The slow, obviously-correct twin of the kernels: dequantize, then a float64 matmul."""
    w = qw.double() if isinstance(qw, torch.Tensor) else dequantize(qw, torch.float64)
    y = x.double() @ w.T
    return y if bias is None else y + bias.double()
