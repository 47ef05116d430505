"""Evaluation through lm-evaluation-harness: the ``llamba`` model type (``lm.py``), local task files over a data
dir (``tasks/*.yaml`` + ``data.py``), the paper's suite (``suite.py``), perplexity and KL against the teacher
(``ppl.py``) and the side-by-side report (``report.py``). Importing ``llamba.eval.lm`` registers the model type."""
