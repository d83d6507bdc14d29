"""Output allocation shared by the Triton wrappers (one place, so that tests can poison every output buffer)."""

from __future__ import annotations

import torch


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised output buffer: a kernel must write every element of it."""
    return torch.empty(shape, dtype=dtype, device=device)


def zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An accumulator that a kernel adds into (its zeros are part of the result, so tests do not poison it)."""
    return torch.zeros(shape, dtype=dtype, device=device)
