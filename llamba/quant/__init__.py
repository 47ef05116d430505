"""The quantized CPU runtime: per-group int8 / int4 weights, a compiled decode step that allocates nothing per
token, and a single-file artifact. ``load_for_cpu(path, quant)`` is the entry point for ``llamba generate``."""
