"""llamba: distill a Llama-family Transformer into a Llamba recurrent model (Discrete Mamba-2 mixers, MOHAWK), and
run it fast.

Importing it registers ``model_type: llamba`` with transformers' Auto classes, so after ``import llamba`` a Llamba
folder (ours, or cartesia's official layout) loads with ``AutoModelForCausalLM.from_pretrained``.
"""

from llamba.model import LlambaConfig, LlambaForCausalLM

__version__ = "0.1.0"
__all__ = ["LlambaConfig", "LlambaForCausalLM", "__version__"]
