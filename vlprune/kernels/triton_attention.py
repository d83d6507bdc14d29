"""Attention-row scoring in Triton: softmax(q K^T * scale + mask) of selected query rows over all keys, averaged over
the heads (or per head), without forming the (B, H, R, Lk) logits. Reference:
:func:`vlprune.kernels.reference.attention_rows`.

Two launches: the first runs an online softmax over the keys for every (sample, head, row) and keeps only its maximum
and normaliser; the second recomputes each key block's logits for all heads and accumulates the normalised
probabilities in registers, so that the head average needs no atomics and is deterministic. Grouped-query attention
reads key head ``h // (H // Hkv)`` for query head ``h``, never repeating keys in memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vlprune.kernels import launch

BLOCK_KEYS = 64
MASK_NONE, MASK_BOOL, MASK_ADDITIVE = 0, 1, 2


@triton.jit
def _row_logits(
    query,
    key,
    mask,
    sample,
    head,
    kv_head,
    query_row,
    keys,
    dims,
    head_dim,
    k_len,
    q_len,
    scaling,
    q_stride_b,
    q_stride_h,
    q_stride_l,
    k_stride_b,
    k_stride_h,
    k_stride_l,
    m_stride_b,
    m_stride_q,
    MASK_KIND: tl.constexpr,
    CAUSAL: tl.constexpr,
):
    """(BLOCK_KEYS,) float32 logits of one query row against one block of keys; -inf where it may not attend."""
    q = tl.load(
        query + sample * q_stride_b + head * q_stride_h + query_row * q_stride_l + dims, mask=dims < head_dim, other=0.0
    )
    in_range = keys < k_len
    k = tl.load(
        key + sample * k_stride_b + kv_head * k_stride_h + keys[:, None] * k_stride_l + dims[None, :],
        mask=in_range[:, None] & (dims[None, :] < head_dim),
        other=0.0,
    )
    logits = tl.sum(q.to(tl.float32)[None, :] * k.to(tl.float32), axis=1) * scaling
    visible = in_range
    if MASK_KIND == 1:
        allowed = tl.load(mask + sample * m_stride_b + query_row * m_stride_q + keys, mask=in_range, other=0)
        visible = visible & (allowed != 0)
    if MASK_KIND == 2:
        added = tl.load(mask + sample * m_stride_b + query_row * m_stride_q + keys, mask=in_range, other=0.0)
        logits = logits + added.to(tl.float32)
    if CAUSAL:
        visible = visible & (keys <= query_row + (k_len - q_len))
    return tl.where(visible, logits, float("-inf"))


@triton.jit
def _row_statistics_kernel(
    query,
    key,
    mask,
    rows,
    row_max,
    row_sum,
    heads,
    groups,
    num_rows,
    head_dim,
    k_len,
    q_len,
    scaling,
    q_stride_b,
    q_stride_h,
    q_stride_l,
    k_stride_b,
    k_stride_h,
    k_stride_l,
    m_stride_b,
    m_stride_q,
    MASK_KIND: tl.constexpr,
    CAUSAL: tl.constexpr,
    BLOCK_KEYS: tl.constexpr,
    BLOCK_DIM: tl.constexpr,
):
    program = tl.program_id(0)  # over (sample, head, row)
    sample = (program // (heads * num_rows)).to(tl.int64)  # 64-bit offsets: batch x stride can pass 2**31
    head = (program // num_rows) % heads
    row = program % num_rows
    query_row = tl.load(rows + sample * num_rows + row)
    dims = tl.arange(0, BLOCK_DIM)
    running_max = tl.full((BLOCK_KEYS,), float("-inf"), tl.float32)
    running_sum = tl.zeros((BLOCK_KEYS,), tl.float32)
    for start in range(0, k_len, BLOCK_KEYS):
        keys = start + tl.arange(0, BLOCK_KEYS)
        logits = _row_logits(
            query,
            key,
            mask,
            sample,
            head,
            head // groups,
            query_row,
            keys,
            dims,
            head_dim,
            k_len,
            q_len,
            scaling,
            q_stride_b,
            q_stride_h,
            q_stride_l,
            k_stride_b,
            k_stride_h,
            k_stride_l,
            m_stride_b,
            m_stride_q,
            MASK_KIND,
            CAUSAL,
        )
        # Per-lane online softmax: lanes that have seen only -inf keep max -inf and sum 0 (no inf - inf).
        new_max = tl.maximum(running_max, logits)
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        running_sum = running_sum * tl.exp(running_max - safe_max) + tl.exp(logits - safe_max)
        running_max = new_max
    top = tl.max(running_max, axis=0)
    safe_top = tl.where(top == float("-inf"), 0.0, top)
    total = tl.sum(running_sum * tl.exp(running_max - safe_top), axis=0)
    tl.store(row_max + program, top)
    tl.store(row_sum + program, total)


@triton.jit
def _row_probabilities_kernel(
    query,
    key,
    mask,
    rows,
    row_max,
    row_sum,
    output,
    heads,
    groups,
    num_rows,
    head_dim,
    k_len,
    q_len,
    scaling,
    q_stride_b,
    q_stride_h,
    q_stride_l,
    k_stride_b,
    k_stride_h,
    k_stride_l,
    m_stride_b,
    m_stride_q,
    MASK_KIND: tl.constexpr,
    CAUSAL: tl.constexpr,
    AVERAGE: tl.constexpr,
    BLOCK_KEYS: tl.constexpr,
    BLOCK_DIM: tl.constexpr,
):
    program = tl.program_id(0)  # over (sample, row)
    sample = (program // num_rows).to(tl.int64)
    row = program % num_rows
    query_row = tl.load(rows + sample * num_rows + row)
    keys = tl.program_id(1) * BLOCK_KEYS + tl.arange(0, BLOCK_KEYS)
    dims = tl.arange(0, BLOCK_DIM)
    total = tl.zeros((BLOCK_KEYS,), tl.float32)
    for head in range(0, heads):
        logits = _row_logits(
            query,
            key,
            mask,
            sample,
            head,
            head // groups,
            query_row,
            keys,
            dims,
            head_dim,
            k_len,
            q_len,
            scaling,
            q_stride_b,
            q_stride_h,
            q_stride_l,
            k_stride_b,
            k_stride_h,
            k_stride_l,
            m_stride_b,
            m_stride_q,
            MASK_KIND,
            CAUSAL,
        )
        statistic = (sample * heads + head) * num_rows + row
        top = tl.load(row_max + statistic)
        safe_top = tl.where(top == float("-inf"), 0.0, top)
        probability = tl.exp(logits - safe_top) / tl.load(row_sum + statistic)
        if AVERAGE:
            total += probability
        else:
            tl.store(output + statistic * k_len + keys, probability, mask=keys < k_len)
    if AVERAGE:
        tl.store(output + program * k_len + keys, total / heads, mask=keys < k_len)


def _mask_rows(attention_mask: torch.Tensor | None, batch: int) -> tuple[torch.Tensor | None, int, int, int]:
    """(mask, kind, batch stride, query stride) with the mask as a (B|1, Lq, Lk) view with unit key stride."""
    if attention_mask is None:
        return None, MASK_NONE, 0, 0
    mask = attention_mask[:, 0]
    if mask.stride(-1) != 1:
        mask = mask.contiguous()
    if mask.dtype == torch.bool:
        kind = MASK_BOOL
        mask = mask.view(torch.uint8)
    else:
        kind = MASK_ADDITIVE
    batch_stride = 0 if mask.shape[0] == 1 and batch > 1 else mask.stride(0)
    return mask, kind, batch_stride, mask.stride(1)


def attention_rows(
    query: torch.Tensor,
    key: torch.Tensor,
    rows: torch.Tensor,
    scaling: float,
    attention_mask: torch.Tensor | None = None,
    causal: bool = True,
    average_heads: bool = True,
) -> torch.Tensor:
    """Triton version of :func:`vlprune.kernels.reference.attention_rows` (same arguments and result; the mask must
    have one head, ``attention_mask.shape[1] == 1``, as the models' masks have)."""
    batch, heads, q_len, head_dim = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    if attention_mask is not None and attention_mask.shape[1] != 1:
        raise ValueError(f"attention_mask has {attention_mask.shape[1]} heads; the kernel takes masks with 1")
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} key heads")
    num_rows = rows.shape[1]
    if query.stride(-1) != 1:
        query = query.contiguous()
    if key.stride(-1) != 1:
        key = key.contiguous()
    rows = rows.contiguous()
    mask, kind, mask_stride_b, mask_stride_q = _mask_rows(attention_mask, batch)
    row_max = launch.empty((batch, heads, num_rows), torch.float32, query.device)
    row_sum = launch.empty((batch, heads, num_rows), torch.float32, query.device)
    shape = (batch, num_rows, k_len) if average_heads else (batch, heads, num_rows, k_len)
    output = launch.empty(shape, torch.float32, query.device)
    if output.numel() == 0:
        return output
    common = dict(
        heads=heads,
        groups=heads // kv_heads,
        num_rows=num_rows,
        head_dim=head_dim,
        k_len=k_len,
        q_len=q_len,
        scaling=float(scaling),
        q_stride_b=query.stride(0),
        q_stride_h=query.stride(1),
        q_stride_l=query.stride(2),
        k_stride_b=key.stride(0),
        k_stride_h=key.stride(1),
        k_stride_l=key.stride(2),
        m_stride_b=mask_stride_b,
        m_stride_q=mask_stride_q,
        MASK_KIND=kind,
        CAUSAL=attention_mask is None and causal,
        BLOCK_KEYS=BLOCK_KEYS,
        BLOCK_DIM=triton.next_power_of_2(head_dim),
    )
    mask_pointer = query if mask is None else mask
    _row_statistics_kernel[(batch * heads * num_rows,)](query, key, mask_pointer, rows, row_max, row_sum, **common)
    grid = (batch * num_rows, triton.cdiv(k_len, BLOCK_KEYS))
    _row_probabilities_kernel[grid](
        query, key, mask_pointer, rows, row_max, row_sum, output, AVERAGE=average_heads, **common
    )
    return output
