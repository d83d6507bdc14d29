"""The hot operations of the engine, one function each, dispatched by device.

On CUDA tensors each function runs its fused Triton kernel (``triton_gather``, ``triton_attention``,
``triton_merge``); elsewhere it runs the exact PyTorch reference (``vlprune.kernels.reference``), which is also the
oracle the kernels are tested against. ``VLPRUNE_KERNELS=reference`` forces the references everywhere, for
debugging. Inside ``torch.compile`` (the captured mode) the references run too, and the compiler generates its own
fused kernels from them.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence

import torch

from vlprune.errors import VlpruneError
from vlprune.kernels import reference

FORCE_VARIABLE = "VLPRUNE_KERNELS"
TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None


SETTINGS = ("auto", "reference")


def kernel_setting() -> str:
    """The value of ``VLPRUNE_KERNELS`` (``auto`` when unset). The CLI and :func:`vlprune.attach` call it at start-up,
    so that a bad value fails before any model runs rather than inside a generation.

    Raises:
        VlpruneError: a value other than ``auto`` or ``reference``.
    """
    setting = os.environ.get(FORCE_VARIABLE, "auto")
    if setting not in SETTINGS:
        raise VlpruneError(f"{FORCE_VARIABLE}={setting!r} is not valid; choose one of {', '.join(SETTINGS)}")
    return setting


def backend(*tensors: torch.Tensor) -> str:
    """``"triton"`` when every tensor is on a CUDA device, Triton is installed and ``VLPRUNE_KERNELS`` is not
    ``reference``; otherwise ``"reference"``."""
    if torch.compiler.is_compiling():  # a captured graph: the compiler fuses the references itself
        return "reference"
    setting = kernel_setting()
    if setting == "reference" or not TRITON_AVAILABLE:
        return "reference"
    return "triton" if all(t.is_cuda for t in tensors) else "reference"


def gather_rows(
    index: torch.Tensor, sources: Sequence[torch.Tensor], extras: Sequence[torch.Tensor | None] | None = None
) -> list[torch.Tensor]:
    """See :func:`vlprune.kernels.reference.gather_rows`; one launch per four sources on CUDA."""
    if backend(index, *sources) == "triton":
        from vlprune.kernels import triton_gather

        return triton_gather.gather_rows(index, sources, extras)
    return reference.gather_rows(index, sources, extras)


def gather_tokens(source: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """See :func:`vlprune.kernels.reference.gather_tokens`."""
    if backend(index, source) == "triton":
        from vlprune.kernels import triton_gather

        return triton_gather.gather_rows(index, [source])[0]
    return reference.gather_tokens(source, index)


def attention_rows(
    query: torch.Tensor,
    key: torch.Tensor,
    rows: torch.Tensor,
    scaling: float,
    attention_mask: torch.Tensor | None = None,
    causal: bool = True,
    average_heads: bool = True,
) -> torch.Tensor:
    """See :func:`vlprune.kernels.reference.attention_rows`."""
    single_head_mask = attention_mask is None or attention_mask.shape[1] == 1
    if single_head_mask and backend(query, key, rows) == "triton":
        from vlprune.kernels import triton_attention

        return triton_attention.attention_rows(query, key, rows, scaling, attention_mask, causal, average_heads)
    return reference.attention_rows(query, key, rows, scaling, attention_mask, causal, average_heads)


def merge_tokens(
    tokens: torch.Tensor, group: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """See :func:`vlprune.kernels.reference.merge_tokens`."""
    if backend(tokens, group) == "triton":
        from vlprune.kernels import triton_merge

        return triton_merge.merge_tokens(tokens, group, num_groups, weight)
    return reference.merge_tokens(tokens, group, num_groups, weight)


__all__ = ["attention_rows", "backend", "gather_rows", "gather_tokens", "kernel_setting", "merge_tokens"]
