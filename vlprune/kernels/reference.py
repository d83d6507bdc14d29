"""Exact PyTorch references of the engine's hot operations (the CPU path, and the oracle for GPU kernels)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def gather_rows(
    index: torch.Tensor, sources: Sequence[torch.Tensor], extras: Sequence[torch.Tensor | None] | None = None
) -> list[torch.Tensor]:
    """Gather the same token rows of several per-token tensors (hidden states, RoPE cos and sin, position ids) at once,
    optionally from each source followed by appended rows (recycled tokens).

    Args:
        index: (B, L') long; ``index[b, j] < L`` picks ``sources[i][b, index[b, j]]``, ``index[b, j] >= L`` picks
            row ``index[b, j] - L`` of ``extras[i][b]``.
        sources: tensors of shape (B|1, L, ...), all with the same L; a batch of 1 is broadcast to B.
        extras: one (B, M, ...) tensor or None per source (None: that source has no appended rows and the index must
            stay below L for it).

    Returns:
        one (B, L', ...) tensor per source, in the source's dtype.
    """
    extras = list(extras) if extras is not None else [None] * len(sources)
    if len(extras) != len(sources):
        raise ValueError(f"got {len(extras)} extras for {len(sources)} sources; pass one (or None) per source")
    outputs = []
    for source, extra in zip(sources, extras, strict=True):
        if extra is not None:
            if source.shape[0] == 1 and extra.shape[0] > 1:
                source = source.expand(extra.shape[0], *source.shape[1:])
            source = torch.cat([source, extra.to(source.dtype)], dim=1)
        outputs.append(gather_tokens(source, index))
    return outputs


def merge_tokens(
    tokens: torch.Tensor, group: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Weighted mean of the tokens of each group (a cluster, a grid cell): the recycling merge.

    Args:
        tokens: (B, N, D) token features.
        group: (B, N) long, the group (0..num_groups-1) of each token; -1 leaves a token out.
        num_groups: G.
        weight: (B, N) non-negative weights, or None for a plain mean.

    Returns:
        (B, G, D) float32, ``sum(w * x) / sum(w)`` over each group's members; 0 for a group without members (or
        whose weights sum to 0).
    """
    batch, _, width = tokens.shape
    member = group >= 0
    weight = member.float() if weight is None else weight.float() * member
    slot = group.clamp(min=0)
    sums = torch.zeros(batch, num_groups, width, device=tokens.device).scatter_add_(
        1, slot[..., None].expand(-1, -1, width), tokens.float() * weight[..., None]
    )
    totals = torch.zeros(batch, num_groups, device=tokens.device).scatter_add_(1, slot, weight)
    return torch.where(totals[..., None] > 0, sums / totals.clamp(min=torch.finfo(torch.float32).tiny)[..., None], 0.0)


def gather_tokens(source: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gather rows of a batch along the token axis.

    Args:
        source: (B, L, ...) per-token values; a leading batch of 1 is broadcast to B.
        index: (B, L') long, token indices into ``source`` for each sample.

    Returns:
        (B, L', ...) with ``out[b, j] = source[b, index[b, j]]``.
    """
    if source.shape[0] == 1 and index.shape[0] > 1:
        source = source.expand(index.shape[0], *source.shape[1:])
    trailing = source.shape[2:]
    expanded = index.reshape(*index.shape, *([1] * len(trailing))).expand(*index.shape, *trailing)
    return torch.gather(source, 1, expanded)


def attention_rows(
    query: torch.Tensor,
    key: torch.Tensor,
    rows: torch.Tensor,
    scaling: float,
    attention_mask: torch.Tensor | None = None,
    causal: bool = True,
    average_heads: bool = True,
) -> torch.Tensor:
    """Head-averaged softmax attention of selected query rows over all keys, without forming the (L, L) matrix.

    Args:
        query: (B, H, Lq, d) post-RoPE queries.
        key: (B, Hkv, Lk, d) post-RoPE keys; H must be a multiple of Hkv (grouped-query attention).
        rows: (B, R) long, query indices per sample.
        scaling: the attention's logit scale (usually d ** -0.5).
        attention_mask: what the model's attention function received: None, a boolean (B|1, 1, Lq, Lk) mask with
            True = attend, or an additive float (B|1, 1, Lq, Lk) mask.
        causal: with ``attention_mask=None``, whether query i sees only keys <= i + (Lk - Lq) (decoder) or every key
            (vision encoder).

        average_heads: average over the H heads (the default), or keep them.

    Returns:
        (B, R, Lk) float32 attention probabilities averaged over the H heads, or (B, H, R, Lk) per head. Each row
        sums to 1.
    """
    batch, heads, q_len, head_dim = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    picked = torch.gather(query, 2, rows[:, None, :, None].expand(batch, heads, rows.shape[1], head_dim))
    # (B, Hkv, groups * R, d) against (B, Hkv, Lk, d): the grouped heads share one key head, never repeated in memory.
    picked = picked.reshape(batch, kv_heads, groups * rows.shape[1], head_dim).float()
    logits = torch.matmul(picked, key.float().transpose(-1, -2)) * scaling
    logits = logits.reshape(batch, heads, rows.shape[1], k_len)
    if attention_mask is not None:
        mask = attention_mask.expand(batch, -1, -1, -1)
        mask_rows = torch.gather(mask, 2, rows[:, None, :, None].expand(batch, mask.shape[1], rows.shape[1], k_len))
        if mask_rows.dtype == torch.bool:
            logits = logits.masked_fill(~mask_rows, float("-inf"))
        else:
            logits = logits + mask_rows.float()
    elif causal:
        last_visible = rows + (k_len - q_len)  # (B, R)
        columns = torch.arange(k_len, device=key.device)
        logits = logits.masked_fill(columns[None, None, None, :] > last_visible[:, None, :, None], float("-inf"))
    probabilities = torch.softmax(logits, dim=-1)
    return probabilities.mean(dim=1) if average_heads else probabilities
