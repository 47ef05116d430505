"""Safetensors weight files as llamba reads and writes them: a clear error naming the file when one is empty,
truncated or garbled, a shape check against a config before anything loads, and a SHA-256 digest per file.

Safetensors files carry no checksum of their own, so random bytes inside a weight load silently and the model
generates garbage. Every folder llamba writes gets ``llamba-digests.json`` (file name -> SHA-256), checked on
load; a folder without one (official checkpoints, a teacher from elsewhere) loads unchecked.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

DIGESTS = "llamba-digests.json"


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in 4 MiB blocks (weight files are far larger than memory should hold twice)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def write_digests(folder) -> None:
    """Record the digest of every ``*.safetensors`` file in ``folder`` (replacing any earlier record)."""
    folder = Path(folder)
    digests = {p.name: file_digest(p) for p in sorted(folder.glob("*.safetensors"))}
    tmp = folder / (DIGESTS + ".tmp")
    tmp.write_text(json.dumps({"sha256": digests}, indent=1))
    os.replace(tmp, folder / DIGESTS)


def verify_digests(folder, remedy: str) -> None:
    """Compare each weight file that has a recorded digest with it; ValueError naming the file on a mismatch."""
    folder = Path(folder)
    record = folder / DIGESTS
    if not record.is_file():
        return
    try:
        digests = json.loads(record.read_text())["sha256"]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{record} is damaged ({err}); delete it to load the weights unchecked") from None
    for name, want in digests.items():
        path = folder / name
        if path.is_file() and file_digest(path) != want:
            raise ValueError(f"{path}: its bytes differ from the SHA-256 recorded when llamba wrote it ({record}): "
                             f"the file is damaged. {remedy} (If you changed the weights on purpose, delete "
                             f"{record.name}.)")


def read_shapes(files, remedy: str) -> dict[str, tuple]:
    """{tensor name: shape} from safetensors headers (no weight is read); ValueError naming a damaged file."""
    from safetensors import SafetensorError, safe_open

    shapes = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    shapes[key] = tuple(f.get_slice(key).get_shape())
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{file}: not a readable safetensors file ({err}); it is empty, truncated or "
                             f"damaged. {remedy}") from None
    return shapes


def compare_shapes(expected: dict[str, tuple], found: dict[str, tuple], folder, unexpected_ok: bool = False) -> None:
    """ValueError naming the first weight whose shape disagrees with ``config.json``, or the missing (and, unless
    ``unexpected_ok``, unexpected) weights."""
    for key, shape in found.items():
        if key in expected and expected[key] != shape:
            raise ValueError(f"weight {key!r} has shape {shape} in {folder}, but config.json implies {expected[key]}")
    missing = sorted(set(expected) - set(found))
    unexpected = [] if unexpected_ok else sorted(set(found) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{folder}: weights do not match config.json; missing {missing[:5]}{' ...' if len(missing) > 5 else ''}"
                         f" unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
