"""Scoring rows: which query rows a stage reads (the last token, or the instruction's text tokens), and their
attention to the visual tokens, kept per stage."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from vlprune.engine.layout import Layout
from vlprune.kernels import attention_rows
from vlprune.needs import Need
from vlprune.pruners.base import QueryRows, StagePlan


class QueryAttention(NamedTuple):
    """A stage's query-row attention, captured at the layer before it (or computed at its own layer)."""

    visual: torch.Tensor  # (B, R, N) or (B, H, R, N): to the visual tokens
    mask: torch.Tensor  # (B, R): which rows are real
    own: torch.Tensor | None  # (B, R, R) or (B, H, R, R): to the query rows' own tokens, when the stage asks
    values: torch.Tensor | None = None  # (B, Hkv, N, d): the visual tokens' value vectors, when the stage asks
    query_values: torch.Tensor | None = None  # (B, Hkv, R, d): the query rows' value vectors
    keys: torch.Tensor | None = None  # (B, Hkv, N, d): the visual tokens' post-RoPE keys, when the stage asks
    query_keys: torch.Tensor | None = None  # (B, Hkv, R, d): the query rows' post-RoPE keys


def token_states(states: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """(B, H, K, d) the per-head vectors (B, H, L, d) of the tokens at ``slots`` (B, K)."""
    index = slots.to(states.device)[:, None, :, None].expand(-1, states.shape[1], -1, states.shape[-1])
    return torch.gather(states, 2, index)


def query_rows(kind: QueryRows, layout: Layout, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, R) query slot indices and (B, R) validity; samples with fewer rows repeat their last row."""
    batch, length = layout.is_visual.shape
    if kind is QueryRows.LAST:
        rows = torch.full((batch, 1), length - 1, dtype=torch.long, device=device)
        return rows, torch.ones_like(rows, dtype=torch.bool)
    rows, valid = layout.text_rows
    return rows.to(device), valid.to(device)


def columns(probabilities: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """The columns ``slots`` (B, K) of (B, R, L) or (B, H, R, L) attention rows."""
    slots = slots.to(probabilities.device)
    index = slots.view(slots.shape[0], *([1] * (probabilities.dim() - 2)), slots.shape[1])
    return torch.gather(probabilities, -1, index.expand(*probabilities.shape[:-1], -1))


def stage_rows(
    stage: StagePlan, probabilities: torch.Tensor, layout: Layout, rows: torch.Tensor, row_mask: torch.Tensor
) -> QueryAttention:
    """What a stage keeps of its query rows' attention: the visual columns, the row mask and, when it asks, the
    columns of the query rows' own tokens."""
    own = columns(probabilities, rows) if stage.query_row_attention else None
    return QueryAttention(columns(probabilities, layout.visual_slots), row_mask, own)


def rows_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    rows: torch.Tensor,
    local_rows: torch.Tensor,
    scale: float,
    mask: Any,
    average_heads: bool = True,
) -> torch.Tensor:
    """Attention of queries already picked at ``rows`` (B, H, R, d) over all keys, causal by the rows' slots."""
    if mask is None:
        length = key.shape[2]
        columns = torch.arange(length, device=key.device)
        mask = (columns[None, None, None, :] <= rows[:, None, :, None]).expand(-1, 1, -1, -1)  # (B, 1, R, L)
        return attention_rows(query, key, local_rows, scale, mask, causal=False, average_heads=average_heads)
    picked = torch.gather(
        mask.expand(rows.shape[0], -1, -1, -1), 2, rows[:, None, :, None].expand(-1, mask.shape[1], -1, mask.shape[-1])
    )
    return attention_rows(query, key, local_rows, scale, picked, causal=False, average_heads=average_heads)


def observed_rows(
    stage: StagePlan,
    layout: Layout,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: Any,
    scaling: float,
) -> QueryAttention:
    """What a stage needs of the layer before it, from the post-RoPE queries, keys and values (B, H, L, d) that the
    layer's attention received: its query rows' attention (causal, under the layer's own ``mask``) and, when it asks,
    the value and key vectors."""
    rows, row_mask = query_rows(stage.query_rows, layout, query.device)
    probabilities = attention_rows(
        query, key, rows, scaling, mask, causal=True, average_heads=not stage.per_head_attention
    )  # (B, R, L) or (B, H, R, L)
    captured = stage_rows(stage, probabilities, layout, rows, row_mask)
    if stage.value_states:
        captured = captured._replace(
            values=token_states(value, layout.visual_slots), query_values=token_states(value, rows)
        )
    if Need.KEY_STATES in stage.needs:
        captured = captured._replace(keys=token_states(key, layout.visual_slots), query_keys=token_states(key, rows))
    return captured


def own_layer_rows(
    attention: torch.nn.Module,
    query_key: Any,
    stage: StagePlan,
    hidden: torch.Tensor,
    layout: Layout,
    mask: Any,
) -> QueryAttention:
    """(B, R, N) attention of the stage's query rows to the visual tokens, from its own layer's queries and keys
    (``query_key(layer, hidden, rows, position_embeddings)``: the adapter's projection of that layer), before the
    layer runs; ``attention`` is the layer's attention module, for its scale."""
    rows, row_mask = query_rows(stage.query_rows, layout, hidden.device)
    query, key = query_key(stage.layer, hidden, rows, layout.position_embeddings)
    scale = getattr(attention, "scaling", query.shape[-1] ** -0.5)
    local_rows = torch.arange(rows.shape[1], device=hidden.device).expand_as(rows)
    probabilities = rows_attention(query, key, rows, local_rows, scale, mask, not stage.per_head_attention)
    return stage_rows(stage, probabilities, layout, rows, row_mask)
