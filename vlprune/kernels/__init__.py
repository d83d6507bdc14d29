"""The hot operations of the engine, one function each.

The engine calls only these functions. Each has an exact PyTorch reference (``vlprune.kernels.reference``); fused
Triton kernels for CUDA tensors plug in behind the same signatures, with the reference kept as the CPU path and as the
oracle their tests compare against.
"""

from vlprune.kernels.reference import attention_rows, gather_tokens

__all__ = ["attention_rows", "gather_tokens"]
