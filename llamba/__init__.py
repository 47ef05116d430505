"""llamba: distill a Llama-family Transformer into a Llamba recurrent model (Discrete Mamba-2 mixers, MOHAWK), and
run it fast.

Importing it registers ``model_type: llamba`` with transformers' Auto classes, so after ``import llamba`` a Llamba
folder (ours, or cartesia's official layout) loads with ``AutoModelForCausalLM.from_pretrained``.
"""

from llamba.model import LlambaConfig, LlambaForCausalLM
from llamba.model.modeling import set_fast_generate


def _fast_generate(model, inputs, generation_config, kwargs):
    """``LlambaForCausalLM.generate``'s CUDA fast path; llamba.generation is imported on the first call only."""
    from llamba.generation import try_fast_generate

    return try_fast_generate(model, inputs, generation_config, kwargs)


set_fast_generate(_fast_generate)  # the model layer imports nothing from the layers above it

__version__ = "0.1.0"
__all__ = ["LlambaConfig", "LlambaForCausalLM", "__version__"]
