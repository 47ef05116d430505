"""``llamba serve``: an OpenAI-compatible HTTP server with continuous batching over a fixed set of cache slots.

- ``slots``: each kind of model (float student, CPU-runtime student, Transformer teacher) as a slot cache that
  requests join and leave at token boundaries;
- ``scheduler``: the step loop (one thread) that admits, prefills in pieces, decodes and samples;
- ``app``: the HTTP API (FastAPI), which only translates between HTTP and the scheduler;
- ``server``: loading a model for serving, and running the app under uvicorn.

Needs the ``serve`` extra (``pip install 'llamba[serve]'``). Design notes: docs/serving.md.
"""
