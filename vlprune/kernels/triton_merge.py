"""Recycling merge in Triton: the weighted scatter-add of tokens into their groups (a cluster, a grid cell), then the
division by each group's total weight. Reference: :func:`vlprune.kernels.reference.merge_tokens`.

The scatter-add uses float32 atomics, as ``index_add_`` does on CUDA, so the order of additions (and the last bits of
a sum) may change from run to run; the normalisation is a second launch over the (B, G, D) sums.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vlprune.kernels import launch

BLOCK = 256


@triton.jit
def _scatter_add_kernel(
    tokens,
    group,
    weight,
    sums,
    totals,
    count,
    width,
    num_groups,
    t_stride_b,
    t_stride_n,
    HAS_WEIGHT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    program = tl.program_id(0)  # over (sample, token)
    sample = (program // count).to(tl.int64)
    target = tl.load(group + program)
    if target >= 0:
        scale = tl.load(weight + program).to(tl.float32) if HAS_WEIGHT else 1.0
        columns = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = columns < width
        row = program % count
        values = tl.load(tokens + sample * t_stride_b + row * t_stride_n + columns, mask=inside, other=0.0)
        group_row = sample * num_groups + target
        tl.atomic_add(sums + group_row * width + columns, values.to(tl.float32) * scale, mask=inside)
        if tl.program_id(1) == 0:
            tl.atomic_add(totals + group_row, scale)


@triton.jit
def _normalise_kernel(sums, totals, output, width, BLOCK: tl.constexpr):
    group_row = tl.program_id(0)  # over (sample, group)
    columns = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = columns < width
    total = tl.load(totals + group_row)
    values = tl.load(sums + group_row * width + columns, mask=inside, other=0.0)
    mean = tl.where(total > 0, values / tl.where(total > 0, total, 1.0), 0.0)
    tl.store(output + group_row * width + columns, mean, mask=inside)


def merge_tokens(
    tokens: torch.Tensor, group: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Triton version of :func:`vlprune.kernels.reference.merge_tokens` (same arguments and result)."""
    batch, count, width = tokens.shape
    if tokens.stride(-1) != 1:
        tokens = tokens.contiguous()
    group = group.contiguous()
    sums = launch.zeros((batch, num_groups, width), torch.float32, tokens.device)
    totals = launch.zeros((batch, num_groups), torch.float32, tokens.device)
    output = launch.empty((batch, num_groups, width), torch.float32, tokens.device)
    if output.numel() == 0:
        return output
    columns = triton.cdiv(width, BLOCK)
    if count:
        weights = group if weight is None else weight.contiguous()
        _scatter_add_kernel[(batch * count, columns)](
            tokens,
            group,
            weights,
            sums,
            totals,
            count,
            width,
            num_groups,
            tokens.stride(0),
            tokens.stride(1),
            HAS_WEIGHT=weight is not None,
            BLOCK=BLOCK,
        )
    _normalise_kernel[(batch * num_groups, columns)](sums, totals, output, width, BLOCK=BLOCK)
    return output
