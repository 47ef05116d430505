"""Depthwise causal convolution over the mixer's [x | B | C] channels: ``naive.py`` (the PyTorch reference, whole
sequences and one step), ``triton_kernel.py`` (the prefill kernel: conv state and left padding, no autograd) and
``triton_train.py`` (training: document resets, forward and backward)."""

from llamba.ops.conv.naive import causal_conv, conv_step

__all__ = ["causal_conv", "conv_step"]
