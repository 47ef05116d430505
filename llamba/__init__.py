"""llamba: distill a Llama-family Transformer into a Llamba recurrent model (Discrete Mamba-2 mixers, MOHAWK), and
run it fast.

``import llamba`` alone is light (no torch, no transformers): the ``llamba`` command imports it first, and
``llamba --help`` should answer at once. ``LlambaConfig`` and ``LlambaForCausalLM`` are still attributes of this
package, loaded on first use (PEP 562 ``__getattr__``) from ``llamba.model``.

Registering ``model_type: llamba`` with transformers' Auto classes happens when ``llamba.model`` is imported, which
every path that builds or loads a Llamba model goes through, ``from llamba import LlambaForCausalLM`` included. To
load a Llamba folder (ours, or cartesia's official layout) with ``AutoModelForCausalLM.from_pretrained``, first
``import llamba.model`` (a bare ``import llamba`` no longer registers).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"
__all__ = ["LlambaConfig", "LlambaForCausalLM", "__version__"]

_LAZY = {"LlambaConfig": "llamba.model", "LlambaForCausalLM": "llamba.model"}


def fast_generate(model, inputs, generation_config, kwargs):
    """``LlambaForCausalLM.generate``'s CUDA fast path, ``llamba.generation.try_fast_generate``, imported on the
    first call. It lives at the package root, which composes the layers: ``llamba.model`` may import nothing above
    it, so it looks this up here when generate() runs."""
    from llamba.generation import try_fast_generate

    return try_fast_generate(model, inputs, generation_config, kwargs)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this hook
        return value
    raise AttributeError(f"module 'llamba' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
