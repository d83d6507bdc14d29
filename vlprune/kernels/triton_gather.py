"""Fused gather and compaction in Triton: the kept rows of up to four per-token tensors (hidden states, RoPE cos and
sin, position ids) for a whole batch in one launch, each read from its source or from appended rows (recycled tokens)
without concatenating them first. Reference: :func:`vlprune.kernels.reference.gather_rows`.

Indices are not range-checked here (a check would cost a device-to-host read); the engine only produces valid ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from vlprune.kernels import launch

SOURCES_PER_LAUNCH = 4
BLOCK = 1024


@triton.jit
def _copy_row(
    source,
    extra,
    target,
    sample,
    row,
    picked,
    length,
    source_stride_b,
    source_stride_l,
    extra_stride_b,
    extra_stride_l,
    target_stride_b,
    target_stride_l,
    width,
    columns,
    HAS_EXTRA: tl.constexpr,
):
    inside = columns < width
    from_source = picked < length
    source_row = tl.minimum(picked, length - 1)
    value = tl.load(
        source + sample * source_stride_b + source_row * source_stride_l + columns, mask=inside & from_source
    )
    if HAS_EXTRA:
        extra_row = tl.maximum(picked - length, 0)
        appended = tl.load(
            extra + sample * extra_stride_b + extra_row * extra_stride_l + columns, mask=inside & (picked >= length)
        )
        value = tl.where(from_source, value, appended)
    tl.store(target + sample * target_stride_b + row * target_stride_l + columns, value, mask=inside)


@triton.jit
def _gather_rows_kernel(
    index,
    index_stride_b,
    rows_out,
    length,
    s0,
    e0,
    t0,
    s0_b,
    s0_l,
    e0_b,
    e0_l,
    t0_b,
    t0_l,
    w0,
    s1,
    e1,
    t1,
    s1_b,
    s1_l,
    e1_b,
    e1_l,
    t1_b,
    t1_l,
    w1,
    s2,
    e2,
    t2,
    s2_b,
    s2_l,
    e2_b,
    e2_l,
    t2_b,
    t2_l,
    w2,
    s3,
    e3,
    t3,
    s3_b,
    s3_l,
    e3_b,
    e3_l,
    t3_b,
    t3_l,
    w3,
    COUNT: tl.constexpr,
    EXTRA0: tl.constexpr,
    EXTRA1: tl.constexpr,
    EXTRA2: tl.constexpr,
    EXTRA3: tl.constexpr,
    BLOCK: tl.constexpr,
):
    flat_row = tl.program_id(0)
    sample = (flat_row // rows_out).to(tl.int64)  # 64-bit offsets: batch x stride can pass 2**31
    row = flat_row % rows_out
    picked = tl.load(index + sample * index_stride_b + row)
    columns = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    _copy_row(s0, e0, t0, sample, row, picked, length, s0_b, s0_l, e0_b, e0_l, t0_b, t0_l, w0, columns, EXTRA0)
    if COUNT > 1:
        _copy_row(s1, e1, t1, sample, row, picked, length, s1_b, s1_l, e1_b, e1_l, t1_b, t1_l, w1, columns, EXTRA1)
    if COUNT > 2:
        _copy_row(s2, e2, t2, sample, row, picked, length, s2_b, s2_l, e2_b, e2_l, t2_b, t2_l, w2, columns, EXTRA2)
    if COUNT > 3:
        _copy_row(s3, e3, t3, sample, row, picked, length, s3_b, s3_l, e3_b, e3_l, t3_b, t3_l, w3, columns, EXTRA3)


def _rows_view(tensor: torch.Tensor) -> torch.Tensor:
    """(B, L, W) view with unit stride along W; bool is read as uint8 (Triton has no bool pointers)."""
    flat = tensor.reshape(tensor.shape[0], tensor.shape[1], -1)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    return flat.view(torch.uint8) if flat.dtype == torch.bool else flat


def _launch(
    index: torch.Tensor, sources: Sequence[torch.Tensor], extras: Sequence[torch.Tensor | None]
) -> list[torch.Tensor]:
    batch, rows_out = index.shape
    length = sources[0].shape[1]
    arguments: list[object] = []
    flags: dict[str, bool] = {}
    outputs, widths = [], []
    for slot in range(SOURCES_PER_LAUNCH):
        if slot < len(sources):
            source, extra = _rows_view(sources[slot]), extras[slot]
            extra_view = None if extra is None else _rows_view(extra.to(sources[slot].dtype))
            output = launch.empty((batch, rows_out, *sources[slot].shape[2:]), sources[slot].dtype, index.device)
            target = _rows_view(output)
            outputs.append(output)
            widths.append(source.shape[2])
            source_stride_b = 0 if source.shape[0] == 1 else source.stride(0)
            reads = source if extra_view is None else extra_view
            arguments += [source, reads, target, source_stride_b, source.stride(1)]
            arguments += [reads.stride(0), reads.stride(1), target.stride(0), target.stride(1), source.shape[2]]
            flags[f"EXTRA{slot}"] = extra_view is not None
        else:  # unused slots repeat the first source; COUNT keeps the kernel from touching them
            arguments += arguments[:10]
            flags[f"EXTRA{slot}"] = False
    grid = (batch * rows_out, triton.cdiv(max(widths), BLOCK))
    index = index.contiguous()
    _gather_rows_kernel[grid](
        index, index.stride(0), rows_out, length, *arguments, COUNT=len(sources), BLOCK=BLOCK, **flags
    )
    return outputs


def gather_rows(
    index: torch.Tensor, sources: Sequence[torch.Tensor], extras: Sequence[torch.Tensor | None] | None = None
) -> list[torch.Tensor]:
    """Triton version of :func:`vlprune.kernels.reference.gather_rows` (one launch per four sources)."""
    extras = list(extras) if extras is not None else [None] * len(sources)
    if len(extras) != len(sources):
        raise ValueError(f"got {len(extras)} extras for {len(sources)} sources; pass one (or None) per source")
    if index.shape[1] == 0 or index.shape[0] == 0:
        return [s.new_empty((index.shape[0], index.shape[1], *s.shape[2:])) for s in sources]
    outputs: list[torch.Tensor] = []
    for start in range(0, len(sources), SOURCES_PER_LAUNCH):
        chunk = slice(start, start + SOURCES_PER_LAUNCH)
        outputs += _launch(index, sources[chunk], extras[chunk])
    return outputs
