"""Depthwise causal convolution over the mixer's [x | B | C] channels: ``naive.py`` (the PyTorch reference, whole
sequences and one step) and ``triton_kernel.py`` (the prefill kernel with document resets and left padding)."""

from llamba.ops.conv.naive import causal_conv, conv_step

__all__ = ["causal_conv", "conv_step"]
